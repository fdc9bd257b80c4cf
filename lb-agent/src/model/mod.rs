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
mod view;

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::Ipv4Addr;
use std::ops::RangeInclusive;

use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use lb_common::service::flags;

pub(crate) use self::view::{
    local_endpoints, node_state, service_frontends, AgeKey, Cx, NodeState,
};
pub use self::view::{NodeView, PodView, ServiceView, SliceView};

/// A name, namespace or owner label as the agent keeps it: up to 24 bytes inline (most
/// Kubernetes names and `ns/name:port` labels fit), so that the hundreds of thousands the
/// views and the sync hold at scale cost no allocation each.
pub type Name = compact_str::CompactString;

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
    pub owner: Name,
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

/// Default `sessionAffinityConfig.clientIP.timeoutSeconds` (3 hours), and the API's maximum.
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;
pub const MAX_AFFINITY_TIMEOUT_S: u32 = 86_400;

/// Compute this node's desired state from `objs`: the full recompute. The incremental
/// [`crate::controller::Controller`] keeps the same result up to date object by object.
pub fn compute(objs: &Objects, cfg: &ModelConfig) -> Desired {
    let mut cx = Cx::new(cfg);
    let nodes: Vec<NodeView> = objs.nodes.iter().map(NodeView::new).collect();
    let node = view::node_state(nodes.iter(), &mut cx);

    let slice_views: Vec<SliceView> = objs
        .slices
        .iter()
        .filter_map(|s| SliceView::new(s, cfg))
        .collect();
    let slices = index_slices(&slice_views);
    let services: Vec<ServiceView> = objs
        .services
        .iter()
        .map(|s| ServiceView::new(s, cfg))
        .collect();
    let pods: Vec<PodView> = objs.pods.iter().map(|p| PodView::new(p, cfg)).collect();

    // Older objects claim first, so a new object never takes over an existing frontend.
    let mut claimants: Vec<(AgeKey<'_>, Claimant<'_>)> = Vec::new();
    for svc in &services {
        claimants.push((svc.age(), Claimant::Service(svc)));
    }
    for pod in &pods {
        claimants.push((pod.age(), Claimant::Pod(pod)));
    }
    claimants.sort_by(|a, b| a.0.cmp(&b.0));

    let mut frontends = BTreeMap::new();
    let mut services_by_age = Vec::new();
    for (_, c) in claimants {
        let (object, claims) = match c {
            Claimant::Service(svc) => {
                services_by_age.push(svc);
                let svc_slices = slices_of(&slices, &svc.namespace, &svc.name);
                (
                    svc.object(),
                    view::service_frontends(svc, svc_slices, &mut cx),
                )
            }
            Claimant::Pod(pod) => {
                for p in &pod.problems {
                    cx.problem(&p.object, p.reason.as_str());
                }
                (pod.object(), pod.frontends.clone())
            }
        };
        for (id, fe) in claims {
            claim(&mut frontends, &object, id, fe, &mut cx);
        }
    }
    let candidates = services_by_age.iter().filter_map(|svc| {
        let port = svc.health_check()?;
        let local = view::local_endpoints(slices_of(&slices, &svc.namespace, &svc.name));
        Some(HealthCandidate {
            namespace: &svc.namespace,
            name: &svc.name,
            port,
            local_endpoints: local,
        })
    });
    let health_checks = health_checks(candidates, |id| frontends.get(id), &mut cx);
    Desired {
        primary_addr: node.primary_addr,
        health_checks,
        node_addrs: node.node_addrs,
        own_node_found: node.own_node_found,
        node_warning: node.node_warning,
        peer_nodes: node.peer_nodes,
        frontends,
        problems: cx.problems,
    }
}

enum Claimant<'a> {
    Service(&'a ServiceView),
    Pod(&'a PodView),
}

/// IPv4 EndpointSlices by (namespace, service name), each list sorted by slice name.
fn index_slices(slices: &[SliceView]) -> HashMap<(&str, &str), Vec<&SliceView>> {
    let mut out: HashMap<(&str, &str), Vec<&SliceView>> = HashMap::new();
    for s in slices {
        out.entry((s.namespace.as_str(), s.service.as_str()))
            .or_default()
            .push(s);
    }
    for v in out.values_mut() {
        v.sort_by(|a, b| a.name.cmp(&b.name));
    }
    out
}

fn slices_of<'a>(
    index: &'a HashMap<(&'a str, &'a str), Vec<&'a SliceView>>,
    ns: &'a str,
    svc: &'a str,
) -> &'a [&'a SliceView] {
    index.get(&(ns, svc)).map(Vec::as_slice).unwrap_or(&[])
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
            if let Some(reason) = merge_claim(e.get_mut(), &id, &fe) {
                cx.problem(object, reason);
            }
        }
    }
}

/// A later claim `fe` of the frontend `id` that `cur` holds: the same owner with the same
/// backends (the same port reached twice, e.g. an externalIP that is also the LB ingress
/// IP) adds its flags; anything else is a conflict, returned as the problem's reason.
fn merge_claim(cur: &mut Frontend, id: &FrontendId, fe: &Frontend) -> Option<String> {
    if same_claim(cur, fe) {
        cur.flags |= fe.flags;
        None
    } else {
        Some(conflict_reason(id, fe, &cur.owner))
    }
}

/// Whether a later claim `fe` only repeats the holder's `cur` (its flags are added).
pub(crate) fn same_claim(cur: &Frontend, fe: &Frontend) -> bool {
    cur.owner == fe.owner && cur.backends == fe.backends
}

/// Why the later claim `fe` of `id` is ignored.
pub(crate) fn conflict_reason(id: &FrontendId, fe: &Frontend, holder: &str) -> String {
    format!(
        "{} ({}) conflicts with {} which claimed it first; ignored",
        id,
        kind_name(fe.flags),
        holder
    )
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

/// A Service asking for a healthCheckNodePort.
pub(crate) struct HealthCandidate<'a> {
    pub(crate) namespace: &'a str,
    pub(crate) name: &'a str,
    /// The port, or the invalid number asked for.
    pub(crate) port: Result<u16, i32>,
    /// Its ready endpoints on this node (distinct addresses).
    pub(crate) local_endpoints: usize,
}

/// The healthCheckNodePorts of externalTrafficPolicy Local Services (`candidates` oldest
/// first), with their local ready endpoints. A port that another Service's health check or a
/// TCP NodePort/hostPort frontend on the node's addresses already uses is a problem and is
/// not served; the rest still are.
pub(crate) fn health_checks<'a, 'f>(
    candidates: impl Iterator<Item = HealthCandidate<'a>>,
    frontend: impl Fn(&FrontendId) -> Option<&'f Frontend>,
    cx: &mut Cx<'_>,
) -> BTreeMap<u16, HealthCheck> {
    let mut out: BTreeMap<u16, HealthCheck> = BTreeMap::new();
    for c in candidates {
        let object = format!("Service {}/{}", c.namespace, c.name);
        let port = match c.port {
            Ok(port) => port,
            Err(hc) => {
                cx.problem(
                    &object,
                    format!("invalid healthCheckNodePort {hc}; not served"),
                );
                continue;
            }
        };
        let wildcard = FrontendId::new(Ipv4Addr::UNSPECIFIED, port, Proto::Tcp);
        if let Some(fe) = frontend(&wildcard) {
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
        out.insert(
            port,
            HealthCheck {
                namespace: c.namespace.to_string(),
                name: c.name.to_string(),
                local_endpoints: c.local_endpoints,
            },
        );
    }
    out
}
