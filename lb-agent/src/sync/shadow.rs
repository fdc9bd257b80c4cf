//! The sync's shadow of what the maps hold, per frontend: its master entry and its slots,
//! the backends with the number of slots that point at each, and the node addresses.
//! Reading the shadow costs no syscall, and every lookup the ordered writes need is about one
//! frontend or one backend, so a change costs the same at 10 or 100,000 Services.
use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use lb_common::{Backend4, Frontend4Key, Service4Value};

use crate::hash::HashMap;

/// What the syncer believes the maps hold: only entries whose write succeeded.
#[derive(Debug, Clone, Default)]
pub(super) struct Shadow {
    /// `LB4_SERVICES` by master key (slot 0): the master and the slots of each frontend.
    frontends: HashMap<Frontend4Key, FrontendShadow>,
    /// Slot entries whose value is not a plain backend pointer (found in the maps by
    /// `adopt`, never written by the sync), by full key.
    odd_slots: HashMap<Frontend4Key, Service4Value>,
    /// `LB4_BACKENDS`.
    pub(super) backends: BackendTable,
    /// Slot references to backend ids that are not in `backends`.
    dangling: HashMap<u32, u32>,
    /// `LB4_NODE_ADDRS`.
    pub(super) node_addrs: BTreeSet<Ipv4Addr>,
    /// Entries of `LB4_SERVICES`.
    service_entries: usize,
    /// Backend ids that may have no slot pointing at them any more (checked when swept).
    maybe_orphans: Vec<u32>,
    /// Master entries per svc id (an adopted map may have two masters with one id).
    svc_refs: HashMap<u32, u32>,
}

#[derive(Debug, Clone, Default)]
struct FrontendShadow {
    master: Option<Service4Value>,
    /// Backend id of slot `i + 1`; 0 = no entry (or an odd one, in `odd_slots`).
    slots: Vec<u32>,
}

impl FrontendShadow {
    fn is_empty(&self) -> bool {
        self.master.is_none() && self.slots.is_empty()
    }
}

/// The value of a slot entry pointing at backend `id`.
pub(super) fn slot_value(id: u32) -> Service4Value {
    Service4Value {
        backend_id: id,
        ..Default::default()
    }
}

fn is_plain_slot(v: &Service4Value) -> bool {
    v.backend_id != 0 && *v == slot_value(v.backend_id)
}

impl Shadow {
    /// Entries in each map.
    pub(super) fn entry_counts(&self) -> [(&'static str, usize); 3] {
        use lb_common::maps as m;
        [
            (m::LB4_SERVICES, self.service_entries),
            (m::LB4_BACKENDS, self.backends.len()),
            (m::LB4_NODE_ADDRS, self.node_addrs.len()),
        ]
    }

    /// Master keys (slot 0) of the frontends with any entry in the services map.
    pub(super) fn frontends(&self) -> impl Iterator<Item = Frontend4Key> + '_ {
        self.frontends.keys().copied()
    }

    pub(super) fn has_frontend(&self, fkey: &Frontend4Key) -> bool {
        self.frontends.contains_key(fkey)
    }

    /// The entry at `key` (a master or a slot).
    pub(super) fn get(&self, key: &Frontend4Key) -> Option<Service4Value> {
        let fe = self.frontends.get(&key.with_slot(0))?;
        if key.slot == 0 {
            return fe.master;
        }
        match fe.slots.get(usize::from(key.slot) - 1) {
            Some(0) | None => self.odd_slots.get(key).copied(),
            Some(id) => Some(slot_value(*id)),
        }
    }

    /// The backend count of the master entry of `fkey`, 0 if there is none.
    pub(super) fn count(&self, fkey: &Frontend4Key) -> u16 {
        self.frontends
            .get(fkey)
            .and_then(|f| f.master)
            .map_or(0, |m| m.count)
    }

    /// The master entry of `fkey`.
    pub(super) fn master(&self, fkey: &Frontend4Key) -> Option<Service4Value> {
        self.frontends.get(fkey).and_then(|f| f.master)
    }

    /// Slot numbers (>= 1) present for the frontend `fkey`, ascending.
    pub(super) fn slots_of(&self, fkey: Frontend4Key) -> Vec<u16> {
        let Some(fe) = self.frontends.get(&fkey) else {
            return Vec::new();
        };
        (1..=fe.slots.len())
            .filter_map(|i| {
                let slot = i as u16;
                (fe.slots[i - 1] != 0 || self.odd_slots.contains_key(&fkey.with_slot(slot)))
                    .then_some(slot)
            })
            .collect()
    }

    /// Record that `key` now holds `value`.
    pub(super) fn insert(&mut self, key: Frontend4Key, value: Service4Value) {
        self.remove(&key);
        self.service_entries += 1;
        let fkey = key.with_slot(0);
        if key.slot == 0 {
            *self.svc_refs.entry(value.svc_id).or_default() += 1;
            self.frontends.entry(fkey).or_default().master = Some(value);
            return;
        }
        self.add_ref(value.backend_id);
        let fe = self.frontends.entry(fkey).or_default();
        let i = usize::from(key.slot) - 1;
        if fe.slots.len() <= i {
            fe.slots.resize(i + 1, 0);
        }
        if is_plain_slot(&value) {
            fe.slots[i] = value.backend_id;
        } else {
            self.odd_slots.insert(key, value);
        }
    }

    /// Record that `key` is gone from the map.
    pub(super) fn remove(&mut self, key: &Frontend4Key) {
        let fkey = key.with_slot(0);
        let Some(fe) = self.frontends.get_mut(&fkey) else {
            return;
        };
        let mut removed = None;
        if key.slot == 0 {
            if let Some(m) = fe.master.take() {
                self.service_entries -= 1;
                if let Some(n) = self.svc_refs.get_mut(&m.svc_id) {
                    *n -= 1;
                    if *n == 0 {
                        self.svc_refs.remove(&m.svc_id);
                    }
                }
            }
        } else {
            let i = usize::from(key.slot) - 1;
            if let Some(id) = fe.slots.get_mut(i).filter(|id| **id != 0) {
                removed = Some(*id);
                *id = 0;
            } else if let Some(v) = self.odd_slots.remove(key) {
                removed = Some(v.backend_id);
            }
            while fe.slots.last() == Some(&0)
                && !self
                    .odd_slots
                    .contains_key(&fkey.with_slot(fe.slots.len() as u16))
            {
                fe.slots.pop();
            }
            if removed.is_some() {
                self.service_entries -= 1;
            }
        }
        if fe.is_empty() {
            self.frontends.remove(&fkey);
        }
        if let Some(id) = removed {
            self.drop_ref(id);
        }
    }

    fn add_ref(&mut self, id: u32) {
        match self.backends.get_mut(id) {
            Some(b) => b.refs += 1,
            None => *self.dangling.entry(id).or_default() += 1,
        }
    }

    fn drop_ref(&mut self, id: u32) {
        match self.backends.get_mut(id) {
            Some(b) => {
                b.refs -= 1;
                if b.refs == 0 {
                    self.maybe_orphans.push(id);
                }
            }
            None => {
                if let Some(n) = self.dangling.get_mut(&id) {
                    *n -= 1;
                    if *n == 0 {
                        self.dangling.remove(&id);
                    }
                }
            }
        }
    }

    /// Record that backend `id` now holds `value`.
    pub(super) fn put_backend(&mut self, id: u32, value: Backend4) {
        if let Some(b) = self.backends.get_mut(id) {
            b.value = value;
            return;
        }
        let refs = self.dangling.remove(&id).unwrap_or(0);
        self.backends.insert(id, BackendShadow { value, refs });
        if refs == 0 {
            self.maybe_orphans.push(id);
        }
    }

    /// Record that backend `id` is gone.
    pub(super) fn delete_backend(&mut self, id: u32) {
        if let Some(b) = self.backends.remove(id) {
            if b.refs > 0 {
                self.dangling.insert(id, b.refs);
            }
        }
    }

    /// The backend `id`.
    pub(super) fn backend(&self, id: u32) -> Option<Backend4> {
        self.backends.get(id).map(|b| b.value)
    }

    /// Backends in the map that no slot points at, ascending by id (each checked once: the
    /// candidates are those whose last reference went since the last call).
    pub(super) fn take_orphans(&mut self) -> Vec<(u32, Backend4)> {
        let mut ids = std::mem::take(&mut self.maybe_orphans);
        ids.sort_unstable();
        ids.dedup();
        ids.into_iter()
            .filter_map(|id| {
                let b = self.backends.get(id)?;
                (b.refs == 0).then_some((id, b.value))
            })
            .collect()
    }

    /// Put back orphans that were not swept (a delete failed, or they are still wanted).
    pub(super) fn keep_orphans(&mut self, ids: impl IntoIterator<Item = u32>) {
        self.maybe_orphans.extend(ids);
    }

    /// How many master entries carry `svc_id`.
    pub(super) fn masters_with_svc_id(&self, svc_id: u32) -> u32 {
        self.svc_refs.get(&svc_id).copied().unwrap_or(0)
    }
}

/// One backend of the shadow: its value and how many slots point at it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct BackendShadow {
    pub(super) value: Backend4,
    pub(super) refs: u32,
}

/// Backends by id: a dense vector for the ids the sync hands out (they start at 1 and stay
/// close together), with a bitset of the ids present (an `Option` would take 20 bytes an
/// entry instead of 16: 4 MB at a million backends), and a hash map for any other id found
/// in the maps.
#[derive(Debug, Clone, Default)]
pub(super) struct BackendTable {
    dense: Vec<BackendShadow>,
    present: Vec<u64>,
    sparse: HashMap<u32, BackendShadow>,
    len: usize,
}

impl BackendTable {
    /// Ids below this bound may go to the dense vector (grown on demand, never beyond
    /// twice the entries it would hold plus a margin).
    fn dense_ok(&self, id: u32) -> bool {
        let id = id as usize;
        id < self.dense.len() || id <= 2 * self.len + 4096
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// Whether dense index `i` (below `dense.len()`) holds a backend.
    fn is_present(&self, i: usize) -> bool {
        self.present
            .get(i / 64)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    fn set_present(&mut self, i: usize, on: bool) {
        let w = i / 64;
        if self.present.len() <= w {
            self.present.resize(w + 1, 0);
        }
        if on {
            self.present[w] |= 1 << (i % 64);
        } else {
            self.present[w] &= !(1 << (i % 64));
        }
    }

    pub(super) fn get(&self, id: u32) -> Option<&BackendShadow> {
        let i = id as usize;
        if i < self.dense.len() {
            return self.is_present(i).then(|| &self.dense[i]);
        }
        self.sparse.get(&id)
    }

    fn get_mut(&mut self, id: u32) -> Option<&mut BackendShadow> {
        let i = id as usize;
        if i < self.dense.len() {
            return if self.is_present(i) {
                Some(&mut self.dense[i])
            } else {
                None
            };
        }
        self.sparse.get_mut(&id)
    }

    pub(super) fn contains(&self, id: u32) -> bool {
        self.get(id).is_some()
    }

    fn insert(&mut self, id: u32, b: BackendShadow) {
        if self.get(id).is_none() {
            self.len += 1;
        }
        if self.dense_ok(id) {
            let i = id as usize;
            if self.dense.len() <= i {
                // Grow by a quarter, not double: a million backends, not two.
                let more = (i + 1 - self.dense.len()).max(self.dense.len() / 4);
                self.dense.reserve_exact(more);
                self.dense.resize(i + 1, BackendShadow::default());
                // Ids the dense range now covers move out of `sparse`: `get` looks only in
                // the dense vector below its length.
                let covered: Vec<u32> = self
                    .sparse
                    .keys()
                    .copied()
                    .filter(|k| (*k as usize) <= i)
                    .collect();
                for k in covered {
                    if let Some(moved) = self.sparse.remove(&k) {
                        self.dense[k as usize] = moved;
                        self.set_present(k as usize, true);
                    }
                }
            }
            self.dense[i] = b;
            self.set_present(i, true);
        } else {
            self.sparse.insert(id, b);
        }
    }

    fn remove(&mut self, id: u32) -> Option<BackendShadow> {
        let i = id as usize;
        let b = if i < self.dense.len() {
            let b = self.is_present(i).then(|| self.dense[i]);
            self.set_present(i, false);
            b
        } else {
            self.sparse.remove(&id)
        };
        if b.is_some() {
            self.len -= 1;
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(refs: u32) -> BackendShadow {
        BackendShadow {
            value: Backend4::default(),
            refs,
        }
    }

    /// An id kept in the sparse map stays found once the dense vector grows past it (the
    /// reliability suite's endpoint churn lost backends that way).
    #[test]
    fn sparse_ids_stay_found_when_the_dense_range_grows_over_them() {
        let mut t = BackendTable::default();
        t.insert(1, b(1));
        t.insert(10_000, b(2));
        assert_eq!(t.get(10_000).map(|x| x.refs), Some(2));
        for id in 2..=9_000 {
            t.insert(id, b(0));
        }
        // Dense now reaches past 10,000.
        t.insert(10_001, b(3));
        assert_eq!(t.get(10_000).map(|x| x.refs), Some(2));
        assert_eq!(t.len(), 9_002);
        assert_eq!(t.remove(10_000).map(|x| x.refs), Some(2));
        assert!(!t.contains(10_000));
        assert_eq!(t.len(), 9_001);
    }
}
