//! NodePort SNAT for remote backends through `BPF_PROG_RUN` (needs root): the forward frame
//! of a new flow to a remote backend and the backend's reply, byte for byte, with checksums,
//! verdicts, counters and the `LB4_SNAT` entries. Run in the root namespace, whose FIB has no
//! route to the lab addresses, so both leave through the counted `XDP_PASS` fallback.
use std::net::{Ipv4Addr, SocketAddrV4};

use lb_agent::loader::{set_snat, PinLayout};
use lb_common::{service::backend_flags, Reason, IPPROTO_TCP};
use lb_testkit::{
    harness::{stat_deltas, FrontendSpec, Harness, Prog, XDP_DROP, XDP_PASS},
    packet::{verify_checksums, Pkt, TCP_ACK, TCP_SYN},
};

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
const NODE: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 10);
const REMOTE_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
const NODE_PORT: u16 = 30080;

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

fn src_of(f: &[u8]) -> SocketAddrV4 {
    sa(
        Ipv4Addr::new(f[26], f[27], f[28], f[29]),
        u16::from_be_bytes([f[34], f[35]]),
    )
}

fn dst_of(f: &[u8]) -> SocketAddrV4 {
    sa(
        Ipv4Addr::new(f[30], f[31], f[32], f[33]),
        u16::from_be_bytes([f[36], f[37]]),
    )
}

#[test]
fn snat_forward_and_reply_frames() {
    let mut h = Harness::new("snat", &Default::default());
    h.add_node_addr(NODE);
    let pins = PinLayout::new(h.pin_dir());
    set_snat(&pins, Some(NODE), &(61_000..=61_003)).expect("SNAT config");
    let backend = sa(REMOTE_POD, 8080);
    h.add_frontend(&FrontendSpec::nodeport(NODE_PORT, IPPROTO_TCP, 3, &[backend]).remote());
    let before = h.stats();

    let syn = Pkt::tcp(sa(CLIENT, 40_000), sa(NODE, NODE_PORT), TCP_SYN).build();
    let (v, out) = h.run(Prog::Xdp, &syn);
    assert_eq!(v, XDP_PASS);
    verify_checksums(&out).expect("SNATed SYN checksums");
    assert_eq!(dst_of(&out), backend);
    let snat_src = src_of(&out);
    assert_eq!(*snat_src.ip(), NODE);
    assert!((61_000..=61_003).contains(&snat_src.port()), "{snat_src}");
    assert_eq!(out[22], syn[22], "TTL untouched on the XDP_PASS fallback");

    // The backend's SYN-ACK comes back to the SNAT address and port.
    let synack = Pkt::tcp(backend, snat_src, TCP_SYN | TCP_ACK).build();
    let (v, back) = h.run(Prog::Xdp, &synack);
    assert_eq!(v, XDP_PASS);
    verify_checksums(&back).expect("reverse-SNATed SYN-ACK checksums");
    assert_eq!(
        src_of(&back),
        sa(NODE, NODE_PORT),
        "source = the frontend the client used"
    );
    assert_eq!(
        dst_of(&back),
        sa(CLIENT, 40_000),
        "destination = the client"
    );
    assert_eq!(
        &back[34 + 4..34 + 14],
        &synack[34 + 4..34 + 14],
        "seq/ack/flags kept"
    );

    // The client's ACK: tracked, the same SNAT source.
    let ack = Pkt::tcp(sa(CLIENT, 40_000), sa(NODE, NODE_PORT), TCP_ACK).build();
    let (_, out2) = h.run(Prog::Xdp, &ack);
    verify_checksums(&out2).expect("tracked SNATed ACK checksums");
    assert_eq!((src_of(&out2), dst_of(&out2)), (snat_src, backend));

    let d = stat_deltas(&before, &h.stats());
    assert_eq!(d.get(&Reason::XdpSnatPass).map(|c| c.0), Some(2), "{d:?}");
    assert_eq!(
        d.get(&Reason::XdpRevSnatPass).map(|c| c.0),
        Some(1),
        "{d:?}"
    );
    assert_eq!(d.len(), 2, "{d:?}");

    // Four SNAT ports, one backend: four more clients fit (the first flow holds one port),
    // the fifth new flow is a counted drop; nothing is half-made.
    let ct_before = h.ct_len();
    let mut drops = 0;
    for c in 1..=5u8 {
        let syn = Pkt::tcp(
            sa(Ipv4Addr::new(10, 200, 1, c), 40_000),
            sa(NODE, NODE_PORT),
            TCP_SYN,
        )
        .build();
        let (v, out) = h.run(Prog::Xdp, &syn);
        if v == XDP_DROP {
            drops += 1;
        } else {
            verify_checksums(&out).expect("checksums");
            let p = src_of(&out).port();
            assert!(
                (61_000..=61_003).contains(&p) && p != snat_src.port(),
                "port {p} reused"
            );
        }
    }
    assert!(drops >= 2, "{drops} drops: 4 ports cannot carry 6 flows");
    let d = stat_deltas(&before, &h.stats());
    assert_eq!(
        d.get(&Reason::XdpDropSnatExhausted).map(|c| c.0),
        Some(drops),
        "{d:?}"
    );
    assert_eq!(
        h.ct_len(),
        ct_before + (5 - drops as usize),
        "a dropped flow leaves no entry"
    );
}

/// A local backend of the same kind of frontend is not SNATed.
#[test]
fn local_backends_are_not_snated() {
    let mut h = Harness::new("nosnat", &Default::default());
    h.add_node_addr(NODE);
    set_snat(&PinLayout::new(h.pin_dir()), Some(NODE), &(61_000..=65_535)).expect("SNAT");
    h.add_frontend(&FrontendSpec::nodeport(
        NODE_PORT,
        IPPROTO_TCP,
        3,
        &[sa(Ipv4Addr::new(10, 244, 0, 10), 8080)],
    ));
    let syn = Pkt::tcp(sa(CLIENT, 40_000), sa(NODE, NODE_PORT), TCP_SYN).build();
    let before = h.stats();
    let (v, out) = h.run(Prog::Xdp, &syn);
    assert_eq!(v, XDP_PASS);
    assert_eq!(src_of(&out), sa(CLIENT, 40_000));
    let d = stat_deltas(&before, &h.stats());
    assert_eq!(
        d.keys().copied().collect::<Vec<_>>(),
        [Reason::XdpFwdNewFlow]
    );
    let _ = backend_flags::REMOTE;
}
