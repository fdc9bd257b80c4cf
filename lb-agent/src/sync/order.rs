//! The ordered writes of the sync: services with their slots, backends and node addresses
//! are put and deleted in an order in which the datapath never sees a dangling or
//! half-written backend set.
//!
//! Order of one [`Syncer::apply`]:
//! 1. new node addresses;
//! 2. frontends that are no longer desired: master entry, then its slots; then backends no
//!    slot references any more and that are not desired (frees capacity before new puts);
//! 3. new and changed backends;
//! 4. changed frontends, shrinking ones first. Growing (or new): the new slots, then the
//!    changed existing slots, then the master with the new count. Shrinking: the master
//!    with the smaller count, then the changed slots, then the unused slots are deleted.
//!    A frontend with a backend that could not be written is left as it is; a failed slot
//!    put leaves the old master (the unreachable new slots are rolled back);
//! 5. backends that no slot references any more;
//! 6. node addresses that are no longer desired.
//!
//! Failures never stop the sync: they are collected in the [`SyncReport`], the shadow keeps
//! the entries that really are in the maps, and the next apply retries.
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use lb_common::{Backend4, Frontend4Key, Service4Value};

use super::ids::BKey;
use super::{backend_value, frontend_key, SyncError, SyncFailure, SyncReport, Syncer};
use crate::dataplane::{Dataplane, DataplaneError};
use crate::model::{Desired, Frontend, FrontendId, Proto};

/// A desired frontend as map entries.
struct Target<'a> {
    id: FrontendId,
    fe: &'a Frontend,
    /// Backend identities in slot order (slot 1 first).
    backends: Vec<BKey>,
}

fn describe_backend(b: &Backend4) -> String {
    let proto = Proto::from_ipproto(b.proto).map_or_else(|| b.proto.to_string(), |p| p.to_string());
    format!(
        "{}:{}/{}",
        Ipv4Addr::from(u32::from_be(b.addr)),
        u16::from_be(b.port),
        proto
    )
}

fn describe_key(k: &Frontend4Key) -> String {
    let proto = Proto::from_ipproto(k.proto).map_or_else(|| k.proto.to_string(), |p| p.to_string());
    let scope = if k.scope == lb_common::service::scope::INTERNAL {
        " (in-cluster)"
    } else {
        ""
    };
    format!(
        "{}:{}/{}{scope}",
        Ipv4Addr::from(u32::from_be(k.addr)),
        u16::from_be(k.port),
        proto
    )
}

fn fail(r: &mut SyncReport, entry: String, e: DataplaneError) {
    log::warn!("sync: {entry}: {e}");
    r.failures.push(SyncFailure {
        entry,
        error: SyncError::Dataplane(e),
    });
}

impl Syncer {
    /// Write the difference between the shadow and `desired`, in the order of the module
    /// docs, into `dp` and `r`. The shadow must have been adopted.
    pub(super) fn write_in_order(
        &mut self,
        desired: &Desired,
        dp: &mut impl Dataplane,
        r: &mut SyncReport,
    ) {
        // Desired entries.
        let mut want_backends: BTreeMap<BKey, Backend4> = BTreeMap::new();
        let mut targets: BTreeMap<Frontend4Key, Target<'_>> = BTreeMap::new();
        for (id, fe) in &desired.frontends {
            let mut list = Vec::with_capacity(fe.backends.len());
            for b in &fe.backends {
                let v = backend_value(b, id.proto);
                let key = BKey::of(&v);
                want_backends
                    .entry(key)
                    .and_modify(|cur| cur.flags |= v.flags)
                    .or_insert(v);
                list.push(key);
            }
            targets.insert(
                frontend_key(id),
                Target {
                    id: *id,
                    fe,
                    backends: list,
                },
            );
        }

        // 1. New node addresses.
        for addr in desired
            .node_addrs
            .difference(&self.shadow.node_addrs.clone())
        {
            match dp.put_node_addr(*addr) {
                Ok(()) => {
                    r.puts += 1;
                    self.shadow.node_addrs.insert(*addr);
                }
                Err(e) => fail(r, format!("node address {addr}"), e),
            }
        }

        // 2. Frontends no longer desired, then the backends only they used.
        let present: BTreeSet<Frontend4Key> = self.shadow.frontends();
        for fkey in present.iter().filter(|k| !targets.contains_key(k)) {
            self.remove_frontend(*fkey, dp, r);
        }
        let wanted_ids: BTreeSet<u32> = want_backends
            .keys()
            .filter_map(|k| self.backend_ids.get(k).copied())
            .collect();
        self.sweep_backends(&wanted_ids, dp, r);
        // Their ids are free for the allocations below.
        self.release_ids(&want_backends, &targets);

        // 3. New and changed backends.
        let mut missing: BTreeSet<BKey> = BTreeSet::new();
        for (key, value) in &want_backends {
            let id = match self.backend_ids.get(key) {
                Some(id) => *id,
                None => match self.backend_alloc.alloc() {
                    Some(id) => {
                        self.backend_ids.insert(*key, id);
                        id
                    }
                    None => {
                        missing.insert(*key);
                        r.failures.push(SyncFailure {
                            entry: format!("backend {}", describe_backend(value)),
                            error: SyncError::BackendIdsExhausted {
                                limit: self.backend_alloc.limit(),
                            },
                        });
                        continue;
                    }
                },
            };
            if self.shadow.backends.get(&id) == Some(value) {
                continue;
            }
            match dp.put_backend(id, *value) {
                Ok(()) => {
                    r.puts += 1;
                    self.shadow.backends.insert(id, *value);
                }
                Err(e) => {
                    missing.insert(*key);
                    fail(r, format!("backend {id} {}", describe_backend(value)), e);
                }
            }
        }

        // 4. Changed frontends: shrinking ones first (they free slots), then the others.
        let (shrinking, growing): (Vec<_>, Vec<_>) = targets
            .iter()
            .partition(|(k, t)| t.backends.len() < usize::from(self.shadow.count(k)));
        for (fkey, t) in shrinking.into_iter().chain(growing) {
            if !self.sync_frontend(*fkey, t, &missing, dp, r) {
                r.unsynced.push(t.id);
            }
        }

        // 5. Backends no slot points at any more. This includes desired backends of a
        // frontend that could not be synced: they are written again on the next apply, and
        // meanwhile do not take capacity others could use.
        self.sweep_backends(&BTreeSet::new(), dp, r);

        // 6. Node addresses no longer desired.
        for addr in self
            .shadow
            .node_addrs
            .clone()
            .difference(&desired.node_addrs)
        {
            match dp.delete_node_addr(*addr) {
                Ok(()) => {
                    r.deletes += 1;
                    self.shadow.node_addrs.remove(addr);
                }
                Err(e) => fail(r, format!("node address {addr}"), e),
            }
        }

        self.release_ids(&want_backends, &targets);
    }

    fn put_service(
        &mut self,
        key: Frontend4Key,
        value: Service4Value,
        what: &dyn Fn() -> String,
        dp: &mut impl Dataplane,
        r: &mut SyncReport,
    ) -> bool {
        if self.shadow.services.get(&key) == Some(&value) {
            return true;
        }
        match dp.put_service(key, value) {
            Ok(()) => {
                r.puts += 1;
                self.shadow.services.insert(key, value);
                true
            }
            Err(e) => {
                fail(r, what(), e);
                false
            }
        }
    }

    fn delete_service(
        &mut self,
        key: Frontend4Key,
        what: &dyn Fn() -> String,
        dp: &mut impl Dataplane,
        r: &mut SyncReport,
    ) -> bool {
        if !self.shadow.services.contains_key(&key) {
            return true;
        }
        match dp.delete_service(&key) {
            Ok(()) => {
                r.deletes += 1;
                self.shadow.services.remove(&key);
                true
            }
            Err(e) => {
                fail(r, what(), e);
                false
            }
        }
    }

    /// Delete the slots of `fkey` numbered above `above` (they must be unreachable).
    fn delete_slots_above(
        &mut self,
        fkey: Frontend4Key,
        above: u16,
        what: &dyn Fn() -> String,
        dp: &mut impl Dataplane,
        r: &mut SyncReport,
    ) {
        for slot in self
            .shadow
            .slots_of(fkey)
            .into_iter()
            .filter(|s| *s > above)
        {
            let w = || format!("{} slot {slot}", what());
            self.delete_service(fkey.with_slot(slot), &w, dp, r);
        }
    }

    /// A frontend that is no longer desired: master first, then its slots.
    fn remove_frontend(&mut self, fkey: Frontend4Key, dp: &mut impl Dataplane, r: &mut SyncReport) {
        let what = || format!("stale frontend {}", describe_key(&fkey));
        if !self.delete_service(fkey, &what, dp, r) {
            return;
        }
        self.delete_slots_above(fkey, 0, &what, dp, r);
    }

    /// Delete backends that no slot references and whose id is not in `keep`.
    fn sweep_backends(
        &mut self,
        keep: &BTreeSet<u32>,
        dp: &mut impl Dataplane,
        r: &mut SyncReport,
    ) {
        let referenced = self.shadow.referenced_backends();
        let gone: Vec<(u32, Backend4)> = self
            .shadow
            .backends
            .iter()
            .filter(|(id, _)| !referenced.contains(id) && !keep.contains(id))
            .map(|(id, b)| (*id, *b))
            .collect();
        for (id, b) in gone {
            match dp.delete_backend(id) {
                Ok(()) => {
                    r.deletes += 1;
                    self.shadow.backends.remove(&id);
                }
                Err(e) => fail(r, format!("backend {id} {}", describe_backend(&b)), e),
            }
        }
    }

    /// Bring one desired frontend up to date. False if it is not (completely) in sync.
    fn sync_frontend(
        &mut self,
        fkey: Frontend4Key,
        t: &Target<'_>,
        missing: &BTreeSet<BKey>,
        dp: &mut impl Dataplane,
        r: &mut SyncReport,
    ) -> bool {
        let what = || format!("frontend {} ({})", t.id, t.fe.owner);

        // Backend ids in slot order; a backend that is not in the map blocks the frontend.
        let mut ids = Vec::with_capacity(t.backends.len());
        for key in &t.backends {
            match self.backend_ids.get(key) {
                Some(id) if !missing.contains(key) && self.shadow.backends.contains_key(id) => {
                    ids.push(*id)
                }
                _ => {
                    let b = Backend4 {
                        addr: key.addr,
                        port: key.port,
                        proto: key.proto,
                        ..Default::default()
                    };
                    r.failures.push(SyncFailure {
                        entry: what(),
                        error: SyncError::BackendMissing {
                            backend: describe_backend(&b),
                        },
                    });
                    return false;
                }
            }
        }
        let max = usize::from(u16::MAX);
        let mut ok = true;
        if ids.len() > max {
            r.failures.push(SyncFailure {
                entry: what(),
                error: SyncError::TooManyBackends {
                    count: ids.len(),
                    max,
                },
            });
            ids.truncate(max);
            ok = false;
        }

        let svc_id = match self.svc_ids.get(&fkey) {
            Some(id) => *id,
            None => match self.svc_alloc.alloc() {
                Some(id) => {
                    // A reused id must not inherit the counters of the frontend it served.
                    if let Err(e) = dp.reset_svc_stats(id) {
                        log::warn!("{}: resetting counters of svc id {id}: {e}", what());
                    }
                    self.svc_ids.insert(fkey, id);
                    id
                }
                None => {
                    // No counter slot: program the frontend all the same, uncounted; the
                    // next apply tries again.
                    log::warn!(
                        "{}: {}; programmed without per-frontend counters",
                        what(),
                        SyncError::SvcIdsExhausted {
                            limit: self.svc_alloc.limit(),
                        }
                    );
                    r.uncounted.push(t.id);
                    lb_common::service::NO_SVC_ID
                }
            },
        };

        let c1 = ids.len() as u16;
        let master = Service4Value {
            backend_id: 0,
            count: c1,
            flags: t.fe.flags,
            svc_id,
            affinity_timeout_s: t.fe.affinity_timeout_s,
        };
        let slot_value = |id: u32| Service4Value {
            backend_id: id,
            ..Default::default()
        };
        let c0 = self.shadow.count(&fkey);

        if c1 >= c0 {
            // Growing (or new, or same size): new slots, changed old slots, then the master.
            for slot in c0 + 1..=c1 {
                let w = || format!("{} slot {slot}", what());
                let v = slot_value(ids[usize::from(slot) - 1]);
                if !self.put_service(fkey.with_slot(slot), v, &w, dp, r) {
                    // The master still says c0: the new slots are unreachable, roll them back
                    // so a full map is not filled with them.
                    self.delete_slots_above(fkey, c0, &what, dp, r);
                    return false;
                }
            }
            for slot in 1..=c0 {
                let w = || format!("{} slot {slot}", what());
                let v = slot_value(ids[usize::from(slot) - 1]);
                if !self.put_service(fkey.with_slot(slot), v, &w, dp, r) {
                    self.delete_slots_above(fkey, c0, &what, dp, r);
                    return false;
                }
            }
            if !self.put_service(fkey, master, &what, dp, r) {
                self.delete_slots_above(fkey, c0, &what, dp, r);
                return false;
            }
        } else {
            // Shrinking: the master first, then the remaining slots, then drop the rest.
            if !self.put_service(fkey, master, &what, dp, r) {
                return false;
            }
            for slot in 1..=c1 {
                let w = || format!("{} slot {slot}", what());
                let v = slot_value(ids[usize::from(slot) - 1]);
                if !self.put_service(fkey.with_slot(slot), v, &w, dp, r) {
                    ok = false;
                }
            }
        }
        // Slots beyond the count: the old tail of a shrink, or leftovers of an earlier run.
        let before = r.failures.len();
        self.delete_slots_above(fkey, c1, &what, dp, r);
        ok && r.failures.len() == before
    }

    /// Forget and free ids that are neither in the maps nor desired.
    fn release_ids(
        &mut self,
        want_backends: &BTreeMap<BKey, Backend4>,
        targets: &BTreeMap<Frontend4Key, Target<'_>>,
    ) {
        let backends = &self.shadow.backends;
        self.backend_ids
            .retain(|k, id| backends.contains_key(id) || want_backends.contains_key(k));
        let mut keep: BTreeSet<u32> = self.backend_ids.values().copied().collect();
        keep.extend(self.shadow.backends.keys().copied());
        self.backend_alloc.retain(&keep);

        let services = &self.shadow.services;
        self.svc_ids
            .retain(|k, _| services.contains_key(k) || targets.contains_key(k));
        let mut keep: BTreeSet<u32> = self.svc_ids.values().copied().collect();
        keep.extend(self.shadow.svc_ids());
        self.svc_alloc.retain(&keep);
    }
}
