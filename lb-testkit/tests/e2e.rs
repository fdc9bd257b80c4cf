//! End-to-end datapath tests over a real netns topology: a client, a node running the real
//! `lb-agent` (XDP on its uplink, TC egress), and two pods running real servers. Traffic is
//! real HTTP/TCP/UDP through the kernel; every case checks payloads and the datapath's
//! counters (the lab disables TX checksum offload, so receivers verify every checksum).
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use lb_agent::{
    dataplane::{BpfDataplane, Dataplane as _},
    loader::PinLayout,
};
use lb_common::Reason;
use lb_testkit::{
    agent::{
        node_yaml, pod_yaml, service_yaml, start_agent, write_manifest, Endpoint, ManifestDir,
        SvcPort, NODE_NAME,
    },
    bpffs::PinDir,
    lab::{http_get, pod_ip, udp_request, Lab, LabConfig, LineConn, NODE_IP},
};

const T: Duration = Duration::from_secs(3);
const SVC_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

fn np(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(NODE_IP, port)
}

fn web_ports() -> Vec<SvcPort> {
    vec![
        SvcPort {
            name: "http",
            proto: "TCP",
            port: 80,
            target: 80,
            node_port: Some(30001),
        },
        SvcPort {
            name: "dns",
            proto: "UDP",
            port: 53,
            target: 53,
            node_port: Some(30053),
        },
        SvcPort {
            name: "line",
            proto: "TCP",
            port: 9000,
            target: 9000,
            node_port: Some(30900),
        },
    ]
}

fn endpoints(pods: &[usize]) -> Vec<Endpoint> {
    pods.iter()
        .map(|i| Endpoint {
            ip: pod_ip(*i),
            ready: true,
            node: NODE_NAME,
        })
        .collect()
}

/// The web Service (web.yaml) with endpoints on `pods`.
fn write_web(dir: &std::path::Path, pods: &[usize]) {
    let svc = service_yaml(
        "web",
        "NodePort",
        SVC_IP,
        false,
        &web_ports(),
        &endpoints(pods),
    );
    write_manifest(dir, "web.yaml", &[svc]);
}

/// The web Service over `pods`, the node, and pod0 with hostPorts 8000->80 and 44300->443.
fn write_objects(dir: &std::path::Path, pods: &[usize]) {
    write_manifest(dir, "node.yaml", &[node_yaml(NODE_NAME, NODE_IP)]);
    write_web(dir, pods);
    write_manifest(
        dir,
        "pods.yaml",
        &[pod_yaml(
            "pod0",
            pod_ip(0),
            NODE_NAME,
            false,
            &[(80, 8000, "TCP"), (443, 44300, "TCP")],
        )],
    );
}

/// A lab with servers in both pods, a pin dir, and manifests for the web Service over both.
fn lab_with_web(what: &str) -> (Lab, PinDir, ManifestDir) {
    let mut lab = Lab::new(LabConfig { pods: 2 });
    lab.wait_reachable();
    lab.start_pod_servers(&[80, 443], &[53], &[9000]);
    let manifests = ManifestDir::new(what);
    write_objects(manifests.path(), &[0, 1]);
    (lab, PinDir::new(what), manifests)
}

struct Env {
    lab: Lab,
    pins: PinDir,
    manifests: ManifestDir,
    agent: Option<lb_testkit::agent::Agent>,
}

impl Env {
    fn new(what: &str) -> Self {
        Self::with_args(what, &[])
    }

    /// The lab, the web Service over both pods, and an agent started with `extra` args.
    fn with_args(what: &str, extra: &[&str]) -> Self {
        let (lab, pins, manifests) = lab_with_web(what);
        let agent = Some(lb_testkit::agent::start_agent_with(
            &lab,
            &pins,
            manifests.path(),
            extra,
        ));
        let env = Self {
            lab,
            pins,
            manifests,
            agent,
        };
        env.wait_for(|| env.http(np(30001)).is_ok(), "the NodePort to answer");
        env
    }

    fn http(&self, to: SocketAddrV4) -> std::io::Result<String> {
        self.lab
            .client
            .enter(move || http_get(to, "/", T))
            .map(|s| s.trim().to_string())
    }

    fn wait_for(&self, mut f: impl FnMut() -> bool, what: &str) {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if f() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "timed out waiting for {what}; agent log:\n{}",
            self.agent
                .as_ref()
                .map(|a| a.proc.log())
                .unwrap_or_default()
        );
    }

    fn stats(&self) -> BTreeMap<Reason, (u64, u64)> {
        let dp = BpfDataplane::open(&PinLayout::new(self.pins.path())).expect("open pinned maps");
        dp.stats()
            .expect("stats")
            .into_iter()
            .map(|(r, c)| (r, (c.packets, c.bytes)))
            .collect()
    }

    fn count(&self, r: Reason) -> u64 {
        self.stats().get(&r).map_or(0, |c| c.0)
    }
}

/// No drop of any kind happened: every datapath test checks this too.
fn assert_no_drops(env: &Env) {
    for (r, (p, _)) in env.stats() {
        assert!(
            !r.is_drop() || p == 0,
            "unexpected drops: {} = {p}",
            r.name()
        );
    }
}

#[test]
fn nodeport_http_udp_and_spread() {
    let env = Env::new("e2e-np");
    // One HTTP request: the body names the pod that answered.
    let body = env.http(np(30001)).expect("HTTP via NodePort");
    assert!(body == "pod0" || body == "pod1", "unexpected body {body:?}");

    // 200 new connections spread over both backends.
    let before_new = env.count(Reason::XdpFwdNewFlow);
    let before_rev = env.count(Reason::TcRevNat);
    let mut per_pod = BTreeMap::new();
    for _ in 0..200 {
        let b = env.http(np(30001)).expect("HTTP via NodePort");
        *per_pod.entry(b).or_insert(0u32) += 1;
    }
    assert_eq!(
        per_pod.keys().cloned().collect::<Vec<_>>(),
        vec!["pod0".to_string(), "pod1".to_string()],
        "{per_pod:?}"
    );
    for (pod, n) in &per_pod {
        assert!(
            *n >= 50,
            "{pod} got only {n} of 200 connections: {per_pod:?}"
        );
    }
    assert!(
        env.count(Reason::XdpFwdNewFlow) - before_new >= 200,
        "each connection is a new flow"
    );
    assert!(
        env.count(Reason::TcRevNat) - before_rev >= 400,
        "SYN-ACK, data and FIN replies are reverse-NATed"
    );

    // UDP through a NodePort: a connected socket only accepts the reply if its source was
    // restored to the NodePort address.
    let before_udp = env.count(Reason::XdpFwdNewFlow);
    let reply = env
        .lab
        .client
        .enter(|| udp_request(np(30053), b"ping", T))
        .expect("UDP via NodePort");
    let reply = String::from_utf8_lossy(&reply).to_string();
    assert!(
        reply == "pod0:ping" || reply == "pod1:ping",
        "unexpected UDP reply {reply:?}"
    );
    assert_eq!(env.count(Reason::XdpFwdNewFlow) - before_udp, 1);
    assert_no_drops(&env);
}

#[test]
fn hostports_and_untouched_node_ports() {
    let mut env = Env::new("e2e-hp");
    // Two hostPorts on one pod.
    assert_eq!(env.http(np(8000)).expect("hostPort 8000"), "pod0");
    assert_eq!(env.http(np(44300)).expect("hostPort 44300"), "pod0");

    // A port that is no service still reaches a server on the node itself, untouched.
    let bin = lb_testkit::lab::podserver_bin();
    let node_srv = env.lab.node.spawn(&[
        bin.to_str().expect("path"),
        "--name",
        "node",
        "--http",
        "8080",
    ]);
    node_srv
        .wait_for_log("ready", T)
        .expect("node server ready");
    env.lab.adopt("node-server", node_srv);
    let before = env.count(Reason::XdpPassNotService);
    assert_eq!(env.http(np(8080)).expect("node-local server"), "node");
    assert!(
        env.count(Reason::XdpPassNotService) > before,
        "counted as not-a-service"
    );

    // The client can still reach a pod directly, without NAT (no reverse NAT on its replies).
    let before_rev = env.count(Reason::TcRevNat);
    let direct = env
        .http(SocketAddrV4::new(pod_ip(1), 80))
        .expect("direct to pod1");
    assert_eq!(direct, "pod1");
    assert_eq!(
        env.count(Reason::TcRevNat),
        before_rev,
        "direct traffic is not reverse-NATed"
    );
    assert_no_drops(&env);
    env.agent.take();
}

#[test]
fn removed_backend_keeps_established_flows() {
    let env = Env::new("e2e-rm");
    // Established connections (sockets keep their namespace, so they are used from here).
    let mut conns = Vec::new();
    for i in 0..8 {
        let mut c = env
            .lab
            .client
            .enter(|| LineConn::connect(np(30900), T))
            .expect("connect");
        let reply = c.request(&format!("hello{i}")).expect("line request");
        let pod = reply.split(':').next().unwrap_or_default().to_string();
        conns.push((c, pod));
    }
    let victim = conns[0].1.clone();
    let (keep, other) = if victim == "pod0" {
        (1, "pod1")
    } else {
        (0, "pod0")
    };
    // A malformed file beside them is reported by name and keeps nothing else from applying.
    std::fs::write(
        env.manifests.path().join("broken.yaml"),
        "kind: [unclosed\n",
    )
    .expect("write broken.yaml");
    write_web(env.manifests.path(), &[keep]);
    // New connections stop reaching the victim within 2 s of the edit (the agent polls the
    // directory every 250 ms): from the switch on, 20 new connections in a row go elsewhere.
    let start = Instant::now();
    let mut switched_at = None;
    let mut streak = 0;
    while streak < 20 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "new flows still reach {victim} 5 s after its removal"
        );
        let sent = start.elapsed();
        let b = env.http(np(30001)).expect("HTTP after removal");
        if b == other {
            switched_at.get_or_insert(sent);
            streak += 1;
        } else {
            switched_at = None;
            streak = 0;
        }
    }
    let switched_at = switched_at.unwrap_or_default();
    assert!(
        switched_at < Duration::from_secs(2),
        "new flows left {victim} only after {switched_at:?}"
    );
    println!("new flows left the removed backend {switched_at:?} after the manifest edit");
    let agent = env.agent.as_ref().expect("the agent runs");
    agent
        .proc
        .wait_for_log(
            "manifests: broken.yaml document 1: invalid YAML",
            Duration::from_secs(5),
        )
        .unwrap_or_else(|e| {
            panic!(
                "the malformed file is not reported: {e}\n{}",
                agent.proc.log()
            )
        });
    // Every established connection still works, including those on the removed backend.
    for (mut c, pod) in conns {
        let reply = c.request("again").expect("established connection survives");
        assert_eq!(reply, format!("{pod}:again"));
    }
    assert_no_drops(&env);
}

/// `n` connections to the line server's NodePort, each with its first request answered,
/// with the pod that answered.
fn open_conns(env: &Env, n: usize) -> Vec<(LineConn, String)> {
    (0..n)
        .map(|i| {
            let mut c = env
                .lab
                .client
                .enter(|| LineConn::connect(np(30900), T))
                .expect("connect");
            let r = c.request(&format!("one{i}")).expect("first request");
            let pod = r.split(':').next().unwrap_or_default().to_string();
            (c, pod)
        })
        .collect()
}

/// One more request on every connection: each is answered by the pod that answered first.
fn ask_all(conns: &mut [(LineConn, String)], what: &str) {
    for (i, (c, pod)) in conns.iter_mut().enumerate() {
        let r = c
            .request(&format!("{what}{i}"))
            .unwrap_or_else(|e| panic!("connection {i} ({what}): {e}"));
        assert_eq!(
            r,
            format!("{pod}:{what}{i}"),
            "connection {i} changed backend"
        );
    }
}

#[test]
fn agent_restart_keeps_open_connections() {
    let mut env = Env::new("e2e-restart");
    // 200 open connections, each with its first request answered.
    let mut conns = open_conns(&env, 200);

    // SIGKILL the agent: the pinned links keep the programs attached.
    let mut agent = env.agent.take().expect("agent");
    agent.proc.kill();
    ask_all(&mut conns, "two");
    assert_eq!(
        env.http(np(30001)).map(|b| b.starts_with("pod")).ok(),
        Some(true),
        "new flows work with no agent"
    );

    // A new agent on the same pins takes over; every connection keeps working.
    env.agent = Some(start_agent(&env.lab, &env.pins, env.manifests.path()));
    ask_all(&mut conns, "three");
    assert!(env
        .http(np(30001))
        .expect("new flow after restart")
        .starts_with("pod"));
    // The restarted agent adopted the maps: nothing was torn down, nothing dropped.
    assert_no_drops(&env);
    let log = env.agent.as_ref().map(|a| a.proc.log()).unwrap_or_default();
    assert!(
        log.contains("(Replaced)"),
        "the restarted agent must swap programs in the pinned links:\n{log}"
    );
    assert!(
        log.contains("0 puts, 0 deletes"),
        "the restarted agent must find the maps already right:\n{log}"
    );
}

/// `lb-agent run --attach tc --latency-histogram`: the ingress program at TC ingress instead
/// of XDP, timed. NodePort HTTP to both pods, a hostPort and UDP work; packets for the pods
/// are handed straight to their namespaces (`tc_redirect_peer` counts each forwarded
/// packet); no XDP link is pinned. Then a restart with `--attach xdp` swaps hooks under open connections: they keep
/// working, and the links are the XDP ones.
#[test]
fn attach_tc_forwards_to_pods_with_redirect_peer_and_switches_hooks_on_restart() {
    let mut env = Env::with_args(
        "e2e-tc",
        &[
            "--attach",
            "tc",
            "--latency-histogram",
            "--metrics-addr",
            "127.0.0.1:9464",
        ],
    );
    let pins = PinLayout::new(env.pins.path());
    let uplink = lb_testkit::lab::NODE_UPLINK;
    assert!(
        pins.tc_ingress_link(uplink).exists(),
        "tc-ingress link pinned"
    );
    assert!(
        !pins.xdp_link(uplink).exists(),
        "no XDP link with --attach tc"
    );
    let log = env.agent.as_ref().map(|a| a.proc.log()).unwrap_or_default();
    assert!(log.contains("attached to up0 (TcIngress"), "{log}");
    assert!(
        log.contains("3 veth device(s) reachable with bpf_redirect_peer"),
        "the uplink and the two pod veths are listed:\n{log}"
    );

    let before = env.stats();
    let mut per_pod = BTreeMap::new();
    for _ in 0..100 {
        let b = env
            .http(np(30001))
            .expect("HTTP via NodePort (--attach tc)");
        *per_pod.entry(b).or_insert(0u32) += 1;
    }
    assert_eq!(per_pod.len(), 2, "both pods answer: {per_pod:?}");
    assert_eq!(
        env.http(np(8000)).expect("hostPort 8000 -> pod0:80"),
        "pod0"
    );
    let reply = env
        .lab
        .client
        .enter(|| udp_request(np(30053), b"ping", T))
        .expect("UDP via NodePort (--attach tc)");
    let reply = String::from_utf8_lossy(&reply).to_string();
    assert!(reply.ends_with(":ping"), "{reply:?}");
    let after = env.stats();
    let delta = |r: Reason| after.get(&r).map_or(0, |c| c.0) - before.get(&r).map_or(0, |c| c.0);
    let (new, tracked) = (delta(Reason::XdpFwdNewFlow), delta(Reason::XdpFwdTracked));
    assert!(new >= 102, "{new} new flows for 102 requests");
    assert!(
        tracked >= 200,
        "{tracked} tracked packets (ACK, data, FIN per connection)"
    );
    // Every DNATed packet went to its pod by bpf_redirect_peer, none through the stack.
    assert_eq!(
        delta(Reason::TcRedirectPeer),
        new + tracked,
        "every forwarded packet handed to its pod's namespace; other events: redirect {}, \
         neigh {}",
        delta(Reason::TcRedirect),
        delta(Reason::TcRedirectNeigh)
    );
    assert!(
        delta(Reason::TcRevNat) >= 300,
        "replies reverse-NATed by TC egress"
    );
    assert_no_drops(&env);
    let bin = lb_testkit::agent::workspace_bin("lb-agent");
    let status = |env: &Env| {
        env.lab.node.run(&[
            bin.to_str().expect("path"),
            "status",
            "--bpffs",
            env.pins.path().to_str().expect("path"),
        ])
    };
    let table = status(&env);
    assert!(table.contains("INTERFACES: up0 (tc)"), "{table}");
    // The counter row shows what the map counted (every reason has a row, zero or not).
    let peer_row = format!("event {}", env.count(Reason::TcRedirectPeer));
    assert!(
        table.lines().any(|l| l.starts_with("tc_redirect_peer")
            && l.split_whitespace()
                .skip(1)
                .collect::<Vec<_>>()
                .join(" ")
                .starts_with(&peer_row)),
        "status shows tc_redirect_peer {peer_row}:\n{table}"
    );
    // --latency-histogram at TC ingress: the ingress histogram timed every forwarded packet.
    assert!(table.contains("DATAPATH RUN TIME"), "{table}");
    let json: serde_json::Value = serde_json::from_str(&env.lab.node.run(&[
        bin.to_str().expect("path"),
        "status",
        "-o",
        "json",
        "--bpffs",
        env.pins.path().to_str().expect("path"),
    ]))
    .expect("status -o json");
    let runs: u64 = json["latency_ns_log2_buckets"]["xdp"]
        .as_array()
        .expect("ingress histogram")
        .iter()
        .filter_map(serde_json::Value::as_u64)
        .sum();
    assert!(
        runs >= new + tracked,
        "{runs} ingress runs timed, {} forwarded",
        new + tracked
    );
    let body = lb_testkit::agent::scrape(&env.lab.node, 9464);
    let count =
        lb_testkit::agent::metric(&body, "lb_datapath_run_duration_ns_count{prog=\"xdp\"} ");
    assert_eq!(
        count, runs,
        "/metrics exports the ingress histogram that status shows"
    );
    println!("{table}");
    for line in body
        .lines()
        .filter(|l| l.starts_with("lb_datapath_run_duration_ns"))
    {
        println!("{line}");
    }

    // Switch hooks on a restart, under open connections.
    let mut conns = open_conns(&env, 20);
    let mut agent = env.agent.take().expect("agent");
    agent.proc.kill();
    env.agent = Some(lb_testkit::agent::start_agent_with(
        &env.lab,
        &env.pins,
        env.manifests.path(),
        &["--attach", "xdp"],
    ));
    assert!(
        pins.xdp_link(uplink).exists(),
        "XDP link pinned after the switch"
    );
    assert!(
        !pins.tc_ingress_link(uplink).exists(),
        "the tc-ingress link is gone after the switch"
    );
    let xdp_before = env.count(Reason::XdpFwdTracked);
    let peer_before = env.count(Reason::TcRedirectPeer);
    ask_all(&mut conns, "two");
    assert!(env.count(Reason::XdpFwdTracked) - xdp_before >= 20);
    assert_eq!(
        env.count(Reason::TcRedirectPeer),
        peer_before,
        "TC ingress no longer runs"
    );
    assert_no_drops(&env);
    let table = status(&env);
    assert!(table.contains("INTERFACES: up0 (xdp)"), "{table}");
}

#[test]
fn metrics_and_status_report_what_the_datapath_did() {
    let env = Env::with_args("e2e-metrics", &["--metrics-addr", "127.0.0.1:9464"]);
    let (lab, pins) = (&env.lab, &env.pins);
    for _ in 0..5 {
        let b = lab
            .client
            .enter(|| http_get(np(30001), "/", T))
            .expect("HTTP via NodePort");
        assert!(b.starts_with("pod"));
    }
    // The maps answer as soon as the first pass has written them; the pass publishes its
    // metrics a moment later (at the latest one control tick, 200 ms, later): scrape until
    // the pass is counted, for at most 10 s.
    let scrape = || {
        lab.node
            .enter(|| http_get(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9464), "/metrics", T))
            .expect("GET /metrics")
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut metrics = scrape();
    while !metrics
        .lines()
        .any(|l| l.starts_with("lb_sync_duration_seconds_count ") && !l.ends_with(" 0"))
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
        metrics = scrape();
    }
    let value = |prefix: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no metric {prefix} in:\n{metrics}"))
    };
    assert!(value("lb_sync_duration_seconds_count") >= 1.0);
    assert_eq!(value("lb_sync_failed_updates_total"), 0.0);
    // 3 ports x (ClusterIP + NodePort) with 2 slots each, and 2 hostPorts with 1 slot each:
    // 8 master entries and 14 slots.
    assert_eq!(value("lb_map_entries{map=\"LB4_SERVICES_V1\"}"), 22.0);
    assert!(value("lb_datapath_packets_total{reason=\"xdp_fwd_new_flow\"}") >= 5.0);
    assert!(value("lb_datapath_packets_total{reason=\"tc_revnat\"}") >= 10.0);
    assert!(
        value("lb_service_packets_total{frontend=\"*:30001/TCP\",service=\"default/web:http\"}")
            >= 25.0
    );
    assert!(
        value("lb_service_bytes_total{frontend=\"*:30001/TCP\",service=\"default/web:http\"}")
            > 1000.0
    );

    let bin = lb_testkit::agent::workspace_bin("lb-agent");
    let json = lab.node.run(&[
        bin.to_str().expect("path"),
        "status",
        "-o",
        "json",
        "--bpffs",
        pins.path().to_str().expect("path"),
    ]);
    let v: serde_json::Value = serde_json::from_str(&json).expect("status -o json is JSON");
    assert_eq!(v["interfaces"], serde_json::json!(["up0"]));
    assert_eq!(v["ingress_hooks"], serde_json::json!({"up0": "xdp"}));
    assert_eq!(v["node_addrs"], serde_json::json!(["10.200.0.1"]));
    let fe = v["frontends"]
        .as_array()
        .expect("frontends")
        .iter()
        .find(|f| f["frontend"] == "*:30001/TCP")
        .expect("NodePort 30001 listed");
    assert_eq!(
        fe["backends"],
        serde_json::json!(["10.244.0.10:80", "10.244.0.11:80"])
    );
    assert!(fe["packets"].as_u64().unwrap_or(0) >= 25);
    let table = lab.node.run(&[
        bin.to_str().expect("path"),
        "status",
        "--bpffs",
        pins.path().to_str().expect("path"),
    ]);
    assert!(
        table.lines().any(|l| l.starts_with("*:8000/TCP")
            && l.contains("HostPort")
            && l.contains("10.244.0.10:80")),
        "{table}"
    );
}

#[test]
fn a_full_service_map_is_retried_logged_and_counted_without_crashing() {
    // 22 entries wanted, 10 fit: some frontends never sync, so don't wait for the NodePort.
    let (lab, pins, manifests) = lab_with_web("e2e-full");
    let agent = lb_testkit::agent::start_agent_with(
        &lab,
        &pins,
        manifests.path(),
        &["--services-size", "10", "--metrics-addr", "127.0.0.1:9464"],
    );
    // The agent retries with backoff: the failures keep being counted, the process lives on.
    let start = Instant::now();
    let failed = loop {
        let m = lab
            .node
            .enter(|| http_get(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9464), "/metrics", T))
            .expect("GET /metrics");
        let failed: f64 = m
            .lines()
            .find_map(|l| l.strip_prefix("lb_sync_failed_updates_total "))
            .and_then(|v| v.parse().ok())
            .expect("failed-updates metric");
        // The metric is recorded before the retry is logged, and the log is read from the
        // agent's output by another thread: wait for both.
        let logged = agent.proc.log().contains("retrying failed entries");
        if (failed >= 2.0 && logged) || start.elapsed() > Duration::from_secs(5) {
            break failed;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        failed >= 2.0,
        "failures are retried and counted, got {failed}"
    );
    let log = agent.proc.log();
    assert!(
        log.contains("LB4_SERVICES_V1 is full (10 entries)"),
        "the log names the full map:\n{log}"
    );
    assert!(log.contains("retrying failed entries"), "{log}");
    assert!(
        lb_testkit::lab::pid_alive(agent.proc.pid() as i32),
        "the agent keeps running:\n{log}"
    );
    // No frontend is half-applied: every master in the map has all its slots and backends.
    let dp = BpfDataplane::open(&PinLayout::new(pins.path())).expect("open maps");
    let services: BTreeMap<_, _> = dp.services().expect("services").into_iter().collect();
    let backends: BTreeMap<_, _> = dp.backends().expect("backends").into_iter().collect();
    for (k, v) in services.iter().filter(|(k, _)| k.slot == 0) {
        for s in 1..=v.count {
            let slot = services
                .get(&k.with_slot(s))
                .unwrap_or_else(|| panic!("{k:?} lacks slot {s}"));
            assert!(
                backends.contains_key(&slot.backend_id),
                "{k:?} slot {s} points at a missing backend"
            );
        }
    }
}

/// GET / from the client, bound to source port `sport` with SO_REUSEADDR (as the kernel's
/// own port choice may reuse a port whose earlier connection, to another destination, is in
/// TIME_WAIT). Python's socket module does the binding; the reply body, or why not.
fn get_from_port(env: &Env, sport: u16, to: SocketAddrV4) -> Result<String, String> {
    let code = format!(
        "import socket\n\
         s = socket.socket()\n\
         s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('', {sport}))\n\
         s.settimeout(3)\n\
         s.connect(('{}', {}))\n\
         s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n')\n\
         d = b''\n\
         while True:\n\
         \x20   c = s.recv(4096)\n\
         \x20   if not c: break\n\
         \x20   d += c\n\
         print(d.decode().split('\\r\\n\\r\\n')[-1].strip())\n",
        to.ip(),
        to.port()
    );
    env.lab.client.enter(|| {
        let out = std::process::Command::new("python3")
            .args(["-c", &code])
            .output()
            .map_err(|e| format!("python3: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    })
}

/// Known bug, found on 2026-12-02 (it made `attach_tc_…` fail once in CI): a client that
/// reaches one backend through two frontends from the same source port (the kernel reuses a
/// port for another destination) collides on the backend's side, where both connections are
/// client:port -> pod:80; the second times out while the first's TIME_WAIT lasts. Linux NAT
/// (kube-proxy) resolves such a clash by changing the source port; the datapath does not yet.
/// Run with `--ignored`: it fails until that is fixed.
#[test]
#[ignore = "known bug: backend tuple clash between two frontends of one backend"]
fn known_bug_source_port_reused_across_two_frontends_of_one_backend() {
    let env = Env::new("e2e-clash");
    let mut tried = 0;
    for sport in 41000..41100u16 {
        // The NodePort's connection must land on pod0, the hostPort's backend.
        if get_from_port(&env, sport, np(30001)).as_deref() != Ok("pod0") {
            continue;
        }
        assert_eq!(
            get_from_port(&env, sport, np(8000)),
            Ok("pod0".to_string()),
            "hostPort 8000 from source port {sport}, just used for the NodePort"
        );
        tried += 1;
        if tried == 3 {
            return;
        }
    }
    panic!("fewer than 3 NodePort connections reached pod0");
}
