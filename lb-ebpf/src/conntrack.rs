//! Per-flow connection tracking: the forward entry pins a flow to its backend (XDP), the
//! reply entry tells the TC program what to restore. Each direction keeps the other alive
//! (see `lb_common::conntrack`), and idle flows expire by protocol and TCP state. A TCP
//! flow starts in one half-open slot (`LB4_CT_SYN`, both directions) and gets its two
//! `LB4_CT` entries with the client's first ACK.
use lb_common::{
    conntrack::{ct_flags, CT_FORWARD, CT_REPLY},
    Backend4, Ct4Key, Ct4Value, HalfOpen4, Reason, IPPROTO_TCP,
};

use crate::{
    clock,
    lb::{backend_exists, Frontend},
    maps::{CONFIG, CT, CT_SYN},
    parse::{Flow4, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    stats,
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
/// when the flow must pick afresh: no entry; an entry idle past its timeout (expired and
/// removed); or a new TCP SYN / a UDP packet whose pinned backend is gone (an established
/// TCP flow keeps its removed backend until it ends), or a SYN reusing the tuple of a closed
/// connection (both removed first, so the new entries are new).
///
/// On a refresh (at most once a second, or when the TCP state changes) the reply entry gets
/// the same `last_seen_ns` and flags, and is rebuilt if it was evicted.
#[inline(always)]
pub fn lookup_v4(flow: &Flow4) -> Option<Ct4Value> {
    let key = forward_key_v4(flow);
    let Some(entry) = CT.get_ptr_mut(key) else {
        return if flow.proto == IPPROTO_TCP {
            lookup_half_open_v4(flow, key)
        } else {
            None
        };
    };
    // SAFETY: LRU entries are plain data; a concurrent eviction at worst yields a stale copy.
    let mut value = unsafe { *entry };
    let now = clock::now_ns();
    let syn_only = flow.proto == IPPROTO_TCP && flow.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    let may_repick = flow.proto != IPPROTO_TCP || syn_only;
    let expired = clock::since(now, value.last_seen_ns) > timeout_ns(flow.proto, value.flags);
    if expired
        || may_repick && (value.flags & ct_flags::CLOSING != 0 || !backend_exists(value.backend_id))
    {
        let n = remove_flow_v4(flow, &value);
        stats::count_n(
            if expired {
                Reason::CtExpired
            } else {
                Reason::CtRemoved
            },
            n,
        );
        return None;
    }
    let mut flags = value.flags;
    if flow.proto == IPPROTO_TCP {
        if flow.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
            flags |= ct_flags::CLOSING;
        } else if flow.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_ACK {
            flags |= ct_flags::ESTABLISHED;
        }
    }
    if flags != value.flags || clock::since(now, value.last_seen_ns) > NS_PER_SEC {
        value.flags = flags;
        value.last_seen_ns = now;
        // SAFETY: as above; single aligned field writes.
        unsafe {
            (*entry).last_seen_ns = now;
            (*entry).flags = flags;
        }
        if flags & ct_flags::SNAT == 0 {
            let rev_key = reply_key_of_v4(flow, &value);
            touch_or_restore(rev_key, reply_value_of_v4(flow, &value), now, flags);
        }
    }
    Some(value)
}

/// A TCP flow not in `LB4_CT` may be half-open in `LB4_CT_SYN`: a retransmitted SYN finds it
/// there; the client's first packet without SYN (the handshake's ACK, or a RST) moves it to
/// `LB4_CT`. A SYN flood thus only ever displaces other half-open flows.
#[inline(always)]
fn lookup_half_open_v4(flow: &Flow4, key: Ct4Key) -> Option<Ct4Value> {
    let slot_ptr = half_open_slot_v4(flow.saddr, flow.sport, flow.proto)?;
    // SAFETY: array memory, plain data; a concurrent writer yields a torn copy, which
    // `sealed` refuses.
    let slot = unsafe { *slot_ptr };
    if !is_half_open_forward_v4(&slot, flow) {
        return None;
    }
    let value = slot.value(slot.be_addr, slot.be_port);
    let now = clock::now_ns();
    let expired = clock::since(now, value.last_seen_ns) > timeout_ns(flow.proto, value.flags);
    // A retransmitted SYN picks again when its backend is gone; the handshake's ACK keeps it,
    // as an established flow does.
    let repick = flow.tcp_flags & TCP_SYN != 0 && !backend_exists(value.backend_id);
    if expired || repick {
        let n = clear_half_open_v4(slot_ptr, &slot);
        let r = if expired {
            Reason::CtExpired
        } else {
            Reason::CtRemoved
        };
        stats::count_n(r, n);
        return None;
    }
    if flow.tcp_flags & TCP_SYN != 0 {
        return Some(value);
    }
    let flags = value.flags
        | if flow.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
            ct_flags::CLOSING
        } else {
            ct_flags::ESTABLISHED
        };
    let fwd = Ct4Value {
        flags,
        last_seen_ns: now,
        ..value
    };
    // Best effort: if the move fails the half-open slot keeps serving the flow.
    if CT.insert(key, fwd, BPF_ANY).is_ok() {
        if value.flags & ct_flags::SNAT != 0
            || CT
                .insert(
                    reply_key_of_v4(flow, &fwd),
                    reply_value_of_v4(flow, &fwd),
                    BPF_ANY,
                )
                .is_ok()
        {
            clear_half_open_v4(slot_ptr, &slot);
        } else {
            let _ = CT.remove(key);
        }
    }
    Some(fwd)
}

/// The half-open slot of the client `addr:port` (`LB4_CT_SYN`), under the node's seed.
#[inline(always)]
fn half_open_slot_v4(client_addr: u32, client_port: u16, proto: u8) -> Option<*mut HalfOpen4> {
    let (seed, mask) = CONFIG
        .get(0)
        .map_or((0, 0), |c| (c.hash_seed, c.half_open_mask));
    let hash = lb_common::conntrack::half_open_slot_v4(client_addr, client_port, proto, seed);
    CT_SYN.get_ptr_mut(hash & mask)
}

/// Empty the half-open slot at `ptr` if it still holds `slot` (not a newer flow a SYN on
/// another CPU stored meanwhile). Returns how many conntrack entries it stood for.
#[inline(always)]
fn clear_half_open_v4(ptr: *mut HalfOpen4, slot: &HalfOpen4) -> u64 {
    // SAFETY: array memory, plain data; aligned single-field accesses.
    unsafe {
        if (*ptr).check != slot.check {
            return 0;
        }
        (*ptr).check = 0;
        (*ptr).proto = 0;
    }
    if slot.flags & ct_flags::SNAT == 0 {
        2
    } else {
        1
    }
}

/// The idle timeout of a flow of `proto` in state `flags`, from `LB_CONFIG`.
#[inline(always)]
pub fn timeout_ns(proto: u8, flags: u16) -> u64 {
    let s = match CONFIG.get(0) {
        Some(c) => c.ct_timeout_s(proto, flags),
        None => lb_common::LbConfig::default().ct_timeout_s(proto, flags),
    };
    u64::from(s) * NS_PER_SEC
}

/// Refresh the entry at `key` (`last_seen_ns`, flags), or insert `value` there if the LRU
/// evicted it (counted [`Reason::CtRestored`]).
#[inline(always)]
fn touch_or_restore(key: Ct4Key, value: Ct4Value, now: u64, flags: u16) {
    match CT.get_ptr_mut(key) {
        // SAFETY: plain data; aligned single-field writes.
        Some(e) => unsafe {
            (*e).last_seen_ns = now;
            (*e).flags = flags;
        },
        None => {
            let v = Ct4Value {
                last_seen_ns: now,
                flags,
                ..value
            };
            if CT.insert(key, v, BPF_ANY).is_ok() {
                stats::count_n(Reason::CtRestored, 1);
            }
        }
    }
}

/// The reply entry's key of the flow `flow` (as the client sent it) pinned by `fwd`.
#[inline(always)]
fn reply_key_of_v4(flow: &Flow4, fwd: &Ct4Value) -> Ct4Key {
    reply_key_v4(&Flow4 {
        saddr: fwd.nat_addr,
        daddr: flow.saddr,
        sport: fwd.nat_port,
        dport: flow.sport,
        ..*flow
    })
}

/// The reply entry of the flow `flow` pinned by `fwd`: the frontend to restore.
#[inline(always)]
fn reply_value_of_v4(flow: &Flow4, fwd: &Ct4Value) -> Ct4Value {
    Ct4Value {
        nat_addr: flow.daddr,
        nat_port: flow.dport,
        ..*fwd
    }
}

/// Remove both entries of the flow `flow` pinned by `fwd`; returns how many there were.
#[inline(always)]
fn remove_flow_v4(flow: &Flow4, fwd: &Ct4Value) -> u64 {
    let mut n = u64::from(CT.remove(forward_key_v4(flow)).is_ok());
    if fwd.flags & ct_flags::SNAT == 0 {
        n += u64::from(CT.remove(reply_key_of_v4(flow, fwd)).is_ok());
    }
    n
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
/// as its source, or `None` when the packet belongs to no load-balanced flow. On a refresh
/// (at most once a second) the forward entry gets the same `last_seen_ns`, and is rebuilt
/// if it was evicted: a flow whose backend does all the talking stays alive.
#[inline(always)]
pub fn lookup_reply_v4(flow: &Flow4) -> Option<Ct4Value> {
    let key = reply_key_v4(flow);
    let Some(entry) = CT.get_ptr_mut(key) else {
        return lookup_half_open_reply_v4(flow);
    };
    // SAFETY: plain data; a concurrent LRU eviction at worst yields a stale copy.
    let value = unsafe { *entry };
    let now = clock::now_ns();
    if clock::since(now, value.last_seen_ns) > NS_PER_SEC {
        // SAFETY: as above; an aligned single-field write.
        unsafe { (*entry).last_seen_ns = now };
        // The client's tuple: client -> frontend; the backend is this packet's source.
        let fwd_key = forward_key_v4(&Flow4 {
            saddr: flow.daddr,
            daddr: value.nat_addr,
            sport: flow.dport,
            dport: value.nat_port,
            ..*flow
        });
        let fwd = Ct4Value {
            nat_addr: flow.saddr,
            nat_port: flow.sport,
            ..value
        };
        touch_or_restore(fwd_key, fwd, now, value.flags);
    }
    Some(value)
}

/// A half-open flow's SYN-ACK (backend -> client): the slot of its client, if it holds this
/// backend's flow.
#[inline(always)]
fn lookup_half_open_reply_v4(flow: &Flow4) -> Option<Ct4Value> {
    if flow.proto != IPPROTO_TCP {
        return None;
    }
    let slot_ptr = half_open_slot_v4(flow.daddr, flow.dport, flow.proto)?;
    // SAFETY: as in `lookup_half_open_v4`.
    let slot = unsafe { *slot_ptr };
    let ours = slot.sealed()
        && slot.client_addr == flow.daddr
        && slot.client_port == flow.dport
        && slot.be_addr == flow.saddr
        && slot.be_port == flow.sport
        && slot.flags & ct_flags::SNAT == 0;
    ours.then(|| slot.value(slot.fe_addr, slot.fe_port))
}

/// Remove the forward entry of `flow` (a new flow that could not be completed).
#[inline(always)]
pub fn remove_v4(flow: &Flow4) {
    let _ = CT.remove(forward_key_v4(flow));
    if let Some(ptr) = half_open_slot_v4(flow.saddr, flow.sport, flow.proto) {
        // SAFETY: as in `lookup_half_open_v4`.
        let slot = unsafe { *ptr };
        if is_half_open_forward_v4(&slot, flow) {
            clear_half_open_v4(ptr, &slot);
        }
    }
}

/// Whether `slot` holds the half-open flow `flow` (as the client sent it).
#[inline(always)]
fn is_half_open_forward_v4(slot: &HalfOpen4, flow: &Flow4) -> bool {
    slot.sealed()
        && slot.client_addr == flow.saddr
        && slot.client_port == flow.sport
        && slot.proto == flow.proto
        && slot.fe_addr == flow.daddr
        && slot.fe_port == flow.dport
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
    let now = clock::now_ns();
    let fwd_key = forward_key_v4(flow);
    // A flow first seen mid-connection (its entries were evicted or expired) is established.
    let flags = if flow.proto == IPPROTO_TCP && flow.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_ACK {
        flags | ct_flags::ESTABLISHED
    } else {
        flags
    };
    let fwd = Ct4Value {
        nat_addr: backend.addr,
        nat_port: backend.port,
        flags,
        backend_id,
        svc_id: fe.svc.svc_id,
        created_ns: now,
        last_seen_ns: now,
    };
    // A SYN starts a half-open flow, kept apart from the established ones: one slot.
    if flow.proto == IPPROTO_TCP && flow.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        let ptr =
            half_open_slot_v4(flow.saddr, flow.sport, flow.proto).ok_or(Reason::XdpDropCtInsert)?;
        let mut slot = HalfOpen4 {
            client_addr: flow.saddr,
            client_port: flow.sport,
            proto: flow.proto,
            fe_addr: flow.daddr,
            fe_port: flow.dport,
            flags,
            be_addr: backend.addr,
            be_port: backend.port,
            backend_id,
            svc_id: fe.svc.svc_id,
            created_ns: now,
            ..HalfOpen4::default()
        };
        slot.check = slot.checksum();
        // SAFETY: array memory, plain data; see `HalfOpen4` for concurrent writers.
        unsafe { *ptr = slot };
    } else {
        CT.insert(fwd_key, fwd, BPF_ANY)
            .map_err(|_| Reason::XdpDropCtInsert)?;
        if flags & ct_flags::SNAT == 0
            && CT
                .insert(
                    reply_key_of_v4(flow, &fwd),
                    reply_value_of_v4(flow, &fwd),
                    BPF_ANY,
                )
                .is_err()
        {
            let _ = CT.remove(fwd_key);
            return Err(Reason::XdpDropCtInsert);
        }
    }
    stats::count_n(
        Reason::CtCreated,
        if flags & ct_flags::SNAT == 0 { 2 } else { 1 },
    );
    Ok(fwd)
}
