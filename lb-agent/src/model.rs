//! The pure model: Kubernetes objects in, this node's desired frontends and backends out.
//!
//! [`compute`] does no I/O and never fails: an object that cannot be served (malformed
//! address, nodePort out of range, SCTP, a port conflict, ...) is reported as a [`Problem`]
//! (and logged with `log::warn!`), skipped, and everything else is still served. The result
//! is deterministic: the same objects in any order give the same [`Desired`].
//!
//! Semantics follow kube-proxy:
//! - Services of type ClusterIP, NodePort and LoadBalancer; ExternalName and headless
//!   (`clusterIP: None`) services produce nothing.
//! - EndpointSlices join their Service by the `kubernetes.io/service-name` label in the same
//!   namespace; only `addressType: IPv4` slices count, and only an endpoint's first address
//!   (as kube-proxy does). A service port takes the slice port with the same name and
//!   protocol, so a named `targetPort` may resolve to a different number in every slice.
//! - New flows go to ready endpoints; when none is ready, to those that are serving and
//!   terminating (`Backend::terminating`).
//! - `externalTrafficPolicy: Local` restricts NodePort, externalIP and LoadBalancer
//!   frontends to endpoints on this node; `internalTrafficPolicy: Local` does the same for
//!   the ClusterIP frontend.
//! - hostPorts of this node's non-hostNetwork pods become `HOSTPORT` frontends.
//! - When two objects claim the same frontend `(address, port, protocol)`, the older object
//!   (creationTimestamp, then namespace/name) keeps it, so a new object never takes over the
//!   traffic of an existing one (this also defuses externalIPs that name another Service's
//!   clusterIP).
use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::ops::RangeInclusive;

use k8s_openapi::api::core::v1::{ContainerPort, Node, Pod, Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use lb_common::service::flags;

/// Label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The API server's default `--service-node-port-range`.
pub const DEFAULT_NODEPORT_RANGE: RangeInclusive<u16> = 30000..=32767;

/// A Service with this label is handled by another proxy (kube-proxy skips it too).
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// A Service with this label is headless whatever its clusterIP (kube-proxy skips it).
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";

/// The namespace an object without one lives in (as `kubectl apply` does).
pub const DEFAULT_NAMESPACE: &str = "default";

/// Every object the model looks at. The agent fills it from watches, tests and the
/// `manifests` source from files.
#[derive(Debug, Clone, Default)]
pub struct Objects {
    pub services: Vec<Service>,
    pub slices: Vec<EndpointSlice>,
    pub pods: Vec<Pod>,
    /// The cluster's Nodes. This node's own (by [`ModelConfig::node_name`]) gives the NodePort
    /// addresses; the others are the peers that remote endpoints live on.
    pub nodes: Vec<Node>,
}

/// Per-node settings of the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelConfig {
    /// This node's name (`spec.nodeName` of local pods, `nodeName` of local endpoints).
    pub node_name: String,
    /// The cluster's `--service-node-port-range`.
    pub nodeport_range: RangeInclusive<u16>,
    /// Addresses NodePorts answer on in addition to the Node's InternalIP/ExternalIP
    /// (`--node-addr`).
    pub extra_node_addrs: Vec<Ipv4Addr>,
}

impl ModelConfig {
    pub fn new(node_name: impl Into<String>) -> Self {
        Self {
            node_name: node_name.into(),
            nodeport_range: DEFAULT_NODEPORT_RANGE,
            extra_node_addrs: Vec::new(),
        }
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self::new("")
    }
}

/// Transport protocol of a frontend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    /// The IP protocol number used in map keys.
    pub fn ipproto(self) -> u8 {
        match self {
            Proto::Tcp => lb_common::IPPROTO_TCP,
            Proto::Udp => lb_common::IPPROTO_UDP,
        }
    }

    /// The inverse of [`Proto::ipproto`].
    pub fn from_ipproto(p: u8) -> Option<Self> {
        match p {
            lb_common::IPPROTO_TCP => Some(Proto::Tcp),
            lb_common::IPPROTO_UDP => Some(Proto::Udp),
            _ => None,
        }
    }

    /// A Kubernetes `protocol` field; absent or empty defaults to TCP as the API server does.
    pub fn from_k8s(p: Option<&str>) -> Result<Self, String> {
        match p {
            None | Some("") | Some("TCP") => Ok(Proto::Tcp),
            Some("UDP") => Ok(Proto::Udp),
            Some("SCTP") => Err("protocol SCTP is not supported".to_string()),
            Some(other) => Err(format!("unknown protocol {other:?}")),
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
        })
    }
}

/// One `(address, port, protocol)` the datapath answers on, in one lookup scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FrontendId {
    /// `UNSPECIFIED` = any address of this node (NodePort, hostPort without hostIP).
    pub addr: Ipv4Addr,
    pub port: u16,
    pub proto: Proto,
    pub scope: Scope,
}

/// Which traffic a frontend's backend set serves (`lb_common::service::scope`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Scope {
    /// Every frontend has one: what XDP serves to traffic from outside the node (and the
    /// socket hooks, unless the frontend is externalTrafficPolicy Local).
    #[default]
    External,
    /// The twin of an externalTrafficPolicy Local NodePort, externalIP or LoadBalancer
    /// frontend: every ready endpoint, for the node's own processes and pods (kube-proxy
    /// sends in-cluster sources to the cluster-wide endpoints).
    Internal,
}

impl FrontendId {
    pub fn new(addr: Ipv4Addr, port: u16, proto: Proto) -> Self {
        Self {
            addr,
            port,
            proto,
            scope: Scope::External,
        }
    }

    /// The same frontend's in-cluster twin.
    pub fn internal(self) -> Self {
        Self {
            scope: Scope::Internal,
            ..self
        }
    }
}

impl fmt::Display for FrontendId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.addr.is_unspecified() {
            write!(f, "*:{}/{}", self.port, self.proto)?;
        } else {
            write!(f, "{}:{}/{}", self.addr, self.port, self.proto)?;
        }
        if self.scope == Scope::Internal {
            f.write_str(" (in-cluster)")?;
        }
        Ok(())
    }
}

/// What a frontend does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frontend {
    /// [`lb_common::service::flags`] bits.
    pub flags: u16,
    /// `"ns/name:portname"` (`"ns/name:port"` for an unnamed port) or `"pod ns/name"`.
    pub owner: String,
    /// Sorted, deduplicated: the backends that take new flows. Empty = drop.
    pub backends: Vec<Backend>,
    /// sessionAffinity ClientIP timeout in seconds; 0 = no affinity.
    pub affinity_timeout_s: u32,
}

/// One backend of a frontend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Backend {
    pub addr: Ipv4Addr,
    pub port: u16,
    /// The endpoint runs on another node (or on no known node).
    pub remote: bool,
    /// A terminating endpoint, used only because no endpoint is ready.
    pub terminating: bool,
}

/// An object (or part of one) the model could not serve.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Problem {
    /// `"Kind ns/name"` (or `"file.yaml document N"` from the manifests source).
    pub object: String,
    pub reason: String,
}

impl Problem {
    pub fn new(object: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            object: object.into(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.object, self.reason)
    }
}

/// This node's desired dataplane state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    pub node_addrs: BTreeSet<Ipv4Addr>,
    /// This node's primary address: its Node's first InternalIP (else first address), or the
    /// first `--node-addr`. The source of SNATed flows to remote backends.
    pub primary_addr: Option<Ipv4Addr>,
    /// Whether this node's own Node object was found (false: NodePorts answer only on the
    /// `--node-addr` addresses, and [`Desired::node_warning`] says so).
    pub own_node_found: bool,
    /// Why this node has no Node object, for the log, `/metrics` (`lb_node_found`) and
    /// `status`. A node-level condition, not a problem of one object.
    pub node_warning: Option<String>,
    /// The other Nodes by name: their first IPv4 InternalIP (ExternalIP when there is none).
    pub peer_nodes: BTreeMap<String, Ipv4Addr>,
    /// healthCheckNodePorts this node serves (externalTrafficPolicy Local Services), by port.
    pub health_checks: BTreeMap<u16, HealthCheck>,
    pub frontends: BTreeMap<FrontendId, Frontend>,
    pub problems: Vec<Problem>,
}

/// One healthCheckNodePort, as kube-proxy serves it: 200 while this node has local
/// endpoints for the Service, 503 when it has none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HealthCheck {
    pub namespace: String,
    pub name: String,
    /// Ready endpoints of the Service on this node (distinct addresses).
    pub local_endpoints: usize,
}

/// Compute this node's desired state from `objs`.
pub fn compute(objs: &Objects, cfg: &ModelConfig) -> Desired {
    let mut cx = Cx {
        cfg,
        problems: Vec::new(),
        seen: BTreeSet::new(),
    };
    let (node_addrs, own_node_found, peer_nodes, primary_addr) = nodes(&objs.nodes, &mut cx);
    let node_warning = (!own_node_found && !cfg.node_name.is_empty()).then(|| {
        let extra: Vec<String> = cfg
            .extra_node_addrs
            .iter()
            .map(Ipv4Addr::to_string)
            .collect();
        format!(
            "Node {}: this node's own Node object was not found among {} Node(s); NodePorts \
             answer only on the --node-addr addresses ({})",
            cfg.node_name,
            objs.nodes.len(),
            if extra.is_empty() {
                "none".to_string()
            } else {
                extra.join(", ")
            }
        )
    });
    let slices = index_slices(&objs.slices);

    // Older objects claim first, so a new object never takes over an existing frontend.
    let mut claimants: Vec<(AgeKey<'_>, Claimant<'_>)> = Vec::new();
    for svc in &objs.services {
        claimants.push((AgeKey::new(&svc.metadata, 0), Claimant::Service(svc)));
    }
    for pod in &objs.pods {
        claimants.push((AgeKey::new(&pod.metadata, 1), Claimant::Pod(pod)));
    }
    claimants.sort_by(|a, b| a.0.cmp(&b.0));

    let mut frontends = BTreeMap::new();
    let mut services_by_age = Vec::new();
    for (_, c) in claimants {
        let (object, claims) = match c {
            Claimant::Service(svc) => {
                services_by_age.push(svc);
                (
                    object_id("Service", &svc.metadata),
                    service_frontends(svc, &slices, &mut cx),
                )
            }
            Claimant::Pod(pod) => (object_id("Pod", &pod.metadata), pod_frontends(pod, &mut cx)),
        };
        for (id, fe) in claims {
            claim(&mut frontends, &object, id, fe, &mut cx);
        }
    }
    let health_checks = health_checks(&services_by_age, &slices, &frontends, &mut cx);
    Desired {
        primary_addr,
        health_checks,
        node_addrs,
        own_node_found,
        node_warning,
        peer_nodes,
        frontends,
        problems: cx.problems,
    }
}

/// Shared state of one [`compute`] run.
struct Cx<'a> {
    cfg: &'a ModelConfig,
    problems: Vec<Problem>,
    seen: BTreeSet<(String, String)>,
}

impl Cx<'_> {
    /// Record (once) and log a problem.
    fn problem(&mut self, object: &str, reason: impl Into<String>) {
        let reason = reason.into();
        if self.seen.insert((object.to_string(), reason.clone())) {
            log::warn!("{object}: {reason}");
            self.problems.push(Problem::new(object, reason));
        }
    }
}

enum Claimant<'a> {
    Service(&'a Service),
    Pod(&'a Pod),
}

/// Claim order: objects with a creationTimestamp first, oldest first, then by
/// namespace/name, then Services before Pods.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct AgeKey<'a> {
    no_timestamp: bool,
    created: Option<&'a Time>,
    namespace: &'a str,
    name: &'a str,
    kind: u8,
}

impl<'a> AgeKey<'a> {
    fn new(meta: &'a ObjectMeta, kind: u8) -> Self {
        Self {
            no_timestamp: meta.creation_timestamp.is_none(),
            created: meta.creation_timestamp.as_ref(),
            namespace: namespace(meta),
            name: name(meta),
            kind,
        }
    }
}

fn namespace(meta: &ObjectMeta) -> &str {
    match meta.namespace.as_deref() {
        None | Some("") => DEFAULT_NAMESPACE,
        Some(ns) => ns,
    }
}

fn name(meta: &ObjectMeta) -> &str {
    meta.name.as_deref().unwrap_or("")
}

/// `"Kind ns/name"`.
fn object_id(kind: &str, meta: &ObjectMeta) -> String {
    format!("{kind} {}/{}", namespace(meta), name(meta))
}

/// Insert `fe` at `id` unless an earlier claimant holds it.
fn claim(
    frontends: &mut BTreeMap<FrontendId, Frontend>,
    object: &str,
    id: FrontendId,
    fe: Frontend,
    cx: &mut Cx<'_>,
) {
    match frontends.entry(id) {
        Entry::Vacant(e) => {
            e.insert(fe);
        }
        Entry::Occupied(mut e) => {
            let cur = e.get_mut();
            if cur.owner == fe.owner && cur.backends == fe.backends {
                // The same port reached twice (an externalIP that is also the LB ingress IP).
                cur.flags |= fe.flags;
            } else {
                cx.problem(
                    object,
                    format!(
                        "{} ({}) conflicts with {} which claimed it first; ignored",
                        id,
                        kind_name(fe.flags),
                        cur.owner
                    ),
                );
            }
        }
    }
}

fn kind_name(f: u16) -> &'static str {
    if f & flags::NODEPORT != 0 {
        "nodePort"
    } else if f & flags::HOSTPORT != 0 {
        "hostPort"
    } else if f & flags::CLUSTERIP != 0 {
        "clusterIP"
    } else if f & flags::LOADBALANCER != 0 {
        "loadBalancer ingress"
    } else if f & flags::EXTERNAL_IP != 0 {
        "externalIP"
    } else {
        "frontend"
    }
}

/// Parse an IP string: `Ok(Some(v4))`, `Ok(None)` for IPv6 (served by nobody here, not an
/// error), `Err` when malformed.
fn parse_ipv4(s: &str) -> Result<Option<Ipv4Addr>, ()> {
    match s.trim().parse::<IpAddr>() {
        Ok(IpAddr::V4(a)) => Ok(Some(a)),
        Ok(IpAddr::V6(_)) => Ok(None),
        Err(_) => Err(()),
    }
}

/// This node's addresses (its own Node's InternalIP/ExternalIP plus `--node-addr`), whether
/// its own Node was found, and the other Nodes' addresses by name.
///
/// The own Node is the one named [`ModelConfig::node_name`]; with no name configured (tests
/// of a one-node world), a single Node is taken as the own one.
fn nodes(
    nodes: &[Node],
    cx: &mut Cx<'_>,
) -> (
    BTreeSet<Ipv4Addr>,
    bool,
    BTreeMap<String, Ipv4Addr>,
    Option<Ipv4Addr>,
) {
    let mut own: BTreeSet<Ipv4Addr> = cx.cfg.extra_node_addrs.iter().copied().collect();
    let mut peers = BTreeMap::new();
    let want = cx.cfg.node_name.clone();
    let mut found = false;
    let mut primary = cx.cfg.extra_node_addrs.first().copied();
    for node in nodes {
        let node_name = name(&node.metadata);
        let is_own = if want.is_empty() {
            nodes.len() == 1
        } else {
            node_name == want
        };
        let addrs = node_addresses(node, cx);
        let pick = addrs
            .iter()
            .find(|(t, _)| *t == "InternalIP")
            .or_else(|| addrs.first())
            .map(|(_, ip)| *ip);
        if is_own {
            found = true;
            own.extend(addrs.iter().map(|(_, ip)| *ip));
            primary = pick.or(primary);
        } else if let Some(ip) = pick {
            peers.insert(node_name.to_string(), ip);
        }
    }
    (own, found, peers, primary)
}

/// A Node's IPv4 InternalIP and ExternalIP addresses, in status order, with their type.
fn node_addresses(node: &Node, cx: &mut Cx<'_>) -> Vec<(&'static str, Ipv4Addr)> {
    let object = format!("Node {}", name(&node.metadata));
    let mut out = Vec::new();
    let addresses = node.status.as_ref().and_then(|s| s.addresses.as_ref());
    for a in addresses.into_iter().flatten() {
        let kind = match a.type_.as_str() {
            "InternalIP" => "InternalIP",
            "ExternalIP" => "ExternalIP",
            _ => continue,
        };
        match parse_ipv4(&a.address) {
            Ok(Some(ip)) => out.push((kind, ip)),
            Ok(None) => {}
            Err(()) => cx.problem(
                &object,
                format!("malformed {} address {:?}", a.type_, a.address),
            ),
        }
    }
    out
}

/// IPv4 EndpointSlices by (namespace, service name), each list sorted by slice name.
fn index_slices(slices: &[EndpointSlice]) -> HashMap<(&str, &str), Vec<&EndpointSlice>> {
    let mut out: HashMap<(&str, &str), Vec<&EndpointSlice>> = HashMap::new();
    for s in slices {
        if s.address_type != "IPv4" {
            continue;
        }
        let Some(svc) = s
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
        else {
            continue;
        };
        out.entry((namespace(&s.metadata), svc.as_str()))
            .or_default()
            .push(s);
    }
    for v in out.values_mut() {
        v.sort_by(|a, b| name(&a.metadata).cmp(name(&b.metadata)));
    }
    out
}

/// An endpoint address:port for one service port, merged across slices.
#[derive(Default, Clone, Copy)]
struct Candidate {
    ready: bool,
    serving_terminating: bool,
    local: bool,
}

/// The endpoints of one service port, keyed by (address, target port).
type Candidates = BTreeMap<(Ipv4Addr, u16), Candidate>;

fn endpoint_candidates(
    slices: &[&EndpointSlice],
    port_name: &str,
    proto: Proto,
    cx: &mut Cx<'_>,
) -> Candidates {
    let mut out = Candidates::new();
    for slice in slices {
        let object = object_id("EndpointSlice", &slice.metadata);
        let port = slice.ports.iter().flatten().find(|p| {
            p.name.as_deref().unwrap_or("") == port_name
                && Proto::from_k8s(p.protocol.as_deref()).ok() == Some(proto)
        });
        let Some(port) = port else {
            continue;
        };
        let port = match port.port {
            Some(n) if (1..=65535).contains(&n) => n as u16,
            Some(n) => {
                cx.problem(
                    &object,
                    format!("port {port_name:?} has invalid number {n}; skipped"),
                );
                continue;
            }
            None => {
                cx.problem(
                    &object,
                    format!("port {port_name:?} has no port number; skipped"),
                );
                continue;
            }
        };
        for ep in slice.endpoints.iter().flatten() {
            // kube-proxy uses only the first address; the API defines no semantics for more.
            let Some(addr) = ep.addresses.first() else {
                continue;
            };
            let addr = match parse_ipv4(addr) {
                Ok(Some(a)) => a,
                Ok(None) | Err(()) => {
                    cx.problem(
                        &object,
                        format!("malformed IPv4 endpoint address {addr:?}; skipped"),
                    );
                    continue;
                }
            };
            let cond = ep.conditions.as_ref();
            let ready = cond.and_then(|c| c.ready).unwrap_or(true);
            // A missing `serving` means serving, as kube-proxy reads it.
            let serving = cond.and_then(|c| c.serving).unwrap_or(true);
            let terminating = cond.and_then(|c| c.terminating).unwrap_or(false);
            let local = ep.node_name.as_deref() == Some(cx.cfg.node_name.as_str())
                && !cx.cfg.node_name.is_empty();
            let c = out.entry((addr, port)).or_default();
            c.ready |= ready;
            c.serving_terminating |= serving && terminating;
            c.local |= local;
        }
    }
    out
}

/// The backends that take new flows: the ready candidates, or when none is ready, the
/// serving terminating ones. `local_only` keeps only endpoints on this node.
fn select(cands: &Candidates, local_only: bool) -> Vec<Backend> {
    let usable = || cands.iter().filter(|(_, c)| c.local || !local_only);
    let mut ready = usable().filter(|(_, c)| c.ready).peekable();
    let (list, terminating): (Vec<_>, bool) = if ready.peek().is_some() {
        (ready.collect(), false)
    } else {
        (
            usable().filter(|(_, c)| c.serving_terminating).collect(),
            true,
        )
    };
    // Candidates is keyed by (addr, port): already sorted and deduplicated.
    list.into_iter()
        .map(|((addr, port), c)| Backend {
            addr: *addr,
            port: *port,
            remote: !c.local,
            terminating,
        })
        .collect()
}

fn port_label(ns: &str, name: &str, p: &ServicePort) -> String {
    match p.name.as_deref() {
        Some(n) if !n.is_empty() => format!("{ns}/{name}:{n}"),
        _ => format!("{ns}/{name}:{}", p.port),
    }
}

/// The addresses of a Service that do not depend on the port.
struct ServiceAddrs {
    cluster_ips: Vec<Ipv4Addr>,
    external_ips: Vec<Ipv4Addr>,
    lb_ips: Vec<Ipv4Addr>,
}

fn service_addrs(
    spec: &ServiceSpec,
    svc: &Service,
    is_lb: bool,
    object: &str,
    cx: &mut Cx<'_>,
) -> ServiceAddrs {
    let mut ips: Vec<&str> = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(list), _) if !list.is_empty() => list.iter().map(String::as_str).collect(),
        (_, Some(ip)) if !ip.is_empty() => vec![ip.as_str()],
        _ => Vec::new(),
    };
    // clusterIP and clusterIPs[0] agree on a valid object; honour a lone clusterIP too.
    if let Some(ip) = spec.cluster_ip.as_deref() {
        if !ip.is_empty() && !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    let mut cluster_ips = Vec::new();
    for ip in &ips {
        match parse_ipv4(ip) {
            Ok(Some(a)) if !cluster_ips.contains(&a) => cluster_ips.push(a),
            Ok(_) => {}
            Err(()) => cx.problem(object, format!("malformed clusterIP {ip:?}")),
        }
    }
    if ips.is_empty() {
        cx.problem(
            object,
            "has no clusterIP (not allocated); no ClusterIP frontend",
        );
    }

    let mut external_ips = Vec::new();
    for ip in spec.external_ips.iter().flatten() {
        match parse_ipv4(ip) {
            Ok(Some(a)) if !external_ips.contains(&a) => external_ips.push(a),
            Ok(_) => {}
            Err(()) => cx.problem(object, format!("malformed externalIP {ip:?}; skipped")),
        }
    }

    let mut lb_ips = Vec::new();
    if is_lb
        && spec
            .load_balancer_source_ranges
            .as_ref()
            .is_some_and(|r| !r.is_empty())
    {
        cx.problem(
            object,
            "loadBalancerSourceRanges are not enforced by this datapath; \
             the loadBalancer ingress IPs accept every client",
        );
    }
    if is_lb {
        let ingress = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref());
        for ing in ingress.into_iter().flatten() {
            // ipMode Proxy: the load balancer proxies to the nodes itself; kube-proxy does not
            // capture the VIP then. Hostname-only ingress (cloud LBs) has no VIP to capture.
            if ing.ip_mode.as_deref() == Some("Proxy") {
                continue;
            }
            let Some(ip) = ing.ip.as_deref().filter(|ip| !ip.is_empty()) else {
                continue;
            };
            match parse_ipv4(ip) {
                Ok(Some(a)) if !lb_ips.contains(&a) => lb_ips.push(a),
                Ok(_) => {}
                Err(()) => cx.problem(
                    object,
                    format!("malformed loadBalancer ingress IP {ip:?}; skipped"),
                ),
            }
        }
    }
    ServiceAddrs {
        cluster_ips,
        external_ips,
        lb_ips,
    }
}

fn service_frontends(
    svc: &Service,
    slices: &HashMap<(&str, &str), Vec<&EndpointSlice>>,
    cx: &mut Cx<'_>,
) -> Vec<(FrontendId, Frontend)> {
    let object = object_id("Service", &svc.metadata);
    let ns = namespace(&svc.metadata);
    let svc_name = name(&svc.metadata);
    let mut out = Vec::new();
    let Some(spec) = svc.spec.as_ref() else {
        cx.problem(&object, "has no spec");
        return out;
    };
    // Services meant for another proxy, or headless by label, are skipped, as kube-proxy's
    // label selector does.
    let labels = svc.metadata.labels.as_ref();
    if labels
        .is_some_and(|l| l.contains_key(SERVICE_PROXY_NAME_LABEL) || l.contains_key(HEADLESS_LABEL))
    {
        return out;
    }
    let type_ = spec.type_.as_deref().unwrap_or("ClusterIP");
    let (is_nodeport, is_lb) = match type_ {
        "ClusterIP" | "" => (false, false),
        "NodePort" => (true, false),
        "LoadBalancer" => (true, true),
        "ExternalName" => return out,
        other => {
            cx.problem(&object, format!("unsupported type {other:?}"));
            return out;
        }
    };
    let headless = spec.cluster_ip.as_deref() == Some("None")
        || spec
            .cluster_ips
            .as_ref()
            .and_then(|l| l.first())
            .is_some_and(|ip| ip == "None");
    if headless {
        return out;
    }
    let addrs = service_addrs(spec, svc, is_lb, &object, cx);
    let affinity = session_affinity(spec, &object, cx);
    let ext_local = spec.external_traffic_policy.as_deref() == Some("Local");
    let int_local = spec.internal_traffic_policy.as_deref() == Some("Local");
    let ext_flag = if ext_local { flags::EXT_LOCAL } else { 0 };
    let allocate_node_ports = spec.allocate_load_balancer_node_ports.unwrap_or(true);
    let svc_slices: &[&EndpointSlice] = slices
        .get(&(ns, svc_name))
        .map(Vec::as_slice)
        .unwrap_or(&[]);

    for p in spec.ports.iter().flatten() {
        let owner = port_label(ns, svc_name, p);
        let proto = match Proto::from_k8s(p.protocol.as_deref()) {
            Ok(proto) => proto,
            Err(reason) => {
                cx.problem(&object, format!("port {owner}: {reason}; skipped"));
                continue;
            }
        };
        let Some(port) = u16::try_from(p.port).ok().filter(|p| *p != 0) else {
            cx.problem(
                &object,
                format!("port {owner}: invalid port number {}; skipped", p.port),
            );
            continue;
        };
        let port_name = p.name.as_deref().unwrap_or("");
        let cands = endpoint_candidates(svc_slices, port_name, proto, cx);
        let cluster = select(&cands, false);
        let local = select(&cands, true);
        let external = if ext_local { &local } else { &cluster };
        let fe = |flags: u16, backends: &Vec<Backend>| Frontend {
            flags,
            owner: owner.clone(),
            backends: backends.clone(),
            affinity_timeout_s: affinity,
        };

        let internal = if int_local { &local } else { &cluster };
        for ip in &addrs.cluster_ips {
            out.push((
                FrontendId::new(*ip, port, proto),
                fe(flags::CLUSTERIP, internal),
            ));
        }
        if is_nodeport {
            match p.node_port {
                Some(np) if np > 0 => match u16::try_from(np) {
                    Ok(np) if cx.cfg.nodeport_range.contains(&np) => {
                        let id = FrontendId::new(Ipv4Addr::UNSPECIFIED, np, proto);
                        out.push((id, fe(flags::NODEPORT | ext_flag, external)));
                        if ext_local {
                            out.push((id.internal(), fe(flags::NODEPORT | ext_flag, &cluster)));
                        }
                    }
                    _ => cx.problem(
                        &object,
                        format!(
                            "port {owner}: nodePort {np} is outside the node port range {}-{}; \
                             no NodePort frontend",
                            cx.cfg.nodeport_range.start(),
                            cx.cfg.nodeport_range.end()
                        ),
                    ),
                },
                _ if is_lb && !allocate_node_ports => {}
                _ => cx.problem(
                    &object,
                    format!("port {owner}: type {type_} without a nodePort; no NodePort frontend"),
                ),
            }
        }
        for (ips, kind) in [
            (&addrs.external_ips, flags::EXTERNAL_IP),
            (&addrs.lb_ips, flags::LOADBALANCER),
        ] {
            for ip in ips {
                let id = FrontendId::new(*ip, port, proto);
                out.push((id, fe(kind | ext_flag, external)));
                if ext_local {
                    out.push((id.internal(), fe(kind | ext_flag, &cluster)));
                }
            }
        }
    }
    out
}

/// Default `sessionAffinityConfig.clientIP.timeoutSeconds` (3 hours), and the API's maximum.
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;
pub const MAX_AFFINITY_TIMEOUT_S: u32 = 86_400;

/// The sessionAffinity ClientIP timeout of a Service in seconds, 0 for none. An invalid
/// timeout is a problem and the default is used.
fn session_affinity(spec: &ServiceSpec, object: &str, cx: &mut Cx<'_>) -> u32 {
    match spec.session_affinity.as_deref() {
        None | Some("None") | Some("") => 0,
        Some("ClientIP") => {
            let t = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            match t {
                None => DEFAULT_AFFINITY_TIMEOUT_S,
                Some(t) if (1..=i64::from(MAX_AFFINITY_TIMEOUT_S)).contains(&i64::from(t)) => {
                    t as u32
                }
                Some(t) => {
                    cx.problem(
                        object,
                        format!(
                            "sessionAffinityConfig.clientIP.timeoutSeconds {t} is not in \
                             1..={MAX_AFFINITY_TIMEOUT_S}; using {DEFAULT_AFFINITY_TIMEOUT_S}"
                        ),
                    );
                    DEFAULT_AFFINITY_TIMEOUT_S
                }
            }
        }
        Some(other) => {
            cx.problem(
                object,
                format!("unsupported sessionAffinity {other:?}; no affinity"),
            );
            0
        }
    }
}

/// The healthCheckNodePorts of externalTrafficPolicy Local Services (oldest Service first),
/// with their local ready endpoints. A port that another Service's health check or a TCP
/// NodePort/hostPort frontend on the node's addresses already uses is a problem and is not
/// served; the rest still are.
fn health_checks(
    services: &[&Service],
    slices: &HashMap<(&str, &str), Vec<&EndpointSlice>>,
    frontends: &BTreeMap<FrontendId, Frontend>,
    cx: &mut Cx<'_>,
) -> BTreeMap<u16, HealthCheck> {
    let mut out: BTreeMap<u16, HealthCheck> = BTreeMap::new();
    for svc in services {
        let Some(spec) = svc.spec.as_ref() else {
            continue;
        };
        let typed = matches!(spec.type_.as_deref(), Some("NodePort" | "LoadBalancer"));
        if !typed || spec.external_traffic_policy.as_deref() != Some("Local") {
            continue;
        }
        let Some(hc) = spec.health_check_node_port else {
            continue;
        };
        let object = object_id("Service", &svc.metadata);
        let Some(port) = u16::try_from(hc).ok().filter(|p| *p != 0) else {
            cx.problem(
                &object,
                format!("invalid healthCheckNodePort {hc}; not served"),
            );
            continue;
        };
        let wildcard = FrontendId::new(Ipv4Addr::UNSPECIFIED, port, Proto::Tcp);
        if let Some(fe) = frontends.get(&wildcard) {
            cx.problem(
                &object,
                format!(
                    "healthCheckNodePort {port} collides with the frontend {wildcard} ({}); \
                     not served",
                    fe.owner
                ),
            );
            continue;
        }
        let (ns, svc_name) = (namespace(&svc.metadata), name(&svc.metadata));
        if let Some(other) = out.get(&port) {
            cx.problem(
                &object,
                format!(
                    "healthCheckNodePort {port} is already the health check of {}/{}; not \
                     served",
                    other.namespace, other.name
                ),
            );
            continue;
        }
        let mut local = BTreeSet::new();
        for slice in slices.get(&(ns, svc_name)).into_iter().flatten() {
            for ep in slice.endpoints.iter().flatten() {
                let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
                let here = !cx.cfg.node_name.is_empty()
                    && ep.node_name.as_deref() == Some(cx.cfg.node_name.as_str());
                if let (true, true, Some(addr)) = (ready, here, ep.addresses.first()) {
                    local.insert(addr.as_str());
                }
            }
        }
        out.insert(
            port,
            HealthCheck {
                namespace: ns.to_string(),
                name: svc_name.to_string(),
                local_endpoints: local.len(),
            },
        );
    }
    out
}

/// The pod's IPv4 address, `None` when it has none (yet).
fn pod_ipv4(pod: &Pod, object: &str, cx: &mut Cx<'_>) -> Option<Ipv4Addr> {
    let status = pod.status.as_ref()?;
    let listed = status.pod_ips.iter().flatten().map(|p| p.ip.as_str());
    let mut found = None;
    for ip in listed.chain(status.pod_ip.as_deref()) {
        if ip.is_empty() {
            continue;
        }
        match parse_ipv4(ip) {
            Ok(Some(a)) => {
                found.get_or_insert(a);
            }
            Ok(None) => {}
            Err(()) => cx.problem(object, format!("malformed podIP {ip:?}")),
        }
    }
    found
}

fn pod_frontends(pod: &Pod, cx: &mut Cx<'_>) -> Vec<(FrontendId, Frontend)> {
    let mut out = Vec::new();
    let Some(spec) = pod.spec.as_ref() else {
        return out;
    };
    if cx.cfg.node_name.is_empty() || spec.node_name.as_deref() != Some(cx.cfg.node_name.as_str()) {
        return out;
    }
    // hostNetwork pods bind the node's ports themselves: there is nothing to translate.
    if spec.host_network == Some(true) {
        return out;
    }
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded") | Some("Failed")) {
        return out;
    }
    // Regular containers and restartable init containers (sidecars) keep running.
    let sidecars = spec
        .init_containers
        .iter()
        .flatten()
        .filter(|c| c.restart_policy.as_deref() == Some("Always"));
    let ports: Vec<&ContainerPort> = spec
        .containers
        .iter()
        .chain(sidecars)
        .flat_map(|c| c.ports.iter().flatten())
        .filter(|p| p.host_port.is_some_and(|h| h != 0))
        .collect();
    if ports.is_empty() {
        return out;
    }
    let object = object_id("Pod", &pod.metadata);
    let Some(pod_ip) = pod_ipv4(pod, &object, cx) else {
        return out;
    };
    let owner = format!("pod {}/{}", namespace(&pod.metadata), name(&pod.metadata));
    for p in ports {
        let host_port = p.host_port.unwrap_or(0);
        let what = format!("hostPort {host_port}");
        let Some(hp) = u16::try_from(host_port).ok().filter(|h| *h != 0) else {
            cx.problem(&object, format!("{what}: invalid port number; skipped"));
            continue;
        };
        let Some(cp) = u16::try_from(p.container_port).ok().filter(|c| *c != 0) else {
            cx.problem(
                &object,
                format!(
                    "{what}: invalid containerPort {}; skipped",
                    p.container_port
                ),
            );
            continue;
        };
        let proto = match Proto::from_k8s(p.protocol.as_deref()) {
            Ok(proto) => proto,
            Err(reason) => {
                cx.problem(&object, format!("{what}: {reason}; skipped"));
                continue;
            }
        };
        let addr = match p.host_ip.as_deref().map(str::trim) {
            None | Some("") => Ipv4Addr::UNSPECIFIED,
            Some(ip) => match parse_ipv4(ip) {
                Ok(Some(a)) => a,
                Ok(None) => continue, // an IPv6 hostIP: not an IPv4 frontend
                Err(()) => {
                    cx.problem(&object, format!("{what}: malformed hostIP {ip:?}; skipped"));
                    continue;
                }
            },
        };
        out.push((
            FrontendId::new(addr, hp, proto),
            Frontend {
                flags: flags::HOSTPORT,
                owner: owner.clone(),
                backends: vec![Backend {
                    addr: pod_ip,
                    port: cp,
                    remote: false,
                    terminating: false,
                }],
                affinity_timeout_s: 0,
            },
        ));
    }
    out
}
