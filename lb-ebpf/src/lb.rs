//! Frontend lookup and backend selection (the hash and slot arithmetic is in
//! `lb_common::select`, host-tested).
use lb_common::{select, Backend4, Frontend4Key, Reason, Service4Value};

use crate::{
    maps::{BACKENDS, CONFIG, NODE_ADDRS, SERVICES},
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
    let key = Frontend4Key::new(flow.daddr, flow.dport, flow.proto, 0);
    // SAFETY: values are plain data written whole by the agent (one syscall per entry).
    if let Some(svc) = unsafe { SERVICES.get(key) } {
        return Some(Frontend { key, svc: *svc });
    }
    // SAFETY: as above.
    unsafe { NODE_ADDRS.get(flow.daddr) }?;
    let key = Frontend4Key::new(0, flow.dport, flow.proto, 0);
    // SAFETY: as above.
    let svc = unsafe { SERVICES.get(key) }?;
    Some(Frontend { key, svc: *svc })
}

/// The flow's hash under this node's seed (`LB_CONFIG`).
#[inline(always)]
pub fn flow_hash_v4(flow: &Flow4) -> u32 {
    let seed = CONFIG.get(0).map_or(0, |c| c.hash_seed);
    select::flow_hash_v4(
        flow.saddr, flow.daddr, flow.sport, flow.dport, flow.proto, seed,
    )
}

/// Pick a backend for a new flow: slot `hash % count + 1`, then the backend it points at.
/// Returns the backend id, the backend and the slot.
#[inline(always)]
pub fn select_backend_v4(fe: &Frontend, flow: &Flow4) -> Result<(u32, Backend4, u16), Reason> {
    let slot =
        select::slot_for(flow_hash_v4(flow), fe.svc.count).ok_or(Reason::XdpDropNoBackend)?;
    // SAFETY: plain data written whole by the agent.
    let slot_val =
        unsafe { SERVICES.get(fe.key.with_slot(slot)) }.ok_or(Reason::XdpDropBackendMissing)?;
    let id = slot_val.backend_id;
    // SAFETY: as above.
    let backend = unsafe { BACKENDS.get(id) }.ok_or(Reason::XdpDropBackendMissing)?;
    Ok((id, *backend, slot))
}

/// Whether backend `id` still exists (a removed backend keeps only its established flows).
#[inline(always)]
pub fn backend_exists(id: u32) -> bool {
    BACKENDS.get_ptr(id).is_some()
}
