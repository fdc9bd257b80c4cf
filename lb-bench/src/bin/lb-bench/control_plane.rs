//! Part 4: the control plane. How long programming N Services x 10 endpoints into the maps
//! takes, three ways:
//!
//! * one `bpf(BPF_MAP_UPDATE_ELEM)` per entry through the agent's `Dataplane` trait, in the
//!   agent's order (backends, slots, masters);
//! * `BPF_MAP_UPDATE_BATCH` (raw `bpf(2)`, 8192 entries per call), same order;
//! * the agent's own pipeline: YAML manifests (`source::manifests::load_str`) -> the pure
//!   model (`model::compute`) -> `sync::Syncer::apply` into the maps, each stage timed;
//!
//! then the cost of one endpoint change through the model and the sync at that N, the
//! memory of the process that did the programming (it is not the agent's run loop: it holds
//! the same objects, model and shadow the agent would, plus the benchmark's own), the kernel
//! memory of the maps, and, in the lab, the time from rewriting a Service's backend in the
//! maps to the first new connection served by the new pod.
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lb_agent::dataplane::Dataplane;
use lb_agent::loader::{Capacities, Datapath};
use lb_agent::model::{self, ModelConfig, Objects};
use lb_agent::source::manifests;
use lb_agent::sync::{Limits, Syncer};
use lb_bench::schema::{PartResult, Row, Stat};
use lb_common::{maps, Backend4, Frontend4Key, Service4Value, IPPROTO_TCP};
use lb_testkit::bpffs::PinDir;
use lb_testkit::lab::NODE_IP;

use crate::labkit;
use crate::services::{self, Position, ServiceSet, ENDPOINTS_PER_SERVICE};
use crate::{bpf_batch, Progress};

const BATCH: usize = 8192;
const NODE_NAME: &str = "bench-node";

struct Plan {
    /// (N, runs) for the programming measurements.
    sizes: Vec<(usize, usize)>,
    /// N of the lab measurement, and how many backend switches.
    lab_n: usize,
    switches: usize,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                sizes: vec![(1_000, 3), (10_000, 3), (100_000, 1)],
                lab_n: 1_000,
                switches: 10,
            }
        } else {
            Plan {
                sizes: vec![(1_000, 5), (10_000, 5), (100_000, 3)],
                lab_n: 10_000,
                switches: 20,
            }
        }
    }
}

pub fn run(quick: bool, p: &Progress) -> anyhow::Result<PartResult> {
    let plan = Plan::new(quick);
    let mut out = PartResult {
        part: "control-plane".into(),
        quick,
        ..Default::default()
    };
    for &(n, runs) in &plan.sizes {
        let set = ServiceSet::synthetic(n, Position::End, false, &filler_target())?;
        let entries = services::entries(&set);
        let caps = Capacities {
            services: (entries.slots.len() + entries.masters.len()) as u32 + 1024,
            backends: entries.backends.len() as u32 + 1024,
            svc_stats: set.ports.len() as u32 + 16,
            ..Capacities::default()
        };
        let base = |method: &str| {
            Row::new("control-plane", method, "ours", n as u64)
                .param("entries", entries.len())
                .param("runs", runs)
        };

        p.say(&format!(
            "control-plane: N={n}: one syscall per entry ({} entries) x {runs}",
            entries.len()
        ));
        let r = timed_runs(runs, &caps, |dp| {
            let mut maps = dp.dataplane()?;
            let t = Instant::now();
            services::program(&mut maps, &entries)?;
            Ok(t.elapsed().as_secs_f64())
        });
        out.rows
            .push(program_row(base(METHOD_SINGLE), r, entries.len()));

        p.say(&format!(
            "control-plane: N={n}: BPF_MAP_UPDATE_BATCH x {runs}"
        ));
        let r = timed_runs(runs, &caps, |dp| {
            let t = Instant::now();
            bpf_batch::program(dp.pins(), &entries, BATCH)?;
            Ok(t.elapsed().as_secs_f64())
        });
        out.rows.push(program_row(
            base(METHOD_BATCH).param("batch", BATCH),
            r,
            entries.len(),
        ));

        p.say(&format!(
            "control-plane: N={n}: manifests -> model -> sync x {runs}"
        ));
        match model_runs(n, runs, &caps, p) {
            Ok((rows, mem)) => {
                out.rows.extend(rows);
                if n == plan.sizes.iter().map(|s| s.0).max().unwrap_or(n) {
                    out.rows.push(mem);
                }
            }
            Err(e) => out.rows.push(base(METHOD_MODEL).failed(format!("{e:#}"))),
        }
    }

    // The agent itself, through the real binary: kube source and manifests.
    out.rows.extend(crate::agent::run(quick, p));

    p.say(&format!(
        "control-plane: endpoint change -> datapath, in the lab at N={}",
        plan.lab_n
    ));
    match endpoint_switch(plan.lab_n, plan.switches, p) {
        Ok(row) => out.rows.push(row),
        Err(e) => out.rows.push(
            Row::new("control-plane", CASE_SWITCH, "ours", plan.lab_n as u64)
                .failed(format!("{e:#}")),
        ),
    }
    Ok(out)
}

pub const METHOD_SINGLE: &str = "one syscall per entry";
pub const METHOD_BATCH: &str = "BPF_MAP_UPDATE_BATCH";
pub const METHOD_MODEL: &str = "manifests -> model -> sync";
pub const CASE_CHANGE: &str = "one endpoint change (model + sync)";
pub const CASE_MEMORY: &str = "memory";
pub const CASE_SWITCH: &str = "backend change -> first new connection on the new pod";

/// Ten filler endpoints for the "target" Service of a control-plane set (no lab here).
fn filler_target() -> Vec<SocketAddrV4> {
    (0..ENDPOINTS_PER_SERVICE as u8)
        .map(|i| SocketAddrV4::new(Ipv4Addr::new(10, 143, 255, i + 1), 8080))
        .collect()
}

/// `runs` runs of `f` on a freshly loaded datapath each; returns the seconds each took.
fn timed_runs(
    runs: usize,
    caps: &Capacities,
    mut f: impl FnMut(&mut Datapath) -> anyhow::Result<f64>,
) -> anyhow::Result<Vec<f64>> {
    (0..runs)
        .map(|_| {
            let pins = PinDir::new("bench-cp");
            let mut dp = Datapath::load(pins.path(), caps)?;
            let took = f(&mut dp);
            drop(dp);
            drop(pins);
            took
        })
        .collect()
}

fn program_row(row: Row, r: anyhow::Result<Vec<f64>>, entries: usize) -> Row {
    match r {
        Ok(secs) => {
            let per = secs
                .iter()
                .map(|s| s * 1e9 / entries as f64)
                .collect::<Vec<_>>();
            row.metric(
                "total_ms",
                "ms",
                Stat::of(&secs.iter().map(|s| s * 1e3).collect::<Vec<_>>()),
            )
            .metric("ns_per_entry", "ns", Stat::of(&per))
            .note("fresh maps each run; the load of the programs is not timed")
        }
        Err(e) => row.failed(format!("{e:#}")),
    }
}

/// `kubectl get -o yaml`-style manifests: a Node, N ClusterIP Services (port 80 -> 8080)
/// and their EndpointSlices, 10 ready endpoints each.
fn manifests_yaml(n: usize, change: Option<usize>) -> String {
    let mut y = String::with_capacity(n * 1200);
    y.push_str(&format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: {NODE_NAME}\nstatus:\n  addresses:\n  - type: InternalIP\n    address: {NODE_IP}\n"
    ));
    for i in 0..n {
        y.push_str(&service_yaml(i));
        y.push_str(&slice_yaml(i, change == Some(i)));
    }
    y
}

fn cluster_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(0x0a60_000a + i as u32)
}

fn endpoint_ip(i: usize, k: usize, changed: bool) -> Ipv4Addr {
    if changed && k == 0 {
        return Ipv4Addr::new(10, 143, 255, 254);
    }
    Ipv4Addr::from(0x0a80_0000 + (i * ENDPOINTS_PER_SERVICE + k) as u32 + 1)
}

fn service_yaml(i: usize) -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: svc-{i}\n  namespace: bench\nspec:\n  type: ClusterIP\n  clusterIP: {}\n  ports:\n  - name: p80\n    port: 80\n    protocol: TCP\n    targetPort: 8080\n",
        cluster_ip(i)
    )
}

fn slice_yaml(i: usize, changed: bool) -> String {
    let mut y = format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: svc-{i}-abcde\n  namespace: bench\n  labels:\n    kubernetes.io/service-name: svc-{i}\naddressType: IPv4\nports:\n- name: p80\n  port: 8080\n  protocol: TCP\nendpoints:\n"
    );
    for k in 0..ENDPOINTS_PER_SERVICE {
        y.push_str(&format!(
            "- addresses: [\"{}\"]\n  conditions: {{ready: true}}\n  nodeName: {NODE_NAME}\n",
            endpoint_ip(i, k, changed)
        ));
    }
    y
}

/// The agent's pipeline at N, `runs` times on fresh maps, then one endpoint change.
/// Returns the rows and a memory row (taken after the last run, objects still held).
fn model_runs(
    n: usize,
    runs: usize,
    caps: &Capacities,
    p: &Progress,
) -> anyhow::Result<(Vec<Row>, Row)> {
    let t = Instant::now();
    let text = manifests_yaml(n, None);
    let gen_s = t.elapsed().as_secs_f64();
    let cfg = ModelConfig::new(NODE_NAME);
    let limits = Limits {
        svc_ids: caps.svc_stats,
        backend_ids: caps.backends,
    };
    let (mut parse, mut compute, mut apply, mut puts) = (Vec::new(), Vec::new(), Vec::new(), 0);
    let mut kept = None;
    for _ in 0..runs {
        let pins = PinDir::new("bench-model");
        let mut dp = Datapath::load(pins.path(), caps)?;
        let mut maps = dp.dataplane()?;
        let t = Instant::now();
        let mut objects = Objects::default();
        let mut problems = Vec::new();
        manifests::load_str("bench.yaml", &text, &mut objects, &mut problems);
        parse.push(t.elapsed().as_secs_f64());
        anyhow::ensure!(
            problems.is_empty(),
            "manifest problems: {:?}",
            problems.first()
        );
        let t = Instant::now();
        let desired = model::compute(&objects, &cfg);
        compute.push(t.elapsed().as_secs_f64());
        anyhow::ensure!(
            desired.frontends.len() == n,
            "the model made {} frontends of {n} Services ({} problems)",
            desired.frontends.len(),
            desired.problems.len()
        );
        let mut syncer = Syncer::new(limits);
        let t = Instant::now();
        let report = syncer.apply(&desired, &mut maps);
        apply.push(t.elapsed().as_secs_f64());
        anyhow::ensure!(
            report.is_ok(),
            "sync failed: {}",
            report
                .failures
                .iter()
                .map(ToString::to_string)
                .take(3)
                .collect::<Vec<_>>()
                .join("; ")
        );
        puts = report.puts;
        kept = Some((pins, dp, maps, objects, desired, syncer));
    }
    let (pins, dp, mut maps, mut objects, _desired, mut syncer) =
        kept.ok_or_else(|| anyhow::anyhow!("no run"))?;
    p.say(&format!(
        "  N={n}: parse {:.2}s, model {:.2}s, sync {:.2}s ({puts} map writes)",
        median(&parse),
        median(&compute),
        median(&apply)
    ));

    // One endpoint of Service N/2 moves to another address: re-parse nothing, swap the slice
    // object (what a watch event does), recompute and re-sync.
    let changed_svc = n / 2;
    let mut fresh = Objects::default();
    let mut problems = Vec::new();
    manifests::load_str(
        "change.yaml",
        &slice_yaml(changed_svc, true),
        &mut fresh,
        &mut problems,
    );
    anyhow::ensure!(
        fresh.slices.len() == 1,
        "changed slice did not parse: {problems:?}"
    );
    let want = format!("svc-{changed_svc}-abcde");
    let slot = objects
        .slices
        .iter()
        .position(|s| s.metadata.name.as_deref() == Some(want.as_str()))
        .ok_or_else(|| anyhow::anyhow!("slice of svc-{changed_svc} not found"))?;
    objects.slices[slot] = fresh.slices.remove(0);
    let t = Instant::now();
    let desired = model::compute(&objects, &cfg);
    let compute_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let report = syncer.apply(&desired, &mut maps);
    let apply_s = t.elapsed().as_secs_f64();
    anyhow::ensure!(report.is_ok(), "sync of the change failed");

    let entries = services::entries(&ServiceSet::synthetic(
        n,
        Position::End,
        false,
        &filler_target(),
    )?)
    .len();
    let secs: Vec<f64> = parse
        .iter()
        .zip(&compute)
        .zip(&apply)
        .map(|((a, b), c)| a + b + c)
        .collect();
    let rows = vec![
        Row::new("control-plane", METHOD_MODEL, "ours", n as u64)
            .metric("total_ms", "ms", Stat::of(&secs.iter().map(|s| s * 1e3).collect::<Vec<_>>()))
            .metric("ns_per_entry", "ns", Stat::of(&secs.iter().map(|s| s * 1e9 / puts.max(1) as f64).collect::<Vec<_>>()))
            .metric("parse_ms", "ms", Stat::of(&parse.iter().map(|s| s * 1e3).collect::<Vec<_>>()))
            .metric("model_ms", "ms", Stat::of(&compute.iter().map(|s| s * 1e3).collect::<Vec<_>>()))
            .metric("sync_ms", "ms", Stat::of(&apply.iter().map(|s| s * 1e3).collect::<Vec<_>>()))
            .param("entries", puts)
            .param("runs", runs)
            .param("yaml_bytes", text.len())
            .param("yaml_generation_s", format!("{gen_s:.2}"))
            .param("raw_method_entries", entries)
            .note(
                "YAML generation not timed; map writes by the syncer: backends + slots + masters \
                 + the node address (the raw methods also write the target Service's UDP port)",
            ),
        Row::new("control-plane", CASE_CHANGE, "ours", n as u64)
            .metric("total_ms", "ms", Stat::single((compute_s + apply_s) * 1e3))
            .metric("model_ms", "ms", Stat::single(compute_s * 1e3))
            .metric("sync_ms", "ms", Stat::single(apply_s * 1e3))
            .param("map_writes", report.puts)
            .param("map_deletes", report.deletes)
            .note("one EndpointSlice replaced, full model recompute, diffing sync; watch latency not included"),
    ];
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    let memlock = |name: &str| {
        bpf_batch::open(dp.pins(), name)
            .ok()
            .and_then(|m| bpf_batch::memlock_bytes(&m))
            .map_or(f64::NAN, |b| b as f64 / (1024.0 * 1024.0))
    };
    let mem = Row::new("control-plane", CASE_MEMORY, "ours", n as u64)
        .metric("rss_mib", "MiB", Stat::single(kb("VmRSS:") / 1024.0))
        .metric("peak_rss_mib", "MiB", Stat::single(kb("VmHWM:") / 1024.0))
        .metric(
            "services_map_mib",
            "MiB",
            Stat::single(memlock(maps::LB4_SERVICES)),
        )
        .metric(
            "backends_map_mib",
            "MiB",
            Stat::single(memlock(maps::LB4_BACKENDS)),
        )
        .metric("ct_map_mib", "MiB", Stat::single(memlock(maps::LB4_CT)))
        .note(
            "RSS of the benchmark process that parsed, modelled and synced N Services (it holds \
             the objects, the model and the sync shadow, as the agent would, plus the YAML text \
             and the benchmark's own tables); not the agent's run loop. Map sizes: kernel \
             memlock of each map",
        );
    drop(maps);
    drop(dp);
    drop(pins);
    Ok((rows, mem))
}

fn median(v: &[f64]) -> f64 {
    Stat::of(v).median
}

/// One client connection: when it started, when it ended, which pod answered.
#[derive(Clone, Copy)]
struct Conn {
    start: Instant,
    end: Instant,
    pod: Option<u8>,
    /// The client's source port (0 if the connection failed).
    port: u16,
}

/// In the lab with our datapath and `n` Services, a client opens connection after connection
/// to the target NodePort (one endpoint) while the target's backend is switched between pod 0
/// and pod 1 `switches` times, agent-style (new backend entry, then the slot). For each
/// switch: the time from the slot write to the end of the first connection served by the
/// new pod, and connections started after the write that still reached the old pod.
fn endpoint_switch(n: usize, switches: usize, p: &Progress) -> anyhow::Result<Row> {
    let loadgen = labkit::loadgen_bin()?;
    let lab = labkit::new_lab(2, &loadgen)?;
    let pod0 = SocketAddrV4::new(lab.pods[0].ip, labkit::SERVER_PORT);
    let pod1 = SocketAddrV4::new(lab.pods[1].ip, labkit::SERVER_PORT);
    let set = ServiceSet::synthetic(n, Position::End, true, &[pod0])?;
    let np = set
        .target_tcp()
        .node_port
        .ok_or_else(|| anyhow::anyhow!("no NodePort"))?;
    let (mut ours, _, entries) =
        labkit::attach_ours(&lab, &set, None, lb_agent::loader::Attach::Xdp)?;
    labkit::check_only(&lab, labkit::PathKind::Ours)?;
    let key = Frontend4Key::new(0, np.to_be(), IPPROTO_TCP, 0);
    let mut next_id = ours
        .maps
        .backends()?
        .iter()
        .map(|(id, _)| *id)
        .max()
        .unwrap_or(0)
        + 1;
    let target = SocketAddrV4::new(NODE_IP, np);
    let conns: Mutex<Vec<Conn>> = Mutex::new(Vec::new());
    let done = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let client_ns = lab.client.path();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut events: Vec<(Instant, Instant, u8)> = Vec::new();
    let result = std::thread::scope(|s| -> anyhow::Result<()> {
        let client = s.spawn(|| -> anyhow::Result<()> {
            lb_testkit::lab::netns::setns_net(&client_ns)?;
            let timeout = Duration::from_secs(1);
            while !stop.load(Ordering::Relaxed)
                && Instant::now() < deadline
                && done.load(Ordering::Relaxed) < 500_000
            {
                let start = Instant::now();
                let r = (|| -> std::io::Result<(u8, u16)> {
                    let mut c = TcpStream::connect_timeout(&SocketAddr::V4(target), timeout)?;
                    let port = c.local_addr()?.port();
                    c.set_nodelay(true)?;
                    c.set_read_timeout(Some(timeout))?;
                    c.write_all(b"x")?;
                    let mut b = [0u8; 1];
                    c.read_exact(&mut b)?;
                    Ok((b[0], port))
                })();
                let end = Instant::now();
                let (pod, port) = match r {
                    Ok((pod, port)) => (Some(pod), port),
                    Err(_) => (None, 0),
                };
                if let Ok(mut v) = conns.lock() {
                    v.push(Conn {
                        start,
                        end,
                        pod,
                        port,
                    });
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        });
        let wait_for = |k: usize| {
            let goal = done.load(Ordering::Relaxed) + k;
            while done.load(Ordering::Relaxed) < goal && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        wait_for(200);
        for s_i in 0..switches {
            let to: u8 = if s_i % 2 == 0 { 1 } else { 0 };
            let addr = if to == 1 { pod1 } else { pod0 };
            let id = next_id;
            next_id += 1;
            ours.maps.put_backend(
                id,
                Backend4 {
                    addr: u32::from(*addr.ip()).to_be(),
                    port: addr.port().to_be(),
                    proto: IPPROTO_TCP,
                    flags: 0,
                    node_addr: 0,
                },
            )?;
            let t0 = Instant::now();
            ours.maps.put_service(
                key.with_slot(1),
                Service4Value {
                    backend_id: id,
                    ..Default::default()
                },
            )?;
            let t1 = Instant::now();
            events.push((t0, t1, to));
            wait_for(200);
        }
        stop.store(true, Ordering::Relaxed);
        client
            .join()
            .map_err(|e| anyhow::anyhow!("client thread: {}", labkit::panic_text(&e)))?
    });
    result?;
    let conns = conns
        .into_inner()
        .map_err(|_| anyhow::anyhow!("poisoned"))?;
    let failed = conns.iter().filter(|c| c.pod.is_none()).count();
    let (mut lat_us, mut stale, mut write_us) = (Vec::new(), 0usize, Vec::new());
    for (i, (t0, t1, to)) in events.iter().enumerate() {
        let until = events.get(i + 1).map(|e| e.0);
        let window = conns
            .iter()
            .filter(|c| c.start >= *t0 && until.is_none_or(|u| c.start < u));
        let first = window
            .clone()
            .filter(|c| c.pod == Some(*to))
            .map(|c| c.end)
            .min();
        let Some(first) = first else {
            anyhow::bail!("switch {i}: no connection reached pod {to}");
        };
        lat_us.push(first.duration_since(*t0).as_secs_f64() * 1e6);
        write_us.push(t1.duration_since(*t0).as_secs_f64() * 1e6);
        // Stale: started after this write returned and finished before the next write began
        // (a connection straddling the next write may rightly land on the next target).
        let stale_here: Vec<&Conn> = window
            .filter(|c| c.start > *t1 && until.is_none_or(|u| c.end < u))
            .filter(|c| c.pod.is_some() && c.pod != Some(*to))
            .collect();
        for c in stale_here.iter().take(3) {
            let prev = conns
                .iter()
                .filter(|o| o.port == c.port && o.start < c.start)
                .max_by_key(|o| o.start)
                .map_or("no earlier connection from that port".to_owned(), |o| {
                    format!(
                        "the port's previous connection ended {:.0} µs earlier on pod {:?}",
                        c.start.duration_since(o.end).as_secs_f64() * 1e6,
                        o.pod
                    )
                });
            p.say(&format!(
                "  switch {i}: connection from port {} started {:.0} µs after the write returned \
                 and reached the old pod; {prev}",
                c.port,
                c.start.duration_since(*t1).as_secs_f64() * 1e6
            ));
        }
        stale += stale_here.len();
    }
    let mut periods: Vec<f64> = conns
        .iter()
        .map(|c| c.end.duration_since(c.start).as_secs_f64() * 1e6)
        .collect();
    periods.sort_by(f64::total_cmp);
    p.say(&format!(
        "  {switches} switches: median {:.0} µs to the first connection on the new pod, {stale} \
         stale connections, {} connections ({failed} failed)",
        median(&lat_us),
        conns.len()
    ));
    Ok(Row::new("control-plane", CASE_SWITCH, "ours", n as u64)
        .metric("latency_us", "µs", Stat::of(&lat_us))
        .metric("map_write_us", "µs", Stat::of(&write_us))
        .metric("connection_us", "µs", Stat::of(&periods))
        .param("switches", switches)
        .param("stale_connections", stale)
        .param("failed_connections", failed)
        .param("map_entries", entries)
        .note(
            "latency_us: from the slot write to the end of the first new connection served by \
             the new pod (bounded below by one connection's duration, connection_us); \
             stale_connections: connections started after the write returned (and done before \
             the next switch) that still reached the old pod (must be 0)",
        ))
}
