//! Sync: turns a [`Desired`] into map entries and writes only the difference, in an order
//! in which the datapath never sees a dangling or half-written backend set.
//!
//! The [`Syncer`] keeps a shadow of what it believes the maps hold (`shadow.rs`), and owns
//! the allocation of backend ids (stable per `(address, port, protocol)`, shared between
//! frontends, never 0) and of svc ids (stable per frontend, an index into `LB_SVC_STATS`)
//! (`ids.rs`). The order of the writes of one [`Syncer::apply`] is documented in
//! `order.rs`.
//!
//! Failures never stop the sync: they are collected in the [`SyncReport`], the shadow keeps
//! the entries that really are in the maps, and the next apply retries.
mod ids;
mod order;
mod shadow;

use std::collections::BTreeMap;
use std::fmt;

use lb_common::service::{backend_flags, scope};
use lb_common::{Backend4, Frontend4Key};

use self::ids::{backend_alloc, svc_alloc, BKey, IdAlloc};
use self::shadow::Shadow;
use crate::dataplane::{Dataplane, DataplaneError};
use crate::model::{Backend, Desired, FrontendId, Proto, Scope};

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

/// Keeps the maps equal to a [`Desired`], writing only differences.
#[derive(Debug, Clone)]
pub struct Syncer {
    /// What the maps hold, as far as this syncer knows.
    shadow: Shadow,
    /// Backend id of each identity (present in the maps, or allocated for a pending put).
    backend_ids: BTreeMap<BKey, u32>,
    /// svc id of each frontend (master key).
    svc_ids: BTreeMap<Frontend4Key, u32>,
    backend_alloc: IdAlloc,
    svc_alloc: IdAlloc,
    adopted: bool,
    limits: Limits,
}

impl Syncer {
    pub fn new(limits: Limits) -> Self {
        Self {
            shadow: Shadow::default(),
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
        self.shadow.backends = backends.iter().copied().collect();
        for (id, b) in &backends {
            if self.backend_alloc.reserve(*id) {
                self.backend_ids.entry(BKey::of(b)).or_insert(*id);
            }
        }
        self.shadow.services = services.into_iter().collect();
        for (k, v) in &self.shadow.services {
            if k.slot == 0 && self.svc_alloc.reserve(v.svc_id) {
                self.svc_ids.insert(*k, v.svc_id);
            }
        }
        self.shadow.node_addrs = node_addrs.into_iter().collect();
        self.adopted = true;
        Ok(())
    }

    /// Entries this syncer holds in each map (its shadow of the maps; no syscall).
    pub fn entry_counts(&self) -> [(&'static str, usize); 3] {
        self.shadow.entry_counts()
    }

    /// The svc id (index into `LB_SVC_STATS`) of a frontend, once allocated.
    pub fn svc_id(&self, id: &FrontendId) -> Option<u32> {
        self.svc_ids.get(&frontend_key(id)).copied()
    }

    /// Bring the maps to `desired`. Never panics; see `sync/order.rs` for the order.
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
        self.write_in_order(desired, dp, &mut r);
        r
    }
}
