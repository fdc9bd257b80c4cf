//! sessionAffinity ClientIP: a client's new flows to a frontend go to the backend its last
//! new flow took, while that was less than the frontend's timeout ago and the backend still
//! holds the same slot of the frontend (so a backend that left the Service, or a reused id,
//! is never chosen). Otherwise the flow picks by hash and the choice is remembered.
use lb_common::{service::affinity_client, Affinity4Key, Affinity4Value, Backend4, Reason};

use crate::{
    clock,
    lb::{self, Frontend},
    maps::{AFFINITY, BACKENDS, SERVICES},
};

const NS_PER_SEC: u64 = 1_000_000_000;
const BPF_ANY: u64 = 0;

/// A client as affinity knows it: its address (XDP path) or its network namespace (socket
/// hooks), see [`affinity_client`].
#[derive(Clone, Copy)]
pub struct Client {
    pub id: u32,
    pub kind: u8,
}

impl Client {
    #[inline(always)]
    pub fn addr(saddr: u32) -> Self {
        Self {
            id: saddr,
            kind: affinity_client::ADDR,
        }
    }

    /// The low 32 bits of a netns cookie (a counter: they do not wrap in practice).
    #[inline(always)]
    pub fn netns(cookie: u64) -> Self {
        Self {
            id: cookie as u32,
            kind: affinity_client::NETNS,
        }
    }
}

/// The backend for a new flow (hash `hash`) of `client` at `fe`, which has affinity on.
#[inline(always)]
pub fn select_backend_v4(
    fe: &Frontend,
    client: Client,
    hash: u32,
) -> Result<(u32, Backend4), Reason> {
    let key = Affinity4Key {
        client: client.id,
        fe_addr: fe.key.addr,
        fe_port: fe.key.port,
        proto: fe.key.proto,
        client_kind: client.kind,
    };
    let now = clock::now_ns();
    let timeout_ns = u64::from(fe.svc.affinity_timeout_s) * NS_PER_SEC;
    if let Some(entry) = AFFINITY.get_ptr_mut(key) {
        // SAFETY: LRU values are plain data; a concurrent update at worst yields a stale copy.
        let a = unsafe { *entry };
        let fresh = clock::since(now, a.last_used_ns) < timeout_ns;
        if fresh && a.slot >= 1 && a.slot <= fe.svc.count {
            // SAFETY: plain data written whole by the agent.
            let slot = unsafe { SERVICES.get(fe.key.with_slot(a.slot)) };
            if slot.is_some_and(|s| s.backend_id == a.backend_id) {
                // SAFETY: as above.
                if let Some(b) = unsafe { BACKENDS.get(a.backend_id) } {
                    // SAFETY: an aligned u64 field of our own entry.
                    unsafe { (*entry).last_used_ns = now };
                    return Ok((a.backend_id, *b));
                }
            }
        }
    }
    let (id, backend, slot) = lb::select_backend_v4(fe, hash)?;
    let value = Affinity4Value {
        backend_id: id,
        slot,
        _pad: [0; 2],
        last_used_ns: now,
    };
    // Best effort: without the entry the next flow picks by hash again.
    let _ = AFFINITY.insert(key, value, BPF_ANY);
    Ok((id, backend))
}
