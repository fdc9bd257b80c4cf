//! Frontend (service) and backend entries of the load-balancing maps.
//!
//! A frontend is one `(address, port, protocol)` the datapath answers on. Its backends are
//! stored Cilium-style in the same map: slot 0 is the master entry holding the backend count,
//! slots `1..=count` each point at a backend id in the backends map. The agent writes
//! backends, then slots, then the master entry, so the datapath never sees a count that
//! points at a missing slot; removals go the other way.
use bytemuck::{Pod, Zeroable};

/// Key of `LB4_SERVICES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct Frontend4Key {
    /// Frontend address, network order. `0` means "any address the node owns" (NodePort,
    /// and a hostPort without hostIP).
    pub addr: u32,
    /// Frontend port, network order.
    pub port: u16,
    /// 0 for the master entry, `1..=count` for backend slots. Host order.
    pub slot: u16,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub proto: u8,
    /// [`scope`]: which backend set of the frontend this key holds.
    pub scope: u8,
    pub _pad: [u8; 2],
}

impl Frontend4Key {
    pub const fn new(addr_be: u32, port_be: u16, proto: u8, slot: u16) -> Self {
        Self {
            addr: addr_be,
            port: port_be,
            slot,
            proto,
            scope: 0,
            _pad: [0; 2],
        }
    }

    /// The same frontend's key for another slot.
    pub const fn with_slot(self, slot: u16) -> Self {
        Self { slot, ..self }
    }

    /// The same frontend's key in another [`scope`].
    pub const fn with_scope(self, scope: u8) -> Self {
        Self { scope, ..self }
    }
}

/// Lookup scopes of [`Frontend4Key::scope`], as Cilium's `LB_LOOKUP_SCOPE_EXT/INT`.
///
/// A Service with externalTrafficPolicy Local keeps its client addresses only for traffic
/// from outside the cluster; kube-proxy sends traffic from the node's own processes and
/// pods to its NodePort, externalIPs and LoadBalancer IPs to every ready endpoint (its
/// `KUBE-EXT` chains jump to the cluster chain for pod and local sources). Such a frontend
/// therefore has two backend sets: its [`EXTERNAL`](scope::EXTERNAL) entries (local
/// endpoints, for the XDP path) and its [`INTERNAL`](scope::INTERNAL) entries (every
/// endpoint, for the socket hooks). The socket hooks read the internal entries only of a
/// master with [`flags::EXT_LOCAL`].
pub mod scope {
    pub const EXTERNAL: u8 = 0;
    pub const INTERNAL: u8 = 1;
}

/// Frontend kinds, stored in [`Service4Value::flags`]. Kinds share one lookup, so new ones
/// (ClusterIP, LoadBalancer, externalIPs) need no new map.
pub mod flags {
    pub const NODEPORT: u16 = 1 << 0;
    pub const HOSTPORT: u16 = 1 << 1;
    pub const CLUSTERIP: u16 = 1 << 2;
    pub const LOADBALANCER: u16 = 1 << 3;
    pub const EXTERNAL_IP: u16 = 1 << 4;
    /// externalTrafficPolicy: Local (only local backends are installed; keep the client IP).
    pub const EXT_LOCAL: u16 = 1 << 5;
}

/// `Service4Value::svc_id` of a frontend that has no per-frontend counter slot (all were in
/// use): it is programmed and load-balanced, only not counted.
pub const NO_SVC_ID: u32 = u32::MAX;

/// Value of `LB4_SERVICES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct Service4Value {
    /// Slot entries: the backend id this slot points at. Master entry: 0.
    pub backend_id: u32,
    /// Master entry: number of backend slots that take new flows. 0 = no backend.
    pub count: u16,
    /// Master entry: [`flags`] bits.
    pub flags: u16,
    /// Master entry: index into `LB_SVC_STATS` (per-frontend counters).
    pub svc_id: u32,
    /// Master entry: sessionAffinity ClientIP timeout in seconds (`LB4_AFFINITY`); 0 = none.
    pub affinity_timeout_s: u32,
}

/// Key of `LB4_AFFINITY` (LRU): one client at one frontend (its master key's address, port
/// and protocol). Network order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct Affinity4Key {
    /// [`affinity_client::ADDR`]: the client's address (XDP path). [`affinity_client::NETNS`]:
    /// the low 32 bits of the client's network namespace cookie (socket hooks, which run
    /// before the source address is chosen; Cilium keys socket affinity the same way).
    pub client: u32,
    pub fe_addr: u32,
    pub fe_port: u16,
    pub proto: u8,
    /// [`affinity_client`]: what `client` holds.
    pub client_kind: u8,
}

/// [`Affinity4Key::client_kind`] values.
pub mod affinity_client {
    pub const ADDR: u8 = 0;
    pub const NETNS: u8 = 1;
}

/// Value of `LB4_AFFINITY`: the backend (and the slot it was found in) a client's new flows
/// go to while `bpf_ktime_get_coarse_ns() - last_used_ns` is below the frontend's timeout.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Affinity4Value {
    pub backend_id: u32,
    /// Host order. The affinity holds only while this slot still points at `backend_id`.
    pub slot: u16,
    pub _pad: [u8; 2],
    /// `bpf_ktime_get_coarse_ns()` (CLOCK_MONOTONIC, tick resolution) of the client's last
    /// new flow to this frontend.
    pub last_used_ns: u64,
}

/// Backend flags, stored in [`Backend4::flags`].
pub mod backend_flags {
    /// The backend runs on another node (multi-node forwarding, later).
    pub const REMOTE: u8 = 1 << 0;
    /// The endpoint is terminating (serving as a fallback only).
    pub const TERMINATING: u8 = 1 << 1;
}

/// Value of `LB4_BACKENDS` (key: backend id, `u32`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct Backend4 {
    /// Backend (pod) address, network order.
    pub addr: u32,
    /// Backend port, network order.
    pub port: u16,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub proto: u8,
    /// [`backend_flags`] bits.
    pub flags: u8,
    /// Address of the node hosting a remote backend, network order; 0 = this node.
    pub node_addr: u32,
}

/// Bits of `LB_PORTS` entries.
pub mod port_bits {
    /// Some TCP frontend listens on this port (or it is a SNAT port: replies arrive on it).
    pub const TCP_FRONTEND: u8 = 1 << 0;
    pub const UDP_FRONTEND: u8 = 1 << 1;
    /// Some TCP backend serves from this port (replies leave from it).
    pub const TCP_BACKEND: u8 = 1 << 2;
    pub const UDP_BACKEND: u8 = 1 << 3;

    /// The frontend bit of `proto` (6 or 17).
    #[inline(always)]
    pub const fn frontend(proto: u8) -> u8 {
        if proto == crate::IPPROTO_TCP {
            TCP_FRONTEND
        } else {
            UDP_FRONTEND
        }
    }

    /// The backend bit of `proto` (6 or 17).
    #[inline(always)]
    pub const fn backend(proto: u8) -> u8 {
        if proto == crate::IPPROTO_TCP {
            TCP_BACKEND
        } else {
            UDP_BACKEND
        }
    }
}

/// [`LbConfig::flags`] bits.
pub mod config_flags {
    /// The socket hooks translate NodePorts on 127.0.0.0/8 for the node's own processes
    /// (`--localhost-nodeports`). Without it, `127.0.0.1:<nodePort>` is left untouched, as
    /// kube-proxy's nftables mode does. hostPorts on 127.0.0.0/8 are translated either way.
    pub const LOCALHOST_NODEPORTS: u32 = 1 << 0;
    /// `LB_PORTS` holds every frontend and backend port: packets whose port has no bit
    /// there pass at once.
    pub const PORT_FILTER: u32 = 1 << 1;
}

/// The single entry of `LB_CONFIG`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct LbConfig {
    /// Seed mixed into the flow hash that picks a backend slot.
    pub hash_seed: u32,
    /// [`config_flags`] bits.
    pub flags: u32,
    /// Source address of SNATed flows to remote backends (network order); 0 = the address
    /// the client connected to.
    pub snat_addr: u32,
    /// SNAT source ports, host order, inclusive; `snat_port_max == 0` disables SNAT (flows to
    /// remote backends are then passed to the stack untranslated at the source).
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    /// Cookie of the node's own network namespace (`SO_NETNS_COOKIE`): the socket hooks
    /// treat 127.0.0.0/8 as the node's address only for sockets of that namespace (a pod's
    /// loopback is its own). 0 = unknown: loopback is never translated.
    pub host_netns_cookie: u64,
    /// Conntrack idle timeouts in seconds (`--ct-timeout-*`), by protocol and state; 0 =
    /// the default of [`ct_timeouts`]. A flow idle for longer is expired on its next packet
    /// (and collected by the agent's GC).
    pub ct_timeout_tcp_syn_s: u32,
    pub ct_timeout_tcp_s: u32,
    pub ct_timeout_tcp_fin_s: u32,
    pub ct_timeout_udp_s: u32,
    /// ICMP port-unreachable replies for frontends without backends, per second and CPU
    /// (`--reject-rate`); 0 = never reply, drop.
    pub reject_per_s: u32,
    /// Slots of the half-open table `LB4_CT_SYN` minus one (a power of two minus one), set
    /// by the agent from the pinned map's size: a flow's slot is
    /// [`crate::conntrack::half_open_slot_v4`] `& half_open_mask`. 0 (an agent that never set it)
    /// puts every half-open flow in slot 0: correct, one at a time.
    pub half_open_mask: u32,
}

/// Default conntrack idle timeouts (seconds), as Cilium's and the kernel's: TCP before it is
/// established (SYN seen), established, closing (FIN or RST seen), and UDP.
pub mod ct_timeouts {
    pub const TCP_SYN: u32 = 60;
    pub const TCP_ESTABLISHED: u32 = 21_600;
    pub const TCP_FIN: u32 = 10;
    pub const UDP: u32 = 60;
}

impl LbConfig {
    /// The idle timeout (seconds) of a flow of `proto` (TCP if 6, else UDP) with conntrack
    /// `flags` (`ct_flags`).
    #[inline(always)]
    pub fn ct_timeout_s(&self, proto: u8, flags: u16) -> u32 {
        use crate::conntrack::ct_flags;
        let (v, d) = if proto != crate::IPPROTO_TCP {
            (self.ct_timeout_udp_s, ct_timeouts::UDP)
        } else if flags & ct_flags::CLOSING != 0 {
            (self.ct_timeout_tcp_fin_s, ct_timeouts::TCP_FIN)
        } else if flags & ct_flags::ESTABLISHED != 0 {
            (self.ct_timeout_tcp_s, ct_timeouts::TCP_ESTABLISHED)
        } else {
            (self.ct_timeout_tcp_syn_s, ct_timeouts::TCP_SYN)
        };
        if v == 0 {
            d
        } else {
            v
        }
    }
}
