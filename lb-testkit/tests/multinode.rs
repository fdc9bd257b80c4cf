//! End-to-end tests in the multi-node lab (need root): one agent per node, all reading the
//! same cluster-wide manifests (every Node in one file), as a new user would set them up.
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;
use std::time::Duration;

use lb_testkit::agent::{
    node_yaml, service_yaml, start_agent_in, workspace_bin, write_manifest, Endpoint, ManifestDir,
    SvcPort,
};
use lb_testkit::bpffs::PinDir;
use lb_testkit::lab::{http_get, http_request, Topology, CLIENT_IP};

const T: Duration = Duration::from_secs(3);
const HTTP: u16 = 8080;
const NODE_PORT: u16 = 30080;
const METRICS: u16 = 9464;

fn podserver() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_lb-podserver"))
}

/// Upstream: "ESIPP [Slow] should work for type=NodePort" (test/e2e/network/loadbalancer.go):
/// externalTrafficPolicy Local on every node, each node answering with its own endpoint and
/// the client's own address kept. Before the agents read the whole Node list, the second
/// node's agent kept the first Node it read, had no node address and served no NodePort.
#[test]
fn esipp_should_work_for_type_nodeport_on_every_node_of_a_cluster_wide_dump() {
    let mut cluster = Topology::new().nodes(2).pods_per_node(1).build();
    cluster.wait_reachable();
    cluster.start_pod_servers_with(podserver(), &[HTTP], &[], &[]);
    let names = ["node0", "node1"];
    let dir = ManifestDir::new("multinode");
    let nodes: Vec<String> = cluster
        .nodes
        .iter()
        .zip(names)
        .map(|(n, name)| node_yaml(name, n.ip))
        .collect();
    write_manifest(dir.path(), "nodes.yaml", &nodes);
    let endpoints: Vec<Endpoint> = cluster
        .nodes
        .iter()
        .zip(names)
        .map(|(n, name)| Endpoint {
            ip: n.pods[0].ip,
            ready: true,
            node: name,
        })
        .collect();
    write_manifest(
        dir.path(),
        "web.yaml",
        &[service_yaml(
            "web",
            "NodePort",
            Ipv4Addr::new(10, 96, 0, 80),
            true,
            &[SvcPort {
                name: "http",
                proto: "TCP",
                port: 80,
                target: HTTP,
                node_port: Some(NODE_PORT),
            }],
            &endpoints,
        )],
    );
    let metrics_addr = format!("127.0.0.1:{METRICS}");
    let pins: Vec<PinDir> = names.iter().map(|n| PinDir::new(n)).collect();
    let mut agents = Vec::new();
    for ((node, name), pins) in cluster.nodes.iter().zip(names).zip(&pins) {
        agents.push(start_agent_in(
            &node.ns,
            name,
            pins,
            dir.path(),
            &["--metrics-addr", &metrics_addr],
        ));
    }

    for (node, agent) in cluster.nodes.iter().zip(&agents) {
        let log = agent.proc.log();
        assert!(!log.contains("keeping the first one"), "{log}");
        assert!(!log.contains("not found among"), "{log}");
        let metrics = node
            .ns
            .enter(|| {
                http_get(
                    SocketAddrV4::new(Ipv4Addr::LOCALHOST, METRICS),
                    "/metrics",
                    T,
                )
            })
            .expect("GET /metrics");
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
    let metrics = node
        .ns
        .enter(|| {
            http_get(
                SocketAddrV4::new(Ipv4Addr::LOCALHOST, METRICS),
                "/metrics",
                T,
            )
        })
        .expect("GET /metrics");
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
