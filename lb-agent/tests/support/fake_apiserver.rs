//! An in-process fake Kubernetes API server for watch tests: real HTTP on 127.0.0.1, real
//! Kubernetes JSON, real list+watch semantics.
//!
//! What it implements, as the real API server does:
//! - `GET` list of Services, Pods, Nodes (`/api/v1/...`) and EndpointSlices
//!   (`/apis/discovery.k8s.io/v1/...`), cluster-wide or under `namespaces/<ns>/`, answering a
//!   `<Kind>List` with `metadata.resourceVersion` (items without `kind`/`apiVersion`).
//! - `?watch=true&resourceVersion=N`: newline-delimited `{"type":..,"object":..}` events of
//!   every change after N, then live changes, until `timeoutSeconds`. `resourceVersion` empty
//!   or `0` starts with synthetic `ADDED` events for the current objects.
//! - One global, monotonically increasing resourceVersion; every object carries the one of
//!   its last change, a `uid` and a `managedFields` entry.
//! - `fieldSelector` (`a=b`, `a==b`, `a!=b`, comma-separated, any dotted field path, a missing
//!   field reads as ""), on lists and watches. A watched object whose change makes it start
//!   (stop) matching is sent as `ADDED` (`DELETED`).
//! - `BOOKMARK` events (to watches that sent `allowWatchBookmarks=true`).
//! - A watch from a resourceVersion older than the compaction point answers `200` with a
//!   single `ERROR` event carrying a `Status` with code 410, reason `Expired`, and ends.
//!
//! - `limit`/`continue` pagination: the first page takes a snapshot of the matching objects
//!   and every page of it reports the snapshot's resourceVersion (a consistent list, as
//!   etcd gives); a continue token whose snapshot is gone or older than the compaction point
//!   answers `410 Expired`.
//!
//! Objects are stored as the JSON the server sends (shared, not copied, by the history and
//! the list snapshots), so that a world of 100,000 Services with their EndpointSlices fits
//! in memory for the benchmark.
//!
//! Not implemented: label selectors (answered 400), writes over HTTP (tests change objects
//! with Rust methods).
//!
//! The control API ([`FakeApiServer`] methods) changes objects (emitting events), sends
//! bookmarks, compacts history, closes or aborts every open watch, holds list or watch
//! requests, and reports per-kind request counters to wait on.
#![allow(dead_code)] // each test binary uses a different part of the control API

use std::collections::{BTreeMap, HashMap, HashSet};
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

/// How long [`FakeApiServer::wait_until`] waits before failing the test.
pub const WAIT: Duration = Duration::from_secs(10);

/// The kinds this server serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
    Pod,
    Node,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Service, Kind::EndpointSlice, Kind::Pod, Kind::Node];

    /// The kind of a k8s-openapi type.
    pub fn of<K: k8s_openapi::Resource>() -> Kind {
        match K::KIND {
            "Service" => Kind::Service,
            "EndpointSlice" => Kind::EndpointSlice,
            "Pod" => Kind::Pod,
            "Node" => Kind::Node,
            other => panic!("fake apiserver does not serve {other}"),
        }
    }

    fn from_route(group_version: &str, plural: &str) -> Option<Kind> {
        match (group_version, plural) {
            ("v1", "services") => Some(Kind::Service),
            ("v1", "pods") => Some(Kind::Pod),
            ("v1", "nodes") => Some(Kind::Node),
            ("discovery.k8s.io/v1", "endpointslices") => Some(Kind::EndpointSlice),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Pod => "Pod",
            Kind::Node => "Node",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            _ => "v1",
        }
    }

    fn namespaced(self) -> bool {
        self != Kind::Node
    }
}

/// Per-kind request counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KindStats {
    /// List requests received (counted on arrival, before any hold).
    pub lists: u64,
    /// Watch requests received (counted on arrival, before any hold).
    pub watches: u64,
    /// Watch requests answered with 410 Gone.
    pub gone: u64,
    /// Watch connections open now.
    pub open: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EventType {
    Added,
    Modified,
    Deleted,
}

/// One stored object version: its JSON as a watch event carries it (with `kind` and
/// `apiVersion`) and as a list item (without them).
#[derive(Debug)]
struct Stored {
    full: Bytes,
    item: Bytes,
    namespace: Option<String>,
}

impl Stored {
    fn new(mut v: Value) -> Arc<Stored> {
        let full = Bytes::from(serde_json::to_vec(&v).expect("json"));
        if let Some(m) = v.as_object_mut() {
            m.remove("kind");
            m.remove("apiVersion");
        }
        let item = Bytes::from(serde_json::to_vec(&v).expect("json"));
        let namespace = v
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .map(str::to_string);
        Arc::new(Stored {
            full,
            item,
            namespace,
        })
    }

    fn value(&self) -> Value {
        serde_json::from_slice(&self.full).expect("stored json")
    }
}

#[derive(Debug)]
struct Change {
    rv: u64,
    kind: Kind,
    etype: EventType,
    /// The object before a modification.
    prev: Option<Arc<Stored>>,
    obj: Arc<Stored>,
}

/// A list in progress: the objects it is made of, as of `rv`.
#[derive(Debug)]
struct Snapshot {
    rv: u64,
    items: Vec<Arc<Stored>>,
}

type Chunk = Result<Bytes, io::Error>;

#[derive(Debug)]
struct Watcher {
    id: u64,
    kind: Kind,
    namespace: Option<String>,
    selector: FieldSelector,
    bookmarks: bool,
    tx: mpsc::UnboundedSender<Chunk>,
}

#[derive(Debug, Default)]
struct Inner {
    rv: u64,
    next_uid: u64,
    next_watcher_id: u64,
    objects: HashMap<Kind, BTreeMap<(String, String), Arc<Stored>>>,
    log: Vec<Change>,
    /// Changes kept in `log` at most (older ones are compacted away); 0 = all.
    history_limit: usize,
    /// Paginated lists in progress, by continue-token id.
    snapshots: HashMap<u64, Snapshot>,
    next_snapshot: u64,
    /// When the last page of the latest complete list of each kind was sent.
    list_done: HashMap<Kind, std::time::Instant>,
    /// A watch from a resourceVersion below this answers 410 Gone.
    compacted: u64,
    watchers: Vec<Watcher>,
    stats: HashMap<Kind, KindStats>,
    /// The next list requests of a kind fail with (HTTP status, how many more times).
    failing_lists: HashMap<Kind, (u16, u32)>,
}

#[derive(Debug, Default, Clone)]
struct Holds {
    lists: HashSet<Kind>,
    watches: bool,
}

struct Shared {
    inner: Mutex<Inner>,
    holds: watch::Sender<Holds>,
    /// Bumped on every state change, to wake [`FakeApiServer::wait_until`].
    tick: watch::Sender<u64>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn bump(&self) {
        self.tick.send_modify(|t| *t += 1);
    }
}

/// The fake API server. Dropping it stops the server and closes every connection.
pub struct FakeApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl FakeApiServer {
    /// Start serving on 127.0.0.1 on an ephemeral port.
    pub async fn start() -> FakeApiServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local_addr");
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner::default()),
            holds: watch::channel(Holds::default()).0,
            tick: watch::channel(0).0,
        });
        let server = tokio::spawn(serve(listener, Arc::clone(&shared)));
        FakeApiServer {
            addr,
            shared,
            server,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kube client talking plain HTTP to this server.
    pub fn client(&self) -> kube::Client {
        let url = self.url().parse().expect("server url");
        kube::Client::try_from(kube::Config::new(url)).expect("kube client")
    }

    /// Create or replace an object (by namespace/name), emitting ADDED or MODIFIED. A
    /// namespaced object without a namespace goes to "default". Returns its resourceVersion.
    pub fn apply<K>(&self, obj: &K) -> u64
    where
        K: k8s_openapi::Resource + serde::Serialize,
    {
        let kind = Kind::of::<K>();
        let mut v = serde_json::to_value(obj).expect("serialize object");
        let name = v
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .expect("object without metadata.name")
            .to_string();
        let ns = if kind.namespaced() {
            let ns = v
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .unwrap_or("default")
                .to_string();
            v["metadata"]["namespace"] = json!(ns);
            ns
        } else {
            String::new()
        };
        let mut inner = self.shared.lock();
        inner.rv += 1;
        let rv = inner.rv;
        let key = (ns, name);
        let prev = inner.objects.entry(kind).or_default().get(&key).cloned();
        let prev_uid = prev
            .as_ref()
            .and_then(|p| p.value().pointer("/metadata/uid").cloned());
        let uid = match prev_uid {
            Some(uid) => uid,
            None => {
                inner.next_uid += 1;
                json!(format!("00000000-0000-0000-0000-{:012}", inner.next_uid))
            }
        };
        let meta = &mut v["metadata"];
        meta["resourceVersion"] = json!(rv.to_string());
        meta["uid"] = uid;
        meta["managedFields"] = json!([{
            "apiVersion": kind.api_version(),
            "fieldsType": "FieldsV1",
            "fieldsV1": {"f:metadata": {}},
            "manager": "fake-apiserver",
            "operation": "Update",
        }]);
        let v = Stored::new(v);
        inner
            .objects
            .entry(kind)
            .or_default()
            .insert(key, v.clone());
        let etype = if prev.is_some() {
            EventType::Modified
        } else {
            EventType::Added
        };
        inner.record(Change {
            rv,
            kind,
            etype,
            prev,
            obj: v,
        });
        drop(inner);
        self.shared.bump();
        rv
    }

    /// Delete an object, emitting DELETED (with the object at a new resourceVersion).
    /// Returns false if there was no such object.
    pub fn delete<K: k8s_openapi::Resource>(&self, namespace: Option<&str>, name: &str) -> bool {
        let kind = Kind::of::<K>();
        let ns = if kind.namespaced() {
            namespace.unwrap_or("default").to_string()
        } else {
            String::new()
        };
        let mut inner = self.shared.lock();
        let Some(obj) = inner
            .objects
            .entry(kind)
            .or_default()
            .remove(&(ns, name.to_string()))
        else {
            return false;
        };
        inner.rv += 1;
        let rv = inner.rv;
        let mut obj = obj.value();
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let obj = Stored::new(obj);
        inner.record(Change {
            rv,
            kind,
            etype: EventType::Deleted,
            prev: None,
            obj,
        });
        drop(inner);
        self.shared.bump();
        true
    }

    /// The current objects of a kind, as stored (with resourceVersion, uid, managedFields).
    pub fn objects<K>(&self) -> Vec<K>
    where
        K: k8s_openapi::Resource + serde::de::DeserializeOwned,
    {
        let inner = self.shared.lock();
        inner
            .objects
            .get(&Kind::of::<K>())
            .into_iter()
            .flat_map(|m| m.values())
            .map(|v| serde_json::from_slice(&v.full).expect("stored object"))
            .collect()
    }

    /// How many objects of `kind` there are.
    pub fn count(&self, kind: Kind) -> usize {
        self.shared
            .lock()
            .objects
            .get(&kind)
            .map_or(0, BTreeMap::len)
    }

    /// Keep at most `limit` changes of history (older ones are compacted away, as etcd's
    /// compaction does); 0 keeps everything.
    pub fn set_history_limit(&self, limit: usize) {
        self.shared.lock().history_limit = limit;
    }

    /// When the last page of the latest complete list of `kind` was sent.
    pub fn list_done(&self, kind: Kind) -> Option<std::time::Instant> {
        self.shared.lock().list_done.get(&kind).copied()
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().rv
    }

    /// Send a BOOKMARK at the current resourceVersion to every open watch that allows them.
    /// Returns how many were sent.
    pub fn bookmark(&self) -> usize {
        let mut inner = self.shared.lock();
        let rv = inner.rv.to_string();
        let mut sent = 0;
        inner.watchers.retain(|w| {
            if !w.bookmarks {
                return true;
            }
            let line = value_line(
                "BOOKMARK",
                &json!({
                    "kind": w.kind.name(),
                    "apiVersion": w.kind.api_version(),
                    "metadata": {"resourceVersion": rv},
                }),
            );
            sent += 1;
            w.tx.send(Ok(line)).is_ok()
        });
        drop(inner);
        self.shared.bump();
        sent
    }

    /// Forget the history up to now: a later watch from an older resourceVersion than the
    /// current one gets 410 Gone (and must re-list). Open watches are not affected.
    pub fn compact(&self) {
        let mut inner = self.shared.lock();
        inner.compacted = inner.rv;
        let keep = inner.rv;
        inner.log.retain(|c| c.rv > keep);
        drop(inner);
        self.shared.bump();
    }

    /// End every open watch cleanly (the response completes, as on a server-side timeout).
    pub fn close_watches(&self) -> usize {
        let n = std::mem::take(&mut self.shared.lock().watchers).len();
        self.shared.bump();
        n
    }

    /// Abort every open watch connection mid-response (the client sees a broken stream).
    pub fn drop_watches(&self) -> usize {
        let watchers = std::mem::take(&mut self.shared.lock().watchers);
        for w in &watchers {
            let _ = w.tx.send(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "fake apiserver dropped the watch",
            )));
        }
        self.shared.bump();
        watchers.len()
    }

    /// Answer the next `times` list requests for `kind` with HTTP `code` (e.g. 403 as with
    /// missing RBAC, 500) and a Status body.
    pub fn fail_lists(&self, kind: Kind, code: u16, times: u32) {
        self.shared.lock().failing_lists.insert(kind, (code, times));
    }

    /// While held, list requests for `kind` wait (they are counted on arrival).
    pub fn hold_lists(&self, kind: Kind, hold: bool) {
        self.shared.holds.send_modify(|h| {
            if hold {
                h.lists.insert(kind);
            } else {
                h.lists.remove(&kind);
            }
        });
    }

    /// While held, watch requests wait (they are counted on arrival); on release they are
    /// answered as of the release (so a compaction while held makes them 410).
    pub fn hold_watches(&self, hold: bool) {
        self.shared.holds.send_modify(|h| h.watches = hold);
    }

    pub fn stats(&self, kind: Kind) -> KindStats {
        let inner = self.shared.lock();
        let mut s = inner.stats.get(&kind).copied().unwrap_or_default();
        s.open = inner.watchers.iter().filter(|w| w.kind == kind).count();
        s
    }

    pub fn all_stats(&self) -> BTreeMap<Kind, KindStats> {
        Kind::ALL.iter().map(|k| (*k, self.stats(*k))).collect()
    }

    /// Wait (at most [`WAIT`]) until `pred` holds for the per-kind stats; panics otherwise.
    pub async fn wait_until(&self, what: &str, pred: impl Fn(&BTreeMap<Kind, KindStats>) -> bool) {
        let mut tick = self.shared.tick.subscribe();
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if pred(&self.all_stats()) {
                return;
            }
            if tokio::time::timeout_at(deadline, tick.changed())
                .await
                .is_err()
            {
                panic!(
                    "timed out waiting for {what}; server stats: {:?}",
                    self.all_stats()
                );
            }
        }
    }
}

impl Inner {
    fn stats_mut(&mut self, kind: Kind) -> &mut KindStats {
        self.stats.entry(kind).or_default()
    }

    /// Log a change and send it to every matching watch.
    fn record(&mut self, change: Change) {
        self.watchers.retain(|w| match watch_event(w, &change) {
            Some(line) => w.tx.send(Ok(line)).is_ok(),
            None => !w.tx.is_closed(),
        });
        self.log.push(change);
        if self.history_limit > 0 && self.log.len() > 2 * self.history_limit {
            let cut = self.log.len() - self.history_limit;
            self.compacted = self.log[cut].rv;
            self.log.drain(..cut);
        }
    }
}

/// The event a change means to one watch, as a line, if any.
fn watch_event(w: &Watcher, c: &Change) -> Option<Bytes> {
    if w.kind != c.kind || !in_namespace(&c.obj, w.namespace.as_deref()) {
        return None;
    }
    let now = w.selector.matches(&c.obj);
    let (etype, obj) = match c.etype {
        EventType::Added => (now.then_some("ADDED")?, c.obj.clone()),
        EventType::Deleted => (now.then_some("DELETED")?, c.obj.clone()),
        EventType::Modified => {
            let before = c.prev.as_ref().is_some_and(|p| w.selector.matches(p));
            match (before, now) {
                (true, true) => ("MODIFIED", c.obj.clone()),
                (false, true) => ("ADDED", c.obj.clone()),
                (true, false) => {
                    // Leaves the selection: DELETED with the old object at the new version.
                    let mut old = c.prev.as_ref()?.value();
                    old["metadata"]["resourceVersion"] = json!(c.rv.to_string());
                    ("DELETED", Stored::new(old))
                }
                (false, false) => return None,
            }
        }
    };
    Some(event_line(etype, &obj))
}

fn event_line(etype: &str, obj: &Stored) -> Bytes {
    let mut line = Vec::with_capacity(obj.full.len() + 32);
    line.extend_from_slice(format!("{{\"type\":\"{etype}\",\"object\":").as_bytes());
    line.extend_from_slice(&obj.full);
    line.extend_from_slice(b"}\n");
    Bytes::from(line)
}

fn value_line(etype: &str, obj: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": etype, "object": obj})).expect("json");
    line.push(b'\n');
    Bytes::from(line)
}

fn in_namespace(obj: &Stored, ns: Option<&str>) -> bool {
    ns.is_none_or(|ns| obj.namespace.as_deref() == Some(ns))
}

/// A parsed `fieldSelector`.
#[derive(Debug, Clone, Default)]
struct FieldSelector(Vec<(String, bool, String)>);

impl FieldSelector {
    fn parse(s: &str) -> Result<Self, String> {
        let mut terms = Vec::new();
        for term in s.split(',').filter(|t| !t.is_empty()) {
            let (field, eq, value) = if let Some((f, v)) = term.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = term.split_once("==") {
                (f, true, v)
            } else if let Some((f, v)) = term.split_once('=') {
                (f, true, v)
            } else {
                return Err(format!("invalid field selector term {term:?}"));
            };
            terms.push((field.to_string(), eq, value.to_string()));
        }
        Ok(FieldSelector(terms))
    }

    fn matches(&self, obj: &Stored) -> bool {
        if self.0.is_empty() {
            return true;
        }
        let obj = obj.value();
        self.0.iter().all(|(field, eq, value)| {
            let mut cur = &obj;
            for part in field.split('.') {
                cur = cur.get(part).unwrap_or(&Value::Null);
            }
            let actual = match cur {
                Value::String(s) => s.clone(),
                Value::Null => String::new(),
                other => other.to_string(),
            };
            (actual == *value) == *eq
        })
    }
}

type Body = BoxBody<Bytes, io::Error>;

async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    // Dropping the set (when this task is aborted) aborts every connection.
    let mut conns = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        // As kube-apiserver: Go's net package sets TCP_NODELAY on every TCP connection.
        // Without it, Nagle's algorithm holds a watch event written while an earlier one is
        // unacknowledged until the client's delayed ACK (up to 40 ms): a tail that is the
        // test double's, not the agent's.
        let _ = stream.set_nodelay(true);
        let shared = Arc::clone(&shared);
        conns.spawn(async move {
            let svc = hyper::service::service_fn(move |req| handle(Arc::clone(&shared), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
        while conns.try_join_next().is_some() {}
    }
}

fn full(status: StatusCode, body: &Value) -> Response<Body> {
    let bytes = Bytes::from(serde_json::to_vec(body).expect("json"));
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(
            Full::new(bytes)
                .map_err(|never: Infallible| match never {})
                .boxed(),
        )
        .expect("response")
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

fn error(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    full(code, &status(code.as_u16(), reason, message))
}

/// (kind, namespace) of a collection path, e.g. `/api/v1/namespaces/x/pods`.
fn route(path: &str) -> Option<(Kind, Option<String>)> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (gv, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => (v.to_string(), rest),
        ["apis", g, v, rest @ ..] => (format!("{g}/{v}"), rest),
        _ => return None,
    };
    match rest {
        [plural] => Some((Kind::from_route(&gv, plural)?, None)),
        ["namespaces", ns, plural] => {
            let kind = Kind::from_route(&gv, plural)?;
            kind.namespaced().then(|| (kind, Some(ns.to_string())))
        }
        _ => None,
    }
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    if req.method() != hyper::Method::GET {
        return Ok(error(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "the fake apiserver only serves GET",
        ));
    }
    let Some((kind, namespace)) = route(req.uri().path()) else {
        return Ok(error(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!(
                "the server could not find the requested resource ({})",
                req.uri().path()
            ),
        ));
    };
    let query: HashMap<String, String> = req
        .uri()
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    if query.get("labelSelector").is_some_and(|s| !s.is_empty()) {
        return Ok(error(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the fake apiserver does not support labelSelector",
        ));
    }
    let selector = match FieldSelector::parse(query.get("fieldSelector").map_or("", String::as_str))
    {
        Ok(s) => s,
        Err(e) => return Ok(error(StatusCode::BAD_REQUEST, "BadRequest", &e)),
    };
    let is_watch = query.get("watch").is_some_and(|w| w == "true" || w == "1");
    if is_watch {
        Ok(watch_request(&shared, kind, namespace, selector, &query).await)
    } else {
        Ok(list_request(&shared, kind, namespace.as_deref(), &selector, &query).await)
    }
}

async fn list_request(
    shared: &Shared,
    kind: Kind,
    namespace: Option<&str>,
    selector: &FieldSelector,
    query: &HashMap<String, String>,
) -> Response<Body> {
    shared.lock().stats_mut(kind).lists += 1;
    shared.bump();
    let mut holds = shared.holds.subscribe();
    let _ = holds.wait_for(|h| !h.lists.contains(&kind)).await;
    let mut inner = shared.lock();
    if let Some((code, times)) = inner.failing_lists.get_mut(&kind) {
        if *times > 0 {
            *times -= 1;
            let code = StatusCode::from_u16(*code).expect("status code");
            drop(inner);
            let reason = code
                .canonical_reason()
                .unwrap_or("Failure")
                .replace(' ', "");
            return error(code, &reason, "injected by the fake apiserver");
        }
    }
    let limit = query
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0);
    let (rv, items, next) = match query.get("continue").filter(|c| !c.is_empty()) {
        Some(token) => {
            let parsed = token
                .split_once(':')
                .and_then(|(id, at)| Some((id.parse::<u64>().ok()?, at.parse::<usize>().ok()?)));
            let compacted = inner.compacted;
            let Some((id, at)) =
                parsed.filter(|(id, _)| inner.snapshots.get(id).is_some_and(|s| s.rv >= compacted))
            else {
                drop(inner);
                return error(
                    StatusCode::GONE,
                    "Expired",
                    "the provided continue parameter is too old to display a consistent list \
                     result",
                );
            };
            let snap = &inner.snapshots[&id];
            let end = limit.map_or(snap.items.len(), |l| (at + l).min(snap.items.len()));
            let items: Vec<Bytes> = snap.items[at.min(end)..end]
                .iter()
                .map(|o| o.item.clone())
                .collect();
            let rv = snap.rv;
            let next = if end < snap.items.len() {
                Some(format!("{id}:{end}"))
            } else {
                inner.snapshots.remove(&id);
                None
            };
            (rv, items, next)
        }
        None => {
            let all: Vec<Arc<Stored>> = inner
                .objects
                .get(&kind)
                .into_iter()
                .flat_map(|m| m.values())
                .filter(|o| in_namespace(o, namespace) && selector.matches(o))
                .cloned()
                .collect();
            let rv = inner.rv;
            match limit.filter(|l| *l < all.len()) {
                Some(l) => {
                    let items = all[..l].iter().map(|o| o.item.clone()).collect();
                    inner.next_snapshot += 1;
                    let id = inner.next_snapshot;
                    inner.snapshots.insert(id, Snapshot { rv, items: all });
                    (rv, items, Some(format!("{id}:{l}")))
                }
                None => (rv, all.iter().map(|o| o.item.clone()).collect(), None),
            }
        }
    };
    if next.is_none() {
        inner.list_done.insert(kind, std::time::Instant::now());
    }
    drop(inner);
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if let Some(next) = &next {
        metadata["continue"] = json!(next);
    }
    let head = format!(
        "{{\"kind\":\"{}List\",\"apiVersion\":\"{}\",\"metadata\":{},\"items\":[",
        kind.name(),
        kind.api_version(),
        metadata
    );
    let mut body =
        Vec::with_capacity(head.len() + items.iter().map(|i| i.len() + 1).sum::<usize>() + 2);
    body.extend_from_slice(head.as_bytes());
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(item);
    }
    body.extend_from_slice(b"]}");
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(
            Full::new(Bytes::from(body))
                .map_err(|never: Infallible| match never {})
                .boxed(),
        )
        .expect("response")
}

async fn watch_request(
    shared: &Arc<Shared>,
    kind: Kind,
    namespace: Option<String>,
    selector: FieldSelector,
    query: &HashMap<String, String>,
) -> Response<Body> {
    shared.lock().stats_mut(kind).watches += 1;
    shared.bump();
    let mut holds = shared.holds.subscribe();
    let _ = holds.wait_for(|h| !h.watches).await;

    let from = query.get("resourceVersion").map_or("", String::as_str);
    let from: Option<u64> = match from {
        "" | "0" => None,
        n => match n.parse() {
            Ok(n) => Some(n),
            Err(_) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    &format!("invalid resourceVersion {n:?}"),
                )
            }
        },
    };
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map_or(Duration::from_secs(1800), Duration::from_secs);
    let bookmarks = query
        .get("allowWatchBookmarks")
        .is_some_and(|b| b == "true");

    let (tx, rx) = mpsc::unbounded_channel();
    let id = {
        let mut inner = shared.lock();
        if let Some(n) = from.filter(|n| *n < inner.compacted) {
            let compacted = inner.compacted;
            inner.stats_mut(kind).gone += 1;
            drop(inner);
            shared.bump();
            let gone = status(
                410,
                "Expired",
                &format!("too old resource version: {n} ({compacted})"),
            );
            let line = value_line("ERROR", &gone);
            return Response::builder()
                .status(StatusCode::OK)
                .header("content-type", "application/json")
                .body(
                    Full::new(line)
                        .map_err(|never: Infallible| match never {})
                        .boxed(),
                )
                .expect("response");
        }
        inner.next_watcher_id += 1;
        let id = inner.next_watcher_id;
        let w = Watcher {
            id,
            kind,
            namespace,
            selector,
            bookmarks,
            tx,
        };
        match from {
            // Synthetic ADDED events for the current state.
            None => {
                for obj in inner
                    .objects
                    .get(&kind)
                    .into_iter()
                    .flat_map(|m| m.values())
                {
                    if in_namespace(obj, w.namespace.as_deref()) && w.selector.matches(obj) {
                        let _ = w.tx.send(Ok(event_line("ADDED", obj)));
                    }
                }
            }
            // Replay the history after `n`.
            Some(n) => {
                for c in inner.log.iter().filter(|c| c.rv > n) {
                    if let Some(line) = watch_event(&w, c) {
                        let _ = w.tx.send(Ok(line));
                    }
                }
            }
        }
        inner.watchers.push(w);
        id
    };
    shared.bump();
    let stream = WatchStream {
        rx,
        deadline: Box::pin(tokio::time::sleep(timeout)),
        _guard: WatchGuard {
            id,
            shared: Arc::downgrade(shared),
        },
    };
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .expect("response")
}

/// Removes its watcher from the server when the response body is dropped (client gone).
struct WatchGuard {
    id: u64,
    shared: Weak<Shared>,
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.upgrade() {
            shared.lock().watchers.retain(|w| w.id != self.id);
            shared.bump();
        }
    }
}

/// A watch response body: the watcher's events until it is closed or `timeoutSeconds`.
struct WatchStream {
    rx: mpsc::UnboundedReceiver<Chunk>,
    deadline: Pin<Box<tokio::time::Sleep>>,
    _guard: WatchGuard,
}

impl Stream for WatchStream {
    type Item = Result<Frame<Bytes>, io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        self.rx
            .poll_recv(cx)
            .map(|chunk| chunk.map(|r| r.map(Frame::data)))
    }
}
