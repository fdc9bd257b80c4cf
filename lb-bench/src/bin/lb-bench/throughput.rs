//! Part 3: small-packet UDP flood throughput through the node, counted at the pod, with the
//! CPU time it cost.
//!
//! `lb-loadgen flood` sends 18-byte UDP datagrams over 16 flows to the target Service's UDP
//! NodePort (the direct path: to the pod) as fast as it can, bounded by a count and a
//! duration. The pod's server counts what it receives; the pod's `eth0` counter gives what
//! the node delivered.
//!
//! CPU: a network namespace has no CPU accounting of its own, and the node namespace runs
//! no process: its forwarding work runs in softirq context on whichever CPU the packet is
//! on. So we report (a) the machine-wide softirq time from `/proc/stat` (tick-sampled on
//! this kernel, which has no IRQ time accounting; it includes the client's and the pod's
//! softirq work, identical for every path), and (b) the machine-wide busy time, both per
//! delivered packet, plus the sender's and the receiver's own CPU. Both machine-wide numbers
//! include anything else running on the machine during the flood: compare paths within one
//! run on a quiet machine.
use std::time::Duration;

use lb_bench::schema::{PartResult, Row, Stat};
use serde::Deserialize;

use crate::labkit::{self, PathKind};
use crate::services::Position;
use crate::Progress;

/// The direct path is the floor; nftables is left out here (its 10k-Service rule set takes
/// minutes to load, and e2e already compares it).
const PATHS: [PathKind; 4] = [
    PathKind::Direct,
    PathKind::Ours,
    PathKind::OursTc,
    PathKind::Iptables(Position::End),
];
const FLOWS: u32 = 16;
const PAYLOAD: u32 = 18;

struct Plan {
    sizes: Vec<usize>,
    runs: usize,
    seconds: f64,
    max_packets: u64,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                sizes: vec![1, 1_000],
                runs: 2,
                seconds: 2.0,
                max_packets: 20_000_000,
            }
        } else {
            Plan {
                sizes: vec![1, 10_000],
                runs: 3,
                seconds: 5.0,
                max_packets: 50_000_000,
            }
        }
    }
}

#[derive(Debug, Deserialize)]
struct FloodResult {
    sent: u64,
    elapsed_s: f64,
}

/// Aggregate CPU times from the first line of `/proc/stat`, in clock ticks.
#[derive(Debug, Clone, Copy, Default)]
struct CpuTimes {
    busy: u64,
    softirq: u64,
}

fn cpu_times() -> anyhow::Result<CpuTimes> {
    let text = std::fs::read_to_string("/proc/stat")?;
    let line = text
        .lines()
        .find(|l| l.starts_with("cpu "))
        .ok_or_else(|| anyhow::anyhow!("no cpu line in /proc/stat"))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    anyhow::ensure!(v.len() >= 8, "short cpu line in /proc/stat: {line}");
    // user nice system idle iowait irq softirq steal
    Ok(CpuTimes {
        busy: v[0] + v[1] + v[2] + v[5] + v[6] + v[7],
        softirq: v[6],
    })
}

/// utime + stime of process `pid`, in clock ticks.
fn proc_cpu(pid: u32) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = text
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow::anyhow!("bad /proc/{pid}/stat"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    Ok(get(11) + get(12))
}

/// CPU time of reaped children (user + system), in ns.
fn children_cpu_ns() -> u128 {
    // SAFETY: getrusage fills the zeroed struct we own.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as u128 * 1_000_000_000 + t.tv_usec as u128 * 1_000;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn tick_ns() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    1e9 / if hz > 0 { hz as f64 } else { 100.0 }
}

/// Received packets on the pod's `eth0`, read from inside the pod namespace.
fn pod_rx_packets(lab: &lb_testkit::lab::Lab) -> anyhow::Result<u64> {
    lab.pods[0].ns.enter(|| -> anyhow::Result<u64> {
        let text = std::fs::read_to_string("/proc/thread-self/net/dev")?;
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with("eth0:"))
            .ok_or_else(|| anyhow::anyhow!("no eth0 in the pod's /proc/net/dev"))?;
        let fields: Vec<&str> = line
            .split_once(':')
            .map(|(_, r)| r.split_whitespace().collect())
            .unwrap_or_default();
        fields
            .get(1)
            .and_then(|x| x.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("bad /proc/net/dev line {line:?}"))
    })
}

fn flood_count(reply: &str) -> anyhow::Result<u64> {
    reply
        .split_whitespace()
        .find_map(|w| w.strip_prefix("flood="))
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("unexpected server stats reply {reply:?}"))
}

pub fn run(quick: bool, p: &Progress) -> anyhow::Result<PartResult> {
    let plan = Plan::new(quick);
    let loadgen = labkit::loadgen_bin()?;
    let mut out = PartResult {
        part: "throughput".into(),
        quick,
        ..Default::default()
    };
    out.facts.insert(
        "cpu_accounting".into(),
        "machine-wide /proc/stat deltas (tick-sampled softirq; no per-netns CPU accounting \
         exists); sender CPU from getrusage(RUSAGE_CHILDREN), receiver from /proc/PID/stat"
            .into(),
    );
    out.facts.insert(
        "method".into(),
        format!(
            "one netns lab per (N, path), all alive together, {} interleaved round(s), one N's \
             paths back to back, the order rotated each round; {FLOWS} flows of {PAYLOAD}-byte UDP datagrams for {}s per \
             run after a 10k-packet warm-up",
            plan.runs, plan.seconds
        ),
    );
    // All (N, path) labs alive together; rounds interleave them (see e2e.rs).
    let mut labs: Vec<(usize, FloodLab)> = Vec::new();
    for &n in &plan.sizes {
        for kind in PATHS {
            p.say(&format!(
                "throughput: N={n}: setting up path {}",
                kind.label()
            ));
            match FloodLab::new(n, kind, &loadgen, p) {
                Ok(l) => labs.push((n, l)),
                Err(e) => {
                    p.say(&format!("  FAILED: {e:#}"));
                    out.rows.push(
                        Row::new("throughput", "UDP flood", &kind.label(), n as u64)
                            .failed(format!("setup: {e:#}")),
                    );
                }
            }
        }
    }
    let order = crate::e2e::interleaving(&labs.iter().map(|(n, _)| *n).collect::<Vec<_>>());
    for round in 0..plan.runs {
        for group in crate::e2e::rotate(&order, round) {
            for idx in crate::e2e::rotate(group, round) {
                let (n, l) = &mut labs[*idx];
                if l.error.is_some() {
                    continue;
                }
                match l.run(&plan, &loadgen) {
                    Ok(m) => {
                        p.say(&format!(
                            "throughput: round {}/{} N={n} {}: {:.0} pkt/s at the pod \
                             ({:.0} sent/s, {:.1}% lost), softirq {:.0} ns/pkt, machine busy \
                             {:.0} ns/pkt",
                            round + 1,
                            plan.runs,
                            l.kind.label(),
                            m[0],
                            m[2],
                            m[3],
                            m[4],
                            m[5]
                        ));
                        l.samples.push(m);
                    }
                    Err(e) => {
                        p.say(&format!("  N={n} {} FAILED: {e:#}", l.kind.label()));
                        l.error = Some(format!("{e:#}"));
                    }
                }
            }
        }
    }
    for (n, l) in &labs {
        out.rows.push(l.row(*n, &plan));
    }
    drop(labs);
    Ok(out)
}

/// One path's lab for the flood.
struct FloodLab {
    kind: PathKind,
    lab: lb_testkit::lab::Lab,
    active: labkit::Active,
    udp: std::net::SocketAddrV4,
    server_pid: u32,
    /// One measurement per run: see [`FloodLab::row`] for the columns.
    samples: Vec<[f64; 7]>,
    error: Option<String>,
}

impl FloodLab {
    fn new(
        n: usize,
        kind: PathKind,
        loadgen: &std::path::Path,
        p: &Progress,
    ) -> anyhow::Result<FloodLab> {
        let mut lab = labkit::new_lab(1, loadgen)?;
        let set = labkit::service_set(&lab, n, kind)?;
        let active = labkit::activate(&lab, kind, &set, None, p)?;
        let (_, udp) = labkit::targets(&lab, kind, &set)?;
        let server_pid = lab
            .proc_mut("loadgen-server:0")
            .map(|s| s.pid())
            .ok_or_else(|| anyhow::anyhow!("no server in pod 0"))?;
        // Warm-up: a short flood creates the flows (conntrack entries) before measuring.
        labkit::run_loadgen::<FloodResult>(
            &lab.client,
            loadgen,
            &flood_args(udp, 10_000, 1.0),
            1.0,
        )?;
        Ok(FloodLab {
            kind,
            lab,
            active,
            udp,
            server_pid,
            samples: Vec::new(),
            error: None,
        })
    }

    fn run(&self, plan: &Plan, loadgen: &std::path::Path) -> anyhow::Result<[f64; 7]> {
        let lab = &self.lab;
        labkit::pod_control(lab, 0, b"Z")?;
        let (cpu0, rx0, srv0, kids0) = (
            cpu_times()?,
            pod_rx_packets(lab)?,
            proc_cpu(self.server_pid)?,
            children_cpu_ns(),
        );
        let args = flood_args(self.udp, plan.max_packets, plan.seconds);
        let fr: FloodResult = labkit::run_loadgen(&lab.client, loadgen, &args, plan.seconds)?;
        std::thread::sleep(Duration::from_millis(300)); // let the last packets drain
        let (cpu1, rx1, srv1, kids1) = (
            cpu_times()?,
            pod_rx_packets(lab)?,
            proc_cpu(self.server_pid)?,
            children_cpu_ns(),
        );
        let got = flood_count(&labkit::pod_control(lab, 0, b"Q")?)?;
        anyhow::ensure!(got > 0, "the pod received none of {} datagrams", fr.sent);
        let secs = fr.elapsed_s.max(1e-9);
        let tick = tick_ns();
        let per_pkt = |ns: f64| ns / got as f64;
        Ok([
            got as f64 / secs,
            rx1.saturating_sub(rx0) as f64 / secs,
            fr.sent as f64 / secs,
            100.0 * fr.sent.saturating_sub(got) as f64 / fr.sent.max(1) as f64,
            per_pkt(cpu1.softirq.saturating_sub(cpu0.softirq) as f64 * tick),
            per_pkt(cpu1.busy.saturating_sub(cpu0.busy) as f64 * tick),
            per_pkt(kids1.saturating_sub(kids0) as f64 + srv1.saturating_sub(srv0) as f64 * tick),
        ])
    }

    fn row(&self, n: usize, plan: &Plan) -> Row {
        let row = Row::new("throughput", "UDP flood", &self.kind.label(), n as u64)
            .param("flows", FLOWS)
            .param("payload_bytes", PAYLOAD)
            .param("seconds", plan.seconds)
            .param("runs", plan.runs)
            .param("rules", &self.active.size);
        if let Some(e) = &self.error {
            return row.failed(e);
        }
        let col = |i: usize| Stat::of(&self.samples.iter().map(|r| r[i]).collect::<Vec<_>>());
        row.metric("rx_pps", "pkt/s", col(0))
            .metric("pod_if_rx_pps", "pkt/s", col(1))
            .metric("tx_pps", "pkt/s", col(2))
            .metric("loss_pct", "%", col(3))
            .metric("softirq_ns_per_pkt", "ns", col(4))
            .metric("busy_ns_per_pkt", "ns", col(5))
            .metric("endpoints_cpu_ns_per_pkt", "ns", col(6))
            .note(
                "rx_pps counted by the pod's server; CPU per delivered packet, machine-wide \
                 (see the part's cpu_accounting fact)",
            )
    }
}

fn flood_args(target: std::net::SocketAddrV4, count: u64, seconds: f64) -> Vec<String> {
    [
        "flood".to_owned(),
        "--target".into(),
        target.to_string(),
        "--count".into(),
        count.to_string(),
        "--max-seconds".into(),
        seconds.to_string(),
        "--flows".into(),
        FLOWS.to_string(),
        "--size".into(),
        PAYLOAD.to_string(),
    ]
    .to_vec()
}
