//! The reliability suite (issue 10, item 8), in the one-node lab (needs root): the agent
//! killed and restarted under open connections, the datapath serving alone while the agent
//! is stopped, thousands of endpoint changes under a connect-request-close load, and a UDP
//! flow following its Service to a new backend. Each test prints its figures on a line that
//! starts with `RELIABILITY` (the CI log is where they are read) and is bounded in time.
//!
//! Names follow kubernetes/kubernetes test/e2e/network/service.go ("should work after
//! restarting kube-proxy [Disruptive]") and conntrack.go ("should be able to preserve UDP
//! traffic when server pod cycles for a NodePort service") where one applies.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Mutex,
    },
    time::{Duration, Instant},
};

use lb_agent::{
    dataplane::{BpfDataplane, Dataplane as _},
    loader::PinLayout,
};
use lb_testkit::{
    agent::{
        node_yaml, service_yaml, start_agent, write_manifest, Agent, Endpoint, ManifestDir,
        SvcPort, NODE_NAME,
    },
    bpffs::PinDir,
    lab::{http_get, pod_ip, udp_request, Lab, LabConfig, LineConn, NODE_IP},
};

/// Bound of one connect, request or reply.
const T: Duration = Duration::from_secs(3);
const SVC_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const HTTP_NP: u16 = 30001;
const UDP_NP: u16 = 30053;
const LINE_NP: u16 = 30900;

fn np(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(NODE_IP, port)
}

fn ports() -> Vec<SvcPort> {
    vec![
        SvcPort {
            name: "http",
            proto: "TCP",
            port: 80,
            target: 80,
            node_port: Some(HTTP_NP),
        },
        SvcPort {
            name: "dns",
            proto: "UDP",
            port: 53,
            target: 53,
            node_port: Some(UDP_NP),
        },
        SvcPort {
            name: "line",
            proto: "TCP",
            port: 9000,
            target: 9000,
            node_port: Some(LINE_NP),
        },
    ]
}

/// `web.yaml`: the web Service (NodePorts 30001/TCP, 30053/UDP, 30900/TCP) and its
/// EndpointSlice over the pods `pods`.
fn write_web(dir: &Path, pods: &[usize]) {
    let eps: Vec<Endpoint> = pods
        .iter()
        .map(|&i| Endpoint {
            ip: pod_ip(i),
            ready: true,
            node: NODE_NAME,
        })
        .collect();
    let svc = service_yaml("web", "NodePort", SVC_IP, false, &ports(), &eps);
    write_manifest(dir, "web.yaml", &[svc]);
}

/// A lab of `pods` pods, each running `lb-podserver` (HTTP 80, UDP 53, line 9000), the node
/// object and the web Service over `endpoints`.
fn lab(what: &str, pods: usize, endpoints: &[usize]) -> (Lab, PinDir, ManifestDir) {
    let mut lab = Lab::new(LabConfig { pods });
    lab.wait_reachable();
    lab.start_pod_servers(&[80], &[53], &[9000]);
    let manifests = ManifestDir::new(what);
    write_manifest(
        manifests.path(),
        "node.yaml",
        &[node_yaml(NODE_NAME, NODE_IP)],
    );
    write_web(manifests.path(), endpoints);
    (lab, PinDir::new(what), manifests)
}

/// One `GET /` through the NodePort from the client namespace: the name of the pod that
/// answered.
fn get_pod(lab: &Lab) -> std::io::Result<String> {
    lab.client
        .enter(|| http_get(np(HTTP_NP), "/", T))
        .map(|b| b.trim().to_string())
}

/// Waits (bounded, 10 s) until the NodePort answers.
fn wait_serving(lab: &Lab, agent: &Agent) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        if get_pod(lab).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "the NodePort does not answer 10 s after the agent synced; agent log:\n{}",
        agent.proc.log()
    );
}

/// The agent's completed-sync log lines (`sync: N frontends, P puts, D deletes, F failures`).
fn sync_lines(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("sync: ") && l.contains(" frontends, "))
        .map(str::to_owned)
        .collect()
}

/// A restarted agent must have taken the pinned datapath over: programs swapped into the
/// pinned XDP link and the maps found already right.
fn assert_adopted(agent: &Agent, what: &str) {
    let log = agent.proc.log();
    assert!(
        log.contains("(Replaced)"),
        "{what}: the restarted agent must swap its programs into the pinned links:\n{log}"
    );
    let first = sync_lines(&log).into_iter().next().unwrap_or_default();
    assert!(
        first.contains(" 0 puts, 0 deletes, 0 failures"),
        "{what}: the restarted agent must find the pinned maps already right, got {first:?}:\n{log}"
    );
}

/// Sets a flag when dropped: stops the load threads also when the test panics.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Upstream: "should work after restarting kube-proxy [Disruptive]" (service.go), made
/// harder: 200 established TCP connections through a NodePort stay open while the agent is
/// killed with SIGKILL and restarted 20 times. A client thread goes round the connections
/// without pause (one request/reply on each per round) and opens a new connection after
/// every round, so traffic flows while the agent dies and while the next one loads. Between
/// two restarts, every connection does at least one full request/reply with the agent dead
/// and one with the new agent running. Not one reset, timeout, wrong reply or changed
/// backend; every restarted agent adopts the pins.
#[test]
fn should_work_after_restarting_kube_proxy_20_times_with_200_open_connections() {
    const RESTARTS: usize = 20;
    const CONNS: usize = 200;
    let started = Instant::now();
    let (lab, pins, manifests) = lab("rel-kill9", 4, &[0, 1, 2, 3]);
    let mut agent = start_agent(&lab, &pins, manifests.path());
    wait_serving(&lab, &agent);

    // The connections, each with its first request answered and its backend noted.
    let mut conns: Vec<(LineConn, String)> = (0..CONNS)
        .map(|i| {
            let mut c = lab
                .client
                .enter(|| LineConn::connect(np(LINE_NP), T))
                .unwrap_or_else(|e| panic!("connection {i}: {e}"));
            let r = c
                .request(&format!("hello{i}"))
                .unwrap_or_else(|e| panic!("connection {i}, first request: {e}"));
            let pod = r.split(':').next().unwrap_or_default().to_string();
            (c, pod)
        })
        .collect();
    let mut spread = BTreeMap::new();
    for (_, pod) in &conns {
        *spread.entry(pod.clone()).or_insert(0u32) += 1;
    }
    assert!(spread.len() >= 2, "the connections spread: {spread:?}");

    let stop = AtomicBool::new(false);
    let rounds = AtomicU64::new(0);
    let requests = AtomicU64::new(0);
    let new_conns = AtomicU64::new(0);
    let failures: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let fail = |msg: String| failures.lock().unwrap_or_else(|e| e.into_inner()).push(msg);
    let failed = || failures.lock().unwrap_or_else(|e| e.into_inner()).len();

    std::thread::scope(|s| {
        let _stop = StopOnDrop(&stop);
        let worker = s.spawn(|| {
            lab.client.enter(|| {
                let mut dead = [false; CONNS];
                for round in 0..1_000_000u64 {
                    if stop.load(Ordering::SeqCst) || started.elapsed() > Duration::from_secs(240) {
                        break;
                    }
                    for (i, (c, pod)) in conns.iter_mut().enumerate() {
                        if dead[i] {
                            continue;
                        }
                        let line = format!("r{round}c{i}");
                        requests.fetch_add(1, Ordering::Relaxed);
                        match c.request(&line) {
                            Ok(r) if r == format!("{pod}:{line}") => {}
                            Ok(r) => {
                                dead[i] = true;
                                let why = format!("reply {r:?}, its backend is {pod}");
                                fail(format!("connection {i} round {round}: {why}"));
                            }
                            Err(e) => {
                                dead[i] = true;
                                fail(format!("connection {i} round {round}: {e}"));
                            }
                        }
                    }
                    new_conns.fetch_add(1, Ordering::Relaxed);
                    match http_get(np(HTTP_NP), "/", T) {
                        Ok(b) if b.starts_with("pod") => {}
                        Ok(b) => fail(format!("new connection after round {round}: body {b:?}")),
                        Err(e) => fail(format!("new connection after round {round}: {e}")),
                    }
                    rounds.store(round + 1, Ordering::SeqCst);
                }
            })
        });
        // Until `n` rounds are complete (bounded: 30 s).
        let wait_rounds = |n: u64, what: &str| {
            let t = Instant::now();
            while rounds.load(Ordering::SeqCst) < n {
                if t.elapsed() > Duration::from_secs(30) || worker.is_finished() {
                    stop.store(true, Ordering::SeqCst);
                    panic!("{what}: the client did not finish a round within 30 s");
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        };
        let mut restart_times = Vec::new();
        for restart in 1..=RESTARTS {
            // The round under way began before the kill; the next one runs entirely without
            // an agent.
            let r0 = rounds.load(Ordering::SeqCst);
            agent.proc.kill();
            wait_rounds(r0 + 2, &format!("restart {restart}, agent dead"));
            let t = Instant::now();
            agent = start_agent(&lab, &pins, manifests.path());
            restart_times.push(t.elapsed());
            assert_adopted(&agent, &format!("restart {restart}"));
            let r1 = rounds.load(Ordering::SeqCst);
            wait_rounds(r1 + 2, &format!("restart {restart}, new agent"));
            // And a new connection from here, after the restart.
            new_conns.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = get_pod(&lab) {
                fail(format!("new connection after restart {restart}: {e}"));
            }
            if failed() > 0 {
                break; // reported below, with the figures
            }
        }
        stop.store(true, Ordering::SeqCst);
        worker.join().expect("client thread");
        let took = started.elapsed();
        let mean_restart =
            restart_times.iter().sum::<Duration>() / restart_times.len().max(1) as u32;
        println!(
            "RELIABILITY kill -9 under load: restarts={} connections={CONNS} \
             spread={spread:?} rounds={} requests={} new_connections={} failures={} \
             mean_agent_restart={mean_restart:?} took={took:.1?}",
            restart_times.len(),
            rounds.load(Ordering::SeqCst),
            requests.load(Ordering::SeqCst),
            new_conns.load(Ordering::SeqCst),
            failed(),
        );
    });
    let failures = failures.into_inner().unwrap_or_else(|e| e.into_inner());
    assert!(
        failures.is_empty(),
        "{} failures: {failures:#?}",
        failures.len()
    );
}

/// The agent stopped (SIGTERM: it leaves the datapath pinned) for 60 s: a new TCP connection
/// (`GET /`) and a new UDP flow (a datagram from a fresh socket) through the NodePorts every
/// 50 ms, and an established TCP connection, keep working with no agent at all; then a new
/// agent adopts the pins. (Upstream's "should work after restarting
/// kube-proxy [Disruptive]" checks before and after; this checks the time in between.)
#[test]
fn should_serve_new_nodeport_connections_for_60s_while_the_agent_is_stopped() {
    const STOPPED: Duration = Duration::from_secs(60);
    const EVERY: Duration = Duration::from_millis(50);
    let started = Instant::now();
    let (lab, pins, manifests) = lab("rel-stopped", 2, &[0, 1]);
    let mut agent = start_agent(&lab, &pins, manifests.path());
    wait_serving(&lab, &agent);
    let mut conn = lab
        .client
        .enter(|| LineConn::connect(np(LINE_NP), T))
        .expect("connect");
    let first = conn.request("before").expect("first request");
    let pod = first.split(':').next().unwrap_or_default().to_string();

    let status = agent.proc.terminate();
    assert!(
        status.is_some_and(|s| s.success()),
        "the agent exits cleanly on SIGTERM: {status:?}\n{}",
        agent.proc.log()
    );
    assert!(
        agent.proc.log().contains("the datapath stays attached"),
        "{}",
        agent.proc.log()
    );

    let (attempts, failures, spread, udp_ok) = lab.client.enter(|| {
        let t0 = Instant::now();
        let mut attempts = 0u64;
        let mut udp_ok = 0u64;
        let mut failures = Vec::new();
        let mut spread: BTreeMap<String, u64> = BTreeMap::new();
        // One attempt per 50 ms tick (a slow attempt makes the next start at once).
        while t0.elapsed() < STOPPED && attempts < STOPPED.as_millis() as u64 / 50 {
            let due = t0 + EVERY * attempts as u32;
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            attempts += 1;
            match http_get(np(HTTP_NP), "/", T) {
                Ok(b) => *spread.entry(b.trim().to_string()).or_default() += 1,
                Err(e) => failures.push(format!("TCP at {:.1?}: {e}", t0.elapsed())),
            }
            match udp_request(np(UDP_NP), b"ping", T) {
                Ok(r) if r.starts_with(b"pod") && r.ends_with(b":ping") => udp_ok += 1,
                Ok(r) => failures.push(format!(
                    "UDP at {:.1?}: reply {:?}",
                    t0.elapsed(),
                    String::from_utf8_lossy(&r)
                )),
                Err(e) => failures.push(format!("UDP at {:.1?}: {e}", t0.elapsed())),
            }
        }
        (attempts, failures, spread, udp_ok)
    });
    let established = conn.request("after60s");

    agent = start_agent(&lab, &pins, manifests.path());
    assert_adopted(&agent, "after 60 s stopped");
    let after = get_pod(&lab);
    let established_after = conn.request("adopted");
    println!(
        "RELIABILITY agent stopped {STOPPED:?}: attempts={attempts} (each a new TCP connection \
         and a new UDP flow) tcp_ok={} udp_ok={udp_ok} failures={} spread={spread:?} \
         established_connection={} new_connection_after_restart={} took={:.1?}",
        spread.values().sum::<u64>(),
        failures.len(),
        if established.is_ok() && established_after.is_ok() {
            "ok"
        } else {
            "FAILED"
        },
        if after.is_ok() { "ok" } else { "FAILED" },
        started.elapsed()
    );
    assert!(
        failures.is_empty(),
        "{} failures: {failures:#?}",
        failures.len()
    );
    assert!(attempts >= 1100, "only {attempts} attempts in {STOPPED:?}");
    assert_eq!(udp_ok, attempts, "every UDP flow answered");
    assert_eq!(spread.len(), 2, "both backends serve: {spread:?}");
    assert_eq!(
        established.expect("the established connection with the agent stopped"),
        format!("{pod}:after60s")
    );
    assert_eq!(
        established_after.expect("the established connection after the restart"),
        format!("{pod}:adopted")
    );
    assert!(after
        .expect("a new connection after the restart")
        .starts_with("pod"));
}

/// xorshift64*: the endpoint churn's choices, reproducible from the printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// `k` distinct elements of `from`, in random order.
    fn pick(&mut self, from: &BTreeSet<usize>, k: usize) -> Vec<usize> {
        let mut v: Vec<usize> = from.iter().copied().collect();
        for i in (1..v.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
        v.truncate(k);
        v
    }
}

/// `t` as `HH:MM:SS.mmm` UTC, the form of the agent's log timestamps.
fn utc(t: std::time::SystemTime) -> String {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let s = d.as_secs() % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        s / 3600,
        s / 60 % 60,
        s % 60,
        d.subsec_millis()
    )
}

/// One connect, `GET /`, read to the end, close: the client port (0 if the connect failed)
/// and the body (the pod's name), or what failed, with the step and how long it had taken.
fn crr(to: SocketAddrV4) -> (u16, Result<String, String>) {
    use std::io::{Read as _, Write as _};
    let t = Instant::now();
    let fail = |step: &str, e: std::io::Error| format!("{step} after {:.1?}: {e}", t.elapsed());
    let mut c = match std::net::TcpStream::connect_timeout(&to.into(), T) {
        Ok(c) => c,
        Err(e) => return (0, Err(fail("connect", e))),
    };
    let port = c.local_addr().map(|a| a.port()).unwrap_or(0);
    let result = (|| {
        c.set_read_timeout(Some(T))
            .map_err(|e| fail("setsockopt", e))?;
        c.set_write_timeout(Some(T))
            .map_err(|e| fail("setsockopt", e))?;
        c.write_all(b"GET / HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n")
            .map_err(|e| fail("write", e))?;
        let mut raw = Vec::new();
        (&mut c)
            .take(64 * 1024)
            .read_to_end(&mut raw)
            .map_err(|e| fail("read", e))?;
        let resp = lb_testkit::lab::client::parse_response(&raw)
            .map_err(|e| format!("bad response after {:.1?}: {e}", t.elapsed()))?;
        if resp.status != 200 {
            return Err(format!("status {}", resp.status));
        }
        Ok(resp.body.trim().to_string())
    })();
    (port, result)
}

/// The conntrack entries (both maps) of the client port `port`, for a failure report.
fn ct_entries_of(dp: &BpfDataplane, port: u16) -> Vec<String> {
    let ip = |a: u32| Ipv4Addr::from(u32::from_be(a));
    let mut out = Vec::new();
    for (map, entries) in [
        ("LB4_CT", dp.conntrack_established()),
        ("LB4_CT_SYN", dp.conntrack_half_open()),
    ] {
        for (k, v) in entries.unwrap_or_default() {
            let theirs = if k.dir == lb_common::conntrack::CT_FORWARD {
                k.sport
            } else {
                k.dport
            };
            if k.proto == 6 && u16::from_be(theirs) == port {
                out.push(format!(
                    "{map} dir={} {}:{} -> {}:{} => {}:{} backend_id={} flags={:#x} \
                     last_seen_ns={}",
                    k.dir,
                    ip(k.saddr),
                    u16::from_be(k.sport),
                    ip(k.daddr),
                    u16::from_be(k.dport),
                    ip(v.nat_addr),
                    u16::from_be(v.nat_port),
                    v.backend_id,
                    v.flags,
                    v.last_seen_ns
                ));
            }
        }
    }
    out
}

/// One connect-request-close of the load: when its connect began, and who answered.
struct Conn {
    start: Instant,
    answer: Result<usize, String>,
}

/// Endpoint churn under a TCP_CRR load (issue 10, item 8): 6,000 endpoint changes, 0
/// failed connections, and 0 new connections to a backend after its removal was applied.
///
/// 60 pods, 30 of them endpoints of the Service at any time. Each rewrite of the
/// EndpointSlice file removes 25 of the 30 endpoints and adds 25 of the 30 others (both
/// chosen at random): 50 changes per write, 120 writes, 6,000 changes (3,000 removals and
/// 3,000 additions). After each write the test waits for the agent's next `sync:` line (it
/// is logged after the maps are written) before the next write. Every pod keeps running, so
/// connections already on a removed pod finish. Two client threads loop connect, `GET /`
/// (the pod server answers its pod name), close, through the NodePort, noting when each
/// connect began. A connection is late when it began after the test saw the sync line of
/// the write that removed its pod and before the write that added that pod back began.
/// A failed connection is reported with its client port, the step that failed, the flow's
/// conntrack entries (read at once, before the port is reused) and, beside them, the
/// agent's conntrack GC runs.
#[test]
fn should_not_send_new_connections_to_removed_endpoints_during_6000_endpoint_changes() {
    const PODS: usize = 60;
    const IN_SERVICE: usize = 30;
    const SWAP: usize = 25;
    const CHANGES: usize = 6_000;
    const WRITES: usize = CHANGES / (2 * SWAP);
    const CLIENTS: usize = 2;
    let started = Instant::now();
    let seed = std::env::var("RELIABILITY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                | 1
        });
    let mut rng = Rng(seed);
    let all: BTreeSet<usize> = (0..PODS).collect();
    let mut current: BTreeSet<usize> = rng.pick(&all, IN_SERVICE).into_iter().collect();
    let initial: Vec<usize> = current.iter().copied().collect();
    let (lab, pins, manifests) = lab("rel-churn", PODS, &initial);
    let agent = start_agent(&lab, &pins, manifests.path());
    wait_serving(&lab, &agent);
    let setup = started.elapsed();

    let stop = AtomicBool::new(false);
    // Per pod: the windows in which a new connection must not reach it (from the moment the
    // test saw its removal applied, to the write that adds it back; open while removed).
    let mut forbidden: Vec<Vec<(Instant, Option<Instant>)>> = vec![Vec::new(); PODS];
    let load_start = Instant::now();
    let load_start_wall = std::time::SystemTime::now();
    for p in all.difference(&current) {
        forbidden[*p].push((load_start, None));
    }
    let mut write_times = Vec::with_capacity(WRITES);
    let mut apply_times = Vec::with_capacity(WRITES);
    let (mut added, mut removed) = (0usize, 0usize);
    let mut slowest_write = Duration::ZERO;

    let results: Vec<Vec<Conn>> = std::thread::scope(|s| {
        let _stop = StopOnDrop(&stop);
        let clients: Vec<_> = (0..CLIENTS)
            .map(|_| {
                s.spawn(|| {
                    lab.client.enter(|| {
                        let mut out = Vec::new();
                        while !stop.load(Ordering::SeqCst)
                            && load_start.elapsed() < Duration::from_secs(150)
                            && out.len() < 2_000_000
                        {
                            let start = Instant::now();
                            let (port, answer) = crr(np(HTTP_NP));
                            // A failure is rare: note the flow's conntrack entries at once,
                            // before a later connection reuses the client port.
                            let answer = answer.map_err(|e| {
                                let ct = BpfDataplane::open(&PinLayout::new(pins.path()))
                                    .map(|dp| ct_entries_of(&dp, port))
                                    .unwrap_or_default();
                                format!("client port {port}: {e}; conntrack: {ct:#?}")
                            });
                            let answer = answer.and_then(|b| {
                                b.strip_prefix("pod")
                                    .and_then(|n| n.parse::<usize>().ok())
                                    .ok_or_else(|| format!("body {b:?}"))
                            });
                            out.push(Conn { start, answer });
                        }
                        out
                    })
                })
            })
            .collect();
        // Let the load run a moment on the initial endpoints.
        std::thread::sleep(Duration::from_millis(500));
        for w in 0..WRITES {
            let out: BTreeSet<usize> = all.difference(&current).copied().collect();
            let gone = rng.pick(&current, SWAP);
            let new = rng.pick(&out, SWAP);
            for p in &gone {
                current.remove(p);
            }
            current.extend(new.iter().copied());
            removed += gone.len();
            added += new.len();
            let syncs = sync_lines(&agent.proc.log()).len();
            let eps: Vec<usize> = current.iter().copied().collect();
            // New connections may reach the added pods from the moment the write begins.
            let writing = Instant::now();
            write_web(manifests.path(), &eps);
            let written = Instant::now();
            slowest_write = slowest_write.max(written - writing);
            for p in &new {
                if let Some(last) = forbidden[*p].last_mut() {
                    last.1.get_or_insert(writing);
                }
            }
            // The write is applied when the agent logs its next sync (bounded: 30 s; the
            // manifests live on the disk, which a busy machine can stall for seconds).
            let line = loop {
                if let Some(l) = sync_lines(&agent.proc.log()).get(syncs) {
                    break l.clone();
                }
                if written.elapsed() > Duration::from_secs(30) {
                    stop.store(true, Ordering::SeqCst);
                    panic!(
                        "write {w}: the agent did not sync within 30 s of the write (which \
                         took {:?}); agent log:\n{}",
                        written - writing,
                        agent.proc.log()
                    );
                }
                std::thread::sleep(Duration::from_millis(2));
            };
            let applied = Instant::now();
            if !line.contains(" 0 failures") {
                stop.store(true, Ordering::SeqCst);
                let warnings: Vec<String> = agent
                    .proc
                    .log()
                    .lines()
                    .filter(|l| l.contains("WARN"))
                    .map(str::to_owned)
                    .collect();
                panic!(
                    "write {w}: {line}\nagent warnings:\n{}",
                    warnings.join("\n")
                );
            }
            for p in &gone {
                forbidden[*p].push((applied, None));
            }
            write_times.push(writing);
            apply_times.push(applied - written);
        }
        // A moment of load on the final endpoints.
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::SeqCst);
        clients
            .into_iter()
            .map(|c| c.join().expect("client thread"))
            .collect()
    });
    let churn = write_times
        .last()
        .map(|t| t.duration_since(write_times[0]))
        .unwrap_or_default();

    // The maps hold exactly the final endpoints.
    let dp = BpfDataplane::open(&PinLayout::new(pins.path())).expect("open pinned maps");
    let in_maps: BTreeSet<Ipv4Addr> = dp
        .backends()
        .expect("backends")
        .into_iter()
        .map(|(_, b)| Ipv4Addr::from(u32::from_be(b.addr)))
        .collect();
    let want: BTreeSet<Ipv4Addr> = current.iter().map(|&i| pod_ip(i)).collect();
    let counters: Vec<String> = dp
        .stats()
        .expect("datapath counters")
        .into_iter()
        .filter(|(_, c)| c.packets > 0)
        .map(|(r, c)| format!("{}={}", r.name(), c.packets))
        .collect();

    let conns: Vec<&Conn> = results.iter().flatten().collect();
    let failures: Vec<String> = conns
        .iter()
        .filter_map(|c| {
            c.answer.as_ref().err().map(|e| {
                let at = c.start.duration_since(load_start);
                format!("{at:.3?} ({} UTC): {e}", utc(load_start_wall + at))
            })
        })
        .collect();
    let late: Vec<String> = conns
        .iter()
        .filter_map(|c| {
            let pod = *c.answer.as_ref().ok()?;
            let (from, until) = forbidden
                .get(pod)?
                .iter()
                .find(|(from, until)| c.start > *from && until.is_none_or(|u| c.start < u))?;
            Some(format!(
                "pod{pod}: connect at {:.3?}, its removal seen applied at {:.3?}, re-added at {:?}",
                c.start.duration_since(load_start),
                from.duration_since(load_start),
                until.map(|u| u.duration_since(load_start)),
            ))
        })
        .collect();
    let mut per_pod = vec![0u64; PODS];
    for c in &conns {
        if let Ok(p) = c.answer {
            if let Some(n) = per_pod.get_mut(p) {
                *n += 1;
            }
        }
    }
    apply_times.sort();
    let pct = |q: usize| apply_times.get(apply_times.len() * q / 100).copied();
    println!(
        "RELIABILITY endpoint churn under TCP_CRR: seed={seed} pods={PODS} endpoints={IN_SERVICE} \
         writes={} changes={} (removals={removed} additions={added}, {} per write) \
         churn_time={churn:.1?} write_to_sync_p50={:?} p99={:?} \
         slowest_manifest_write={slowest_write:?} connections={} \
         conn_per_s={:.0} failures={} late_to_removed={} pods_that_answered={} setup={setup:.1?} \
         took={:.1?}",
        write_times.len(),
        removed + added,
        2 * SWAP,
        pct(50),
        pct(99),
        conns.len(),
        conns.len() as f64 / load_start.elapsed().as_secs_f64(),
        failures.len(),
        late.len(),
        per_pod.iter().filter(|&&n| n > 0).count(),
        started.elapsed(),
    );
    let ct = dp.conntrack_established().map(|v| v.len()).unwrap_or(0);
    let ct_syn = dp.conntrack_half_open().map(|v| v.len()).unwrap_or(0);
    println!(
        "RELIABILITY endpoint churn: conntrack entries established={ct} half_open={ct_syn}; \
         datapath counters {counters:?}"
    );
    assert_eq!(removed + added, CHANGES);
    // The agent's conntrack GC runs (its log has UTC times), to set beside the failures.
    let gc_runs: Vec<String> = agent
        .proc
        .log()
        .lines()
        .filter(|l| l.contains("conntrack GC"))
        .map(str::to_owned)
        .collect();
    assert!(
        failures.is_empty(),
        "{} failed connections, first: {:#?}\nconntrack GC runs of the agent: {gc_runs:#?}",
        failures.len(),
        &failures[..failures.len().min(20)]
    );
    assert!(
        late.is_empty(),
        "{} new connections reached a removed backend after its removal was applied, first: {:#?}",
        late.len(),
        &late[..late.len().min(20)]
    );
    assert_eq!(in_maps, want, "the maps hold the final endpoints");
    assert!(
        conns.len() >= 1_000,
        "only {} connections: not much of a load",
        conns.len()
    );
}

/// Upstream: "should be able to preserve UDP traffic when server pod cycles for a NodePort
/// service" (conntrack.go; kubernetes issue #48370, stale UDP conntrack entries). A client
/// sends a datagram every 100 ms from one socket (the same source port throughout) to a
/// NodePort whose only endpoint is pod A; the endpoint is switched to pod B while A keeps
/// running. Within 2 s of the manifest write the replies come from B, and only from B.
#[test]
fn should_be_able_to_preserve_udp_traffic_when_server_pod_cycles_for_a_nodeport_service() {
    const EVERY: Duration = Duration::from_millis(100);
    let started = Instant::now();
    let (lab, pins, manifests) = lab("rel-udp", 2, &[0]);
    let agent = start_agent(&lab, &pins, manifests.path());
    wait_serving(&lab, &agent);
    let sock = lab
        .client
        .enter(|| -> std::io::Result<UdpSocket> {
            let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
            s.connect(np(UDP_NP))?;
            Ok(s)
        })
        .expect("UDP socket in the client namespace");
    let port = sock.local_addr().expect("local addr").port();

    // Sends datagram `seq`, then collects replies until the next tick: (seq, pod, when).
    let mut seq = 0u64;
    let mut tick = |replies: &mut Vec<(u64, String, Instant)>| {
        seq += 1;
        let due = Instant::now() + EVERY;
        sock.send(format!("seq{seq}").as_bytes()).expect("send");
        let mut buf = [0u8; 512];
        while let Some(left) = due.checked_duration_since(Instant::now()) {
            sock.set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .expect("timeout");
            match sock.recv(&mut buf) {
                Ok(n) => {
                    let r = String::from_utf8_lossy(&buf[..n]).to_string();
                    let (pod, s) = r.split_once(":seq").unwrap_or(("?", "0"));
                    replies.push((s.parse().unwrap_or(0), pod.to_string(), Instant::now()));
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => {
                    // An ICMP error (e.g. port unreachable) surfaces on a connected socket.
                    replies.push((0, format!("error: {e}"), Instant::now()));
                }
            }
        }
        seq
    };

    // The flow is established on A: 10 datagrams in a row answered by pod0.
    let mut replies = Vec::new();
    for _ in 0..10 {
        tick(&mut replies);
    }
    assert!(
        replies.len() == 10 && replies.iter().all(|(_, p, _)| p == "pod0"),
        "before the switch every datagram is answered by pod0: {:?}",
        replies.iter().map(|(s, p, _)| (s, p)).collect::<Vec<_>>()
    );

    // Switch the only endpoint to B; A keeps running.
    let syncs = sync_lines(&agent.proc.log()).len();
    replies.clear();
    let switched = Instant::now();
    write_web(manifests.path(), &[1]);
    let mut synced = None;
    let mut first_b = None;
    let mut first_seq_after = None;
    // Bounded: 10 s; once B answered, 1 s more to see that A never answers again.
    while switched.elapsed() < Duration::from_secs(10) {
        let s = tick(&mut replies);
        first_seq_after.get_or_insert(s);
        if synced.is_none() && sync_lines(&agent.proc.log()).len() > syncs {
            synced = Some(switched.elapsed());
        }
        if first_b.is_none() {
            first_b = replies
                .iter()
                .find(|(_, p, _)| p == "pod1")
                .map(|(_, _, t)| t.duration_since(switched));
        }
        if first_b.is_some_and(|t| switched.elapsed() > t + Duration::from_secs(1)) {
            break;
        }
    }
    let took = first_b.unwrap_or(Duration::MAX);
    let from_a_after_b: Vec<u64> = match first_b {
        Some(t) => replies
            .iter()
            .filter(|(_, p, at)| p != "pod1" && at.duration_since(switched) > t)
            .map(|(s, _, _)| *s)
            .collect(),
        None => Vec::new(),
    };
    let lost = replies
        .iter()
        .filter(|(_, p, _)| p.starts_with("error"))
        .count();
    println!(
        "RELIABILITY UDP backend swap: source_port={port} interval={EVERY:?} \
         agent_synced_after={synced:?} first_reply_from_new_backend_after={first_b:?} \
         replies_from_old_backend_after_that={} errors={lost} took={:.1?}",
        from_a_after_b.len(),
        started.elapsed()
    );
    assert!(
        took <= Duration::from_secs(2),
        "replies must come from pod1 within 2 s of the switch, first after {first_b:?}; \
         replies: {:?}; agent log:\n{}",
        replies.iter().map(|(s, p, _)| (s, p)).collect::<Vec<_>>(),
        agent.proc.log()
    );
    assert!(
        from_a_after_b.is_empty(),
        "pod0 answered datagrams {from_a_after_b:?} after pod1 took the flow"
    );
    assert_eq!(lost, 0, "no errors on the socket: {replies:?}");
}

/// A TCP socket in the calling thread's namespace, bound to `0.0.0.0:port` (SO_REUSEADDR),
/// connected to `to`: a client that reuses one source port on purpose.
fn connect_from(port: u16, to: SocketAddrV4) -> std::io::Result<std::net::TcpStream> {
    use std::os::fd::FromRawFd as _;
    let sin = |a: SocketAddrV4| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket(2); the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket nobody else owns; the stream closes it on drop.
    let stream = unsafe { std::net::TcpStream::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    let local = sin(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port));
    let remote = sin(to);
    // SAFETY: valid pointers and lengths for each call; `fd` is open.
    let failed = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        ) != 0
            || libc::bind(fd, (&local as *const libc::sockaddr_in).cast(), len) != 0
            || libc::connect(fd, (&remote as *const libc::sockaddr_in).cast(), len) != 0
    };
    if failed {
        return Err(std::io::Error::last_os_error());
    }
    stream.set_read_timeout(Some(T))?;
    stream.set_write_timeout(Some(T))?;
    Ok(stream)
}

/// Sends `GET /` on `c` and reads the response to its end: the body (the pod's name).
fn get_on(mut c: std::net::TcpStream) -> Result<String, String> {
    use std::io::{Read as _, Write as _};
    c.write_all(b"GET / HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut raw = Vec::new();
    c.take(64 * 1024)
        .read_to_end(&mut raw)
        .map_err(|e| format!("read: {e}"))?;
    lb_testkit::lab::client::parse_response(&raw).map(|r| r.body.trim().to_string())
}

/// The conntrack GC race that the churn test above hit once (1 failed connection in about
/// 2.5 million), replayed step by step with the GC's own pieces (`lb_agent::ct_gc`,
/// `lb_agent::bpfsys`): the GC reads `LB4_CT`, picks the expired entries, and deletes their
/// keys some milliseconds later (one collection of 28k entries took 22-81 ms here). A
/// client that reuses the source port of an expired flow within that window gets new
/// entries under the same keys, and the GC deletes them: the established connection loses
/// its conntrack entries. Its next packet picks a backend afresh (here another pod, as the
/// endpoint changed meanwhile, which an established flow must survive) and is reset, or
/// the backend's reply leaves without reverse NAT.
///
/// It runs `lb_agent::ct_gc::collect` in its two phases (`scan`, then `delete_expired`)
/// with the new connection in between. Fixed: `delete_expired` reads each entry again just
/// before deleting it, so the new flow's fresh entries stay and the connection keeps pod0.
/// (With the raw batch delete of the scanned keys, this test failed.)
#[test]
fn conntrack_gc_must_not_delete_a_new_flow_that_reuses_an_expired_tuple() {
    const PORT: u16 = 40_123;
    let (lab, pins, manifests) = lab("rel-gc-race", 2, &[0]);
    // The GC is off (this test plays it); closed flows expire after 1 s.
    let agent = lb_testkit::agent::start_agent_with(
        &lab,
        &pins,
        manifests.path(),
        &["--ct-gc-interval", "0s", "--ct-timeout-tcp-fin", "1s"],
    );
    wait_serving(&lab, &agent);
    let first = lab
        .client
        .enter(|| connect_from(PORT, np(HTTP_NP)))
        .expect("first connection");
    assert_eq!(get_on(first).as_deref(), Ok("pod0"));
    // Its entries are CLOSING; after 2.5 s they are expired.
    std::thread::sleep(Duration::from_millis(2500));

    // The GC, first phase: read the maps, choose the expired keys.
    let layout = PinLayout::new(pins.path());
    let cfg = lb_common::LbConfig {
        ct_timeout_tcp_fin_s: 1,
        ..lb_common::LbConfig::default()
    };
    let scan = lb_agent::ct_gc::scan(&layout, &cfg).expect("GC scan");
    assert!(
        scan.expired.iter().flat_map(|(_, k)| k).any(|k| {
            k.dir == lb_common::conntrack::CT_FORWARD && u16::from_be(k.sport) == PORT
        }),
        "the first flow's entries are expired: {scan:?}"
    );

    // Meanwhile: a new connection from the same client port, established on pod0...
    let second = lab
        .client
        .enter(|| connect_from(PORT, np(HTTP_NP)))
        .expect("second connection");
    // ...and the Service's endpoint moves to pod1 (an established flow keeps pod0).
    let syncs = sync_lines(&agent.proc.log()).len();
    write_web(manifests.path(), &[1]);
    let t = Instant::now();
    while sync_lines(&agent.proc.log()).len() <= syncs {
        assert!(t.elapsed() < Duration::from_secs(10), "no sync within 10 s");
        std::thread::sleep(Duration::from_millis(10));
    }

    // The GC, second phase: delete what is still expired.
    let deleted = lb_agent::ct_gc::delete_expired(&layout, &cfg, &scan).expect("GC delete");
    let ct_now = ct_entries_of(
        &BpfDataplane::open(&layout).expect("open pinned maps"),
        PORT,
    );
    let answer = get_on(second);
    println!(
        "RELIABILITY conntrack GC race: deleted={deleted} entries of port {PORT} after the \
         delete: {ct_now:?}; the established connection got {answer:?}"
    );
    assert_eq!(
        answer.as_deref(),
        Ok("pod0"),
        "the GC deleted the entries of a live flow that reused an expired flow's tuple"
    );
}
