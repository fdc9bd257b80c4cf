//! End-to-end tests in the multi-node lab (need root): one agent per node, all reading the
//! same cluster-wide manifests (every Node in one file), as a new user would set them up.
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;
use std::time::Duration;

use lb_testkit::agent::{
    node_yaml, service_yaml, start_agent_in, workspace_bin, write_manifest, Agent, Endpoint,
    ManifestDir, SvcPort,
};
use lb_testkit::bpffs::PinDir;
use lb_testkit::lab::{http_get, http_request, Cluster, Topology, CLIENT_IP};

const T: Duration = Duration::from_secs(3);
const HTTP: u16 = 8080;
const NODE_PORT: u16 = 30080;
const METRICS: u16 = 9464;
const HC_PORT: u16 = 32000;
const ONE_NODE_PORT: u16 = 30081;
const ONE_HC_PORT: u16 = 32001;
/// kube-proxy's node health port, the agent's default `--healthz-addr`.
const HEALTHZ: u16 = 10256;

/// Adds `healthCheckNodePort: PORT` to a Local Service's YAML.
fn with_health_check(yaml: String, port: u16) -> String {
    yaml.replacen(
        "  externalTrafficPolicy: Local\n",
        &format!("  externalTrafficPolicy: Local\n  healthCheckNodePort: {port}\n"),
        1,
    )
}

fn web_port(node_port: u16) -> SvcPort {
    SvcPort {
        name: "http",
        proto: "TCP",
        port: 80,
        target: HTTP,
        node_port: Some(node_port),
    }
}

fn podserver() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_lb-podserver"))
}

/// A node's `/metrics`, scraped from inside its namespace.
fn metrics_of(ns: &lb_testkit::lab::Netns) -> String {
    ns.enter(|| {
        http_get(
            SocketAddrV4::new(Ipv4Addr::LOCALHOST, METRICS),
            "/metrics",
            T,
        )
    })
    .expect("GET /metrics")
}

/// Node names of the two-node tests.
const NAMES: [&str; 2] = ["node0", "node1"];

/// `nodes.yaml`: every node of `cluster`, named as in [`NAMES`] (a cluster-wide dump).
fn write_nodes(cluster: &Cluster, dir: &Path) {
    let nodes: Vec<String> = cluster
        .nodes
        .iter()
        .zip(NAMES)
        .map(|(n, name)| node_yaml(name, n.ip))
        .collect();
    write_manifest(dir, "nodes.yaml", &nodes);
}

/// One ready endpoint per node: its first pod.
fn first_pods(cluster: &Cluster) -> Vec<Endpoint> {
    cluster
        .nodes
        .iter()
        .zip(NAMES)
        .map(|(n, name)| Endpoint {
            ip: n.pods[0].ip,
            ready: true,
            node: name,
        })
        .collect()
}

/// An agent per node (own pins, metrics on [`METRICS`]) reading `dir`, with `extra` flags.
fn start_agents(cluster: &Cluster, dir: &Path, extra: &[&str]) -> (Vec<PinDir>, Vec<Agent>) {
    let metrics_addr = format!("127.0.0.1:{METRICS}");
    let mut args = vec!["--metrics-addr", metrics_addr.as_str()];
    args.extend_from_slice(extra);
    let pins: Vec<PinDir> = NAMES.iter().map(|n| PinDir::new(n)).collect();
    let agents = cluster
        .nodes
        .iter()
        .zip(NAMES)
        .zip(&pins)
        .map(|((node, name), pins)| start_agent_in(&node.ns, name, pins, dir, &args))
        .collect();
    (pins, agents)
}

/// Upstream: "ESIPP [Slow] should work for type=NodePort" and "should only target nodes with
/// endpoints" (test/e2e/network/loadbalancer.go): externalTrafficPolicy Local on every node,
/// each node answering with its own endpoint and the client's own address kept, a node without
/// a local endpoint not answering, and the healthCheckNodePorts saying which is which. Before the agents read the whole Node list, the second
/// node's agent kept the first Node it read, had no node address and served no NodePort.
#[test]
fn esipp_should_work_for_type_nodeport_and_health_check_node_ports_on_every_node() {
    let mut cluster = Topology::new().nodes(2).pods_per_node(1).build();
    cluster.wait_reachable();
    cluster.start_pod_servers_with(podserver(), &[HTTP], &[], &[]);
    let dir = ManifestDir::new("multinode");
    write_nodes(&cluster, dir.path());
    let endpoints = first_pods(&cluster);
    let only_node0 = [Endpoint {
        ip: cluster.nodes[0].pods[0].ip,
        ready: true,
        node: NAMES[0],
    }];
    write_manifest(
        dir.path(),
        "web.yaml",
        &[
            with_health_check(
                service_yaml(
                    "web",
                    "NodePort",
                    Ipv4Addr::new(10, 96, 0, 80),
                    true,
                    &[web_port(NODE_PORT)],
                    &endpoints,
                ),
                HC_PORT,
            ),
            with_health_check(
                service_yaml(
                    "one",
                    "NodePort",
                    Ipv4Addr::new(10, 96, 0, 81),
                    true,
                    &[web_port(ONE_NODE_PORT)],
                    &only_node0,
                ),
                ONE_HC_PORT,
            ),
        ],
    );
    let (pins, agents) = start_agents(&cluster, dir.path(), &[]);

    for (node, agent) in cluster.nodes.iter().zip(&agents) {
        let log = agent.proc.log();
        assert!(!log.contains("keeping the first one"), "{log}");
        assert!(!log.contains("not found among"), "{log}");
        let metrics = metrics_of(&node.ns);
        assert!(
            metrics.contains("\nlb_node_found 1\n"),
            "{}: {metrics}",
            node.name
        );
        assert!(
            metrics.contains("\nlb_peer_nodes 1\n"),
            "{}: {metrics}",
            node.name
        );
    }
    for (i, node) in cluster.nodes.iter().enumerate() {
        let addrs = node.ns.run(&[
            workspace_bin("lb-agent").to_str().expect("utf-8 path"),
            "status",
            "--bpffs",
            pins[i].path().to_str().expect("utf-8 path"),
        ]);
        assert!(
            addrs.contains(&format!("NODE ADDRESSES: {}", node.ip)),
            "{}: {addrs}",
            node.name
        );
        // 20 connections through this node's NodePort: all answered by its own pod, which
        // sees the client's own address.
        let np = SocketAddrV4::new(node.ip, NODE_PORT);
        for _ in 0..20 {
            let resp = cluster
                .client
                .enter(|| http_request(np, "/", T))
                .unwrap_or_else(|e| panic!("GET http://{np}/: {e}"));
            assert_eq!(resp.status, 200);
            assert_eq!(resp.body, format!("{}\n", node.pods[0].name), "via {np}");
            let peer = resp.header("x-peer").unwrap_or_default();
            assert!(
                peer.starts_with(&format!("{CLIENT_IP}:")),
                "via {np}: pod saw {peer}"
            );
        }
    }

    // healthCheckNodePort, as kube-proxy serves it: 200 with the local endpoint count on a
    // node that has local endpoints, 503 on one that has none.
    let get = |addr: SocketAddrV4, path: &str| {
        cluster
            .client
            .enter(|| http_request(addr, path, T))
            .unwrap_or_else(|e| panic!("GET http://{addr}{path}: {e}"))
    };
    for (node, port, status, count, svc) in [
        (0, HC_PORT, 200, 1, "web"),
        (1, HC_PORT, 200, 1, "web"),
        (0, ONE_HC_PORT, 200, 1, "one"),
        (1, ONE_HC_PORT, 503, 0, "one"),
    ] {
        let addr = SocketAddrV4::new(cluster.nodes[node].ip, port);
        let resp = get(addr, "/");
        assert_eq!(resp.status, status, "{addr}: {}", resp.body);
        let want = format!(
            "{{\"localEndpoints\":{count},\"service\":{{\"name\":\"{svc}\",\"namespace\":\"default\"}},\"serviceProxyHealthy\":true}}"
        );
        assert_eq!(resp.body, want, "{addr}");
    }
    // The node without a local endpoint does not serve the Service at all.
    let np1 = SocketAddrV4::new(cluster.nodes[1].ip, ONE_NODE_PORT);
    let r = cluster
        .client
        .enter(|| http_request(np1, "/", Duration::from_millis(500)));
    assert!(r.is_err(), "{np1} must not answer: {r:?}");
    let np0 = SocketAddrV4::new(cluster.nodes[0].ip, ONE_NODE_PORT);
    assert_eq!(
        get(np0, "/").body,
        format!("{}\n", cluster.nodes[0].pods[0].name)
    );
    // The node-level health endpoints, like kube-proxy's :10256.
    for node in &cluster.nodes {
        for path in ["/healthz", "/livez"] {
            let resp = get(SocketAddrV4::new(node.ip, HEALTHZ), path);
            assert_eq!(resp.status, 200, "{} {path}: {}", node.name, resp.body);
            assert!(resp.body.contains("\"lastUpdated\":\"20"), "{}", resp.body);
        }
    }
    for node in &cluster.nodes {
        let metrics = metrics_of(&node.ns);
        assert!(
            metrics.contains("\nlb_health_check_node_ports 2\n"),
            "{metrics}"
        );
        assert!(
            metrics.contains("\nlb_health_check_bind_failures 0\n"),
            "{metrics}"
        );
    }
}

/// An agent whose own Node is missing from the Node list says so in its log and metrics,
/// and `status` warns, instead of silently serving NodePorts nowhere.
#[test]
fn a_missing_own_node_is_reported_not_silent() {
    let cluster = Topology::new().nodes(1).pods_per_node(0).build();
    let dir = ManifestDir::new("nonode");
    write_manifest(
        dir.path(),
        "nodes.yaml",
        &[node_yaml("node-a", Ipv4Addr::new(10, 200, 0, 99))],
    );
    let pins = PinDir::new("nonode");
    let node = &cluster.nodes[0];
    let metrics_addr = format!("127.0.0.1:{METRICS}");
    let agent = start_agent_in(
        &node.ns,
        "node0",
        &pins,
        dir.path(),
        &["--metrics-addr", &metrics_addr],
    );
    let log = agent.proc.log();
    assert!(
        log.contains("Node node0: this node's own Node object was not found among 1 Node(s)"),
        "{log}"
    );
    let metrics = metrics_of(&node.ns);
    assert!(metrics.contains("\nlb_node_found 0\n"), "{metrics}");
    let status = node.ns.run(&[
        workspace_bin("lb-agent").to_str().expect("utf-8 path"),
        "status",
        "--bpffs",
        pins.path().to_str().expect("utf-8 path"),
    ]);
    assert!(status.contains("NODE ADDRESSES: <none>"), "{status}");
    assert!(status.contains("warning: no node addresses"), "{status}");
}

/// Upstream: "should have session affinity work for NodePort service"
/// (test/e2e/network/service.go): 50 connections from different source ports all reach the
/// same pod; without affinity the same 50 spread over both.
#[test]
fn should_have_session_affinity_work_for_nodeport_service() {
    let mut cluster = Topology::new().nodes(1).pods_per_node(2).build();
    cluster.wait_reachable();
    cluster.start_pod_servers_with(podserver(), &[HTTP], &[], &[]);
    let node = &cluster.nodes[0];
    let dir = ManifestDir::new("affinity");
    write_manifest(dir.path(), "nodes.yaml", &[node_yaml("node0", node.ip)]);
    let endpoints: Vec<Endpoint> = node
        .pods
        .iter()
        .map(|p| Endpoint {
            ip: p.ip,
            ready: true,
            node: "node0",
        })
        .collect();
    let svc = |name: &str, node_port: u16, affinity: bool| {
        let yaml = service_yaml(
            name,
            "NodePort",
            Ipv4Addr::new(10, 96, 0, node_port as u8),
            false,
            &[web_port(node_port)],
            &endpoints,
        );
        if affinity {
            yaml.replacen(
                "  sessionAffinity: None\n",
                "  sessionAffinity: ClientIP\n",
                1,
            )
        } else {
            yaml
        }
    };
    write_manifest(
        dir.path(),
        "svcs.yaml",
        &[
            svc("sticky", NODE_PORT, true),
            svc("spread", ONE_NODE_PORT, false),
        ],
    );
    let pins = PinDir::new("affinity");
    let _agent = start_agent_in(&node.ns, "node0", &pins, dir.path(), &[]);
    let status = node.ns.run(&[
        workspace_bin("lb-agent").to_str().expect("utf-8 path"),
        "status",
        "--bpffs",
        pins.path().to_str().expect("utf-8 path"),
    ]);
    assert!(
        status.contains("NodePort, ClientIP affinity 10800s"),
        "{status}"
    );
    for (port, sticky) in [(NODE_PORT, true), (ONE_NODE_PORT, false)] {
        let np = SocketAddrV4::new(node.ip, port);
        let mut served = std::collections::BTreeMap::new();
        let mut peers = std::collections::BTreeSet::new();
        for _ in 0..50 {
            let resp = cluster
                .client
                .enter(|| http_request(np, "/", T))
                .unwrap_or_else(|e| panic!("GET http://{np}/: {e}"));
            *served.entry(resp.body.clone()).or_insert(0) += 1;
            peers.insert(resp.header("x-peer").unwrap_or_default().to_string());
        }
        assert_eq!(peers.len(), 50, "50 different source ports: {peers:?}");
        if sticky {
            assert_eq!(served.len(), 1, "affinity broken: {served:?}");
        } else {
            assert_eq!(
                served.len(),
                2,
                "no affinity, yet one pod took all: {served:?}"
            );
        }
    }
}

/// A datapath verdict counter from `/metrics`.
fn reason_count(metrics: &str, reason: &str) -> u64 {
    let prefix = format!("lb_datapath_packets_total{{reason=\"{reason}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Upstream: "should be able to create a functioning NodePort service" and "should be able to
/// switch session affinity for NodePort service" set-up (test/e2e/network/service.go), with
/// externalTrafficPolicy Cluster and one endpoint per node: through every node's NodePort,
/// 200 TCP connections each all succeed, both the local and the remote endpoint answer, the
/// remote one sees the asked node's address (SNAT) and the local one the client's; UDP reaches
/// the remote endpoint too. The translated packets leave from XDP (XDP_TX), counted.
#[test]
fn nodeport_cluster_policy_serves_local_and_remote_endpoints_through_snat() {
    const UDP: u16 = 5353;
    const UDP_NODE_PORT: u16 = 30083;
    let mut cluster = Topology::new().nodes(2).pods_per_node(1).build();
    cluster.wait_reachable();
    cluster.start_pod_servers_with(podserver(), &[HTTP], &[UDP], &[]);
    let dir = ManifestDir::new("snat");
    write_nodes(&cluster, dir.path());
    let endpoints = first_pods(&cluster);
    let ports = [
        web_port(NODE_PORT),
        SvcPort {
            name: "dns",
            proto: "UDP",
            port: 53,
            target: UDP,
            node_port: Some(UDP_NODE_PORT),
        },
    ];
    let yaml = service_yaml(
        "web",
        "NodePort",
        Ipv4Addr::new(10, 96, 0, 82),
        false,
        &ports,
        &endpoints,
    );
    write_manifest(dir.path(), "web.yaml", &[yaml]);
    let (_pins, _agents) = start_agents(&cluster, dir.path(), &[]);
    for (k, node) in cluster.nodes.iter().enumerate() {
        let np = SocketAddrV4::new(node.ip, NODE_PORT);
        let mut served = std::collections::BTreeMap::<String, usize>::new();
        for i in 0..200 {
            let resp = cluster
                .client
                .enter(|| http_request(np, "/", T))
                .unwrap_or_else(|e| {
                    let metrics = node.ns.enter(|| {
                        http_get(
                            SocketAddrV4::new(Ipv4Addr::LOCALHOST, METRICS),
                            "/metrics",
                            T,
                        )
                    });
                    let counters: Vec<String> = metrics
                        .unwrap_or_default()
                        .lines()
                        .filter(|l| l.starts_with("lb_datapath_packets") && !l.ends_with(" 0"))
                        .map(str::to_string)
                        .collect();
                    panic!("connection {i} via {np} failed: {e}\ncounters: {counters:#?}")
                });
            assert_eq!(resp.status, 200);
            let pod = resp.body.trim().to_string();
            let peer = resp.header("x-peer").unwrap_or_default().to_string();
            let local = pod == node.pods[0].name;
            let want = if local { CLIENT_IP } else { node.ip };
            assert!(
                peer.starts_with(&format!("{want}:")),
                "via {np}: {pod} saw {peer}, expected {want}"
            );
            *served.entry(pod).or_default() += 1;
        }
        assert_eq!(
            served.len(),
            2,
            "via {np}, not both endpoints answered: {served:?}"
        );
        // UDP: new flows (a new source port each) reach the remote endpoint too.
        let remote = &cluster.nodes[1 - k].pods[0].name;
        let udp_np = SocketAddrV4::new(node.ip, UDP_NODE_PORT);
        let mut remote_answers = 0;
        for i in 0..20 {
            let reply = cluster
                .client
                .enter(|| lb_testkit::lab::udp_request(udp_np, b"q", T))
                .unwrap_or_else(|e| panic!("UDP {i} via {udp_np}: {e}"));
            if reply == format!("{remote}:q").into_bytes() {
                remote_answers += 1;
            }
        }
        assert!(
            remote_answers > 0,
            "no UDP answer from {remote} via {udp_np}"
        );
        let metrics = metrics_of(&node.ns);
        for reason in ["xdp_snat_tx", "xdp_revsnat_tx"] {
            assert!(
                reason_count(&metrics, reason) > 0,
                "{}: no {reason}:\n{metrics}",
                node.name
            );
        }
        for reason in [
            "xdp_drop_snat_exhausted",
            "xdp_snat_pass",
            "xdp_revsnat_pass",
        ] {
            assert_eq!(reason_count(&metrics, reason), 0, "{}: {reason}", node.name);
        }
    }
}

const LINE: u16 = 7000;
const LINE_NODE_PORT: u16 = 30070;

/// Two nodes with one pod each (HTTP, and a line server for long-lived connections), a
/// cluster-wide dump, and an agent per node started with `extra` flags.
struct TwoNodes {
    cluster: Cluster,
    dir: ManifestDir,
    pins: Vec<PinDir>,
    agents: Vec<Agent>,
}

impl TwoNodes {
    /// `endpoints`: the nodes whose pod backs the Services; `lb_ip`: a LoadBalancer ingress IP.
    fn start(what: &str, endpoints: &[usize], lb_ip: Option<Ipv4Addr>, extra: &[&str]) -> Self {
        let mut cluster = Topology::new().nodes(2).pods_per_node(1).build();
        cluster.wait_reachable();
        cluster.start_pod_servers_with(podserver(), &[HTTP], &[], &[LINE]);
        let dir = ManifestDir::new(what);
        write_nodes(&cluster, dir.path());
        let mut env = TwoNodes {
            cluster,
            dir,
            pins: Vec::new(),
            agents: Vec::new(),
        };
        env.write_services(endpoints, lb_ip);
        (env.pins, env.agents) = start_agents(&env.cluster, env.dir.path(), extra);
        env
    }

    /// (Re)writes the Service `web` (HTTP and line ports) backed by the pods of `endpoints`.
    fn write_services(&self, endpoints: &[usize], lb_ip: Option<Ipv4Addr>) {
        let eps: Vec<Endpoint> = endpoints
            .iter()
            .map(|k| Endpoint {
                ip: self.cluster.nodes[*k].pods[0].ip,
                ready: true,
                node: NAMES[*k],
            })
            .collect();
        let ports = [
            web_port(NODE_PORT),
            SvcPort {
                name: "line",
                proto: "TCP",
                port: 7000,
                target: LINE,
                node_port: Some(LINE_NODE_PORT),
            },
        ];
        let (kind, ingress) = match lb_ip {
            Some(ip) => (
                "LoadBalancer",
                format!("status:\n  loadBalancer:\n    ingress:\n    - ip: {ip}\n"),
            ),
            None => ("NodePort", "status:\n  loadBalancer: {}\n".to_string()),
        };
        let yaml = service_yaml(
            "web",
            kind,
            Ipv4Addr::new(10, 96, 0, 90),
            false,
            &ports,
            &eps,
        )
        .replacen("status:\n  loadBalancer: {}\n", &ingress, 1);
        write_manifest(self.dir.path(), "web.yaml", &[yaml]);
    }

    fn metrics(&self, k: usize) -> String {
        metrics_of(&self.cluster.nodes[k].ns)
    }

    fn get(&self, addr: SocketAddrV4) -> std::io::Result<lb_testkit::lab::HttpResponse> {
        self.cluster.client.enter(|| http_request(addr, "/", T))
    }
}

/// Upstream: "should be able to create LoadBalancer Service without NodePort and change it"
/// and the ESIPP LoadBalancer cases (test/e2e/network/loadbalancer.go), as far as a lab
/// without a cloud load balancer goes: the ingress IP routed to node0 is served there, by
/// the local endpoint and, through SNAT, by the remote one.
#[test]
fn a_load_balancer_ingress_ip_routed_to_one_node_is_served() {
    let vip = Ipv4Addr::new(192, 0, 2, 80);
    let env = TwoNodes::start("lbip", &[0, 1], Some(vip), &[]);
    let node0 = env.cluster.nodes[0].ip.to_string();
    env.cluster
        .client
        .ip(&["route", "add", &format!("{vip}/32"), "via", &node0]);
    let mut served = std::collections::BTreeSet::new();
    for i in 0..40 {
        let resp = env
            .get(SocketAddrV4::new(vip, 80))
            .unwrap_or_else(|e| panic!("request {i} to {vip}:80: {e}"));
        assert_eq!(resp.status, 200);
        let pod = resp.body.trim().to_string();
        let peer = resp.header("x-peer").unwrap_or_default();
        let want = if pod == "node0-pod0" {
            CLIENT_IP.to_string()
        } else {
            node0.clone()
        };
        assert!(peer.starts_with(&format!("{want}:")), "{pod} saw {peer}");
        served.insert(pod);
    }
    assert_eq!(served.len(), 2, "{served:?}");
    let m = env.metrics(0);
    assert!(
        reason_count(&m, "xdp_snat_tx") > 0 && reason_count(&m, "xdp_revsnat_tx") > 0,
        "{m}"
    );
}

/// Upstream: "should be able to update service type to NodePort listening on same port
/// number but different protocols" is not datapath; this is kube-proxy's endpoint removal
/// contract: a remote backend is removed, new flows avoid it within 2 s, and an established
/// connection to the remaining (local) backend is unaffected.
#[test]
fn removing_a_remote_backend_moves_new_flows_within_2s_and_keeps_others() {
    let env = TwoNodes::start("rmremote", &[0, 1], None, &[]);
    let node0 = env.cluster.nodes[0].ip;
    // An established connection through node0 that landed on the local pod.
    let line_np = SocketAddrV4::new(node0, LINE_NODE_PORT);
    let mut local_conn = None;
    for _ in 0..40 {
        let mut c = env
            .cluster
            .client
            .enter(|| lb_testkit::lab::LineConn::connect(line_np, T))
            .expect("line connect");
        if c.request("hi")
            .expect("line request")
            .starts_with("node0-pod0:")
        {
            local_conn = Some(c);
            break;
        }
    }
    let mut local_conn = local_conn.expect("no connection landed on node0-pod0 in 40 tries");
    env.write_services(&[0], None);
    let removed_at = std::time::Instant::now();
    let np = SocketAddrV4::new(node0, NODE_PORT);
    // Wait (bounded) until 20 consecutive new flows avoid node1-pod0.
    let mut streak = 0;
    while streak < 20 {
        assert!(
            removed_at.elapsed() < Duration::from_secs(2) || streak > 0,
            "new flows still reach the removed backend after 2 s"
        );
        assert!(
            removed_at.elapsed() < Duration::from_secs(10),
            "never converged"
        );
        let body = env.get(np).expect("GET").body;
        streak = if body.trim() == "node0-pod0" {
            streak + 1
        } else {
            0
        };
    }
    let took = removed_at.elapsed();
    println!("new flows avoided the removed remote backend {took:?} after the manifest edit");
    for i in 0..10 {
        let r = local_conn
            .request(&format!("still {i}"))
            .expect("established connection broke");
        assert_eq!(r, format!("node0-pod0:still {i}"));
    }
}

/// `kill -9` of the agent with SNATed connections to a remote backend open: every one of
/// them keeps working while the agent is gone and after it restarts on the same pins.
#[test]
fn kill_9_of_an_agent_with_remote_flows_open_breaks_none() {
    let mut env = TwoNodes::start("kill9snat", &[1], None, &[]);
    let line_np = SocketAddrV4::new(env.cluster.nodes[0].ip, LINE_NODE_PORT);
    let mut conns: Vec<lb_testkit::lab::LineConn> = (0..50)
        .map(|_| {
            env.cluster
                .client
                .enter(|| lb_testkit::lab::LineConn::connect(line_np, T))
                .expect("line connect")
        })
        .collect();
    for c in &mut conns {
        assert_eq!(c.request("a").expect("request"), "node1-pod0:a");
    }
    let agent = env.agents.remove(0);
    let mut proc = agent.proc;
    proc.kill();
    for (i, c) in conns.iter_mut().enumerate() {
        let r = c
            .request("b")
            .unwrap_or_else(|e| panic!("connection {i} broke with the agent down: {e}"));
        assert_eq!(r, "node1-pod0:b");
    }
    let again = start_agent_in(
        &env.cluster.nodes[0].ns,
        NAMES[0],
        &env.pins[0],
        env.dir.path(),
        &[],
    );
    assert!(
        again.proc.log().contains("(Replaced)"),
        "{}",
        again.proc.log()
    );
    for (i, c) in conns.iter_mut().enumerate() {
        let r = c
            .request("c")
            .unwrap_or_else(|e| panic!("connection {i} broke after the restart: {e}"));
        assert_eq!(r, "node1-pod0:c");
    }
    // And new connections still work.
    assert_eq!(
        env.get(SocketAddrV4::new(env.cluster.nodes[0].ip, NODE_PORT))
            .expect("GET")
            .body,
        "node1-pod0\n"
    );
}

/// A tiny `--snat-ports` range: flows beyond it are counted drops, and no packet is ever
/// mis-translated (every open connection keeps answering with its own data).
#[test]
fn snat_port_exhaustion_is_a_counted_drop_and_never_mistranslates() {
    let env = TwoNodes::start("snatfull", &[1], None, &["--snat-ports", "61000-61003"]);
    let line_np = SocketAddrV4::new(env.cluster.nodes[0].ip, LINE_NODE_PORT);
    let mut open = Vec::new();
    let mut failed = 0;
    for _ in 0..8 {
        match env
            .cluster
            .client
            .enter(|| lb_testkit::lab::LineConn::connect(line_np, Duration::from_millis(500)))
        {
            Ok(mut c) => {
                assert_eq!(c.request("x").expect("request"), "node1-pod0:x");
                open.push(c);
            }
            Err(_) => failed += 1,
        }
    }
    assert_eq!(
        open.len(),
        4,
        "4 SNAT ports carry 4 flows ({failed} failed)"
    );
    assert_eq!(failed, 4);
    for (i, c) in open.iter_mut().enumerate() {
        let line = format!("conn {i}");
        assert_eq!(
            c.request(&line).expect("request"),
            format!("node1-pod0:{line}")
        );
    }
    let m = env.metrics(0);
    assert!(reason_count(&m, "xdp_drop_snat_exhausted") >= 4, "{m}");
}
