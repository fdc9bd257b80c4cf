//! The Kubernetes source: watches on Services, EndpointSlices, this node's Pods and every
//! Node, in two forms:
//! - [`changes`] (the agent's): every object is converted to its compact view as it arrives
//!   and sent as a [`Change`]; no full object is kept. A complete list (the first one, or a
//!   re-list after `410 Gone`) is sent page by page as it arrives, between a
//!   [`Change::ListBegin`] and a [`Change::ListEnd`] (so the controller works on it while the
//!   rest is still on the wire), and [`Change::Ready`] follows once every kind has been
//!   listed;
//! - [`watch`] / [`KubeSource`]: kube-rs reflectors, published as debounced [`Snapshot`]s of
//!   [`Objects`] on a `tokio::sync::watch` channel (for tests and tools).
//!
//! Each kind has its own `watcher` (list, then watch from the list's resourceVersion, with
//! bookmarks; a `410 Gone` makes it re-list) behind the default exponential backoff, with
//! `managedFields` stripped before objects enter the store. Watch errors are logged and
//! retried; the tasks never end on their own. The first snapshot with `ready: true` is
//! published only once every kind has been fully listed, so a consumer never acts on a
//! partial view of the cluster (which would delete every service it had not yet seen).
use std::fmt::Debug;
use std::hash::Hash;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, Resource, ResourceExt};
use log::{debug, error, info, warn};
use serde::de::DeserializeOwned;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use crate::controller::Key;
use crate::controller::ListKind;
use crate::model::{ModelConfig, NodeView, Objects, PodView, ServiceView, SliceView};
use crate::source::Change;

/// How long the publisher waits after a change before taking a snapshot, so that a burst of
/// events (a rollout, a re-list) becomes one snapshot.
pub const DEBOUNCE: Duration = Duration::from_millis(75);

/// How often a source that is not ready yet says so (an RBAC or connectivity problem keeps
/// a watch from ever listing).
const NOT_READY_WARNING: Duration = Duration::from_secs(30);

/// Everything the watches have seen, as of one moment.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Services, EndpointSlices and Pods sorted by namespace/name; pods are only this node's.
    pub objects: Objects,
    /// True once the first complete list of every watched kind has arrived. A snapshot with
    /// `ready: false` is empty and must not be applied.
    pub ready: bool,
    /// Increases by one with every published snapshot (0 is the initial, not-ready one).
    pub generation: u64,
}

/// Errors from building a client or starting the watches.
#[derive(Debug, thiserror::Error)]
pub enum KubeSourceError {
    #[error("invalid node name {0:?}: expected a non-empty DNS subdomain")]
    InvalidNodeName(String),
    #[error("--kubeconfig and --in-cluster are mutually exclusive")]
    ConflictingConfig,
    #[error("kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("in-cluster config: {0}")]
    InCluster(#[source] kube::config::InClusterError),
    #[error("no kubeconfig found: {0}")]
    Infer(#[source] kube::config::InferConfigError),
    #[error("building Kubernetes client: {0}")]
    Client(#[source] kube::Error),
}

/// Build a client: from `kubeconfig` if given, from the pod's service account if
/// `in_cluster`, otherwise the usual inference ($KUBECONFIG, ~/.kube/config, in-cluster).
///
/// `api_server` (`--api-server`) replaces the URL those give. The agent programs the
/// ClusterIPs, so it cannot reach the API server through one (`kubernetes.default`'s
/// ClusterIP, which in-cluster config uses); it is given the API server's own address, as
/// Cilium's `k8sServiceHost`. In-cluster, the server certificate is still checked against
/// `kubernetes.default.svc`, a name every API server certificate carries, so an IP address
/// that is not among its SANs still verifies.
pub async fn client(
    kubeconfig: Option<&Path>,
    in_cluster: bool,
    api_server: Option<&http::Uri>,
) -> Result<Client, KubeSourceError> {
    use kube::config::{KubeConfigOptions, Kubeconfig};
    let mut config = match (kubeconfig, in_cluster) {
        (Some(_), true) => return Err(KubeSourceError::ConflictingConfig),
        (None, true) if api_server.is_some() => {
            let mut c = kube::Config::incluster_dns().map_err(KubeSourceError::InCluster)?;
            c.tls_server_name = Some(IN_CLUSTER_API_NAME.to_string());
            c
        }
        (None, true) => kube::Config::incluster().map_err(KubeSourceError::InCluster)?,
        (Some(path), false) => {
            let err = |source| KubeSourceError::Kubeconfig {
                path: path.to_path_buf(),
                source,
            };
            let kc = Kubeconfig::read_from(path).map_err(err)?;
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(err)?
        }
        (None, false) => kube::Config::infer()
            .await
            .map_err(KubeSourceError::Infer)?,
    };
    if let Some(url) = api_server {
        config.cluster_url = url.clone();
    }
    Client::try_from(config).map_err(KubeSourceError::Client)
}

/// The running watches of [`changes`]. Dropping it stops them.
#[derive(Debug)]
pub struct ChangeWatches {
    _tasks: Vec<AbortOnDrop>,
}

/// Start the four watches on the current tokio runtime. Each object is converted to its
/// view (with `cfg`) as it arrives and sent to `tx`; see the module docs. The watches run
/// until the [`ChangeWatches`] is dropped or `tx`'s receiver is gone.
pub fn changes(
    client: Client,
    cfg: &ModelConfig,
    tx: std::sync::mpsc::Sender<Change>,
) -> Result<ChangeWatches, KubeSourceError> {
    validate_node_name(&cfg.node_name)?;
    let listed = Arc::new(Listed::default());
    let c = cfg.clone();
    let services = spawn_changes::<Service>(
        0,
        Api::all(client.clone()),
        watcher::Config::default(),
        tx.clone(),
        listed.clone(),
        move |s| Change::Service(key_of(s), Some(ServiceView::new(s, &c))),
        |s| Change::Service(key_of(s), None),
    );
    let c = cfg.clone();
    let slices = spawn_changes::<EndpointSlice>(
        1,
        Api::all(client.clone()),
        watcher::Config::default(),
        tx.clone(),
        listed.clone(),
        move |s| Change::Slice(key_of(s), SliceView::new(s, &c)),
        |s| Change::Slice(key_of(s), None),
    );
    let c = cfg.clone();
    let pods = spawn_changes::<Pod>(
        2,
        Api::all(client.clone()),
        watcher::Config::default().fields(&format!("spec.nodeName={}", cfg.node_name)),
        tx.clone(),
        listed.clone(),
        move |p| Change::Pod(key_of(p), Some(PodView::new(p, &c))),
        |p| Change::Pod(key_of(p), None),
    );
    // Every Node: this node's own gives the NodePort addresses, the others are where remote
    // endpoints live.
    let nodes = spawn_changes::<Node>(
        3,
        Api::all(client),
        watcher::Config::default(),
        tx,
        listed.clone(),
        |n| Change::Node(n.name_any(), Some(NodeView::new(n))),
        |n| Change::Node(n.name_any(), None),
    );
    let watchdog = AbortOnDrop(tokio::spawn(async move {
        let mut waited = Duration::ZERO;
        while !listed.all() {
            tokio::time::sleep(NOT_READY_WARNING).await;
            waited += NOT_READY_WARNING;
            if !listed.all() {
                warn!(
                    "kubernetes source not ready after {}s: no complete list yet of {} \
                     (the maps are left as they are until then)",
                    waited.as_secs(),
                    listed.pending().join(", ")
                );
            }
        }
    }));
    Ok(ChangeWatches {
        _tasks: vec![services, slices, pods, nodes, watchdog],
    })
}

/// `(namespace, name)` of a namespaced object, the namespace defaulted as the model does.
fn key_of<K: Resource>(o: &K) -> Key {
    let meta = o.meta();
    let ns = match meta.namespace.as_deref() {
        None | Some("") => crate::model::DEFAULT_NAMESPACE,
        Some(ns) => ns,
    };
    Key::new(ns, meta.name.as_deref().unwrap_or(""))
}

/// Which kinds have been listed completely once.
#[derive(Debug, Default)]
struct Listed {
    kinds: std::sync::Mutex<[bool; 4]>,
}

impl Listed {
    const NAMES: [&'static str; 4] = ["services", "endpointslices", "pods", "nodes"];
    const KINDS: [ListKind; 4] = [
        ListKind::Services,
        ListKind::Slices,
        ListKind::Pods,
        ListKind::Nodes,
    ];

    /// Mark `kind` listed; true when this completes the set.
    fn mark(&self, kind: usize) -> bool {
        let mut k = self.kinds.lock().unwrap_or_else(|e| e.into_inner());
        let before = k.iter().all(|d| *d);
        k[kind] = true;
        !before && k.iter().all(|d| *d)
    }

    fn all(&self) -> bool {
        self.kinds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .all(|d| *d)
    }

    fn pending(&self) -> Vec<&'static str> {
        let k = self.kinds.lock().unwrap_or_else(|e| e.into_inner());
        Self::NAMES
            .iter()
            .zip(k.iter())
            .filter(|(_, d)| !**d)
            .map(|(n, _)| *n)
            .collect()
    }
}

/// One watch of [`changes`]: objects converted as they arrive, lists sent whole.
fn spawn_changes<K>(
    kind: usize,
    api: Api<K>,
    config: watcher::Config,
    tx: std::sync::mpsc::Sender<Change>,
    listed: Arc<Listed>,
    upsert: impl Fn(&K) -> Change + Send + 'static,
    delete: impl Fn(&K) -> Change + Send + 'static,
) -> AbortOnDrop
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone + Send + Sync,
{
    let name = Listed::NAMES[kind];
    let task = tokio::spawn(async move {
        let stream = watcher::watcher(api, config).default_backoff();
        let mut stream = std::pin::pin!(stream);
        let list_kind = Listed::KINDS[kind];
        let mut listed_objects = 0usize;
        while let Some(item) = stream.next().await {
            let sent = match item {
                Ok(Event::Init) => {
                    debug!("{name}: listing");
                    listed_objects = 0;
                    tx.send(Change::ListBegin(list_kind)).is_ok()
                }
                Ok(Event::InitApply(o)) => {
                    listed_objects += 1;
                    tx.send(upsert(&o)).is_ok()
                }
                Ok(Event::InitDone) => {
                    info!("{name}: list complete ({listed_objects} objects)");
                    let mut ok = tx.send(Change::ListEnd(list_kind)).is_ok();
                    if listed.mark(kind) {
                        info!("kubernetes source ready: every kind listed");
                        ok &= tx.send(Change::Ready).is_ok();
                    }
                    ok
                }
                Ok(Event::Apply(o)) => tx.send(upsert(&o)).is_ok(),
                Ok(Event::Delete(o)) => tx.send(delete(&o)).is_ok(),
                Err(e) => {
                    warn!("{name}: {e} (retrying with backoff)");
                    true
                }
            };
            if !sent {
                debug!("{name}: the receiver is gone; stopping");
                return;
            }
        }
        error!("{name}: watch stream ended; no more updates for this kind");
    });
    AbortOnDrop(task)
}

/// The name in-cluster clients verify the API server's certificate against.
pub const IN_CLUSTER_API_NAME: &str = "kubernetes.default.svc";

/// The running watches. Dropping it stops them (the receivers then see no more changes).
#[derive(Debug)]
pub struct KubeSource {
    rx: watch::Receiver<Snapshot>,
    _publisher: AbortOnDrop,
}

impl KubeSource {
    /// Start the four watches and the publisher on the current tokio runtime.
    pub fn start(client: Client, node_name: &str) -> Result<Self, KubeSourceError> {
        let (rx, task) = spawn(client, node_name)?;
        Ok(Self {
            rx,
            _publisher: AbortOnDrop(task),
        })
    }

    /// A new receiver of the snapshots; its current value is the latest snapshot.
    pub fn subscribe(&self) -> watch::Receiver<Snapshot> {
        self.rx.clone()
    }
}

/// Start the watches and return the snapshot receiver. The watches run until every receiver
/// (clones included) has been dropped. Wait for the first usable snapshot with
/// `rx.wait_for(|s| s.ready)`.
pub async fn watch(
    client: Client,
    node_name: String,
) -> Result<watch::Receiver<Snapshot>, KubeSourceError> {
    // Dropping the JoinHandle detaches the publisher, which exits (stopping the watches)
    // once all receivers are gone.
    let (rx, _detached) = spawn(client, &node_name)?;
    Ok(rx)
}

fn spawn(
    client: Client,
    node_name: &str,
) -> Result<(watch::Receiver<Snapshot>, JoinHandle<()>), KubeSourceError> {
    validate_node_name(node_name)?;
    let notify = Arc::new(Notify::new());
    let (services, w1) = spawn_reflector::<Service>(
        "services",
        Api::all(client.clone()),
        watcher::Config::default(),
        &notify,
    );
    let (slices, w2) = spawn_reflector::<EndpointSlice>(
        "endpointslices",
        Api::all(client.clone()),
        watcher::Config::default(),
        &notify,
    );
    let (pods, w3) = spawn_reflector::<Pod>(
        "pods",
        Api::all(client.clone()),
        watcher::Config::default().fields(&format!("spec.nodeName={node_name}")),
        &notify,
    );
    // Every Node: this node's own gives the NodePort addresses, the others are where remote
    // endpoints live.
    let (nodes, w4) = spawn_reflector::<Node>(
        "nodes",
        Api::all(client),
        watcher::Config::default(),
        &notify,
    );
    let stores = Stores {
        services,
        slices,
        pods,
        nodes,
    };
    let (tx, rx) = watch::channel(Snapshot::default());
    let task = tokio::spawn(publish(
        stores,
        notify,
        tx,
        [w1, w2, w3, w4],
        node_name.to_string(),
    ));
    Ok((rx, task))
}

/// A Kubernetes node name is a DNS subdomain; anything else (a comma in particular) would
/// change the meaning of the field selectors.
fn validate_node_name(name: &str) -> Result<(), KubeSourceError> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(KubeSourceError::InvalidNodeName(name.to_string()))
    }
}

/// Aborts the task when dropped.
#[derive(Debug)]
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct Stores {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    pods: Store<Pod>,
    nodes: Store<Node>,
}

impl Stores {
    async fn wait_until_ready(&self) -> Result<(), reflector::store::WriterDropped> {
        tokio::try_join!(
            self.services.wait_until_ready(),
            self.slices.wait_until_ready(),
            self.pods.wait_until_ready(),
            self.nodes.wait_until_ready(),
        )?;
        Ok(())
    }

    /// The kinds not listed completely yet.
    fn pending(&self) -> Vec<&'static str> {
        use futures::FutureExt;
        [
            ("services", self.services.wait_until_ready().now_or_never()),
            (
                "endpointslices",
                self.slices.wait_until_ready().now_or_never(),
            ),
            ("pods", self.pods.wait_until_ready().now_or_never()),
            ("nodes", self.nodes.wait_until_ready().now_or_never()),
        ]
        .into_iter()
        .filter(|(_, ready)| !matches!(ready, Some(Ok(()))))
        .map(|(kind, _)| kind)
        .collect()
    }

    fn objects(&self) -> Objects {
        Objects {
            services: sorted(&self.services),
            slices: sorted(&self.slices),
            pods: sorted(&self.pods),
            nodes: sorted(&self.nodes),
        }
    }
}

fn sorted<K>(store: &Store<K>) -> Vec<K>
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + Hash + Clone,
{
    let mut v: Vec<K> = store.state().iter().map(|o| K::clone(o)).collect();
    v.sort_by_key(|o| (o.namespace(), o.name_any()));
    v
}

fn same_objects(a: &Objects, b: &Objects) -> bool {
    a.services == b.services && a.slices == b.slices && a.pods == b.pods && a.nodes == b.nodes
}

/// Start one reflector; returns its store and the task feeding it.
fn spawn_reflector<K>(
    kind: &'static str,
    api: Api<K>,
    config: watcher::Config,
    notify: &Arc<Notify>,
) -> (Store<K>, AbortOnDrop)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone + Send + Sync,
{
    let (store, writer) = reflector::store::<K>();
    let stream = watcher::watcher(api, config)
        .default_backoff()
        .modify(|o: &mut K| o.managed_fields_mut().clear());
    let notify = Arc::clone(notify);
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(reflector::reflector(writer, stream));
        while let Some(item) = stream.next().await {
            match item {
                Ok(Event::Init) => debug!("{kind}: listing"),
                Ok(Event::InitApply(_)) => {}
                Ok(Event::InitDone) => {
                    debug!("{kind}: list complete");
                    notify.notify_one();
                }
                Ok(Event::Apply(_) | Event::Delete(_)) => notify.notify_one(),
                Err(e) => warn!("{kind}: {e} (retrying with backoff)"),
            }
        }
        error!("{kind}: watch stream ended; no more updates for this kind");
    });
    (store, AbortOnDrop(task))
}

/// Wait for every store to be ready, then publish a snapshot after every (debounced) change.
/// Returns when every receiver is gone; dropping `_reflectors` then stops the watches.
async fn publish(
    stores: Stores,
    notify: Arc<Notify>,
    tx: watch::Sender<Snapshot>,
    _reflectors: [AbortOnDrop; 4],
    node_name: String,
) {
    let mut waited = Duration::ZERO;
    loop {
        tokio::select! {
            r = stores.wait_until_ready() => match r {
                Ok(()) => break,
                Err(e) => {
                    error!("kubernetes source: {e}");
                    return;
                }
            },
            () = tx.closed() => return,
            () = tokio::time::sleep(NOT_READY_WARNING) => {
                waited += NOT_READY_WARNING;
                warn!(
                    "kubernetes source not ready after {}s: no complete list yet of {} \
                     (the maps are left as they are until then)",
                    waited.as_secs(),
                    stores.pending().join(", ")
                );
            }
        }
    }
    loop {
        let objects = stores.objects();
        let (services, slices, pods) = (
            objects.services.len(),
            objects.slices.len(),
            objects.pods.len(),
        );
        let own_node = objects
            .nodes
            .iter()
            .any(|n| n.metadata.name.as_deref() == Some(node_name.as_str()));
        let nodes = objects.nodes.len();
        let sent = tx.send_if_modified(|snap| {
            if snap.ready && same_objects(&snap.objects, &objects) {
                return false;
            }
            if !snap.ready {
                info!(
                    "kubernetes source ready: {services} services, {slices} endpointslices, \
                     {pods} pods on {node_name}"
                );
            }
            snap.objects = objects;
            snap.ready = true;
            snap.generation += 1;
            true
        });
        if sent {
            debug!(
                "snapshot {}: {services} services, {slices} endpointslices, {pods} pods, \
                 {nodes} nodes (own Node {node_name} {})",
                tx.borrow().generation,
                if own_node { "present" } else { "absent" }
            );
        }
        tokio::select! {
            () = notify.notified() => {}
            () = tx.closed() => return,
        }
        tokio::select! {
            () = tokio::time::sleep(DEBOUNCE) => {}
            () = tx.closed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names() {
        assert!(validate_node_name("node-a").is_ok());
        assert!(validate_node_name("ip-10-0-0-1.ec2.internal").is_ok());
        assert!(validate_node_name("").is_err());
        assert!(validate_node_name("a,metadata.name=b").is_err());
        assert!(validate_node_name("Node").is_err());
    }

    #[tokio::test]
    async fn conflicting_config() {
        let r = client(Some(Path::new("/nonexistent")), true, None).await;
        assert!(matches!(r, Err(KubeSourceError::ConflictingConfig)));
    }

    #[tokio::test]
    async fn missing_kubeconfig() {
        let r = client(Some(Path::new("/nonexistent/kubeconfig")), false, None).await;
        assert!(
            matches!(r, Err(KubeSourceError::Kubeconfig { .. })),
            "{:?}",
            r.err()
        );
    }
}
