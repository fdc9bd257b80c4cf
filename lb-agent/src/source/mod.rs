//! Where the Kubernetes objects come from: the API server (`kube`: watches) or a directory
//! of YAML manifests (`manifests`).
//!
//! Both give full object snapshots ([`crate::model::Objects`], for tests and tools) and, for
//! the agent, a stream of [`Change`]s: each object converted to its compact view as it
//! arrives (the full object is dropped right away), then applied to the incremental
//! [`Controller`].
pub mod kube;
pub mod manifests;
pub(crate) mod yaml;

use crate::controller::{Controller, Key, ListKind};
use crate::model::{NodeView, PodView, ServiceView, SliceView};

/// One change of the objects, as a source reports it.
#[derive(Debug, Clone)]
pub enum Change {
    /// A Service added or changed (`Some`), or deleted.
    Service(Key, Option<ServiceView>),
    /// An EndpointSlice added or changed, or deleted; `None` also for a slice the model
    /// ignores (not IPv4, no `kubernetes.io/service-name`).
    Slice(Key, Option<SliceView>),
    Pod(Key, Option<PodView>),
    Node(String, Option<NodeView>),
    /// A complete list of one kind begins (the first list, or a re-list after a watch
    /// expired): its objects follow as upserts, applied as they arrive.
    ListBegin(ListKind),
    /// That list is complete: the objects held before it that it did not deliver are gone.
    ListEnd(ListKind),
    /// Every kind has been listed once: the state is complete and may be synced.
    Ready,
}

impl Change {
    /// Apply this change to `c`. Returns true for [`Change::Ready`].
    pub fn apply(self, c: &mut Controller) -> bool {
        match self {
            Change::Service(_, Some(v)) => c.upsert_service(v),
            Change::Service(k, None) => c.delete_service(&k.namespace, &k.name),
            Change::Slice(k, v) => c.upsert_slice(&k.namespace, &k.name, v),
            Change::Pod(_, Some(v)) => c.upsert_pod(v),
            Change::Pod(k, None) => c.delete_pod(&k.namespace, &k.name),
            Change::Node(_, Some(v)) => c.upsert_node(v),
            Change::Node(name, None) => c.delete_node(&name),
            Change::ListBegin(kind) => c.begin_list(kind),
            Change::ListEnd(kind) => c.end_list(kind),
            Change::Ready => return true,
        }
        false
    }
}
