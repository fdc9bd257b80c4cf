//! Connection-tracking entries. Each load-balanced flow has two entries in the LRU map:
//!
//! * forward, keyed by the client's tuple as it arrived (client -> frontend), holding the
//!   backend the flow is pinned to;
//! * reply, keyed by the backend's reply tuple (backend -> client), holding the frontend
//!   address and port to restore as the reply's source.
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
    /// `bpf_ktime_get_ns()` at creation.
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
    /// `bpf_ktime_get_ns()` at creation.
    pub created_ns: u64,
    /// `bpf_ktime_get_ns()` of the last packet, refreshed at most once a second.
    pub last_seen_ns: u64,
}
