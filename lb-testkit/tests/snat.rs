//! NodePort SNAT for remote backends through `BPF_PROG_RUN` (needs root): the forward frame
//! of a new flow to a remote backend and the backend's reply, byte for byte, with checksums,
//! verdicts, counters and the `LB4_SNAT` entries. Run in the root namespace, whose FIB has no
//! route to the lab addresses, so both leave through the counted `XDP_PASS` fallback.
use std::net::{Ipv4Addr, SocketAddrV4};

use lb_agent::loader::{set_snat, PinLayout};
use lb_common::{Reason, IPPROTO_TCP};
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
    // The probes walk all 4 ports, so exactly the 2 flows beyond them are dropped.
    assert_eq!(drops, 2, "4 ports cannot carry 6 flows");
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
}

/// One byte-exact fixture: {description, input frame, expected verdict, expected frame}.
struct Fixture {
    what: &'static str,
    input: Vec<u8>,
    verdict: u32,
    output: Vec<u8>,
}

fn run_fixtures(
    h: &mut Harness,
    table: &[Fixture],
    run: impl Fn(&mut Harness, &[u8]) -> (u32, Vec<u8>),
) {
    let mut failures = Vec::new();
    for f in table {
        let (v, out) = run(h, &f.input);
        if v != f.verdict {
            failures.push(format!("{}: verdict {v}, want {}", f.what, f.verdict));
        } else if out != f.output {
            failures.push(format!(
                "{}:\n  got  {out:02x?}\n  want {:02x?}",
                f.what, f.output
            ));
        } else if let Err(e) = verify_checksums(&out) {
            failures.push(format!("{}: {e}", f.what));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The SNAT forward packet and the SNAT reply, TCP and UDP, byte for byte (one SNAT port,
/// so the translation is deterministic). In the root namespace the FIB has no route to the
/// lab's addresses: both go to the stack, TTL and MACs untouched.
#[test]
fn snat_fixtures_byte_exact() {
    let mut h = Harness::new("snatfix", &Default::default());
    h.add_node_addr(NODE);
    set_snat(&PinLayout::new(h.pin_dir()), Some(NODE), &(61_000..=61_000)).expect("SNAT");
    let tcp_be = sa(REMOTE_POD, 8080);
    let udp_be = sa(REMOTE_POD, 53);
    h.add_frontend(&FrontendSpec::nodeport(NODE_PORT, IPPROTO_TCP, 3, &[tcp_be]).remote());
    h.add_frontend(&FrontendSpec::nodeport(30053, lb_common::IPPROTO_UDP, 4, &[udp_be]).remote());
    let client = sa(CLIENT, 40_000);
    let snat = sa(NODE, 61_000);
    let fe_tcp = sa(NODE, NODE_PORT);
    let fe_udp = sa(NODE, 30053);
    let table = [
        Fixture {
            what: "SNAT forward: new TCP flow to a remote backend",
            input: Pkt::tcp(client, fe_tcp, TCP_SYN).build(),
            verdict: XDP_PASS,
            output: Pkt::tcp(snat, tcp_be, TCP_SYN).build(),
        },
        Fixture {
            what: "SNAT reply: the remote backend's SYN-ACK back to the client",
            input: Pkt::tcp(tcp_be, snat, TCP_SYN | TCP_ACK).build(),
            verdict: XDP_PASS,
            output: Pkt::tcp(fe_tcp, client, TCP_SYN | TCP_ACK).build(),
        },
        Fixture {
            what: "SNAT forward: tracked TCP ACK",
            input: Pkt::tcp(client, fe_tcp, TCP_ACK).payload(b"GET /").build(),
            verdict: XDP_PASS,
            output: Pkt::tcp(snat, tcp_be, TCP_ACK).payload(b"GET /").build(),
        },
        Fixture {
            what: "SNAT forward: new UDP flow",
            input: Pkt::udp(client, fe_udp).payload(b"query").build(),
            verdict: XDP_PASS,
            output: Pkt::udp(snat, udp_be).payload(b"query").build(),
        },
        Fixture {
            what: "SNAT reply: UDP answer",
            input: Pkt::udp(udp_be, snat).payload(b"answer").build(),
            verdict: XDP_PASS,
            output: Pkt::udp(fe_udp, client).payload(b"answer").build(),
        },
        Fixture {
            what: "a SNAT port with no flow: not ours, untouched",
            input: Pkt::tcp(sa(REMOTE_POD, 9999), snat, TCP_ACK).build(),
            verdict: XDP_PASS,
            output: Pkt::tcp(sa(REMOTE_POD, 9999), snat, TCP_ACK).build(),
        },
    ];
    let before = h.stats();
    run_fixtures(&mut h, &table, |h, f| h.run(Prog::Xdp, f));
    let d = stat_deltas(&before, &h.stats());
    assert_eq!(d.get(&Reason::XdpSnatPass).map(|c| c.0), Some(3), "{d:?}");
    assert_eq!(
        d.get(&Reason::XdpRevSnatPass).map(|c| c.0),
        Some(2),
        "{d:?}"
    );
    assert_eq!(
        d.get(&Reason::XdpPassNotService).map(|c| c.0),
        Some(1),
        "{d:?}"
    );
    assert_eq!(d.len(), 3, "{d:?}");
}

/// The MAC address of `dev` in a namespace, from `ip -o link show`.
fn mac_of(ns: &lb_testkit::lab::Netns, dev: &str) -> [u8; 6] {
    let out = ns.ip(&["-o", "link", "show", dev]);
    let hex = out
        .split("link/ether ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no MAC in {out}"));
    let mut mac = [0u8; 6];
    for (i, b) in hex.split(':').enumerate().take(6) {
        mac[i] = u8::from_str_radix(b, 16).expect("hex");
    }
    mac
}

/// XDP_TX frames with the MACs from the FIB lookup, run as if received on node0's uplink of a
/// two-node lab: the SNATed SYN goes back out to node1 (next hop of the remote pod CIDR), the
/// reverse-translated SYN-ACK back out to the client, both with TTL 63.
#[test]
fn xdp_tx_frames_take_their_macs_from_the_fib() {
    use lb_testkit::lab::{cluster::node_pod_cidr, Topology, NODE_UPLINK};
    const XDP_TX: u32 = 3;
    let cluster = Topology::new().nodes(2).pods_per_node(1).build();
    cluster.wait_reachable();
    let (node0, node1) = (&cluster.nodes[0], &cluster.nodes[1]);
    assert_eq!(node1.pod_cidr, node_pod_cidr(1));
    let up0 = mac_of(&node0.ns, NODE_UPLINK);
    let next_hop = mac_of(&node1.ns, NODE_UPLINK);
    let client_mac = mac_of(&cluster.client, lb_testkit::lab::CLIENT_IF);
    let ifindex = node0.ns.enter(|| {
        let name = std::ffi::CString::new(NODE_UPLINK).expect("name");
        // SAFETY: a valid NUL-terminated name.
        unsafe { libc::if_nametoindex(name.as_ptr()) }
    });
    assert!(ifindex > 0);

    let mut h = Harness::new("xdptx", &Default::default());
    h.add_node_addr(node0.ip);
    set_snat(
        &PinLayout::new(h.pin_dir()),
        Some(node0.ip),
        &(61_000..=61_000),
    )
    .expect("SNAT");
    let backend = sa(node1.pods[0].ip, 8080);
    h.add_frontend(&FrontendSpec::nodeport(NODE_PORT, IPPROTO_TCP, 3, &[backend]).remote());
    let client = sa(lb_testkit::lab::CLIENT_IP, 40_000);
    let fe = sa(node0.ip, NODE_PORT);
    let snat = sa(node0.ip, 61_000);
    let with_macs = |p: Pkt, src: [u8; 6], dst: [u8; 6], ttl: u8| {
        let mut p = p;
        p.src_mac = src;
        p.dst_mac = dst;
        p.ttl = ttl;
        p.build()
    };
    let table = [
        Fixture {
            what: "SNAT forward SYN: XDP_TX to node1, MACs from the FIB",
            input: with_macs(Pkt::tcp(client, fe, TCP_SYN), client_mac, up0, 64),
            verdict: XDP_TX,
            output: with_macs(Pkt::tcp(snat, backend, TCP_SYN), up0, next_hop, 63),
        },
        Fixture {
            what: "SNAT reply SYN-ACK: XDP_TX to the client, MACs from the FIB",
            input: with_macs(
                Pkt::tcp(backend, snat, TCP_SYN | TCP_ACK),
                next_hop,
                up0,
                64,
            ),
            verdict: XDP_TX,
            output: with_macs(Pkt::tcp(fe, client, TCP_SYN | TCP_ACK), up0, client_mac, 63),
        },
        Fixture {
            what: "TTL 1: to the stack (which answers time exceeded), untouched but for NAT",
            input: with_macs(Pkt::tcp(client, fe, TCP_ACK), client_mac, up0, 1),
            verdict: XDP_PASS,
            output: with_macs(Pkt::tcp(snat, backend, TCP_ACK), client_mac, up0, 1),
        },
    ];
    let before = h.stats();
    run_fixtures(&mut h, &table, |h, f| {
        node0.ns.enter(|| h.run_xdp_on(ifindex, f))
    });
    let d = stat_deltas(&before, &h.stats());
    assert_eq!(d.get(&Reason::XdpSnatTx).map(|c| c.0), Some(1), "{d:?}");
    assert_eq!(d.get(&Reason::XdpRevSnatTx).map(|c| c.0), Some(1), "{d:?}");
    assert_eq!(d.get(&Reason::XdpSnatPass).map(|c| c.0), Some(1), "{d:?}");
}
