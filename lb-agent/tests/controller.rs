//! The incremental controller against the full recompute: randomized sequences of events
//! (adds, changes, deletes, re-lists of every kind) are fed to a [`Controller`] object by
//! object, and after every reconcile
//! - its desired state must equal `model::compute` of the same objects, and every frontend
//!   that changed must be among those it reports;
//! - the maps written by the incremental path (only the reported frontends handed to the
//!   syncer, then a flush) must equal the maps a full recompute writes (`compute`, then a
//!   full-diff `Syncer::apply`), and no operation of the incremental path may leave a master
//!   pointing at a missing slot or backend.
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use lb_agent::dataplane::{MemDataplane, MemOp};
use lb_agent::ports::{desired_ports, with_snat};
use lb_agent::sync::{Limits, Syncer};
use lb_common::{Backend4, Frontend4Key};

use lb_agent::controller::{Changes, Controller, Key, ListKind};
use lb_agent::model::{self, Desired, ModelConfig, NodeView, PodView, ServiceView, SliceView};
use support::random::{Event, EventKind, Rng, World, NODE};

/// One object of a streamed list, applied.
/// Feed `objects` (upserts) as one streamed list of `kind`, reconciling now and then.
fn stream_list(
    c: &mut Controller,
    kind: ListKind,
    objects: Vec<Event>,
    rng: &mut Rng,
    reported: &mut Option<Changes>,
) {
    c.begin_list(kind);
    for e in &objects {
        feed(c, e, rng);
        if rng.chance(20) {
            merge(reported.get_or_insert_with(Changes::default), c.reconcile());
        }
    }
    c.end_list(kind);
}

/// Add `more` to `into` (reported frontends, and either's flags).
fn merge(into: &mut Changes, more: Changes) {
    into.frontends.extend(more.frontends);
    into.frontends.sort();
    into.frontends.dedup();
    into.nodes |= more.nodes;
    into.health_checks |= more.health_checks;
}

/// Feed one event to the controller, as the agent's sources do. A re-list is streamed as
/// the Kubernetes source sends it (begin, the objects, end) with a reconcile every few
/// objects, as the agent reconciles while a list arrives; what those reconciles report is
/// returned (the caller hands it to the syncer with the next reconcile's).
pub fn feed(c: &mut Controller, e: &Event, rng: &mut Rng) -> Option<Changes> {
    let cfg = c.config().clone();
    let mut reported = None;
    let stream =
        matches!(e, Event::Relist(EventKind::Slice | EventKind::Service, _)) && rng.chance(50);
    match e {
        Event::Service(ns, name, Some(s)) => {
            let _ = (ns, name);
            c.upsert_service(ServiceView::new(s, &cfg))
        }
        Event::Service(ns, name, None) => c.delete_service(ns, name),
        Event::Slice(ns, name, Some(s)) => c.upsert_slice(ns, name, SliceView::new(s, &cfg)),
        Event::Slice(ns, name, None) => c.delete_slice(ns, name),
        Event::Pod(_, _, Some(p)) => c.upsert_pod(PodView::new(p, &cfg)),
        Event::Pod(ns, name, None) => c.delete_pod(ns, name),
        Event::Node(_, Some(n)) => c.upsert_node(NodeView::new(n)),
        Event::Node(name, None) => c.delete_node(name),
        Event::Relist(EventKind::Slice, w) if stream => stream_list(
            c,
            ListKind::Slices,
            w.slices
                .iter()
                .map(|((ns, n), s)| Event::Slice(ns.clone(), n.clone(), Some(Box::new(s.clone()))))
                .collect(),
            rng,
            &mut reported,
        ),
        Event::Relist(EventKind::Service, w) if stream => stream_list(
            c,
            ListKind::Services,
            w.services
                .iter()
                .map(|((ns, n), s)| {
                    Event::Service(ns.clone(), n.clone(), Some(Box::new(s.clone())))
                })
                .collect(),
            rng,
            &mut reported,
        ),
        Event::Relist(kind, w) => match kind {
            EventKind::Service => c.replace_services(
                w.services
                    .values()
                    .map(|s| ServiceView::new(s, &cfg))
                    .collect(),
            ),
            EventKind::Slice => c.replace_slices(
                w.slices
                    .iter()
                    .map(|((ns, n), s)| {
                        (Key::new(ns.as_str(), n.as_str()), SliceView::new(s, &cfg))
                    })
                    .collect(),
            ),
            EventKind::Pod => {
                c.replace_pods(w.pods.values().map(|p| PodView::new(p, &cfg)).collect())
            }
            EventKind::Node => c.replace_nodes(w.nodes.values().map(NodeView::new).collect()),
        },
    }
    reported
}

/// `model::compute` with its problems sorted and deduplicated, as the controller gives them.
fn expected(w: &World, cfg: &ModelConfig) -> Desired {
    let mut d = model::compute(&w.objects(), cfg);
    d.problems
        .sort_by(|a, b| (&a.object, &a.reason).cmp(&(&b.object, &b.reason)));
    d.problems.dedup();
    d
}

fn changed_frontends(a: &Desired, b: &Desired) -> BTreeSet<model::FrontendId> {
    let keys: BTreeSet<_> = a
        .frontends
        .keys()
        .chain(b.frontends.keys())
        .copied()
        .collect();
    keys.into_iter()
        .filter(|k| a.frontends.get(k) != b.frontends.get(k))
        .collect()
}

fn check_equal(got: &Desired, want: &Desired, context: &str) {
    if got == want {
        return;
    }
    let diff: Vec<_> = changed_frontends(got, want)
        .into_iter()
        .map(|k| (k, got.frontends.get(&k), want.frontends.get(&k)))
        .collect();
    panic!(
        "{context}: incremental != full recompute\nfrontends differing (id, incremental, full): \
         {diff:#?}\nproblems: {:#?}\nvs {:#?}\nhealth: {:?}\nvs {:?}\nnodes: {:?} {:?} {:?} {:?}\nvs {:?} {:?} {:?} {:?}",
        got.problems,
        want.problems,
        got.health_checks,
        want.health_checks,
        got.node_addrs,
        got.primary_addr,
        got.peer_nodes,
        got.node_warning,
        want.node_addrs,
        want.primary_addr,
        want.peer_nodes,
        want.node_warning,
    );
}

/// What the random worlds went through (so the test is known to cover these cases).
#[derive(Debug, Default)]
struct Coverage {
    conflicts: usize,
    health_checks: usize,
    terminating: usize,
    local_only: usize,
    internal_scope: usize,
    host_ports: usize,
    merged_flags: usize,
    problems: usize,
    max_frontends: usize,
}

impl Coverage {
    fn record(&mut self, d: &Desired) {
        use lb_common::service::flags;
        self.conflicts += d
            .problems
            .iter()
            .filter(|p| p.reason.contains("conflicts with"))
            .count();
        self.health_checks += d.health_checks.len();
        self.problems += d.problems.len();
        self.max_frontends = self.max_frontends.max(d.frontends.len());
        for (id, fe) in &d.frontends {
            self.terminating += usize::from(fe.backends.iter().any(|b| b.terminating));
            self.local_only += usize::from(fe.flags & flags::EXT_LOCAL != 0);
            self.internal_scope += usize::from(id.scope == model::Scope::Internal);
            self.host_ports += usize::from(fe.flags & flags::HOSTPORT != 0);
            self.merged_flags +=
                usize::from(fe.flags.count_ones() > 1 && fe.flags & flags::EXT_LOCAL == 0);
        }
    }

    fn assert_covered(&self) {
        let c = self;
        assert!(
            [
                c.conflicts,
                c.health_checks,
                c.terminating,
                c.local_only,
                c.internal_scope,
                c.host_ports,
                c.merged_flags,
                c.problems
            ]
            .iter()
            .all(|n| *n > 0)
                && c.max_frontends >= 10,
            "the random worlds miss a case: {c:?}"
        );
    }
}

/// The maps as the datapath reads them: master key -> (flags, affinity, backends in slot
/// order), and the node addresses. Panics on an entry no frontend reaches (a slot beyond the
/// count, a backend no slot points at) or a slot that points nowhere.
type MapView = (
    BTreeMap<Frontend4Key, (u16, u32, Vec<Backend4>)>,
    BTreeSet<Ipv4Addr>,
);

fn map_view(dp: &MemDataplane, context: &str) -> MapView {
    let mut out = BTreeMap::new();
    let mut used = BTreeSet::new();
    for (k, m) in dp.services.iter().filter(|(k, _)| k.slot == 0) {
        let mut bs = Vec::new();
        for slot in 1..=m.count {
            let sv = dp
                .services
                .get(&k.with_slot(slot))
                .unwrap_or_else(|| panic!("{context}: {k:?} slot {slot} missing"));
            let b = dp.backends.get(&sv.backend_id).unwrap_or_else(|| {
                panic!(
                    "{context}: {k:?} slot {slot} -> missing backend {}",
                    sv.backend_id
                )
            });
            used.insert(sv.backend_id);
            bs.push(*b);
        }
        out.insert(*k, (m.flags, m.affinity_timeout_s, bs));
    }
    for k in dp.services.keys().filter(|k| k.slot != 0) {
        let master = dp.services.get(&k.with_slot(0));
        assert!(
            master.is_some_and(|m| k.slot <= m.count),
            "{context}: stray slot {k:?}"
        );
    }
    let unused: Vec<_> = dp.backends.keys().filter(|id| !used.contains(id)).collect();
    assert!(
        unused.is_empty(),
        "{context}: unreferenced backends {unused:?}"
    );
    (out, dp.node_addrs.clone())
}

/// After every operation in `log` (applied over `initial`), every master's slots exist and
/// point at backends that exist.
fn replay(initial: &MemDataplane, log: &[MemOp], context: &str) {
    let mut s = initial.services.clone();
    let mut b = initial.backends.clone();
    for (i, op) in log.iter().enumerate() {
        match op {
            MemOp::PutService(k, v) => {
                s.insert(*k, *v);
            }
            MemOp::DeleteService(k) => {
                s.remove(k);
            }
            MemOp::PutBackend(id, v) => {
                b.insert(*id, *v);
            }
            MemOp::DeleteBackend(id) => {
                b.remove(id);
            }
            MemOp::PutNodeAddr(_) | MemOp::DeleteNodeAddr(_) => {}
        }
        for (k, v) in s.iter().filter(|(k, _)| k.slot == 0) {
            for slot in 1..=v.count {
                let ok = s
                    .get(&k.with_slot(slot))
                    .is_some_and(|sv| sv.backend_id != 0 && b.contains_key(&sv.backend_id));
                assert!(
                    ok,
                    "{context}: after op {i} ({op:?}): {k:?} slot {slot} dangles"
                );
            }
        }
    }
}

/// The incremental sync and the full one, side by side.
struct Maps {
    inc: Syncer,
    inc_dp: MemDataplane,
    full: Syncer,
    full_dp: MemDataplane,
    /// Backends the prewrites put.
    prewritten: usize,
}

impl Maps {
    fn new() -> Self {
        // Few svc ids: some frontends run out and are programmed uncounted.
        let limits = Limits {
            svc_ids: 40,
            ..Limits::default()
        };
        Self {
            inc: Syncer::new(limits),
            inc_dp: MemDataplane::default(),
            full: Syncer::new(limits),
            full_dp: MemDataplane::default(),
            prewritten: 0,
        }
    }

    fn check(
        &mut self,
        c: &Controller,
        changes: &lb_agent::controller::Changes,
        want: &Desired,
        context: &str,
    ) {
        for id in &changes.frontends {
            // The agent's path: the controller's output itself, shared.
            let shared = c.frontend_shared(id);
            assert_eq!(shared.as_deref(), c.frontend(id).as_deref(), "{context}");
            self.inc.set_frontend_shared(*id, shared);
        }
        self.inc.set_node_addrs(c.node_addrs());
        // As the agent does while its first lists arrive (here at every step): new
        // identities' backends first. They are unreachable: only backend puts, to ids that
        // were free.
        let before = self.inc_dp.clone();
        let r = self.inc.prewrite_new_backends(&mut self.inc_dp);
        assert!(r.is_ok(), "{context}: {:?}", r.failures);
        self.prewritten += r.puts;
        for op in &self.inc_dp.log {
            assert!(
                matches!(op, MemOp::PutBackend(id, _) if !before.backends.contains_key(id)),
                "{context}: prewrite wrote {op:?}"
            );
        }
        replay(&before, &self.inc_dp.log, context);
        self.inc_dp.log.clear();
        // Like the agent: flush, and again right away while something waits (a frontend
        // that was programmed without a counter slot gets one freed by this flush).
        for _ in 0..3 {
            let before = self.inc_dp.clone();
            let start = self.inc_dp.log.len();
            let r = self.inc.flush(&mut self.inc_dp);
            assert!(r.is_ok(), "{context}: {:?}", r.failures);
            replay(&before, &self.inc_dp.log[start..], context);
            self.inc_dp.log.clear();
            if self.inc.pending() == 0 {
                break;
            }
        }
        let r = self.full.apply(want, &mut self.full_dp);
        assert!(r.is_ok(), "{context}: {:?}", r.failures);
        self.full_dp.log.clear();
        let inc = map_view(&self.inc_dp, context);
        let full = map_view(&self.full_dp, context);
        if inc != full {
            let keys: BTreeSet<_> = inc.0.keys().chain(full.0.keys()).collect();
            let diff: Vec<_> = keys
                .into_iter()
                .filter(|k| inc.0.get(k) != full.0.get(k))
                .map(|k| (k, inc.0.get(k), full.0.get(k)))
                .collect();
            panic!(
                "{context}: incremental maps != full recompute maps: {diff:#?}\nnode addrs {:?} vs {:?}",
                inc.1, full.1
            );
        }
        assert_eq!(self.inc.pending(), 0, "{context}");
        assert_eq!(
            self.inc.entry_counts(),
            self.full.entry_counts(),
            "{context}"
        );
        // The port filter's reference counts match the ports of a full recompute.
        let snat = 61000..=61001;
        assert_eq!(
            with_snat(self.inc.ports().all(), self.inc.frontend_count() > 0, &snat),
            desired_ports(want, &snat),
            "{context}: port filter"
        );
    }
}

fn run(seed: u64, events: usize, cfg: &ModelConfig) -> usize {
    run_covering(seed, events, cfg, &mut Coverage::default())
}

fn run_covering(seed: u64, events: usize, cfg: &ModelConfig, cov: &mut Coverage) -> usize {
    let mut rng = Rng::new(seed);
    let mut world = World::default();
    let mut c = Controller::new(cfg.clone());
    let mut prev = expected(&world, cfg);
    let mut maps = Maps::new();
    let mut done = 0;
    while done < events {
        // A batch of events between two reconciles, as the agent drains its queue.
        let batch = 1 + rng.below(4);
        let mut log = Vec::new();
        let mut early: Option<Changes> = None;
        for _ in 0..batch {
            let e = world.random_event(&mut rng);
            world.apply(&e);
            if let Some(ch) = feed(&mut c, &e, &mut rng) {
                merge(early.get_or_insert_with(Changes::default), ch);
            }
            log.push(e);
            done += 1;
        }
        let streamed = early.is_some();
        let mut changes = early.unwrap_or_default();
        merge(&mut changes, c.reconcile());
        let got = c.desired();
        let want = expected(&world, cfg);
        let context = format!("seed {seed}, after event {done}; last batch {log:#?}");
        check_equal(&got, &want, &context);
        let reported: BTreeSet<_> = changes.frontends.iter().copied().collect();
        let missed: Vec<_> = changed_frontends(&prev, &want)
            .into_iter()
            .filter(|k| !reported.contains(k))
            .collect();
        assert!(
            missed.is_empty(),
            "{context}: changed but not reported: {missed:?}"
        );
        // (Reconciles in the middle of a streamed list may report a change that a later
        // object undid.)
        if !streamed || prev.health_checks != want.health_checks {
            assert_eq!(
                changes.health_checks,
                prev.health_checks != want.health_checks,
                "{context}: health check change flag"
            );
        }
        let nodes = |d: &Desired| {
            (
                d.node_addrs.clone(),
                d.primary_addr,
                d.own_node_found,
                d.peer_nodes.clone(),
                d.node_warning.clone(),
            )
        };
        if nodes(&prev) != nodes(&want) {
            assert!(changes.nodes, "{context}: node change not reported");
        }
        assert_eq!(c.frontend_count(), want.frontends.len(), "{context}");
        assert_eq!(c.problem_count(), want.problems.len(), "{context}");
        maps.check(&c, &changes, &want, &context);
        cov.record(&want);
        prev = want;
    }
    assert!(
        maps.prewritten > 0,
        "seed {seed}: no prewrite wrote anything"
    );
    done
}

#[test]
fn incremental_model_equals_full_recompute_over_random_events() {
    let cfg = ModelConfig::new(NODE);
    let mut total = 0;
    let mut cov = Coverage::default();
    for seed in 0..24 {
        total += run_covering(seed, 500, &cfg, &mut cov);
    }
    assert!(total >= 10_000, "{total} events");
    cov.assert_covered();
    eprintln!("{total} events; coverage {cov:?}");
}

#[test]
fn incremental_model_equals_full_recompute_with_extra_node_addresses() {
    let mut cfg = ModelConfig::new(NODE);
    cfg.extra_node_addrs = vec![Ipv4Addr::new(192, 168, 1, 99)];
    cfg.nodeport_range = 30000..=30002;
    for seed in 100..104 {
        run(seed, 500, &cfg);
    }
}

#[test]
fn unnamed_node_takes_a_single_node_as_its_own() {
    let cfg = ModelConfig::default();
    for seed in 200..202 {
        run(seed, 300, &cfg);
    }
}
