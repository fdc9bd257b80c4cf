//! Frontend lookup and backend selection (the hash and slot arithmetic is in
//! `lb_common::select`, host-tested).
use lb_common::{select, service::config_flags, Backend4, Frontend4Key, Reason, Service4Value};

use crate::{
    maps::{BACKENDS, CONFIG, NODE_ADDRS, PORTS, SERVICES},
    parse::Flow4,
};

/// A matched frontend: its master key (with the address it was found under) and value.
#[derive(Clone, Copy)]
pub struct Frontend {
    pub key: Frontend4Key,
    pub svc: Service4Value,
}

/// Find the frontend for `flow`: the exact (daddr, dport, proto) first (ClusterIP,
/// LoadBalancer, externalIP, hostPort with hostIP), then the wildcard address 0 (NodePort,
/// hostPort without hostIP), which only matches packets addressed to the node itself.
#[inline(always)]
pub fn lookup_frontend_v4(flow: &Flow4) -> Option<Frontend> {
    if let Some(fe) = lookup_exact_v4(flow.daddr, flow.dport, flow.proto) {
        return Some(fe);
    }
    if !is_node_addr(flow.daddr) {
        return None;
    }
    lookup_exact_v4(0, flow.dport, flow.proto)
}

/// The frontend whose master key is exactly `(addr, port, proto)` in the external scope.
#[inline(always)]
pub fn lookup_exact_v4(addr: u32, port: u16, proto: u8) -> Option<Frontend> {
    let key = Frontend4Key::new(addr, port, proto, 0);
    // SAFETY: values are plain data written whole by the agent (one syscall per entry).
    let svc = unsafe { SERVICES.get(key) }?;
    Some(Frontend { key, svc: *svc })
}

/// Whether `addr` (network order) is one of this node's addresses (`LB4_NODE_ADDRS`).
#[inline(always)]
pub fn is_node_addr(addr: u32) -> bool {
    NODE_ADDRS.get_ptr(addr).is_some()
}

/// Whether a packet with `port` (raw, network order) may belong to a frontend or backend:
/// false only when the port filter is on (`config_flags::PORT_FILTER`) and `LB_PORTS` has
/// none of `bits` for it.
#[inline(always)]
pub fn port_may_match_v4(port: u16, bits: u8) -> bool {
    let on = CONFIG
        .get(0)
        .is_some_and(|c| c.flags & config_flags::PORT_FILTER != 0);
    !on || PORTS
        .get(u32::from(u16::from_be(port)))
        .is_some_and(|b| b & bits != 0)
}

/// The flow's hash under this node's seed (`LB_CONFIG`).
#[inline(always)]
pub fn flow_hash_v4(flow: &Flow4) -> u32 {
    let seed = CONFIG.get(0).map_or(0, |c| c.hash_seed);
    select::flow_hash_v4(
        flow.saddr, flow.daddr, flow.sport, flow.dport, flow.proto, seed,
    )
}

/// Reads of a frontend's slots before a new flow is dropped as `XdpDropBackendMissing`.
const SELECT_TRIES: u32 = 3;

/// Pick a backend for a new flow with hash `hash` (the flow hash on the XDP path, a random
/// number in the socket hooks): slot `hash % count + 1`, then the backend it points at.
/// Returns the backend id, the backend and the slot.
///
/// The agent may be between two writes: it writes a shrunk master before deleting the slots
/// above the new count, and deletes a backend only after no slot points at it. And a
/// preallocated hash map may hand a reader an element that an update has just recycled for
/// another key. So a value is used only when it has the shape of its kind (a master has no
/// backend id, a slot has no count); when the slot or its backend is missing or misshapen,
/// the master is read again and the slot chosen again from its current count. Only when that
/// keeps failing is the packet dropped.
#[inline(always)]
pub fn select_backend_v4(fe: &Frontend, hash: u32) -> Result<(u32, Backend4, u16), Reason> {
    let mut count = if fe.svc.backend_id == 0 {
        fe.svc.count
    } else {
        0
    };
    for _ in 0..SELECT_TRIES {
        if let Some(slot) = select::slot_for(hash, count) {
            // SAFETY: plain data written whole by the agent.
            if let Some(sv) = unsafe { SERVICES.get(fe.key.with_slot(slot)) } {
                let (id, is_slot) = (sv.backend_id, sv.count == 0 && sv.backend_id != 0);
                // SAFETY: as above.
                if let (true, Some(backend)) = (is_slot, unsafe { BACKENDS.get(id) }) {
                    return Ok((id, *backend, slot));
                }
            }
        }
        // SAFETY: as above.
        let master = unsafe { SERVICES.get(fe.key) }.ok_or(Reason::XdpDropBackendMissing)?;
        count = match (master.backend_id, master.count) {
            (0, 0) => return Err(Reason::XdpDropNoBackend),
            (0, n) => n,
            // A recycled element: read it again.
            _ => 0,
        };
    }
    Err(Reason::XdpDropBackendMissing)
}

/// Whether backend `id` still exists (a removed backend keeps only its established flows).
#[inline(always)]
pub fn backend_exists(id: u32) -> bool {
    BACKENDS.get_ptr(id).is_some()
}
