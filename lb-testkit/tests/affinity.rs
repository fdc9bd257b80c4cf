//! sessionAffinity ClientIP through `BPF_PROG_RUN` (needs root): a client's new flows stick
//! to one backend whatever their source port; other clients spread; an expired entry, or one
//! whose slot no longer points at its backend, is not honoured. Checks verdicts, rewritten
//! bytes and checksums, counters and the affinity map itself.
use std::net::{Ipv4Addr, SocketAddrV4};

use aya::maps::MapError;
use lb_common::{Affinity4Key, Reason, IPPROTO_TCP};
use lb_testkit::{
    harness::{stat_deltas, FrontendSpec, Harness, Prog, XDP_PASS},
    packet::{verify_checksums, Pkt, TCP_SYN},
};

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
const NODE: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
const NODE_PORT: u16 = 30090;

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

/// Destination of a DNATed frame.
fn dst_of(frame: &[u8]) -> SocketAddrV4 {
    let ip = Ipv4Addr::new(frame[30], frame[31], frame[32], frame[33]);
    SocketAddrV4::new(ip, u16::from_be_bytes([frame[36], frame[37]]))
}

/// A SYN from `client:port` to the NodePort: its backend, checked for verdict and checksums.
fn syn(h: &mut Harness, client: Ipv4Addr, port: u16) -> SocketAddrV4 {
    let frame = Pkt::tcp(sa(client, port), sa(NODE, NODE_PORT), TCP_SYN).build();
    let (v, out) = h.run(Prog::Xdp, &frame);
    assert_eq!(v, XDP_PASS, "SYN from {client}:{port}");
    verify_checksums(&out).expect("rewritten SYN checksums");
    assert_eq!(out.len(), frame.len());
    // Only the destination and the checksums change.
    assert_eq!(&out[..24], &frame[..24]);
    assert_eq!(&out[26..30], &frame[26..30]);
    assert_eq!(&out[34..36], &frame[34..36]);
    assert_eq!(&out[38..50], &frame[38..50]);
    dst_of(&out)
}

fn key(client: Ipv4Addr) -> Affinity4Key {
    Affinity4Key {
        client: u32::from(client).to_be(),
        fe_addr: 0,
        fe_port: NODE_PORT.to_be(),
        proto: IPPROTO_TCP,
        client_kind: 0,
    }
}

/// Upstream: "should have session affinity work for NodePort service"
/// (test/e2e/network/service.go), at the datapath level.
#[test]
fn session_affinity_client_ip_sticks_expires_and_follows_slots() {
    let mut h = Harness::new("affinity", &Default::default());
    h.add_node_addr(NODE);
    let backends: Vec<SocketAddrV4> = (10..13)
        .map(|i| sa(Ipv4Addr::new(10, 244, 0, i), 8080))
        .collect();
    let ids = h.add_frontend(
        &FrontendSpec::nodeport(NODE_PORT, IPPROTO_TCP, 9, &backends).with_affinity(60),
    );
    let before = h.stats();

    // 50 new flows from one client, 50 source ports: one backend.
    let first = syn(&mut h, CLIENT, 20_000);
    for port in 20_001..20_050 {
        assert_eq!(
            syn(&mut h, CLIENT, port),
            first,
            "port {port} left the affine backend"
        );
    }
    let deltas = stat_deltas(&before, &h.stats());
    assert_eq!(
        deltas.get(&Reason::XdpFwdNewFlow).map(|c| c.0),
        Some(50),
        "{deltas:?}"
    );
    assert_eq!(deltas.len(), 1, "only new-flow forwards: {deltas:?}");
    let aff = h.affinity();
    let entry = aff
        .get(&key(CLIENT), 0)
        .expect("the client's affinity entry");
    let first_idx = backends
        .iter()
        .position(|b| *b == first)
        .expect("a backend");
    assert_eq!(
        (entry.backend_id, entry.slot),
        (ids[first_idx], first_idx as u16 + 1)
    );
    assert!(entry.last_used_ns > 0);

    // Other clients spread over the backends, and each sticks to its own.
    let mut seen = std::collections::BTreeSet::new();
    for c in 1..=60u8 {
        let client = Ipv4Addr::new(10, 200, 1, c);
        let b = syn(&mut h, client, 40_000);
        assert_eq!(syn(&mut h, client, 40_001), b, "client {client} moved");
        seen.insert(b);
    }
    assert_eq!(seen.len(), backends.len(), "60 clients used {seen:?}");

    // A fresh entry is honoured: point the client at another backend (and its slot).
    let other_idx = (first_idx + 1) % backends.len();
    let mut aff = h.affinity();
    let mut planted = entry;
    planted.backend_id = ids[other_idx];
    planted.slot = other_idx as u16 + 1;
    aff.insert(key(CLIENT), planted, 0)
        .expect("plant an affinity entry");
    assert_eq!(syn(&mut h, CLIENT, 21_000), backends[other_idx]);

    // A slot that no longer points at the entry's backend is not honoured.
    let mut stale = planted;
    stale.slot = first_idx as u16 + 1; // backend other_idx, but the slot of first_idx
    aff.insert(key(CLIENT), stale, 0)
        .expect("plant a stale entry");
    let b = syn(&mut h, CLIENT, 21_001);
    let got = h.affinity().get(&key(CLIENT), 0).expect("entry");
    let idx = backends.iter().position(|x| *x == b).expect("a backend");
    assert_eq!(
        (got.backend_id, got.slot),
        (ids[idx], idx as u16 + 1),
        "rewritten consistently"
    );

    // An expired entry is not honoured: new flows pick by hash again (some port then lands
    // elsewhere), and the entry follows the new choice.
    let mut expired = got;
    expired.last_used_ns = 0;
    let mut moved = None;
    for port in 22_000..22_100 {
        aff.insert(key(CLIENT), expired, 0)
            .expect("plant an expired entry");
        let to = syn(&mut h, CLIENT, port);
        if to != backends[idx] {
            moved = Some(to);
            break;
        }
    }
    let moved = moved.expect("an expired affinity kept every new flow on one backend");
    let now = h.affinity().get(&key(CLIENT), 0).expect("entry");
    assert_eq!(backends[usize::from(now.slot) - 1], moved);
    assert!(now.last_used_ns > 0);

    // Without affinity nothing is recorded.
    let np2 = NODE_PORT + 1;
    h.add_frontend(&FrontendSpec::nodeport(np2, IPPROTO_TCP, 10, &backends));
    let frame = Pkt::tcp(sa(CLIENT, 23_000), sa(NODE, np2), TCP_SYN).build();
    assert_eq!(h.run(Prog::Xdp, &frame).0, XDP_PASS);
    let no = Affinity4Key {
        fe_port: np2.to_be(),
        ..key(CLIENT)
    };
    assert!(matches!(
        h.affinity().get(&no, 0),
        Err(MapError::KeyNotFound)
    ));
}
