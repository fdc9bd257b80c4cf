//! The incremental model: the same [`Desired`] state as [`model::compute`], kept up to date
//! object by object.
//!
//! Events change the stored views ([`ServiceView`], [`SliceView`], [`PodView`],
//! [`NodeView`]) and mark what they affect dirty: a Service itself, the Service an
//! EndpointSlice names (`kubernetes.io/service-name`), a Pod (whose hostPorts are its
//! frontends), the Nodes. [`Controller::reconcile`] then runs the pure per-Service reconcile
//! ([`model::service_frontends`]) for the dirty Services only, keeps its output (the
//! frontends it claims) cached, and resolves again only the frontends whose claims changed:
//! the oldest claimant holds a frontend, as in the full recompute. It returns those
//! frontends, so the sync writes only them.
//!
//! Problems are counted per source (a Service, a Pod, the Nodes, a contested frontend, the
//! health checks) and logged once when they first appear.
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use smallvec::SmallVec;

use crate::hash::{HashMap, HashSet};
use crate::model::{
    self, AgeKey, Cx, Desired, Frontend, FrontendId, HealthCandidate, HealthCheck, ModelConfig,
    Name, NodeState, NodeView, PodView, Problem, Proto, Scope, ServiceView, SliceView,
};

/// `(namespace, name)` of a namespaced object.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    pub namespace: Name,
    pub name: Name,
}

impl Key {
    pub fn new(namespace: impl Into<Name>, name: impl Into<Name>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

/// Who claims a frontend: a Service or a Pod, and which of its frontends (its index in the
/// claimant's output, which is also the order of its own claims).
#[derive(Debug, Clone, PartialEq, Eq)]
struct ClaimRef {
    claimant: Claimant,
    seq: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Claimant {
    Service(Arc<Key>),
    Pod(Arc<Key>),
}

/// The claims on one frontend, oldest claimant first: the first holds it.
#[derive(Debug, Default)]
struct Claims {
    claims: SmallVec<[ClaimRef; 1]>,
    /// The holder's flags, with those of its own equal claims added.
    flags: u16,
}

#[derive(Debug)]
struct ServiceEntry {
    key: Arc<Key>,
    view: ServiceView,
    /// The frontends it claims (its reconcile output, cached), each shared with the sync
    /// ([`Controller::frontend_shared`]) rather than copied.
    outputs: Box<[(FrontendId, Arc<Frontend>)]>,
    /// Its problems and its slices', as registered in the problem counts.
    problems: Box<[Problem]>,
    /// Its ready endpoints on this node (for its healthCheckNodePort).
    local_endpoints: usize,
}

#[derive(Debug)]
struct PodEntry {
    key: Arc<Key>,
    view: PodView,
}

/// Owned [`AgeKey`] of a Service, for the ordered set of health check candidates.
type ServiceAge = (bool, Option<Time>, Name, Name);

fn service_age(v: &ServiceView) -> ServiceAge {
    (
        v.created.is_none(),
        v.created.clone(),
        v.namespace.clone(),
        v.name.clone(),
    )
}

/// Problems counted by how many sources report them.
#[derive(Debug, Default)]
struct ProblemSet {
    counts: HashMap<Problem, u32>,
}

impl ProblemSet {
    fn add(&mut self, list: &[Problem]) {
        for p in list {
            let n = self.counts.entry(p.clone()).or_default();
            if *n == 0 {
                log::warn!("{p}");
            }
            *n += 1;
        }
    }

    fn remove(&mut self, list: &[Problem]) {
        for p in list {
            if let Some(n) = self.counts.get_mut(p) {
                *n -= 1;
                if *n == 0 {
                    self.counts.remove(p);
                }
            }
        }
    }

    /// Replace the problems a source reported (`old`) with `new`.
    fn replace(&mut self, old: &mut Vec<Problem>, new: Vec<Problem>) {
        if *old != new {
            self.add(&new);
            self.remove(old);
            *old = new;
        }
    }
}

/// What one [`Controller::reconcile`] changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    /// Frontends whose holder or content may have changed (sorted); each is either a
    /// [`Controller::frontend`] now or gone.
    pub frontends: Vec<FrontendId>,
    /// The node state (addresses, primary address, peers, own Node, warning) changed.
    pub nodes: bool,
    /// The healthCheckNodePorts changed.
    pub health_checks: bool,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.frontends.is_empty() && !self.nodes && !self.health_checks
    }
}

/// The incremental model. See the module docs.
#[derive(Debug)]
pub struct Controller {
    cfg: ModelConfig,
    services: HashMap<Arc<Key>, ServiceEntry>,
    /// IPv4 EndpointSlices by (namespace, service name), sorted by slice name.
    slices: HashMap<Key, Vec<SliceView>>,
    /// The Service each stored slice (namespace, slice name) names.
    slice_service: HashMap<Key, Name>,
    pods: HashMap<Arc<Key>, PodEntry>,
    nodes: BTreeMap<String, NodeView>,
    frontends: HashMap<FrontendId, Claims>,
    /// Conflict problems of contested frontends.
    conflicts: HashMap<FrontendId, Vec<Problem>>,
    problems: ProblemSet,
    dirty_services: HashSet<Key>,
    touched: BTreeSet<FrontendId>,
    nodes_dirty: bool,
    node_state: NodeState,
    node_problems: Vec<Problem>,
    /// Services asking for a healthCheckNodePort, oldest first.
    health_candidates: BTreeMap<ServiceAge, Arc<Key>>,
    /// The valid ports they ask for, with how many ask for each.
    health_ports: HashMap<u16, u32>,
    health_dirty: bool,
    health_checks: BTreeMap<u16, HealthCheck>,
    health_problems: Vec<Problem>,
    /// Kinds being listed: the objects the list has not delivered yet (deleted when it ends).
    unlisted: Unlisted,
}

/// A kind of object, as listed by a source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListKind {
    Services,
    Slices,
    Pods,
    Nodes,
}

/// Per kind being listed: the objects held before the list began that it has not delivered
/// yet. Empty (nothing to find) on the first list.
#[derive(Debug, Default)]
struct Unlisted {
    services: Option<HashSet<Key>>,
    slices: Option<HashSet<Key>>,
    pods: Option<HashSet<Key>>,
    nodes: Option<HashSet<String>>,
}

impl Unlisted {
    fn seen(set: &mut Option<HashSet<Key>>, namespace: &str, name: &str) {
        if let Some(set) = set.as_mut().filter(|s| !s.is_empty()) {
            set.remove(&Key::new(namespace, name));
        }
    }
}

impl Controller {
    pub fn new(cfg: ModelConfig) -> Self {
        let mut c = Self {
            cfg,
            services: HashMap::default(),
            slices: HashMap::default(),
            slice_service: HashMap::default(),
            pods: HashMap::default(),
            nodes: BTreeMap::new(),
            frontends: HashMap::default(),
            conflicts: HashMap::default(),
            problems: ProblemSet::default(),
            dirty_services: HashSet::default(),
            touched: BTreeSet::new(),
            nodes_dirty: true,
            node_state: NodeState::default(),
            node_problems: Vec::new(),
            health_candidates: BTreeMap::new(),
            health_ports: HashMap::default(),
            health_dirty: false,
            health_checks: BTreeMap::new(),
            health_problems: Vec::new(),
            unlisted: Unlisted::default(),
        };
        c.reconcile_nodes();
        c.nodes_dirty = true;
        c
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    // -----------------------------------------------------------------------------------
    // Events

    /// A Service was added or changed.
    pub fn upsert_service(&mut self, view: ServiceView) {
        Unlisted::seen(&mut self.unlisted.services, &view.namespace, &view.name);
        let key = Key::new(view.namespace.clone(), view.name.clone());
        let found = self.services.get(&key).map(|e| {
            (
                e.key.clone(),
                e.view == view,
                e.view.created != view.created,
            )
        });
        let arc = match found {
            Some((_, true, _)) => return,
            Some((arc, false, age_changed)) => {
                self.forget_candidate(&arc);
                if age_changed {
                    // The claim order changes: claim again from scratch.
                    let outputs = self
                        .services
                        .get_mut(&key)
                        .map(|e| std::mem::take(&mut e.outputs))
                        .unwrap_or_default();
                    self.unclaim(&Claimant::Service(arc.clone()), &outputs);
                }
                if let Some(e) = self.services.get_mut(&key) {
                    e.view = view;
                }
                arc
            }
            None => {
                let arc = Arc::new(key.clone());
                self.services.insert(
                    arc.clone(),
                    ServiceEntry {
                        key: arc.clone(),
                        view,
                        outputs: Box::default(),
                        problems: Box::default(),
                        local_endpoints: 0,
                    },
                );
                arc
            }
        };
        self.remember_candidate(&arc);
        self.dirty_services.insert(key);
    }

    /// A Service was deleted.
    pub fn delete_service(&mut self, namespace: &str, name: &str) {
        Unlisted::seen(&mut self.unlisted.services, namespace, name);
        let key = Key::new(namespace, name);
        let Some(arc) = self.services.get(&key).map(|e| e.key.clone()) else {
            return;
        };
        self.forget_candidate(&arc);
        if let Some(e) = self.services.remove(&key) {
            self.unclaim(&Claimant::Service(arc), &e.outputs);
            self.problems.remove(&e.problems);
        }
        self.dirty_services.remove(&key);
    }

    /// Add the Service `key` to the health check candidates if it asks for a
    /// healthCheckNodePort.
    fn remember_candidate(&mut self, key: &Arc<Key>) {
        let Some(e) = self.services.get(&**key) else {
            return;
        };
        if let Some(port) = e.view.health_check() {
            self.health_candidates
                .insert(service_age(&e.view), key.clone());
            if let Ok(port) = port {
                *self.health_ports.entry(port).or_default() += 1;
            }
            self.health_dirty = true;
        }
    }

    /// Remove the Service `key` from the health check candidates.
    fn forget_candidate(&mut self, key: &Arc<Key>) {
        let Some(e) = self.services.get(&**key) else {
            return;
        };
        if let Some(port) = e.view.health_check() {
            self.health_candidates.remove(&service_age(&e.view));
            if let Ok(port) = port {
                if let Some(n) = self.health_ports.get_mut(&port) {
                    *n -= 1;
                    if *n == 0 {
                        self.health_ports.remove(&port);
                    }
                }
            }
            self.health_dirty = true;
        }
    }

    /// An EndpointSlice was added or changed; `view` is `None` when the model ignores it
    /// (not IPv4, no `kubernetes.io/service-name`).
    pub fn upsert_slice(&mut self, namespace: &str, name: &str, view: Option<SliceView>) {
        Unlisted::seen(&mut self.unlisted.slices, namespace, name);
        let Some(view) = view else {
            self.delete_slice(namespace, name);
            return;
        };
        let skey = Key::new(namespace, name);
        if let Some(old_svc) = self.slice_service.get(&skey) {
            let owner = Key::new(namespace, old_svc.as_str());
            if *old_svc == view.service {
                if let Some(list) = self.slices.get_mut(&owner) {
                    if let Ok(i) = list.binary_search_by(|s| s.name.as_str().cmp(name)) {
                        if list[i] == view {
                            return;
                        }
                        list[i] = view;
                        self.dirty_services.insert(owner);
                        return;
                    }
                }
            }
            self.delete_slice(namespace, name);
        }
        let owner = Key::new(namespace, view.service.as_str());
        self.slice_service.insert(skey, view.service.clone());
        let list = self.slices.entry(owner.clone()).or_default();
        match list.binary_search_by(|s| s.name.as_str().cmp(name)) {
            Ok(i) => list[i] = view,
            Err(i) => {
                // Most Services have one slice: no room for four.
                list.reserve_exact(1);
                list.insert(i, view)
            }
        }
        self.dirty_services.insert(owner);
    }

    /// An EndpointSlice was deleted.
    pub fn delete_slice(&mut self, namespace: &str, name: &str) {
        Unlisted::seen(&mut self.unlisted.slices, namespace, name);
        let Some(svc) = self.slice_service.remove(&Key::new(namespace, name)) else {
            return;
        };
        let owner = Key::new(namespace, svc);
        if let Some(list) = self.slices.get_mut(&owner) {
            if let Ok(i) = list.binary_search_by(|s| s.name.as_str().cmp(name)) {
                list.remove(i);
            }
            if list.is_empty() {
                self.slices.remove(&owner);
            }
        }
        self.dirty_services.insert(owner);
    }

    /// A Pod was added or changed.
    pub fn upsert_pod(&mut self, view: PodView) {
        Unlisted::seen(&mut self.unlisted.pods, &view.namespace, &view.name);
        let key = Key::new(view.namespace.clone(), view.name.clone());
        if self.pods.get(&key).is_some_and(|e| e.view == view) {
            return;
        }
        self.delete_pod(&key.namespace, &key.name);
        let key = Arc::new(key);
        let ids: Vec<FrontendId> = view.frontends.iter().map(|(id, _)| *id).collect();
        self.problems.add(&view.problems);
        self.pods.insert(
            key.clone(),
            PodEntry {
                key: key.clone(),
                view,
            },
        );
        self.claim(&Claimant::Pod(key), &ids);
    }

    /// A Pod was deleted.
    pub fn delete_pod(&mut self, namespace: &str, name: &str) {
        Unlisted::seen(&mut self.unlisted.pods, namespace, name);
        let Some(e) = self.pods.remove(&Key::new(namespace, name)) else {
            return;
        };
        self.problems.remove(&e.view.problems);
        self.unclaim(&Claimant::Pod(e.key.clone()), &e.view.frontends);
    }

    /// A Node was added or changed.
    pub fn upsert_node(&mut self, view: NodeView) {
        if let Some(set) = self.unlisted.nodes.as_mut() {
            set.remove(&view.name);
        }
        if self.nodes.get(&view.name) != Some(&view) {
            self.nodes.insert(view.name.clone(), view);
            self.nodes_dirty = true;
        }
    }

    /// A Node was deleted.
    pub fn delete_node(&mut self, name: &str) {
        if let Some(set) = self.unlisted.nodes.as_mut() {
            set.remove(name);
        }
        if self.nodes.remove(name).is_some() {
            self.nodes_dirty = true;
        }
    }

    /// A complete list of `kind` begins: its objects follow as upserts (and deletes), applied
    /// as they arrive, and [`Controller::end_list`] deletes those held before that the list
    /// did not deliver. A list that begins again (a retried or expired one) starts over.
    pub fn begin_list(&mut self, kind: ListKind) {
        let u = &mut self.unlisted;
        match kind {
            ListKind::Services => {
                u.services = Some(self.services.keys().map(|k| (**k).clone()).collect())
            }
            ListKind::Slices => u.slices = Some(self.slice_service.keys().cloned().collect()),
            ListKind::Pods => u.pods = Some(self.pods.keys().map(|k| (**k).clone()).collect()),
            ListKind::Nodes => u.nodes = Some(self.nodes.keys().cloned().collect()),
        }
    }

    /// The list of `kind` is complete: the objects it did not deliver are gone.
    pub fn end_list(&mut self, kind: ListKind) {
        match kind {
            ListKind::Services => {
                for k in self.unlisted.services.take().unwrap_or_default() {
                    self.delete_service(&k.namespace, &k.name);
                }
            }
            ListKind::Slices => {
                for k in self.unlisted.slices.take().unwrap_or_default() {
                    self.delete_slice(&k.namespace, &k.name);
                }
            }
            ListKind::Pods => {
                for k in self.unlisted.pods.take().unwrap_or_default() {
                    self.delete_pod(&k.namespace, &k.name);
                }
            }
            ListKind::Nodes => {
                for n in self.unlisted.nodes.take().unwrap_or_default() {
                    self.delete_node(&n);
                }
            }
        }
    }

    /// Every Service is now `views` (a full list): the others are deleted.
    pub fn replace_services(&mut self, views: Vec<ServiceView>) {
        self.begin_list(ListKind::Services);
        for v in views {
            self.upsert_service(v);
        }
        self.end_list(ListKind::Services);
    }

    /// Every EndpointSlice is now `slices` (a full list of (namespace, name, view)).
    pub fn replace_slices(&mut self, slices: Vec<(Key, Option<SliceView>)>) {
        self.begin_list(ListKind::Slices);
        for (k, v) in slices {
            self.upsert_slice(&k.namespace, &k.name, v);
        }
        self.end_list(ListKind::Slices);
    }

    /// Every Pod is now `views`.
    pub fn replace_pods(&mut self, views: Vec<PodView>) {
        self.begin_list(ListKind::Pods);
        for v in views {
            self.upsert_pod(v);
        }
        self.end_list(ListKind::Pods);
    }

    /// Every Node is now `views`.
    pub fn replace_nodes(&mut self, views: Vec<NodeView>) {
        self.begin_list(ListKind::Nodes);
        for v in views {
            self.upsert_node(v);
        }
        self.end_list(ListKind::Nodes);
    }

    // -----------------------------------------------------------------------------------
    // Claims

    fn claim(&mut self, claimant: &Claimant, ids: &[FrontendId]) {
        for (seq, id) in ids.iter().enumerate() {
            let claims = &mut self.frontends.entry(*id).or_default().claims;
            // Most frontends have one claimant, kept inline; more spill to the heap.
            claims.push(ClaimRef {
                claimant: claimant.clone(),
                seq: seq as u32,
            });
            self.touched.insert(*id);
        }
    }

    fn unclaim<F>(&mut self, claimant: &Claimant, outputs: &[(FrontendId, F)]) {
        for (seq, (id, _)) in outputs.iter().enumerate() {
            if let Some(c) = self.frontends.get_mut(id) {
                c.claims
                    .retain(|r| !(r.seq == seq as u32 && r.claimant == *claimant));
            }
            self.touched.insert(*id);
        }
    }

    /// The output a claim refers to.
    fn claimed(&self, r: &ClaimRef) -> Option<(&Frontend, AgeKey<'_>, String)> {
        match &r.claimant {
            Claimant::Service(k) => {
                let e = self.services.get(&**k)?;
                let (_, fe) = e.outputs.get(r.seq as usize)?;
                Some((&**fe, e.view.age(), e.view.object()))
            }
            Claimant::Pod(k) => {
                let e = self.pods.get(&**k)?;
                let (_, fe) = e.view.frontends.get(r.seq as usize)?;
                Some((fe, e.view.age(), e.view.object()))
            }
        }
    }

    /// Order the claims of `id` and find its holder's flags and the conflicts.
    fn resolve(&mut self, id: FrontendId) {
        let Some(mut c) = self.frontends.remove(&id) else {
            self.set_conflicts(id, Vec::new());
            return;
        };
        if c.claims.is_empty() {
            self.set_conflicts(id, Vec::new());
            return;
        }
        if c.claims.len() > 1 {
            let mut keyed: Vec<(AgeKey<'_>, u32, usize)> = c
                .claims
                .iter()
                .enumerate()
                .filter_map(|(i, r)| Some((self.claimed(r)?.1, r.seq, i)))
                .collect();
            keyed.sort();
            let order: Vec<usize> = keyed.into_iter().map(|(_, _, i)| i).collect();
            c.claims = order.iter().map(|i| c.claims[*i].clone()).collect();
        }
        let mut problems = Vec::new();
        let mut flags = 0;
        if let Some((first, _, _)) = self.claimed(&c.claims[0]) {
            flags = first.flags;
            for r in &c.claims[1..] {
                let Some((fe, _, object)) = self.claimed(r) else {
                    continue;
                };
                if model::same_claim(first, fe) {
                    flags |= fe.flags;
                } else {
                    problems.push(Problem::new(
                        object,
                        model::conflict_reason(&id, fe, &first.owner),
                    ));
                }
            }
        }
        c.flags = flags;
        self.frontends.insert(id, c);
        self.set_conflicts(id, problems);
    }

    fn set_conflicts(&mut self, id: FrontendId, problems: Vec<Problem>) {
        if problems.is_empty() {
            if let Some(old) = self.conflicts.remove(&id) {
                self.problems.remove(&old);
            }
        } else {
            let mut old = self.conflicts.remove(&id).unwrap_or_default();
            self.problems.replace(&mut old, problems);
            self.conflicts.insert(id, old);
        }
    }

    // -----------------------------------------------------------------------------------
    // Reconcile

    /// Reconcile what the events since the last call made dirty; returns what changed.
    pub fn reconcile(&mut self) -> Changes {
        let mut changes = Changes::default();
        if self.nodes_dirty {
            changes.nodes = self.reconcile_nodes();
        }
        // While the EndpointSlices are being listed, a Service none of whose slices has
        // arrived yet waits for them (or for the end of the list): reconciled now, it would
        // be reconciled again as soon as they came (on a first list, every Service).
        // Taken, not drained: after a list of 100k Services the set would keep its table.
        let all = std::mem::take(&mut self.dirty_services);
        let dirty: Vec<Key> = if self.unlisted.slices.is_some() {
            let (now, later): (Vec<Key>, Vec<Key>) = all
                .into_iter()
                .partition(|k| self.slices.contains_key(k) || !self.services.contains_key(k));
            self.dirty_services.extend(later);
            now
        } else {
            all.into_iter().collect()
        };
        for key in dirty {
            self.reconcile_service(&key);
        }
        let touched = std::mem::take(&mut self.touched);
        for id in &touched {
            self.resolve(*id);
            // A TCP frontend on every node address takes the port from a health check.
            if id.addr.is_unspecified()
                && id.proto == Proto::Tcp
                && id.scope == Scope::External
                && self.health_ports.contains_key(&id.port)
            {
                self.health_dirty = true;
            }
        }
        if self.health_dirty {
            changes.health_checks = self.reconcile_health_checks();
        }
        changes.frontends = touched.into_iter().collect();
        changes
    }

    fn reconcile_nodes(&mut self) -> bool {
        self.nodes_dirty = false;
        let mut cx = Cx::quiet(&self.cfg);
        let state = model::node_state(self.nodes.values(), &mut cx);
        let mut old = std::mem::take(&mut self.node_problems);
        self.problems.replace(&mut old, cx.problems);
        self.node_problems = old;
        let changed = state != self.node_state;
        self.node_state = state;
        changed
    }

    fn reconcile_service(&mut self, key: &Key) {
        let Some(e) = self.services.get(key) else {
            return;
        };
        let slices: Vec<&SliceView> = self
            .slices
            .get(key)
            .map(|l| l.iter().collect())
            .unwrap_or_default();
        let mut cx = Cx::quiet(&self.cfg);
        let outputs = model::service_frontends(&e.view, &slices, &mut cx);
        let local = if e.view.health_check().is_some() {
            model::local_endpoints(&slices)
        } else {
            0
        };
        let problems = cx.problems;
        let Some(e) = self.services.get_mut(key) else {
            return;
        };
        if local != e.local_endpoints {
            e.local_endpoints = local;
            self.health_dirty = true;
        }
        if *e.problems != *problems {
            self.problems.add(&problems);
            self.problems.remove(&e.problems);
            e.problems = problems.into_boxed_slice();
        }
        let unchanged = e.outputs.len() == outputs.len()
            && e.outputs
                .iter()
                .zip(&outputs)
                .all(|(a, b)| a.0 == b.0 && *a.1 == b.1);
        if unchanged {
            return;
        }
        // Cached for the Service's lifetime: no spare capacity (a collect could reuse the
        // larger allocation of `outputs`).
        let mut shared = Vec::with_capacity(outputs.len());
        shared.extend(outputs.into_iter().map(|(id, fe)| (id, Arc::new(fe))));
        let outputs = shared.into_boxed_slice();
        let claimant = Claimant::Service(e.key.clone());
        let old = std::mem::replace(&mut e.outputs, outputs);
        let same_ids =
            old.len() == e.outputs.len() && old.iter().zip(&e.outputs).all(|(a, b)| a.0 == b.0);
        if same_ids {
            // The claims stay (same frontends, same order): only their content changed.
            let changed: Vec<FrontendId> = old
                .iter()
                .zip(&e.outputs)
                .filter(|(a, b)| a.1 != b.1)
                .map(|(a, _)| a.0)
                .collect();
            self.touched.extend(changed);
        } else {
            let ids: Vec<FrontendId> = e.outputs.iter().map(|(id, _)| *id).collect();
            self.unclaim(&claimant, &old);
            self.claim(&claimant, &ids);
        }
    }

    fn reconcile_health_checks(&mut self) -> bool {
        self.health_dirty = false;
        let mut cx = Cx::quiet(&self.cfg);
        let candidates = self.health_candidates.values().filter_map(|k| {
            let e = self.services.get(&**k)?;
            Some(HealthCandidate {
                namespace: &e.view.namespace,
                name: &e.view.name,
                port: e.view.health_check()?,
                local_endpoints: e.local_endpoints,
            })
        });
        let checks = model::health_checks(candidates, |id| self.holder(id), &mut cx);
        let mut old = std::mem::take(&mut self.health_problems);
        self.problems.replace(&mut old, cx.problems);
        self.health_problems = old;
        let changed = checks != self.health_checks;
        self.health_checks = checks;
        changed
    }

    // -----------------------------------------------------------------------------------
    // The desired state

    /// The holder's own frontend (its flags not merged).
    fn holder(&self, id: &FrontendId) -> Option<&Frontend> {
        let c = self.frontends.get(id)?;
        Some(self.claimed(c.claims.first()?)?.0)
    }

    /// The desired frontend `id`, as of the last [`Controller::reconcile`].
    pub fn frontend(&self, id: &FrontendId) -> Option<Cow<'_, Frontend>> {
        let c = self.frontends.get(id)?;
        let fe = self.claimed(c.claims.first()?)?.0;
        if fe.flags == c.flags {
            Some(Cow::Borrowed(fe))
        } else {
            Some(Cow::Owned(Frontend {
                flags: c.flags,
                ..fe.clone()
            }))
        }
    }

    /// [`Controller::frontend`], shared: the holder's cached output itself when it needs no
    /// other flags (a Service's frontend, almost always), so that the sync keeps no copy.
    pub fn frontend_shared(&self, id: &FrontendId) -> Option<Arc<Frontend>> {
        let c = self.frontends.get(id)?;
        if let Some(ClaimRef {
            claimant: Claimant::Service(k),
            seq,
        }) = c.claims.first()
        {
            let (_, fe) = self.services.get(&**k)?.outputs.get(*seq as usize)?;
            if fe.flags == c.flags {
                return Some(fe.clone());
            }
        }
        self.frontend(id).map(|fe| Arc::new(fe.into_owned()))
    }

    /// Every desired frontend, in no particular order.
    pub fn frontends(&self) -> impl Iterator<Item = (FrontendId, Cow<'_, Frontend>)> + '_ {
        self.frontends
            .keys()
            .filter_map(|id| Some((*id, self.frontend(id)?)))
    }

    /// How many frontends are desired.
    pub fn frontend_count(&self) -> usize {
        // `resolve` removes a frontend whose last claim went, so every entry has a holder.
        self.frontends.len()
    }

    pub fn node_addrs(&self) -> &BTreeSet<Ipv4Addr> {
        &self.node_state.node_addrs
    }

    pub fn primary_addr(&self) -> Option<Ipv4Addr> {
        self.node_state.primary_addr
    }

    pub fn own_node_found(&self) -> bool {
        self.node_state.own_node_found
    }

    pub fn node_warning(&self) -> Option<&str> {
        self.node_state.node_warning.as_deref()
    }

    pub fn peer_nodes(&self) -> &BTreeMap<String, Ipv4Addr> {
        &self.node_state.peer_nodes
    }

    pub fn health_checks(&self) -> &BTreeMap<u16, HealthCheck> {
        &self.health_checks
    }

    /// How many distinct problems there are.
    pub fn problem_count(&self) -> usize {
        self.problems.counts.len()
    }

    /// The whole desired state as [`model::compute`] gives it (problems sorted), for tests
    /// and `status`.
    pub fn desired(&self) -> Desired {
        let mut problems: Vec<Problem> = self.problems.counts.keys().cloned().collect();
        problems.sort_by(|a, b| (&a.object, &a.reason).cmp(&(&b.object, &b.reason)));
        Desired {
            node_addrs: self.node_state.node_addrs.clone(),
            primary_addr: self.node_state.primary_addr,
            own_node_found: self.node_state.own_node_found,
            node_warning: self.node_state.node_warning.clone(),
            peer_nodes: self.node_state.peer_nodes.clone(),
            health_checks: self.health_checks.clone(),
            frontends: self
                .frontends()
                .map(|(id, fe)| (id, fe.into_owned()))
                .collect(),
            problems,
        }
    }
}
