//! Table-driven packet fixtures run through the real programs with `BPF_PROG_RUN`:
//! {description, program, input frame, expected verdict, expected output frame, expected
//! counter deltas, expected conntrack delta}. Fixtures run in order against one set of maps,
//! so "miss, then hit" sequences share conntrack state.
use std::net::{Ipv4Addr, SocketAddrV4};

use lb_common::{Reason, IPPROTO_TCP, IPPROTO_UDP};
use lb_testkit::{
    harness::{
        skb_refuses, stat_deltas, FrontendSpec, Harness, Prog, TC_ACT_OK, TC_ACT_SHOT, XDP_DROP,
        XDP_PASS,
    },
    packet::{
        arp_request, icmp_error, ip_packet, verify_checksums, with_ip_addrs, Pkt, L4, TCP_ACK,
        TCP_FIN, TCP_PSH, TCP_SYN,
    },
};

/// XDP_TX.
const XDP_TX: u32 = 3;
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
const NODE: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
const OTHER: Ipv4Addr = Ipv4Addr::new(10, 9, 9, 9);
const POD0: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 10);
const POD1: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 11);

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

/// What a fixture expects to come out.
#[derive(Clone)]
enum Out {
    /// The frame, unchanged.
    Same,
    /// This frame (checksums verified independently as well).
    Frame(Vec<u8>),
}

#[derive(Clone)]
struct Fixture {
    desc: String,
    prog: Prog,
    input: Vec<u8>,
    verdict: u32,
    output: Out,
    /// Expected packet-count deltas; every other reason must stay unchanged.
    counters: Vec<(Reason, u64)>,
    /// Expected change in the number of conntrack entries.
    ct_delta: i64,
}

fn fx(desc: impl Into<String>, prog: Prog, input: Vec<u8>, verdict: u32, output: Out) -> Fixture {
    let reason = match (prog, verdict, &output) {
        (Prog::Xdp | Prog::TcIngress, XDP_PASS, Out::Frame(_)) => Reason::XdpFwdTracked,
        (Prog::Xdp | Prog::TcIngress, XDP_PASS, Out::Same) => Reason::XdpPassNotService,
        (Prog::Xdp | Prog::TcIngress, _, _) => Reason::XdpDropMalformedL3,
        (Prog::Tc, _, Out::Frame(_)) => Reason::TcRevNat,
        (Prog::Tc, _, Out::Same) => Reason::TcPassNotTracked,
    };
    Fixture {
        desc: desc.into(),
        prog,
        input,
        verdict,
        output,
        counters: vec![(reason, 1)],
        ct_delta: 0,
    }
}

impl Fixture {
    fn reason(mut self, r: Reason) -> Self {
        self.counters = vec![(r, 1)];
        self
    }
    fn ct(mut self, d: i64) -> Self {
        self.ct_delta = d;
        self
    }
}

/// Frontends used by the table.
fn program(h: &mut Harness) {
    h.add_node_addr(NODE);
    h.add_frontend(&FrontendSpec::nodeport(
        30001,
        IPPROTO_TCP,
        1,
        &[sa(POD0, 80)],
    ));
    h.add_frontend(&FrontendSpec::nodeport(
        30053,
        IPPROTO_UDP,
        2,
        &[sa(POD1, 53)],
    ));
    h.add_frontend(&FrontendSpec::hostport(
        None,
        8000,
        IPPROTO_TCP,
        3,
        sa(POD0, 80),
    ));
    h.add_frontend(&FrontendSpec::hostport(
        None,
        5353,
        IPPROTO_UDP,
        4,
        sa(POD1, 53),
    ));
    h.add_frontend(&FrontendSpec::hostport(
        Some(NODE),
        8443,
        IPPROTO_TCP,
        5,
        sa(POD1, 443),
    ));
    h.add_frontend(&FrontendSpec::nodeport(30099, IPPROTO_TCP, 6, &[]));
    h.set_ct_policy(&lb_agent::loader::CtPolicy {
        tcp_syn_s: 0,
        tcp_s: 0,
        tcp_fin_s: 0,
        udp_s: 0,
        reject_per_s: 1000,
    });
    // As the agent runs it: unknown ports leave after one array read.
    h.enable_port_filter(61_000..=61_001);
}

fn table() -> Vec<Fixture> {
    use Out::{Frame, Same};
    let mut t = Vec::new();
    let np_syn = Pkt::tcp(sa(CLIENT, 40000), sa(NODE, 30001), TCP_SYN);
    let np_ack = Pkt::tcp(sa(CLIENT, 40000), sa(NODE, 30001), TCP_ACK | TCP_PSH)
        .payload(b"GET / HTTP/1.1\r\n\r\n");
    let dnat = |p: &Pkt, to: SocketAddrV4| Frame(p.clone().with_dst(to).build());

    // NodePort TCP: miss, then hit.
    t.push(
        fx(
            "nodeport tcp syn: miss, new flow",
            Prog::Xdp,
            np_syn.build(),
            XDP_PASS,
            dnat(&np_syn, sa(POD0, 80)),
        )
        .reason(Reason::XdpFwdNewFlow)
        .ct(2),
    );
    t.push(fx(
        "nodeport tcp data: conntrack hit",
        Prog::Xdp,
        np_ack.build(),
        XDP_PASS,
        dnat(&np_ack, sa(POD0, 80)),
    ));
    let mut mss = np_syn.clone();
    mss.src = sa(CLIENT, 40001);
    mss.tcp_options = vec![2, 4, 0x05, 0xb4];
    t.push(
        fx(
            "nodeport tcp syn with MSS option: new flow",
            Prog::Xdp,
            mss.build(),
            XDP_PASS,
            dnat(&mss, sa(POD0, 80)),
        )
        .reason(Reason::XdpFwdNewFlow)
        .ct(2),
    );
    // Ethernet padding: a 60-byte minimum frame carrying a 40-byte IP packet.
    let mut padded = Pkt::tcp(sa(CLIENT, 40000), sa(NODE, 30001), TCP_ACK).build();
    let mut padded_out = Pkt::tcp(sa(CLIENT, 40000), sa(POD0, 80), TCP_ACK).build();
    padded.resize(60, 0);
    padded_out.resize(60, 0);
    t.push(fx(
        "nodeport tcp ack in a padded 60-byte frame: hit",
        Prog::Xdp,
        padded,
        XDP_PASS,
        Frame(padded_out),
    ));

    // NodePort UDP: miss, hit, and a zero checksum that must stay zero.
    let np_udp = Pkt::udp(sa(CLIENT, 41000), sa(NODE, 30053)).payload(b"query");
    t.push(
        fx(
            "nodeport udp: miss, new flow",
            Prog::Xdp,
            np_udp.build(),
            XDP_PASS,
            dnat(&np_udp, sa(POD1, 53)),
        )
        .reason(Reason::XdpFwdNewFlow)
        .ct(2),
    );
    t.push(fx(
        "nodeport udp: conntrack hit",
        Prog::Xdp,
        np_udp.build(),
        XDP_PASS,
        dnat(&np_udp, sa(POD1, 53)),
    ));
    let mut nocsum = Pkt::udp(sa(CLIENT, 41001), sa(NODE, 30053)).payload(b"q");
    nocsum.udp_no_csum = true;
    t.push(
        fx(
            "nodeport udp with checksum 0: stays 0",
            Prog::Xdp,
            nocsum.build(),
            XDP_PASS,
            dnat(&nocsum, sa(POD1, 53)),
        )
        .reason(Reason::XdpFwdNewFlow)
        .ct(2),
    );

    // hostPort, wildcard and hostIP-specific, TCP and UDP.
    let hp = Pkt::tcp(sa(CLIENT, 42000), sa(NODE, 8000), TCP_SYN);
    t.push(
        fx(
            "hostport tcp 8000: miss, new flow",
            Prog::Xdp,
            hp.build(),
            XDP_PASS,
            dnat(&hp, sa(POD0, 80)),
        )
        .reason(Reason::XdpFwdNewFlow)
        .ct(2),
    );
    let hp_ack = Pkt::tcp(sa(CLIENT, 42000), sa(NODE, 8000), TCP_ACK);
    t.push(fx(
        "hostport tcp 8000: hit",
        Prog::Xdp,
        hp_ack.build(),
        XDP_PASS,
        dnat(&hp_ack, sa(POD0, 80)),
    ));
    let hpu = Pkt::udp(sa(CLIENT, 42001), sa(NODE, 5353)).payload(b"mdns");
    t.push(
        fx(
            "hostport udp 5353: miss, new flow",
            Prog::Xdp,
            hpu.build(),
            XDP_PASS,
            dnat(&hpu, sa(POD1, 53)),
        )
        .reason(Reason::XdpFwdNewFlow)
        .ct(2),
    );
    t.push(fx(
        "hostport udp 5353: hit",
        Prog::Xdp,
        hpu.build(),
        XDP_PASS,
        dnat(&hpu, sa(POD1, 53)),
    ));
    let hpx = Pkt::tcp(sa(CLIENT, 42002), sa(NODE, 8443), TCP_SYN);
    t.push(
        fx(
            "hostport with hostIP: miss, new flow",
            Prog::Xdp,
            hpx.build(),
            XDP_PASS,
            dnat(&hpx, sa(POD1, 443)),
        )
        .reason(Reason::XdpFwdNewFlow)
        .ct(2),
    );
    let hpx_other = Pkt::tcp(sa(CLIENT, 42003), sa(OTHER, 8443), TCP_SYN);
    t.push(fx(
        "hostIP hostport on another address: not a service",
        Prog::Xdp,
        hpx_other.build(),
        XDP_PASS,
        Same,
    ));

    // Not for a service: passes untouched.
    let fwd = Pkt::tcp(sa(CLIENT, 43000), sa(OTHER, 30001), TCP_SYN);
    t.push(fx(
        "nodeport port on a non-node address (routed traffic)",
        Prog::Xdp,
        fwd.build(),
        XDP_PASS,
        Same,
    ));
    let ssh = Pkt::tcp(sa(CLIENT, 43001), sa(NODE, 22), TCP_SYN);
    t.push(fx(
        "node port 22, not a service (the port filter passes it)",
        Prog::Xdp,
        ssh.build(),
        XDP_PASS,
        Same,
    ));
    let direct = Pkt::tcp(sa(CLIENT, 43002), sa(POD0, 80), TCP_SYN);
    t.push(fx(
        "direct to a pod IP, not a service",
        Prog::Xdp,
        direct.build(),
        XDP_PASS,
        Same,
    ));
    let mut icmp = Pkt::tcp(sa(CLIENT, 0), sa(NODE, 0), 0);
    icmp.l4 = L4::Other(1);
    t.push(fx(
        "icmp echo to the node",
        Prog::Xdp,
        icmp.build(),
        XDP_PASS,
        Same,
    ));
    t.push(
        fx(
            "arp request",
            Prog::Xdp,
            arp_request(CLIENT, NODE),
            XDP_PASS,
            Same,
        )
        .reason(Reason::XdpPassNonIpv4),
    );
    let mut v6 = np_syn.build();
    v6[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
    t.push(fx("ipv6 ethertype", Prog::Xdp, v6, XDP_PASS, Same).reason(Reason::XdpPassNonIpv4));

    // Service without a backend: kube-proxy's REJECT, an ICMP port unreachable from the
    // address the client used, quoting its IPv4 header and 8 bytes of TCP; no conntrack.
    let nb = Pkt::tcp(sa(CLIENT, 44000), sa(NODE, 30099), TCP_SYN);
    // Sent back to where the SYN came from: the MACs swapped.
    let back = |mut f: Vec<u8>| {
        let (d, rest) = f.split_at_mut(6);
        d.swap_with_slice(&mut rest[..6]);
        f
    };
    let reject = back(icmp_error(
        NODE,
        CLIENT,
        3,
        3,
        [0; 4],
        &ip_packet(&nb.build(), 28),
    ));
    t.push(
        fx(
            "nodeport with no backend: icmp port unreachable (XDP_TX)",
            Prog::Xdp,
            nb.build(),
            XDP_TX,
            Frame(reject),
        )
        .reason(Reason::XdpRejectNoBackend),
    );
    let nb_data = Pkt::tcp(sa(CLIENT, 44000), sa(NODE, 30099), TCP_ACK).payload(&[7; 600]);
    let reject = back(icmp_error(
        NODE,
        CLIENT,
        3,
        3,
        [0; 4],
        &ip_packet(&nb_data.build(), 28),
    ));
    t.push(
        fx(
            "no backend, 654-byte frame: the reject is 70 bytes",
            Prog::Xdp,
            nb_data.build(),
            XDP_TX,
            Frame(reject),
        )
        .reason(Reason::XdpRejectNoBackend),
    );

    // IP options and fragments: passed untouched (documented policy).
    let mut opts = np_syn.clone();
    opts.src = sa(CLIENT, 44001);
    opts.ip_options = vec![1, 1, 1, 0]; // NOP NOP NOP EOL
    t.push(
        fx(
            "ip options to a nodeport: pass untouched",
            Prog::Xdp,
            opts.build(),
            XDP_PASS,
            Same,
        )
        .reason(Reason::XdpPassIpOptions),
    );
    // Fragments: the first is translated like any packet and its translation recorded; the
    // later ones of the same datagram (source, destination, id, protocol) get the same
    // addresses; one of an unknown datagram passes untouched.
    let mut mf = Pkt::udp(sa(CLIENT, 41100), sa(NODE, 30053)).payload(b"first part");
    mf.frag_off = 0x2000;
    mf.id = 0x4242;
    t.push(
        fx(
            "first fragment (MF) to a nodeport: DNAT, translation recorded",
            Prog::Xdp,
            mf.build(),
            XDP_PASS,
            dnat(&mf, sa(POD1, 53)),
        )
        .reason(Reason::XdpFwdNewFlow)
        .ct(2),
    );
    let mut later = Pkt::udp(sa(CLIENT, 41100), sa(NODE, 30053)).payload(b"second part");
    later.frag_off = 0x0002;
    later.id = 0x4242;
    t.push(
        fx(
            "later fragment (offset 16) of that datagram: the same destination",
            Prog::Xdp,
            later.build(),
            XDP_PASS,
            Frame(with_ip_addrs(&later.build(), None, Some(POD1))),
        )
        .reason(Reason::XdpFragFwd),
    );
    let mut stray = later.clone();
    stray.id = 0x4343;
    t.push(
        fx(
            "later fragment of an unknown datagram: pass untouched",
            Prog::Xdp,
            stray.build(),
            XDP_PASS,
            Same,
        )
        .reason(Reason::XdpPassFragment),
    );

    // ICMP errors quoting a DNATed flow (the TCP nodeport flow from CLIENT:40000 above).
    // A router on the client's path quotes the reply we sent (frontend -> client): it goes to
    // the backend, quoting backend -> client. Whole quote (TCP checksum quoted too).
    let reply_sent = Pkt::tcp(sa(NODE, 30001), sa(CLIENT, 40000), TCP_ACK).payload(&[1; 40]);
    let reply_orig = reply_sent.clone().with_src(sa(POD0, 80));
    t.push(
        fx(
            "icmp frag-needed from a router for a nodeport flow: to the backend",
            Prog::Xdp,
            icmp_error(
                OTHER,
                NODE,
                3,
                4,
                [0, 0, 0x05, 0x00],
                &ip_packet(&reply_sent.build(), 576),
            ),
            XDP_PASS,
            Frame(icmp_error(
                OTHER,
                POD0,
                3,
                4,
                [0, 0, 0x05, 0x00],
                &ip_packet(&reply_orig.build(), 576),
            )),
        )
        .reason(Reason::XdpIcmpErrDnat),
    );
    // UDP, a 28-byte quote (IPv4 header and the UDP header with its checksum).
    let udp_sent = Pkt::udp(sa(NODE, 30053), sa(CLIENT, 41000)).payload(b"answer");
    let udp_orig = udp_sent.clone().with_src(sa(POD1, 53));
    let quote_in = ip_packet(&udp_sent.build(), 28);
    // The quoted UDP checksum is the whole datagram's, updated for the new source.
    let quote_out = ip_packet(&udp_orig.build(), 28);
    t.push(
        fx(
            "icmp time exceeded for a udp nodeport flow, 28-byte quote: to the backend",
            Prog::Xdp,
            icmp_error(OTHER, NODE, 11, 0, [0; 4], &quote_in),
            XDP_PASS,
            Frame(icmp_error(OTHER, POD1, 11, 0, [0; 4], &quote_out)),
        )
        .reason(Reason::XdpIcmpErrDnat),
    );
    let unknown = Pkt::tcp(sa(NODE, 30001), sa(CLIENT, 49999), TCP_ACK);
    t.push(fx(
        "icmp error quoting no flow of ours: pass untouched",
        Prog::Xdp,
        icmp_error(
            OTHER,
            NODE,
            3,
            4,
            [0, 0, 5, 0],
            &ip_packet(&unknown.build(), 48),
        ),
        XDP_PASS,
        Same,
    ));

    // TC egress: an ICMP port unreachable the backend sends about a DNATed datagram
    // (client -> backend) leaves from the frontend, quoting client -> frontend.
    let got = Pkt::udp(sa(CLIENT, 41000), sa(POD1, 53)).payload(b"query");
    let sent = Pkt::udp(sa(CLIENT, 41000), sa(NODE, 30053)).payload(b"query");
    t.push(
        fx(
            "tc: icmp port unreachable from the backend: from the frontend, quoting it",
            Prog::Tc,
            icmp_error(POD1, CLIENT, 3, 3, [0; 4], &ip_packet(&got.build(), 576)),
            TC_ACT_OK,
            Frame(icmp_error(
                NODE,
                CLIENT,
                3,
                3,
                [0; 4],
                &ip_packet(&sent.build(), 576),
            )),
        )
        .reason(Reason::TcIcmpErrRevNat),
    );
    // TC egress: a fragmented reply: the first fragment is reverse-NATed and recorded, the
    // next one gets the same source.
    let mut r1 = Pkt::udp(sa(POD1, 53), sa(CLIENT, 41000)).payload(b"big answer, part 1");
    r1.frag_off = 0x2000;
    r1.id = 0x5151;
    t.push(fx(
        "tc: first fragment of a reply: reverse NAT, recorded",
        Prog::Tc,
        r1.build(),
        TC_ACT_OK,
        Frame(r1.clone().with_src(sa(NODE, 30053)).build()),
    ));
    let mut r2 = Pkt::udp(sa(POD1, 53), sa(CLIENT, 41000)).payload(b"part 2 of it");
    r2.frag_off = 0x0003;
    r2.id = 0x5151;
    t.push(
        fx(
            "tc: later fragment of that reply: the frontend as its source",
            Prog::Tc,
            r2.build(),
            TC_ACT_OK,
            Frame(with_ip_addrs(&r2.build(), Some(NODE), None)),
        )
        .reason(Reason::TcFragRevNat),
    );

    // Malformed headers: dropped, never rewritten, no conntrack.
    let good = np_syn.build();
    let mut bad_ihl = good.clone();
    bad_ihl[14] = 0x44;
    t.push(fx("bad IHL 4", Prog::Xdp, bad_ihl, XDP_DROP, Same));
    let mut bad_ver = good.clone();
    bad_ver[14] = 0x65;
    t.push(fx(
        "IP version 6 in an IPv4 ethertype",
        Prog::Xdp,
        bad_ver,
        XDP_DROP,
        Same,
    ));
    let mut long_tot = good.clone();
    long_tot[16..18].copy_from_slice(&41u16.to_be_bytes());
    t.push(fx(
        "tot_len larger than the frame",
        Prog::Xdp,
        long_tot,
        XDP_DROP,
        Same,
    ));
    let mut short_tot = good.clone();
    short_tot[16..18].copy_from_slice(&19u16.to_be_bytes());
    t.push(fx(
        "tot_len smaller than the IP header",
        Prog::Xdp,
        short_tot,
        XDP_DROP,
        Same,
    ));
    let mut doff4 = good.clone();
    doff4[14 + 20 + 12] = 4 << 4;
    t.push(
        fx("TCP data offset 4", Prog::Xdp, doff4, XDP_DROP, Same)
            .reason(Reason::XdpDropMalformedL4),
    );
    let mut doff15 = good.clone();
    doff15[14 + 20 + 12] = 15 << 4;
    t.push(
        fx(
            "TCP data offset 15, beyond the frame",
            Prog::Xdp,
            doff15,
            XDP_DROP,
            Same,
        )
        .reason(Reason::XdpDropMalformedL4),
    );
    let udp_good = np_udp.build();
    let mut udp_short = udp_good.clone();
    udp_short[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&7u16.to_be_bytes());
    t.push(
        fx("UDP length 7", Prog::Xdp, udp_short, XDP_DROP, Same).reason(Reason::XdpDropMalformedL4),
    );
    let mut udp_long = udp_good.clone();
    udp_long[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&200u16.to_be_bytes());
    t.push(
        fx(
            "UDP length beyond the IP payload",
            Prog::Xdp,
            udp_long,
            XDP_DROP,
            Same,
        )
        .reason(Reason::XdpDropMalformedL4),
    );
    // Truncated at every length from the Ethernet header to the end of the TCP header.
    for len in 14..good.len() {
        t.push(fx(
            format!("tcp syn truncated to {len} bytes"),
            Prog::Xdp,
            good[..len].to_vec(),
            XDP_DROP,
            Same,
        ));
    }
    // The same truncations with a tot_len that agrees with the frame: the L4 check must catch them.
    for len in 34..good.len() {
        let f = with_tot_len(&good[..len]);
        t.push(
            fx(
                format!(
                    "tcp header truncated to {} bytes, consistent tot_len",
                    len - 34
                ),
                Prog::Xdp,
                f,
                XDP_DROP,
                Same,
            )
            .reason(Reason::XdpDropMalformedL4),
        );
    }
    for len in 34..42 {
        let f = with_tot_len(&udp_good[..len]);
        t.push(
            fx(
                format!(
                    "udp header truncated to {} bytes, consistent tot_len",
                    len - 34
                ),
                Prog::Xdp,
                f,
                XDP_DROP,
                Same,
            )
            .reason(Reason::XdpDropMalformedL4),
        );
    }

    // Replies through TC egress: reverse NAT to the frontend the client used.
    let rep = Pkt::tcp(sa(POD0, 80), sa(CLIENT, 40000), TCP_SYN | TCP_ACK);
    t.push(fx(
        "nodeport tcp reply: reverse NAT",
        Prog::Tc,
        rep.build(),
        TC_ACT_OK,
        Frame(rep.clone().with_src(sa(NODE, 30001)).build()),
    ));
    let rep_data = Pkt::tcp(sa(POD0, 80), sa(CLIENT, 40000), TCP_ACK | TCP_PSH)
        .payload(b"HTTP/1.1 200 OK\r\n\r\npod0\n");
    t.push(fx(
        "nodeport tcp reply with data: reverse NAT",
        Prog::Tc,
        rep_data.build(),
        TC_ACT_OK,
        Frame(rep_data.clone().with_src(sa(NODE, 30001)).build()),
    ));
    let rep_udp = Pkt::udp(sa(POD1, 53), sa(CLIENT, 41000)).payload(b"answer");
    t.push(fx(
        "nodeport udp reply: reverse NAT",
        Prog::Tc,
        rep_udp.build(),
        TC_ACT_OK,
        Frame(rep_udp.clone().with_src(sa(NODE, 30053)).build()),
    ));
    let mut rep_nocsum = Pkt::udp(sa(POD1, 53), sa(CLIENT, 41001)).payload(b"a");
    rep_nocsum.udp_no_csum = true;
    t.push(fx(
        "udp reply with checksum 0: stays 0",
        Prog::Tc,
        rep_nocsum.build(),
        TC_ACT_OK,
        Frame(rep_nocsum.clone().with_src(sa(NODE, 30053)).build()),
    ));
    let rep_hp = Pkt::tcp(sa(POD1, 443), sa(CLIENT, 42002), TCP_SYN | TCP_ACK);
    t.push(fx(
        "hostIP hostport reply: reverse NAT",
        Prog::Tc,
        rep_hp.build(),
        TC_ACT_OK,
        Frame(rep_hp.clone().with_src(sa(NODE, 8443)).build()),
    ));
    let untracked = Pkt::tcp(sa(POD0, 80), sa(CLIENT, 55555), TCP_ACK);
    t.push(fx(
        "reply of an untracked flow: untouched",
        Prog::Tc,
        untracked.build(),
        TC_ACT_OK,
        Same,
    ));
    t.push(
        fx(
            "arp on egress: untouched",
            Prog::Tc,
            arp_request(NODE, CLIENT),
            TC_ACT_OK,
            Same,
        )
        .reason(Reason::TcPassOther),
    );

    // A FIN marks the flow closing; a new SYN on the same tuple then picks afresh.
    let fin = Pkt::tcp(sa(CLIENT, 40000), sa(NODE, 30001), TCP_FIN | TCP_ACK);
    t.push(fx(
        "nodeport tcp fin: hit",
        Prog::Xdp,
        fin.build(),
        XDP_PASS,
        dnat(&fin, sa(POD0, 80)),
    ));
    t.push(
        fx(
            "syn reusing a closed tuple: new flow",
            Prog::Xdp,
            np_syn.build(),
            XDP_PASS,
            dnat(&np_syn, sa(POD0, 80)),
        )
        .reason(Reason::XdpFwdNewFlow),
    );
    t
}

/// Set tot_len to match a (truncated) frame and fix the IP header checksum.
fn with_tot_len(frame: &[u8]) -> Vec<u8> {
    let mut f = frame.to_vec();
    let tot = (f.len() - 14) as u16;
    f[16..18].copy_from_slice(&tot.to_be_bytes());
    f[24..26].copy_from_slice(&[0, 0]);
    let c = !lb_testkit::packet::fold(lb_testkit::packet::sum16(&f[14..34]));
    f[24..26].copy_from_slice(&c.to_be_bytes());
    f
}

/// Run `table` in order through `h`, each fixture by `map` (its program, verdict, output
/// and counters as that run expects them; `None`: the fixture cannot run there). Returns
/// the failures and how many fixtures ran.
fn run_table(
    h: &mut Harness,
    table: &[Fixture],
    mut map: impl FnMut(&Fixture) -> Option<Fixture>,
) -> (Vec<String>, usize) {
    let mut failures = Vec::new();
    let mut ran = 0;
    for f in table.iter().filter_map(&mut map) {
        ran += 1;
        let before = h.stats();
        let ct_before = h.ct_len() as i64;
        let (verdict, out) = h.run(f.prog, &f.input);
        let deltas = stat_deltas(&before, &h.stats());
        let ct_delta = h.ct_len() as i64 - ct_before;
        let mut errs = Vec::new();
        if verdict != f.verdict {
            errs.push(format!("verdict {verdict}, want {}", f.verdict));
        }
        match &f.output {
            Out::Same if out != f.input => errs.push(format!(
                "frame changed:\n  in  {:02x?}\n  out {:02x?}",
                f.input, out
            )),
            Out::Frame(want) => {
                if &out != want {
                    errs.push(format!(
                        "frame differs:\n  got  {out:02x?}\n  want {want:02x?}"
                    ));
                }
                if let Err(e) = verify_checksums(&out) {
                    errs.push(format!("output checksum: {e}"));
                }
            }
            Out::Same => {}
        }
        let want: std::collections::BTreeMap<Reason, (u64, u64)> = f
            .counters
            .iter()
            .map(|(r, n)| (*r, (*n, n * f.input.len() as u64)))
            .collect();
        if deltas != want {
            errs.push(format!("counter deltas {deltas:?}, want {want:?}"));
        }
        if ct_delta != f.ct_delta {
            errs.push(format!("conntrack delta {ct_delta}, want {}", f.ct_delta));
        }
        if !errs.is_empty() {
            failures.push(format!("[{:?}: {}] {}", f.prog, f.desc, errs.join("; ")));
        }
    }
    (failures, ran)
}

#[test]
fn packet_fixtures() {
    let mut h = Harness::new("fixtures", &Default::default());
    program(&mut h);
    let table = table();
    assert!(
        table.len() >= 30,
        "the table must keep at least 30 fixtures"
    );
    let (failures, ran) = run_table(&mut h, &table, |f| Some(f.clone()));
    println!("{ran} packet fixtures run");
    for (prog, insns) in h.datapath.verified_insns().expect("program info") {
        println!("verifier: {prog} processed {insns} instructions");
        assert!(
            insns > 0,
            "{prog}: the kernel reports no verified instruction count"
        );
    }
    assert!(
        failures.is_empty(),
        "{} of {} fixtures failed:\n{}",
        failures.len(),
        ran,
        failures.join("\n")
    );
}

/// `--attach tc`: the same table, in the same order (the TC egress fixtures too, which
/// depend on the flows ingress created), with every XDP fixture run through `lb_tc_ingress`
/// instead. The frames, checksums, counters and conntrack changes must be the XDP ones,
/// byte for byte; the verdict is the TC twin of the XDP one (pass: `TC_ACT_OK`, drop:
/// `TC_ACT_SHOT`). Two differences by design: the no-backend reject drops at TC (counted
/// `xdp_drop_no_backend`), and frames shorter than an Ethernet header or their fixed IP
/// header cannot reach TC (the kernel refuses them). Run in a namespace of its own with no
/// routes, so every FIB lookup fails and packets go to the stack, as the XDP table's do.
#[test]
fn packet_fixtures_through_tc_ingress() {
    lb_testkit::lab::require_root();
    let ns = lb_testkit::lab::Netns::empty("fx-tc");
    let mut h = Harness::new("fixtures-tc", &Default::default());
    program(&mut h);
    let mut skipped = Vec::new();
    let (failures, ran) = ns.enter(|| {
        run_table(&mut h, &table(), |f| {
            if f.prog != Prog::Xdp {
                return Some(f.clone());
            }
            // BPF_PROG_RUN refuses such frames as skbs: they cannot reach TC.
            let short = skb_refuses(&f.input);
            if short {
                skipped.push(f.desc.clone());
                return None;
            }
            let mut t = f.clone();
            t.prog = Prog::TcIngress;
            t.verdict = match f.verdict {
                XDP_PASS => TC_ACT_OK,
                XDP_DROP => TC_ACT_SHOT,
                XDP_TX => {
                    // The reject: no ICMP from TC, the packet is dropped and counted.
                    assert_eq!(
                        f.counters,
                        vec![(Reason::XdpRejectNoBackend, 1)],
                        "{}",
                        f.desc
                    );
                    t.output = Out::Same;
                    t.counters = vec![(Reason::XdpDropNoBackend, 1)];
                    TC_ACT_SHOT
                }
                v => panic!("[{}] no TC twin for XDP verdict {v}", f.desc),
            };
            Some(t)
        })
    });
    println!(
        "{ran} packet fixtures run through TC ingress; skipped (too short for an skb): {skipped:?}"
    );
    assert!(ran >= 30, "only {ran} fixtures ran");
    assert!(
        failures.is_empty(),
        "{} of {} fixtures failed through TC ingress:\n{}",
        failures.len(),
        ran,
        failures.join("\n")
    );
}

/// Output destination of a DNATed frame.
fn dst_of(frame: &[u8]) -> SocketAddrV4 {
    let ip = Ipv4Addr::new(frame[30], frame[31], frame[32], frame[33]);
    SocketAddrV4::new(ip, u16::from_be_bytes([frame[36], frame[37]]))
}

#[test]
fn new_flows_spread_over_backends_and_stick() {
    let mut h = Harness::new("spread", &Default::default());
    h.add_node_addr(NODE);
    let backends = [sa(POD0, 80), sa(POD1, 80)];
    h.add_frontend(&FrontendSpec::nodeport(30002, IPPROTO_TCP, 7, &backends));
    let mut hits = std::collections::BTreeMap::new();
    for port in 20000..21000u16 {
        let syn = Pkt::tcp(sa(CLIENT, port), sa(NODE, 30002), TCP_SYN).build();
        let (v, out) = h.run(Prog::Xdp, &syn);
        assert_eq!(v, XDP_PASS);
        verify_checksums(&out).expect("rewritten SYN checksums");
        let to = dst_of(&out);
        assert!(backends.contains(&to), "flow went to {to}, not a backend");
        *hits.entry(to).or_insert(0u32) += 1;
        // The flow's next packet goes to the same backend.
        let ack = Pkt::tcp(sa(CLIENT, port), sa(NODE, 30002), TCP_ACK).build();
        let (_, out2) = h.run(Prog::Xdp, &ack);
        assert_eq!(dst_of(&out2), to, "flow {port} moved backend");
    }
    for b in backends {
        let n = hits.get(&b).copied().unwrap_or(0);
        assert!(
            (350..=650).contains(&n),
            "backend {b} got {n} of 1000 new flows: {hits:?}"
        );
    }
    assert_eq!(h.ct_len(), 2000, "one forward + one reply entry per flow");
}

#[test]
fn removed_backend_keeps_established_tcp_but_takes_no_new_flows() {
    use lb_agent::dataplane::Dataplane;
    let mut h = Harness::new("removal", &Default::default());
    h.add_node_addr(NODE);
    let ids = h.add_frontend(&FrontendSpec::nodeport(
        30001,
        IPPROTO_TCP,
        1,
        &[sa(POD0, 80)],
    ));
    let udp_ids = h.add_frontend(&FrontendSpec::nodeport(
        30053,
        IPPROTO_UDP,
        2,
        &[sa(POD0, 53)],
    ));
    let est = Pkt::tcp(sa(CLIENT, 40000), sa(NODE, 30001), TCP_SYN).build();
    assert_eq!(dst_of(&h.run(Prog::Xdp, &est).1), sa(POD0, 80));
    let udp = Pkt::udp(sa(CLIENT, 41000), sa(NODE, 30053))
        .payload(b"x")
        .build();
    assert_eq!(dst_of(&h.run(Prog::Xdp, &udp).1), sa(POD0, 53));

    // Replace pod0 by pod1 in both frontends, as the agent does: new backend, slot, then
    // delete the old backend.
    h.add_frontend(&FrontendSpec::nodeport(
        30001,
        IPPROTO_TCP,
        1,
        &[sa(POD1, 80)],
    ));
    h.add_frontend(&FrontendSpec::nodeport(
        30053,
        IPPROTO_UDP,
        2,
        &[sa(POD1, 53)],
    ));
    h.maps.delete_backend(ids[0]).expect("delete backend");
    h.maps.delete_backend(udp_ids[0]).expect("delete backend");

    let ack = Pkt::tcp(sa(CLIENT, 40000), sa(NODE, 30001), TCP_ACK).build();
    let before = h.stats();
    let (v, out) = h.run(Prog::Xdp, &ack);
    assert_eq!(
        (v, dst_of(&out)),
        (XDP_PASS, sa(POD0, 80)),
        "established flow must keep its backend"
    );
    assert_eq!(
        stat_deltas(&before, &h.stats())
            .get(&Reason::XdpFwdTracked)
            .map(|d| d.0),
        Some(1)
    );

    let new = Pkt::tcp(sa(CLIENT, 40001), sa(NODE, 30001), TCP_SYN).build();
    assert_eq!(
        dst_of(&h.run(Prog::Xdp, &new).1),
        sa(POD1, 80),
        "new flows go to the remaining backend"
    );

    // UDP has no connection to keep: the flow moves to a live backend at once.
    let (_, out) = h.run(Prog::Xdp, &udp);
    assert_eq!(
        dst_of(&out),
        sa(POD1, 53),
        "a UDP flow whose backend is gone re-picks"
    );
    verify_checksums(&out).expect("checksums");

    // The reply of the re-picked UDP flow is reverse-NATed from its new backend.
    let rep = Pkt::udp(sa(POD1, 53), sa(CLIENT, 41000)).payload(b"y");
    let (v, out) = h.run(Prog::Tc, &rep.build());
    assert_eq!(v, TC_ACT_OK);
    assert_eq!(out, rep.clone().with_src(sa(NODE, 30053)).build());
}
