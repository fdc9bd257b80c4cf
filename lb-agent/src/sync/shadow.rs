//! The sync's shadow of what the maps hold (services with their slots, backends, node
//! addresses), and the lookups the ordered writes need: slots of a frontend, backend
//! references, entry counts. Reading the shadow costs no syscall.
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use lb_common::{Backend4, Frontend4Key, Service4Value};

/// What the syncer believes the maps hold: only entries whose write succeeded.
#[derive(Debug, Clone, Default)]
pub(super) struct Shadow {
    /// `LB4_SERVICES`: master entries (slot 0) and their slots.
    pub(super) services: BTreeMap<Frontend4Key, Service4Value>,
    /// `LB4_BACKENDS`, by backend id.
    pub(super) backends: BTreeMap<u32, Backend4>,
    /// `LB4_NODE_ADDRS`.
    pub(super) node_addrs: BTreeSet<Ipv4Addr>,
}

impl Shadow {
    /// Entries in each map.
    pub(super) fn entry_counts(&self) -> [(&'static str, usize); 3] {
        use lb_common::maps as m;
        [
            (m::LB4_SERVICES, self.services.len()),
            (m::LB4_BACKENDS, self.backends.len()),
            (m::LB4_NODE_ADDRS, self.node_addrs.len()),
        ]
    }

    /// Master keys (slot 0) of the frontends with any entry in the services map.
    pub(super) fn frontends(&self) -> BTreeSet<Frontend4Key> {
        self.services.keys().map(|k| k.with_slot(0)).collect()
    }

    /// The backend count of the master entry of `fkey`, 0 if there is none.
    pub(super) fn count(&self, fkey: &Frontend4Key) -> u16 {
        self.services.get(fkey).map_or(0, |m| m.count)
    }

    /// Slot numbers (>= 1) present for the frontend `fkey`.
    pub(super) fn slots_of(&self, fkey: Frontend4Key) -> Vec<u16> {
        let lo = Frontend4Key {
            slot: 0,
            proto: 0,
            scope: 0,
            _pad: [0; 2],
            ..fkey
        };
        let hi = Frontend4Key {
            slot: u16::MAX,
            proto: u8::MAX,
            scope: u8::MAX,
            _pad: [u8::MAX; 2],
            ..fkey
        };
        self.services
            .range(lo..=hi)
            .map(|(k, _)| *k)
            .filter(|k| k.slot != 0 && k.with_slot(0) == fkey)
            .map(|k| k.slot)
            .collect()
    }

    /// Backend ids some slot points at.
    pub(super) fn referenced_backends(&self) -> BTreeSet<u32> {
        self.services
            .iter()
            .filter(|(k, _)| k.slot != 0)
            .map(|(_, v)| v.backend_id)
            .collect()
    }

    /// svc ids of the master entries.
    pub(super) fn svc_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.services
            .iter()
            .filter(|(k, _)| k.slot == 0)
            .map(|(_, v)| v.svc_id)
    }
}
