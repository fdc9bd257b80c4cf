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
use std::fs;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_yaml::{Mapping, Value};

use crate::model::{Objects, Problem, DEFAULT_NAMESPACE};

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

/// Load every manifest under `dir`. Every Node is kept (a `kubectl get nodes -o yaml` dump
/// of the whole cluster is the normal input); the model picks this node's own by name.
pub fn load_dir(dir: &Path) -> Result<(Objects, Vec<Problem>), ManifestError> {
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
}

impl Loader {
    fn problem(&mut self, origin: &str, reason: impl Into<String>) {
        let p = Problem::new(origin, reason);
        log::warn!("{p}");
        self.problems.push(p);
    }

    fn load_str(&mut self, file: &str, text: &str) {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text); // a byte order mark
        let mut index = 0;
        for doc in split_documents(text) {
            if is_blank(doc) {
                continue;
            }
            index += 1;
            let origin = format!("{file} document {index}");
            let parsed = serde_yaml::from_str::<Value>(doc).and_then(|mut v| {
                v.apply_merge()?; // `<<: *anchor` merge keys, as kubectl understands them
                Ok(v)
            });
            match parsed {
                Ok(v) => self.load_value(&origin, v, None),
                Err(e) => self.problem(&origin, format!("invalid YAML: {e}")),
            }
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
        if self
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
