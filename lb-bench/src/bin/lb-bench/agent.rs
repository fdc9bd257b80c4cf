//! Part 4, the agent itself: the release `lb-agent run` binary at N Services × 10 endpoints,
//! fed two ways, observed from outside through its pinned maps.
//!
//! * **kube source**: the fake API server of the agent's tests (real Kubernetes JSON,
//!   paginated consistent lists, watches) serves N ClusterIP Services with an EndpointSlice
//!   of 10 ready endpoints each; the agent (in a network namespace of its own, attached to
//!   its `lo`) lists and watches it through `--kubeconfig`. Measured:
//!   - list complete → maps fully programmed: from the moment the server sent the last page
//!     of the last list to the moment the last master entry of the first sync is in the map
//!     (and a sample of others are complete);
//!   - one EndpointSlice change → map written: a slice gains an endpoint; from the moment
//!     the server handed the watch event to the connection to the moment the frontend's
//!     master entry holds the new count; changes one after the other;
//!   - sustained changes: a change every 1/rate s (each to another Service) for the whole
//!     duration; the latency of each as above, and what is left unapplied at the end;
//!   - the agent process's peak RSS (VmHWM of /proc/PID/status).
//! * **manifests**: the same objects in YAML files (1000 Services per file); from the start
//!   of the agent to the maps fully programmed, then one file edited (a slice gains an
//!   endpoint, the file replaced by a rename) → the master entry holds the new count; the
//!   peak RSS.
//!
//! The agent binary is `lb-agent` next to this executable, or `$LB_BENCH_AGENT` (to measure
//! another build, e.g. an older one, the same way). Every wait is bounded.
use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use k8s_openapi::api::core::v1::{
    Node, NodeAddress, NodeStatus, Service, ServicePort, ServiceSpec,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use lb_agent::dataplane::BpfDataplane;
use lb_agent::loader::PinLayout;
use lb_bench::schema::{Row, Stat};
use lb_common::{Frontend4Key, IPPROTO_TCP};
use lb_testkit::bpffs::PinDir;
use lb_testkit::lab::netns::{Netns, Proc};

use crate::fake_apiserver::{FakeApiServer, Kind};
use crate::Progress;

const NODE: &str = "bench-node";
const NODE_IP: &str = "10.199.0.1";
const NS: &str = "bench";
const ENDPOINTS: usize = 10;
/// Addresses reserved per Service (it may gain endpoints up to this many).
const ADDRS_PER_SERVICE: usize = 16;

pub const CASE_LIST: &str = "agent: list complete -> maps programmed";
pub const CASE_CHANGE: &str = "agent: one EndpointSlice change -> map written";
pub const CASE_SUSTAINED: &str = "agent: sustained EndpointSlice changes";
pub const CASE_FILES: &str = "agent: manifests from files -> maps programmed";
pub const CASE_EDIT: &str = "agent: one manifest file edit -> map written";
pub const CASE_RSS: &str = "agent: peak RSS";

struct Plan {
    n: usize,
    changes: usize,
    rate: u32,
    sustain: Duration,
    edits: usize,
    per_file: usize,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                n: 5_000,
                changes: 50,
                rate: 1_000,
                sustain: Duration::from_secs(5),
                edits: 5,
                per_file: 500,
            }
        } else {
            Plan {
                n: 100_000,
                changes: 200,
                rate: 1_000,
                sustain: Duration::from_secs(60),
                edits: 10,
                per_file: 1_000,
            }
        }
    }
}

/// The rows of the agent measurements (a failed measurement is a failed row).
pub fn run(quick: bool, p: &Progress) -> Vec<Row> {
    let plan = Plan::new(quick);
    let mut rows = Vec::new();
    match kube_source(&plan, p) {
        Ok(r) => rows.extend(r),
        Err(e) => rows.push(row(CASE_LIST, "kube", plan.n).failed(format!("{e:#}"))),
    }
    match manifests_source(&plan, p) {
        Ok(r) => rows.extend(r),
        Err(e) => rows.push(row(CASE_FILES, "manifests", plan.n).failed(format!("{e:#}"))),
    }
    rows
}

fn row(case: &str, source: &str, n: usize) -> Row {
    Row::new("control-plane", case, "ours", n as u64).param("source", source)
}

/// The agent binary to measure.
fn agent_bin() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("LB_BENCH_AGENT") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("locating lb-bench")?;
    let p = exe.parent().unwrap_or(Path::new(".")).join("lb-agent");
    anyhow::ensure!(
        p.is_file(),
        "{} not found: build it with `cargo build --release -p lb-agent`",
        p.display()
    );
    Ok(p)
}

// ---------------------------------------------------------------------------------------
// The objects

fn cluster_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(0x0a60_000a + i as u32)
}

fn endpoint_ip(i: usize, k: usize) -> Ipv4Addr {
    Ipv4Addr::from(0x0a80_0000 + (i * ADDRS_PER_SERVICE + k) as u32 + 1)
}

fn service_name(i: usize) -> String {
    format!("svc-{i}")
}

/// The master key of Service `i`'s ClusterIP frontend.
fn master_key(i: usize) -> Frontend4Key {
    Frontend4Key::new(
        u32::from(cluster_ip(i)).to_be(),
        80u16.to_be(),
        IPPROTO_TCP,
        0,
    )
}

fn service(i: usize) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(service_name(i)),
            namespace: Some(NS.to_string()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".to_string()),
            cluster_ip: Some(cluster_ip(i).to_string()),
            cluster_ips: Some(vec![cluster_ip(i).to_string()]),
            ports: Some(vec![ServicePort {
                name: Some("p80".to_string()),
                port: 80,
                protocol: Some("TCP".to_string()),
                target_port: Some(IntOrString::Int(8080)),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn slice(i: usize, count: usize) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(format!("{}-abcde", service_name(i))),
            namespace: Some(NS.to_string()),
            labels: Some(
                [(
                    lb_agent::model::SERVICE_NAME_LABEL.to_string(),
                    service_name(i),
                )]
                .into(),
            ),
            ..Default::default()
        },
        address_type: "IPv4".to_string(),
        endpoints: (0..count)
            .map(|k| Endpoint {
                addresses: vec![endpoint_ip(i, k).to_string()],
                conditions: Some(EndpointConditions {
                    ready: Some(true),
                    serving: Some(true),
                    terminating: Some(false),
                }),
                node_name: Some(NODE.to_string()),
                ..Default::default()
            })
            .collect::<Vec<_>>()
            .into(),
        ports: Some(vec![EndpointPort {
            name: Some("p80".to_string()),
            port: Some(8080),
            protocol: Some("TCP".to_string()),
            ..Default::default()
        }]),
    }
}

fn node() -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(NODE.to_string()),
            ..Default::default()
        },
        status: Some(NodeStatus {
            addresses: Some(vec![NodeAddress {
                type_: "InternalIP".to_string(),
                address: NODE_IP.to_string(),
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn service_yaml(i: usize, y: &mut String) {
    y.push_str(&format!(
        "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {}\n  namespace: {NS}\nspec:\n  type: ClusterIP\n  clusterIP: {}\n  ports:\n  - name: p80\n    port: 80\n    protocol: TCP\n    targetPort: 8080\n",
        service_name(i),
        cluster_ip(i)
    ));
}

fn slice_yaml(i: usize, count: usize, y: &mut String) {
    y.push_str(&format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {}-abcde\n  namespace: {NS}\n  labels:\n    kubernetes.io/service-name: {}\naddressType: IPv4\nports:\n- name: p80\n  port: 8080\n  protocol: TCP\nendpoints:\n",
        service_name(i),
        service_name(i)
    ));
    for k in 0..count {
        y.push_str(&format!(
            "- addresses: [\"{}\"]\n  conditions: {{ready: true}}\n  nodeName: {NODE}\n",
            endpoint_ip(i, k)
        ));
    }
}

// ---------------------------------------------------------------------------------------
// The agent and its maps

/// A running agent, its namespace and pins (all removed on drop, the agent first).
struct Running {
    proc: Proc,
    pins: PinDir,
    ns: Netns,
    started: Instant,
}

impl Running {
    fn start(ns: Netns, pins: PinDir, n: usize, source: &[&str]) -> anyhow::Result<Running> {
        let bin = agent_bin()?;
        let pins_s = pins.path().to_string_lossy().to_string();
        let cap = |k: usize| (k + 4096).to_string();
        let (services, backends, frontends) = (
            cap(n * (ADDRS_PER_SERVICE + 1)),
            cap(n * ADDRS_PER_SERVICE),
            cap(n),
        );
        let mut args = vec![
            bin.to_str().context("agent path is not UTF-8")?,
            "run",
            "--node-name",
            NODE,
            "--iface",
            "lo",
            "--bpffs",
            &pins_s,
            "--cgroup",
            "off",
            "--healthz-addr",
            "off",
            "--services-size",
            &services,
            "--backends-size",
            &backends,
            "--frontends-size",
            &frontends,
        ];
        args.extend_from_slice(source);
        let started = Instant::now();
        let proc = ns.spawn(&args);
        Ok(Running {
            proc,
            pins,
            ns,
            started,
        })
    }

    /// The agent's maps, once it has pinned them.
    fn maps(&mut self, deadline: Instant) -> anyhow::Result<BpfDataplane> {
        loop {
            if let Ok(dp) = BpfDataplane::open(&PinLayout::new(self.pins.path())) {
                return Ok(dp);
            }
            self.check(deadline, "the agent pinning its maps")?;
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Fails when the agent died or the deadline passed.
    fn check(&mut self, deadline: Instant, what: &str) -> anyhow::Result<()> {
        if let Some(status) = self.proc.try_wait() {
            anyhow::bail!(
                "lb-agent exited ({status}) while waiting for {what}; its log:\n{}",
                tail(&self.proc.log())
            );
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "timed out waiting for {what}; lb-agent log:\n{}",
            tail(&self.proc.log())
        );
        Ok(())
    }

    /// Peak and current RSS of the agent process, MiB.
    fn rss(&self) -> (f64, f64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.proc.pid()))
            .unwrap_or_default();
        let kb = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<f64>().ok())
                .map_or(f64::NAN, |k| k / 1024.0)
        };
        (kb("VmHWM:"), kb("VmRSS:"))
    }

    /// Kernel memory of the BPF maps the agent holds (each map once), MiB: charged to its
    /// memory cgroup along with its RSS.
    fn maps_mib(&self) -> f64 {
        let dir = format!("/proc/{}/fdinfo", self.proc.pid());
        let mut seen = std::collections::BTreeMap::new();
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let info = std::fs::read_to_string(e.path()).unwrap_or_default();
            let field = |k: &str| {
                info.lines()
                    .find_map(|l| l.strip_prefix(k))
                    .and_then(|v| v.trim().parse::<u64>().ok())
            };
            if let (Some(id), Some(bytes)) = (field("map_id:"), field("memlock:")) {
                seen.insert(id, bytes);
            }
        }
        seen.values().sum::<u64>() as f64 / (1024.0 * 1024.0)
    }

    fn stop(mut self) {
        let _ = self.proc.terminate();
        drop(self.proc);
        drop(self.pins);
        drop(self.ns);
    }
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// The backend count in Service `i`'s master entry (None: no master yet).
fn count_of(dp: &BpfDataplane, i: usize) -> Option<u16> {
    dp.service(&master_key(i)).ok().flatten().map(|v| v.count)
}

/// Wait until the first sync is complete: the master entry written last (the highest key:
/// masters go in key order, after every slot) and a sample of others hold `ENDPOINTS`
/// backends, with every slot of the sample present.
fn wait_programmed(
    agent: &mut Running,
    dp: &BpfDataplane,
    n: usize,
    deadline: Instant,
) -> anyhow::Result<Instant> {
    let last = (0..n)
        .max_by_key(|i| master_key(*i))
        .context("no Services")?;
    let sample: Vec<usize> = (0..64)
        .map(|k| k * n / 64)
        .chain([0, n - 1, last])
        .collect();
    loop {
        if count_of(dp, last) == Some(ENDPOINTS as u16)
            && sample
                .iter()
                .all(|i| count_of(dp, *i) == Some(ENDPOINTS as u16))
        {
            let done = Instant::now();
            for i in &sample {
                for slot in 1..=ENDPOINTS as u16 {
                    anyhow::ensure!(
                        dp.service(&master_key(*i).with_slot(slot))
                            .ok()
                            .flatten()
                            .is_some(),
                        "Service {i}: slot {slot} missing after its master"
                    );
                }
            }
            return Ok(done);
        }
        agent.check(deadline, "the maps to be programmed")?;
        std::thread::sleep(Duration::from_micros(500));
    }
}

/// Poll until Service `i`'s master holds `count` backends; the time it was seen.
fn wait_count(
    agent: &mut Running,
    dp: &BpfDataplane,
    i: usize,
    count: u16,
    deadline: Instant,
) -> anyhow::Result<Instant> {
    loop {
        if count_of(dp, i) == Some(count) {
            return Ok(Instant::now());
        }
        agent.check(deadline, "a change to reach the maps")?;
        std::thread::yield_now();
    }
}

/// p-th percentile (0..=100) of `v` (nearest rank).
fn percentile(v: &[f64], p: f64) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return f64::NAN;
    }
    s.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
    s[rank.clamp(1, s.len()) - 1]
}

fn latency_row(case: &str, source: &str, n: usize, ms: &[f64]) -> Row {
    row(case, source, n)
        .metric("latency_ms", "ms", Stat::of(ms))
        .metric("p50_ms", "ms", Stat::single(percentile(ms, 50.0)))
        .metric("p99_ms", "ms", Stat::single(percentile(ms, 99.0)))
        .metric("max_ms", "ms", Stat::single(percentile(ms, 100.0)))
        .param("changes", ms.len())
}

// ---------------------------------------------------------------------------------------
// The kube source

/// The fake API server on a runtime of its own, serving inside a network namespace.
struct ServerThread {
    server: Option<FakeApiServer>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ServerThread {
    fn start_in(ns: &Netns) -> anyhow::Result<ServerThread> {
        let path = ns.path();
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let setup = lb_testkit::lab::netns::setns_net(&path)
                .map_err(anyhow::Error::from)
                .and_then(|()| {
                    tokio::runtime::Builder::new_multi_thread()
                        .worker_threads(1)
                        .enable_all()
                        .build()
                        .map_err(anyhow::Error::from)
                });
            match setup {
                Ok(rt) => rt.block_on(async move {
                    let server = FakeApiServer::start().await;
                    let _ = tx.send(Ok(server));
                    let _ = stop_rx.await;
                }),
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            }
        });
        let server = rx
            .recv_timeout(Duration::from_secs(10))
            .context("starting the fake API server")??;
        Ok(ServerThread {
            server: Some(server),
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    fn server(&self) -> &FakeApiServer {
        self.server.as_ref().expect("server present until drop")
    }
}

impl Drop for ServerThread {
    fn drop(&mut self) {
        drop(self.server.take());
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn kubeconfig(url: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {url}\nusers:\n- name: bench\n  user:\n    token: not-a-real-token\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: bench\ncurrent-context: fake\n"
    )
}

fn kube_source(plan: &Plan, p: &Progress) -> anyhow::Result<Vec<Row>> {
    let n = plan.n;
    let tag = format!("lbb-agent-{}", std::process::id());
    let ns = Netns::create(&tag)?;
    let server = ServerThread::start_in(&ns)?;
    let s = server.server();
    // Keep a bounded history: the watches are never behind by more than this.
    s.set_history_limit(200_000);
    p.say(&format!(
        "control-plane: agent (kube): the fake API server gets {n} Services x {ENDPOINTS} endpoints"
    ));
    s.apply(&node());
    for i in 0..n {
        s.apply(&service(i));
        s.apply(&slice(i, ENDPOINTS));
    }
    let dir = std::env::temp_dir().join(&tag);
    std::fs::create_dir_all(&dir)?;
    let kc = dir.join("kubeconfig");
    std::fs::write(&kc, kubeconfig(&s.url()))?;
    let pins = PinDir::new("bench-agent");
    let kc_s = kc.to_string_lossy().to_string();
    let mut agent = Running::start(ns, pins, n, &["--kubeconfig", &kc_s])?;
    let result = measure_kube(plan, p, &server, &mut agent);
    let (peak, rss) = agent.rss();
    let maps = agent.maps_mib();
    agent.stop();
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
    let mut rows = result?;
    rows.push(
        row(CASE_RSS, "kube", n)
            .metric("peak_rss_mib", "MiB", Stat::single(peak))
            .metric("rss_mib", "MiB", Stat::single(rss))
            .metric("bpf_maps_mib", "MiB", Stat::single(maps))
            .note(
                "VmHWM and VmRSS of the lb-agent process at the end of the kube measurements; \
                 bpf_maps_mib: kernel memory of its maps (fdinfo memlock), also charged to \
                 its memory cgroup",
            ),
    );
    p.say(&format!(
        "  agent (kube): peak RSS {peak:.0} MiB, BPF maps {maps:.0} MiB"
    ));
    Ok(rows)
}

fn measure_kube(
    plan: &Plan,
    p: &Progress,
    server: &ServerThread,
    agent: &mut Running,
) -> anyhow::Result<Vec<Row>> {
    let n = plan.n;
    let s = server.server();
    let deadline = Instant::now() + Duration::from_secs(300);
    let dp = agent.maps(deadline)?;
    let programmed = wait_programmed(agent, &dp, n, deadline)?;
    let listed = [Kind::Service, Kind::EndpointSlice, Kind::Pod, Kind::Node]
        .into_iter()
        .map(|k| s.list_done(k))
        .collect::<Option<Vec<Instant>>>()
        .context("the server saw no complete list of every kind")?
        .into_iter()
        .max()
        .context("no list")?;
    let list_ms = programmed.saturating_duration_since(listed).as_secs_f64() * 1e3;
    let start_ms = programmed.duration_since(agent.started).as_secs_f64() * 1e3;
    p.say(&format!(
        "  agent (kube): list complete -> programmed {list_ms:.0} ms ({start_ms:.0} ms from \
         the agent's start)"
    ));
    let mut rows = vec![row(CASE_LIST, "kube", n)
        .metric("list_to_programmed_ms", "ms", Stat::single(list_ms))
        .metric("start_to_programmed_ms", "ms", Stat::single(start_ms))
        .param("entries", n * (2 * ENDPOINTS + 1))
        .note(
            "from the fake API server sending the last page of the last list (pages of 500, \
             consistent snapshots) to the last master entry of the first sync in the map",
        )];

    // One change at a time: Service i gains an endpoint.
    let mut counts = vec![ENDPOINTS; n];
    let mut lat = Vec::new();
    let budget = Instant::now() + Duration::from_secs(120);
    for k in 0..plan.changes {
        if Instant::now() > budget {
            break;
        }
        let i = (k * 7919) % n;
        counts[i] += 1;
        s.apply(&slice(i, counts[i]));
        let sent = Instant::now();
        let seen = wait_count(
            agent,
            &dp,
            i,
            counts[i] as u16,
            sent + Duration::from_secs(30),
        )?;
        lat.push(seen.duration_since(sent).as_secs_f64() * 1e3);
        std::thread::sleep(Duration::from_millis(10));
    }
    p.say(&format!(
        "  agent (kube): one change -> map written: p50 {:.2} ms, p99 {:.2} ms over {}",
        percentile(&lat, 50.0),
        percentile(&lat, 99.0),
        lat.len()
    ));
    rows.push(latency_row(CASE_CHANGE, "kube", n, &lat).note(
        "a slice gains an endpoint; from the server handing the watch event to the connection \
         to the frontend's master entry holding the new count; one change at a time",
    ));
    rows.push(sustained(plan, p, s, agent, &dp, &mut counts)?);
    Ok(rows)
}

/// A change every 1/rate s for the plan's duration, each to the next Service; their
/// latencies, and what is left unapplied 10 s after the last.
fn sustained(
    plan: &Plan,
    p: &Progress,
    s: &FakeApiServer,
    agent: &mut Running,
    dp: &BpfDataplane,
    counts: &mut [usize],
) -> anyhow::Result<Row> {
    let n = plan.n;
    let total = (plan.sustain.as_secs_f64() * f64::from(plan.rate)) as usize;
    let period = Duration::from_secs_f64(1.0 / f64::from(plan.rate));
    // (service, count it must reach, sent at)
    let inflight: Mutex<VecDeque<(usize, u16, Instant)>> = Mutex::new(VecDeque::new());
    let done = AtomicBool::new(false);
    let results: Mutex<Vec<(f64, f64)>> = Mutex::new(Vec::new()); // (sent offset s, ms)
    let start = Instant::now() + Duration::from_millis(100);
    let mut late = 0usize;
    let plan_changes: Vec<(usize, usize)> = (0..total)
        .map(|k| {
            let i = (n / 2 + k * 104_729) % n;
            counts[i] += 1;
            (i, counts[i])
        })
        .collect();
    anyhow::ensure!(
        counts.iter().all(|c| *c <= ADDRS_PER_SERVICE),
        "too many changes per Service for the address plan"
    );
    let dead = std::thread::scope(|sc| -> anyhow::Result<usize> {
        let poller = sc.spawn(|| {
            let mut seen = Vec::new();
            loop {
                let batch: Vec<(usize, u16, Instant)> = inflight
                    .lock()
                    .map(|q| q.iter().copied().collect())
                    .unwrap_or_default();
                if batch.is_empty() && done.load(Ordering::Relaxed) {
                    break;
                }
                seen.clear();
                for (i, c, sent) in &batch {
                    if count_of(dp, *i).is_some_and(|now| now >= *c) {
                        let ms = sent.elapsed().as_secs_f64() * 1e3;
                        seen.push((*i, *c));
                        if let Ok(mut r) = results.lock() {
                            r.push((sent.duration_since(start).as_secs_f64(), ms));
                        }
                    }
                }
                if !seen.is_empty() {
                    if let Ok(mut q) = inflight.lock() {
                        q.retain(|(i, c, _)| !seen.contains(&(*i, *c)));
                    }
                }
                std::thread::sleep(Duration::from_micros(50));
            }
        });
        for (k, (i, c)) in plan_changes.iter().enumerate() {
            let at = start + period * k as u32;
            let now = Instant::now();
            if at > now {
                std::thread::sleep(at - now);
            } else if now - at > Duration::from_millis(5) {
                late += 1;
            }
            s.apply(&slice(*i, *c));
            let sent = Instant::now();
            if let Ok(mut q) = inflight.lock() {
                q.push_back((*i, *c as u16, sent));
            }
        }
        // Let the last changes arrive, then stop waiting.
        let until = Instant::now() + Duration::from_secs(10);
        while inflight.lock().map(|q| !q.is_empty()).unwrap_or(false) && Instant::now() < until {
            agent.check(until + Duration::from_secs(1), "the last sustained changes")?;
            std::thread::sleep(Duration::from_millis(10));
        }
        let left = inflight.lock().map(|q| q.len()).unwrap_or(0);
        if let Ok(mut q) = inflight.lock() {
            q.clear();
        }
        done.store(true, Ordering::Relaxed);
        poller
            .join()
            .map_err(|_| anyhow::anyhow!("the poller panicked"))?;
        Ok(left)
    })?;
    let r = results.into_inner().unwrap_or_default();
    let all: Vec<f64> = r.iter().map(|(_, ms)| *ms).collect();
    let window = |from: f64, to: f64| -> Vec<f64> {
        r.iter()
            .filter(|(t, _)| *t >= from && *t < to)
            .map(|(_, ms)| *ms)
            .collect()
    };
    let secs = plan.sustain.as_secs_f64();
    let w = (secs / 6.0).max(1.0);
    let (first, last) = (window(0.0, w), window(secs - w, secs + 1.0));
    p.say(&format!(
        "  agent (kube): {} changes at {}/s: p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms; first \
         {w:.0} s p99 {:.2} ms, last {w:.0} s p99 {:.2} ms; {dead} unapplied",
        total,
        plan.rate,
        percentile(&all, 50.0),
        percentile(&all, 99.0),
        percentile(&all, 100.0),
        percentile(&first, 99.0),
        percentile(&last, 99.0),
    ));
    Ok(latency_row(CASE_SUSTAINED, "kube", plan.n, &all)
        .metric(
            "first_window_p99_ms",
            "ms",
            Stat::single(percentile(&first, 99.0)),
        )
        .metric(
            "last_window_p99_ms",
            "ms",
            Stat::single(percentile(&last, 99.0)),
        )
        .param("rate_per_s", plan.rate)
        .param("duration_s", plan.sustain.as_secs())
        .param("sent", total)
        .param("unapplied_after_10s", dead)
        .param("sent_late_over_5ms", late)
        .param("window_s", format!("{w:.0}"))
        .note(
            "a change every 1/rate s, each to another Service; latency as for one change; no \
             growing backlog = the last window's p99 near the first's and nothing unapplied",
        ))
}

// ---------------------------------------------------------------------------------------
// The manifests source

fn write_file(dir: &Path, file: usize, plan: &Plan, counts: &[usize]) -> anyhow::Result<()> {
    let lo = file * plan.per_file;
    let hi = ((file + 1) * plan.per_file).min(plan.n);
    let mut y = String::with_capacity((hi - lo) * 1_500);
    for (i, count) in counts.iter().enumerate().take(hi).skip(lo) {
        service_yaml(i, &mut y);
        slice_yaml(i, *count, &mut y);
    }
    // Replaced whole by a rename, as editors and ConfigMap mounts do.
    let tmp = dir.join(format!(".svc-{file:05}.yaml.tmp"));
    std::fs::write(&tmp, y)?;
    std::fs::rename(&tmp, dir.join(format!("svc-{file:05}.yaml")))?;
    Ok(())
}

fn manifests_source(plan: &Plan, p: &Progress) -> anyhow::Result<Vec<Row>> {
    let n = plan.n;
    let tag = format!("lbb-agent-files-{}", std::process::id());
    let dir = std::env::temp_dir().join(&tag);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let files = n.div_ceil(plan.per_file);
    p.say(&format!(
        "control-plane: agent (manifests): {n} Services x {ENDPOINTS} endpoints in {files} files"
    ));
    let mut counts = vec![ENDPOINTS; n];
    std::fs::write(
        dir.join("node.yaml"),
        format!(
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: {NODE}\nstatus:\n  addresses:\n  - type: InternalIP\n    address: {NODE_IP}\n"
        ),
    )?;
    for f in 0..files {
        write_file(&dir, f, plan, &counts)?;
    }
    let ns = Netns::create(&tag)?;
    let pins = PinDir::new("bench-agent-files");
    let dir_s = dir.to_string_lossy().to_string();
    let mut agent = Running::start(ns, pins, n, &["--manifests", &dir_s])?;
    let result = (|| -> anyhow::Result<Vec<Row>> {
        let deadline = Instant::now() + Duration::from_secs(300);
        let dp = agent.maps(deadline)?;
        let programmed = wait_programmed(&mut agent, &dp, n, deadline)?;
        let ms = programmed.duration_since(agent.started).as_secs_f64() * 1e3;
        p.say(&format!(
            "  agent (manifests): start -> programmed {ms:.0} ms"
        ));
        let mut rows = vec![row(CASE_FILES, "manifests", n)
            .metric("start_to_programmed_ms", "ms", Stat::single(ms))
            .param("files", files)
            .param("entries", n * (2 * ENDPOINTS + 1))
            .note("from starting lb-agent to the last master entry of the first sync in the map")];
        let mut lat = Vec::new();
        for e in 0..plan.edits {
            let f = (e * 37) % files;
            let i = f * plan.per_file;
            counts[i] += 1;
            write_file(&dir, f, plan, &counts)?;
            let written = Instant::now();
            let seen = wait_count(
                &mut agent,
                &dp,
                i,
                counts[i] as u16,
                written + Duration::from_secs(30),
            )?;
            lat.push(seen.duration_since(written).as_secs_f64() * 1e3);
            std::thread::sleep(Duration::from_millis(200));
        }
        p.say(&format!(
            "  agent (manifests): one file edit -> map written: p50 {:.0} ms, max {:.0} ms",
            percentile(&lat, 50.0),
            percentile(&lat, 100.0)
        ));
        rows.push(
            latency_row(CASE_EDIT, "manifests", n, &lat)
                .param("services_per_file", plan.per_file)
                .note(
                    "a slice in one file gains an endpoint (the file replaced by a rename); \
                     from the rename to the master entry holding the new count",
                ),
        );
        Ok(rows)
    })();
    let (peak, rss) = agent.rss();
    let maps = agent.maps_mib();
    agent.stop();
    let _ = std::fs::remove_dir_all(&dir);
    let mut rows = result?;
    rows.push(
        row(CASE_RSS, "manifests", n)
            .metric("peak_rss_mib", "MiB", Stat::single(peak))
            .metric("rss_mib", "MiB", Stat::single(rss))
            .metric("bpf_maps_mib", "MiB", Stat::single(maps))
            .note(
                "VmHWM and VmRSS of the lb-agent process at the end of the manifests measurements",
            ),
    );
    p.say(&format!(
        "  agent (manifests): peak RSS {peak:.0} MiB, BPF maps {maps:.0} MiB"
    ));
    Ok(rows)
}
