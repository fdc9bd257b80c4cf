//! Tests of the sync against `MemDataplane`: what is written, in which order (every prefix
//! of the operation log keeps the datapath consistent), idempotence, adoption after a
//! restart, sweeping, full maps and id exhaustion.
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use lb_agent::dataplane::{Dataplane, DataplaneError, MemDataplane, MemOp};
use lb_agent::model::{Backend, Desired, Frontend, FrontendId, Proto};
use lb_agent::sync::{backend_value, frontend_key, Limits, SyncError, SyncReport, Syncer};
use lb_common::service::{backend_flags, flags};
use lb_common::{Backend4, Counter, Frontend4Key, Reason, Service4Value};

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

fn ip(s: &str) -> Ipv4Addr {
    s.parse().expect("test address")
}

fn fid(addr: &str, port: u16) -> FrontendId {
    FrontendId::new(ip(addr), port, Proto::Tcp)
}

fn be(addr: &str, port: u16) -> Backend {
    Backend {
        addr: ip(addr),
        port,
        remote: false,
        terminating: false,
    }
}

/// Backends 10.244.0.1..=n on port 8080.
fn bes(range: std::ops::RangeInclusive<u8>) -> Vec<Backend> {
    range.map(|i| be(&format!("10.244.0.{i}"), 8080)).collect()
}

fn frontend(backends: Vec<Backend>) -> Frontend {
    let mut backends = backends;
    backends.sort();
    backends.dedup();
    Frontend {
        flags: flags::CLUSTERIP,
        owner: "default/web:http".into(),
        backends,
        affinity_timeout_s: 0,
    }
}

fn desired(frontends: Vec<(FrontendId, Vec<Backend>)>, node_addrs: &[&str]) -> Desired {
    Desired {
        node_addrs: node_addrs.iter().map(|a| ip(a)).collect(),
        frontends: frontends
            .into_iter()
            .map(|(id, b)| (id, frontend(b)))
            .collect(),
        ..Desired::default()
    }
}

type Services = BTreeMap<Frontend4Key, Service4Value>;
type Backends = BTreeMap<u32, Backend4>;

/// The datapath invariant: every master's slots `1..=count` exist and point at backends
/// that exist.
fn invariant(s: &Services, b: &Backends) -> Result<(), String> {
    for (k, v) in s.iter().filter(|(k, _)| k.slot == 0) {
        for slot in 1..=v.count {
            let sk = k.with_slot(slot);
            let Some(sv) = s.get(&sk) else {
                return Err(format!("{k:?}: slot {slot} of {} missing", v.count));
            };
            if !b.contains_key(&sv.backend_id) {
                return Err(format!(
                    "{k:?}: slot {slot} -> missing backend {}",
                    sv.backend_id
                ));
            }
            if sv.backend_id == 0 {
                return Err(format!("{k:?}: slot {slot} -> backend id 0"));
            }
        }
    }
    Ok(())
}

/// Replay `log` over `initial` and check the invariant after every operation.
fn replay(initial: &MemDataplane, log: &[MemOp]) {
    let mut s = initial.services.clone();
    let mut b = initial.backends.clone();
    invariant(&s, &b).expect("initial state consistent");
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
        if let Err(e) = invariant(&s, &b) {
            panic!("after op {i} ({op:?}) of {log:#?}: {e}");
        }
    }
}

/// Apply and check every prefix of the operations it made.
fn apply(s: &mut Syncer, d: &Desired, dp: &mut MemDataplane) -> SyncReport {
    let initial = dp.clone();
    let start = dp.log.len();
    let r = s.apply(d, dp);
    replay(&initial, &dp.log[start..]);
    assert_eq!(
        r.puts + r.deletes,
        dp.log.len() - start,
        "report counts every op"
    );
    r
}

/// Frontends as the datapath sees them: master key -> (flags, backends in slot order).
fn decode(dp: &MemDataplane) -> BTreeMap<Frontend4Key, (u16, Vec<Backend4>)> {
    dp.services
        .iter()
        .filter(|(k, _)| k.slot == 0)
        .map(|(k, v)| {
            let list = (1..=v.count)
                .map(|slot| {
                    let id = dp.services[&k.with_slot(slot)].backend_id;
                    dp.backends[&id]
                })
                .collect();
            (*k, (v.flags, list))
        })
        .collect()
}

fn expected(d: &Desired) -> BTreeMap<Frontend4Key, (u16, Vec<Backend4>)> {
    d.frontends
        .iter()
        .map(|(id, fe)| {
            let list = fe
                .backends
                .iter()
                .map(|b| backend_value(b, id.proto))
                .collect();
            (frontend_key(id), (fe.flags, list))
        })
        .collect()
}

/// The maps hold exactly `d`: nothing missing, nothing extra.
fn assert_state(dp: &MemDataplane, d: &Desired) {
    assert_eq!(decode(dp), expected(d));
    let slots: usize = d.frontends.values().map(|f| f.backends.len() + 1).sum();
    assert_eq!(dp.services.len(), slots, "no stray service entries");
    let referenced: BTreeSet<u32> = dp
        .services
        .iter()
        .filter(|(k, _)| k.slot != 0)
        .map(|(_, v)| v.backend_id)
        .collect();
    assert_eq!(
        dp.backends.keys().copied().collect::<BTreeSet<_>>(),
        referenced,
        "no stray backends"
    );
    assert_eq!(dp.node_addrs, d.node_addrs);
}

fn ops_since(dp: &MemDataplane, start: usize) -> &[MemOp] {
    &dp.log[start..]
}

fn master_of(dp: &MemDataplane, id: &FrontendId) -> Service4Value {
    dp.services[&frontend_key(id)]
}

fn backend_id_of(dp: &MemDataplane, addr: &str, port: u16) -> u32 {
    let want = backend_value(&be(addr, port), Proto::Tcp);
    dp.backends
        .iter()
        .find(|(_, b)| b.addr == want.addr && b.port == want.port && b.proto == want.proto)
        .map(|(id, _)| *id)
        .unwrap_or_else(|| panic!("no backend {addr}:{port}"))
}

fn position(log: &[MemOp], pred: impl Fn(&MemOp) -> bool) -> usize {
    log.iter().position(pred).expect("op present")
}

fn is_master_put(op: &MemOp) -> bool {
    matches!(op, MemOp::PutService(k, _) if k.slot == 0)
}

// ---------------------------------------------------------------------------------------
// Basic mapping and ordering
// ---------------------------------------------------------------------------------------

#[test]
fn first_apply_writes_everything_in_safe_order() {
    let mut dp = MemDataplane::default();
    let mut s = Syncer::new(Limits::default());
    let d = desired(
        vec![
            (fid("10.96.0.10", 53), bes(1..=2)),
            (fid("10.96.0.11", 80), bes(2..=3)),
        ],
        &["192.168.1.10"],
    );
    let r = apply(&mut s, &d, &mut dp);
    assert!(r.is_ok(), "{:?}", r.failures);
    assert_state(&dp, &d);
    // Node address first, then all backends, then slots before masters.
    assert!(matches!(dp.log[0], MemOp::PutNodeAddr(_)));
    let last_backend = dp
        .log
        .iter()
        .rposition(|o| matches!(o, MemOp::PutBackend(..)))
        .expect("backends");
    let first_service = position(&dp.log, |o| matches!(o, MemOp::PutService(..)));
    assert!(last_backend < first_service);
    assert_eq!(dp.backends.len(), 3, "10.244.0.2 is shared");
    assert_eq!(r.puts, 1 + 3 + 3 + 3);
}

#[test]
fn entries_are_in_network_byte_order() {
    let mut dp = MemDataplane::default();
    let mut s = Syncer::new(Limits::default());
    let id = FrontendId::new(ip("10.96.0.10"), 53, Proto::Udp);
    let d = desired(vec![(id, vec![be("10.244.1.7", 5353)])], &[]);
    apply(&mut s, &d, &mut dp);
    let key = Frontend4Key::new(
        u32::from_be_bytes([10, 96, 0, 10]).to_be(),
        53u16.to_be(),
        17,
        0,
    );
    assert_eq!(frontend_key(&id), key);
    let master = dp.services[&key];
    assert_eq!(master.count, 1);
    assert_eq!(master.flags, flags::CLUSTERIP);
    let slot = dp.services[&key.with_slot(1)];
    let b = dp.backends[&slot.backend_id];
    assert_eq!(b.addr.to_ne_bytes(), [10, 244, 1, 7]);
    assert_eq!(b.port.to_ne_bytes(), 5353u16.to_be_bytes());
    assert_eq!(b.proto, lb_common::IPPROTO_UDP);
    assert_eq!(b.node_addr, 0);
}

#[test]
fn nodeport_frontend_key_uses_address_zero() {
    let id = FrontendId::new(Ipv4Addr::UNSPECIFIED, 30080, Proto::Tcp);
    let k = frontend_key(&id);
    assert_eq!(k.addr, 0);
    assert_eq!(k.port, 30080u16.to_be());
    assert_eq!(k.slot, 0);
}

#[test]
fn backend_flags_remote_and_terminating() {
    let b = Backend {
        remote: true,
        terminating: true,
        ..be("10.244.1.1", 80)
    };
    let v = backend_value(&b, Proto::Tcp);
    assert_eq!(v.flags, backend_flags::REMOTE | backend_flags::TERMINATING);
}

#[test]
fn second_apply_of_the_same_state_is_a_no_op() {
    let mut dp = MemDataplane::default();
    let mut s = Syncer::new(Limits::default());
    let d = desired(vec![(fid("10.96.0.10", 53), bes(1..=5))], &["192.168.1.10"]);
    apply(&mut s, &d, &mut dp);
    let n = dp.log.len();
    let r = apply(&mut s, &d, &mut dp);
    assert_eq!((r.puts, r.deletes), (0, 0));
    assert!(r.is_ok());
    assert_eq!(dp.log.len(), n);
}

#[test]
fn growing_writes_new_slots_then_master_and_keeps_backend_ids() {
    let mut dp = MemDataplane::default();
    let mut s = Syncer::new(Limits::default());
    let f = fid("10.96.0.10", 80);
    apply(&mut s, &desired(vec![(f, bes(1..=2))], &[]), &mut dp);
    let id1 = backend_id_of(&dp, "10.244.0.1", 8080);
    let svc_id = master_of(&dp, &f).svc_id;
    let start = dp.log.len();
    let d = desired(vec![(f, bes(1..=4))], &[]);
    apply(&mut s, &d, &mut dp);
    assert_state(&dp, &d);
    let ops = ops_since(&dp, start);
    let master = position(ops, is_master_put);
    assert_eq!(master, ops.len() - 1, "master last: {ops:#?}");
    assert_eq!(
        ops.iter()
            .filter(|o| matches!(o, MemOp::PutBackend(..)))
            .count(),
        2
    );
    assert_eq!(master_of(&dp, &f).count, 4);
    assert_eq!(master_of(&dp, &f).svc_id, svc_id);
    assert_eq!(backend_id_of(&dp, "10.244.0.1", 8080), id1);
}

#[test]
fn shrinking_writes_master_first_then_deletes_slots_then_backends() {
    let mut dp = MemDataplane::default();
    let mut s = Syncer::new(Limits::default());
    let f = fid("10.96.0.10", 80);
    apply(&mut s, &desired(vec![(f, bes(1..=4))], &[]), &mut dp);
    let start = dp.log.len();
    let d = desired(vec![(f, bes(1..=1))], &[]);
    apply(&mut s, &d, &mut dp);
    assert_state(&dp, &d);
    let ops = ops_since(&dp, start);
    assert!(is_master_put(&ops[0]), "{ops:#?}");
    let last_slot_delete = ops
        .iter()
        .rposition(|o| matches!(o, MemOp::DeleteService(_)))
        .expect("slot deletes");
    let first_backend_delete = position(ops, |o| matches!(o, MemOp::DeleteBackend(_)));
    assert!(last_slot_delete < first_backend_delete);
    assert_eq!(
        ops.iter()
            .filter(|o| matches!(o, MemOp::DeleteService(_)))
            .count(),
        3
    );
    assert_eq!(
        ops.iter()
            .filter(|o| matches!(o, MemOp::DeleteBackend(_)))
            .count(),
        3
    );
}

#[test]
fn replacing_every_backend_keeps_the_datapath_consistent() {
    let mut dp = MemDataplane::default();
    let mut s = Syncer::new(Limits::default());
    let f = fid("10.96.0.10", 80);
    apply(&mut s, &desired(vec![(f, bes(1..=3))], &[]), &mut dp);
    for d in [
        desired(vec![(f, bes(4..=6))], &[]),
        desired(vec![(f, bes(7..=8))], &[]),
        desired(vec![(f, bes(9..=12))], &[]),
        desired(vec![(f, bes(1..=1))], &[]),
    ] {
        let r = apply(&mut s, &d, &mut dp);
        assert!(r.is_ok());
        assert_state(&dp, &d);
    }
}

#[test]
fn removed_frontend_master_deleted_before_slots_backends_last() {
    let mut dp = MemDataplane::default();
    let mut s = Syncer::new(Limits::default());
    let (f1, f2) = (fid("10.96.0.10", 80), fid("10.96.0.11", 80));
    apply(
        &mut s,
        &desired(vec![(f1, bes(1..=2)), (f2, bes(3..=4))], &[]),
        &mut dp,
    );
    let start = dp.log.len();
    let d = desired(vec![(f2, bes(3..=4))], &[]);
    apply(&mut s, &d, &mut dp);
    assert_state(&dp, &d);
    let ops = ops_since(&dp, start);
    assert_eq!(ops[0], MemOp::DeleteService(frontend_key(&f1)));
    assert!(matches!(ops[1], MemOp::DeleteService(k) if k.slot != 0));
    assert!(matches!(ops[2], MemOp::DeleteService(k) if k.slot != 0));
    assert!(matches!(ops[3], MemOp::DeleteBackend(_)));
    assert!(matches!(ops[4], MemOp::DeleteBackend(_)));
    assert_eq!(ops.len(), 5);
}

#[test]
fn shared_backend_is_one_id_and_survives_removal_of_one_user() {
    let mut dp = MemDataplane::default();
    let mut s = Syncer::new(Limits::default());
    let (f1, f2) = (fid("10.96.0.10", 80), fid("10.96.0.11", 80));
    apply(
        &mut s,
        &desired(vec![(f1, bes(1..=1)), (f2, bes(1..=1))], &[]),
        &mut dp,
    );
    assert_eq!(dp.backends.len(), 1);
    let id = backend_id_of(&dp, "10.244.0.1", 8080);
    let d = desired(vec![(f2, bes(1..=1))], &[]);
    apply(&mut s, &d, &mut dp);
    assert_state(&dp, &d);
    assert_eq!(backend_id_of(&dp, "10.244.0.1", 8080), id);
}

#[test]
fn same_address_and_port_over_tcp_and_udp_are_two_backends() {
    let mut dp = MemDataplane::default();
    let mut s = Syncer::new(Limits::default());
    let tcp = FrontendId::new(ip("10.96.0.10"), 53, Proto::Tcp);
    let udp = FrontendId::new(ip("10.96.0.10"), 53, Proto::Udp);
    let d = desired(
        vec![
            (tcp, vec![be("10.244.0.3", 53)]),
            (udp, vec![be("10.244.0.3", 53)]),
        ],
        &[],
    );
    apply(&mut s, &d, &mut dp);
    assert_state(&dp, &d);
    assert_eq!(dp.backends.len(), 2);
    assert!(!dp.backends.contains_key(&0), "backend id 0 is never used");
}

#[test]
fn backend_flag_change_rewrites_only_the_backend() {
    let mut dp = MemDataplane::default();
    let mut s = Syncer::new(Limits::default());
    let f = fid("10.96.0.10", 80);
    apply(&mut s, &desired(vec![(f, bes(1..=2))], &[]), &mut dp);
    let start = dp.log.len();
    let mut d = desired(vec![(f, bes(1..=2))], &[]);
    for b in &mut d.frontends.get_mut(&f).expect("fe").backends {
        b.terminating = true;
    }
    apply(&mut s, &d, &mut dp);
    assert_state(&dp, &d);
    let ops = ops_since(&dp, start);
    assert_eq!(ops.len(), 2);
    assert!(ops.iter().all(|o| matches!(o, MemOp::PutBackend(..))));
}

#[test]
fn frontend_flag_change_rewrites_only_the_master() {
    let mut dp = MemDataplane::default();
    let mut s = Syncer::new(Limits::default());
    let f = FrontendId::new(Ipv4Addr::UNSPECIFIED, 30080, Proto::Tcp);
    let mut d = desired(vec![(f, bes(1..=2))], &[]);
    d.frontends.get_mut(&f).expect("fe").flags = flags::NODEPORT;
    apply(&mut s, &d, &mut dp);
    let start = dp.log.len();
    d.frontends.get_mut(&f).expect("fe").flags = flags::NODEPORT | flags::EXT_LOCAL;
    apply(&mut s, &d, &mut dp);
    assert_state(&dp, &d);
    let ops = ops_since(&dp, start);
    assert_eq!(ops.len(), 1);
    assert!(is_master_put(&ops[0]));
}

#[test]
fn frontend_without_backends_has_count_zero() {
    let mut dp = MemDataplane::default();
    let mut s = Syncer::new(Limits::default());
    let f = fid("10.96.0.10", 80);
    apply(&mut s, &desired(vec![(f, bes(1..=3))], &[]), &mut dp);
    let d = desired(vec![(f, vec![])], &[]);
    let r = apply(&mut s, &d, &mut dp);
    assert!(r.is_ok());
    assert_state(&dp, &d);
    assert_eq!(master_of(&dp, &f).count, 0);
    assert!(dp.backends.is_empty());
    assert_eq!(dp.services.len(), 1);
}

#[test]
fn node_addresses_put_first_and_deleted_last() {
    let mut dp = MemDataplane::default();
    let mut s = Syncer::new(Limits::default());
    let f = fid("10.96.0.10", 80);
    apply(
        &mut s,
        &desired(vec![(f, bes(1..=1))], &["192.168.1.10", "192.168.1.11"]),
        &mut dp,
    );
    let start = dp.log.len();
    let d = desired(vec![(f, bes(2..=2))], &["192.168.1.11", "192.168.1.12"]);
    apply(&mut s, &d, &mut dp);
    assert_state(&dp, &d);
    let ops = ops_since(&dp, start);
    assert_eq!(ops[0], MemOp::PutNodeAddr(ip("192.168.1.12")));
    assert_eq!(
        *ops.last().expect("ops"),
        MemOp::DeleteNodeAddr(ip("192.168.1.10"))
    );
}

// ---------------------------------------------------------------------------------------
// Restart, adoption, sweep
// ---------------------------------------------------------------------------------------

#[test]
fn restart_adopts_the_maps_and_rewrites_nothing() {
    let mut dp = MemDataplane::default();
    let mut old = Syncer::new(Limits::default());
    let (f1, f2) = (
        fid("10.96.0.10", 80),
        FrontendId::new(Ipv4Addr::UNSPECIFIED, 30053, Proto::Udp),
    );
    let d = desired(
        vec![
            (f1, bes(1..=3)),
            (f2, vec![be("10.244.0.3", 53), be("10.244.1.3", 53)]),
        ],
        &["192.168.1.10"],
    );
    apply(&mut old, &d, &mut dp);
    let ids: Vec<u32> = [f1, f2]
        .iter()
        .map(|f| old.svc_id(f).expect("svc id"))
        .collect();

    let mut new = Syncer::new(Limits::default());
    new.adopt(&dp).expect("adopt");
    let n = dp.log.len();
    let r = apply(&mut new, &d, &mut dp);
    assert!(r.is_ok());
    assert_eq!(dp.log.len(), n, "{:#?}", ops_since(&dp, n));
    let again: Vec<u32> = [f1, f2]
        .iter()
        .map(|f| new.svc_id(f).expect("svc id"))
        .collect();
    assert_eq!(ids, again);
}

#[test]
fn apply_adopts_by_itself_when_adopt_was_not_called() {
    let mut dp = MemDataplane::default();
    let d = desired(vec![(fid("10.96.0.10", 80), bes(1..=3))], &["192.168.1.10"]);
    apply(&mut Syncer::new(Limits::default()), &d, &mut dp);
    let n = dp.log.len();
    let r = apply(&mut Syncer::new(Limits::default()), &d, &mut dp);
    assert_eq!((r.puts, r.deletes), (0, 0));
    assert_eq!(dp.log.len(), n);
}

#[test]
fn restart_then_change_reuses_ids_and_never_collides() {
    let mut dp = MemDataplane::default();
    let f1 = fid("10.96.0.10", 80);
    let f2 = fid("10.96.0.11", 80);
    apply(
        &mut Syncer::new(Limits::default()),
        &desired(vec![(f1, bes(1..=3))], &[]),
        &mut dp,
    );
    let old_ids: BTreeMap<u32, Backend4> = dp.backends.clone();
    let mut s = Syncer::new(Limits::default());
    s.adopt(&dp).expect("adopt");
    let d = desired(vec![(f1, bes(2..=5)), (f2, bes(1..=1))], &[]);
    let r = apply(&mut s, &d, &mut dp);
    assert!(r.is_ok());
    assert_state(&dp, &d);
    // Backends that existed kept their ids; new ones got fresh ids.
    for (id, b) in &old_ids {
        if let Some(now) = dp.backends.get(id) {
            assert_eq!((now.addr, now.port), (b.addr, b.port));
        }
    }
    assert_ne!(s.svc_id(&f1), s.svc_id(&f2));
}

#[test]
fn stale_entries_from_an_earlier_run_are_swept() {
    let mut dp = MemDataplane::default();
    let stale = fid("10.96.9.9", 80);
    let keep = fid("10.96.0.10", 80);
    apply(
        &mut Syncer::new(Limits::default()),
        &desired(
            vec![(stale, bes(1..=2)), (keep, bes(2..=3))],
            &["192.168.1.99"],
        ),
        &mut dp,
    );
    // Garbage no run would leave, but a crash or a bug might: an orphan slot without a
    // master, an unreferenced backend, a frontend with a reserved scope.
    let orphan = frontend_key(&fid("10.96.8.8", 443)).with_slot(1);
    let some_backend = *dp.backends.keys().next().expect("backend");
    dp.services.insert(
        orphan,
        Service4Value {
            backend_id: some_backend,
            ..Default::default()
        },
    );
    dp.backends.insert(
        777,
        Backend4 {
            addr: 1,
            port: 2,
            proto: 6,
            flags: 0,
            node_addr: 0,
        },
    );
    let mut scoped = frontend_key(&keep);
    scoped.scope = 1;
    dp.services.insert(
        scoped,
        Service4Value {
            count: 0,
            svc_id: 5000,
            ..Default::default()
        },
    );

    let mut s = Syncer::new(Limits::default());
    s.adopt(&dp).expect("adopt");
    let d = desired(vec![(keep, bes(2..=3))], &["192.168.1.10"]);
    let r = apply(&mut s, &d, &mut dp);
    assert!(r.is_ok(), "{:?}", r.failures);
    assert_state(&dp, &d);
}

#[test]
fn adopted_duplicates_and_bad_ids_are_repaired() {
    let mut dp = MemDataplane::default();
    let f = fid("10.96.0.10", 80);
    let b = backend_value(&be("10.244.0.1", 8080), Proto::Tcp);
    // Two ids for one backend, and two masters sharing one svc id.
    dp.backends.insert(5, b);
    dp.backends.insert(9, b);
    let k = frontend_key(&f);
    dp.services.insert(
        k,
        Service4Value {
            count: 1,
            flags: flags::CLUSTERIP,
            svc_id: 3,
            ..Default::default()
        },
    );
    dp.services.insert(
        k.with_slot(1),
        Service4Value {
            backend_id: 9,
            ..Default::default()
        },
    );
    let f2 = fid("10.96.0.11", 80);
    let k2 = frontend_key(&f2);
    dp.services.insert(
        k2,
        Service4Value {
            count: 0,
            flags: flags::CLUSTERIP,
            svc_id: 3,
            ..Default::default()
        },
    );

    let mut s = Syncer::new(Limits::default());
    s.adopt(&dp).expect("adopt");
    let d = desired(vec![(f, bes(1..=1)), (f2, vec![])], &[]);
    let r = apply(&mut s, &d, &mut dp);
    assert!(r.is_ok(), "{:?}", r.failures);
    assert_state(&dp, &d);
    assert_eq!(dp.backends.keys().copied().collect::<Vec<_>>(), vec![5]);
    assert_ne!(master_of(&dp, &f).svc_id, master_of(&dp, &f2).svc_id);
}

// ---------------------------------------------------------------------------------------
// Full maps, failures, exhaustion
// ---------------------------------------------------------------------------------------

/// Every frontend in the map is either exactly as before the apply or exactly as desired.
fn assert_no_half_applied(
    before: &BTreeMap<Frontend4Key, (u16, Vec<Backend4>)>,
    dp: &MemDataplane,
    d: &Desired,
) {
    let want = expected(d);
    for (k, now) in decode(dp) {
        let old = before.get(&k);
        let new = want.get(&k);
        assert!(
            Some(&now) == old || Some(&now) == new,
            "{k:?} is half-applied: {now:?} (was {old:?}, want {new:?})"
        );
    }
}

#[test]
fn full_services_map_fails_whole_frontends_then_converges() {
    let mut dp = MemDataplane {
        services_capacity: Some(7),
        ..Default::default()
    };
    let mut s = Syncer::new(Limits::default());
    // Needs 3 + 4 + 5 = 12 entries.
    let d = desired(
        vec![
            (fid("10.96.0.1", 80), bes(1..=2)),
            (fid("10.96.0.2", 80), bes(3..=5)),
            (fid("10.96.0.3", 80), bes(6..=9)),
        ],
        &[],
    );
    let before = decode(&dp);
    let r = apply(&mut s, &d, &mut dp);
    assert!(!r.is_ok());
    assert!(r.failures.iter().any(|f| matches!(
        &f.error,
        SyncError::Dataplane(DataplaneError::MapFull { .. })
    )));
    assert_no_half_applied(&before, &dp, &d);
    assert!(!r.unsynced.is_empty());
    // The frontends that did not fit left nothing behind: no stray slots, no stray backends.
    let fitted: usize = decode(&dp).values().map(|(_, b)| b.len() + 1).sum();
    assert_eq!(dp.services.len(), fitted);

    // Retrying without more room changes nothing.
    let before = decode(&dp);
    let r2 = apply(&mut s, &d, &mut dp);
    assert!(!r2.is_ok());
    assert_eq!(decode(&dp), before);

    dp.services_capacity = Some(12);
    let r = apply(&mut s, &d, &mut dp);
    assert!(r.is_ok(), "{:?}", r.failures);
    assert!(r.unsynced.is_empty());
    assert_state(&dp, &d);
}

#[test]
fn growth_into_a_full_map_keeps_the_old_backend_set() {
    let mut dp = MemDataplane::default();
    let mut s = Syncer::new(Limits::default());
    let f = fid("10.96.0.1", 80);
    let old = desired(vec![(f, bes(1..=2))], &[]);
    apply(&mut s, &old, &mut dp);
    dp.services_capacity = Some(4); // room for one more slot, the growth needs three
    let d = desired(vec![(f, bes(3..=7))], &[]);
    let r = apply(&mut s, &d, &mut dp);
    assert!(!r.is_ok());
    assert_state(&dp, &old);
    dp.services_capacity = None;
    let r = apply(&mut s, &d, &mut dp);
    assert!(r.is_ok());
    assert_state(&dp, &d);
}

#[test]
fn full_backends_map_keeps_frontends_whole_then_converges() {
    let mut dp = MemDataplane {
        backends_capacity: Some(4),
        ..Default::default()
    };
    let mut s = Syncer::new(Limits::default());
    let d = desired(
        vec![
            (fid("10.96.0.1", 80), bes(1..=3)),
            (fid("10.96.0.2", 80), bes(4..=6)),
            (fid("10.96.0.3", 80), bes(1..=1)),
        ],
        &[],
    );
    let before = decode(&dp);
    let r = apply(&mut s, &d, &mut dp);
    assert!(!r.is_ok());
    assert!(r
        .failures
        .iter()
        .any(|f| matches!(f.error, SyncError::BackendMissing { .. })));
    assert_no_half_applied(&before, &dp, &d);
    // The frontends whose backends all fit are served.
    assert!(dp
        .services
        .contains_key(&frontend_key(&fid("10.96.0.1", 80))));
    assert!(dp
        .services
        .contains_key(&frontend_key(&fid("10.96.0.3", 80))));
    assert!(!dp
        .services
        .contains_key(&frontend_key(&fid("10.96.0.2", 80))));
    assert!(dp.backends.len() <= 4);

    dp.backends_capacity = None;
    let r = apply(&mut s, &d, &mut dp);
    assert!(r.is_ok(), "{:?}", r.failures);
    assert_state(&dp, &d);
}

/// Running out of per-frontend counter slots means "no counters", never "not programmed":
/// the frontend is load-balanced with `NO_SVC_ID`, reported, and gets a freed id later.
#[test]
fn svc_id_exhaustion_programs_the_frontend_uncounted_and_a_freed_id_is_reused() {
    use lb_common::service::NO_SVC_ID;
    let mut dp = MemDataplane::default();
    let mut s = Syncer::new(Limits {
        svc_ids: 2,
        ..Limits::default()
    });
    let (f1, f2, f3) = (
        fid("10.96.0.1", 80),
        fid("10.96.0.2", 80),
        fid("10.96.0.3", 80),
    );
    let d = desired(
        vec![(f1, bes(1..=1)), (f2, bes(2..=2)), (f3, bes(3..=3))],
        &[],
    );
    let r = apply(&mut s, &d, &mut dp);
    assert!(r.is_ok(), "{:?}", r.failures);
    assert_eq!(r.uncounted, vec![f3]);
    assert_state(&dp, &d);
    assert_eq!(master_of(&dp, &f3).svc_id, NO_SVC_ID);
    let ids: BTreeSet<u32> = [f1, f2].iter().map(|f| master_of(&dp, f).svc_id).collect();
    assert_eq!(ids, BTreeSet::from([0, 1]));
    // Still none free: nothing is rewritten.
    let n = dp.log.len();
    let r = apply(&mut s, &d, &mut dp);
    assert_eq!((r.puts, r.deletes, r.uncounted.clone()), (0, 0, vec![f3]));
    assert_eq!(dp.log.len(), n);

    // f1 goes away: f3 gets its id.
    let freed = master_of(&dp, &f1).svc_id;
    let d = desired(vec![(f2, bes(2..=2)), (f3, bes(3..=3))], &[]);
    let r = apply(&mut s, &d, &mut dp);
    assert!(r.is_ok(), "{:?}", r.failures);
    assert!(r.uncounted.is_empty());
    assert_state(&dp, &d);
    assert_eq!(master_of(&dp, &f3).svc_id, freed);
}

#[test]
fn backend_id_exhaustion_blocks_only_the_frontends_that_need_more() {
    let mut dp = MemDataplane::default();
    let mut s = Syncer::new(Limits {
        backend_ids: 2,
        ..Limits::default()
    });
    let (f1, f2) = (fid("10.96.0.1", 80), fid("10.96.0.2", 80));
    let d = desired(vec![(f1, bes(1..=2)), (f2, bes(3..=3))], &[]);
    let r = apply(&mut s, &d, &mut dp);
    assert!(r
        .failures
        .iter()
        .any(|f| matches!(f.error, SyncError::BackendIdsExhausted { limit: 2 })));
    assert_eq!(decode(&dp).len(), 1);
    assert!(dp.backends.keys().all(|id| (1..=2).contains(id)));
    // f1 goes away: its ids are freed and f2 fits.
    let d = desired(vec![(f2, bes(3..=3))], &[]);
    let r = apply(&mut s, &d, &mut dp);
    assert!(r.is_ok(), "{:?}", r.failures);
    assert_state(&dp, &d);
}

#[test]
fn freed_backend_ids_are_not_reused_while_fresh_ones_remain() {
    let mut dp = MemDataplane::default();
    let mut s = Syncer::new(Limits::default());
    let f = fid("10.96.0.1", 80);
    apply(&mut s, &desired(vec![(f, bes(1..=2))], &[]), &mut dp);
    let first: BTreeSet<u32> = dp.backends.keys().copied().collect();
    apply(&mut s, &desired(vec![(f, bes(3..=4))], &[]), &mut dp);
    let second: BTreeSet<u32> = dp.backends.keys().copied().collect();
    assert!(first.is_disjoint(&second), "{first:?} {second:?}");
}

#[test]
fn freed_backend_ids_are_reused_oldest_first_when_the_space_is_used_up() {
    let mut dp = MemDataplane::default();
    let mut s = Syncer::new(Limits {
        backend_ids: 3,
        ..Limits::default()
    });
    let f = fid("10.96.0.1", 80);
    apply(&mut s, &desired(vec![(f, bes(1..=3))], &[]), &mut dp);
    let id1 = backend_id_of(&dp, "10.244.0.1", 8080);
    let id2 = backend_id_of(&dp, "10.244.0.2", 8080);
    apply(&mut s, &desired(vec![(f, bes(3..=3))], &[]), &mut dp); // frees id1, then id2
    let d = desired(
        vec![(f, vec![be("10.244.0.3", 8080), be("10.244.0.9", 8080)])],
        &[],
    );
    let r = apply(&mut s, &d, &mut dp);
    assert!(r.is_ok());
    assert_eq!(backend_id_of(&dp, "10.244.0.9", 8080), id1);
    assert_ne!(id1, id2);
}

/// A dataplane whose mutations fail on demand.
struct Flaky {
    inner: MemDataplane,
    fail: Box<dyn FnMut(&MemOp) -> bool>,
}

impl Flaky {
    fn check(&mut self, op: MemOp) -> Result<(), DataplaneError> {
        if (self.fail)(&op) {
            Err(DataplaneError::Map {
                map: "test",
                op: "injected",
                entry: format!("{op:?}"),
                source: std::io::Error::other("injected failure"),
            })
        } else {
            Ok(())
        }
    }
}

impl Dataplane for Flaky {
    fn services(&self) -> Result<Vec<(Frontend4Key, Service4Value)>, DataplaneError> {
        self.inner.services()
    }
    fn put_service(
        &mut self,
        key: Frontend4Key,
        value: Service4Value,
    ) -> Result<(), DataplaneError> {
        self.check(MemOp::PutService(key, value))?;
        self.inner.put_service(key, value)
    }
    fn delete_service(&mut self, key: &Frontend4Key) -> Result<(), DataplaneError> {
        self.check(MemOp::DeleteService(*key))?;
        self.inner.delete_service(key)
    }
    fn backends(&self) -> Result<Vec<(u32, Backend4)>, DataplaneError> {
        self.inner.backends()
    }
    fn put_backend(&mut self, id: u32, value: Backend4) -> Result<(), DataplaneError> {
        self.check(MemOp::PutBackend(id, value))?;
        self.inner.put_backend(id, value)
    }
    fn delete_backend(&mut self, id: u32) -> Result<(), DataplaneError> {
        self.check(MemOp::DeleteBackend(id))?;
        self.inner.delete_backend(id)
    }
    fn node_addrs(&self) -> Result<Vec<Ipv4Addr>, DataplaneError> {
        self.inner.node_addrs()
    }
    fn put_node_addr(&mut self, addr: Ipv4Addr) -> Result<(), DataplaneError> {
        self.check(MemOp::PutNodeAddr(addr))?;
        self.inner.put_node_addr(addr)
    }
    fn delete_node_addr(&mut self, addr: Ipv4Addr) -> Result<(), DataplaneError> {
        self.check(MemOp::DeleteNodeAddr(addr))?;
        self.inner.delete_node_addr(addr)
    }
    fn stats(&self) -> Result<Vec<(Reason, Counter)>, DataplaneError> {
        self.inner.stats()
    }
    fn svc_stats(&self, svc_id: u32) -> Result<Counter, DataplaneError> {
        self.inner.svc_stats(svc_id)
    }
    fn reset_svc_stats(&mut self, svc_id: u32) -> Result<(), DataplaneError> {
        self.inner.reset_svc_stats(svc_id)
    }
}

#[test]
fn failed_master_delete_keeps_the_slots_and_is_retried() {
    let mut dp = Flaky {
        inner: MemDataplane::default(),
        fail: Box::new(|_| false),
    };
    let mut s = Syncer::new(Limits::default());
    let f = fid("10.96.0.1", 80);
    s.apply(&desired(vec![(f, bes(1..=2))], &[]), &mut dp);
    let key = frontend_key(&f);
    dp.fail = Box::new(move |op| *op == MemOp::DeleteService(key));
    let start = dp.inner.log.len();
    let empty = desired(vec![], &[]);
    let r = s.apply(&empty, &mut dp);
    assert_eq!(r.failures.len(), 1);
    assert!(
        r.failures[0].entry.contains("10.96.0.1:80/TCP"),
        "{}",
        r.failures[0]
    );
    assert_eq!(dp.inner.log.len(), start, "nothing else was touched");
    invariant(&dp.inner.services, &dp.inner.backends).expect("consistent");

    dp.fail = Box::new(|_| false);
    let r = s.apply(&empty, &mut dp);
    assert!(r.is_ok());
    assert_state(&dp.inner, &empty);
}

#[test]
fn failed_slot_put_leaves_the_old_master_and_is_retried() {
    let mut dp = Flaky {
        inner: MemDataplane::default(),
        fail: Box::new(|_| false),
    };
    let mut s = Syncer::new(Limits::default());
    let f = fid("10.96.0.1", 80);
    let old = desired(vec![(f, bes(1..=2))], &[]);
    s.apply(&old, &mut dp);
    let initial = dp.inner.clone();
    dp.fail = Box::new(|op| matches!(op, MemOp::PutService(k, _) if k.slot == 3));
    let d = desired(vec![(f, bes(1..=4))], &[]);
    let r = s.apply(&d, &mut dp);
    assert!(!r.is_ok());
    assert_eq!(r.unsynced, vec![f]);
    replay(&initial, &dp.inner.log[initial.log.len()..]);
    assert_state(&dp.inner, &old);

    dp.fail = Box::new(|_| false);
    let r = s.apply(&d, &mut dp);
    assert!(r.is_ok(), "{:?}", r.failures);
    assert_state(&dp.inner, &d);
}

#[test]
fn failed_backend_put_blocks_its_frontends_only() {
    let mut dp = Flaky {
        inner: MemDataplane::default(),
        fail: Box::new(
            |op| matches!(op, MemOp::PutBackend(_, b) if b.addr == u32::from(Ipv4Addr::new(10, 244, 0, 2)).to_be()),
        ),
    };
    let mut s = Syncer::new(Limits::default());
    let (f1, f2) = (fid("10.96.0.1", 80), fid("10.96.0.2", 80));
    let d = desired(vec![(f1, bes(1..=2)), (f2, bes(3..=3))], &[]);
    let r = s.apply(&d, &mut dp);
    assert_eq!(r.unsynced, vec![f1]);
    assert!(!dp.inner.services.contains_key(&frontend_key(&f1)));
    assert!(dp.inner.services.contains_key(&frontend_key(&f2)));
    invariant(&dp.inner.services, &dp.inner.backends).expect("consistent");
    dp.fail = Box::new(|_| false);
    assert!(s.apply(&d, &mut dp).is_ok());
    assert_state(&dp.inner, &d);
}

#[test]
fn failed_node_addr_put_is_reported_and_retried() {
    let mut dp = Flaky {
        inner: MemDataplane::default(),
        fail: Box::new(|op| matches!(op, MemOp::PutNodeAddr(_))),
    };
    let mut s = Syncer::new(Limits::default());
    let d = desired(vec![], &["192.168.1.10"]);
    let r = s.apply(&d, &mut dp);
    assert_eq!(r.failures.len(), 1);
    assert!(r.failures[0].entry.contains("192.168.1.10"));
    dp.fail = Box::new(|_| false);
    assert!(s.apply(&d, &mut dp).is_ok());
    assert_eq!(dp.inner.node_addrs, d.node_addrs);
}

// ---------------------------------------------------------------------------------------
// Randomized sequences
// ---------------------------------------------------------------------------------------

/// A small deterministic PRNG (xorshift), so the sequence is the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn random_desired(rng: &mut Rng) -> Desired {
    let mut frontends = Vec::new();
    for i in 0..6u8 {
        if rng.below(4) == 0 {
            continue;
        }
        let proto = if i % 3 == 0 { Proto::Udp } else { Proto::Tcp };
        let id = FrontendId::new(Ipv4Addr::new(10, 96, 0, i), 80, proto);
        let n = rng.below(7);
        let backends = (0..n)
            .map(|_| Backend {
                addr: Ipv4Addr::new(10, 244, 0, rng.below(10) as u8),
                port: 8080 + rng.below(2) as u16,
                remote: rng.below(2) == 0,
                terminating: rng.below(5) == 0,
            })
            .collect();
        frontends.push((id, backends));
    }
    let mut d = desired(frontends, &[]);
    // One backend address and port, one set of flags: the model guarantees this.
    for fe in d.frontends.values_mut() {
        fe.backends.dedup_by_key(|b| (b.addr, b.port));
        for b in &mut fe.backends {
            b.remote = b.addr.octets()[3] % 2 == 0;
            b.terminating = false;
        }
    }
    for a in 0..3u8 {
        if rng.below(2) == 0 {
            d.node_addrs.insert(Ipv4Addr::new(192, 168, 1, a));
        }
    }
    d
}

#[test]
fn random_sequences_keep_every_prefix_consistent_and_converge() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut dp = MemDataplane::default();
    let mut s = Syncer::new(Limits::default());
    for round in 0..300 {
        let d = random_desired(&mut rng);
        let r = apply(&mut s, &d, &mut dp);
        assert!(r.is_ok(), "round {round}: {:?}", r.failures);
        assert_state(&dp, &d);
        if round % 50 == 49 {
            // A restart in between.
            s = Syncer::new(Limits::default());
            s.adopt(&dp).expect("adopt");
            let n = dp.log.len();
            apply(&mut s, &d, &mut dp);
            assert_eq!(dp.log.len(), n, "round {round}: restart rewrote entries");
        }
    }
}

#[test]
fn random_sequences_under_tight_capacity_never_half_apply() {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut dp = MemDataplane::default();
    let mut s = Syncer::new(Limits {
        svc_ids: 5,
        ..Limits::default()
    });
    let mut last = Desired::default();
    let (mut ok_rounds, mut failed_rounds) = (0, 0);
    for _ in 0..300 {
        dp.services_capacity = Some(8 + rng.below(20) as u32);
        dp.backends_capacity = Some(3 + rng.below(8) as u32);
        let d = random_desired(&mut rng);
        let before = decode(&dp);
        let r = apply(&mut s, &d, &mut dp);
        assert_no_half_applied(&before, &dp, &d);
        if r.is_ok() {
            ok_rounds += 1;
            assert_state(&dp, &d);
        } else {
            failed_rounds += 1;
        }
        last = d;
    }
    assert!(
        ok_rounds > 10 && failed_rounds > 10,
        "{ok_rounds} ok, {failed_rounds} failed"
    );
    dp.services_capacity = None;
    dp.backends_capacity = None;
    let mut s2 = Syncer::new(Limits::default());
    s2.adopt(&dp).expect("adopt");
    let r = apply(&mut s2, &last, &mut dp);
    assert!(r.is_ok(), "{:?}", r.failures);
    assert_state(&dp, &last);
    let _ = s;
}

/// sessionAffinity ClientIP: the timeout is written into the master entry, and changing it
/// (or turning affinity off) rewrites only the master.
#[test]
fn affinity_timeout_is_written_to_the_master_and_changes_rewrite_only_it() {
    let id = fid("10.96.0.1", 80);
    let mut d = desired(vec![(id, bes(1..=3))], &[]);
    let mut s = Syncer::new(Limits::default());
    let mut dp = MemDataplane::default();
    if let Some(fe) = d.frontends.get_mut(&id) {
        fe.affinity_timeout_s = 10_800;
    }
    assert!(apply(&mut s, &d, &mut dp).is_ok());
    assert_eq!(master_of(&dp, &id).affinity_timeout_s, 10_800);
    assert_eq!(master_of(&dp, &id).count, 3);
    for (timeout, want) in [(60, 60), (0, 0)] {
        if let Some(fe) = d.frontends.get_mut(&id) {
            fe.affinity_timeout_s = timeout;
        }
        let start = dp.log.len();
        let r = apply(&mut s, &d, &mut dp);
        assert!(r.is_ok());
        assert_eq!(master_of(&dp, &id).affinity_timeout_s, want);
        let ops = ops_since(&dp, start);
        assert_eq!(ops.len(), 1, "{ops:?}");
        assert!(is_master_put(&ops[0]), "{ops:?}");
    }
}

// ---------------------------------------------------------------------------------------
// Batched first sync, incremental flushes, drift repair
// ---------------------------------------------------------------------------------------

/// `n` ClusterIP frontends 10.96.x.y:80 with `per` backends each (shared between
/// neighbours, so backends are reference-counted across frontends).
fn many(n: usize, per: usize) -> Desired {
    let frontends = (0..n)
        .map(|i| {
            let id = FrontendId::new(Ipv4Addr::from(0x0a60_0000 + i as u32), 80, Proto::Tcp);
            let bs = (0..per)
                .map(|k| {
                    let n = (i * per / 2 + k) as u32;
                    Backend {
                        addr: Ipv4Addr::from(0x0af4_0000 + n),
                        port: 8080,
                        remote: n.is_multiple_of(3),
                        terminating: false,
                    }
                })
                .collect();
            (id, bs)
        })
        .collect();
    desired(frontends, &["192.168.1.10"])
}

#[test]
fn large_first_sync_writes_in_batches_in_safe_order() {
    let d = many(300, 10);
    let mut dp = MemDataplane::default();
    let mut s = Syncer::new(Limits::default());
    let r = apply(&mut s, &d, &mut dp);
    assert!(r.is_ok(), "{:?}", r.failures);
    assert_state(&dp, &d);
    // Batched order: every backend, then every slot, then every master.
    let last_backend = dp
        .log
        .iter()
        .rposition(|o| matches!(o, MemOp::PutBackend(..)))
        .expect("backends");
    let first_slot = position(
        &dp.log,
        |o| matches!(o, MemOp::PutService(k, _) if k.slot != 0),
    );
    let last_slot = dp
        .log
        .iter()
        .rposition(|o| matches!(o, MemOp::PutService(k, _) if k.slot != 0))
        .expect("slots");
    let first_master = position(&dp.log, is_master_put);
    assert!(last_backend < first_slot && last_slot < first_master);
    // The same state again writes nothing.
    let n = dp.log.len();
    let r = apply(&mut s, &d, &mut dp);
    assert_eq!((r.puts, r.deletes), (0, 0));
    assert_eq!(dp.log.len(), n);
}

#[test]
fn a_batch_stopped_by_a_full_map_leaves_whole_frontends_then_converges() {
    let d = many(300, 10);
    // Room for the slots of about 150 frontends: the slot batch stops half way.
    let mut dp = MemDataplane {
        services_capacity: Some(1_650),
        ..Default::default()
    };
    let mut s = Syncer::new(Limits::default());
    let before = decode(&dp);
    let r = apply(&mut s, &d, &mut dp);
    assert!(!r.is_ok());
    assert!(!r.unsynced.is_empty());
    assert_no_half_applied(&before, &dp, &d);
    dp.services_capacity = None;
    let r = apply(&mut s, &d, &mut dp);
    assert!(r.is_ok(), "{:?}", r.failures);
    assert_state(&dp, &d);
}

#[test]
fn flush_writes_only_the_frontends_set_since_the_last_one() {
    let d = many(50, 4);
    let mut dp = MemDataplane::default();
    let mut s = Syncer::new(Limits::default());
    for (id, fe) in &d.frontends {
        s.set_frontend(*id, Some(fe));
    }
    s.set_node_addrs(&d.node_addrs);
    let r = s.flush(&mut dp);
    assert!(r.is_ok());
    assert_state(&dp, &d);

    // One frontend loses a backend, another goes: only their entries change.
    let mut d2 = d.clone();
    let (a, b) = {
        let mut keys = d2.frontends.keys().copied();
        (keys.next().expect("a"), keys.next().expect("b"))
    };
    d2.frontends.get_mut(&a).expect("a").backends.pop();
    d2.frontends.remove(&b);
    let start = dp.log.len();
    s.set_frontend(a, d2.frontends.get(&a));
    s.set_frontend(b, None);
    let r = s.flush(&mut dp);
    assert!(r.is_ok());
    assert_state(&dp, &d2);
    let touched: BTreeSet<Frontend4Key> = dp.log[start..]
        .iter()
        .filter_map(|o| match o {
            MemOp::PutService(k, _) | MemOp::DeleteService(k) => Some(k.with_slot(0)),
            _ => None,
        })
        .collect();
    assert_eq!(
        touched,
        [frontend_key(&a), frontend_key(&b)].into_iter().collect()
    );
    // Nothing left to write.
    let n = dp.log.len();
    assert!(s.flush(&mut dp).is_ok());
    assert_eq!(dp.log.len(), n);
}

#[test]
fn resync_repairs_entries_changed_behind_the_syncers_back() {
    let d = many(20, 3);
    let mut dp = MemDataplane::default();
    let mut s = Syncer::new(Limits::default());
    assert!(apply(&mut s, &d, &mut dp).is_ok());
    let (a, b) = {
        let mut keys = d.frontends.keys().copied();
        (keys.next().expect("a"), keys.next().expect("b"))
    };
    // Drift: a slot points elsewhere, a master is gone, a backend changed, strays added.
    let ka = frontend_key(&a);
    let other = dp.services[&frontend_key(&b).with_slot(1)].backend_id;
    dp.services.insert(
        ka.with_slot(2),
        Service4Value {
            backend_id: other,
            ..Default::default()
        },
    );
    dp.services.remove(&frontend_key(&b));
    let (bid, mut bv) = dp
        .backends
        .iter()
        .map(|(k, v)| (*k, *v))
        .next_back()
        .expect("b");
    bv.port = 1;
    dp.backends.insert(bid, bv);
    dp.services.insert(
        frontend_key(&fid("10.99.0.1", 53)),
        Service4Value {
            count: 0,
            ..Default::default()
        },
    );
    dp.backends.insert(999_999, bv);
    dp.node_addrs.insert(ip("10.0.0.1"));

    // A flush knows nothing of it...
    let n = dp.log.len();
    assert!(s.flush(&mut dp).is_ok());
    assert_eq!(dp.log.len(), n);
    // ...a resync re-reads the maps and repairs everything.
    let initial = dp.clone();
    let start = dp.log.len();
    let r = s.resync(&mut dp);
    assert!(r.is_ok(), "{:?}", r.failures);
    replay(&initial, &dp.log[start..]);
    assert_state(&dp, &d);
    // And the next resync finds nothing to do.
    let n = dp.log.len();
    assert!(s.resync(&mut dp).is_ok());
    assert_eq!(dp.log.len(), n);
}

/// The reliability suite's churn, in process: six frontends (three ports, each as a
/// ClusterIP and a NodePort) over 30 of 60 pods; every change swaps 25 pods out and 25 in,
/// and goes through `set_frontend` + `flush` like the agent. Every flush must succeed.
#[test]
fn endpoint_churn_through_set_frontend_and_flush_never_fails() {
    let mut s = Syncer::new(Limits::default());
    let mut dp = MemDataplane::default();
    let ports = [(80u16, Proto::Tcp), (53, Proto::Udp), (9000, Proto::Tcp)];
    let ids: Vec<(FrontendId, u16)> = ports
        .iter()
        .flat_map(|&(port, proto)| {
            [
                (FrontendId::new(ip("10.96.0.10"), port, proto), port),
                (
                    FrontendId::new(Ipv4Addr::UNSPECIFIED, 30000 + port % 1000, proto),
                    port,
                ),
            ]
        })
        .collect();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = move |n: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % n as u64) as usize
    };
    let mut current: BTreeSet<usize> = (0..30).collect();
    for w in 0..200 {
        for (id, port) in &ids {
            let fe = frontend(
                current
                    .iter()
                    .map(|&i| be(&format!("10.244.0.{}", i + 10), *port))
                    .collect(),
            );
            s.set_frontend(*id, Some(&fe));
        }
        let before = dp.clone();
        let start = dp.log.len();
        let r = s.flush(&mut dp);
        assert!(r.is_ok(), "write {w}: {:?}", r.failures);
        replay(&before, &dp.log[start..]);
        let out: Vec<usize> = (0..60).filter(|i| !current.contains(i)).collect();
        let mut gone: Vec<usize> = current.iter().copied().collect();
        for _ in 0..25 {
            gone.swap_remove(next(gone.len()));
        }
        let gone: BTreeSet<usize> = current
            .difference(&gone.into_iter().collect())
            .copied()
            .collect();
        let mut new = out;
        while new.len() > 25 {
            new.swap_remove(next(new.len()));
        }
        current.retain(|i| !gone.contains(i));
        current.extend(new);
    }
}

/// The agent writes new identities' backends while the first lists still arrive: those
/// writes touch no entry the datapath can reach (not an existing backend whose flags
/// changed, not a service entry), and the flush after them completes the same maps.
#[test]
fn prewrite_puts_only_unreachable_new_backends_and_the_flush_completes_them() {
    let mut dp = MemDataplane::default();
    let (f1, f2) = (fid("10.96.0.10", 80), fid("10.96.0.11", 80));
    apply(
        &mut Syncer::new(Limits::default()),
        &desired(vec![(f1, bes(1..=3))], &[]),
        &mut dp,
    );
    let before = dp.clone();

    // A restarted agent; its lists are half in: f1's backend 3 is now terminating (an
    // existing id: must wait for the flush), f2 is new with two new backends and one
    // shared with f1.
    let mut s = Syncer::new(Limits::default());
    let mut terminating = bes(1..=3);
    terminating[2].terminating = true;
    let d = desired(
        vec![
            (f1, terminating),
            (
                f2,
                vec![
                    be("10.244.0.1", 8080),
                    be("10.244.0.8", 8080),
                    be("10.244.0.9", 8080),
                ],
            ),
        ],
        &[],
    );
    for (id, fe) in &d.frontends {
        s.set_frontend(*id, Some(fe));
    }
    let n = dp.log.len();
    let r = s.prewrite_new_backends(&mut dp);
    assert!(r.is_ok(), "{:?}", r.failures);
    let ops = ops_since(&dp, n).to_vec();
    assert_eq!(ops.len(), 2, "{ops:#?}");
    for op in &ops {
        let MemOp::PutBackend(id, v) = op else {
            panic!("only backend puts before the lists are complete: {op:?}");
        };
        assert!(!before.backends.contains_key(id), "id {id} was in use");
        assert!([8u8, 9].contains(&(u32::from_be(v.addr) as u8)), "{v:?}");
    }
    assert_eq!(dp.services, before.services, "no service entry written");
    replay(&before, &ops);
    // A second prewrite has nothing left to do.
    assert_eq!(s.prewrite_new_backends(&mut dp).puts, 0);

    let n = dp.log.len();
    let r = s.flush(&mut dp);
    assert!(r.is_ok(), "{:?}", r.failures);
    replay(&before, &dp.log[before.log.len()..]);
    assert!(
        !ops_since(&dp, n)
            .iter()
            .any(|op| matches!(op, MemOp::PutBackend(id, _) if !before.backends.contains_key(id))),
        "the flush does not write the new backends again"
    );
    assert_state(&dp, &d);
}
