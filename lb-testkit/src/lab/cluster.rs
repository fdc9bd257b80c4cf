//! The multi-node lab: N nodes and a client on one L2 segment (a bridge in a namespace of its
//! own), each node with a routed pod CIDR and its pods. Built with [`Topology`].
//!
//! ```text
//!   l2 ns: bridge br0 ── port p-node{k} ─── node{k} ns: up0 10.200.0.{10+k}/24
//!                     └─ port p-client ──── client ns: eth0 10.200.0.2/24
//!
//!   node{k} ns: veth{i} 10.244.{k}.1/32 ── node{k}-pod{i} ns: eth0 10.244.{k}.{10+i}/32
//!               route 10.244.{j}.0/24 via 10.200.0.{10+j} for every other node j
//!   client ns:  route 10.244.{k}.0/24 via 10.200.0.{10+k} (the direct, no-NAT path)
//! ```
//!
//! Every address and route lives only inside namespaces this code creates, named
//! `lbt-<pid>-<n>-<role>` like [`super::Lab`]'s, swept the same way when stale, and deleted
//! when the [`Cluster`] drops (its processes are killed first).
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::atomic::Ordering;

use lb_agent::loader::XdpPass;

use crate::bpffs::PinDir;
use crate::cgroup::LabCgroup;

use super::{
    disable_tx_csum, netns::Netns, ping_all, podserver_bin, require_root, require_tools,
    start_pod_servers_in, sweep_stale_namespaces, wire_pod, PodNs, Procs, CLIENT_IF, CLIENT_IP,
    LAB_COUNTER, NODE_UPLINK, NS_PREFIX, UPLINK_PREFIX_LEN,
};

/// Name of the bridge in the L2 namespace.
pub const BRIDGE: &str = "br0";
/// Most nodes one cluster can hold (node addresses are `10.200.0.{10+k}`).
pub const MAX_NODES: usize = 200;
/// Most pods per node (pod addresses are `10.244.{k}.{10+i}`).
pub const MAX_PODS_PER_NODE: usize = 240;

/// Uplink address of node `k`: `10.200.0.{10+k}`.
pub fn node_ip(k: usize) -> Ipv4Addr {
    assert!(
        k < MAX_NODES,
        "node index {k} out of range (max {MAX_NODES})"
    );
    Ipv4Addr::new(10, 200, 0, 10 + k as u8)
}

/// Pod CIDR of node `k`: `10.244.{k}.0/24`.
pub fn node_pod_cidr(k: usize) -> String {
    assert!(
        k < MAX_NODES,
        "node index {k} out of range (max {MAX_NODES})"
    );
    format!("10.244.{k}.0/24")
}

/// Gateway of node `k`'s pods (on each node-side veth): `10.244.{k}.1`.
pub fn node_pod_gw(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, k as u8, 1)
}

/// Address of pod `i` on node `k`: `10.244.{k}.{10+i}`.
pub fn cluster_pod_ip(k: usize, i: usize) -> Ipv4Addr {
    assert!(
        k < MAX_NODES,
        "node index {k} out of range (max {MAX_NODES})"
    );
    assert!(
        i < MAX_PODS_PER_NODE,
        "pod index {i} out of range (max {MAX_PODS_PER_NODE} per node)"
    );
    Ipv4Addr::new(10, 244, k as u8, 10 + i as u8)
}

/// The shape of a [`Cluster`]: how many nodes, and how many pods on each.
#[derive(Clone, Debug)]
pub struct Topology {
    nodes: usize,
    pods_per_node: usize,
    /// Put the client behind a router whose link to it has this MTU.
    router_mtu: Option<u32>,
}

/// The router's address on the bridge, and the client-side subnet behind it
/// ([`Topology::client_behind_router`]).
pub const ROUTER_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 3);
pub const ROUTED_CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 2);
const ROUTED_CLIENT_GW: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 1);
const ROUTED_CLIENT_NET: &str = "10.201.0.0/24";

impl Default for Topology {
    /// Three nodes with two pods each.
    fn default() -> Self {
        Topology {
            nodes: 3,
            pods_per_node: 2,
            router_mtu: None,
        }
    }
}

impl Topology {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of nodes (at least 1).
    pub fn nodes(mut self, n: usize) -> Self {
        self.nodes = n;
        self
    }

    /// Pods on every node.
    pub fn pods_per_node(mut self, n: usize) -> Self {
        self.pods_per_node = n;
        self
    }

    /// Put the client (`ROUTED_CLIENT_IP`) behind a router namespace (`ROUTER_IP` on the
    /// bridge) whose link towards the client has an MTU of `mtu`: packets from the nodes
    /// larger than that are answered by the router with ICMP fragmentation-needed, as a
    /// smaller-MTU hop on the way to a real client would.
    pub fn client_behind_router(mut self, mtu: u32) -> Self {
        self.router_mtu = Some(mtu);
        self
    }

    /// Builds the cluster. Panics with a clear message when not root, a tool is missing, or
    /// any step fails (namespaces created so far are deleted while unwinding).
    pub fn build(self) -> Cluster {
        require_root();
        require_tools();
        assert!(
            (1..=MAX_NODES).contains(&self.nodes),
            "Topology::nodes = {} is not in 1..={MAX_NODES}",
            self.nodes
        );
        assert!(
            self.pods_per_node <= MAX_PODS_PER_NODE,
            "Topology::pods_per_node = {} exceeds {MAX_PODS_PER_NODE}",
            self.pods_per_node
        );
        sweep_stale_namespaces();
        let n = LAB_COUNTER.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("{NS_PREFIX}{}-{n}-", std::process::id());
        let l2 = Netns::new(format!("{prefix}l2"));
        l2.ip(&["link", "add", BRIDGE, "type", "bridge"]);
        l2.ip(&["link", "set", BRIDGE, "up"]);
        let client = Netns::new(format!("{prefix}client"));
        let router = self
            .router_mtu
            .map(|_| Netns::new(format!("{prefix}router")));
        let mut cluster = Cluster {
            procs: Procs::default(),
            xdp_pass: None,
            prefix,
            l2,
            client,
            router,
            nodes: Vec::with_capacity(self.nodes),
        };
        match (&cluster.router, self.router_mtu) {
            (Some(router), Some(mtu)) => wire_router(&cluster.l2, router, &cluster.client, mtu),
            _ => plug(
                &cluster.l2,
                "p-client",
                &cluster.client,
                CLIENT_IF,
                CLIENT_IP,
            ),
        }
        for k in 0..self.nodes {
            cluster.add_node(k, self.pods_per_node);
        }
        cluster.route_pod_cidrs();
        // Frames a node's XDP program sends back out (XDP_TX) or redirects land on its bridge
        // port, the veth peer of its uplink; a veth receives XDP frames promptly only when it
        // runs an XDP program itself, as a kind node's host-side veth would need too.
        let mut ports: Vec<String> = cluster
            .nodes
            .iter()
            .map(|n| format!("p-{}", n.name))
            .collect();
        if cluster.router.is_some() {
            ports.push("p-router".into());
        }
        let ports: Vec<&str> = ports.iter().map(String::as_str).collect();
        let pins = PinDir::new("l2-xdp-pass");
        let pass = cluster
            .l2
            .enter(|| XdpPass::attach(&ports, pins.path()))
            .unwrap_or_else(|e| panic!("attaching lb_xdp_pass to the bridge ports: {e}"));
        cluster.xdp_pass = Some((pass, pins));
        cluster
    }
}

/// Connects `ns` to the bridge: a veth pair made directly between the two namespaces (it
/// never exists in the root namespace), `port` enslaved to the bridge, `dev` at
/// `addr/24` in `ns`, TX checksum offload off on both ends.
fn plug(l2: &Netns, port: &str, ns: &Netns, dev: &str, addr: Ipv4Addr) {
    l2.ip(&[
        "link",
        "add",
        port,
        "type",
        "veth",
        "peer",
        "name",
        dev,
        "netns",
        ns.name(),
    ]);
    l2.ip(&["link", "set", port, "master", BRIDGE]);
    l2.ip(&["link", "set", port, "up"]);
    let cidr = format!("{addr}/{UPLINK_PREFIX_LEN}");
    ns.ip(&["addr", "add", &cidr, "dev", dev]);
    ns.ip(&["link", "set", dev, "up"]);
    disable_tx_csum(l2, port);
    disable_tx_csum(ns, dev);
}

/// The router between the bridge and the client: `up0` (`ROUTER_IP`) on the bridge,
/// `down0` (`ROUTED_CLIENT_GW`, MTU `mtu`) to the client's `eth0` (`ROUTED_CLIENT_IP`, MTU
/// 1500), forwarding; the client's default route goes through it.
fn wire_router(l2: &Netns, router: &Netns, client: &Netns, mtu: u32) {
    plug(l2, "p-router", router, NODE_UPLINK, ROUTER_IP);
    router.ip(&[
        "link",
        "add",
        "down0",
        "type",
        "veth",
        "peer",
        "name",
        CLIENT_IF,
        "netns",
        client.name(),
    ]);
    let gw = format!("{ROUTED_CLIENT_GW}/24");
    router.ip(&["addr", "add", &gw, "dev", "down0"]);
    router.ip(&["link", "set", "down0", "mtu", &mtu.to_string(), "up"]);
    let me = format!("{ROUTED_CLIENT_IP}/24");
    client.ip(&["addr", "add", &me, "dev", CLIENT_IF]);
    client.ip(&["link", "set", CLIENT_IF, "up"]);
    client.ip(&[
        "route",
        "add",
        "default",
        "via",
        &ROUTED_CLIENT_GW.to_string(),
    ]);
    disable_tx_csum(router, "down0");
    disable_tx_csum(client, CLIENT_IF);
    router.enter(|| {
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
            .expect("setting net.ipv4.ip_forward=1 in the router namespace");
    });
}

/// One node: its namespace, name (`node{k}`), uplink address, pod CIDR, pods, and the
/// cgroup that every process started in the node or its pods joins (the one its agent's
/// socket hooks go on: `--cgroup <cgroup.path()>`).
#[derive(Debug)]
pub struct NodeNs {
    pub ns: Netns,
    pub name: String,
    pub ip: Ipv4Addr,
    pub pod_cidr: String,
    pub pods: Vec<PodNs>,
    pub cgroup: LabCgroup,
}

/// Nodes and a client on one L2 segment (see the module docs). Dropping it kills the
/// processes it owns, then deletes all its namespaces.
pub struct Cluster {
    /// Declared first so the processes die before any namespace goes.
    procs: Procs,
    /// `lb_xdp_pass` on the bridge ports (detached when dropped), and its pins.
    xdp_pass: Option<(XdpPass, PinDir)>,
    pub prefix: String,
    /// The namespace holding the bridge.
    pub l2: Netns,
    pub client: Netns,
    /// The router in front of the client ([`Topology::client_behind_router`]).
    pub router: Option<Netns>,
    pub nodes: Vec<NodeNs>,
}

impl Cluster {
    fn add_node(&mut self, k: usize, pods: usize) {
        let name = format!("node{k}");
        let cgroup = LabCgroup::new(&name);
        let mut ns = Netns::new(format!("{}{name}", self.prefix));
        ns.set_cgroup(cgroup.path());
        let ip = node_ip(k);
        plug(&self.l2, &format!("p-{name}"), &ns, NODE_UPLINK, ip);
        ns.enter(|| {
            // /proc/sys/net is per network namespace of the writing thread.
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
                .expect("setting net.ipv4.ip_forward=1 in a node namespace");
        });
        let pods = (0..pods)
            .map(|i| {
                let mut pod = wire_pod(
                    &ns,
                    &self.prefix,
                    format!("{name}-pod{i}"),
                    cluster_pod_ip(k, i),
                    node_pod_gw(k),
                    format!("veth{i}"),
                );
                pod.ns.set_cgroup(cgroup.path());
                pod
            })
            .collect();
        self.nodes.push(NodeNs {
            ns,
            name,
            ip,
            pod_cidr: node_pod_cidr(k),
            pods,
            cgroup,
        });
    }

    /// Every node routes the other nodes' pod CIDRs via their uplink addresses; the client
    /// routes every pod CIDR via its node.
    fn route_pod_cidrs(&self) {
        for node in &self.nodes {
            let via = node.ip.to_string();
            if let Some(router) = &self.router {
                router.ip(&[
                    "route",
                    "add",
                    &node.pod_cidr,
                    "via",
                    &via,
                    "dev",
                    NODE_UPLINK,
                ]);
                node.ns.ip(&[
                    "route",
                    "add",
                    ROUTED_CLIENT_NET,
                    "via",
                    &ROUTER_IP.to_string(),
                    "dev",
                    NODE_UPLINK,
                ]);
            }
            for other in self.nodes.iter().filter(|o| o.name != node.name) {
                other.ns.ip(&[
                    "route",
                    "add",
                    &node.pod_cidr,
                    "via",
                    &via,
                    "dev",
                    NODE_UPLINK,
                ]);
            }
            if self.router.is_none() {
                self.client.ip(&[
                    "route",
                    "add",
                    &node.pod_cidr,
                    "via",
                    &via,
                    "dev",
                    CLIENT_IF,
                ]);
            }
        }
    }

    /// The client's address: `CLIENT_IP` on the bridge, or `ROUTED_CLIENT_IP` behind the
    /// router.
    pub fn client_ip(&self) -> Ipv4Addr {
        if self.router.is_some() {
            ROUTED_CLIENT_IP
        } else {
            CLIENT_IP
        }
    }

    /// `lbt-<pid>-<n>-`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Names of all namespaces of this cluster (bridge, client, nodes, pods).
    pub fn namespace_names(&self) -> Vec<String> {
        let mut v = vec![self.l2.name().to_owned(), self.client.name().to_owned()];
        v.extend(self.router.iter().map(|r| r.name().to_owned()));
        for node in &self.nodes {
            v.push(node.ns.name().to_owned());
            v.extend(node.pods.iter().map(|p| p.ns.name().to_owned()));
        }
        v
    }

    /// Every pod of every node, node by node.
    pub fn pods(&self) -> impl Iterator<Item = &PodNs> {
        self.nodes.iter().flat_map(|n| n.pods.iter())
    }

    /// Pings (bounded) client -> each node, each node -> its pods and every other node,
    /// client -> every pod
    /// (routed by its node), and the first pod -> every pod on other nodes (routed node to
    /// node). Panics naming the first path that does not answer.
    pub fn wait_reachable(&self) {
        let mut paths: Vec<(&Netns, Ipv4Addr)> = Vec::new();
        for node in &self.nodes {
            paths.push((&self.client, node.ip));
            paths.extend(node.pods.iter().map(|p| (&node.ns, p.ip)));
            // Node to node: every node has resolved every other one, as on a live cluster.
            paths.extend(
                self.nodes
                    .iter()
                    .filter(|o| o.name != node.name)
                    .map(|o| (&node.ns, o.ip)),
            );
        }
        paths.extend(self.pods().map(|p| (&self.client, p.ip)));
        if let Some(first) = self.nodes.first().and_then(|n| n.pods.first()) {
            for node in self.nodes.iter().skip(1) {
                paths.extend(node.pods.iter().map(|p| (&first.ns, p.ip)));
            }
        }
        ping_all(&paths);
    }

    /// Starts `lb-podserver` in every pod of every node, named after the pod
    /// (`node{k}-pod{i}`); see [`super::Lab::start_pod_servers_with`].
    pub fn start_pod_servers(&mut self, http: &[u16], udp: &[u16], line: &[u16]) {
        self.start_pod_servers_with(&podserver_bin(), http, udp, line);
    }

    /// As [`Cluster::start_pod_servers`], with the server binary given.
    pub fn start_pod_servers_with(&mut self, bin: &Path, http: &[u16], udp: &[u16], line: &[u16]) {
        let pods: Vec<&PodNs> = self.nodes.iter().flat_map(|n| n.pods.iter()).collect();
        start_pod_servers_in(&mut self.procs, &pods, bin, http, udp, line);
    }

    /// Hands a process to the cluster: it is killed when the cluster drops.
    pub fn adopt(&mut self, label: impl Into<String>, proc: super::Proc) {
        self.procs.adopt(label, proc);
    }

    /// The owned process under `label`.
    pub fn proc_mut(&mut self, label: &str) -> Option<&mut super::Proc> {
        self.procs.get_mut(label)
    }

    /// Takes the owned process under `label` back from the cluster.
    pub fn take_proc(&mut self, label: &str) -> Option<super::Proc> {
        self.procs.take(label)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.procs.kill_all();
    }
}
