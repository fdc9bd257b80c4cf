//! Sync: turns a [`Desired`] into map entries and writes only the difference, in an order
//! in which the datapath never sees a dangling or half-written backend set.
//!
//! The [`Syncer`] keeps a shadow of what it believes the maps hold, and owns the allocation
//! of backend ids (stable per `(address, port, protocol)`, shared between frontends, never 0)
//! and of svc ids (stable per frontend, an index into `LB_SVC_STATS`). A freed id is reused
//! only after every never-used id is gone, oldest-freed first, so a conntrack entry that
//! still names a just-removed backend finds it missing rather than meeting a stranger.
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
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::net::Ipv4Addr;

use lb_common::service::backend_flags;
use lb_common::{Backend4, Frontend4Key, Service4Value};

use crate::dataplane::{Dataplane, DataplaneError};
use crate::model::{Backend, Desired, Frontend, FrontendId, Proto};

/// Sizes of the id spaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// svc ids are `0..svc_ids` (the `LB_SVC_STATS` array size).
    pub svc_ids: u32,
    /// Backend ids are `1..=backend_ids`.
    pub backend_ids: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            svc_ids: lb_common::maps::LB_SVC_STATS_MAX,
            backend_ids: u32::MAX,
        }
    }
}

/// Why an entry could not be synced.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    #[error("all {limit} svc ids are in use")]
    SvcIdsExhausted { limit: u32 },
    #[error("all {limit} backend ids are in use")]
    BackendIdsExhausted { limit: u32 },
    #[error("backend {backend} could not be written; frontend left unchanged")]
    BackendMissing { backend: String },
    #[error(
        "{count} backends exceed the {max} slots of a frontend; only the first {max} are used"
    )]
    TooManyBackends { count: usize, max: usize },
}

/// One entry that failed to sync.
#[derive(Debug)]
pub struct SyncFailure {
    /// What was being written, e.g. `frontend 10.96.0.10:53/UDP (kube-system/kube-dns:dns) slot 2`.
    pub entry: String,
    pub error: SyncError,
}

impl fmt::Display for SyncFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.entry, self.error)
    }
}

/// What one [`Syncer::apply`] did.
#[derive(Debug, Default)]
pub struct SyncReport {
    /// Successful map inserts/updates.
    pub puts: usize,
    /// Successful map deletes.
    pub deletes: usize,
    pub failures: Vec<SyncFailure>,
    /// Desired frontends not (completely) in the maps after this apply.
    pub unsynced: Vec<FrontendId>,
}

impl SyncReport {
    /// No failure: the maps hold exactly the desired state.
    pub fn is_ok(&self) -> bool {
        self.failures.is_empty()
    }
}

/// The map key of a frontend's master entry.
pub fn frontend_key(id: &FrontendId) -> Frontend4Key {
    Frontend4Key::new(
        u32::from(id.addr).to_be(),
        id.port.to_be(),
        id.proto.ipproto(),
        0,
    )
}

/// The map value of `b` as a backend of a `proto` frontend.
pub fn backend_value(b: &Backend, proto: Proto) -> Backend4 {
    let mut flags = 0;
    if b.remote {
        flags |= backend_flags::REMOTE;
    }
    if b.terminating {
        flags |= backend_flags::TERMINATING;
    }
    Backend4 {
        addr: u32::from(b.addr).to_be(),
        port: b.port.to_be(),
        proto: proto.ipproto(),
        flags,
        node_addr: 0,
    }
}

/// Identity of a backend: what its id stands for. Flags may change in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct BKey {
    addr: u32,
    port: u16,
    proto: u8,
}

impl BKey {
    fn of(b: &Backend4) -> Self {
        Self {
            addr: b.addr,
            port: b.port,
            proto: b.proto,
        }
    }
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
    format!(
        "{}:{}/{}",
        Ipv4Addr::from(u32::from_be(k.addr)),
        u16::from_be(k.port),
        proto
    )
}

/// Allocates ids from `start..end`: never-used ids first, then freed ones oldest first.
#[derive(Debug, Clone)]
struct IdAlloc {
    start: u64,
    end: u64,
    next: u64,
    used: BTreeSet<u32>,
    freed: VecDeque<u32>,
}

impl IdAlloc {
    fn new(start: u64, end: u64) -> Self {
        Self {
            start,
            end,
            next: start,
            used: BTreeSet::new(),
            freed: VecDeque::new(),
        }
    }

    fn contains(&self, id: u32) -> bool {
        (self.start..self.end).contains(&u64::from(id))
    }

    /// Mark an id found in the maps as used. False if out of range or already used.
    fn reserve(&mut self, id: u32) -> bool {
        if !self.contains(id) || !self.used.insert(id) {
            return false;
        }
        self.next = self.next.max(u64::from(id) + 1);
        true
    }

    fn alloc(&mut self) -> Option<u32> {
        while self.next < self.end {
            let id = self.next as u32;
            self.next += 1;
            if self.used.insert(id) {
                return Some(id);
            }
        }
        while let Some(id) = self.freed.pop_front() {
            if self.used.insert(id) {
                return Some(id);
            }
        }
        // Gaps below `next` that were never seen (left by an earlier run).
        let mut cand = self.start;
        for &u in &self.used {
            match u64::from(u).cmp(&cand) {
                std::cmp::Ordering::Less => {}
                std::cmp::Ordering::Equal => cand += 1,
                std::cmp::Ordering::Greater => break,
            }
        }
        if cand < self.end {
            let id = cand as u32;
            self.used.insert(id);
            Some(id)
        } else {
            None
        }
    }

    /// Free every used id not in `keep`.
    fn retain(&mut self, keep: &BTreeSet<u32>) {
        let gone: Vec<u32> = self.used.difference(keep).copied().collect();
        for id in gone {
            self.used.remove(&id);
            self.freed.push_back(id);
        }
    }

    fn limit(&self) -> u32 {
        (self.end - self.start).min(u64::from(u32::MAX)) as u32
    }
}

/// A desired frontend as map entries.
struct Target<'a> {
    id: FrontendId,
    fe: &'a Frontend,
    /// Backend identities in slot order (slot 1 first).
    backends: Vec<BKey>,
}

/// Keeps the maps equal to a [`Desired`], writing only differences.
#[derive(Debug, Clone)]
pub struct Syncer {
    services: BTreeMap<Frontend4Key, Service4Value>,
    backends: BTreeMap<u32, Backend4>,
    node_addrs: BTreeSet<Ipv4Addr>,
    /// Backend id of each identity (present in the maps, or allocated for a pending put).
    backend_ids: BTreeMap<BKey, u32>,
    /// svc id of each frontend (master key).
    svc_ids: BTreeMap<Frontend4Key, u32>,
    backend_alloc: IdAlloc,
    svc_alloc: IdAlloc,
    adopted: bool,
    limits: Limits,
}

fn backend_alloc(l: &Limits) -> IdAlloc {
    IdAlloc::new(1, u64::from(l.backend_ids) + 1)
}

fn svc_alloc(l: &Limits) -> IdAlloc {
    IdAlloc::new(0, u64::from(l.svc_ids))
}

impl Syncer {
    pub fn new(limits: Limits) -> Self {
        Self {
            services: BTreeMap::new(),
            backends: BTreeMap::new(),
            node_addrs: BTreeSet::new(),
            backend_ids: BTreeMap::new(),
            svc_ids: BTreeMap::new(),
            backend_alloc: backend_alloc(&limits),
            svc_alloc: svc_alloc(&limits),
            adopted: false,
            limits,
        }
    }

    /// Read the maps (entries left by an earlier run, or a periodic full resync) into the
    /// shadow and the id allocators: ids found are kept, and an apply of the same desired
    /// state rewrites nothing. [`Syncer::apply`] adopts by itself when this was never called.
    pub fn adopt(&mut self, dp: &impl Dataplane) -> Result<(), SyncError> {
        let services = dp.services()?;
        let mut backends = dp.backends()?;
        let node_addrs = dp.node_addrs()?;
        self.backend_alloc = backend_alloc(&self.limits);
        self.svc_alloc = svc_alloc(&self.limits);
        self.backend_ids.clear();
        self.svc_ids.clear();

        // Lowest id first: with duplicates, the lowest stays the identity's id and the others
        // are swept once nothing points at them.
        backends.sort_by_key(|(id, _)| *id);
        self.backends = backends.iter().copied().collect();
        for (id, b) in &backends {
            if self.backend_alloc.reserve(*id) {
                self.backend_ids.entry(BKey::of(b)).or_insert(*id);
            }
        }
        self.services = services.into_iter().collect();
        for (k, v) in &self.services {
            if k.slot == 0 && self.svc_alloc.reserve(v.svc_id) {
                self.svc_ids.insert(*k, v.svc_id);
            }
        }
        self.node_addrs = node_addrs.into_iter().collect();
        self.adopted = true;
        Ok(())
    }

    /// Entries this syncer holds in each map (its shadow of the maps; no syscall).
    pub fn entry_counts(&self) -> [(&'static str, usize); 3] {
        use lb_common::maps as m;
        [
            (m::LB4_SERVICES, self.services.len()),
            (m::LB4_BACKENDS, self.backends.len()),
            (m::LB4_NODE_ADDRS, self.node_addrs.len()),
        ]
    }

    /// The svc id (index into `LB_SVC_STATS`) of a frontend, once allocated.
    pub fn svc_id(&self, id: &FrontendId) -> Option<u32> {
        self.svc_ids.get(&frontend_key(id)).copied()
    }

    /// Bring the maps to `desired`. Never panics; see the module docs for the order.
    pub fn apply(&mut self, desired: &Desired, dp: &mut impl Dataplane) -> SyncReport {
        let mut r = SyncReport::default();
        if !self.adopted {
            if let Err(error) = self.adopt(dp) {
                r.failures.push(SyncFailure {
                    entry: "reading the maps".to_string(),
                    error,
                });
                r.unsynced = desired.frontends.keys().copied().collect();
                return r;
            }
        }

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
        for addr in desired.node_addrs.difference(&self.node_addrs.clone()) {
            match dp.put_node_addr(*addr) {
                Ok(()) => {
                    r.puts += 1;
                    self.node_addrs.insert(*addr);
                }
                Err(e) => fail(&mut r, format!("node address {addr}"), e),
            }
        }

        // 2. Frontends no longer desired, then the backends only they used.
        let present: BTreeSet<Frontend4Key> =
            self.services.keys().map(|k| k.with_slot(0)).collect();
        for fkey in present.iter().filter(|k| !targets.contains_key(k)) {
            self.remove_frontend(*fkey, dp, &mut r);
        }
        let wanted_ids: BTreeSet<u32> = want_backends
            .keys()
            .filter_map(|k| self.backend_ids.get(k).copied())
            .collect();
        self.sweep_backends(&wanted_ids, dp, &mut r);
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
            if self.backends.get(&id) == Some(value) {
                continue;
            }
            match dp.put_backend(id, *value) {
                Ok(()) => {
                    r.puts += 1;
                    self.backends.insert(id, *value);
                }
                Err(e) => {
                    missing.insert(*key);
                    fail(
                        &mut r,
                        format!("backend {id} {}", describe_backend(value)),
                        e,
                    );
                }
            }
        }

        // 4. Changed frontends: shrinking ones first (they free slots), then the others.
        let old_count = |s: &Self, k: &Frontend4Key| s.services.get(k).map_or(0, |m| m.count);
        let (shrinking, growing): (Vec<_>, Vec<_>) = targets
            .iter()
            .partition(|(k, t)| t.backends.len() < usize::from(old_count(self, k)));
        for (fkey, t) in shrinking.into_iter().chain(growing) {
            if !self.sync_frontend(*fkey, t, &missing, dp, &mut r) {
                r.unsynced.push(t.id);
            }
        }

        // 5. Backends no slot points at any more. This includes desired backends of a
        // frontend that could not be synced: they are written again on the next apply, and
        // meanwhile do not take capacity others could use.
        self.sweep_backends(&BTreeSet::new(), dp, &mut r);

        // 6. Node addresses no longer desired.
        for addr in self.node_addrs.clone().difference(&desired.node_addrs) {
            match dp.delete_node_addr(*addr) {
                Ok(()) => {
                    r.deletes += 1;
                    self.node_addrs.remove(addr);
                }
                Err(e) => fail(&mut r, format!("node address {addr}"), e),
            }
        }

        self.release_ids(&want_backends, &targets);
        r
    }

    /// Slot numbers (>= 1) present in the shadow for the frontend `fkey`.
    fn slots_of(&self, fkey: Frontend4Key) -> Vec<u16> {
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

    fn put_service(
        &mut self,
        key: Frontend4Key,
        value: Service4Value,
        what: &dyn Fn() -> String,
        dp: &mut impl Dataplane,
        r: &mut SyncReport,
    ) -> bool {
        if self.services.get(&key) == Some(&value) {
            return true;
        }
        match dp.put_service(key, value) {
            Ok(()) => {
                r.puts += 1;
                self.services.insert(key, value);
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
        if !self.services.contains_key(&key) {
            return true;
        }
        match dp.delete_service(&key) {
            Ok(()) => {
                r.deletes += 1;
                self.services.remove(&key);
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
        for slot in self.slots_of(fkey).into_iter().filter(|s| *s > above) {
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
        let referenced: BTreeSet<u32> = self
            .services
            .iter()
            .filter(|(k, _)| k.slot != 0)
            .map(|(_, v)| v.backend_id)
            .collect();
        let gone: Vec<(u32, Backend4)> = self
            .backends
            .iter()
            .filter(|(id, _)| !referenced.contains(id) && !keep.contains(id))
            .map(|(id, b)| (*id, *b))
            .collect();
        for (id, b) in gone {
            match dp.delete_backend(id) {
                Ok(()) => {
                    r.deletes += 1;
                    self.backends.remove(&id);
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
                Some(id) if !missing.contains(key) && self.backends.contains_key(id) => {
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
                    r.failures.push(SyncFailure {
                        entry: what(),
                        error: SyncError::SvcIdsExhausted {
                            limit: self.svc_alloc.limit(),
                        },
                    });
                    return false;
                }
            },
        };

        let c1 = ids.len() as u16;
        let master = Service4Value {
            backend_id: 0,
            count: c1,
            flags: t.fe.flags,
            svc_id,
            reserved: 0,
        };
        let slot_value = |id: u32| Service4Value {
            backend_id: id,
            ..Default::default()
        };
        let c0 = self.services.get(&fkey).map_or(0, |m| m.count);

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
        let backends = &self.backends;
        self.backend_ids
            .retain(|k, id| backends.contains_key(id) || want_backends.contains_key(k));
        let mut keep: BTreeSet<u32> = self.backend_ids.values().copied().collect();
        keep.extend(self.backends.keys().copied());
        self.backend_alloc.retain(&keep);

        let services = &self.services;
        self.svc_ids
            .retain(|k, _| services.contains_key(k) || targets.contains_key(k));
        let mut keep: BTreeSet<u32> = self.svc_ids.values().copied().collect();
        keep.extend(
            self.services
                .iter()
                .filter(|(k, _)| k.slot == 0)
                .map(|(_, v)| v.svc_id),
        );
        self.svc_alloc.retain(&keep);
    }
}

fn fail(r: &mut SyncReport, entry: String, e: DataplaneError) {
    log::warn!("sync: {entry}: {e}");
    r.failures.push(SyncFailure {
        entry,
        error: SyncError::Dataplane(e),
    });
}
