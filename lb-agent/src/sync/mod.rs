//! Sync: keeps the maps equal to the desired frontends, writing only differences, in an
//! order in which the datapath never sees a dangling or half-written backend set.
//!
//! The [`Syncer`] keeps what it wants the maps to hold (per frontend: flags, affinity and
//! backends; per backend: how many desired frontends use it), a shadow of what it believes
//! the maps hold (`shadow.rs`: per frontend, with reference-counted backends), and owns the
//! allocation of backend ids (stable per `(address, port, protocol)`, shared between
//! frontends, never 0) and of svc ids (stable per frontend, an index into `LB_SVC_STATS`)
//! (`ids.rs`).
//!
//! Two ways in: [`Syncer::apply`] takes a whole [`Desired`] and diffs everything (tests, a
//! periodic resync); [`Syncer::set_frontend`] changes one desired frontend and
//! [`Syncer::flush`] writes the frontends changed since the last flush, and the backends
//! they use, only (the agent's path: a change costs the same at 10 or 100,000 Services).
//! Both write in the order documented in `order.rs`; many new entries at once (the first
//! sync) go through `BPF_MAP_UPDATE_BATCH` in that same order.
//!
//! Failures never stop the sync: they are collected in the [`SyncReport`], the shadow keeps
//! the entries that really are in the maps, and the next flush retries.
mod identities;
mod ids;
mod order;
mod shadow;

use std::collections::BTreeSet;
use std::fmt;
use std::net::Ipv4Addr;
use std::sync::Arc;

use lb_common::service::{backend_flags, scope};
use lb_common::{Backend4, Frontend4Key};

use self::identities::Identities;
use self::ids::{backend_alloc, svc_alloc, BKey, IdAlloc};
use self::shadow::Shadow;
use crate::dataplane::{Dataplane, DataplaneError};
use crate::hash::HashMap;
use crate::model::{Backend, Desired, Frontend, FrontendId, Proto, Scope};
use crate::ports::PortRefs;

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
    /// Frontends programmed without per-frontend counters: every svc id was in use. They are
    /// load-balanced all the same, and get an id as soon as one is free.
    pub uncounted: Vec<FrontendId>,
}

impl SyncReport {
    /// The maps could not be read (to adopt them): nothing was written.
    fn read_failed(error: SyncError) -> Self {
        Self {
            failures: vec![SyncFailure {
                entry: "reading the maps".to_string(),
                error,
            }],
            ..Self::default()
        }
    }

    /// No failure: the maps hold exactly the desired state.
    pub fn is_ok(&self) -> bool {
        self.failures.is_empty()
    }
}

/// The map key of a frontend's master entry.
pub fn frontend_key(id: &FrontendId) -> Frontend4Key {
    let key = Frontend4Key::new(
        u32::from(id.addr).to_be(),
        id.port.to_be(),
        id.proto.ipproto(),
        0,
    );
    key.with_scope(match id.scope {
        Scope::External => scope::EXTERNAL,
        Scope::Internal => scope::INTERNAL,
    })
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

/// A desired frontend, as the sync keeps it: shared with the controller's cached output
/// (see [`Syncer::set_frontend_shared`]), not copied.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Want {
    id: FrontendId,
    fe: Arc<Frontend>,
}

impl Want {
    /// Backend identities in slot order (slot 1 first), with the backend flags this frontend
    /// gives each.
    fn backends(&self) -> impl ExactSizeIterator<Item = (BKey, u8)> + '_ {
        let proto = self.id.proto;
        self.fe.backends.iter().map(move |b| {
            let v = backend_value(b, proto);
            (BKey::of(&v), v.flags)
        })
    }
}

/// How many desired frontends use a backend, and with which flags.
#[derive(Debug, Clone, Copy, Default)]
struct WantCount {
    users: u32,
    remote: u32,
    terminating: u32,
}

impl WantCount {
    fn add(&mut self, flags: u8) {
        self.users += 1;
        self.remote += u32::from(flags & backend_flags::REMOTE != 0);
        self.terminating += u32::from(flags & backend_flags::TERMINATING != 0);
    }

    fn remove(&mut self, flags: u8) {
        self.users -= 1;
        self.remote -= u32::from(flags & backend_flags::REMOTE != 0);
        self.terminating -= u32::from(flags & backend_flags::TERMINATING != 0);
    }

    /// The backend's flags: those any of its frontends gives it.
    fn flags(&self) -> u8 {
        let mut f = 0;
        if self.remote > 0 {
            f |= backend_flags::REMOTE;
        }
        if self.terminating > 0 {
            f |= backend_flags::TERMINATING;
        }
        f
    }
}

/// Keeps the maps equal to the desired frontends, writing only differences.
#[derive(Debug, Clone)]
pub struct Syncer {
    /// What the maps hold, as far as this syncer knows.
    shadow: Shadow,
    /// The desired frontends, by master key.
    want: HashMap<Frontend4Key, Want>,
    /// Backend identities: how the desired frontends use each, and its id.
    identities: Identities,
    want_node_addrs: BTreeSet<Ipv4Addr>,
    /// svc id of each frontend (master key), and the other way round.
    svc_ids: HashMap<Frontend4Key, u32>,
    svc_owner: HashMap<u32, Frontend4Key>,
    backend_alloc: IdAlloc,
    svc_alloc: IdAlloc,
    /// Frontends to write at the next flush (changed, or not in sync yet).
    pending: BTreeSet<Frontend4Key>,
    /// Backends whose desired value may have changed.
    pending_backends: BTreeSet<BKey>,
    /// Identities that became desired since the last flush (for
    /// [`Syncer::prewrite_new_backends`]).
    new_backends: Vec<BKey>,
    /// Identities and frontends no longer desired: their ids may be freed.
    released_backends: Vec<BKey>,
    released_frontends: Vec<Frontend4Key>,
    /// Desired frontends programmed without a svc id: written again when one is freed.
    uncounted: BTreeSet<Frontend4Key>,
    adopted: bool,
    limits: Limits,
    /// The port bits the desired frontends need (the port filter's content).
    ports: PortRefs,
}

impl Syncer {
    pub fn new(limits: Limits) -> Self {
        Self {
            shadow: Shadow::default(),
            want: HashMap::default(),
            identities: Identities::default(),
            want_node_addrs: BTreeSet::new(),
            svc_ids: HashMap::default(),
            svc_owner: HashMap::default(),
            backend_alloc: backend_alloc(&limits),
            svc_alloc: svc_alloc(&limits),
            pending: BTreeSet::new(),
            pending_backends: BTreeSet::new(),
            new_backends: Vec::new(),
            released_backends: Vec::new(),
            released_frontends: Vec::new(),
            uncounted: BTreeSet::new(),
            adopted: false,
            limits,
            ports: PortRefs::default(),
        }
    }

    /// Read the maps (entries left by an earlier run, or a periodic full resync) into the
    /// shadow and the id allocators: ids found are kept, and an apply of the same desired
    /// state rewrites nothing. [`Syncer::apply`] and [`Syncer::flush`] adopt by themselves
    /// when this was never called. Afterwards every frontend and backend is compared at the
    /// next flush: whatever changed in the maps behind the syncer's back is repaired then.
    pub fn adopt(&mut self, dp: &impl Dataplane) -> Result<(), SyncError> {
        let mut services = dp.services()?;
        let mut backends = dp.backends()?;
        let node_addrs = dp.node_addrs()?;
        self.shadow = Shadow::default();
        self.backend_alloc = backend_alloc(&self.limits);
        self.svc_alloc = svc_alloc(&self.limits);
        self.identities.clear_ids();
        self.svc_ids.clear();
        self.svc_owner.clear();

        // Lowest id first: with duplicates, the lowest stays the identity's id and the others
        // are swept once nothing points at them.
        backends.sort_unstable_by_key(|(id, _)| *id);
        for (id, b) in &backends {
            self.shadow.put_backend(*id, *b);
            if self.backend_alloc.reserve(*id) {
                self.identities.set_id_if_none(BKey::of(b), *id);
            }
        }
        drop(backends);
        services.sort_unstable_by_key(|(k, _)| *k);
        for (k, v) in &services {
            self.shadow.insert(*k, *v);
            if k.slot == 0 && self.svc_alloc.reserve(v.svc_id) {
                self.svc_ids.insert(*k, v.svc_id);
                self.svc_owner.insert(v.svc_id, *k);
            }
        }
        drop(services);
        self.shadow.node_addrs = node_addrs.into_iter().collect();
        self.adopted = true;
        self.mark_everything();
        Ok(())
    }

    /// Compare every frontend and backend at the next flush.
    /// (Every desired backend is used by a desired frontend, so marking the frontends covers
    /// the backends.)
    fn mark_everything(&mut self) {
        self.pending.extend(self.want.keys().copied());
        let present: Vec<Frontend4Key> = self.shadow.frontends().collect();
        self.pending.extend(present);
    }

    /// Entries this syncer holds in each map (its shadow of the maps; no syscall).
    pub fn entry_counts(&self) -> [(&'static str, usize); 3] {
        self.shadow.entry_counts()
    }

    /// The svc id (index into `LB_SVC_STATS`) of a frontend, once allocated.
    pub fn svc_id(&self, id: &FrontendId) -> Option<u32> {
        self.svc_ids.get(&frontend_key(id)).copied()
    }

    /// Frontends programmed without per-frontend counters (every svc id was in use).
    pub fn uncounted(&self) -> usize {
        self.uncounted.len()
    }

    /// How many frontends wait to be written (changed, or failed and retried).
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Desire `fe` (or nothing) at `id`; written at the next [`Syncer::flush`].
    pub fn set_frontend(&mut self, id: FrontendId, fe: Option<&Frontend>) {
        if self.want.get(&frontend_key(&id)).map(|w| &*w.fe) != fe {
            self.set_frontend_shared(id, fe.map(|fe| Arc::new(fe.clone())));
        }
    }

    /// [`Syncer::set_frontend`] with a frontend the caller shares (the controller's cached
    /// output): the syncer keeps a reference, not a copy.
    pub fn set_frontend_shared(&mut self, id: FrontendId, fe: Option<Arc<Frontend>>) {
        let fkey = frontend_key(&id);
        let new = fe.map(|fe| Want { id, fe });
        if self.want.get(&fkey) == new.as_ref() {
            return;
        }
        if let Some(old) = self.want.remove(&fkey) {
            self.ports.frontend(
                old.id.port,
                old.id.proto.ipproto(),
                old.fe.backends.iter().map(|b| b.port),
                false,
            );
            for (key, flags) in old.backends() {
                self.pending_backends.insert(key);
                if self.identities.remove_user(&key, flags) {
                    self.released_backends.push(key);
                }
            }
        }
        match new {
            Some(new) => {
                self.ports.frontend(
                    id.port,
                    id.proto.ipproto(),
                    new.fe.backends.iter().map(|b| b.port),
                    true,
                );
                for (key, flags) in new.backends() {
                    if self.identities.add_user(key, flags) {
                        self.new_backends.push(key);
                    }
                }
                self.want.insert(fkey, new);
            }
            None => self.released_frontends.push(fkey),
        }
        self.pending.insert(fkey);
    }

    /// The port bits the desired frontends need.
    pub fn ports(&self) -> &PortRefs {
        &self.ports
    }

    /// The ports whose bits may have changed since the last call.
    pub fn take_changed_ports(&mut self) -> BTreeSet<u16> {
        self.ports.take_changed()
    }

    /// How many frontends are desired.
    pub fn frontend_count(&self) -> usize {
        self.want.len()
    }

    /// Desire `addrs` as this node's addresses.
    pub fn set_node_addrs(&mut self, addrs: &BTreeSet<Ipv4Addr>) {
        if self.want_node_addrs != *addrs {
            self.want_node_addrs = addrs.clone();
        }
    }

    /// Write what changed since the last flush (and retry what failed). Never panics; see
    /// `sync/order.rs` for the order.
    pub fn flush(&mut self, dp: &mut impl Dataplane) -> SyncReport {
        let mut r = SyncReport::default();
        if !self.adopted {
            if let Err(error) = self.adopt(dp) {
                r = SyncReport::read_failed(error);
                r.unsynced = self
                    .pending
                    .iter()
                    .filter_map(|k| self.want.get(k).map(|w| w.id))
                    .collect();
                return r;
            }
        }
        self.write_in_order(dp, &mut r);
        r
    }

    /// Bring the maps to `desired` with a full diff: every frontend and backend is compared.
    /// Never panics; see `sync/order.rs` for the order.
    pub fn apply(&mut self, desired: &Desired, dp: &mut impl Dataplane) -> SyncReport {
        let gone: Vec<FrontendId> = self
            .want
            .values()
            .map(|w| w.id)
            .filter(|id| !desired.frontends.contains_key(id))
            .collect();
        for id in gone {
            self.set_frontend(id, None);
        }
        for (id, fe) in &desired.frontends {
            self.set_frontend(*id, Some(fe));
        }
        self.set_node_addrs(&desired.node_addrs);
        if self.adopted {
            self.mark_everything();
        }
        self.flush(dp)
    }

    /// Re-read the maps and repair whatever differs from the desired state (entries changed,
    /// added or removed behind the syncer's back).
    pub fn resync(&mut self, dp: &mut impl Dataplane) -> SyncReport {
        if let Err(error) = self.adopt(dp) {
            return SyncReport::read_failed(error);
        }
        self.flush(dp)
    }
}
