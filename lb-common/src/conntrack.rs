//! Connection-tracking entries. Each load-balanced flow has two entries in the LRU map:
//!
//! * forward, keyed by the client's tuple as it arrived (client -> frontend), holding the
//!   backend the flow is pinned to;
//! * reply, keyed by the backend's reply tuple (backend -> client), holding the frontend
//!   address and port to restore as the reply's source.
//!
//! The two cannot age apart: each holds what is needed to rebuild the other, and whenever a
//! direction refreshes its entry (at most once a second, or on a state change) it refreshes
//! the other's `last_seen_ns` and flags too, and re-creates it if the LRU evicted it. A flow
//! idle for longer than its timeout ([`crate::LbConfig::ct_timeout_s`]) is expired on its
//! next packet and collected by the agent's GC.
//!
//! The entry holds the backend's address itself, not only its id, so an established flow
//! keeps working after its backend leaves the backends map.
use bytemuck::{Pod, Zeroable};

/// [`Ct4Key::dir`] values.
pub const CT_FORWARD: u8 = 0;
pub const CT_REPLY: u8 = 1;

/// Key of `LB4_CT`. Addresses and ports in network order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct Ct4Key {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// [`CT_FORWARD`] or [`CT_REPLY`].
    pub dir: u8,
    pub _pad: [u8; 2],
}

/// [`Ct4Value::flags`] bits.
pub mod ct_flags {
    /// A FIN or RST was seen on the flow; a new SYN on the same tuple picks afresh.
    pub const CLOSING: u16 = 1 << 0;
    /// The flow goes to a remote backend through SNAT (its `LB4_SNAT` entries).
    pub const SNAT: u16 = 1 << 1;
    /// TCP: the client sent a packet with ACK and without SYN (the established timeout
    /// applies instead of the SYN one).
    pub const ESTABLISHED: u16 = 1 << 2;
}

/// Value of `LB4_SNAT` (LRU, key [`Ct4Key`]), the SNAT of flows to remote backends:
///
/// * forward, keyed by the client's tuple as it arrived: the source to rewrite to
///   (`addr:port` = this node's address and the allocated SNAT port);
/// * reply, keyed by the remote backend's reply tuple (backend -> `addr:port` above): the
///   client to send it back to (`addr:port`) and the frontend it connected to
///   (`fe_addr:fe_port`), the reply's new source.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Snat4Value {
    pub addr: u32,
    pub port: u16,
    pub _pad: [u8; 2],
    pub fe_addr: u32,
    pub fe_port: u16,
    pub _pad2: [u8; 2],
    pub svc_id: u32,
    pub _pad3: [u8; 4],
    /// CLOCK_MONOTONIC at creation, at tick resolution (`bpf_ktime_get_coarse_ns`).
    pub created_ns: u64,
}

/// Value of `LB4_CT`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Ct4Value {
    /// Forward: backend address. Reply: frontend address to restore. Network order.
    pub nat_addr: u32,
    /// Forward: backend port. Reply: frontend port to restore. Network order.
    pub nat_port: u16,
    /// [`ct_flags`] bits.
    pub flags: u16,
    /// The backend id chosen when the flow started.
    pub backend_id: u32,
    /// The frontend's `svc_id`.
    pub svc_id: u32,
    /// CLOCK_MONOTONIC at creation, at tick resolution (`bpf_ktime_get_coarse_ns`).
    pub created_ns: u64,
    /// CLOCK_MONOTONIC of the last packet (`bpf_ktime_get_coarse_ns`, tick resolution),
    /// refreshed at most once a second.
    pub last_seen_ns: u64,
}

/// Key of `LB4_FRAG` (LRU): the IPv4 fragments of one datagram, as they arrive (`dir`
/// [`CT_FORWARD`]: XDP, client side; [`CT_REPLY`]: TC egress, backend side). Network order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct Frag4Key {
    pub saddr: u32,
    pub daddr: u32,
    /// The IP identification field.
    pub id: u16,
    pub proto: u8,
    pub dir: u8,
}

/// Value of `LB4_FRAG`: the addresses the first fragment was translated to, for the
/// fragments without an L4 header that follow it. Network order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Frag4Value {
    pub saddr: u32,
    pub daddr: u32,
    /// [`frag_flags`] bits.
    pub flags: u32,
    /// The frontend's `svc_id`, for its counters.
    pub svc_id: u32,
}

/// [`Frag4Value::flags`] bits.
pub mod frag_flags {
    /// The datagram is SNATed to a remote backend (or is such a flow's reply): its
    /// fragments leave from XDP like its first one.
    pub const FORWARD: u32 = 1 << 0;
}
