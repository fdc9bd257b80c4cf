//! Per-flow connection tracking: the forward entry pins a flow to its backend (XDP), the
//! reply entry tells the TC program what to restore.
use aya_ebpf::helpers::bpf_ktime_get_ns;
use lb_common::{
    conntrack::{ct_flags, CT_FORWARD, CT_REPLY},
    Backend4, Ct4Key, Ct4Value, Reason, IPPROTO_TCP,
};

use crate::{
    lb::{backend_exists, Frontend},
    maps::CT,
    parse::{Flow4, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

const BPF_ANY: u64 = 0;
const NS_PER_SEC: u64 = 1_000_000_000;

#[inline(always)]
pub fn forward_key_v4(flow: &Flow4) -> Ct4Key {
    Ct4Key {
        saddr: flow.saddr,
        daddr: flow.daddr,
        sport: flow.sport,
        dport: flow.dport,
        proto: flow.proto,
        dir: CT_FORWARD,
        _pad: [0; 2],
    }
}

/// Look up the flow's forward entry. Returns the backend address/port to DNAT to, or `None`
/// when the flow must pick afresh: no entry, or a new TCP SYN / a UDP packet whose pinned
/// backend is gone (an established TCP flow keeps its removed backend until it ends), or a
/// SYN reusing the tuple of a closed connection.
#[inline(always)]
pub fn lookup_v4(flow: &Flow4) -> Option<Ct4Value> {
    let key = forward_key_v4(flow);
    let entry = CT.get_ptr_mut(key)?;
    // SAFETY: LRU entries are plain data; a concurrent eviction at worst yields a stale copy.
    let mut value = unsafe { *entry };
    let syn_only = flow.proto == IPPROTO_TCP && flow.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    let may_repick = flow.proto != IPPROTO_TCP || syn_only;
    if may_repick && (value.flags & ct_flags::CLOSING != 0 || !backend_exists(value.backend_id)) {
        return None;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    let closing = flow.tcp_flags & (TCP_FIN | TCP_RST) != 0;
    if closing || now.wrapping_sub(value.last_seen_ns) > NS_PER_SEC {
        if closing {
            value.flags |= ct_flags::CLOSING;
        }
        value.last_seen_ns = now;
        // SAFETY: as above; single aligned field writes.
        unsafe {
            (*entry).last_seen_ns = now;
            (*entry).flags = value.flags;
        }
    }
    Some(value)
}

/// Key of the reply entry for a packet `flow` leaving towards the client (backend ->
/// client, as the backend sent it).
#[inline(always)]
pub fn reply_key_v4(flow: &Flow4) -> Ct4Key {
    Ct4Key {
        dir: CT_REPLY,
        ..forward_key_v4(flow)
    }
}

/// Look up the reply entry of an egress packet: the frontend address and port to restore
/// as its source, or `None` when the packet belongs to no load-balanced flow.
#[inline(always)]
pub fn lookup_reply_v4(flow: &Flow4) -> Option<Ct4Value> {
    // SAFETY: plain data; a concurrent LRU eviction at worst yields a stale copy.
    unsafe { CT.get(reply_key_v4(flow)) }.copied()
}

/// Remove the forward entry of `flow` (a new flow that could not be completed).
#[inline(always)]
pub fn remove_v4(flow: &Flow4) {
    let _ = CT.remove(forward_key_v4(flow));
}

/// Create the forward and reply entries of a new flow. On failure nothing is left behind.
/// A SNATed flow (`flags` has [`ct_flags::SNAT`]) gets no reply entry here: its reply comes
/// back to this node's address and is found through `LB4_SNAT`.
#[inline(always)]
pub fn create_v4(
    flow: &Flow4,
    fe: &Frontend,
    backend_id: u32,
    backend: &Backend4,
    flags: u16,
) -> Result<Ct4Value, Reason> {
    let now = unsafe { bpf_ktime_get_ns() };
    let fwd_key = forward_key_v4(flow);
    let fwd = Ct4Value {
        nat_addr: backend.addr,
        nat_port: backend.port,
        flags,
        backend_id,
        svc_id: fe.svc.svc_id,
        created_ns: now,
        last_seen_ns: now,
    };
    CT.insert(fwd_key, fwd, BPF_ANY)
        .map_err(|_| Reason::XdpDropCtInsert)?;
    if flags & ct_flags::SNAT != 0 {
        return Ok(fwd);
    }
    let rev_key = reply_key_v4(&Flow4 {
        saddr: backend.addr,
        daddr: flow.saddr,
        sport: backend.port,
        dport: flow.sport,
        ..*flow
    });
    let rev = Ct4Value {
        nat_addr: flow.daddr,
        nat_port: flow.dport,
        ..fwd
    };
    if CT.insert(rev_key, rev, BPF_ANY).is_err() {
        let _ = CT.remove(fwd_key);
        return Err(Reason::XdpDropCtInsert);
    }
    Ok(fwd)
}
