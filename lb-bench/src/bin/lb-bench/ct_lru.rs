//! The conntrack map flavour under new-connection load: the shared LRU the datapath uses for
//! `LB4_CT` (one LRU list for all CPUs, with per-CPU free lists) against one LRU list per CPU
//! (`BPF_F_NO_COMMON_LRU`).
//!
//! A new TCP flow's SYN stores one slot of the half-open table (`LB4_CT_SYN`, an array: no
//! LRU); the client's ACK then inserts the flow's two entries into `LB4_CT`, the LRU map
//! measured here. So each connection is a handshake, a SYN and then its ACK, from a fresh
//! tuple to a self-looping NodePort frontend, each packet run once per `BPF_PROG_RUN` call
//! (a miss cannot be repeated on one buffer); a row is the mean of the kernel's per-call
//! times, summed over the two packets. Three phases per flavour, each on a fresh datapath:
//! * **filling**: `LB4_CT` goes from empty to half full (inserts only);
//! * **full**: `LB4_CT` already holds its capacity, so every ACK's inserts evict;
//! * **full, 2 CPUs**: the same with one thread pinned to each CPU at once, where a shared
//!   list is contended; also reported as handshakes per second of wall time, both threads
//!   together.
//!
//! Every phase is checked against the verdict counters: `xdp_fwd_new_flow` must have counted
//! every SYN, `xdp_fwd_tracked` every ACK, and no other reason any.
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Instant;

use aya::maps::MapData;
use aya::programs::{TestRun, TestRunOptions, Xdp};
use lb_agent::loader::Capacities;
use lb_bench::schema::{Row, Stat};
use lb_common::{Reason, IPPROTO_TCP};
use lb_testkit::harness::{stat_deltas, FrontendSpec, Harness, XDP_PASS};
use lb_testkit::lab::NODE_IP;
use lb_testkit::packet::{Pkt, TCP_ACK, TCP_SYN};

use crate::Progress;

/// The measured NodePort (its backend is the node itself: the frame is left as it was).
const NODE_PORT: u16 = 30090;
/// Case names (rows of the report's conntrack-flavour table).
pub const CASE_FILLING: &str = "handshake (SYN + ACK), conntrack filling";
pub const CASE_FULL: &str = "handshake, conntrack full (every insert evicts)";
pub const CASE_FULL_2CPU: &str = "handshake, conntrack full, 2 CPUs at once";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Flavour {
    Shared,
    PerCpu,
}

impl Flavour {
    fn path(self) -> &'static str {
        match self {
            Flavour::Shared => "shared LRU (datapath default)",
            Flavour::PerCpu => "per-CPU LRU (BPF_F_NO_COMMON_LRU)",
        }
    }
}

struct Plan {
    /// `LB4_CT` capacity (entries; a flow holds two).
    ct: u32,
    /// Handshakes per phase and thread.
    frames: usize,
    /// Rounds (a fresh datapath per flavour and round; flavours alternate).
    rounds: usize,
}

/// Fresh client tuples: 10.(64 + stream).x.y, ports 10000..60000.
struct Tuples {
    stream: u32,
    next: u32,
}

impl Tuples {
    fn new(stream: u32) -> Self {
        Self { stream, next: 0 }
    }
    /// A fresh client's SYN and ACK.
    fn handshake(&mut self) -> [Vec<u8>; 2] {
        let i = self.next;
        self.next += 1;
        let ip = Ipv4Addr::from(0x0a40_0000 + (self.stream << 16) + i / 50_000);
        let client = SocketAddrV4::new(ip, 10_000 + (i % 50_000) as u16);
        let fe = SocketAddrV4::new(NODE_IP, NODE_PORT);
        [TCP_SYN, TCP_ACK].map(|flags| Pkt::tcp(client, fe, flags).build())
    }
}

pub fn rows(quick: bool, p: &Progress) -> Vec<Row> {
    let plan = if quick {
        Plan {
            ct: 1 << 16,
            frames: 4_000,
            rounds: 1,
        }
    } else {
        Plan {
            ct: 1 << 18,
            frames: 20_000,
            rounds: 5,
        }
    };
    let mut samples: Vec<((Flavour, &str), Vec<f64>)> = Vec::new();
    let mut rates: Vec<(Flavour, Vec<f64>)> = Vec::new();
    let mut held: Vec<(Flavour, Vec<f64>)> = Vec::new();
    let mut errors: Vec<(Flavour, String)> = Vec::new();
    for round in 0..plan.rounds {
        let order = if round % 2 == 0 {
            [Flavour::Shared, Flavour::PerCpu]
        } else {
            [Flavour::PerCpu, Flavour::Shared]
        };
        for f in order {
            p.say(&format!(
                "per-packet: conntrack flavour, round {}/{}: {}",
                round + 1,
                plan.rounds,
                f.path()
            ));
            match round_of(f, &plan) {
                Ok(r) => {
                    for (case, ns) in [
                        (CASE_FILLING, r.filling),
                        (CASE_FULL, r.full),
                        (CASE_FULL_2CPU, r.full_2cpu),
                    ] {
                        push(&mut samples, (f, case), ns);
                    }
                    push(&mut rates, f, r.per_s);
                    push(&mut held, f, r.held_share);
                }
                Err(e) => errors.push((f, format!("{e:#}"))),
            }
        }
    }
    let mut out = Vec::new();
    for f in [Flavour::Shared, Flavour::PerCpu] {
        for case in [CASE_FILLING, CASE_FULL, CASE_FULL_2CPU] {
            let mut row = Row::new("per-packet", case, f.path(), 1)
                .param("section", lb_bench::schema::CT_LRU_SECTION)
                .param("ct_capacity", plan.ct)
                .param("handshakes_per_phase_and_thread", plan.frames)
                .param("rounds", plan.rounds);
            if let Some(e) = errors.iter().find(|(ef, _)| *ef == f) {
                out.push(row.failed(&e.1));
                continue;
            }
            row = row.metric(
                "ns_per_handshake",
                "ns",
                Stat::of(series(&samples, (f, case))),
            );
            if case == CASE_FULL {
                row = row.metric("held_share", "ratio", Stat::of(series(&held, f)));
            }
            if case == CASE_FULL_2CPU {
                row = row.metric("handshakes_per_s", "1/s", Stat::of(series(&rates, f)));
            }
            out.push(row);
        }
    }
    out
}

/// The samples kept under `k` (none: empty).
fn series<K: PartialEq>(v: &[(K, Vec<f64>)], k: K) -> &[f64] {
    v.iter()
        .find(|(kk, _)| *kk == k)
        .map_or(&[][..], |(_, xs)| xs.as_slice())
}

fn push<K: PartialEq>(v: &mut Vec<(K, Vec<f64>)>, k: K, x: f64) {
    match v.iter_mut().find(|(kk, _)| *kk == k) {
        Some((_, xs)) => xs.push(x),
        None => v.push((k, vec![x])),
    }
}

struct Round {
    filling: f64,
    full: f64,
    full_2cpu: f64,
    per_s: f64,
    /// Share of the `LB4_CT` capacity held after filling it from one CPU.
    held_share: f64,
}

fn round_of(f: Flavour, plan: &Plan) -> anyhow::Result<Round> {
    let caps = Capacities {
        ct: plan.ct,
        ..Capacities::default()
    };
    let mut h = match f {
        Flavour::Shared => Harness::new("bench-lru", &caps),
        Flavour::PerCpu => Harness::new_per_cpu_lru("bench-lru", &caps),
    };
    h.add_node_addr(NODE_IP);
    h.add_frontend(&FrontendSpec::nodeport(
        NODE_PORT,
        IPPROTO_TCP,
        1,
        &[SocketAddrV4::new(NODE_IP, NODE_PORT)],
    ));
    let ct = crate::bpf_batch::open(h.datapath.pins(), lb_common::maps::LB4_CT)?;
    let before = h.stats();
    let prog: &Xdp = h
        .datapath
        .xdp_program_named(lb_common::maps::PROG_XDP_INGRESS)?;
    let capacity = plan.ct as usize;
    let mut tuples = Tuples::new(0);

    // Filling: up to half of `LB4_CT` (two entries per flow).
    let n_fill = plan.frames.min(capacity / 4);
    let filling = on_cpu(prog, 0, n_fill, &mut tuples)?;
    // Fill past capacity, unmeasured, then measure inserts that evict.
    let rest = capacity / 2 + capacity / 8;
    on_cpu(prog, 0, rest, &mut tuples)?;
    let full = on_cpu(prog, 0, plan.frames, &mut tuples)?;
    let held = ct_len(&ct)?;
    // Two CPUs at once.
    let t0 = Instant::now();
    let (a, b) = std::thread::scope(|s| {
        let frames = plan.frames;
        let ta = s.spawn(move || handshakes(prog, 0, frames, &mut Tuples::new(1)));
        let tb = s.spawn(move || handshakes(prog, 1, frames, &mut Tuples::new(2)));
        (ta.join(), tb.join())
    });
    let wall = t0.elapsed().as_secs_f64();
    let a = a.map_err(|_| anyhow::anyhow!("handshake thread on CPU 0 panicked"))??;
    let b = b.map_err(|_| anyhow::anyhow!("handshake thread on CPU 1 panicked"))??;
    let total = (n_fill + rest + 3 * plan.frames) as u64;
    let d = stat_deltas(&before, &h.stats());
    // Every SYN is a new flow and every ACK a tracked one, except an ACK whose half-open
    // slot a SYN of the other thread took between its SYN and it (two CPUs at once): that
    // ACK starts its flow anew. Rare; more than 1% would be a fault.
    let count = |r: Reason| d.get(&r).map_or(0, |c| c.0);
    let (new_flows, tracked) = (count(Reason::XdpFwdNewFlow), count(Reason::XdpFwdTracked));
    let displaced = new_flows.saturating_sub(total);
    anyhow::ensure!(
        new_flows + tracked == 2 * total && new_flows >= total && displaced * 100 <= total,
        "{} counted {new_flows} and {} {tracked}, for {total} SYNs and {total} ACKs",
        Reason::XdpFwdNewFlow.name(),
        Reason::XdpFwdTracked.name()
    );
    let others: Vec<String> = d
        .iter()
        .filter(|(r, c)| !matches!(r, Reason::XdpFwdNewFlow | Reason::XdpFwdTracked) && c.0 > 0)
        .map(|(r, c)| format!("{r:?} {}", c.0))
        .collect();
    anyhow::ensure!(others.is_empty(), "other reasons counted: {others:?}");
    anyhow::ensure!(
        held > 0 && held <= capacity,
        "LB4_CT holds {held} entries, capacity {capacity}"
    );
    Ok(Round {
        filling,
        full,
        full_2cpu: (a + b) / 2.0,
        per_s: (2 * plan.frames) as f64 / wall,
        held_share: held as f64 / capacity as f64,
    })
}

/// Entries in `LB4_CT`.
fn ct_len(map: &MapData) -> anyhow::Result<usize> {
    use std::os::fd::AsFd as _;
    let entries = lb_agent::bpfsys::map_lookup_batch::<lb_common::Ct4Key, lb_common::Ct4Value>(
        map.fd().as_fd(),
        lb_agent::bpfsys::BATCH_CHUNK,
    )?;
    Ok(entries.len())
}

/// Run `n` fresh handshakes through `prog` on CPU `cpu` (in a thread of its own pinned
/// there); the mean of the kernel's per-call times in ns, summed over SYN and ACK.
fn on_cpu(prog: &Xdp, cpu: usize, n: usize, tuples: &mut Tuples) -> anyhow::Result<f64> {
    std::thread::scope(|s| {
        s.spawn(|| handshakes(prog, cpu, n, tuples))
            .join()
            .map_err(|_| anyhow::anyhow!("handshake thread on CPU {cpu} panicked"))?
    })
}

fn handshakes(xdp: &Xdp, cpu: usize, n: usize, tuples: &mut Tuples) -> anyhow::Result<f64> {
    pin_to_cpu(cpu)?;
    let mut total_ns = 0u128;
    let mut out = vec![0u8; 512];
    for _ in 0..n {
        for frame in tuples.handshake() {
            let opts = TestRunOptions {
                data_in: Some(&frame),
                data_out: Some(&mut out),
                repeat: 1,
                ..Default::default()
            };
            let res = xdp
                .test_run(opts)
                .map_err(|e| anyhow::anyhow!("BPF_PROG_RUN: {e}"))?;
            anyhow::ensure!(
                res.return_value == XDP_PASS,
                "verdict {}, want XDP_PASS",
                res.return_value
            );
            total_ns += res.duration.as_nanos();
        }
    }
    Ok(total_ns as f64 / n.max(1) as f64)
}

fn pin_to_cpu(cpu: usize) -> anyhow::Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes inside it.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    anyhow::ensure!(
        rc == 0,
        "pinning to CPU {cpu}: {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}
