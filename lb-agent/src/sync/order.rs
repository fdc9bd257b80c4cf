//! The ordered writes of the sync: services with their slots, backends and node addresses
//! are put and deleted in an order in which the datapath never sees a dangling or
//! half-written backend set.
//!
//! Order of one flush (of the frontends changed since the last one; of every frontend for
//! [`Syncer::apply`]):
//! 1. new node addresses;
//! 2. frontends that are no longer desired: master entry, then its slots; then backends no
//!    slot references any more and that are not desired (frees capacity before new puts);
//! 3. new and changed backends (those the written frontends use, and those whose flags
//!    changed);
//! 4. changed frontends, shrinking ones first. Growing (or new): the new slots, then the
//!    changed existing slots, then the master with the new count. Shrinking: the master
//!    with the smaller count, then the changed slots, then the unused slots are deleted.
//!    A frontend with a backend that could not be written is left as it is; a failed slot
//!    put leaves the old master (the unreachable new slots are rolled back);
//! 5. backends that no slot references any more;
//! 6. node addresses that are no longer desired.
//!
//! Many puts at once (the first sync) go through `BPF_MAP_UPDATE_BATCH` in the same order:
//! every backend; then the slots of every growing frontend, then their masters. A batch that
//! stops at a failing entry leaves the entries before it written; the rest are written one
//! by one as above, so a failure is handled (and reported) exactly as without batching.
//!
//! Failures never stop the sync: they are collected in the [`SyncReport`], the shadow keeps
//! the entries that really are in the maps, and the failed frontends are retried at the
//! next flush.
use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use lb_common::{Backend4, Frontend4Key, Service4Value};

use super::ids::BKey;
use super::shadow::slot_value;
use super::{SyncError, SyncFailure, SyncReport, Syncer};
use crate::dataplane::{Dataplane, DataplaneError};
use crate::model::{FrontendId, Name, Proto};

/// Puts at or above this many go through `BPF_MAP_UPDATE_BATCH`.
const BATCH_MIN: usize = 1024;
/// Backends (and eighths of it, frontends) prepared and written at a time.
const CHUNK: usize = 65_536;

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

fn bkey_backend(key: &BKey) -> Backend4 {
    Backend4 {
        addr: key.addr,
        port: key.port,
        proto: key.proto,
        ..Default::default()
    }
}

/// A growing frontend, ready to be written in a batch.
struct Plan {
    fkey: Frontend4Key,
    id: FrontendId,
    owner: Name,
    ids: Vec<u32>,
    master: Service4Value,
    c0: u16,
}

/// What one flush deleted, for the release of ids at its end.
#[derive(Default)]
struct Released {
    backends: Vec<(u32, BKey)>,
    masters: Vec<(Frontend4Key, u32)>,
}

impl Syncer {
    /// Write the pending frontends and backends in the order of the module docs into `dp`
    /// and `r`. The shadow must have been adopted.
    pub(super) fn write_in_order(&mut self, dp: &mut impl Dataplane, r: &mut SyncReport) {
        let pending = std::mem::take(&mut self.pending);
        // Covered below: every new identity is a backend of a pending frontend.
        self.new_backends = Vec::new();
        let mut unsynced: BTreeSet<Frontend4Key> = BTreeSet::new();
        let mut released = Released::default();
        let mut write_backends: Vec<BKey> = std::mem::take(&mut self.pending_backends)
            .into_iter()
            .collect();
        for k in &pending {
            if let Some(w) = self.want.get(k) {
                write_backends.extend(w.backends().map(|(b, _)| b));
            }
        }
        write_backends.sort_unstable();
        write_backends.dedup();

        // 1. New node addresses.
        let new_addrs: Vec<Ipv4Addr> = self
            .want_node_addrs
            .difference(&self.shadow.node_addrs)
            .copied()
            .collect();
        for addr in new_addrs {
            match dp.put_node_addr(addr) {
                Ok(()) => {
                    r.puts += 1;
                    self.shadow.node_addrs.insert(addr);
                }
                Err(e) => fail(r, format!("node address {addr}"), e),
            }
        }

        // 2. Frontends no longer desired, then the backends only they used.
        let stale: Vec<Frontend4Key> = pending
            .iter()
            .filter(|k| !self.want.contains_key(k) && self.shadow.has_frontend(k))
            .copied()
            .collect();
        for fkey in stale {
            if !self.remove_frontend(fkey, dp, r, &mut released) {
                unsynced.insert(fkey);
            }
        }
        self.sweep_backends(true, dp, r, &mut released);
        // Their ids are free for the allocations below.
        self.release_ids(&mut released);

        // 3. New and changed backends.
        let mut missing: BTreeSet<BKey> = BTreeSet::new();
        self.put_wanted_backends(&write_backends, false, &mut missing, dp, r);
        drop(write_backends);

        // 4. Changed frontends: shrinking ones first (they free slots), then the others.
        let (shrinking, growing): (Vec<Frontend4Key>, Vec<Frontend4Key>) = pending
            .iter()
            .filter(|k| self.want.contains_key(k))
            .partition(|k| {
                self.want
                    .get(k)
                    .is_some_and(|w| w.fe.backends.len() < usize::from(self.shadow.count(k)))
            });
        for fkey in shrinking {
            if !self.sync_frontend(fkey, &missing, dp, r, &mut released) {
                unsynced.insert(fkey);
            }
        }
        let slots: usize = growing
            .iter()
            .filter_map(|k| self.want.get(k))
            .map(|w| w.fe.backends.len())
            .sum();
        if slots >= BATCH_MIN {
            // A chunk's slots, then its masters: every master still follows its own slots.
            for chunk in growing.chunks(CHUNK / 8) {
                self.sync_growing_batched(chunk, &missing, dp, r, &mut released, &mut unsynced);
            }
        } else {
            for fkey in growing {
                if !self.sync_frontend(fkey, &missing, dp, r, &mut released) {
                    unsynced.insert(fkey);
                }
            }
        }
        for fkey in &unsynced {
            if let Some(w) = self.want.get(fkey) {
                r.unsynced.push(w.id);
            }
        }

        // 5. Backends no slot points at any more. This includes desired backends of a
        // frontend that could not be synced: they are written again on the next flush, and
        // meanwhile do not take capacity others could use.
        self.sweep_backends(false, dp, r, &mut released);

        // 6. Node addresses no longer desired.
        let gone_addrs: Vec<Ipv4Addr> = self
            .shadow
            .node_addrs
            .difference(&self.want_node_addrs)
            .copied()
            .collect();
        for addr in gone_addrs {
            match dp.delete_node_addr(addr) {
                Ok(()) => {
                    r.deletes += 1;
                    self.shadow.node_addrs.remove(&addr);
                }
                Err(e) => fail(r, format!("node address {addr}"), e),
            }
        }

        self.release_ids(&mut released);
        self.pending.extend(unsynced);
    }

    /// Put the desired value of each backend in `keys` whose value in the map differs
    /// (allocating ids for new identities); with `only_new`, only identities that have no id
    /// yet. In chunks, so that a first sync of millions of entries never holds them all
    /// twice. Failed ones are `missing`.
    fn put_wanted_backends(
        &mut self,
        keys: &[BKey],
        only_new: bool,
        missing: &mut BTreeSet<BKey>,
        dp: &mut impl Dataplane,
        r: &mut SyncReport,
    ) {
        for chunk in keys.chunks(CHUNK) {
            let mut puts: Vec<(u32, Backend4)> = Vec::with_capacity(chunk.len());
            for key in chunk {
                let Some((row, count, id)) = self.identities.wanted(key) else {
                    continue;
                };
                let value = Backend4 {
                    flags: count.flags(),
                    ..bkey_backend(key)
                };
                let id = match id {
                    0 => match self.backend_alloc.alloc() {
                        Some(id) => {
                            self.identities.set_id_at(row, id);
                            id
                        }
                        None => {
                            missing.insert(*key);
                            r.failures.push(SyncFailure {
                                entry: format!("backend {}", describe_backend(&value)),
                                error: SyncError::BackendIdsExhausted {
                                    limit: self.backend_alloc.limit(),
                                },
                            });
                            continue;
                        }
                    },
                    _ if only_new => continue,
                    id => id,
                };
                if self.shadow.backend(id) != Some(value) {
                    puts.push((id, value));
                }
            }
            self.put_backends(&puts, missing, dp, r);
        }
    }

    /// Before the desired state is complete (a first list still arriving): put the backends
    /// of identities that have no id yet. No slot points at a new id, so the datapath cannot
    /// see them, and the flush that follows the complete list has that much less to write.
    /// Anything that fails here is simply written (or reported) by that flush.
    pub fn prewrite_new_backends(&mut self, dp: &mut impl Dataplane) -> SyncReport {
        if !self.adopted {
            if let Err(error) = self.adopt(dp) {
                return SyncReport::read_failed(error);
            }
        }
        let mut r = SyncReport::default();
        let keys = std::mem::take(&mut self.new_backends);
        let mut missing = BTreeSet::new();
        self.put_wanted_backends(&keys, true, &mut missing, dp, &mut r);
        r
    }

    fn put_service(
        &mut self,
        key: Frontend4Key,
        value: Service4Value,
        what: &dyn Fn() -> String,
        dp: &mut impl Dataplane,
        r: &mut SyncReport,
        released: &mut Released,
    ) -> bool {
        let old = self.shadow.get(&key);
        if old == Some(value) {
            return true;
        }
        match dp.put_service(key, value) {
            Ok(()) => {
                r.puts += 1;
                self.record_put(key, value, old, released);
                true
            }
            Err(e) => {
                fail(r, what(), e);
                false
            }
        }
    }

    /// The shadow after a successful put of `key` (which held `old`).
    fn record_put(
        &mut self,
        key: Frontend4Key,
        value: Service4Value,
        old: Option<Service4Value>,
        released: &mut Released,
    ) {
        if key.slot == 0 {
            if let Some(old) = old.filter(|o| o.svc_id != value.svc_id) {
                released.masters.push((key, old.svc_id));
            }
        }
        self.shadow.insert(key, value);
    }

    fn delete_service(
        &mut self,
        key: Frontend4Key,
        what: &dyn Fn() -> String,
        dp: &mut impl Dataplane,
        r: &mut SyncReport,
        released: &mut Released,
    ) -> bool {
        let Some(old) = self.shadow.get(&key) else {
            return true;
        };
        match dp.delete_service(&key) {
            Ok(()) => {
                r.deletes += 1;
                self.shadow.remove(&key);
                if key.slot == 0 {
                    released.masters.push((key, old.svc_id));
                }
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
        released: &mut Released,
    ) {
        for slot in self
            .shadow
            .slots_of(fkey)
            .into_iter()
            .filter(|s| *s > above)
        {
            let w = || format!("{} slot {slot}", what());
            self.delete_service(fkey.with_slot(slot), &w, dp, r, released);
        }
    }

    /// A frontend that is no longer desired: master first, then its slots. False if it is
    /// not completely gone.
    fn remove_frontend(
        &mut self,
        fkey: Frontend4Key,
        dp: &mut impl Dataplane,
        r: &mut SyncReport,
        released: &mut Released,
    ) -> bool {
        let what = || format!("stale frontend {}", describe_key(&fkey));
        if !self.delete_service(fkey, &what, dp, r, released) {
            return false;
        }
        let before = r.failures.len();
        self.delete_slots_above(fkey, 0, &what, dp, r, released);
        r.failures.len() == before
    }

    /// Whether `id` is the id of a desired backend identity.
    fn is_wanted_id(&self, id: u32, b: &Backend4) -> bool {
        let key = BKey::of(b);
        self.identities
            .wanted(&key)
            .is_some_and(|(_, _, wanted_id)| wanted_id == id)
    }

    /// Delete backends that no slot references (and, with `keep_wanted`, that are not
    /// desired), ascending by id.
    fn sweep_backends(
        &mut self,
        keep_wanted: bool,
        dp: &mut impl Dataplane,
        r: &mut SyncReport,
        released: &mut Released,
    ) {
        let orphans = self.shadow.take_orphans();
        let mut kept = Vec::new();
        for (id, b) in orphans {
            if keep_wanted && self.is_wanted_id(id, &b) {
                kept.push(id);
                continue;
            }
            match dp.delete_backend(id) {
                Ok(()) => {
                    r.deletes += 1;
                    self.shadow.delete_backend(id);
                    released.backends.push((id, BKey::of(&b)));
                }
                Err(e) => {
                    fail(r, format!("backend {id} {}", describe_backend(&b)), e);
                    kept.push(id);
                }
            }
        }
        self.shadow.keep_orphans(kept);
    }

    /// Write backend puts (in order), through a batch when there are many. Failed ones are
    /// `missing`.
    fn put_backends(
        &mut self,
        puts: &[(u32, Backend4)],
        missing: &mut BTreeSet<BKey>,
        dp: &mut impl Dataplane,
        r: &mut SyncReport,
    ) {
        let mut done = 0;
        if puts.len() >= BATCH_MIN {
            done = dp.put_backends_batch(puts);
            for (id, value) in &puts[..done] {
                self.shadow.put_backend(*id, *value);
            }
            r.puts += done;
        }
        for (id, value) in &puts[done..] {
            match dp.put_backend(*id, *value) {
                Ok(()) => {
                    r.puts += 1;
                    self.shadow.put_backend(*id, *value);
                }
                Err(e) => {
                    missing.insert(BKey::of(value));
                    fail(r, format!("backend {id} {}", describe_backend(value)), e);
                }
            }
        }
    }

    /// Backend ids in slot order for the desired frontend `fkey`, or the failure (a backend
    /// that is not in the map blocks the frontend).
    fn slot_ids(
        &self,
        fkey: &Frontend4Key,
        missing: &BTreeSet<BKey>,
    ) -> Result<Vec<u32>, SyncFailure> {
        let Some(w) = self.want.get(fkey) else {
            return Ok(Vec::new());
        };
        let mut ids = Vec::with_capacity(w.fe.backends.len());
        for (key, _) in w.backends() {
            match self.identities.id(&key) {
                Some(id) if !missing.contains(&key) && self.shadow.backends.contains(id) => {
                    ids.push(id)
                }
                _ => {
                    return Err(SyncFailure {
                        entry: format!("frontend {} ({})", w.id, w.fe.owner),
                        error: SyncError::BackendMissing {
                            backend: describe_backend(&bkey_backend(&key)),
                        },
                    })
                }
            }
        }
        Ok(ids)
    }

    /// The svc id of `fkey`, allocated (its counters reset) if it has none; `NO_SVC_ID` when
    /// every id is in use. `resets` collects the ids to reset (`None`: reset each now).
    fn svc_id_for(
        &mut self,
        fkey: Frontend4Key,
        id: &FrontendId,
        owner: &str,
        dp: &mut impl Dataplane,
        r: &mut SyncReport,
        resets: Option<&mut Vec<u32>>,
    ) -> u32 {
        if let Some(sid) = self.svc_ids.get(&fkey) {
            self.uncounted.remove(&fkey);
            return *sid;
        }
        match self.svc_alloc.alloc() {
            Some(sid) => {
                self.uncounted.remove(&fkey);
                // A reused id must not inherit the counters of the frontend it served.
                match resets {
                    Some(resets) => resets.push(sid),
                    None => {
                        if let Err(e) = dp.reset_svc_stats(sid) {
                            log::warn!(
                                "frontend {id} ({owner}): resetting counters of svc id {sid}: {e}"
                            );
                        }
                    }
                }
                self.svc_ids.insert(fkey, sid);
                self.svc_owner.insert(sid, fkey);
                sid
            }
            None => {
                // No counter slot: program the frontend all the same, uncounted; the next
                // flush tries again.
                log::warn!(
                    "frontend {id} ({owner}): {}; programmed without per-frontend counters",
                    SyncError::SvcIdsExhausted {
                        limit: self.svc_alloc.limit(),
                    }
                );
                r.uncounted.push(*id);
                self.uncounted.insert(fkey);
                lb_common::service::NO_SVC_ID
            }
        }
    }

    /// Bring one desired frontend up to date. False if it is not (completely) in sync.
    fn sync_frontend(
        &mut self,
        fkey: Frontend4Key,
        missing: &BTreeSet<BKey>,
        dp: &mut impl Dataplane,
        r: &mut SyncReport,
        released: &mut Released,
    ) -> bool {
        let Some(w) = self.want.get(&fkey) else {
            return true;
        };
        let (fid, owner, flags, affinity) = (
            w.id,
            w.fe.owner.clone(),
            w.fe.flags,
            w.fe.affinity_timeout_s,
        );
        let what = || format!("frontend {fid} ({owner})");

        let mut ids = match self.slot_ids(&fkey, missing) {
            Ok(ids) => ids,
            Err(f) => {
                r.failures.push(f);
                return false;
            }
        };
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

        let svc_id = self.svc_id_for(fkey, &fid, &owner, dp, r, None);
        let c1 = ids.len() as u16;
        let master = Service4Value {
            backend_id: 0,
            count: c1,
            flags,
            svc_id,
            affinity_timeout_s: affinity,
        };
        let c0 = self.shadow.count(&fkey);

        if c1 >= c0 {
            // Growing (or new, or same size): new slots, changed old slots, then the master.
            for slot in (c0 + 1..=c1).chain(1..=c0) {
                let w = || format!("{} slot {slot}", what());
                let v = slot_value(ids[usize::from(slot) - 1]);
                if !self.put_service(fkey.with_slot(slot), v, &w, dp, r, released) {
                    // The master still says c0: the new slots are unreachable, roll them back
                    // so a full map is not filled with them.
                    self.delete_slots_above(fkey, c0, &what, dp, r, released);
                    return false;
                }
            }
            if !self.put_service(fkey, master, &what, dp, r, released) {
                self.delete_slots_above(fkey, c0, &what, dp, r, released);
                return false;
            }
        } else {
            // Shrinking: the master first, then the remaining slots, then drop the rest.
            if !self.put_service(fkey, master, &what, dp, r, released) {
                return false;
            }
            for slot in 1..=c1 {
                let w = || format!("{} slot {slot}", what());
                let v = slot_value(ids[usize::from(slot) - 1]);
                if !self.put_service(fkey.with_slot(slot), v, &w, dp, r, released) {
                    ok = false;
                }
            }
        }
        // Slots beyond the count: the old tail of a shrink, or leftovers of an earlier run.
        let before = r.failures.len();
        self.delete_slots_above(fkey, c1, &what, dp, r, released);
        ok && r.failures.len() == before
    }

    /// [`Syncer::sync_frontend`] for many growing frontends at once: every slot in one
    /// batch, then every master in another. Frontends a batch did not reach are synced one
    /// by one.
    fn sync_growing_batched(
        &mut self,
        growing: &[Frontend4Key],
        missing: &BTreeSet<BKey>,
        dp: &mut impl Dataplane,
        r: &mut SyncReport,
        released: &mut Released,
        unsynced: &mut BTreeSet<Frontend4Key>,
    ) {
        let mut plans = Vec::with_capacity(growing.len());
        let mut one_by_one = Vec::new();
        let mut resets = Vec::new();
        for &fkey in growing {
            let Some(w) = self.want.get(&fkey) else {
                continue;
            };
            let (fid, owner, flags, affinity) = (
                w.id,
                w.fe.owner.clone(),
                w.fe.flags,
                w.fe.affinity_timeout_s,
            );
            let ids = match self.slot_ids(&fkey, missing) {
                Ok(ids) if ids.len() <= usize::from(u16::MAX) => ids,
                Ok(_) => {
                    one_by_one.push(fkey);
                    continue;
                }
                Err(f) => {
                    r.failures.push(f);
                    unsynced.insert(fkey);
                    continue;
                }
            };
            let svc_id = self.svc_id_for(fkey, &fid, &owner, dp, r, Some(&mut resets));
            let master = Service4Value {
                backend_id: 0,
                count: ids.len() as u16,
                flags,
                svc_id,
                affinity_timeout_s: affinity,
            };
            let c0 = self.shadow.count(&fkey);
            plans.push(Plan {
                fkey,
                id: fid,
                owner,
                ids,
                master,
                c0,
            });
        }
        let done = dp.reset_svc_stats_batch(&resets);
        for sid in &resets[done..] {
            if let Err(e) = dp.reset_svc_stats(*sid) {
                log::warn!("resetting counters of svc id {sid}: {e}");
            }
        }
        drop(resets);

        // Slots: new ones, then changed ones, frontend by frontend.
        let mut slot_puts: Vec<(Frontend4Key, Service4Value)> = Vec::new();
        let mut slot_plan: Vec<usize> = Vec::new();
        for (i, p) in plans.iter().enumerate() {
            let c1 = p.ids.len() as u16;
            for slot in (p.c0 + 1..=c1).chain(1..=p.c0) {
                let key = p.fkey.with_slot(slot);
                let v = slot_value(p.ids[usize::from(slot) - 1]);
                if self.shadow.get(&key) != Some(v) {
                    slot_puts.push((key, v));
                    slot_plan.push(i);
                }
            }
        }
        let written = dp.put_services_batch(&slot_puts);
        for (key, v) in &slot_puts[..written] {
            let old = self.shadow.get(key);
            self.record_put(*key, *v, old, released);
        }
        r.puts += written;
        // Plans the slot batch did not finish are synced one by one.
        let mut reached = slot_plan.get(written).copied().unwrap_or(plans.len());
        drop(slot_puts);
        drop(slot_plan);

        // Masters of the frontends whose slots are all written.
        let mut master_puts = Vec::new();
        let mut master_plan = Vec::new();
        for (i, p) in plans[..reached].iter().enumerate() {
            if self.shadow.get(&p.fkey) != Some(p.master) {
                master_puts.push((p.fkey, p.master));
                master_plan.push(i);
            }
        }
        let written = dp.put_services_batch(&master_puts);
        for (key, v) in &master_puts[..written] {
            let old = self.shadow.get(key);
            self.record_put(*key, *v, old, released);
        }
        r.puts += written;
        if let Some(i) = master_plan.get(written) {
            reached = *i;
        }

        for p in &plans[..reached] {
            // Slots beyond the count: leftovers of an earlier run.
            let what = || format!("frontend {} ({})", p.id, p.owner);
            let before = r.failures.len();
            self.delete_slots_above(p.fkey, p.ids.len() as u16, &what, dp, r, released);
            if r.failures.len() != before {
                unsynced.insert(p.fkey);
            }
        }
        one_by_one.extend(plans[reached..].iter().map(|p| p.fkey));
        drop(plans);
        for fkey in one_by_one {
            if !self.sync_frontend(fkey, missing, dp, r, released) {
                unsynced.insert(fkey);
            }
        }
    }

    /// Forget and free ids that are neither in the maps nor desired: those of what this
    /// flush deleted or stopped desiring.
    fn release_ids(&mut self, released: &mut Released) {
        let mut free = Vec::new();
        let bkeys = std::mem::take(&mut self.released_backends);
        for key in bkeys.iter().chain(released.backends.iter().map(|(_, k)| k)) {
            if self.identities.is_wanted(key) {
                continue;
            }
            if let Some(id) = self.identities.id(key) {
                if !self.shadow.backends.contains(id) {
                    self.identities.forget_id(key);
                    free.push(id);
                }
            }
        }
        for (id, key) in released.backends.drain(..) {
            if !self.shadow.backends.contains(id) && self.identities.id(&key) != Some(id) {
                free.push(id);
            }
        }
        free.retain(|id| self.backend_alloc.is_used(*id));
        self.backend_alloc.free(&mut free);

        let fkeys = std::mem::take(&mut self.released_frontends);
        for fkey in fkeys.iter().chain(released.masters.iter().map(|(k, _)| k)) {
            if self.shadow.master(fkey).is_some() || self.want.contains_key(fkey) {
                continue;
            }
            if let Some(sid) = self.svc_ids.remove(fkey) {
                self.svc_owner.remove(&sid);
                if self.shadow.masters_with_svc_id(sid) == 0 {
                    free.push(sid);
                }
            }
        }
        for (_, sid) in released.masters.drain(..) {
            if !self.svc_owner.contains_key(&sid) && self.shadow.masters_with_svc_id(sid) == 0 {
                free.push(sid);
            }
        }
        free.retain(|id| self.svc_alloc.is_used(*id));
        if !free.is_empty() {
            // Frontends waiting for a counter slot try again at the next flush.
            self.uncounted.retain(|k| self.want.contains_key(k));
            self.pending.extend(self.uncounted.iter().copied());
        }
        self.svc_alloc.free(&mut free);
    }
}
