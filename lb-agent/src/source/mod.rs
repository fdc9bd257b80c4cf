//! Where the Kubernetes objects come from: the API server (`kube`: watches) or a directory
//! of YAML manifests (`manifests`).
//!
//! Both give full object snapshots ([`crate::model::Objects`], for tests and tools) and, for
//! the agent, a stream of [`Change`]s: each object converted to its compact view as it
//! arrives (the full object is dropped right away), then applied to the incremental
//! [`Controller`].
pub mod kube;
pub mod manifests;

use crate::controller::{Controller, Key};
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
    /// A complete list of one kind (the first list, or a re-list after a watch expired):
    /// objects not in it are gone.
    Relisted(Relist),
    /// Every kind has been listed once: the state is complete and may be synced.
    Ready,
}

/// A complete list of one kind.
#[derive(Debug, Clone)]
pub enum Relist {
    Services(Vec<ServiceView>),
    Slices(Vec<(Key, Option<SliceView>)>),
    Pods(Vec<PodView>),
    Nodes(Vec<NodeView>),
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
            Change::Relisted(Relist::Services(v)) => c.replace_services(v),
            Change::Relisted(Relist::Slices(v)) => c.replace_slices(v),
            Change::Relisted(Relist::Pods(v)) => c.replace_pods(v),
            Change::Relisted(Relist::Nodes(v)) => c.replace_nodes(v),
            Change::Ready => return true,
        }
        false
    }
}
