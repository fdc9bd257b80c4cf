//! Compact views of the Kubernetes objects: only what the model reads, parsed once.
//!
//! A full `Service`, `EndpointSlice` or `Pod` is large (an EndpointSlice with ten endpoints
//! takes several kilobytes in memory); the agent keeps these views instead, made as each
//! object arrives. [`super::compute`] and the incremental [`crate::controller`] both
//! work on them, through the same pure functions of this module:
//!
//! - [`ServiceView`]: the Service's addresses, ports and policies, with the problems that do
//!   not depend on its endpoints already found;
//! - [`SliceView`]: an IPv4 EndpointSlice's ports and endpoints (first address, conditions,
//!   whether on this node);
//! - [`PodView`]: a Pod's hostPort frontends, computed outright (they depend on nothing else);
//! - [`NodeView`]: a Node's IPv4 InternalIP/ExternalIP addresses.
//!
//! [`service_frontends`] is the per-Service reconcile: a view and its Service's slices in,
//! the frontends it claims out.
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use k8s_openapi::api::core::v1::{ContainerPort, Node, Pod, Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use lb_common::service::flags;

use super::{
    Backend, Frontend, FrontendId, ModelConfig, Name, Problem, Proto, DEFAULT_AFFINITY_TIMEOUT_S,
    DEFAULT_NAMESPACE, HEADLESS_LABEL, MAX_AFFINITY_TIMEOUT_S, SERVICE_NAME_LABEL,
    SERVICE_PROXY_NAME_LABEL,
};

/// Collects the problems of one evaluation: each `(object, reason)` once, in order, logged
/// unless quiet.
pub(crate) struct Cx<'a> {
    pub(crate) cfg: &'a ModelConfig,
    pub(crate) problems: Vec<Problem>,
    seen: BTreeSet<(String, String)>,
    quiet: bool,
}

impl<'a> Cx<'a> {
    /// A collector that logs every new problem with `log::warn!`.
    pub(crate) fn new(cfg: &'a ModelConfig) -> Self {
        Self {
            cfg,
            problems: Vec::new(),
            seen: BTreeSet::new(),
            quiet: false,
        }
    }

    /// A collector that only collects (its owner logs what is new).
    pub(crate) fn quiet(cfg: &'a ModelConfig) -> Self {
        Self {
            quiet: true,
            ..Self::new(cfg)
        }
    }

    /// Record (once) and log a problem.
    pub(crate) fn problem(&mut self, object: &str, reason: impl Into<String>) {
        let reason = reason.into();
        if self.seen.insert((object.to_string(), reason.clone())) {
            if !self.quiet {
                log::warn!("{object}: {reason}");
            }
            self.problems.push(Problem::new(object, reason));
        }
    }
}

pub(crate) fn namespace(meta: &ObjectMeta) -> &str {
    match meta.namespace.as_deref() {
        None | Some("") => DEFAULT_NAMESPACE,
        Some(ns) => ns,
    }
}

pub(crate) fn name(meta: &ObjectMeta) -> &str {
    meta.name.as_deref().unwrap_or("")
}

/// Parse an IP string: `Ok(Some(v4))`, `Ok(None)` for IPv6 (served by nobody here, not an
/// error), `Err` when malformed.
pub(crate) fn parse_ipv4(s: &str) -> Result<Option<Ipv4Addr>, ()> {
    match s.trim().parse::<IpAddr>() {
        Ok(IpAddr::V4(a)) => Ok(Some(a)),
        Ok(IpAddr::V6(_)) => Ok(None),
        Err(_) => Err(()),
    }
}

/// Claim order: objects with a creationTimestamp first, oldest first, then by
/// namespace/name, then Services before Pods.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord, Clone, Copy)]
pub(crate) struct AgeKey<'a> {
    no_timestamp: bool,
    created: Option<&'a Time>,
    namespace: &'a str,
    name: &'a str,
    kind: u8,
}

/// [`AgeKey`] kinds.
pub(crate) const KIND_SERVICE: u8 = 0;
pub(crate) const KIND_POD: u8 = 1;

impl<'a> AgeKey<'a> {
    pub(crate) fn new(
        created: Option<&'a Time>,
        namespace: &'a str,
        name: &'a str,
        kind: u8,
    ) -> Self {
        Self {
            no_timestamp: created.is_none(),
            created,
            namespace,
            name,
            kind,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Services

/// What the model reads of a Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceView {
    pub namespace: Name,
    pub name: Name,
    pub created: Option<Time>,
    /// Problems of the Service itself (not of its endpoints): reasons, for `Service ns/name`.
    problems: Box<[String]>,
    /// What it serves; `None` when it serves nothing (no spec, another proxy's, headless,
    /// ExternalName, an unsupported type).
    served: Option<Box<Served>>,
    /// Its healthCheckNodePort, when it has one to serve (NodePort/LoadBalancer with
    /// externalTrafficPolicy Local): the port, or the invalid number.
    health_check: Option<Result<u16, i32>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Served {
    cluster_ips: Vec<Ipv4Addr>,
    external_ips: Vec<Ipv4Addr>,
    lb_ips: Vec<Ipv4Addr>,
    affinity_timeout_s: u32,
    ext_local: bool,
    int_local: bool,
    ports: Vec<PortView>,
}

/// One usable Service port.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PortView {
    /// `ns/name:portname` (`ns/name:port` when unnamed).
    owner: Name,
    /// The port's name, matched against the EndpointSlice ports ("" when unnamed).
    name: Name,
    port: u16,
    proto: Proto,
    /// A valid nodePort: the port also has a NodePort frontend.
    node_port: Option<u16>,
}

impl ServiceView {
    /// The view of `svc`. Problems that depend only on the Service are found here and kept
    /// in the view.
    pub fn new(svc: &Service, cfg: &ModelConfig) -> Self {
        let ns = namespace(&svc.metadata);
        let svc_name = name(&svc.metadata);
        let object = format!("Service {ns}/{svc_name}");
        let mut cx = Cx::quiet(cfg);
        let served = served(svc, ns, svc_name, &object, &mut cx);
        let health_check = svc.spec.as_ref().and_then(|spec| {
            let typed = matches!(spec.type_.as_deref(), Some("NodePort" | "LoadBalancer"));
            if !typed || spec.external_traffic_policy.as_deref() != Some("Local") {
                return None;
            }
            let hc = spec.health_check_node_port?;
            Some(u16::try_from(hc).ok().filter(|p| *p != 0).ok_or(hc))
        });
        Self {
            namespace: ns.into(),
            name: svc_name.into(),
            created: svc.metadata.creation_timestamp.clone(),
            problems: cx.problems.into_iter().map(|p| p.reason).collect(),
            served: served.map(Box::new),
            health_check,
        }
    }

    pub(crate) fn age(&self) -> AgeKey<'_> {
        AgeKey::new(
            self.created.as_ref(),
            &self.namespace,
            &self.name,
            KIND_SERVICE,
        )
    }

    /// `Service ns/name`.
    pub fn object(&self) -> String {
        format!("Service {}/{}", self.namespace, self.name)
    }

    /// Whether it asks for a healthCheckNodePort (valid or not).
    pub(crate) fn health_check(&self) -> Option<Result<u16, i32>> {
        self.health_check
    }
}

fn served(
    svc: &Service,
    ns: &str,
    svc_name: &str,
    object: &str,
    cx: &mut Cx<'_>,
) -> Option<Served> {
    let Some(spec) = svc.spec.as_ref() else {
        cx.problem(object, "has no spec");
        return None;
    };
    // Services meant for another proxy, or headless by label, are skipped, as kube-proxy's
    // label selector does.
    let labels = svc.metadata.labels.as_ref();
    if labels
        .is_some_and(|l| l.contains_key(SERVICE_PROXY_NAME_LABEL) || l.contains_key(HEADLESS_LABEL))
    {
        return None;
    }
    let type_ = spec.type_.as_deref().unwrap_or("ClusterIP");
    let (is_nodeport, is_lb) = match type_ {
        "ClusterIP" | "" => (false, false),
        "NodePort" => (true, false),
        "LoadBalancer" => (true, true),
        "ExternalName" => return None,
        other => {
            cx.problem(object, format!("unsupported type {other:?}"));
            return None;
        }
    };
    let headless = spec.cluster_ip.as_deref() == Some("None")
        || spec
            .cluster_ips
            .as_ref()
            .and_then(|l| l.first())
            .is_some_and(|ip| ip == "None");
    if headless {
        return None;
    }
    let (cluster_ips, external_ips, lb_ips) = service_addrs(spec, svc, is_lb, object, cx);
    let affinity_timeout_s = session_affinity(spec, object, cx);
    let ext_local = spec.external_traffic_policy.as_deref() == Some("Local");
    let int_local = spec.internal_traffic_policy.as_deref() == Some("Local");
    let allocate_node_ports = spec.allocate_load_balancer_node_ports.unwrap_or(true);

    let mut ports = Vec::new();
    for p in spec.ports.iter().flatten() {
        let owner = port_label(ns, svc_name, p);
        let proto = match Proto::from_k8s(p.protocol.as_deref()) {
            Ok(proto) => proto,
            Err(reason) => {
                cx.problem(object, format!("port {owner}: {reason}; skipped"));
                continue;
            }
        };
        let Some(port) = u16::try_from(p.port).ok().filter(|p| *p != 0) else {
            cx.problem(
                object,
                format!("port {owner}: invalid port number {}; skipped", p.port),
            );
            continue;
        };
        let mut node_port = None;
        if is_nodeport {
            match p.node_port {
                Some(np) if np > 0 => match u16::try_from(np) {
                    Ok(np) if cx.cfg.nodeport_range.contains(&np) => node_port = Some(np),
                    _ => cx.problem(
                        object,
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
                    object,
                    format!("port {owner}: type {type_} without a nodePort; no NodePort frontend"),
                ),
            }
        }
        ports.push(PortView {
            owner: owner.into(),
            name: p.name.as_deref().unwrap_or_default().into(),
            port,
            proto,
            node_port,
        });
    }
    // Kept for the Service's lifetime (100k of them at scale): no spare capacity.
    let (mut cluster_ips, mut external_ips, mut lb_ips) = (cluster_ips, external_ips, lb_ips);
    cluster_ips.shrink_to_fit();
    external_ips.shrink_to_fit();
    lb_ips.shrink_to_fit();
    ports.shrink_to_fit();
    Some(Served {
        cluster_ips,
        external_ips,
        lb_ips,
        affinity_timeout_s,
        ext_local,
        int_local,
        ports,
    })
}

fn port_label(ns: &str, name: &str, p: &ServicePort) -> String {
    match p.name.as_deref() {
        Some(n) if !n.is_empty() => format!("{ns}/{name}:{n}"),
        _ => format!("{ns}/{name}:{}", p.port),
    }
}

/// The clusterIPs, externalIPs and loadBalancer ingress IPs of a Service.
fn service_addrs(
    spec: &ServiceSpec,
    svc: &Service,
    is_lb: bool,
    object: &str,
    cx: &mut Cx<'_>,
) -> (Vec<Ipv4Addr>, Vec<Ipv4Addr>, Vec<Ipv4Addr>) {
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
    (cluster_ips, external_ips, lb_ips)
}

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

/// The per-Service reconcile: the frontends `svc` claims, given its EndpointSlices (sorted
/// by name). Its own problems and its slices' are recorded in `cx`.
pub(crate) fn service_frontends(
    svc: &ServiceView,
    slices: &[&SliceView],
    cx: &mut Cx<'_>,
) -> Vec<(FrontendId, Frontend)> {
    let object = svc.object();
    for reason in &svc.problems {
        cx.problem(&object, reason.as_str());
    }
    let mut out = Vec::new();
    let Some(s) = svc.served.as_deref() else {
        return out;
    };
    let ext_flag = if s.ext_local { flags::EXT_LOCAL } else { 0 };
    for p in &s.ports {
        let cands = endpoint_candidates(slices, &p.name, p.proto, cx);
        let cluster = select(&cands, false);
        let local = select(&cands, true);
        let external = if s.ext_local { &local } else { &cluster };
        let fe = |flags: u16, backends: &Vec<Backend>| Frontend {
            flags,
            owner: p.owner.clone(),
            backends: backends.clone(),
            affinity_timeout_s: s.affinity_timeout_s,
        };
        let internal = if s.int_local { &local } else { &cluster };
        for ip in &s.cluster_ips {
            out.push((
                FrontendId::new(*ip, p.port, p.proto),
                fe(flags::CLUSTERIP, internal),
            ));
        }
        if let Some(np) = p.node_port {
            let id = FrontendId::new(Ipv4Addr::UNSPECIFIED, np, p.proto);
            out.push((id, fe(flags::NODEPORT | ext_flag, external)));
            if s.ext_local {
                out.push((id.internal(), fe(flags::NODEPORT | ext_flag, &cluster)));
            }
        }
        for (ips, kind) in [
            (&s.external_ips, flags::EXTERNAL_IP),
            (&s.lb_ips, flags::LOADBALANCER),
        ] {
            for ip in ips {
                let id = FrontendId::new(*ip, p.port, p.proto);
                out.push((id, fe(kind | ext_flag, external)));
                if s.ext_local {
                    out.push((id.internal(), fe(kind | ext_flag, &cluster)));
                }
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// EndpointSlices

/// What the model reads of an IPv4 EndpointSlice that names its Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceView {
    pub namespace: Name,
    pub name: Name,
    /// Its `kubernetes.io/service-name`.
    pub service: Name,
    ports: Box<[SlicePort]>,
    /// Endpoints that have an address (their first, as kube-proxy reads them).
    endpoints: Box<[EndpointView]>,
    /// The first address as written, for endpoints whose address is not exactly an IPv4
    /// address in canonical form (`EndpointView::RAW`), by endpoint index.
    raw: Box<[(u32, String)]>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct SlicePort {
    name: Name,
    /// `None`: a protocol no Service port has (SCTP, unknown).
    proto: Option<Proto>,
    port: Option<i32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct EndpointView {
    /// The parsed address (`UNSPECIFIED` when it is not IPv4).
    addr: Ipv4Addr,
    flags: u8,
}

impl EndpointView {
    const READY: u8 = 1 << 0;
    const SERVING: u8 = 1 << 1;
    const TERMINATING: u8 = 1 << 2;
    /// On this node.
    const LOCAL: u8 = 1 << 3;
    /// The address is not written as a canonical IPv4 address (see `SliceView::raw`).
    const RAW: u8 = 1 << 4;
    /// The address is malformed or IPv6: not a backend.
    const INVALID: u8 = 1 << 5;

    fn has(self, f: u8) -> bool {
        self.flags & f != 0
    }
}

impl SliceView {
    /// The view of `slice`, or `None` when the model ignores it (not IPv4, no
    /// `kubernetes.io/service-name` label).
    pub fn new(slice: &EndpointSlice, cfg: &ModelConfig) -> Option<Self> {
        if slice.address_type != "IPv4" {
            return None;
        }
        let service = slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
        let ports: Vec<SlicePort> = slice
            .ports
            .iter()
            .flatten()
            .map(|p| SlicePort {
                name: p.name.as_deref().unwrap_or_default().into(),
                proto: Proto::from_k8s(p.protocol.as_deref()).ok(),
                port: p.port,
            })
            .collect();
        let mut endpoints = Vec::new();
        let mut raw = Vec::new();
        for ep in slice.endpoints.iter().flatten() {
            let Some(addr) = ep.addresses.first() else {
                continue;
            };
            let cond = ep.conditions.as_ref();
            let mut flags = 0;
            if cond.and_then(|c| c.ready).unwrap_or(true) {
                flags |= EndpointView::READY;
            }
            // A missing `serving` means serving, as kube-proxy reads it.
            if cond.and_then(|c| c.serving).unwrap_or(true) {
                flags |= EndpointView::SERVING;
            }
            if cond.and_then(|c| c.terminating).unwrap_or(false) {
                flags |= EndpointView::TERMINATING;
            }
            if !cfg.node_name.is_empty() && ep.node_name.as_deref() == Some(cfg.node_name.as_str())
            {
                flags |= EndpointView::LOCAL;
            }
            let parsed = match parse_ipv4(addr) {
                Ok(Some(a)) => a,
                Ok(None) | Err(()) => {
                    flags |= EndpointView::INVALID;
                    Ipv4Addr::UNSPECIFIED
                }
            };
            if flags & EndpointView::INVALID != 0 || parsed.to_string() != *addr {
                flags |= EndpointView::RAW;
                raw.push((endpoints.len() as u32, addr.clone()));
            }
            endpoints.push(EndpointView {
                addr: parsed,
                flags,
            });
        }
        // Kept for the slice's lifetime: no spare capacity, and no capacity field.
        Some(Self {
            namespace: namespace(&slice.metadata).into(),
            name: name(&slice.metadata).into(),
            service: service.as_str().into(),
            ports: ports.into_boxed_slice(),
            endpoints: endpoints.into_boxed_slice(),
            raw: raw.into_boxed_slice(),
        })
    }

    /// `EndpointSlice ns/name`.
    pub fn object(&self) -> String {
        format!("EndpointSlice {}/{}", self.namespace, self.name)
    }

    fn raw_addr(&self, index: usize) -> Option<&str> {
        self.raw
            .iter()
            .find(|(i, _)| *i as usize == index)
            .map(|(_, s)| s.as_str())
    }

    /// The first address of each ready endpoint on this node, as written.
    pub(crate) fn local_ready(&self) -> impl Iterator<Item = LocalAddr<'_>> + '_ {
        self.endpoints
            .iter()
            .enumerate()
            .filter(|(_, e)| e.has(EndpointView::READY) && e.has(EndpointView::LOCAL))
            .map(|(i, e)| match self.raw_addr(i) {
                Some(s) if e.has(EndpointView::RAW) => LocalAddr::Raw(s),
                _ => LocalAddr::V4(e.addr),
            })
    }
}

/// An endpoint address as written: a canonical IPv4 address, or any other text. Two are
/// equal exactly when their texts are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum LocalAddr<'a> {
    V4(Ipv4Addr),
    Raw(&'a str),
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
    slices: &[&SliceView],
    port_name: &str,
    proto: Proto,
    cx: &mut Cx<'_>,
) -> Candidates {
    let mut out = Candidates::new();
    for slice in slices {
        let port = slice
            .ports
            .iter()
            .find(|p| p.name == port_name && p.proto == Some(proto));
        let Some(port) = port else {
            continue;
        };
        let port = match port.port {
            Some(n) if (1..=65535).contains(&n) => n as u16,
            Some(n) => {
                cx.problem(
                    &slice.object(),
                    format!("port {port_name:?} has invalid number {n}; skipped"),
                );
                continue;
            }
            None => {
                cx.problem(
                    &slice.object(),
                    format!("port {port_name:?} has no port number; skipped"),
                );
                continue;
            }
        };
        for (i, ep) in slice.endpoints.iter().enumerate() {
            if ep.has(EndpointView::INVALID) {
                let addr = slice.raw_addr(i).unwrap_or("");
                cx.problem(
                    &slice.object(),
                    format!("malformed IPv4 endpoint address {addr:?}; skipped"),
                );
                continue;
            }
            let c = out.entry((ep.addr, port)).or_default();
            c.ready |= ep.has(EndpointView::READY);
            c.serving_terminating |=
                ep.has(EndpointView::SERVING) && ep.has(EndpointView::TERMINATING);
            c.local |= ep.has(EndpointView::LOCAL);
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

/// Ready endpoints of a Service on this node (distinct addresses), over its slices.
pub(crate) fn local_endpoints(slices: &[&SliceView]) -> usize {
    let mut local = BTreeSet::new();
    for s in slices {
        local.extend(s.local_ready());
    }
    local.len()
}

// ---------------------------------------------------------------------------------------
// Pods

/// A Pod's hostPort frontends and problems (they depend on the Pod only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodView {
    pub namespace: Name,
    pub name: Name,
    pub created: Option<Time>,
    pub(crate) frontends: Vec<(FrontendId, Frontend)>,
    pub(crate) problems: Vec<Problem>,
}

impl PodView {
    pub fn new(pod: &Pod, cfg: &ModelConfig) -> Self {
        let mut cx = Cx::quiet(cfg);
        let frontends = pod_frontends(pod, &mut cx);
        Self {
            namespace: namespace(&pod.metadata).into(),
            name: name(&pod.metadata).into(),
            created: pod.metadata.creation_timestamp.clone(),
            frontends,
            problems: cx.problems,
        }
    }

    pub(crate) fn age(&self) -> AgeKey<'_> {
        AgeKey::new(self.created.as_ref(), &self.namespace, &self.name, KIND_POD)
    }

    /// `Pod ns/name`.
    pub fn object(&self) -> String {
        format!("Pod {}/{}", self.namespace, self.name)
    }
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
    let ns = namespace(&pod.metadata);
    let pod_name = name(&pod.metadata);
    let object = format!("Pod {ns}/{pod_name}");
    let Some(pod_ip) = pod_ipv4(pod, &object, cx) else {
        return out;
    };
    let owner = format!("pod {ns}/{pod_name}");
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
                owner: owner.as_str().into(),
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

// ---------------------------------------------------------------------------------------
// Nodes

/// A Node's name and IPv4 InternalIP/ExternalIP addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    pub name: String,
    /// In status order, with their type.
    addrs: Vec<(&'static str, Ipv4Addr)>,
    /// Malformed addresses: reasons, for `Node name`.
    problems: Vec<String>,
}

impl NodeView {
    pub fn new(node: &Node) -> Self {
        let mut addrs = Vec::new();
        let mut problems = Vec::new();
        let addresses = node.status.as_ref().and_then(|s| s.addresses.as_ref());
        for a in addresses.into_iter().flatten() {
            let kind = match a.type_.as_str() {
                "InternalIP" => "InternalIP",
                "ExternalIP" => "ExternalIP",
                _ => continue,
            };
            match parse_ipv4(&a.address) {
                Ok(Some(ip)) => addrs.push((kind, ip)),
                Ok(None) => {}
                Err(()) => problems.push(format!("malformed {} address {:?}", a.type_, a.address)),
            }
        }
        Self {
            name: name(&node.metadata).to_string(),
            addrs,
            problems,
        }
    }
}

/// What the Nodes tell about this node and its peers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct NodeState {
    pub(crate) node_addrs: BTreeSet<Ipv4Addr>,
    pub(crate) own_node_found: bool,
    pub(crate) peer_nodes: BTreeMap<String, Ipv4Addr>,
    pub(crate) primary_addr: Option<Ipv4Addr>,
    pub(crate) node_warning: Option<String>,
}

/// This node's addresses (its own Node's InternalIP/ExternalIP plus `--node-addr`), whether
/// its own Node was found, and the other Nodes' addresses by name.
///
/// The own Node is the one named [`ModelConfig::node_name`]; with no name configured (tests
/// of a one-node world), a single Node is taken as the own one.
pub(crate) fn node_state<'a>(
    nodes: impl ExactSizeIterator<Item = &'a NodeView>,
    cx: &mut Cx<'_>,
) -> NodeState {
    let count = nodes.len();
    let cfg = cx.cfg;
    let mut own: BTreeSet<Ipv4Addr> = cfg.extra_node_addrs.iter().copied().collect();
    let mut peers = BTreeMap::new();
    let want = cfg.node_name.as_str();
    let mut found = false;
    let mut primary = cfg.extra_node_addrs.first().copied();
    for node in nodes {
        for reason in &node.problems {
            cx.problem(&format!("Node {}", node.name), reason.as_str());
        }
        let is_own = if want.is_empty() {
            count == 1
        } else {
            node.name == want
        };
        let pick = node
            .addrs
            .iter()
            .find(|(t, _)| *t == "InternalIP")
            .or_else(|| node.addrs.first())
            .map(|(_, ip)| *ip);
        if is_own {
            found = true;
            own.extend(node.addrs.iter().map(|(_, ip)| *ip));
            primary = pick.or(primary);
        } else if let Some(ip) = pick {
            peers.insert(node.name.clone(), ip);
        }
    }
    let node_warning = (!found && !cfg.node_name.is_empty()).then(|| {
        let extra: Vec<String> = cfg
            .extra_node_addrs
            .iter()
            .map(Ipv4Addr::to_string)
            .collect();
        format!(
            "Node {}: this node's own Node object was not found among {count} Node(s); \
             NodePorts answer only on the --node-addr addresses ({})",
            cfg.node_name,
            if extra.is_empty() {
                "none".to_string()
            } else {
                extra.join(", ")
            }
        )
    });
    NodeState {
        node_addrs: own,
        own_node_found: found,
        peer_nodes: peers,
        primary_addr: primary,
        node_warning,
    }
}
