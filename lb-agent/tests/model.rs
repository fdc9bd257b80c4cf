//! Tests of the pure model: real-world-shaped objects (builders and `kubectl get -o yaml`
//! fixtures under `tests/data/`) in, this node's frontends and backends out.
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use k8s_openapi::api::core::v1::{
    Container, ContainerPort, LoadBalancerIngress, LoadBalancerStatus, Node, NodeAddress,
    NodeStatus, Pod, PodIP, PodSpec, PodStatus, Service, ServicePort, ServiceSpec, ServiceStatus,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use lb_agent::model::{
    compute, Backend, Desired, Frontend, FrontendId, ModelConfig, Objects, Proto,
};
use lb_agent::source::manifests;
use lb_common::service::flags;

// ---------------------------------------------------------------------------------------
// Builders
// ---------------------------------------------------------------------------------------

const NODE: &str = "node-a";

fn cfg() -> ModelConfig {
    ModelConfig::new(NODE)
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().expect("test address")
}

fn fid(addr: &str, port: u16, proto: Proto) -> FrontendId {
    FrontendId::new(ip(addr), port, proto)
}

fn nodeport(port: u16, proto: Proto) -> FrontendId {
    FrontendId::new(Ipv4Addr::UNSPECIFIED, port, proto)
}

fn local(addr: &str, port: u16) -> Backend {
    Backend {
        addr: ip(addr),
        port,
        remote: false,
        terminating: false,
    }
}

fn remote(addr: &str, port: u16) -> Backend {
    Backend {
        remote: true,
        ..local(addr, port)
    }
}

fn terminating(b: Backend) -> Backend {
    Backend {
        terminating: true,
        ..b
    }
}

fn meta(ns: &str, name: &str) -> ObjectMeta {
    ObjectMeta {
        namespace: Some(ns.to_string()),
        name: Some(name.to_string()),
        ..Default::default()
    }
}

fn created(mut m: ObjectMeta, ts: &str) -> ObjectMeta {
    m.creation_timestamp = Some(Time(ts.parse().expect("test timestamp")));
    m
}

fn sport(name: &str, port: i32, proto: Option<&str>) -> ServicePort {
    ServicePort {
        name: (!name.is_empty()).then(|| name.to_string()),
        port,
        protocol: proto.map(str::to_string),
        target_port: Some(IntOrString::Int(port)),
        ..Default::default()
    }
}

fn np(mut p: ServicePort, node_port: i32) -> ServicePort {
    p.node_port = Some(node_port);
    p
}

fn service(
    ns: &str,
    name: &str,
    type_: &str,
    cluster_ip: &str,
    ports: Vec<ServicePort>,
) -> Service {
    Service {
        metadata: meta(ns, name),
        spec: Some(ServiceSpec {
            type_: Some(type_.to_string()),
            cluster_ip: Some(cluster_ip.to_string()),
            cluster_ips: Some(vec![cluster_ip.to_string()]),
            ports: Some(ports),
            selector: Some(BTreeMap::from([("app".to_string(), name.to_string())])),
            ..Default::default()
        }),
        status: None,
    }
}

fn spec_mut(s: &mut Service) -> &mut ServiceSpec {
    s.spec.as_mut().expect("builder sets spec")
}

fn with_lb_ingress(mut s: Service, ips: &[&str]) -> Service {
    s.status = Some(ServiceStatus {
        load_balancer: Some(LoadBalancerStatus {
            ingress: Some(
                ips.iter()
                    .map(|i| LoadBalancerIngress {
                        ip: Some(i.to_string()),
                        ip_mode: Some("VIP".to_string()),
                        ..Default::default()
                    })
                    .collect(),
            ),
        }),
        ..Default::default()
    });
    s
}

fn eport(name: &str, port: Option<i32>, proto: Option<&str>) -> EndpointPort {
    EndpointPort {
        name: Some(name.to_string()),
        port,
        protocol: proto.map(str::to_string),
        ..Default::default()
    }
}

fn ep(addr: &str, node: Option<&str>) -> Endpoint {
    Endpoint {
        addresses: vec![addr.to_string()],
        conditions: Some(EndpointConditions {
            ready: Some(true),
            serving: Some(true),
            terminating: Some(false),
        }),
        node_name: node.map(str::to_string),
        ..Default::default()
    }
}

fn ep_cond(addr: &str, node: &str, ready: bool, serving: bool, term: bool) -> Endpoint {
    Endpoint {
        conditions: Some(EndpointConditions {
            ready: Some(ready),
            serving: Some(serving),
            terminating: Some(term),
        }),
        ..ep(addr, Some(node))
    }
}

fn slice(
    ns: &str,
    svc: &str,
    name: &str,
    ports: Vec<EndpointPort>,
    eps: Vec<Endpoint>,
) -> EndpointSlice {
    let mut m = meta(ns, name);
    m.labels = Some(BTreeMap::from([(
        "kubernetes.io/service-name".to_string(),
        svc.to_string(),
    )]));
    EndpointSlice {
        address_type: "IPv4".to_string(),
        endpoints: Some(eps),
        metadata: m,
        ports: Some(ports),
    }
}

fn hostport(
    container: i32,
    host: i32,
    proto: Option<&str>,
    host_ip: Option<&str>,
) -> ContainerPort {
    ContainerPort {
        container_port: container,
        host_port: Some(host),
        protocol: proto.map(str::to_string),
        host_ip: host_ip.map(str::to_string),
        ..Default::default()
    }
}

fn pod(ns: &str, name: &str, node: &str, pod_ip: Option<&str>, ports: Vec<ContainerPort>) -> Pod {
    Pod {
        metadata: meta(ns, name),
        spec: Some(PodSpec {
            containers: vec![Container {
                name: "main".to_string(),
                ports: Some(ports),
                ..Default::default()
            }],
            node_name: Some(node.to_string()),
            ..Default::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".to_string()),
            pod_ip: pod_ip.map(str::to_string),
            pod_ips: pod_ip.map(|i| vec![PodIP { ip: i.to_string() }]),
            ..Default::default()
        }),
    }
}

fn node(name: &str, addrs: &[(&str, &str)]) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            ..Default::default()
        },
        spec: None,
        status: Some(NodeStatus {
            addresses: Some(
                addrs
                    .iter()
                    .map(|(t, a)| NodeAddress {
                        type_: t.to_string(),
                        address: a.to_string(),
                    })
                    .collect(),
            ),
            ..Default::default()
        }),
    }
}

fn objs(services: Vec<Service>, slices: Vec<EndpointSlice>, pods: Vec<Pod>) -> Objects {
    Objects {
        services,
        slices,
        pods,
        nodes: Vec::new(),
    }
}

fn fixture(name: &str) -> Objects {
    let path = data_dir().join(name);
    let text = std::fs::read_to_string(&path).expect("fixture exists");
    let mut objects = Objects::default();
    let mut problems = Vec::new();
    manifests::load_str(name, &text, &mut objects, &mut problems);
    assert!(problems.is_empty(), "{name}: {problems:?}");
    objects
}

fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data")
}

fn get(d: &Desired, id: FrontendId) -> &Frontend {
    d.frontends
        .get(&id)
        .unwrap_or_else(|| panic!("no frontend {id}; have {:?}", d.frontends.keys()))
}

fn has_problem(d: &Desired, object: &str, needle: &str) -> bool {
    d.problems
        .iter()
        .any(|p| p.object == object && p.reason.contains(needle))
}

/// A ClusterIP service `ns/name` on 10.96.0.100:80 with one slice of the given endpoints.
fn simple(eps: Vec<Endpoint>) -> Objects {
    objs(
        vec![service(
            "default",
            "web",
            "ClusterIP",
            "10.96.0.100",
            vec![sport("http", 80, Some("TCP"))],
        )],
        vec![slice(
            "default",
            "web",
            "web-1",
            vec![eport("http", Some(8080), Some("TCP"))],
            eps,
        )],
        vec![],
    )
}

// ---------------------------------------------------------------------------------------
// Fixtures, as `kubectl get -o yaml` prints them
// ---------------------------------------------------------------------------------------

#[test]
fn kube_dns_list_fixture() {
    let d = compute(&fixture("kube-dns.yaml"), &cfg());
    assert!(d.problems.is_empty(), "{:?}", d.problems);
    assert_eq!(d.frontends.len(), 3);
    let backends = vec![local("10.244.0.3", 53), remote("10.244.1.7", 53)];
    let udp = get(&d, fid("10.96.0.10", 53, Proto::Udp));
    assert_eq!(udp.flags, flags::CLUSTERIP);
    assert_eq!(udp.owner, "kube-system/kube-dns:dns");
    assert_eq!(udp.backends, backends);
    let tcp = get(&d, fid("10.96.0.10", 53, Proto::Tcp));
    assert_eq!(tcp.owner, "kube-system/kube-dns:dns-tcp");
    assert_eq!(tcp.backends, backends);
    let metrics = get(&d, fid("10.96.0.10", 9153, Proto::Tcp));
    assert_eq!(
        metrics.backends,
        vec![local("10.244.0.3", 9153), remote("10.244.1.7", 9153)]
    );
}

#[test]
fn ingress_nginx_local_policy_fixture() {
    let d = compute(&fixture("ingress-nginx.yaml"), &cfg());
    assert!(d.problems.is_empty(), "{:?}", d.problems);
    // ClusterIP: all endpoints (internalTrafficPolicy Cluster).
    let c = get(&d, fid("10.104.21.198", 80, Proto::Tcp));
    assert_eq!(c.flags, flags::CLUSTERIP);
    assert_eq!(
        c.backends,
        vec![local("10.244.0.21", 80), remote("10.244.1.33", 80)]
    );
    // NodePort and LB VIP: only this node's endpoint, EXT_LOCAL.
    let n = get(&d, nodeport(31080, Proto::Tcp));
    assert_eq!(n.flags, flags::NODEPORT | flags::EXT_LOCAL);
    assert_eq!(n.backends, vec![local("10.244.0.21", 80)]);
    let n = get(&d, nodeport(31443, Proto::Tcp));
    assert_eq!(n.backends, vec![local("10.244.0.21", 443)]);
    let lb = get(&d, fid("203.0.113.10", 443, Proto::Tcp));
    assert_eq!(lb.flags, flags::LOADBALANCER | flags::EXT_LOCAL);
    assert_eq!(lb.owner, "ingress-nginx/ingress-nginx-controller:https");
    assert_eq!(lb.backends, vec![local("10.244.0.21", 443)]);
    // healthCheckNodePort is served by the agent's health server, not the datapath.
    assert!(!d.frontends.contains_key(&nodeport(32145, Proto::Tcp)));
    // Each externalTrafficPolicy Local frontend has an in-cluster twin with every endpoint,
    // for the node's own processes and pods (kube-proxy's KUBE-EXT chains send them to the
    // cluster chain); the ClusterIP has none.
    for id in [
        nodeport(31080, Proto::Tcp),
        fid("203.0.113.10", 443, Proto::Tcp),
    ] {
        let twin = get(&d, id.internal());
        assert_eq!(twin.flags, get(&d, id).flags, "{id}");
        assert_eq!(twin.backends.len(), 2, "{id}: {twin:?}");
        assert!(twin
            .backends
            .contains(&remote("10.244.1.33", twin.backends[1].port)));
    }
    assert!(!d
        .frontends
        .contains_key(&fid("10.104.21.198", 80, Proto::Tcp).internal()));
    assert_eq!(
        nodeport(31080, Proto::Tcp).internal().to_string(),
        "*:31080/TCP (in-cluster)"
    );
    assert_eq!(d.frontends.len(), 6 + 4);
}

#[test]
fn ingress_nginx_on_node_without_local_endpoint_drops() {
    let d = compute(&fixture("ingress-nginx.yaml"), &ModelConfig::new("node-c"));
    assert!(get(&d, nodeport(31080, Proto::Tcp)).backends.is_empty());
    assert!(get(&d, fid("203.0.113.10", 80, Proto::Tcp))
        .backends
        .is_empty());
    // The ClusterIP frontend still reaches both (remote) endpoints.
    assert_eq!(
        get(&d, fid("10.104.21.198", 80, Proto::Tcp)).backends,
        vec![remote("10.244.0.21", 80), remote("10.244.1.33", 80)]
    );
}

#[test]
fn statefulset_headless_service_fixture_produces_nothing() {
    let d = compute(&fixture("statefulset-headless.yaml"), &cfg());
    assert!(d.frontends.is_empty());
    assert!(d.problems.is_empty());
}

#[test]
fn hostport_pod_fixture() {
    let d = compute(&fixture("hostport-pod.yaml"), &cfg());
    assert!(d.problems.is_empty(), "{:?}", d.problems);
    assert_eq!(d.frontends.len(), 2);
    let http = get(&d, nodeport(8000, Proto::Tcp));
    assert_eq!(http.flags, flags::HOSTPORT);
    assert_eq!(http.owner, "pod edge/edge-proxy-7xk2d");
    assert_eq!(http.backends, vec![local("10.244.0.40", 80)]);
    assert_eq!(
        get(&d, nodeport(44300, Proto::Tcp)).backends,
        vec![local("10.244.0.40", 443)]
    );
}

#[test]
fn hostport_pod_of_another_node_is_not_ours() {
    let d = compute(&fixture("hostport-pod.yaml"), &ModelConfig::new("node-b"));
    assert!(d.frontends.is_empty());
    assert!(d.problems.is_empty());
}

#[test]
fn hostnetwork_pod_fixture_produces_nothing() {
    let d = compute(&fixture("hostnetwork-pod.yaml"), &cfg());
    assert!(d.frontends.is_empty());
    assert!(d.problems.is_empty());
}

#[test]
fn rolling_update_falls_back_to_serving_terminating_endpoints() {
    let d = compute(&fixture("rolling-update.yaml"), &cfg());
    assert!(d.problems.is_empty(), "{:?}", d.problems);
    let want = vec![
        terminating(local("10.244.0.50", 8080)),
        terminating(remote("10.244.1.51", 8080)),
    ];
    assert_eq!(get(&d, fid("10.96.140.7", 80, Proto::Tcp)).backends, want);
    let n = get(&d, nodeport(30880, Proto::Tcp));
    assert_eq!(n.flags, flags::NODEPORT);
    assert_eq!(n.backends, want);
}

#[test]
fn rolling_update_uses_ready_endpoints_once_one_is_ready() {
    let mut o = fixture("rolling-update.yaml");
    let eps = o.slices[0].endpoints.as_mut().expect("endpoints");
    let new = eps
        .iter_mut()
        .find(|e| e.addresses[0] == "10.244.0.60")
        .expect("new pod");
    new.conditions = Some(EndpointConditions {
        ready: Some(true),
        serving: Some(true),
        terminating: Some(false),
    });
    let d = compute(&o, &cfg());
    assert_eq!(
        get(&d, fid("10.96.140.7", 80, Proto::Tcp)).backends,
        vec![local("10.244.0.60", 8080)]
    );
}

#[test]
fn named_target_port_resolves_per_slice() {
    let d = compute(&fixture("named-targetport.yaml"), &cfg());
    assert!(d.problems.is_empty(), "{:?}", d.problems);
    assert_eq!(
        get(&d, fid("10.96.33.33", 80, Proto::Tcp)).backends,
        vec![local("10.244.0.70", 8080), remote("10.244.1.71", 8081)]
    );
    assert_eq!(
        get(&d, fid("10.96.33.33", 9090, Proto::Tcp)).backends,
        vec![local("10.244.0.70", 9090), remote("10.244.1.71", 9090)]
    );
}

#[test]
fn node_fixture_gives_ipv4_internal_and_external_addresses() {
    let mut o = fixture("node-a.yaml");
    assert_eq!(o.nodes.len(), 1);
    o.services.clear();
    let mut c = cfg();
    c.extra_node_addrs = vec![ip("10.0.0.1")];
    let d = compute(&o, &c);
    assert!(d.problems.is_empty(), "{:?}", d.problems);
    let got: Vec<Ipv4Addr> = d.node_addrs.into_iter().collect();
    assert_eq!(
        got,
        vec![ip("10.0.0.1"), ip("192.168.1.10"), ip("198.51.100.10")]
    );
}

#[test]
fn node_of_another_name_is_a_peer_and_the_own_node_is_reported_missing() {
    let mut o = fixture("node-a.yaml");
    o.services.clear();
    let d = compute(&o, &ModelConfig::new("node-b"));
    assert!(d.node_addrs.is_empty());
    assert!(!d.own_node_found);
    assert_eq!(d.peer_nodes.get("node-a"), Some(&ip("192.168.1.10")));
    let w = d.node_warning.as_deref().unwrap_or_default();
    assert!(
        w.contains("Node node-b: this node's own Node object was not found"),
        "{w}"
    );
    assert!(d.problems.is_empty(), "{:?}", d.problems);
}

#[test]
fn kubernetes_default_service_has_remote_endpoint_without_node_name() {
    let d = compute(&fixture("kubernetes-default.yaml"), &cfg());
    assert!(d.problems.is_empty(), "{:?}", d.problems);
    assert_eq!(
        get(&d, fid("10.96.0.1", 443, Proto::Tcp)).backends,
        vec![remote("192.168.1.10", 6443)]
    );
}

#[test]
fn whole_fixture_directory() {
    let (o, problems) = manifests::load_dir(&data_dir()).expect("data dir");
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(o.services.len(), 6);
    assert_eq!(o.slices.len(), 7);
    assert_eq!(o.pods.len(), 2);
    let d = compute(&o, &cfg());
    assert!(d.problems.is_empty(), "{:?}", d.problems);
    // kube-dns 3 + ingress 6 (+ 4 in-cluster twins of its Local frontends) + checkout 2 +
    // api 2 + kubernetes 1 + hostPorts 2.
    assert_eq!(d.frontends.len(), 20);
    assert_eq!(d.node_addrs.len(), 2);
}

// ---------------------------------------------------------------------------------------
// Services
// ---------------------------------------------------------------------------------------

#[test]
fn missing_type_defaults_to_cluster_ip() {
    let mut o = simple(vec![ep("10.244.0.5", Some(NODE))]);
    spec_mut(&mut o.services[0]).type_ = None;
    let d = compute(&o, &cfg());
    assert_eq!(
        get(&d, fid("10.96.0.100", 80, Proto::Tcp)).backends,
        vec![local("10.244.0.5", 8080)]
    );
}

#[test]
fn missing_protocol_defaults_to_tcp_on_service_and_slice() {
    let o = objs(
        vec![service(
            "default",
            "web",
            "ClusterIP",
            "10.96.0.100",
            vec![sport("http", 80, None)],
        )],
        vec![slice(
            "default",
            "web",
            "web-1",
            vec![eport("http", Some(8080), None)],
            vec![ep("10.244.0.5", Some(NODE))],
        )],
        vec![],
    );
    let d = compute(&o, &cfg());
    assert!(d.problems.is_empty(), "{:?}", d.problems);
    assert_eq!(
        get(&d, fid("10.96.0.100", 80, Proto::Tcp)).backends,
        vec![local("10.244.0.5", 8080)]
    );
}

#[test]
fn sctp_port_is_skipped_with_a_problem_other_ports_served() {
    let o = objs(
        vec![service(
            "telco",
            "sig",
            "ClusterIP",
            "10.96.7.7",
            vec![
                sport("sctp", 3868, Some("SCTP")),
                sport("tcp", 3868, Some("TCP")),
            ],
        )],
        vec![],
        vec![],
    );
    let d = compute(&o, &cfg());
    assert!(has_problem(&d, "Service telco/sig", "SCTP"));
    assert_eq!(d.frontends.len(), 1);
    assert!(d
        .frontends
        .contains_key(&fid("10.96.7.7", 3868, Proto::Tcp)));
}

#[test]
fn external_name_service_produces_nothing() {
    let mut s = service(
        "default",
        "db",
        "ExternalName",
        "",
        vec![sport("pg", 5432, Some("TCP"))],
    );
    let spec = spec_mut(&mut s);
    spec.cluster_ip = None;
    spec.cluster_ips = None;
    spec.external_name = Some("db.example.com".to_string());
    let d = compute(&objs(vec![s], vec![], vec![]), &cfg());
    assert!(d.frontends.is_empty());
    assert!(d.problems.is_empty());
}

#[test]
fn unknown_service_type_is_a_problem() {
    let s = service(
        "default",
        "x",
        "Magic",
        "10.96.0.9",
        vec![sport("", 80, None)],
    );
    let d = compute(&objs(vec![s], vec![], vec![]), &cfg());
    assert!(d.frontends.is_empty());
    assert!(has_problem(&d, "Service default/x", "unsupported type"));
}

#[test]
fn nodeport_out_of_range_is_a_problem_cluster_ip_still_served() {
    let s = service(
        "default",
        "web",
        "NodePort",
        "10.96.0.100",
        vec![np(sport("http", 80, None), 8080)],
    );
    let d = compute(&objs(vec![s], vec![], vec![]), &cfg());
    assert!(has_problem(
        &d,
        "Service default/web",
        "outside the node port range"
    ));
    assert_eq!(
        d.frontends.keys().copied().collect::<Vec<_>>(),
        vec![fid("10.96.0.100", 80, Proto::Tcp)]
    );
}

#[test]
fn custom_nodeport_range_accepts_the_port() {
    let s = service(
        "default",
        "web",
        "NodePort",
        "10.96.0.100",
        vec![np(sport("http", 80, None), 8080)],
    );
    let mut c = cfg();
    c.nodeport_range = 8000..=9000;
    let d = compute(&objs(vec![s], vec![], vec![]), &c);
    assert!(d.problems.is_empty());
    assert_eq!(get(&d, nodeport(8080, Proto::Tcp)).flags, flags::NODEPORT);
}

#[test]
fn duplicate_nodeport_older_service_wins_in_any_order() {
    let mut old = service(
        "b",
        "old",
        "NodePort",
        "10.96.0.1",
        vec![np(sport("", 80, None), 30001)],
    );
    old.metadata = created(old.metadata, "2023-01-01T00:00:00Z");
    let mut new = service(
        "a",
        "new",
        "NodePort",
        "10.96.0.2",
        vec![np(sport("", 80, None), 30001)],
    );
    new.metadata = created(new.metadata, "2024-01-01T00:00:00Z");
    for services in [
        vec![old.clone(), new.clone()],
        vec![new.clone(), old.clone()],
    ] {
        let d = compute(&objs(services, vec![], vec![]), &cfg());
        assert_eq!(get(&d, nodeport(30001, Proto::Tcp)).owner, "b/old:80");
        assert!(has_problem(&d, "Service a/new", "b/old:80"));
        // The loser's ClusterIP frontend is still served.
        assert!(d.frontends.contains_key(&fid("10.96.0.2", 80, Proto::Tcp)));
    }
}

#[test]
fn duplicate_nodeport_without_timestamps_first_by_namespace_name_wins() {
    let a = service(
        "default",
        "alpha",
        "NodePort",
        "10.96.0.1",
        vec![np(sport("", 80, None), 30002)],
    );
    let b = service(
        "default",
        "beta",
        "NodePort",
        "10.96.0.2",
        vec![np(sport("", 80, None), 30002)],
    );
    let d = compute(&objs(vec![b, a], vec![], vec![]), &cfg());
    assert_eq!(
        get(&d, nodeport(30002, Proto::Tcp)).owner,
        "default/alpha:80"
    );
    assert!(has_problem(&d, "Service default/beta", "conflicts"));
}

#[test]
fn same_nodeport_for_tcp_and_udp_is_fine() {
    let s = service(
        "kube-system",
        "dns-ext",
        "NodePort",
        "10.96.0.53",
        vec![
            np(sport("dns", 53, Some("UDP")), 30053),
            np(sport("dns-tcp", 53, Some("TCP")), 30053),
        ],
    );
    let d = compute(&objs(vec![s], vec![], vec![]), &cfg());
    assert!(d.problems.is_empty(), "{:?}", d.problems);
    assert!(d.frontends.contains_key(&nodeport(30053, Proto::Udp)));
    assert!(d.frontends.contains_key(&nodeport(30053, Proto::Tcp)));
}

#[test]
fn nodeport_service_without_nodeport_is_a_problem() {
    let s = service(
        "default",
        "web",
        "NodePort",
        "10.96.0.100",
        vec![sport("http", 80, None)],
    );
    let d = compute(&objs(vec![s], vec![], vec![]), &cfg());
    assert!(has_problem(&d, "Service default/web", "without a nodePort"));
    assert_eq!(d.frontends.len(), 1);
}

#[test]
fn load_balancer_without_node_ports_by_choice_is_fine() {
    let mut s = service(
        "default",
        "vip",
        "LoadBalancer",
        "10.96.0.100",
        vec![sport("http", 80, None)],
    );
    spec_mut(&mut s).allocate_load_balancer_node_ports = Some(false);
    let s = with_lb_ingress(s, &["192.0.2.1"]);
    let d = compute(&objs(vec![s], vec![], vec![]), &cfg());
    assert!(d.problems.is_empty(), "{:?}", d.problems);
    assert_eq!(
        get(&d, fid("192.0.2.1", 80, Proto::Tcp)).flags,
        flags::LOADBALANCER
    );
    assert_eq!(d.frontends.len(), 2);
}

#[test]
fn malformed_cluster_ip_is_a_problem_nodeport_still_served() {
    let s = service(
        "default",
        "web",
        "NodePort",
        "10.96.0.300",
        vec![np(sport("http", 80, None), 30080)],
    );
    let d = compute(&objs(vec![s], vec![], vec![]), &cfg());
    assert!(has_problem(
        &d,
        "Service default/web",
        "malformed clusterIP"
    ));
    assert_eq!(
        d.frontends.keys().copied().collect::<Vec<_>>(),
        vec![nodeport(30080, Proto::Tcp)]
    );
}

#[test]
fn external_ips_malformed_one_skipped_with_local_policy() {
    let mut s = service(
        "default",
        "web",
        "ClusterIP",
        "10.96.0.100",
        vec![sport("http", 80, None)],
    );
    let spec = spec_mut(&mut s);
    spec.external_ips = Some(vec![
        "198.51.100.7".into(),
        "not-an-ip".into(),
        "2001:db8::7".into(),
    ]);
    spec.external_traffic_policy = Some("Local".into());
    let sl = slice(
        "default",
        "web",
        "web-1",
        vec![eport("http", Some(8080), None)],
        vec![
            ep("10.244.0.5", Some(NODE)),
            ep("10.244.1.5", Some("node-b")),
        ],
    );
    let d = compute(&objs(vec![s], vec![sl], vec![]), &cfg());
    assert!(has_problem(
        &d,
        "Service default/web",
        "malformed externalIP \"not-an-ip\""
    ));
    let e = get(&d, fid("198.51.100.7", 80, Proto::Tcp));
    assert_eq!(e.flags, flags::EXTERNAL_IP | flags::EXT_LOCAL);
    assert_eq!(e.backends, vec![local("10.244.0.5", 8080)]);
    assert_eq!(
        get(&d, fid("10.96.0.100", 80, Proto::Tcp)).backends.len(),
        2
    );
    // In-cluster clients of the externalIP reach both endpoints.
    assert_eq!(
        get(&d, fid("198.51.100.7", 80, Proto::Tcp).internal())
            .backends
            .len(),
        2
    );
    assert_eq!(d.frontends.len(), 3);
}

#[test]
fn lb_ingress_malformed_hostname_only_and_proxy_mode() {
    let s = service(
        "default",
        "web",
        "LoadBalancer",
        "10.96.0.100",
        vec![np(sport("http", 80, None), 30080)],
    );
    let mut s = with_lb_ingress(s, &["203.0.113.5", "bogus", "203.0.113.6"]);
    let ing = s
        .status
        .as_mut()
        .and_then(|st| st.load_balancer.as_mut())
        .and_then(|lb| lb.ingress.as_mut())
        .expect("ingress");
    ing.push(LoadBalancerIngress {
        hostname: Some("a1b2.elb.amazonaws.com".into()),
        ..Default::default()
    });
    ing[2].ip_mode = Some("Proxy".into());
    let d = compute(&objs(vec![s], vec![], vec![]), &cfg());
    assert!(has_problem(
        &d,
        "Service default/web",
        "malformed loadBalancer ingress IP \"bogus\""
    ));
    assert_eq!(d.problems.len(), 1);
    assert!(d
        .frontends
        .contains_key(&fid("203.0.113.5", 80, Proto::Tcp)));
    assert!(!d
        .frontends
        .contains_key(&fid("203.0.113.6", 80, Proto::Tcp)));
    assert_eq!(d.frontends.len(), 3);
}

#[test]
fn lb_ingress_ip_equal_to_external_ip_merges_flags() {
    let mut s = service(
        "default",
        "web",
        "LoadBalancer",
        "10.96.0.100",
        vec![np(sport("http", 80, None), 30080)],
    );
    spec_mut(&mut s).external_ips = Some(vec!["203.0.113.5".into()]);
    let s = with_lb_ingress(s, &["203.0.113.5"]);
    let d = compute(&objs(vec![s], vec![], vec![]), &cfg());
    assert!(d.problems.is_empty(), "{:?}", d.problems);
    assert_eq!(
        get(&d, fid("203.0.113.5", 80, Proto::Tcp)).flags,
        flags::EXTERNAL_IP | flags::LOADBALANCER
    );
}

#[test]
fn external_ip_hijacking_another_cluster_ip_loses_to_the_older_service() {
    let mut victim = service(
        "default",
        "db",
        "ClusterIP",
        "10.96.0.50",
        vec![sport("", 5432, None)],
    );
    victim.metadata = created(victim.metadata, "2023-01-01T00:00:00Z");
    let mut attacker = service(
        "evil",
        "mitm",
        "ClusterIP",
        "10.96.0.66",
        vec![sport("", 5432, None)],
    );
    attacker.metadata = created(attacker.metadata, "2024-01-01T00:00:00Z");
    spec_mut(&mut attacker).external_ips = Some(vec!["10.96.0.50".into()]);
    let d = compute(&objs(vec![attacker, victim], vec![], vec![]), &cfg());
    let fe = get(&d, fid("10.96.0.50", 5432, Proto::Tcp));
    assert_eq!(fe.owner, "default/db:5432");
    assert_eq!(fe.flags, flags::CLUSTERIP);
    assert!(has_problem(&d, "Service evil/mitm", "default/db:5432"));
}

#[test]
fn invalid_service_port_numbers_are_problems() {
    let s = service(
        "default",
        "web",
        "ClusterIP",
        "10.96.0.100",
        vec![
            sport("zero", 0, None),
            sport("big", 70000, None),
            sport("ok", 80, None),
        ],
    );
    let d = compute(&objs(vec![s], vec![], vec![]), &cfg());
    assert!(has_problem(
        &d,
        "Service default/web",
        "invalid port number 0"
    ));
    assert!(has_problem(
        &d,
        "Service default/web",
        "invalid port number 70000"
    ));
    assert_eq!(d.frontends.len(), 1);
}

#[test]
fn dual_stack_service_serves_only_ipv4() {
    let mut s = service(
        "default",
        "web",
        "ClusterIP",
        "10.96.0.100",
        vec![sport("http", 80, None)],
    );
    spec_mut(&mut s).cluster_ips = Some(vec!["10.96.0.100".into(), "fd00:10:96::100".into()]);
    let v6 = EndpointSlice {
        address_type: "IPv6".into(),
        ..slice(
            "default",
            "web",
            "web-v6",
            vec![eport("http", Some(8080), None)],
            vec![ep("fd00:10:244::5", Some(NODE))],
        )
    };
    let v4 = slice(
        "default",
        "web",
        "web-v4",
        vec![eport("http", Some(8080), None)],
        vec![ep("10.244.0.5", Some(NODE))],
    );
    let d = compute(&objs(vec![s], vec![v6, v4], vec![]), &cfg());
    assert!(d.problems.is_empty(), "{:?}", d.problems);
    assert_eq!(d.frontends.len(), 1);
    assert_eq!(
        get(&d, fid("10.96.0.100", 80, Proto::Tcp)).backends,
        vec![local("10.244.0.5", 8080)]
    );
}

#[test]
fn service_without_cluster_ip_is_a_problem_but_nodeport_served() {
    let mut s = service(
        "default",
        "web",
        "NodePort",
        "",
        vec![np(sport("http", 80, None), 30080)],
    );
    spec_mut(&mut s).cluster_ips = None;
    let d = compute(&objs(vec![s], vec![], vec![]), &cfg());
    assert!(has_problem(&d, "Service default/web", "no clusterIP"));
    assert!(d.frontends.contains_key(&nodeport(30080, Proto::Tcp)));
}

// ---------------------------------------------------------------------------------------
// Endpoints
// ---------------------------------------------------------------------------------------

#[test]
fn selectorless_service_without_slices_has_a_frontend_without_backends() {
    let mut s = service(
        "default",
        "external-db",
        "ClusterIP",
        "10.96.0.60",
        vec![sport("pg", 5432, None)],
    );
    spec_mut(&mut s).selector = None;
    let d = compute(&objs(vec![s], vec![], vec![]), &cfg());
    assert!(d.problems.is_empty());
    assert!(get(&d, fid("10.96.0.60", 5432, Proto::Tcp))
        .backends
        .is_empty());
}

#[test]
fn selectorless_service_with_manual_slice() {
    let mut s = service(
        "default",
        "external-db",
        "ClusterIP",
        "10.96.0.60",
        vec![sport("pg", 5432, None)],
    );
    spec_mut(&mut s).selector = None;
    let sl = slice(
        "default",
        "external-db",
        "external-db-1",
        vec![eport("pg", Some(5432), None)],
        vec![ep("192.168.50.5", None)],
    );
    let d = compute(&objs(vec![s], vec![sl], vec![]), &cfg());
    assert_eq!(
        get(&d, fid("10.96.0.60", 5432, Proto::Tcp)).backends,
        vec![remote("192.168.50.5", 5432)]
    );
}

#[test]
fn ready_nil_counts_as_ready() {
    let mut e = ep("10.244.0.5", Some(NODE));
    e.conditions = Some(EndpointConditions::default());
    let mut e2 = ep("10.244.0.6", Some(NODE));
    e2.conditions = None;
    let d = compute(&simple(vec![e, e2]), &cfg());
    assert_eq!(
        get(&d, fid("10.96.0.100", 80, Proto::Tcp)).backends,
        vec![local("10.244.0.5", 8080), local("10.244.0.6", 8080)]
    );
}

#[test]
fn not_ready_and_not_terminating_endpoints_are_not_used() {
    let d = compute(
        &simple(vec![ep_cond("10.244.0.5", NODE, false, false, false)]),
        &cfg(),
    );
    assert!(get(&d, fid("10.96.0.100", 80, Proto::Tcp))
        .backends
        .is_empty());
}

#[test]
fn endpoint_in_two_slices_is_deduplicated() {
    let mut o = simple(vec![ep("10.244.0.5", Some(NODE))]);
    o.slices.push(slice(
        "default",
        "web",
        "web-2",
        vec![eport("http", Some(8080), Some("TCP"))],
        vec![
            ep("10.244.0.5", Some(NODE)),
            ep("10.244.1.9", Some("node-b")),
        ],
    ));
    let d = compute(&o, &cfg());
    assert_eq!(
        get(&d, fid("10.96.0.100", 80, Proto::Tcp)).backends,
        vec![local("10.244.0.5", 8080), remote("10.244.1.9", 8080)]
    );
}

#[test]
fn malformed_endpoint_address_is_skipped_once_others_served() {
    let o = objs(
        vec![service(
            "default",
            "web",
            "ClusterIP",
            "10.96.0.100",
            vec![sport("http", 80, None), sport("https", 443, None)],
        )],
        vec![slice(
            "default",
            "web",
            "web-1",
            vec![
                eport("http", Some(8080), None),
                eport("https", Some(8443), None),
            ],
            vec![ep("10.244.0.500", Some(NODE)), ep("10.244.0.5", Some(NODE))],
        )],
        vec![],
    );
    let d = compute(&o, &cfg());
    assert_eq!(d.problems.len(), 1, "{:?}", d.problems);
    assert!(has_problem(
        &d,
        "EndpointSlice default/web-1",
        "10.244.0.500"
    ));
    assert_eq!(
        get(&d, fid("10.96.0.100", 443, Proto::Tcp)).backends,
        vec![local("10.244.0.5", 8443)]
    );
}

#[test]
fn slice_port_without_number_is_skipped() {
    let mut o = simple(vec![ep("10.244.0.5", Some(NODE))]);
    o.slices[0].ports = Some(vec![eport("http", None, Some("TCP"))]);
    let d = compute(&o, &cfg());
    assert!(has_problem(
        &d,
        "EndpointSlice default/web-1",
        "no port number"
    ));
    assert!(get(&d, fid("10.96.0.100", 80, Proto::Tcp))
        .backends
        .is_empty());
}

#[test]
fn slices_join_only_by_label_in_the_same_namespace() {
    let mut o = simple(vec![ep("10.244.0.5", Some(NODE))]);
    // Same service name in another namespace.
    o.slices.push(slice(
        "other",
        "web",
        "web-x",
        vec![eport("http", Some(8080), None)],
        vec![ep("10.244.0.7", Some(NODE))],
    ));
    // No service-name label at all.
    let mut unlabeled = slice(
        "default",
        "web",
        "web-y",
        vec![eport("http", Some(8080), None)],
        vec![ep("10.244.0.8", Some(NODE))],
    );
    unlabeled.metadata.labels = None;
    o.slices.push(unlabeled);
    let d = compute(&o, &cfg());
    assert_eq!(
        get(&d, fid("10.96.0.100", 80, Proto::Tcp)).backends,
        vec![local("10.244.0.5", 8080)]
    );
}

#[test]
fn unnamed_single_port_matches_unnamed_slice_port() {
    for slice_port_name in [None, Some("")] {
        let mut o = objs(
            vec![service(
                "default",
                "web",
                "ClusterIP",
                "10.96.0.100",
                vec![sport("", 80, None)],
            )],
            vec![slice(
                "default",
                "web",
                "web-1",
                vec![],
                vec![ep("10.244.0.5", Some(NODE))],
            )],
            vec![],
        );
        o.slices[0].ports = Some(vec![EndpointPort {
            name: slice_port_name.map(str::to_string),
            port: Some(8080),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]);
        let d = compute(&o, &cfg());
        let fe = get(&d, fid("10.96.0.100", 80, Proto::Tcp));
        assert_eq!(fe.owner, "default/web:80");
        assert_eq!(fe.backends, vec![local("10.244.0.5", 8080)]);
    }
}

#[test]
fn slice_port_matches_by_name_and_protocol() {
    // dns (UDP) and dns-tcp (TCP) both on 53; a slice port of the wrong protocol is no match.
    let o = objs(
        vec![service(
            "kube-system",
            "dns",
            "ClusterIP",
            "10.96.0.10",
            vec![sport("dns", 53, Some("UDP"))],
        )],
        vec![slice(
            "kube-system",
            "dns",
            "dns-1",
            vec![eport("dns", Some(53), Some("TCP"))],
            vec![ep("10.244.0.3", Some(NODE))],
        )],
        vec![],
    );
    let d = compute(&o, &cfg());
    assert!(get(&d, fid("10.96.0.10", 53, Proto::Udp))
        .backends
        .is_empty());
}

#[test]
fn local_policy_falls_back_to_local_terminating_endpoints_only() {
    let mut s = service(
        "default",
        "web",
        "NodePort",
        "10.96.0.100",
        vec![np(sport("http", 80, None), 30080)],
    );
    spec_mut(&mut s).external_traffic_policy = Some("Local".into());
    let sl = slice(
        "default",
        "web",
        "web-1",
        vec![eport("http", Some(8080), None)],
        vec![
            ep_cond("10.244.0.5", NODE, false, true, true),
            ep("10.244.1.5", Some("node-b")),
        ],
    );
    let d = compute(&objs(vec![s], vec![sl], vec![]), &cfg());
    // NodePort: no local ready endpoint -> the local terminating one.
    assert_eq!(
        get(&d, nodeport(30080, Proto::Tcp)).backends,
        vec![terminating(local("10.244.0.5", 8080))]
    );
    // ClusterIP: the remote ready endpoint.
    assert_eq!(
        get(&d, fid("10.96.0.100", 80, Proto::Tcp)).backends,
        vec![remote("10.244.1.5", 8080)]
    );
}

#[test]
fn internal_traffic_policy_local_restricts_cluster_ip() {
    let mut o = simple(vec![
        ep("10.244.0.5", Some(NODE)),
        ep("10.244.1.5", Some("node-b")),
    ]);
    spec_mut(&mut o.services[0]).internal_traffic_policy = Some("Local".into());
    let d = compute(&o, &cfg());
    let fe = get(&d, fid("10.96.0.100", 80, Proto::Tcp));
    assert_eq!(fe.flags, flags::CLUSTERIP);
    assert_eq!(fe.backends, vec![local("10.244.0.5", 8080)]);
}

// ---------------------------------------------------------------------------------------
// hostPorts
// ---------------------------------------------------------------------------------------

#[test]
fn hostport_with_host_ip_and_wildcard_host_ip() {
    let p = pod(
        "default",
        "p",
        NODE,
        Some("10.244.0.9"),
        vec![
            hostport(80, 8080, None, Some("192.168.1.10")),
            hostport(53, 5353, Some("UDP"), Some("0.0.0.0")),
            hostport(443, 8443, Some("TCP"), Some("")),
        ],
    );
    let d = compute(&objs(vec![], vec![], vec![p]), &cfg());
    assert!(d.problems.is_empty(), "{:?}", d.problems);
    assert_eq!(
        get(&d, fid("192.168.1.10", 8080, Proto::Tcp)).backends,
        vec![local("10.244.0.9", 80)]
    );
    assert_eq!(
        get(&d, nodeport(5353, Proto::Udp)).backends,
        vec![local("10.244.0.9", 53)]
    );
    assert!(d.frontends.contains_key(&nodeport(8443, Proto::Tcp)));
}

#[test]
fn hostport_malformed_host_ip_and_sctp_are_problems() {
    let p = pod(
        "default",
        "p",
        NODE,
        Some("10.244.0.9"),
        vec![
            hostport(80, 8080, None, Some("192.168.1.300")),
            hostport(9, 9999, Some("SCTP"), None),
            hostport(81, 8081, None, None),
        ],
    );
    let d = compute(&objs(vec![], vec![], vec![p]), &cfg());
    assert!(has_problem(&d, "Pod default/p", "malformed hostIP"));
    assert!(has_problem(&d, "Pod default/p", "SCTP"));
    assert_eq!(
        d.frontends.keys().copied().collect::<Vec<_>>(),
        vec![nodeport(8081, Proto::Tcp)]
    );
}

#[test]
fn hostport_conflict_between_pods_older_wins() {
    let mut a = pod(
        "default",
        "zz-old",
        NODE,
        Some("10.244.0.9"),
        vec![hostport(80, 8000, None, None)],
    );
    a.metadata = created(a.metadata, "2024-01-01T00:00:00Z");
    let mut b = pod(
        "default",
        "aa-new",
        NODE,
        Some("10.244.0.10"),
        vec![hostport(80, 8000, None, None)],
    );
    b.metadata = created(b.metadata, "2024-02-01T00:00:00Z");
    let d = compute(&objs(vec![], vec![], vec![b, a]), &cfg());
    let fe = get(&d, nodeport(8000, Proto::Tcp));
    assert_eq!(fe.owner, "pod default/zz-old");
    assert_eq!(fe.backends, vec![local("10.244.0.9", 80)]);
    assert!(has_problem(&d, "Pod default/aa-new", "pod default/zz-old"));
}

#[test]
fn hostport_colliding_with_nodeport_first_claim_wins() {
    let mut s = service(
        "default",
        "web",
        "NodePort",
        "10.96.0.100",
        vec![np(sport("http", 80, None), 30080)],
    );
    let mut p = pod(
        "default",
        "p",
        NODE,
        Some("10.244.0.9"),
        vec![hostport(80, 30080, None, None)],
    );
    s.metadata = created(s.metadata, "2024-01-01T00:00:00Z");
    p.metadata = created(p.metadata, "2024-03-01T00:00:00Z");
    let d = compute(&objs(vec![s.clone()], vec![], vec![p.clone()]), &cfg());
    assert_eq!(get(&d, nodeport(30080, Proto::Tcp)).flags, flags::NODEPORT);
    assert!(has_problem(&d, "Pod default/p", "default/web:http"));

    // An older pod keeps its hostPort against a newer Service.
    p.metadata = created(p.metadata, "2023-06-01T00:00:00Z");
    let d = compute(&objs(vec![s], vec![], vec![p]), &cfg());
    assert_eq!(get(&d, nodeport(30080, Proto::Tcp)).flags, flags::HOSTPORT);
    assert!(has_problem(&d, "Service default/web", "pod default/p"));
    assert!(d
        .frontends
        .contains_key(&fid("10.96.0.100", 80, Proto::Tcp)));
}

#[test]
fn finished_pods_have_no_hostports() {
    for phase in ["Succeeded", "Failed"] {
        let mut p = pod(
            "default",
            "job",
            NODE,
            Some("10.244.0.9"),
            vec![hostport(80, 8000, None, None)],
        );
        p.status.as_mut().expect("status").phase = Some(phase.into());
        let d = compute(&objs(vec![], vec![], vec![p]), &cfg());
        assert!(d.frontends.is_empty(), "{phase}");
    }
}

#[test]
fn pending_pod_without_ip_is_skipped_silently() {
    let mut p = pod(
        "default",
        "p",
        NODE,
        None,
        vec![hostport(80, 8000, None, None)],
    );
    p.status.as_mut().expect("status").phase = Some("Pending".into());
    let d = compute(&objs(vec![], vec![], vec![p]), &cfg());
    assert!(d.frontends.is_empty());
    assert!(d.problems.is_empty());
}

#[test]
fn malformed_pod_ip_is_a_problem() {
    let p = pod(
        "default",
        "p",
        NODE,
        Some("10.244.0"),
        vec![hostport(80, 8000, None, None)],
    );
    let d = compute(&objs(vec![], vec![], vec![p]), &cfg());
    assert!(d.frontends.is_empty());
    assert!(has_problem(&d, "Pod default/p", "malformed podIP"));
}

#[test]
fn hostnetwork_wins_over_hostports() {
    let mut p = pod(
        "default",
        "p",
        NODE,
        Some("192.168.1.10"),
        vec![hostport(80, 80, None, None)],
    );
    p.spec.as_mut().expect("spec").host_network = Some(true);
    let d = compute(&objs(vec![], vec![], vec![p]), &cfg());
    assert!(d.frontends.is_empty());
    assert!(d.problems.is_empty());
}

#[test]
fn sidecar_init_container_hostport_counts() {
    let mut p = pod("default", "p", NODE, Some("10.244.0.9"), vec![]);
    let spec = p.spec.as_mut().expect("spec");
    spec.init_containers = Some(vec![
        Container {
            name: "proxy".into(),
            restart_policy: Some("Always".into()),
            ports: Some(vec![hostport(15001, 15001, None, None)]),
            ..Default::default()
        },
        Container {
            name: "setup".into(),
            ports: Some(vec![hostport(9000, 9000, None, None)]),
            ..Default::default()
        },
    ]);
    let d = compute(&objs(vec![], vec![], vec![p]), &cfg());
    assert_eq!(
        d.frontends.keys().copied().collect::<Vec<_>>(),
        vec![nodeport(15001, Proto::Tcp)]
    );
}

// ---------------------------------------------------------------------------------------
// Whole-model properties
// ---------------------------------------------------------------------------------------

#[test]
fn input_order_does_not_matter() {
    let (o, _) = manifests::load_dir(&data_dir()).expect("data dir");
    let d1 = compute(&o, &cfg());
    let mut r = o.clone();
    r.services.reverse();
    r.slices.reverse();
    r.pods.reverse();
    let d2 = compute(&r, &cfg());
    assert_eq!(d1, d2);
}

#[test]
fn service_without_spec_is_a_problem_not_a_crash() {
    let s = Service {
        metadata: meta("default", "broken"),
        spec: None,
        status: None,
    };
    let d = compute(&objs(vec![s], vec![], vec![]), &cfg());
    assert!(has_problem(&d, "Service default/broken", "no spec"));
}

#[test]
fn problems_name_namespace_and_name() {
    let s = service(
        "team-a",
        "api",
        "NodePort",
        "10.96.0.5",
        vec![np(sport("http", 80, None), 99)],
    );
    let d = compute(&objs(vec![s], vec![], vec![]), &cfg());
    assert_eq!(d.problems.len(), 1);
    assert_eq!(d.problems[0].object, "Service team-a/api");
    assert!(d.problems[0].reason.contains("nodePort 99"));
    assert!(d.problems[0]
        .to_string()
        .starts_with("Service team-a/api: "));
}

#[test]
fn node_addresses_from_builder_malformed_and_other_types() {
    let n = node(
        NODE,
        &[
            ("InternalIP", "10.0.0.5"),
            ("ExternalIP", "10.0.0.300"),
            ("InternalDNS", "node-a.internal"),
            ("Hostname", "node-a"),
            ("InternalIP", "fd00::5"),
        ],
    );
    let o = Objects {
        nodes: vec![n],
        ..Objects::default()
    };
    let d = compute(&o, &cfg());
    assert_eq!(
        d.node_addrs.iter().copied().collect::<Vec<_>>(),
        vec![ip("10.0.0.5")]
    );
    assert_eq!(d.problems.len(), 1);
    assert!(has_problem(
        &d,
        "Node node-a",
        "malformed ExternalIP address"
    ));
}

#[test]
fn load_balancer_source_ranges_are_served_but_reported() {
    let mut s = service(
        "default",
        "web",
        "LoadBalancer",
        "10.96.0.100",
        vec![np(sport("http", 80, None), 30080)],
    );
    spec_mut(&mut s).load_balancer_source_ranges = Some(vec!["192.0.2.0/24".into()]);
    let s = with_lb_ingress(s, &["203.0.113.5"]);
    let d = compute(&objs(vec![s], vec![], vec![]), &cfg());
    assert!(has_problem(
        &d,
        "Service default/web",
        "loadBalancerSourceRanges"
    ));
    assert!(d
        .frontends
        .contains_key(&fid("203.0.113.5", 80, Proto::Tcp)));
}
