//! Integration tests of the multi-node lab (need root): N nodes and a client on one bridge,
//! routed pod CIDRs, pod servers reached from the client and from pods on other nodes, and
//! cleanup of every namespace.
use std::net::SocketAddrV4;
use std::path::Path;
use std::time::Duration;

use lb_testkit::lab::cluster::{cluster_pod_ip, node_ip, node_pod_cidr, BRIDGE};
use lb_testkit::lab::{
    http_request, list_namespaces, namespace_exists, udp_request, Topology, CLIENT_IP, NODE_UPLINK,
};

const T: Duration = Duration::from_secs(5);
const HTTP: u16 = 80;
const UDP: u16 = 5353;

fn podserver() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_lb-podserver"))
}

#[test]
fn three_nodes_on_one_segment_route_pod_cidrs_to_each_other() {
    let mut cluster = Topology::new().nodes(3).pods_per_node(1).build();
    cluster.wait_reachable();
    cluster.start_pod_servers_with(podserver(), &[HTTP], &[UDP], &[]);

    // Wiring as specified: the bridge holds one port per node and one for the client.
    let ports = cluster.l2.ip(&["-o", "link", "show", "master", BRIDGE]);
    for port in ["p-client", "p-node0", "p-node1", "p-node2"] {
        assert!(
            ports.contains(&format!(": {port}@")),
            "{port} not on {BRIDGE}: {ports}"
        );
    }
    for (k, node) in cluster.nodes.iter().enumerate() {
        assert_eq!(node.name, format!("node{k}"));
        assert_eq!(node.ip, node_ip(k));
        assert_eq!(node.pod_cidr, node_pod_cidr(k));
        let addrs = node
            .ns
            .ip(&["-4", "-o", "addr", "show", "dev", NODE_UPLINK]);
        assert!(addrs.contains(&format!("{}/24", node.ip)), "{addrs}");
        let routes = node.ns.ip(&["-4", "route", "show"]);
        for (j, other) in cluster.nodes.iter().enumerate().filter(|(j, _)| *j != k) {
            let want = format!("{} via {} dev {NODE_UPLINK}", node_pod_cidr(j), other.ip);
            assert!(routes.contains(&want), "node{k} lacks `{want}`: {routes}");
        }
    }

    // Client -> every pod, routed by the pod's node: no NAT, so each pod sees the client.
    for (k, node) in cluster.nodes.iter().enumerate() {
        let pod = &node.pods[0];
        assert_eq!(pod.ip, cluster_pod_ip(k, 0));
        assert_eq!(pod.name, format!("node{k}-pod0"));
        let (resp, udp) = cluster.client.enter(|| {
            let resp = http_request(SocketAddrV4::new(pod.ip, HTTP), "/", T).expect("HTTP");
            let udp = udp_request(SocketAddrV4::new(pod.ip, UDP), b"hi", T).expect("UDP");
            (resp, udp)
        });
        assert_eq!(resp.status, 200);
        assert_eq!(resp.body, format!("{}\n", pod.name));
        let peer = resp.header("x-peer").expect("X-Peer header");
        assert!(
            peer.starts_with(&format!("{CLIENT_IP}:")),
            "{} saw {peer}",
            pod.name
        );
        assert_eq!(udp, format!("{}:hi", pod.name).into_bytes());
    }

    // Pod on node0 -> pods on node1 and node2: node to node over the segment.
    let from = &cluster.nodes[0].pods[0];
    for node in &cluster.nodes[1..] {
        let to = &node.pods[0];
        let resp = from
            .ns
            .enter(|| http_request(SocketAddrV4::new(to.ip, HTTP), "/", T))
            .expect("pod-to-pod HTTP across nodes");
        assert_eq!(resp.body, format!("{}\n", to.name));
        let peer = resp.header("x-peer").expect("X-Peer header");
        assert!(
            peer.starts_with(&format!("{}:", from.ip)),
            "{} saw {peer}",
            to.name
        );
    }

    let names = cluster.namespace_names();
    assert_eq!(names.len(), 2 + 3 + 3, "{names:?}");
    let listed = list_namespaces();
    for n in &names {
        assert!(n.starts_with(cluster.prefix()), "{n}");
        assert!(listed.contains(n), "{n} missing from ip netns list");
    }
    drop(cluster);
    for n in &names {
        assert!(!namespace_exists(n), "{n} left behind");
    }
}

#[test]
fn default_topology_is_three_nodes_with_two_pods_each() {
    let cluster = Topology::default().build();
    assert_eq!(cluster.nodes.len(), 3);
    assert!(cluster.nodes.iter().all(|n| n.pods.len() == 2));
    let pods: Vec<_> = cluster.pods().map(|p| (p.name.clone(), p.ip)).collect();
    assert_eq!(pods.len(), 6);
    assert_eq!(pods[5], ("node2-pod1".to_owned(), cluster_pod_ip(2, 1)));
    cluster.wait_reachable();
}
