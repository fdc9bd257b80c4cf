//! Random Kubernetes worlds and event sequences for the equivalence tests of the incremental
//! controller: small pools of names, addresses and ports, so that objects collide (two
//! Services on one clusterIP, a hostPort on a nodePort, a health check on a nodePort),
//! reference each other (slices of missing Services) and are malformed now and then.
#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    ClientIPConfig, Container, ContainerPort, LoadBalancerIngress, LoadBalancerStatus, Node,
    NodeAddress, NodeStatus, Pod, PodIP, PodSpec, PodStatus, Service, ServicePort, ServiceSpec,
    ServiceStatus, SessionAffinityConfig,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use lb_agent::model::{self, Objects};

/// splitmix64: small, deterministic, good enough for test data.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    /// `f()` with probability `percent`/100.
    pub fn maybe<T>(&mut self, percent: u64, f: impl FnOnce(&mut Rng) -> T) -> Option<T> {
        if self.chance(percent) {
            Some(f(self))
        } else {
            None
        }
    }
}

pub const NODE: &str = "node-a";
const NAMESPACES: [&str; 2] = ["default", "team-a"];
const SERVICES: usize = 10;
const CLUSTER_IPS: [&str; 7] = [
    "10.96.0.1",
    "10.96.0.2",
    "10.96.0.3",
    "10.96.0.4",
    "10.96.0.5",
    "10.96.0.6",
    "not-an-ip",
];
const EXTERNAL_IPS: [&str; 4] = ["192.0.2.1", "192.0.2.2", "10.96.0.1", "fd00::1"];
const PORT_NAMES: [&str; 3] = ["http", "dns", ""];
const PORTS: [i32; 4] = [80, 53, 443, 0];
const NODE_PORTS: [i32; 5] = [30001, 30002, 30003, 99, 0];
const HC_PORTS: [i32; 4] = [30001, 30100, 30101, 70000];
const ENDPOINTS: [&str; 9] = [
    "10.244.0.1",
    "10.244.0.2",
    "10.244.0.3",
    "10.244.0.4",
    "10.244.1.1",
    "10.244.1.2",
    " 10.244.0.2",
    "bogus",
    "fd00::5",
];
const NODES: [&str; 3] = [NODE, "node-b", "node-c"];

fn time(rng: &mut Rng) -> Option<Time> {
    // A few distinct instants (and none): equal ages fall back to namespace/name order.
    let secs = *rng.pick(&[0i64, 1_000, 2_000, 3_000]);
    rng.maybe(85, |_| ()).and_then(|()| {
        k8s_openapi::jiff::Timestamp::from_second(1_700_000_000 + secs)
            .ok()
            .map(Time)
    })
}

fn meta(rng: &mut Rng, ns: &str, name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        namespace: Some(ns.to_string()),
        creation_timestamp: time(rng),
        ..Default::default()
    }
}

fn proto(rng: &mut Rng) -> Option<String> {
    match rng.below(20) {
        0 => None,
        1 => Some("SCTP".to_string()),
        2..=6 => Some("UDP".to_string()),
        _ => Some("TCP".to_string()),
    }
}

pub fn service_name(i: usize) -> String {
    format!("svc-{i}")
}

pub fn random_service(rng: &mut Rng, ns: &str, name: &str) -> Service {
    let mut m = meta(rng, ns, name);
    if rng.chance(4) {
        let label = if rng.chance(50) {
            model::SERVICE_PROXY_NAME_LABEL
        } else {
            model::HEADLESS_LABEL
        };
        m.labels = Some([(label.to_string(), "x".to_string())].into());
    }
    if rng.chance(2) {
        return Service {
            metadata: m,
            ..Default::default()
        };
    }
    let ty = match rng.below(20) {
        0 => "ExternalName",
        1 => "Bogus",
        2..=7 => "NodePort",
        8..=11 => "LoadBalancer",
        _ => "ClusterIP",
    };
    let cluster_ip = match rng.below(20) {
        0 => Some("None".to_string()),
        1 => None,
        _ => Some(rng.pick(&CLUSTER_IPS).to_string()),
    };
    let ports = (0..rng.below(3) + 1)
        .map(|_| ServicePort {
            name: Some(rng.pick(&PORT_NAMES).to_string()).filter(|n| !n.is_empty()),
            port: *rng.pick(&PORTS[..3]),
            protocol: proto(rng),
            node_port: matches!(ty, "NodePort" | "LoadBalancer")
                .then(|| *rng.pick(&NODE_PORTS))
                .filter(|p| *p != 0),
            ..Default::default()
        })
        .collect::<Vec<_>>();
    let ports: Vec<ServicePort> = ports
        .into_iter()
        .map(|mut p| {
            if rng.chance(3) {
                p.port = 0;
            }
            p
        })
        .collect();
    let local = rng.chance(35);
    let spec = ServiceSpec {
        type_: Some(ty.to_string()),
        cluster_ip: cluster_ip.clone(),
        cluster_ips: cluster_ip.filter(|_| rng.chance(70)).map(|ip| vec![ip]),
        external_ips: rng
            .maybe(20, |_| ())
            .map(|()| vec![rng.pick(&EXTERNAL_IPS).to_string()]),
        ports: Some(ports),
        external_traffic_policy: Some(if local { "Local" } else { "Cluster" }.to_string()),
        internal_traffic_policy: rng.maybe(15, |_| "Local".to_string()),
        health_check_node_port: (local && rng.chance(80)).then(|| *rng.pick(&HC_PORTS)),
        allocate_load_balancer_node_ports: rng.maybe(20, |_| false),
        session_affinity: match rng.below(10) {
            0..=1 => Some("ClientIP".to_string()),
            2 => Some("Sticky".to_string()),
            _ => None,
        },
        session_affinity_config: rng.maybe(30, |_| ()).map(|()| SessionAffinityConfig {
            client_ip: Some(ClientIPConfig {
                timeout_seconds: Some(*rng.pick(&[60, 0, 100_000])),
            }),
        }),
        load_balancer_source_ranges: rng.maybe(5, |_| vec!["10.0.0.0/8".to_string()]),
        ..Default::default()
    };
    let status = (ty == "LoadBalancer").then(|| ServiceStatus {
        load_balancer: Some(LoadBalancerStatus {
            ingress: Some(
                (0..rng.below(3))
                    .map(|_| LoadBalancerIngress {
                        ip: Some(rng.pick(&EXTERNAL_IPS).to_string()),
                        ip_mode: rng.maybe(10, |_| "Proxy".to_string()),
                        ..Default::default()
                    })
                    .collect(),
            ),
        }),
        ..Default::default()
    });
    Service {
        metadata: m,
        spec: Some(spec),
        status,
    }
}

pub fn random_slice(rng: &mut Rng, ns: &str, name: &str) -> EndpointSlice {
    let mut m = meta(rng, ns, name);
    if !rng.chance(5) {
        let svc = service_name(rng.below(SERVICES + 1));
        m.labels = Some([(model::SERVICE_NAME_LABEL.to_string(), svc)].into());
    }
    let ports = (0..rng.below(3))
        .map(|_| EndpointPort {
            name: Some(rng.pick(&PORT_NAMES).to_string()).filter(|n| !n.is_empty()),
            port: match rng.below(12) {
                0 => None,
                1 => Some(0),
                _ => Some(*rng.pick(&[8080, 8053, 9443])),
            },
            protocol: proto(rng),
            ..Default::default()
        })
        .collect();
    let endpoints: Vec<Endpoint> = (0..rng.below(5))
        .map(|_| Endpoint {
            addresses: if rng.chance(3) {
                Vec::new()
            } else {
                vec![rng.pick(&ENDPOINTS).to_string()]
            },
            conditions: rng.maybe(80, |_| ()).map(|()| EndpointConditions {
                ready: rng.maybe(85, |rng| rng.chance(70)),
                serving: rng.maybe(50, |rng| rng.chance(80)),
                terminating: rng.maybe(50, |rng| rng.chance(30)),
            }),
            node_name: rng.maybe(85, |rng| rng.pick(&NODES).to_string()),
            ..Default::default()
        })
        .collect();
    EndpointSlice {
        metadata: m,
        address_type: if rng.chance(5) { "IPv6" } else { "IPv4" }.to_string(),
        endpoints: Some(endpoints),
        ports: Some(ports),
    }
}

pub fn random_pod(rng: &mut Rng, ns: &str, name: &str) -> Pod {
    let ports = (0..rng.below(3))
        .map(|_| ContainerPort {
            container_port: *rng.pick(&[8080, 53, 0]),
            host_port: rng.maybe(80, |rng| *rng.pick(&[8000, 30001, 80, 70000])),
            host_ip: rng.maybe(20, |rng| {
                rng.pick(&["10.96.0.1", "192.0.2.1", "x"]).to_string()
            }),
            protocol: proto(rng),
            ..Default::default()
        })
        .collect();
    let ip = format!("10.244.0.{}", 20 + rng.below(4));
    Pod {
        metadata: meta(rng, ns, name),
        spec: Some(PodSpec {
            node_name: Some(if rng.chance(80) { NODE } else { "node-b" }.to_string()),
            host_network: rng.maybe(5, |_| true),
            containers: vec![Container {
                name: "c".to_string(),
                ports: Some(ports),
                ..Default::default()
            }],
            ..Default::default()
        }),
        status: Some(PodStatus {
            phase: rng.maybe(10, |_| "Succeeded".to_string()),
            pod_ip: rng.maybe(90, |_| ip.clone()),
            pod_ips: rng.maybe(50, |_| vec![PodIP { ip }]),
            ..Default::default()
        }),
    }
}

pub fn random_node(rng: &mut Rng, name: &str) -> Node {
    let addrs = (0..rng.below(3))
        .map(|_| NodeAddress {
            type_: rng
                .pick(&["InternalIP", "ExternalIP", "Hostname"])
                .to_string(),
            address: rng
                .pick(&["192.168.1.10", "192.168.1.11", "203.0.113.5", "bad"])
                .to_string(),
        })
        .collect();
    Node {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            ..Default::default()
        },
        status: Some(NodeStatus {
            addresses: Some(addrs),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Which kind an event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Service,
    Slice,
    Pod,
    Node,
}

/// A world: the current objects by kind and (namespace, name).
#[derive(Debug, Clone, Default)]
pub struct World {
    pub services: BTreeMap<(String, String), Service>,
    pub slices: BTreeMap<(String, String), EndpointSlice>,
    pub pods: BTreeMap<(String, String), Pod>,
    pub nodes: BTreeMap<String, Node>,
}

impl World {
    pub fn objects(&self) -> Objects {
        Objects {
            services: self.services.values().cloned().collect(),
            slices: self.slices.values().cloned().collect(),
            pods: self.pods.values().cloned().collect(),
            nodes: self.nodes.values().cloned().collect(),
        }
    }
}

/// One change to a world.
#[derive(Debug, Clone)]
pub enum Event {
    Service(String, String, Option<Box<Service>>),
    Slice(String, String, Option<Box<EndpointSlice>>),
    Pod(String, String, Option<Box<Pod>>),
    Node(String, Option<Box<Node>>),
    /// A re-list of one kind: the whole new set (what a 410 Gone brings).
    Relist(EventKind, Box<World>),
}

impl World {
    /// Apply `e` to this world.
    pub fn apply(&mut self, e: &Event) {
        match e {
            Event::Service(ns, n, o) => set(&mut self.services, (ns.clone(), n.clone()), o),
            Event::Slice(ns, n, o) => set(&mut self.slices, (ns.clone(), n.clone()), o),
            Event::Pod(ns, n, o) => set(&mut self.pods, (ns.clone(), n.clone()), o),
            Event::Node(n, o) => set(&mut self.nodes, n.clone(), o),
            Event::Relist(kind, w) => match kind {
                EventKind::Service => self.services = w.services.clone(),
                EventKind::Slice => self.slices = w.slices.clone(),
                EventKind::Pod => self.pods = w.pods.clone(),
                EventKind::Node => self.nodes = w.nodes.clone(),
            },
        }
    }

    /// A random event against this world.
    pub fn random_event(&self, rng: &mut Rng) -> Event {
        let ns = rng.pick(&NAMESPACES).to_string();
        match rng.below(100) {
            0..=29 => {
                let name = service_name(rng.below(SERVICES));
                let del = rng.chance(15);
                let obj = (!del).then(|| Box::new(random_service(rng, &ns, &name)));
                Event::Service(ns, name, obj)
            }
            30..=69 => {
                let name = format!("{}-{}", service_name(rng.below(SERVICES)), rng.below(3));
                let del = rng.chance(15);
                let obj = (!del).then(|| Box::new(random_slice(rng, &ns, &name)));
                Event::Slice(ns, name, obj)
            }
            70..=84 => {
                let name = format!("pod-{}", rng.below(6));
                let del = rng.chance(20);
                let obj = (!del).then(|| Box::new(random_pod(rng, &ns, &name)));
                Event::Pod(ns, name, obj)
            }
            85..=95 => {
                let name = rng.pick(&NODES).to_string();
                let del = rng.chance(20);
                let obj = (!del).then(|| Box::new(random_node(rng, &name)));
                Event::Node(name, obj)
            }
            _ => {
                // A re-list: some objects of the kind changed, some gone, some new.
                let kind = *rng.pick(&[
                    EventKind::Service,
                    EventKind::Slice,
                    EventKind::Pod,
                    EventKind::Node,
                ]);
                let mut w = self.clone();
                for _ in 0..4 {
                    let e = w.random_event(rng);
                    if matches!(
                        (&e, kind),
                        (Event::Service(..), EventKind::Service)
                            | (Event::Slice(..), EventKind::Slice)
                            | (Event::Pod(..), EventKind::Pod)
                            | (Event::Node(..), EventKind::Node)
                    ) {
                        w.apply(&e);
                    }
                }
                Event::Relist(kind, Box::new(w))
            }
        }
    }
}

fn set<K: Ord, V: Clone>(map: &mut BTreeMap<K, V>, k: K, v: &Option<Box<V>>) {
    match v {
        Some(v) => {
            map.insert(k, V::clone(v));
        }
        None => {
            map.remove(&k);
        }
    }
}
