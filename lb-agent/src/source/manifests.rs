//! Objects from a directory of YAML manifests (`kubectl get -o yaml` output or hand-written
//! files), for running without an API server and for tests.
//!
//! Every `*.yaml` / `*.yml` file of the directory (not recursive, hidden files skipped,
//! symlinks followed, so a mounted ConfigMap works) is read in file-name order. Each file may
//! hold several documents separated by `---`. A document is dispatched on `apiVersion` and
//! `kind`: `v1` Service, Pod and Node, `discovery.k8s.io/v1` EndpointSlice, and lists of
//! those (`kind: List` as `kubectl get -o yaml` prints several objects, and typed lists such
//! as `ServiceList` whose items carry no apiVersion/kind). A document that cannot be used
//! (unknown kind, invalid YAML, a field of the wrong type) becomes a [`Problem`] naming the
//! file and the document number; only an unreadable directory is an error.
//!
//! Namespaced objects without a namespace get `default`, as with `kubectl apply`.
//!
//! [`load_dir`] reads everything into [`Objects`]; the agent uses [`ManifestDir`] instead,
//! which keeps only each file's size and modification time and the objects it defines,
//! parses again only the files that changed (several at once), and reports the objects'
//! views as [`Change`]s. An object defined in several files (or twice in one) takes its
//! first definition in file-name order; the others are reported as problems.
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::hash::BuildHasher;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use hashbrown::HashTable;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_yaml::{Mapping, Value};
use smallvec::SmallVec;

use crate::controller::Key;
use crate::hash::HashMap;
use crate::model::{
    ModelConfig, NodeView, Objects, PodView, Problem, ServiceView, SliceView, DEFAULT_NAMESPACE,
};
use crate::source::{yaml, Change};

/// Errors that stop loading altogether.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read manifest directory {}: {source}", dir.display())]
    ReadDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The YAML files of `dir` (not recursive, hidden files skipped, symlinks followed), by
/// name.
fn yaml_files(dir: &Path) -> Result<Vec<(String, PathBuf)>, ManifestError> {
    let err = |source| ManifestError::ReadDir {
        dir: dir.to_path_buf(),
        source,
    };
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).map_err(err)? {
        let path = entry.map_err(err)?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let yaml = name.ends_with(".yaml") || name.ends_with(".yml");
        if name.starts_with('.') || !yaml || !path.is_file() {
            continue;
        }
        files.push((name.to_string(), path));
    }
    files.sort();
    Ok(files)
}

/// An object a manifest defines.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum ObjRef {
    Service(Key),
    Slice(Key),
    Pod(Key),
    Node(String),
}

impl ObjRef {
    fn describe(&self) -> String {
        match self {
            ObjRef::Service(k) => format!("Service {}/{}", k.namespace, k.name),
            ObjRef::Slice(k) => format!("EndpointSlice {}/{}", k.namespace, k.name),
            ObjRef::Pod(k) => format!("Pod {}/{}", k.namespace, k.name),
            ObjRef::Node(n) => format!("Node {n}"),
        }
    }
}

/// One object of a parsed file: its view, as the change that sets it.
type Defined = (ObjRef, Change);

/// A parsed file: its objects and its problems.
type Parsed = (Vec<Defined>, Vec<Problem>);

/// A file to read: its name, path and fingerprint (size, modification time).
type Todo = (String, PathBuf, (u64, SystemTime));

/// Parse one file into its objects' views (Services, then slices, Pods and Nodes, each in
/// document order) and its problems. Each document's objects become views as soon as it is
/// read: a file's full objects are never all held at once.
fn parse_file(name: &str, path: &Path, cfg: &ModelConfig) -> Parsed {
    let mut loader = Loader {
        keep_duplicate_nodes: true,
        ..Loader::default()
    };
    let (mut services, mut slices) = (Vec::new(), Vec::new());
    let (mut pods, mut nodes) = (Vec::new(), Vec::new());
    let mut take = |o: &mut Objects| {
        for s in o.services.drain(..) {
            let v = ServiceView::new(&s, cfg);
            let k = Key::new(v.namespace.clone(), v.name.clone());
            services.push((ObjRef::Service(k.clone()), Change::Service(k, Some(v))));
        }
        for s in o.slices.drain(..) {
            let k = Key::new(
                s.metadata.namespace.clone().unwrap_or_default(),
                s.metadata.name.clone().unwrap_or_default(),
            );
            slices.push((
                ObjRef::Slice(k.clone()),
                Change::Slice(k, SliceView::new(&s, cfg)),
            ));
        }
        for p in o.pods.drain(..) {
            let v = PodView::new(&p, cfg);
            let k = Key::new(v.namespace.clone(), v.name.clone());
            pods.push((ObjRef::Pod(k.clone()), Change::Pod(k, Some(v))));
        }
        for n in o.nodes.drain(..) {
            let v = NodeView::new(&n);
            nodes.push((
                ObjRef::Node(v.name.clone()),
                Change::Node(v.name.clone(), Some(v)),
            ));
        }
    };
    match fs::read_to_string(path) {
        Ok(text) => loader.each_document(name, &text, |l| take(&mut l.objects)),
        Err(e) => loader.problem(name, format!("cannot read: {e}")),
    }
    // Pods before Nodes, each in document order.
    let mut out = services;
    out.append(&mut slices);
    out.append(&mut pods);
    out.append(&mut nodes);
    (out, loader.problems)
}

/// The deletion of `r`.
fn deleted(r: &ObjRef) -> Change {
    match r {
        ObjRef::Service(k) => Change::Service(k.clone(), None),
        ObjRef::Slice(k) => Change::Slice(k.clone(), None),
        ObjRef::Pod(k) => Change::Pod(k.clone(), None),
        ObjRef::Node(n) => Change::Node(n.clone(), None),
    }
}

/// One definition: object `pos` of the file in slot `file` of a [`Book`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Def {
    file: u32,
    pos: u32,
}

/// A file as last read: its name, size and modification time, and what it defines (in
/// order).
#[derive(Debug)]
struct FileState {
    name: Arc<str>,
    fingerprint: (u64, SystemTime),
    defines: Box<[ObjRef]>,
}

/// The files read and who defines each object. An object's key is stored once, in its
/// file's list; the index is a hash table of definitions (8 bytes each) hashed by the
/// object they define, several for an object defined more than once. At 100k Services
/// (200,000 objects) that is about 14 MB, where a map keyed by object to its definers
/// took 36.
#[derive(Debug, Default)]
struct Book {
    /// Files by slot; a removed file's slot is reused.
    files: Vec<Option<FileState>>,
    free: Vec<u32>,
    by_name: BTreeMap<String, u32>,
    defs: HashTable<Def>,
    hasher: foldhash::fast::RandomState,
}

impl Book {
    fn file(&self, name: &str) -> Option<&FileState> {
        let id = *self.by_name.get(name)?;
        self.files.get(id as usize)?.as_ref()
    }

    /// The object a definition defines (`files`: the book's, borrowed apart from its index).
    fn obj(files: &[Option<FileState>], d: Def) -> Option<&ObjRef> {
        files
            .get(d.file as usize)?
            .as_ref()?
            .defines
            .get(d.pos as usize)
    }

    /// The definitions of `r`, first (the one that holds) first: by file name, then
    /// position in the file.
    fn definers(&self, r: &ObjRef) -> SmallVec<[(Arc<str>, u32); 1]> {
        let files = &self.files;
        let mut out: SmallVec<[(Arc<str>, u32); 1]> = self
            .defs
            .iter_hash(self.hasher.hash_one(r))
            .filter(|&&d| Self::obj(files, d) == Some(r))
            .filter_map(|&d| Some((files.get(d.file as usize)?.as_ref()?.name.clone(), d.pos)))
            .collect();
        out.sort();
        out
    }

    /// Forget the file `name` and its definitions.
    fn remove(&mut self, name: &str) {
        let Some(id) = self.by_name.remove(name) else {
            return;
        };
        let Some(f) = self.files.get_mut(id as usize).and_then(Option::take) else {
            return;
        };
        for (pos, r) in f.defines.iter().enumerate() {
            let d = Def {
                file: id,
                pos: pos as u32,
            };
            if let Ok(e) = self.defs.find_entry(self.hasher.hash_one(r), |&x| x == d) {
                e.remove();
            }
        }
        self.free.push(id);
    }

    /// Record the file `name` and what it defines; returns its slot.
    fn add(&mut self, name: &str, fingerprint: (u64, SystemTime), defines: Box<[ObjRef]>) -> u32 {
        self.remove(name);
        let id = self.free.pop().unwrap_or(self.files.len() as u32);
        let hashes: Vec<u64> = defines.iter().map(|r| self.hasher.hash_one(r)).collect();
        let slot = FileState {
            name: name.into(),
            fingerprint,
            defines,
        };
        match self.files.get_mut(id as usize) {
            Some(s) => *s = Some(slot),
            None => self.files.push(Some(slot)),
        }
        self.by_name.insert(name.to_string(), id);
        let Book {
            files,
            defs,
            hasher,
            ..
        } = self;
        for (pos, h) in hashes.into_iter().enumerate() {
            let d = Def {
                file: id,
                pos: pos as u32,
            };
            defs.insert_unique(h, d, |&x| {
                Self::obj(files, x).map_or(0, |r| hasher.hash_one(r))
            });
        }
        id
    }

    fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    fn names(&self) -> impl Iterator<Item = &String> {
        self.by_name.keys()
    }
}

/// A manifests directory read incrementally; see the module docs.
#[derive(Debug)]
pub struct ManifestDir {
    dir: PathBuf,
    cfg: ModelConfig,
    book: Book,
    /// Files to parse again at the next poll whatever their fingerprint.
    forced: BTreeSet<String>,
    threads: usize,
}

/// What one [`ManifestDir::poll`] found.
#[derive(Debug, Default)]
pub struct Poll {
    pub changes: Vec<Change>,
    /// Problems of the files parsed (each file's, and objects defined twice).
    pub problems: Vec<Problem>,
    /// Files parsed.
    pub parsed: usize,
}

impl ManifestDir {
    /// Fails when `dir` cannot be read.
    pub fn new(dir: &Path, cfg: ModelConfig) -> Result<Self, ManifestError> {
        yaml_files(dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            cfg,
            book: Book::default(),
            forced: BTreeSet::new(),
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        })
    }

    /// Look at the directory and parse the files that are new or changed; returns the
    /// changes of the objects they (no longer) define. Nothing changed: no changes.
    pub fn poll(&mut self) -> Result<Poll, ManifestError> {
        let mut all = Poll::default();
        self.poll_each(&mut |p| {
            all.changes.extend(p.changes);
            all.problems.extend(p.problems);
            all.parsed += p.parsed;
        })?;
        Ok(all)
    }

    /// [`ManifestDir::poll`], handing its result to `emit` in parts: on the first read of a
    /// directory, each file's changes as soon as it and every file before it (by name) are
    /// parsed, so that they are applied while the rest is parsed. The parts together are
    /// what `poll` returns: files are taken in name order, and a file's objects that an
    /// earlier file defines already are only reported as defined twice.
    pub fn poll_each(&mut self, emit: &mut dyn FnMut(Poll)) -> Result<(), ManifestError> {
        let listed = yaml_files(&self.dir)?;
        let mut todo: Vec<Todo> = Vec::new();
        let mut present = BTreeSet::new();
        for (name, path) in listed {
            let Ok(md) = fs::metadata(&path) else {
                continue; // gone since the listing: the next poll sees it
            };
            let fp = (md.len(), md.modified().unwrap_or(SystemTime::UNIX_EPOCH));
            present.insert(name.clone());
            let same = self.book.file(&name).is_some_and(|f| f.fingerprint == fp);
            if !same || self.forced.contains(&name) {
                todo.push((name, path, fp));
            }
        }
        let removed: Vec<String> = self
            .book
            .names()
            .filter(|n| !present.contains(*n))
            .cloned()
            .collect();
        self.forced.clear();
        if todo.is_empty() && removed.is_empty() {
            return Ok(());
        }
        if self.book.is_empty() && removed.is_empty() && todo.len() > 1 {
            return self.first_read(&todo, emit);
        }
        let mut parsed = Vec::with_capacity(todo.len());
        parse_in_order(&self.cfg, self.threads, &todo, |_, p| {
            parsed.push(p);
            Ok(())
        })?;
        let out = self.apply_parsed(&todo, &removed, parsed)?;
        emit(out);
        Ok(())
    }

    /// The first read of a directory: files parsed on several threads, each applied (and
    /// emitted) in name order as soon as it and the files before it are parsed.
    fn first_read(
        &mut self,
        todo: &[Todo],
        emit: &mut dyn FnMut(Poll),
    ) -> Result<(), ManifestError> {
        let cfg = self.cfg.clone();
        parse_in_order(&cfg, self.threads, todo, |i, p| {
            emit(self.apply_parsed(std::slice::from_ref(&todo[i]), &[], vec![p])?);
            Ok(())
        })
    }

    /// Record the `parsed` contents of the files `todo` (read again or new) and the loss of
    /// the files `removed`; returns the changes of the objects whose definition changed.
    fn apply_parsed(
        &mut self,
        todo: &[Todo],
        removed: &[String],
        parsed: Vec<Parsed>,
    ) -> Result<Poll, ManifestError> {
        let mut out = Poll {
            parsed: parsed.len(),
            ..Poll::default()
        };
        // The objects whose definitions change, with their holder before.
        let mut affected: BTreeMap<ObjRef, Option<(Arc<str>, u32)>> = BTreeMap::new();
        let mut touch = |book: &Book, r: &ObjRef| {
            if !affected.contains_key(r) {
                affected.insert(r.clone(), book.definers(r).into_iter().next());
            }
        };
        for name in removed.iter().chain(todo.iter().map(|(n, _, _)| n)) {
            if let Some(f) = self.book.file(name) {
                for r in &f.defines {
                    touch(&self.book, r);
                }
            }
        }
        for (defs, _) in &parsed {
            for (r, _) in defs {
                touch(&self.book, r);
            }
        }
        // Forget the old definitions of the files read again or gone, then add the new.
        for name in removed.iter().chain(todo.iter().map(|(n, _, _)| n)) {
            self.book.remove(name);
        }
        let mut changes = Vec::with_capacity(parsed.len());
        // The files read now, by name: their index in `todo` and `parsed`.
        let mut read_now: HashMap<&str, usize> = HashMap::default();
        for (fi, ((name, _, fp), (defs, problems))) in todo.iter().zip(parsed).enumerate() {
            out.problems.extend(problems);
            let (refs, c): (Vec<ObjRef>, Vec<Option<Change>>) =
                defs.into_iter().map(|(r, c)| (r, Some(c))).unzip();
            self.book.add(name, *fp, refs.into_boxed_slice());
            changes.push(c);
            read_now.insert(name.as_str(), fi);
        }
        // What to send, in object order: a deletion, or the parsed definition that holds.
        out.changes.reserve(affected.len());
        for (r, before) in &affected {
            let definers = self.book.definers(r);
            if let (Some((first, j)), Some((file, i))) = (definers.first(), definers.get(1)) {
                out.problems.push(Problem::new(
                    format!("{file} object {}", i + 1),
                    format!(
                        "{} is defined again; keeping the first definition ({first} object {})",
                        r.describe(),
                        j + 1
                    ),
                ));
            }
            match definers.into_iter().next() {
                None => out.changes.push(deleted(r)),
                Some((file, pos)) => match read_now.get(&*file) {
                    Some(&fi) => {
                        let c = changes
                            .get_mut(fi)
                            .and_then(|c| c.get_mut(pos as usize)?.take());
                        out.changes.extend(c);
                    }
                    // Held by a file not read now: read it again if the holder changed.
                    None if before.as_ref().map(|b| &b.0) != Some(&file) => {
                        self.forced.insert(file.to_string());
                    }
                    None => {}
                },
            }
        }
        drop(changes);
        if !self.forced.is_empty() {
            let more = self.poll()?;
            out.changes.extend(more.changes);
            out.problems.extend(more.problems);
            out.parsed += more.parsed;
        }
        Ok(out)
    }
}

/// Parse `files` on up to `threads` threads and hand each result to `f` in name order: file
/// `i` as soon as it and every file before it are parsed. A file whose parse thread died is
/// handed over empty.
fn parse_in_order(
    cfg: &ModelConfig,
    threads: usize,
    files: &[Todo],
    mut f: impl FnMut(usize, Parsed) -> Result<(), ManifestError>,
) -> Result<(), ManifestError> {
    let threads = threads.min(files.len()).max(1);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let (done_tx, done_rx) = std::sync::mpsc::channel::<(usize, Parsed)>();
    std::thread::scope(|s| {
        for _ in 0..threads {
            let done_tx = done_tx.clone();
            let next = &next;
            s.spawn(move || loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some((name, path, _)) = files.get(i) else {
                    return;
                };
                if done_tx.send((i, parse_file(name, path, cfg))).is_err() {
                    return;
                }
            });
        }
        drop(done_tx);
        let mut ready: BTreeMap<usize, Parsed> = BTreeMap::new();
        let mut at = 0;
        while at < files.len() {
            match done_rx.recv() {
                Ok((i, p)) => {
                    ready.insert(i, p);
                }
                // Every parse thread is gone: what is still missing is empty.
                Err(_) => (at..files.len()).for_each(|i| {
                    ready.entry(i).or_default();
                }),
            }
            while let Some(p) = ready.remove(&at) {
                f(at, p)?;
                at += 1;
            }
        }
        Ok(())
    })
}

/// Load every manifest under `dir`. Every Node is kept (a `kubectl get nodes -o yaml` dump
/// of the whole cluster is the normal input); the model picks this node's own by name.
pub fn load_dir(dir: &Path) -> Result<(Objects, Vec<Problem>), ManifestError> {
    let files = yaml_files(dir)?;
    let mut loader = Loader::default();
    for (name, path) in files {
        match fs::read_to_string(&path) {
            Ok(text) => loader.load_str(&name, &text),
            Err(e) => loader.problem(&name, format!("cannot read: {e}")),
        }
    }
    Ok((loader.objects, loader.problems))
}

/// Parse the documents of one YAML text (`origin` names it in problems) into `objects`.
pub fn load_str(origin: &str, text: &str, objects: &mut Objects, problems: &mut Vec<Problem>) {
    let mut loader = Loader {
        objects: std::mem::take(objects),
        ..Loader::default()
    };
    loader.load_str(origin, text);
    *objects = loader.objects;
    problems.append(&mut loader.problems);
}

#[derive(Default)]
struct Loader {
    objects: Objects,
    problems: Vec<Problem>,
    /// Keep every Node definition (the caller deals with duplicates).
    keep_duplicate_nodes: bool,
    /// Read every document with serde_yaml (the tests' reference).
    serde_yaml_only: bool,
}

/// Read `v` into `got` as the object its `apiVersion` and `kind` name (a Node with its
/// origin in `node_origins`); `false` when the fast path does not read that kind or `v`
/// does not fit its type. Read as the other paths would read it: a document of its own as
/// serde_yaml's typed path ([`Loader::load_typed`]) does, a list's item or a Node as its
/// generic path does (through a `serde_yaml::Value`).
fn lite_read(
    got: &mut Objects,
    node_origins: &mut Vec<String>,
    v: yaml::Value<'_>,
    origin: impl FnOnce() -> String,
    item: bool,
) -> bool {
    fn typed<T: serde::de::DeserializeOwned>(v: yaml::Value<'_>, item: bool) -> Option<T> {
        if item {
            v.deserialize_as_value()
        } else {
            v.deserialize()
        }
    }
    let Some(kinds) = lite_kinds(v) else {
        return false;
    };
    match kinds {
        ("v1", "Service") => typed(v, item).map(|o| got.services.push(o)).is_some(),
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            typed(v, item).map(|o| got.slices.push(o)).is_some()
        }
        ("v1", "Pod") => typed(v, item).map(|o| got.pods.push(o)).is_some(),
        ("v1", "Node") => v
            .deserialize_as_value()
            .map(|o| {
                got.nodes.push(o);
                node_origins.push(origin());
            })
            .is_some(),
        _ => false,
    }
}

/// A node's `apiVersion` and `kind`.
fn lite_kinds(v: yaml::Value<'_>) -> Option<(&str, &str)> {
    Some((v.get("apiVersion")?.as_str()?, v.get("kind")?.as_str()?))
}

impl Loader {
    fn problem(&mut self, origin: &str, reason: impl Into<String>) {
        let p = Problem::new(origin, reason);
        log::warn!("{p}");
        self.problems.push(p);
    }

    fn load_str(&mut self, file: &str, text: &str) {
        self.each_document(file, text, |_| {});
    }

    /// Load the documents of `text` one by one, handing the loader to `after` after each.
    fn each_document(&mut self, file: &str, text: &str, mut after: impl FnMut(&mut Self)) {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text); // a byte order mark
        let mut index = 0;
        for doc in split_documents(text) {
            if is_blank(doc) {
                continue;
            }
            index += 1;
            self.load_document(&format!("{file} document {index}"), doc);
            after(self);
        }
    }

    /// One document (`origin` names it in problems): the fast reader, serde_yaml's typed
    /// path, and its generic path, which reports what the others declined.
    fn load_document(&mut self, origin: &str, doc: &str) {
        if self.load_lite(origin, doc) || self.load_typed(doc) {
            return;
        }
        let parsed = serde_yaml::from_str::<Value>(doc).and_then(|mut v| {
            v.apply_merge()?; // `<<: *anchor` merge keys, as kubectl understands them
            Ok(v)
        });
        match parsed {
            Ok(v) => self.load_value(origin, v, None),
            Err(e) => self.problem(origin, format!("invalid YAML: {e}")),
        }
    }

    /// The fast path: the whole document through this crate's reader ([`yaml`]), an
    /// object of a kind the agent reads or a `kind: List` of them. It declines (loads
    /// nothing, returns `false`) when the document is outside the reader's subset, holds
    /// another kind or a typed list, or an object does not fit its type; the paths below
    /// then read it again and report its problems.
    fn load_lite(&mut self, origin: &str, doc: &str) -> bool {
        if self.serde_yaml_only || doc.contains("<<") {
            return false;
        }
        let Some(d) = yaml::Doc::parse(doc) else {
            return false;
        };
        let root = d.root();
        let (mut got, mut node_origins) = (Objects::default(), Vec::new());
        let read = if lite_kinds(root) == Some(("v1", "List")) {
            let items = match root.get("items") {
                None => Some(None),
                Some(v) => v.items().map(Some),
            };
            let Some(items) = items else {
                return false;
            };
            items.into_iter().flatten().enumerate().all(|(i, v)| {
                let origin = || format!("{origin} item {}", i + 1);
                lite_read(&mut got, &mut node_origins, v, origin, true)
            })
        } else {
            lite_read(
                &mut got,
                &mut node_origins,
                root,
                || origin.to_string(),
                false,
            )
        };
        if !read {
            return false;
        }
        for mut s in got.services {
            default_namespace(&mut s.metadata);
            self.objects.services.push(s);
        }
        for mut s in got.slices {
            default_namespace(&mut s.metadata);
            self.objects.slices.push(s);
        }
        for mut p in got.pods {
            default_namespace(&mut p.metadata);
            self.objects.pods.push(p);
        }
        for (n, origin) in got.nodes.into_iter().zip(node_origins) {
            self.add_node(&origin, n);
        }
        true
    }

    /// The next path for a plain object of a known kind: serde_yaml straight into its type,
    /// without the generic YAML value in between. Anything else (lists, merge keys, an error) is left to the generic path, which
    /// reports problems; returns whether it was loaded.
    fn load_typed(&mut self, doc: &str) -> bool {
        if doc.contains("<<") {
            return false;
        }
        let Some(kinds) = sniff(doc) else {
            return false;
        };
        match kinds {
            ("v1", "Service") => serde_yaml::from_str::<Service>(doc).is_ok_and(|mut s| {
                default_namespace(&mut s.metadata);
                self.objects.services.push(s);
                true
            }),
            ("discovery.k8s.io/v1", "EndpointSlice") => serde_yaml::from_str::<EndpointSlice>(doc)
                .is_ok_and(|mut s| {
                    default_namespace(&mut s.metadata);
                    self.objects.slices.push(s);
                    true
                }),
            ("v1", "Pod") => serde_yaml::from_str::<Pod>(doc).is_ok_and(|mut p| {
                default_namespace(&mut p.metadata);
                self.objects.pods.push(p);
                true
            }),
            _ => false,
        }
    }

    /// `defaults`: (apiVersion, kind) of a typed list's items, which omit them.
    fn load_value(&mut self, origin: &str, v: Value, defaults: Option<(&str, &str)>) {
        let mut map = match v {
            Value::Null => return,
            Value::Mapping(m) => m,
            _ => {
                self.problem(origin, "not a Kubernetes object (expected a mapping)");
                return;
            }
        };
        if let Some((api, kind)) = defaults {
            for (field, value) in [("apiVersion", api), ("kind", kind)] {
                let key = Value::from(field);
                if map.get(&key).is_none_or(Value::is_null) {
                    map.insert(key, Value::from(value));
                }
            }
        }
        let api = str_field(&map, "apiVersion");
        let kind = str_field(&map, "kind");
        match (api.as_deref(), kind.as_deref()) {
            (Some("v1"), Some("Service")) => {
                if let Some(mut s) = self.parse::<Service>(origin, map, "Service") {
                    default_namespace(&mut s.metadata);
                    self.objects.services.push(s);
                }
            }
            (Some("discovery.k8s.io/v1"), Some("EndpointSlice")) => {
                if let Some(mut s) = self.parse::<EndpointSlice>(origin, map, "EndpointSlice") {
                    default_namespace(&mut s.metadata);
                    self.objects.slices.push(s);
                }
            }
            (Some("v1"), Some("Pod")) => {
                if let Some(mut p) = self.parse::<Pod>(origin, map, "Pod") {
                    default_namespace(&mut p.metadata);
                    self.objects.pods.push(p);
                }
            }
            (Some("v1"), Some("Node")) => {
                if let Some(n) = self.parse::<Node>(origin, map, "Node") {
                    self.add_node(origin, n);
                }
            }
            (Some(api), Some(kind)) if kind.ends_with("List") => {
                let items = match map.remove(Value::from("items")) {
                    Some(Value::Sequence(items)) => items,
                    None | Some(Value::Null) => Vec::new(),
                    Some(_) => {
                        self.problem(origin, format!("{kind}: items is not a list"));
                        return;
                    }
                };
                // `kind: List` items name their own kind; a ServiceList's items do not.
                let item_kind = kind.strip_suffix("List").filter(|k| !k.is_empty());
                for (i, item) in items.into_iter().enumerate() {
                    let origin = format!("{origin} item {}", i + 1);
                    self.load_value(&origin, item, item_kind.map(|k| (api, k)));
                }
            }
            (Some(api), Some(kind)) => {
                self.problem(origin, format!("unsupported kind {kind} ({api}); ignored"))
            }
            _ => self.problem(origin, "not a Kubernetes object (no apiVersion/kind)"),
        }
    }

    fn parse<T: serde::de::DeserializeOwned>(
        &mut self,
        origin: &str,
        map: Mapping,
        kind: &str,
    ) -> Option<T> {
        let name = map
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(Value::as_str)
            .map(str::to_string);
        match serde_yaml::from_value::<T>(Value::Mapping(map)) {
            Ok(t) => Some(t),
            Err(e) => {
                let what = match name {
                    Some(n) => format!("invalid {kind} {n:?}: {e}"),
                    None => format!("invalid {kind}: {e}"),
                };
                self.problem(origin, what);
                None
            }
        }
    }

    fn add_node(&mut self, origin: &str, node: Node) {
        let name = node.metadata.name.clone().unwrap_or_default();
        if !self.keep_duplicate_nodes
            && self
                .objects
                .nodes
                .iter()
                .any(|n| n.metadata.name.as_deref() == Some(name.as_str()))
        {
            self.problem(
                origin,
                format!("Node {name} is defined again; keeping the first definition"),
            );
            return;
        }
        self.objects.nodes.push(node);
    }
}

/// `(apiVersion, kind)` of a document from its top-level lines, when both are plain
/// scalars there.
fn sniff(doc: &str) -> Option<(&str, &str)> {
    let (mut api, mut kind) = (None, None);
    for line in doc.lines() {
        if line.starts_with([' ', '\t', '#', '-']) {
            continue;
        }
        if let Some(v) = line.strip_prefix("kind:") {
            kind = Some(scalar(v)?);
        } else if let Some(v) = line.strip_prefix("apiVersion:") {
            api = Some(scalar(v)?);
        }
    }
    Some((api?, kind?))
}

/// A plain scalar value as written after `key:` (quotes and a trailing comment removed).
fn scalar(v: &str) -> Option<&str> {
    let v = v.split(" #").next().unwrap_or("").trim();
    let v = v
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
        .unwrap_or(v);
    (!v.is_empty()).then_some(v)
}

fn str_field(map: &Mapping, field: &str) -> Option<String> {
    map.get(field).and_then(Value::as_str).map(str::to_string)
}

fn default_namespace(meta: &mut ObjectMeta) {
    if meta.namespace.as_deref().is_none_or(str::is_empty) {
        meta.namespace = Some(DEFAULT_NAMESPACE.to_string());
    }
}

/// Split a YAML stream into documents at `---` lines (and after `...` end markers), so one
/// broken document does not hide the others. The text after `---` on its line belongs to the
/// next document (`--- # comment`, `--- !tag`).
fn split_documents(text: &str) -> Vec<&str> {
    let mut docs = Vec::new();
    let mut start = 0;
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let bare = line.trim_end_matches(['\n', '\r']);
        let is_start = bare == "---" || bare.starts_with("--- ") || bare.starts_with("---\t");
        let is_end = bare == "..." || bare.starts_with("... ");
        if is_start {
            docs.push(&text[start..offset]);
            start = offset + 3;
        } else if is_end {
            docs.push(&text[start..offset]);
            start = offset + line.len();
        }
        offset += line.len();
    }
    docs.push(&text[start..]);
    docs
}

/// Only whitespace and comments.
fn is_blank(doc: &str) -> bool {
    doc.lines().all(|l| {
        let l = l.trim();
        l.is_empty() || l.starts_with('#')
    })
}

#[cfg(test)]
mod tests {
    //! The fast reader ([`yaml`]) against serde_yaml: where it reads a document, the objects
    //! and problems are the ones serde_yaml gives, document by document.
    use super::*;

    /// What a loader holds, in full.
    fn held(l: &Loader) -> String {
        format!("{:?} {:?}", l.objects, l.problems)
    }

    /// Reads `doc` both ways and compares; returns whether the fast reader took it.
    fn compare(doc: &str) -> bool {
        compare_counted(doc).0
    }

    /// [`compare`], and whether serde_yaml read it without a problem.
    fn compare_counted(doc: &str) -> (bool, bool) {
        let mut reference = Loader {
            serde_yaml_only: true,
            keep_duplicate_nodes: true,
            ..Loader::default()
        };
        reference.load_str("t.yaml", doc);
        let mut lite = Loader {
            keep_duplicate_nodes: true,
            ..Loader::default()
        };
        let took = lite.load_lite("t.yaml document 1", doc);
        if took {
            assert_eq!(
                held(&lite),
                held(&reference),
                "the fast reader differs on:\n{doc}\n{doc:?}"
            );
        }
        let mut both = Loader {
            keep_duplicate_nodes: true,
            ..Loader::default()
        };
        both.load_str("t.yaml", doc);
        assert_eq!(
            held(&both),
            held(&reference),
            "the loader differs on:\n{doc}"
        );
        (took, reference.problems.is_empty())
    }

    const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata:\n  name: svc-7\n  namespace: bench\nspec:\n  type: ClusterIP\n  clusterIP: 10.96.0.7\n  ports:\n  - name: p80\n    port: 80\n    protocol: TCP\n    targetPort: 8080\n";

    fn slice() -> String {
        let mut y = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: svc-7-abcde\n  namespace: bench\n  labels:\n    kubernetes.io/service-name: svc-7\naddressType: IPv4\nports:\n- name: p80\n  port: 8080\n  protocol: TCP\nendpoints:\n".to_string();
        for k in 0..3 {
            y.push_str(&format!(
                "- addresses: [\"10.128.0.{k}\"]\n  conditions: {{ready: true}}\n  nodeName: bench-node\n"
            ));
        }
        y
    }

    fn data_documents() -> Vec<(String, String)> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
        let mut docs = Vec::new();
        for (name, path) in yaml_files(&dir).expect("the test data") {
            let text = fs::read_to_string(path).expect("a test data file");
            for d in split_documents(&text) {
                if !is_blank(d) {
                    docs.push((name.clone(), d.to_string()));
                }
            }
        }
        docs
    }

    #[test]
    fn the_fast_reader_takes_the_bench_and_kubectl_documents_and_agrees() {
        assert!(compare(SERVICE));
        assert!(compare(&slice()));
        let docs = data_documents();
        assert!(docs.len() >= 9, "the test data: {} documents", docs.len());
        for (name, d) in &docs {
            // kubectl's own output (managedFields, `k:{...}` keys, lists) is in the subset.
            assert!(compare(d), "{name} was not taken by the fast reader");
        }
    }

    #[test]
    fn scalars_resolve_as_serde_yaml_resolves_them() {
        // (targetPort as written, taken by the fast reader)
        let cases = [
            ("8080", true),
            ("\"8080\"", true),
            ("'8080'", true),
            ("http", true),
            ("\"h\\u0074tp\"", true),
            ("'it''s'", true),
            ("0", true),
            ("~", true),
            ("null", true),
            ("", true),
            ("true", false),
            ("8080 # the pod's port", true),
            ("0x1F", false),
            ("010", true),
            ("+80", false),
            ("1e3", false),
            (".inf", false),
            ("&a 80", false),
            ("!!str 80", false),
            ("|\n      80", false),
            ("80\n      81", false),
            ("[80]", false),
            ("{a: 1}", false),
            ("\"80", false),
        ];
        for (tp, taken) in cases {
            let doc = SERVICE.replace("targetPort: 8080", &format!("targetPort: {tp}"));
            assert_eq!(compare(&doc), taken, "targetPort: {tp}");
        }
        // Strings as other fields hold them, and flow collections.
        for (from, to, taken) in [
            ("name: p80", "name: \"yes\"", true),
            ("name: p80", "name: no", true),
            ("name: p80", "name: ~", true),
            ("name: p80", "name:", true),
            ("name: p80", "name: 'a # b'", true),
            ("name: p80", "name: a#b", true),
            ("name: p80", "name: a: b", false),
            ("port: 80", "port: \"80\"", false),
            ("port: 80", "port: -1", true),
            ("port: 80", "port: 99999999999", false),
            ("type: ClusterIP", "type: ClusterIP # comment", true),
            ("  ports:\n", "  ports: # comment\n", true),
            (
                "namespace: bench",
                "namespace: bench\n  namespace: other",
                false,
            ),
            (
                "  - name: p80\n    port: 80\n    protocol: TCP\n    targetPort: 8080\n",
                "  - {name: p80, port: 80, protocol: TCP, targetPort: 8080}\n",
                true,
            ),
            (
                "  - name: p80\n    port: 80\n    protocol: TCP\n    targetPort: 8080\n",
                "  - {name: p80, port: 80, protocol: TCP, targetPort: 8080,}\n",
                false,
            ),
            ("spec:\n", "spec: # with a comment\n", true),
            (
                "metadata:\n  name: svc-7\n",
                "metadata: {name: svc-7, namespace: bench, labels: {\"a/b\": 'c'}}\nx:\n",
                true,
            ),
        ] {
            let doc = SERVICE.replace(from, to);
            assert_ne!(doc, SERVICE, "{to}");
            assert_eq!(compare(&doc), taken, "{to}");
        }
    }

    #[test]
    fn deeply_nested_documents_are_declined_not_a_stack_overflow() {
        let flow = format!("{SERVICE}  x: {}{}\n", "[".repeat(1_000), "]".repeat(1_000));
        let compact = format!("{SERVICE}  x:\n  {}y\n", "- ".repeat(1_000));
        let mut block = format!("{SERVICE}  x:\n");
        for i in 0..300 {
            block += &format!("{}  k:\n", " ".repeat(i));
        }
        for doc in [flow, compact, block] {
            assert!(
                !compare(&doc),
                "a document nested this deep is left to serde_yaml"
            );
        }
    }

    /// A small deterministic generator (xorshift64*).
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n.max(1)
        }
    }

    /// Random edits of real documents (characters, YAML indicators, whole lines): wherever
    /// the fast reader takes the result, serde_yaml reads the same, and the loader's
    /// result is always serde_yaml's. 12,000 edited documents.
    #[test]
    fn randomly_edited_documents_read_the_same_both_ways() {
        let pieces = [
            " ", "  ", ":", ": ", "- ", "-", "#", " #", "\"", "'", "\n", "\n  ", "[", "]", "{",
            "}", ",", "~", "&a ", "*a", "!!str ", "|", ">", "0x1F", "1e3", "null", "true", "\t",
            "\\", "\\u00e9", "?", "%", "@", "`", "010", "\"\"", "''", "{}", "[]", "\r",
        ];
        let mut seeds = vec![SERVICE.to_string(), slice()];
        seeds.extend(data_documents().into_iter().map(|(_, d)| d));
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let (mut taken, mut total) = (0usize, 0usize);
        for _ in 0..12_000 {
            let mut doc = seeds[rng.below(seeds.len())].clone();
            for _ in 0..1 + rng.below(3) {
                let lines: Vec<&str> = doc.split_inclusive('\n').collect();
                let mut at = rng.below(doc.len());
                while !doc.is_char_boundary(at) {
                    at -= 1;
                }
                doc = match rng.below(6) {
                    0 => {
                        let mut d = doc.clone();
                        d.insert_str(at, pieces[rng.below(pieces.len())]);
                        d
                    }
                    1 => {
                        let mut d = doc.clone();
                        if let Some(c) = d[at..].chars().next() {
                            d.replace_range(at..at + c.len_utf8(), "");
                        }
                        d
                    }
                    2 => {
                        let mut l = lines.clone();
                        let (i, j) = (rng.below(l.len()), rng.below(l.len()));
                        l.swap(i, j);
                        l.concat()
                    }
                    3 => {
                        let mut l: Vec<String> = lines.iter().map(|s| s.to_string()).collect();
                        let i = rng.below(l.len());
                        l[i] = format!("{}{}", " ".repeat(1 + rng.below(2)), l[i]);
                        l.concat()
                    }
                    4 => {
                        let mut l: Vec<String> = lines.iter().map(|s| s.to_string()).collect();
                        let i = rng.below(l.len());
                        let dup = l[i].clone();
                        l.insert(rng.below(l.len()), dup);
                        l.concat()
                    }
                    _ => {
                        let mut l: Vec<String> = lines.iter().map(|s| s.to_string()).collect();
                        let i = rng.below(l.len());
                        l[i] = l[i].strip_prefix(' ').unwrap_or(&l[i]).to_string();
                        l.concat()
                    }
                };
                if doc.is_empty() {
                    doc = SERVICE.to_string();
                }
            }
            let (took, valid) = compare_counted(&doc);
            taken += usize::from(took);
            total += usize::from(valid);
        }
        // Many edits leave a valid document: the fast reader must have taken most of them.
        assert!(
            taken * 2 > total,
            "the fast reader took {taken} of the {total} valid"
        );
        eprintln!("the fast reader took {taken} of the {total} valid documents");
    }
}
