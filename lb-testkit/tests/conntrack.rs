//! Conntrack lifetimes through the real programs (`BPF_PROG_RUN`, need root): half-open
//! flows apart from established ones (one slot per client hash, the newest flow holding it,
//! torn slots refused, idle ones emptied), the two directions kept alive together (an evicted
//! entry is rebuilt from its twin), idle flows expired on their next packet, and the
//! agent's GC deleting idle entries with batch map operations.
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use lb_agent::ct_gc;
use lb_agent::loader::{open_pinned_map, read_config, CtPolicy, PinLayout};
use lb_common::{
    conntrack::{ct_flags, half_open_slot_v4},
    maps, Ct4Key, Ct4Value, HalfOpen4, Reason, IPPROTO_TCP, IPPROTO_UDP,
};
use lb_testkit::harness::{
    event_deltas, stat_deltas, FrontendSpec, Harness, Prog, TC_ACT_OK, XDP_PASS,
};
use lb_testkit::packet::{Pkt, TCP_ACK, TCP_SYN};

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
const NODE: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
const POD: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 10);

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

fn harness(what: &str, p: &CtPolicy) -> Harness {
    let mut h = Harness::new(what, &Default::default());
    h.add_node_addr(NODE);
    h.add_frontend(&FrontendSpec::nodeport(
        30001,
        IPPROTO_TCP,
        1,
        &[sa(POD, 80)],
    ));
    h.add_frontend(&FrontendSpec::nodeport(
        30053,
        IPPROTO_UDP,
        2,
        &[sa(POD, 53)],
    ));
    h.set_ct_policy(p);
    h
}

fn policy(udp_s: u32) -> CtPolicy {
    CtPolicy {
        tcp_syn_s: 0,
        tcp_s: 0,
        tcp_fin_s: 0,
        udp_s,
        reject_per_s: 0,
    }
}

type CtMap = aya::maps::HashMap<aya::maps::MapData, Ct4Key, Ct4Value>;

fn ct_map(h: &Harness, name: &'static str) -> CtMap {
    let data = open_pinned_map(&PinLayout::new(h.pin_dir()), name).expect("open conntrack");
    aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data)).expect("conntrack map")
}

fn keys(m: &CtMap) -> Vec<(Ct4Key, Ct4Value)> {
    m.iter().map(|r| r.expect("iterate")).collect()
}

#[test]
fn half_open_flows_live_apart_and_move_with_the_clients_ack() {
    let mut h = harness("ct-halfopen", &policy(0));
    let syn = Pkt::tcp(sa(CLIENT, 40000), sa(NODE, 30001), TCP_SYN).build();
    assert_eq!(h.run(Prog::Xdp, &syn).0, XDP_PASS);
    let counts = |h: &Harness| {
        (
            h.maps.conntrack_established().expect("LB4_CT").len(),
            h.maps.half_open_slots().expect("LB4_CT_SYN").len(),
            h.maps.conntrack_half_open().expect("LB4_CT_SYN").len(),
        )
    };
    assert_eq!(
        counts(&h),
        (0, 1, 2),
        "a SYN is half-open: one slot, standing for two entries"
    );
    let slots = h.maps.half_open_slots().expect("slots");
    let (i, slot) = slots[0];
    let cfg = read_config(&PinLayout::new(h.pin_dir())).expect("config");
    assert_eq!(
        i,
        half_open_slot_v4(
            u32::from(CLIENT).to_be(),
            40000u16.to_be(),
            IPPROTO_TCP,
            cfg.hash_seed
        ) & cfg.half_open_mask,
        "the slot of the client's address and port"
    );
    assert_eq!(
        (slot.fe_addr, slot.fe_port, slot.be_addr, slot.be_port),
        (
            u32::from(NODE).to_be(),
            30001u16.to_be(),
            u32::from(POD).to_be(),
            80u16.to_be()
        )
    );
    // The SYN-ACK is reverse-NATed from the half-open slot.
    let synack = Pkt::tcp(sa(POD, 80), sa(CLIENT, 40000), TCP_SYN | TCP_ACK).build();
    let (v, out) = h.run(Prog::Tc, &synack);
    assert_eq!(v, TC_ACT_OK);
    assert_eq!(
        out,
        Pkt::tcp(sa(NODE, 30001), sa(CLIENT, 40000), TCP_SYN | TCP_ACK).build()
    );
    // A retransmitted SYN stays half-open; the client's ACK moves the flow.
    let before = h.stats();
    assert_eq!(h.run(Prog::Xdp, &syn).0, XDP_PASS);
    assert_eq!(
        stat_deltas(&before, &h.stats())
            .get(&Reason::XdpFwdTracked)
            .map(|c| c.0),
        Some(1),
        "the retransmitted SYN is tracked"
    );
    assert_eq!(counts(&h), (0, 1, 2));
    let ack = Pkt::tcp(sa(CLIENT, 40000), sa(NODE, 30001), TCP_ACK).build();
    let (_, out) = h.run(Prog::Xdp, &ack);
    assert_eq!(
        out,
        Pkt::tcp(sa(CLIENT, 40000), sa(POD, 80), TCP_ACK).build()
    );
    assert_eq!(counts(&h), (2, 0, 0), "moved on the ACK");
    assert!(h
        .maps
        .conntrack_established()
        .expect("ct")
        .iter()
        .all(|(_, v)| v.flags & ct_flags::ESTABLISHED != 0));
}

/// Two clients whose half-open flows share a slot: the newer SYN displaces the older flow
/// (whose ACK still reaches its backend through the flow hash), and a slot torn by two
/// writers is refused rather than trusted.
#[test]
fn a_half_open_slot_serves_its_newest_flow_and_a_torn_slot_is_refused() {
    let mut h = harness("ct-halfopen-slot", &policy(0));
    let cfg = read_config(&PinLayout::new(h.pin_dir())).expect("config");
    assert!(cfg.half_open_mask >= 1023, "mask {:#x}", cfg.half_open_mask);
    let slot_of = |c: SocketAddrV4| {
        half_open_slot_v4(
            u32::from(*c.ip()).to_be(),
            c.port().to_be(),
            IPPROTO_TCP,
            cfg.hash_seed,
        ) & cfg.half_open_mask
    };
    let a = sa(CLIENT, 40100);
    let b = (0..=u32::MAX)
        .map(|i| sa(Ipv4Addr::from(u32::from(CLIENT) + (i >> 16)), i as u16))
        .find(|c| *c != a && slot_of(*c) == slot_of(a))
        .expect("a client sharing a's slot");
    let syn = |c| Pkt::tcp(c, sa(NODE, 30001), TCP_SYN).build();
    let synack = |c| Pkt::tcp(sa(POD, 80), c, TCP_SYN | TCP_ACK).build();
    h.run(Prog::Xdp, &syn(a));
    h.run(Prog::Xdp, &syn(b));
    let slots = h.maps.half_open_slots().expect("slots");
    assert_eq!(slots.len(), 1, "one slot for both");
    assert_eq!(
        (slots[0].1.client_addr, slots[0].1.client_port),
        (u32::from(*b.ip()).to_be(), b.port().to_be()),
        "the newer flow holds it"
    );
    // b's SYN-ACK is translated; a's no longer is (its flow was displaced).
    assert_eq!(
        h.run(Prog::Tc, &synack(b)).1,
        Pkt::tcp(sa(NODE, 30001), b, TCP_SYN | TCP_ACK).build()
    );
    let before = h.stats();
    assert_eq!(h.run(Prog::Tc, &synack(a)).1, synack(a));
    assert_eq!(
        stat_deltas(&before, &h.stats())
            .get(&Reason::TcPassNotTracked)
            .map(|c| c.0),
        Some(1)
    );
    // a's ACK starts an established flow to the backend the hash picks (the only one).
    let ack = Pkt::tcp(a, sa(NODE, 30001), TCP_ACK).build();
    assert_eq!(
        h.run(Prog::Xdp, &ack).1,
        Pkt::tcp(a, sa(POD, 80), TCP_ACK).build()
    );

    // A torn slot: b's slot with one field changed after sealing.
    let pins = PinLayout::new(h.pin_dir());
    let data = open_pinned_map(&pins, maps::LB4_CT_SYN).expect("LB4_CT_SYN");
    let mut arr: aya::maps::Array<_, HalfOpen4> =
        aya::maps::Array::try_from(aya::maps::Map::Array(data)).expect("array");
    let (i, mut torn) = slots[0];
    torn.be_port = 81u16.to_be();
    arr.set(i, torn, 0).expect("plant");
    assert!(!torn.sealed());
    assert_eq!(h.maps.half_open_slots().expect("slots").len(), 0);
    let synack81 = Pkt::tcp(sa(POD, 81), b, TCP_SYN | TCP_ACK).build();
    assert_eq!(h.run(Prog::Tc, &synack81).1, synack81, "not translated");
    // b's retransmitted SYN starts over in that slot.
    let before = h.stats();
    h.run(Prog::Xdp, &syn(b));
    assert_eq!(
        stat_deltas(&before, &h.stats())
            .get(&Reason::XdpFwdNewFlow)
            .map(|c| c.0),
        Some(1)
    );
    assert_eq!(h.maps.half_open_slots().expect("slots").len(), 1);
}

/// Half-open flows expire after the SYN timeout: on their next packet, and the GC empties
/// the slots of those that never send again.
#[test]
fn an_idle_half_open_flow_expires_and_the_gc_empties_its_slot() {
    let mut h = harness("ct-halfopen-gc", &policy(0));
    h.set_ct_policy(&CtPolicy {
        tcp_syn_s: 1,
        ..policy(0)
    });
    let (a, b) = (sa(CLIENT, 40200), sa(CLIENT, 40201));
    let syn = |c| Pkt::tcp(c, sa(NODE, 30001), TCP_SYN).build();
    h.run(Prog::Xdp, &syn(a));
    h.run(Prog::Xdp, &syn(b));
    assert_eq!(h.maps.half_open_slots().expect("slots").len(), 2);
    std::thread::sleep(Duration::from_millis(2100));
    let before = h.stats();
    h.run(Prog::Xdp, &syn(a));
    let events = event_deltas(&before, &h.stats());
    assert_eq!(events.get(&Reason::CtExpired), Some(&2), "{events:?}");
    assert_eq!(events.get(&Reason::CtCreated), Some(&2), "{events:?}");
    let pins = PinLayout::new(h.pin_dir());
    let cfg = read_config(&pins).expect("config");
    let r = ct_gc::collect(&pins, &cfg).expect("gc");
    assert_eq!((r.entries, r.expired), (4, 2), "{r:?}");
    let left = h.maps.half_open_slots().expect("slots");
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].1.client_port, a.port().to_be());
}

#[test]
fn an_evicted_direction_is_rebuilt_from_the_other_on_its_next_refresh() {
    let mut h = harness("ct-restore", &policy(0));
    let syn = Pkt::tcp(sa(CLIENT, 40001), sa(NODE, 30001), TCP_SYN).build();
    let ack = Pkt::tcp(sa(CLIENT, 40001), sa(NODE, 30001), TCP_ACK).build();
    h.run(Prog::Xdp, &syn);
    h.run(Prog::Xdp, &ack);
    let mut ct = ct_map(&h, maps::LB4_CT);
    let all = keys(&ct);
    assert_eq!(all.len(), 2);
    let reply = all
        .iter()
        .find(|(k, _)| k.dir == lb_common::conntrack::CT_REPLY)
        .expect("reply entry")
        .0;
    let forward = all
        .iter()
        .find(|(k, _)| k.dir == lb_common::conntrack::CT_FORWARD)
        .expect("forward entry")
        .0;

    // The LRU evicts the reply entry: the next forward refresh (at most a second later)
    // rebuilds it, so the backend's replies are reverse-NATed again.
    ct.remove(&reply).expect("evict the reply entry");
    std::thread::sleep(Duration::from_millis(1100));
    let before = h.stats();
    h.run(Prog::Xdp, &ack);
    let events = event_deltas(&before, &h.stats());
    assert_eq!(events.get(&Reason::CtRestored), Some(&1), "{events:?}");
    assert!(ct.get(&reply, 0).is_ok(), "reply entry rebuilt");
    let data = Pkt::tcp(sa(POD, 80), sa(CLIENT, 40001), TCP_ACK).build();
    assert_eq!(
        h.run(Prog::Tc, &data).1,
        Pkt::tcp(sa(NODE, 30001), sa(CLIENT, 40001), TCP_ACK).build()
    );

    // And the other way round: the forward entry evicted, a reply rebuilds it.
    ct.remove(&forward).expect("evict the forward entry");
    std::thread::sleep(Duration::from_millis(1100));
    let before = h.stats();
    h.run(Prog::Tc, &data);
    let events = event_deltas(&before, &h.stats());
    assert_eq!(events.get(&Reason::CtRestored), Some(&1), "{events:?}");
    let fwd = ct.get(&forward, 0).expect("forward entry rebuilt");
    assert_eq!(
        (fwd.nat_addr, fwd.nat_port),
        (u32::from(POD).to_be(), 80u16.to_be())
    );
    let before = h.stats();
    assert_eq!(
        h.run(Prog::Xdp, &ack).1,
        Pkt::tcp(sa(CLIENT, 40001), sa(POD, 80), TCP_ACK).build()
    );
    assert_eq!(
        stat_deltas(&before, &h.stats())
            .get(&Reason::XdpFwdTracked)
            .map(|c| c.0),
        Some(1),
        "tracked, not a new flow"
    );
}

#[test]
fn an_idle_udp_flow_expires_on_its_next_packet_and_the_gc_collects_the_rest() {
    let mut h = harness("ct-expiry", &policy(1));
    let a = Pkt::udp(sa(CLIENT, 41000), sa(NODE, 30053))
        .payload(b"a")
        .build();
    let b = Pkt::udp(sa(CLIENT, 41001), sa(NODE, 30053))
        .payload(b"b")
        .build();
    h.run(Prog::Xdp, &a);
    h.run(Prog::Xdp, &b);
    assert_eq!(h.ct_len(), 4);
    std::thread::sleep(Duration::from_millis(2100));

    // Flow a sends again: its entries are expired and the flow starts anew.
    let before = h.stats();
    h.run(Prog::Xdp, &a);
    let after = h.stats();
    assert_eq!(
        event_deltas(&before, &after).get(&Reason::CtExpired),
        Some(&2)
    );
    assert_eq!(
        event_deltas(&before, &after).get(&Reason::CtCreated),
        Some(&2)
    );
    assert_eq!(
        stat_deltas(&before, &after)
            .get(&Reason::XdpFwdNewFlow)
            .map(|c| c.0),
        Some(1)
    );
    assert_eq!(h.ct_len(), 4);

    // Flow b never sends again: the GC (batch lookup + batch delete) collects it, and only
    // it: flow a is fresh.
    let cfg = read_config(&PinLayout::new(h.pin_dir())).expect("config");
    assert_eq!(cfg.ct_timeout_udp_s, 1);
    let r = ct_gc::collect(&PinLayout::new(h.pin_dir()), &cfg).expect("gc");
    println!("conntrack GC: {r:?}");
    assert_eq!((r.entries, r.expired), (4, 2), "{r:?}");
    assert_eq!(h.ct_len(), 2);
    let left: Vec<u16> = h
        .maps
        .conntrack()
        .expect("ct")
        .iter()
        .map(|(k, _)| u16::from_be(if k.dir == 0 { k.sport } else { k.dport }))
        .collect();
    assert_eq!(left, [41000, 41000]);
}

/// The GC walks and deletes a full map in batches: 20,000 flows, half of them idle.
#[test]
fn the_gc_walks_a_large_map_in_batches() {
    let mut h = harness("ct-gc-large", &policy(1));
    for i in 0..10_000u16 {
        let p = Pkt::udp(sa(CLIENT, 10_000 + i), sa(NODE, 30053))
            .payload(b"x")
            .build();
        h.run(Prog::Xdp, &p);
    }
    std::thread::sleep(Duration::from_millis(2100));
    for i in 0..10_000u16 {
        let p = Pkt::udp(
            sa(Ipv4Addr::new(10, 200, 1, 2), 10_000 + i),
            sa(NODE, 30053),
        )
        .payload(b"x")
        .build();
        h.run(Prog::Xdp, &p);
    }
    assert_eq!(h.ct_len(), 40_000);
    let cfg = read_config(&PinLayout::new(h.pin_dir())).expect("config");
    let r = ct_gc::collect(&PinLayout::new(h.pin_dir()), &cfg).expect("gc");
    println!("conntrack GC over 40,000 entries: {r:?}");
    assert_eq!((r.entries, r.expired), (40_000, 20_000), "{r:?}");
    assert_eq!(h.ct_len(), 20_000);
}

/// Reading a map with the wrong layout is refused before the kernel writes anything: the
/// half-open table read as if it still held `Ct4Key -> Ct4Value` entries (its V1 layout)
/// would otherwise have 64-byte values copied into 24-byte buffers.
#[test]
fn a_map_read_with_another_layout_is_refused() {
    use std::os::fd::AsFd as _;
    let mut h = harness("ct-layout", &policy(0));
    h.run(
        Prog::Xdp,
        &Pkt::tcp(sa(CLIENT, 40300), sa(NODE, 30001), TCP_SYN).build(),
    );
    let data = open_pinned_map(&PinLayout::new(h.pin_dir()), maps::LB4_CT_SYN).expect("map");
    let fd = data.fd().as_fd();
    let err =
        lb_agent::bpfsys::map_lookup_batch::<Ct4Key, Ct4Value>(fd, 64).expect_err("wrong layout");
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput, "{err}");
    assert!(err.to_string().contains("64-byte values"), "{err}");
    let err = lb_agent::bpfsys::map_lookup::<Ct4Key, Ct4Value>(fd, &Ct4Key::default())
        .expect_err("wrong layout");
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput, "{err}");
    let (n, r) = lb_agent::bpfsys::update_batch(fd, &[(Ct4Key::default(), Ct4Value::default())]);
    assert_eq!(n, 0);
    assert!(r.is_err());
    // The right layout reads the one flow.
    assert_eq!(ct_gc::half_open_slots(fd).expect("slots").len(), 1);
}
