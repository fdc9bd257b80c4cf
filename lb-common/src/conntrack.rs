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
//!
//! A TCP flow whose client has not yet answered the SYN-ACK lives apart, in one slot of the
//! half-open table ([`HalfOpen4`]) that stands for both its entries, until the client's
//! first ACK moves it into the LRU map.
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

/// One slot of `LB4_CT_SYN`, the half-open table: a TCP flow whose SYN was forwarded and
/// whose client has not yet sent its ACK. The table is an array indexed by a hash of the
/// client's address, port and protocol ([`half_open_slot_v4`]), the part of the tuple both
/// directions carry: the SYN and the client's ACK as source, the backend's SYN-ACK as
/// destination. So one slot serves both directions, and starting a flow costs one store: no
/// allocation, no LRU list, no lock. A newer half-open flow whose client hashes to the same
/// slot replaces the older one, so a SYN flood only ever displaces other half-open flows
/// (never established ones, which live in `LB4_CT`); a displaced flow's ACK still reaches the
/// backend the flow hash picks, which is the same one unless the backends changed meanwhile.
///
/// Writers on two CPUs may interleave their stores into one slot, so a slot is trusted only
/// when its `check` matches its contents ([`HalfOpen4::sealed`]). Addresses and ports in
/// network order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct HalfOpen4 {
    pub client_addr: u32,
    pub client_port: u16,
    /// The flow's protocol; 0: an empty slot.
    pub proto: u8,
    pub _pad: u8,
    /// The frontend the client sent its SYN to.
    pub fe_addr: u32,
    pub fe_port: u16,
    /// [`ct_flags`] bits.
    pub flags: u16,
    /// The backend the flow is pinned to.
    pub be_addr: u32,
    pub be_port: u16,
    pub _pad2: [u8; 2],
    pub backend_id: u32,
    pub svc_id: u32,
    /// CLOCK_MONOTONIC of the SYN (`bpf_ktime_get_coarse_ns`).
    pub created_ns: u64,
    /// [`HalfOpen4::checksum`] of the fields above, stored last.
    pub check: u32,
    /// To a whole cache line.
    pub _pad3: [u8; 20],
}

/// A 32-bit integer mix (murmur3's finalizer): every input bit moves every output bit.
#[inline(always)]
pub fn mix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// The half-open slot hash of a client (before `& half_open_mask`), under the node's seed.
#[inline(always)]
pub fn half_open_slot_v4(client_addr: u32, client_port: u16, proto: u8, seed: u32) -> u32 {
    mix32(client_addr ^ mix32((u32::from(client_port) << 8 | u32::from(proto)) ^ seed))
}

impl HalfOpen4 {
    /// A hash of every field but `check` and the padding. Never 0, so a zeroed slot is
    /// never sealed.
    #[inline(always)]
    pub fn checksum(&self) -> u32 {
        let words = [
            self.client_addr,
            u32::from(self.client_port) | u32::from(self.proto) << 16,
            self.fe_addr,
            u32::from(self.fe_port) | u32::from(self.flags) << 16,
            self.be_addr,
            u32::from(self.be_port),
            self.backend_id,
            self.svc_id,
            self.created_ns as u32,
            (self.created_ns >> 32) as u32,
        ];
        let mut h: u32 = 0x811c_9dc5;
        for w in words {
            h = (h ^ w).wrapping_mul(0x0100_0193);
        }
        h | 1
    }

    /// Whether the slot holds one whole flow (not empty, not torn by two writers).
    #[inline(always)]
    pub fn sealed(&self) -> bool {
        self.proto != 0 && self.check == self.checksum()
    }

    /// The forward entry this slot stands for (client -> frontend; backend to DNAT to).
    pub fn forward(&self) -> (Ct4Key, Ct4Value) {
        let key = Ct4Key {
            saddr: self.client_addr,
            daddr: self.fe_addr,
            sport: self.client_port,
            dport: self.fe_port,
            proto: self.proto,
            dir: CT_FORWARD,
            _pad: [0; 2],
        };
        (key, self.value(self.be_addr, self.be_port))
    }

    /// The reply entry this slot stands for (backend -> client; frontend to restore), or
    /// `None` for a SNATed flow, whose replies are found through `LB4_SNAT`.
    pub fn reply(&self) -> Option<(Ct4Key, Ct4Value)> {
        if self.flags & ct_flags::SNAT != 0 {
            return None;
        }
        let key = Ct4Key {
            saddr: self.be_addr,
            daddr: self.client_addr,
            sport: self.be_port,
            dport: self.client_port,
            proto: self.proto,
            dir: CT_REPLY,
            _pad: [0; 2],
        };
        Some((key, self.value(self.fe_addr, self.fe_port)))
    }

    /// The conntrack value of either direction, `nat` being what it translates to.
    #[inline(always)]
    pub fn value(&self, nat_addr: u32, nat_port: u16) -> Ct4Value {
        Ct4Value {
            nat_addr,
            nat_port,
            flags: self.flags,
            backend_id: self.backend_id,
            svc_id: self.svc_id,
            created_ns: self.created_ns,
            last_seen_ns: self.created_ns,
        }
    }
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
