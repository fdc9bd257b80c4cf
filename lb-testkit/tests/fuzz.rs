//! Fuzzing both kernel programs (`lb_xdp_ingress`, `lb_tc_egress`) through `BPF_PROG_RUN`.
//!
//! * `random_and_mutated_frames`: 1,000,000 frames, each run through XDP and then TC, against
//!   one loaded datapath programmed with NodePort, hostPort and ClusterIP frontends (local
//!   backends, remote backends that get SNAT, sessionAffinity, no backends). Half are
//!   "valid-ish" (correct checksums, random clients, ports, TCP flags, payload lengths, IP and
//!   TCP options, fragment bits, TTL 0/1, Ethernet trailers, replies of flows seen before),
//!   half are those frames mutated (bit flips, truncation, extension, corrupted
//!   IHL/version/tot_len/doff/UDP length/protocol/fragment bits/ethertype). Invariants only,
//!   never exact reasons (the datapath is still growing): valid actions; a rewritten frame
//!   has valid checksums when the input had, and keeps the input's checksum errors exactly
//!   (incremental updates) when it had not; a frame the parser must reject is dropped (XDP)
//!   or passed (TC) untouched; the verdict counters add up to the frames run.
//! * `random_frames_on_the_xdp_forwarding_path`: 100,000 more through XDP as received on a
//!   lab node's uplink, where SNATed flows and their replies find routes and neighbours and
//!   leave with XDP_TX/XDP_REDIRECT (FIB lookup, TTL decrement, MACs), same invariants.
//! * `malformed_frames_leave_no_state`: 100,000 frames that the parser must reject, on a
//!   datapath holding established flows (forward, reply and SNAT entries): each one gets the
//!   malformed verdict and reason of its layer, comes out untouched, and `LB4_CT`, `LB4_SNAT`
//!   and `LB4_AFFINITY` neither gain nor change an entry.
//! * `malformed_corpus`: the regression table. 10,000 malformed frames from a fixed seed
//!   (the generator below, self-contained: it builds its own frames) and the checked-in
//!   per-frame expectation in `fuzz_corpus.txt` (with a digest of the frames, so a changed
//!   generator is noticed). Only malformed-frame verdicts are recorded: they do not depend on
//!   frontends, conntrack lifetimes, ICMP or fragment handling.
//!
//! "Malformed" is the parser's contract (`lb-ebpf/src/parse.rs`, `Reason` docs): XDP (strict)
//! rejects truncated headers, version != 4, IHL < 5, tot_len beyond the frame or below the
//! header, TCP data offset < 5 or beyond tot_len or the frame, UDP length < 8 or beyond the
//! IP payload; TCP/UDP checks apply to unfragmented frames without IP options (those are
//! passed before L4 parsing). TC (lenient, the stack's own egress) rejects truncated
//! Ethernet/IPv4 headers, version != 4, IHL < 5 and L4 headers cut before their checksum
//! field (the reverse NAT rewrites it).
//! `BPF_PROG_RUN` refuses frames shorter than an Ethernet header (so the L2 check cannot be
//! reached), and for TC also IPv4 frames shorter than 34 bytes: those are counted as refused.
//!
//! Datapath bugs the fuzzer found are kept, minimized, as regression tests at the end.
//!
//! `LB_FUZZ_SEED` (decimal or 0x-hex) overrides the seed of the random tests (printed),
//! `LB_FUZZ_FRAMES` the number of frames of the first; `LB_FUZZ_BLESS=1` rewrites the corpus
//! table after a deliberate change of the generator or of the parser's contract.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    time::Instant,
};

use aya::{
    maps::{Array, HashMap, Map, MapData},
    programs::{TestRun, TestRunOptions},
};
use lb_agent::loader::{open_pinned_map, set_snat, PinLayout};
use lb_common::{
    maps, service, Affinity4Key, Affinity4Value, Counter, Ct4Key, Ct4Value, LbConfig, Reason,
    Snat4Value, IPPROTO_TCP, IPPROTO_UDP,
};
use lb_testkit::harness::{
    skb_refuses, FrontendSpec, Harness, Prog, TC_ACT_OK, TC_ACT_SHOT, XDP_DROP, XDP_PASS,
};
use lb_testkit::lab::Netns;

const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;
const TC_ACT_REDIRECT: u32 = 7;

const DEFAULT_SEED: u64 = 0x00f0_2210_c0ff_ee07;
const RANDOM_FRAMES: usize = 1_000_000;
const MALFORMED_FRAMES: usize = 100_000;
const LAB_FRAMES: usize = 100_000;
/// Frames of the TC-ingress random phase.
const TC_INGRESS_FRAMES: usize = 1_000_000;
/// Frames run between two checks of the counters and maps in the malformed phases.
const BATCH: usize = 500;

const CORPUS_SEED: u64 = 0x6c62_2d63_6f72_7075;
const CORPUS_FRAMES: usize = 10_000;
const CORPUS_FILE: &str = "tests/fuzz_corpus.txt";

// ---------------------------------------------------------------------------------------
// Randomness

/// SplitMix64: small, fast, the same sequence everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// In `0..n` (`n > 0`).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// In `lo..=hi`.
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }

    fn percent(&mut self, p: usize) -> bool {
        self.below(100) < p
    }

    fn u8(&mut self) -> u8 {
        self.next() as u8
    }

    fn u16(&mut self) -> u16 {
        self.next() as u16
    }

    fn pick<'a, T>(&mut self, s: &'a [T]) -> &'a T {
        &s[self.below(s.len())]
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(n);
        v
    }
}

fn parse_u64(s: &str) -> Option<u64> {
    let s = s.trim();
    match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name)
        .ok()
        .map(|s| parse_u64(&s).unwrap_or_else(|| panic!("{name}={s}: not a number")))
}

fn fuzz_seed() -> u64 {
    env_u64("LB_FUZZ_SEED").unwrap_or(DEFAULT_SEED)
}

// ---------------------------------------------------------------------------------------
// Topology: the frontends every test programs

const NODE: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
const NODE2: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 5);
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const CLUSTER_IP_EMPTY: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const POD0: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 10);
const POD1: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 11);
const POD2: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 12);
const REMOTE0: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
const REMOTE1: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 11);
const SNAT_MIN: u16 = 61_000;
const SNAT_MAX: u16 = 61_999;
/// Clients whose flows the malformed phases establish first.
const SEED_CLIENTS: [Ipv4Addr; 4] = [
    Ipv4Addr::new(10, 200, 7, 1),
    Ipv4Addr::new(10, 200, 7, 2),
    Ipv4Addr::new(10, 200, 7, 3),
    Ipv4Addr::new(10, 200, 7, 4),
];
const SEED_PORT: u16 = 40_000;

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

/// A frontend and the addresses clients reach it on.
struct Target {
    spec: FrontendSpec,
    addrs: Vec<Ipv4Addr>,
}

fn targets() -> Vec<Target> {
    const TCP: u8 = IPPROTO_TCP;
    const UDP: u8 = IPPROTO_UDP;
    let node = || vec![NODE, NODE2];
    let cluster_ip = |addr, port, proto, svc_id, backends: &[SocketAddrV4]| Target {
        spec: FrontendSpec {
            addr: Some(addr),
            port,
            proto,
            flags: service::flags::CLUSTERIP,
            svc_id,
            backends: backends.to_vec(),
            affinity_timeout_s: 0,
            remote: false,
        },
        addrs: vec![addr],
    };
    vec![
        Target {
            spec: FrontendSpec::nodeport(30001, TCP, 1, &[sa(POD0, 8080), sa(POD1, 8080)]),
            addrs: node(),
        },
        Target {
            spec: FrontendSpec::nodeport(30053, UDP, 2, &[sa(POD1, 53)]),
            addrs: node(),
        },
        Target {
            spec: FrontendSpec::hostport(None, 8000, TCP, 3, sa(POD0, 80)),
            addrs: node(),
        },
        Target {
            spec: FrontendSpec::hostport(None, 5353, UDP, 4, sa(POD2, 5353)),
            addrs: node(),
        },
        Target {
            spec: FrontendSpec::hostport(Some(NODE), 8443, TCP, 5, sa(POD1, 443)),
            addrs: vec![NODE],
        },
        cluster_ip(CLUSTER_IP, 80, TCP, 6, &[sa(POD0, 8080), sa(POD2, 8080)]),
        cluster_ip(CLUSTER_IP, 53, UDP, 7, &[sa(POD1, 53)]),
        Target {
            spec: FrontendSpec::nodeport(30080, TCP, 8, &[sa(REMOTE0, 8080), sa(REMOTE1, 8080)])
                .remote(),
            addrs: node(),
        },
        Target {
            spec: FrontendSpec::nodeport(30081, UDP, 9, &[sa(REMOTE0, 5000)]).remote(),
            addrs: node(),
        },
        Target {
            spec: FrontendSpec::nodeport(30090, TCP, 10, &[sa(POD0, 9090), sa(POD1, 9090)])
                .with_affinity(600),
            addrs: node(),
        },
        Target {
            spec: FrontendSpec::nodeport(30099, TCP, 11, &[]),
            addrs: node(),
        },
        Target {
            spec: FrontendSpec::nodeport(30098, UDP, 12, &[]),
            addrs: node(),
        },
        cluster_ip(CLUSTER_IP_EMPTY, 80, TCP, 13, &[]),
    ]
}

/// A datapath programmed with [`targets`], SNAT on (`NODE`, a small port range) and a flow
/// hash seed derived from `seed`, so a run is reproducible.
fn setup(what: &str, seed: u64) -> (Harness, Vec<Target>) {
    let mut h = Harness::new(what, &Default::default());
    h.add_node_addr(NODE);
    h.add_node_addr(NODE2);
    let pins = PinLayout::new(h.pin_dir());
    set_snat(&pins, Some(NODE), &(SNAT_MIN..=SNAT_MAX)).expect("SNAT config");
    let data = open_pinned_map(&pins, maps::LB_CONFIG).expect("open LB_CONFIG");
    let mut cfg: Array<MapData, LbConfig> = Array::try_from(Map::Array(data)).expect("LB_CONFIG");
    let cur = cfg.get(&0, 0).expect("read LB_CONFIG");
    let hash_seed = (seed as u32) | 1;
    cfg.set(0, LbConfig { hash_seed, ..cur }, 0)
        .expect("write LB_CONFIG");
    let targets = targets();
    for t in &targets {
        h.add_frontend(&t.spec);
    }
    (h, targets)
}

// ---------------------------------------------------------------------------------------
// Frames: a self-contained builder (the corpus must not change when `packet.rs` does)

/// Sum of big-endian 16-bit words (an odd last byte padded with zero), as 32-bit words:
/// the same one's-complement value once folded (2^16 = 1 mod 0xffff), fewer steps in a
/// debug build.
fn sum16(d: &[u8]) -> u64 {
    let mut s = 0u64;
    let mut words = d.chunks_exact(8);
    for w in &mut words {
        let x = u64::from_be_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
        s += (x >> 32) + (x & 0xffff_ffff);
    }
    for (i, b) in words.remainder().iter().enumerate() {
        s += u64::from(*b) << if i % 2 == 0 { 8 } else { 0 };
    }
    s
}

fn fold(mut s: u64) -> u16 {
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

fn be16(f: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([f[off], f[off + 1]])
}

/// Write `v` at `off` if it fits in the frame.
fn set16(f: &mut [u8], off: usize, v: u16) {
    if let Some(b) = f.get_mut(off..off + 2) {
        b.copy_from_slice(&v.to_be_bytes());
    }
}

/// Sum of the TCP/UDP pseudo-header of the frame's IPv4 addresses.
fn pseudo(f: &[u8], proto: u8, len: usize) -> u64 {
    sum16(&f[26..34]) + u64::from(proto) + len as u64
}

/// One frame to build: Ethernet, IPv4 (+ options), TCP (+ options) / UDP / 8 opaque bytes.
struct Spec {
    src: SocketAddrV4,
    dst: SocketAddrV4,
    proto: u8,
    tcp_flags: u8,
    tcp_options: Vec<u8>,
    ip_options: Vec<u8>,
    payload: Vec<u8>,
    frag_off: u16,
    ttl: u8,
    tos: u8,
    id: u16,
    udp_no_csum: bool,
    /// Bytes after the IP packet (Ethernet padding or trailer).
    trailer: Vec<u8>,
}

impl Spec {
    fn build(&self) -> Vec<u8> {
        let ihl = 20 + self.ip_options.len();
        let mut f = Vec::with_capacity(14 + ihl + 60 + self.payload.len() + self.trailer.len());
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02, 0x08, 0x00]);
        f.push(0x40 | (ihl / 4) as u8);
        f.push(self.tos);
        f.extend_from_slice(&[0, 0]); // tot_len, below
        f.extend_from_slice(&self.id.to_be_bytes());
        f.extend_from_slice(&self.frag_off.to_be_bytes());
        f.push(self.ttl);
        f.push(self.proto);
        f.extend_from_slice(&[0, 0]);
        f.extend_from_slice(&self.src.ip().octets());
        f.extend_from_slice(&self.dst.ip().octets());
        f.extend_from_slice(&self.ip_options);
        let l4 = f.len();
        match self.proto {
            IPPROTO_TCP => {
                f.extend_from_slice(&self.src.port().to_be_bytes());
                f.extend_from_slice(&self.dst.port().to_be_bytes());
                f.extend_from_slice(&0x0102_0304u32.to_be_bytes());
                f.extend_from_slice(&0x0a0b_0c0du32.to_be_bytes());
                f.push((((20 + self.tcp_options.len()) / 4) as u8) << 4);
                f.push(self.tcp_flags);
                f.extend_from_slice(&[0xfa, 0xf0, 0, 0, 0, 0]);
                f.extend_from_slice(&self.tcp_options);
            }
            IPPROTO_UDP => {
                f.extend_from_slice(&self.src.port().to_be_bytes());
                f.extend_from_slice(&self.dst.port().to_be_bytes());
                f.extend_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
                f.extend_from_slice(&[0, 0]);
            }
            _ => f.extend_from_slice(&[8, 0, 0, 0, 0, 1, 0, 1]),
        }
        f.extend_from_slice(&self.payload);
        let tot = (f.len() - 14) as u16;
        set16(&mut f, 16, tot);
        let end = f.len();
        match self.proto {
            IPPROTO_TCP => {
                let c = !fold(pseudo(&f, IPPROTO_TCP, end - l4) + sum16(&f[l4..]));
                set16(&mut f, l4 + 16, c);
            }
            IPPROTO_UDP if !self.udp_no_csum => {
                let c = !fold(pseudo(&f, IPPROTO_UDP, end - l4) + sum16(&f[l4..]));
                set16(&mut f, l4 + 6, if c == 0 { 0xffff } else { c });
            }
            IPPROTO_UDP => {}
            _ => {
                let c = !fold(sum16(&f[l4..]));
                set16(&mut f, l4 + 2, c);
            }
        }
        let c = !fold(sum16(&f[14..l4]));
        set16(&mut f, 24, c);
        f.extend_from_slice(&self.trailer);
        f
    }
}

/// A plain frame: no options, DF, TTL 64, a 4-byte payload.
fn plain(src: SocketAddrV4, dst: SocketAddrV4, proto: u8, tcp_flags: u8) -> Spec {
    Spec {
        src,
        dst,
        proto,
        tcp_flags,
        tcp_options: Vec::new(),
        ip_options: Vec::new(),
        payload: b"seed".to_vec(),
        frag_off: 0x4000,
        ttl: 64,
        tos: 0,
        id: 1,
        udp_no_csum: false,
        trailer: Vec::new(),
    }
}

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;

/// A random frame from `src` to `dst`. `plain`: no IP options, no fragment bits, no trailer.
/// `max_payload` bounds the payload length.
fn random_frame(
    rng: &mut Rng,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    proto: u8,
    plain: bool,
    max_payload: usize,
) -> Vec<u8> {
    let tcp_flags = if rng.percent(60) {
        *rng.pick(&[
            TCP_SYN,
            TCP_ACK,
            TCP_PSH | TCP_ACK,
            TCP_FIN | TCP_ACK,
            TCP_RST,
            TCP_RST | TCP_ACK,
            TCP_SYN | TCP_ACK,
        ])
    } else {
        rng.u8()
    };
    let payload_len = match rng.below(100) {
        0..=49 => 0,
        50..=79 => rng.range(1, 64),
        80..=94 => rng.range(65, 512),
        _ => rng.range(513, 1400),
    }
    .min(max_payload);
    let tcp_options = if proto == IPPROTO_TCP && rng.percent(10) {
        let n = 4 * rng.range(1, 10);
        if rng.percent(50) {
            let mut o = vec![2, 4, 0x05, 0xb4];
            o.resize(n, 1);
            o
        } else {
            rng.bytes(n)
        }
    } else {
        Vec::new()
    };
    let ip_options = if !plain && rng.percent(8) {
        let n = 4 * rng.range(1, 10);
        match rng.below(3) {
            0 => {
                let mut o = vec![1; n - 1];
                o.push(0);
                o
            }
            1 => {
                let mut o = vec![7, n as u8 - 1, 4];
                o.resize(n, 0);
                o
            }
            _ => rng.bytes(n),
        }
    } else {
        Vec::new()
    };
    let frag_off = if !plain && rng.percent(10) {
        match rng.below(4) {
            0 => 0x2000,
            1 => rng.range(1, 0x1fff) as u16,
            2 => 0x2000 | rng.range(1, 0x1fff) as u16,
            _ => rng.u16(),
        }
    } else if rng.percent(50) {
        0x4000
    } else {
        0
    };
    let ttl = match rng.below(100) {
        0..=2 => 0,
        3..=12 => 1,
        _ => rng.range(2, 255) as u8,
    };
    let trailer = if !plain && rng.percent(10) {
        let n = rng.range(1, 32);
        rng.bytes(n)
    } else {
        Vec::new()
    };
    Spec {
        src,
        dst,
        proto,
        tcp_flags,
        tcp_options,
        ip_options,
        payload: rng.bytes(payload_len),
        frag_off,
        ttl,
        tos: if rng.percent(20) { rng.u8() } else { 0 },
        id: rng.u16(),
        udp_no_csum: proto == IPPROTO_UDP && rng.percent(10),
        trailer,
    }
    .build()
}

fn random_client(rng: &mut Rng) -> Ipv4Addr {
    if rng.percent(80) {
        Ipv4Addr::new(10, 200, rng.range(1, 255) as u8, rng.range(1, 254) as u8)
    } else {
        Ipv4Addr::from(rng.next() as u32)
    }
}

fn random_port(rng: &mut Rng) -> u16 {
    if rng.percent(90) {
        rng.range(1024, 65535) as u16
    } else {
        rng.u16()
    }
}

/// Recompute the IPv4 header checksum and the TCP/UDP checksum of a (mutated) frame, as far
/// as its headers can be followed. A UDP checksum of 0 stays 0.
fn refresh_checksums(f: &mut [u8]) {
    let Some(ip) = ip_of(f) else { return };
    set16(f, 24, 0);
    let c = !fold(sum16(&f[14..14 + ip.ihl]));
    set16(f, 24, c);
    if ip.frag & 0x1fff != 0 {
        return;
    }
    let l4 = 14 + ip.ihl;
    let end = if ip.tot >= ip.ihl && 14 + ip.tot <= f.len() {
        14 + ip.tot
    } else {
        f.len()
    };
    match ip.proto {
        IPPROTO_TCP if end >= l4 + 20 => {
            set16(f, l4 + 16, 0);
            let c = !fold(pseudo(f, IPPROTO_TCP, end - l4) + sum16(&f[l4..end]));
            set16(f, l4 + 16, c);
        }
        IPPROTO_UDP if end >= l4 + 8 && be16(f, l4 + 6) != 0 => {
            let ulen = usize::from(be16(f, l4 + 4));
            let n = if (8..=end - l4).contains(&ulen) {
                ulen
            } else {
                end - l4
            };
            set16(f, l4 + 6, 0);
            let c = !fold(pseudo(f, IPPROTO_UDP, n) + sum16(&f[l4..l4 + n]));
            set16(f, l4 + 6, if c == 0 { 0xffff } else { c });
        }
        _ => {}
    }
}

/// 1 to 3 random mutations, then (half the time) checksums made consistent again so that
/// the odd field is the frame's only defect.
fn mutate(rng: &mut Rng, f: &mut Vec<u8>) {
    for _ in 0..rng.range(1, 3) {
        let len = f.len();
        let ihl = f.get(14).map_or(20, |b| usize::from(b & 0x0f) * 4);
        let l4 = 14 + ihl.max(20);
        let headers = len.min(l4 + 20);
        match rng.below(15) {
            0 => {
                let i = rng.below(len);
                f[i] ^= 1 << rng.below(8);
            }
            1 => {
                let i = rng.below(headers);
                f[i] ^= 1 << rng.below(8);
            }
            2 => {
                let i = rng.below(headers);
                f[i] = rng.u8();
            }
            3 => {
                let new = if rng.percent(60) {
                    rng.range(14, headers)
                } else {
                    rng.range(14, len)
                };
                f.truncate(new);
            }
            4 => {
                let n = rng.range(1, 64);
                f.extend_from_slice(&rng.bytes(n));
            }
            5 if len > 14 => f[14] = (f[14] & 0xf0) | rng.below(16) as u8,
            6 if len > 14 => f[14] = ((rng.below(16) as u8) << 4) | (f[14] & 0x0f),
            7 => {
                let v = match rng.below(4) {
                    0 => rng.below(ihl.max(1)),
                    1 => (len - 14).saturating_add_signed(rng.range(0, 16) as isize - 8),
                    2 => len - 14 + rng.range(1, 100),
                    _ => rng.u16().into(),
                };
                set16(f, 16, v as u16);
            }
            8 if len > l4 + 12 => {
                f[l4 + 12] = ((rng.below(16) as u8) << 4) | (f[l4 + 12] & 0x0f);
            }
            9 => {
                let seg = len.saturating_sub(l4);
                let v = match rng.below(4) {
                    0 => rng.below(8),
                    1 => seg.saturating_add_signed(rng.range(0, 16) as isize - 8),
                    2 => seg + rng.range(1, 100),
                    _ => rng.u16().into(),
                };
                set16(f, l4 + 4, v as u16);
            }
            10 if len > 23 => {
                let any = rng.u8();
                f[23] = *rng.pick(&[6, 17, 1, 47, 132, any]);
            }
            11 => {
                let any = rng.u16();
                let v = *rng.pick(&[0x2000, 0x0001, 0x3fff, 0x8000, 0x4000, any]);
                set16(f, 20, v);
            }
            12 => {
                let any = rng.u16();
                let v = *rng.pick(&[0x86dd, 0x0806, 0x8100, 0x0800, any]);
                set16(f, 12, v);
            }
            13 => {
                let a = rng.below(headers);
                let b = rng.range(a, headers);
                let v = if rng.percent(50) { 0 } else { 0xff };
                f[a..b].fill(v);
            }
            _ => {
                // Swap in another frame's header length fields at once: IHL and tot_len.
                if len >= 20 {
                    f[14] = (f[14] & 0xf0) | rng.range(5, 15) as u8;
                    set16(f, 16, rng.range(20, len) as u16);
                }
            }
        }
    }
    if rng.percent(50) {
        refresh_checksums(f);
    }
}

// ---------------------------------------------------------------------------------------
// Oracles and checks

/// The IPv4 fields the checks need, when the frame has a readable IPv4 header (IPv4
/// ethertype, version 4, IHL >= 5, the whole header inside the frame).
#[derive(Clone, Copy)]
struct Ip {
    ihl: usize,
    tot: usize,
    proto: u8,
    frag: u16,
}

fn ip_of(f: &[u8]) -> Option<Ip> {
    if f.len() < 34 || f[12..14] != [0x08, 0x00] {
        return None;
    }
    let ihl = usize::from(f[14] & 0x0f) * 4;
    if f[14] >> 4 != 4 || ihl < 20 || 14 + ihl > f.len() {
        return None;
    }
    Some(Ip {
        ihl,
        tot: usize::from(be16(f, 16)),
        proto: f[23],
        frag: be16(f, 20),
    })
}

/// The reason XDP must count `f` under because its parser must reject it, if it must.
fn xdp_malformed(f: &[u8]) -> Option<Reason> {
    let len = f.len();
    if len < 14 {
        return Some(Reason::XdpDropMalformedL2);
    }
    if f[12..14] != [0x08, 0x00] {
        return None;
    }
    if len < 34 {
        return Some(Reason::XdpDropMalformedL3);
    }
    let ihl = usize::from(f[14] & 0x0f) * 4;
    let tot = usize::from(be16(f, 16));
    if f[14] >> 4 != 4 || ihl < 20 || tot < ihl || tot > len - 14 {
        return Some(Reason::XdpDropMalformedL3);
    }
    // A non-first fragment has no L4 header to check; a first one (MF, offset 0) has.
    let frag = be16(f, 20);
    if frag & 0x1fff != 0 || ihl != 20 {
        return None;
    }
    let first_frag = frag & 0x2000 != 0;
    let seg = tot - 20;
    let bad = match f[23] {
        IPPROTO_TCP => {
            let doff = len
                .checked_sub(34 + 20)
                .map(|_| usize::from(f[46] >> 4) * 4);
            doff.is_none_or(|d| d < 20 || d > seg || 34 + d > len)
        }
        IPPROTO_UDP => {
            // A first fragment carries only part of the datagram its UDP length describes.
            let ulen = len.checked_sub(34 + 8).map(|_| usize::from(be16(f, 38)));
            ulen.is_none_or(|u| u < 8 || seg < 8 || if first_frag { u < seg } else { u > seg })
        }
        _ => false,
    };
    bad.then_some(Reason::XdpDropMalformedL4)
}

/// Whether TC must pass `f` as malformed (`TcPassMalformed`).
fn tc_malformed(f: &[u8]) -> bool {
    let len = f.len();
    if len < 14 {
        return true;
    }
    if f[12..14] != [0x08, 0x00] {
        return false;
    }
    if len < 34 {
        return true;
    }
    let ihl = usize::from(f[14] & 0x0f) * 4;
    if f[14] >> 4 != 4 || ihl < 20 {
        return true;
    }
    if be16(f, 20) & 0x1fff != 0 {
        return false;
    }
    // The ports, and the checksum field the reverse NAT rewrites.
    match f[23] {
        IPPROTO_TCP => len < 14 + ihl + 18,
        IPPROTO_UDP => len < 14 + ihl + 8,
        _ => false,
    }
}

/// Whether `BPF_PROG_RUN` refuses `f` for `prog` (EINVAL): shorter than an Ethernet
/// header, and for an skb (TC) an IPv4 or IPv6 frame shorter than the fixed IP header.
fn refused(prog: Prog, f: &[u8]) -> bool {
    f.len() < 14 || (matches!(prog, Prog::Tc | Prog::TcIngress) && skb_refuses(f))
}

/// Run `f` through `prog` once: `(verdict, output frame)`, or `None` when the kernel refuses
/// to run such a frame (see [`refused`]; any other error fails the test).
fn run(h: &mut Harness, prog: Prog, f: &[u8]) -> Option<(u32, Vec<u8>)> {
    run_on(h, prog, f, None)
}

/// [`run`], XDP with `ifindex` as the ingress interface (`xdp_md.ingress_ifindex`) when
/// given, so FIB lookups see the calling thread's namespace.
fn run_on(h: &mut Harness, prog: Prog, f: &[u8], ifindex: Option<u32>) -> Option<(u32, Vec<u8>)> {
    let mut out = vec![0u8; f.len() + 512];
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
    let mut ctx = Vec::new();
    if let Some(i) = ifindex {
        for w in [0, f.len() as u32, 0, i, 0, 0] {
            ctx.extend_from_slice(&w.to_ne_bytes());
        }
    }
    let opts = TestRunOptions {
        data_in: Some(f),
        data_out: Some(&mut out),
        ctx_in: (prog == Prog::Xdp && ifindex.is_some()).then_some(&ctx[..]),
        repeat: 1,
        ..Default::default()
    };
    let res = match prog {
        Prog::Xdp => h
            .datapath
            .xdp_program()
            .expect("xdp program")
            .test_run(opts),
        Prog::Tc => h.datapath.tc_program().expect("tc program").test_run(opts),
        Prog::TcIngress => h
            .datapath
            .tc_program_named(maps::PROG_TC_INGRESS)
            .expect("tc ingress program")
            .test_run(opts),
    };
    match res {
        Ok(r) => {
            out.truncate(r.data_size_out as usize);
            Some((r.return_value, out))
        }
        Err(_) if refused(prog, f) => None,
        Err(e) => panic!("BPF_PROG_RUN ({prog:?}) of {}: {e}", hex(f)),
    }
}

fn valid_action(prog: Prog, v: u32) -> bool {
    match prog {
        Prog::Xdp => matches!(v, XDP_DROP | XDP_PASS | XDP_TX | XDP_REDIRECT),
        Prog::Tc | Prog::TcIngress => matches!(v, TC_ACT_OK | TC_ACT_SHOT | TC_ACT_REDIRECT),
    }
}

/// Which program counts under `r`.
fn reason_prog(r: Reason) -> Option<Prog> {
    let name = r.name();
    if name.starts_with("xdp_") {
        Some(Prog::Xdp)
    } else if name.starts_with("tc_") {
        Some(Prog::Tc)
    } else {
        None
    }
}

/// Every checksum the frame carries verifies: the IPv4 header, and (unfragmented or first
/// fragment) the TCP checksum over tot_len, the UDP checksum over the UDP length (0 = none).
fn verify(f: &[u8]) -> Result<(), String> {
    let ip = ip_of(f).ok_or_else(|| "no readable IPv4 header".to_string())?;
    if fold(sum16(&f[14..14 + ip.ihl])) != 0xffff {
        return Err(format!("bad IPv4 header checksum {:#06x}", be16(f, 24)));
    }
    if ip.tot < ip.ihl || 14 + ip.tot > f.len() {
        return Err(format!("tot_len {} outside the frame", ip.tot));
    }
    if ip.frag & 0x1fff != 0 {
        return Ok(());
    }
    let seg = &f[14 + ip.ihl..14 + ip.tot];
    match ip.proto {
        IPPROTO_TCP => {
            if seg.len() < 20 {
                return Err("TCP header truncated".into());
            }
            if fold(pseudo(f, IPPROTO_TCP, seg.len()) + sum16(seg)) != 0xffff {
                return Err(format!("bad TCP checksum {:#06x}", be16(seg, 16)));
            }
        }
        IPPROTO_UDP => {
            if seg.len() < 8 {
                return Err("UDP header truncated".into());
            }
            if be16(seg, 6) == 0 {
                return Ok(());
            }
            let ulen = usize::from(be16(seg, 4));
            if ulen < 8 || ulen > seg.len() {
                return Err(format!("UDP length {ulen} outside the IP payload"));
            }
            if fold(pseudo(f, IPPROTO_UDP, ulen) + sum16(&seg[..ulen])) != 0xffff {
                return Err(format!("bad UDP checksum {:#06x}", be16(seg, 6)));
            }
        }
        _ => {}
    }
    Ok(())
}

/// One's-complement residue: 0x0000 and 0xffff are the same value.
fn norm(x: u16) -> u16 {
    if x == 0 {
        0xffff
    } else {
        x
    }
}

/// An in-place rewrite of a frame whose checksums were already wrong must keep them wrong
/// by exactly as much: the residue of the IPv4 header and of pseudo-header + L4 bytes is
/// unchanged (what an incremental update guarantees).
fn same_residues(i: &[u8], o: &[u8], ip: Ip) -> Result<(), String> {
    let hdr = |f: &[u8]| norm(fold(sum16(&f[14..14 + ip.ihl])));
    if hdr(i) != hdr(o) {
        return Err(format!(
            "IPv4 header checksum residue {:#06x} -> {:#06x}",
            hdr(i),
            hdr(o)
        ));
    }
    let field = match ip.proto {
        IPPROTO_TCP => 16,
        IPPROTO_UDP => 6,
        _ => return Ok(()),
    };
    let l4 = 14 + ip.ihl;
    if ip.frag & 0x1fff != 0 || l4 + field + 2 > i.len() {
        return Ok(());
    }
    if ip.proto == IPPROTO_UDP && be16(i, l4 + 6) == 0 {
        return match be16(o, l4 + 6) {
            0 => Ok(()),
            c => Err(format!("UDP checksum 0 (none) became {c:#06x}")),
        };
    }
    let res = |f: &[u8]| norm(fold(pseudo(f, ip.proto, 0) + sum16(&f[l4..])));
    if res(i) != res(o) {
        return Err(format!(
            "L4 checksum residue {:#06x} -> {:#06x}",
            res(i),
            res(o)
        ));
    }
    Ok(())
}

/// The checksum invariant of a frame a program changed.
fn check_rewrite(input: &[u8], out: &[u8]) -> Result<(), String> {
    if verify(input).is_ok() {
        return verify(out);
    }
    match (ip_of(input), ip_of(out)) {
        (Some(a), Some(b)) if input.len() == out.len() && a.ihl == b.ihl && a.proto == b.proto => {
            same_residues(input, out, a)
        }
        _ => verify(out),
    }
}

fn hex(f: &[u8]) -> String {
    let mut s = String::with_capacity(f.len() * 2);
    for b in f {
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn deltas(
    before: &BTreeMap<Reason, Counter>,
    after: &BTreeMap<Reason, Counter>,
) -> BTreeMap<Reason, (u64, u64)> {
    lb_testkit::harness::stat_deltas(before, after)
}

fn reason_table(d: &BTreeMap<Reason, (u64, u64)>) -> String {
    d.iter()
        .map(|(r, (p, _))| format!("    {:<28} {p:>9}\n", r.name()))
        .collect()
}

// ---------------------------------------------------------------------------------------
// The random phase

/// A flow seen rewritten by XDP, to send its later packets and its replies.
#[derive(Clone, Copy)]
struct Flow {
    proto: u8,
    client: SocketAddrV4,
    frontend: SocketAddrV4,
    backend: SocketAddrV4,
    /// The SNAT source of a flow to a remote backend.
    snat: Option<SocketAddrV4>,
}

fn ends(f: &[u8]) -> Option<(u8, SocketAddrV4, SocketAddrV4)> {
    let ip = ip_of(f)?;
    let l4 = 14 + ip.ihl;
    if !matches!(ip.proto, IPPROTO_TCP | IPPROTO_UDP) || l4 + 4 > f.len() {
        return None;
    }
    let addr = |o: usize| Ipv4Addr::new(f[o], f[o + 1], f[o + 2], f[o + 3]);
    Some((
        ip.proto,
        sa(addr(26), be16(f, l4)),
        sa(addr(30), be16(f, l4 + 2)),
    ))
}

/// Valid-ish traffic: new and known flows to the frontends, replies of known flows (TC
/// reverse NAT, XDP reverse SNAT), probes of the SNAT port range, traffic for no frontend,
/// other protocols.
struct Traffic {
    targets: Vec<Target>,
    /// The address SNATed flows leave with.
    snat_addr: Ipv4Addr,
    /// Destinations of traffic for no frontend (besides random ones).
    others: Vec<Ipv4Addr>,
    /// Clients used half of the time (besides random ones).
    clients: Vec<Ipv4Addr>,
    flows: Vec<Flow>,
    next: usize,
}

const FLOW_MEMORY: usize = 4096;

impl Traffic {
    fn new(targets: Vec<Target>, snat_addr: Ipv4Addr, others: Vec<Ipv4Addr>) -> Self {
        Self {
            targets,
            snat_addr,
            others,
            clients: Vec::new(),
            flows: Vec::new(),
            next: 0,
        }
    }

    fn client(&self, rng: &mut Rng) -> SocketAddrV4 {
        let ip = if !self.clients.is_empty() && rng.percent(50) {
            *rng.pick(&self.clients)
        } else {
            random_client(rng)
        };
        sa(ip, random_port(rng))
    }

    fn frame(&mut self, rng: &mut Rng) -> Vec<u8> {
        let known = (!self.flows.is_empty()).then(|| *rng.pick(&self.flows));
        let remote: Vec<SocketAddrV4> = self
            .targets
            .iter()
            .filter(|t| t.spec.remote)
            .flat_map(|t| t.spec.backends.iter().copied())
            .collect();
        let roll = rng.below(100);
        let (src, dst, proto) = match (roll, known) {
            (0..=19, Some(fl)) => (fl.client, fl.frontend, fl.proto),
            (20..=34, Some(fl)) => match fl.snat {
                Some(snat) => (fl.backend, snat, fl.proto),
                None => (fl.backend, fl.client, fl.proto),
            },
            (35..=42, _) if !remote.is_empty() => {
                let port = rng.range(usize::from(SNAT_MIN) - 2, usize::from(SNAT_MAX) + 2);
                let proto = *rng.pick(&[IPPROTO_TCP, IPPROTO_UDP]);
                (*rng.pick(&remote), sa(self.snat_addr, port as u16), proto)
            }
            (43..=52, _) => {
                let dst = match rng.below(3) {
                    0 => *rng.pick(&self.others),
                    1 => random_client(rng),
                    _ => Ipv4Addr::from(rng.next() as u32),
                };
                let proto = *rng.pick(&[IPPROTO_TCP, IPPROTO_UDP]);
                (self.client(rng), sa(dst, random_port(rng)), proto)
            }
            (53..=57, _) => {
                let t = rng.pick(&self.targets);
                let dst = sa(*rng.pick(&t.addrs), t.spec.port);
                let proto = *rng.pick(&[1, 47, 132, 0, 255]);
                (self.client(rng), dst, proto)
            }
            _ => {
                let t = rng.pick(&self.targets);
                let dst = sa(*rng.pick(&t.addrs), t.spec.port);
                (self.client(rng), dst, t.spec.proto)
            }
        };
        random_frame(rng, src, dst, proto, false, 1400)
    }

    /// Remember a flow XDP translated (destination rewritten: DNAT, perhaps with SNAT).
    fn learn(&mut self, input: &[u8], out: &[u8]) {
        let (Some((proto, client, frontend)), Some((_, src, backend))) = (ends(input), ends(out))
        else {
            return;
        };
        if backend == frontend {
            return;
        }
        let flow = Flow {
            proto,
            client,
            frontend,
            backend,
            snat: (src != client).then_some(src),
        };
        if self.flows.len() < FLOW_MEMORY {
            self.flows.push(flow);
        } else {
            self.flows[self.next] = flow;
            self.next = (self.next + 1) % FLOW_MEMORY;
        }
    }
}

/// Figures of one program in a random run.
#[derive(Default)]
struct Tally {
    runs: u64,
    /// Frames `BPF_PROG_RUN` refuses to run (TC: IPv4 shorter than 34 bytes).
    refused: u64,
    bytes: u64,
    rewritten: u64,
    /// Rewritten frames whose input checksums were already wrong (residue check).
    rewritten_bad_input: u64,
    /// Frames the oracle calls malformed for this program, by reason.
    malformed: BTreeMap<Reason, u64>,
}

/// What a random run did and found.
#[derive(Default)]
struct Outcome {
    frames: u64,
    mutated: u64,
    valid_input: u64,
    /// XDP, TC, TC ingress.
    tally: [Tally; 3],
    failed: u64,
    failures: Vec<String>,
}

impl Outcome {
    fn fail(&mut self, msg: String) {
        self.failed += 1;
        if self.failures.len() < 20 {
            self.failures.push(msg);
        }
    }
}

/// Run `frames` valid-ish frames, half of them mutated, through `progs` (XDP with
/// `ifindex` as its ingress interface when given), checking the per-frame invariants.
fn fuzz_loop(
    h: &mut Harness,
    traffic: &mut Traffic,
    rng: &mut Rng,
    frames: usize,
    progs: &[Prog],
    ifindex: Option<u32>,
) -> Outcome {
    let mut o = Outcome::default();
    for n in 0..frames {
        let mut frame = traffic.frame(rng);
        if rng.percent(50) {
            mutate(rng, &mut frame);
            o.mutated += 1;
        }
        o.frames += 1;
        let mut input_ok = None;
        for &prog in progs {
            let k = prog as usize;
            let Some((v, out)) = run_on(h, prog, &frame, ifindex) else {
                o.tally[k].refused += 1;
                continue;
            };
            let t = &mut o.tally[k];
            t.runs += 1;
            t.bytes += frame.len() as u64;
            let mut errs = Vec::new();
            if !valid_action(prog, v) {
                errs.push(format!("invalid action {v}"));
            }
            let malformed = match prog {
                Prog::Xdp => xdp_malformed(&frame),
                Prog::Tc => tc_malformed(&frame).then_some(Reason::TcPassMalformed),
                Prog::TcIngress => xdp_malformed(&frame),
            };
            if let Some(r) = malformed {
                *t.malformed.entry(r).or_default() += 1;
                let want = match prog {
                    Prog::Xdp => XDP_DROP,
                    Prog::Tc => TC_ACT_OK,
                    Prog::TcIngress => TC_ACT_SHOT,
                };
                if v != want {
                    errs.push(format!(
                        "malformed ({}): verdict {v}, want {want}",
                        r.name()
                    ));
                }
                if out != frame {
                    errs.push(format!("malformed ({}) frame rewritten", r.name()));
                }
            }
            if out != frame {
                t.rewritten += 1;
                if !*input_ok.get_or_insert_with(|| verify(&frame).is_ok()) {
                    t.rewritten_bad_input += 1;
                }
                if let Err(e) = check_rewrite(&frame, &out) {
                    errs.push(format!("rewritten frame: {e}"));
                }
                if prog != Prog::Tc {
                    traffic.learn(&frame, &out);
                }
            }
            if !errs.is_empty() {
                o.fail(format!(
                    "frame #{n} {prog:?} verdict {v}: {}\n  in  {}\n  out {}",
                    errs.join("; "),
                    hex(&frame),
                    hex(&out)
                ));
            }
        }
        if input_ok.unwrap_or_else(|| verify(&frame).is_ok()) {
            o.valid_input += 1;
        }
    }
    o
}

/// Report the figures and check the counters against the frames run: per program they add
/// up (packets and bytes), every oracle-malformed frame was counted as malformed, and no
/// other program's reason moved.
fn finish(
    report: &mut String,
    o: &mut Outcome,
    d: &BTreeMap<Reason, (u64, u64)>,
    progs: &[Prog],
    secs: f64,
) {
    let _ = writeln!(
        report,
        "  {} frames ({} mutated, {} with every checksum valid), {secs:.1} s",
        o.frames, o.mutated, o.valid_input
    );
    for &prog in progs {
        let t = &o.tally[prog as usize];
        let _ = writeln!(
            report,
            "  {prog:?}: {} run ({} refused by BPF_PROG_RUN), {} rewritten ({} of them with \
             wrong input checksums, residue kept)",
            t.runs, t.refused, t.rewritten, t.rewritten_bad_input
        );
        for (r, n) in &t.malformed {
            let _ = writeln!(report, "    oracle-malformed {:<22} {n:>9}", r.name());
        }
    }
    let _ = write!(report, "  verdict counters:\n{}", reason_table(d));
    let mut errs = Vec::new();
    for &prog in progs {
        // The ingress program counts under its xdp_ reasons at either hook.
        let counts_as = if prog == Prog::TcIngress {
            Prog::Xdp
        } else {
            prog
        };
        let (p, b) = d
            .iter()
            .filter(|(r, _)| reason_prog(**r) == Some(counts_as))
            .fold((0, 0), |(p, b), (_, (dp, db))| (p + dp, b + db));
        let t = &o.tally[prog as usize];
        if (p, b) != (t.runs, t.bytes) {
            errs.push(format!(
                "{prog:?} counters add up to {p} packets / {b} bytes, {} / {} were run",
                t.runs, t.bytes
            ));
        }
        // A malformed counter may count more than this oracle (bad ICMP errors, later).
        for (r, n) in &t.malformed {
            let got = d.get(r).map_or(0, |c| c.0);
            if got < *n {
                errs.push(format!(
                    "{}: {got} counted, {n} malformed frames run",
                    r.name()
                ));
            }
        }
    }
    for r in d.keys().filter(|r| reason_prog(**r).is_none()) {
        errs.push(format!(
            "{} counted: not a packet program's reason",
            r.name()
        ));
    }
    for e in errs {
        o.fail(e);
    }
}

/// The random phase: `frames` frames (`LB_FUZZ_FRAMES` overrides), half of them mutated,
/// through `progs`, run inside `ns` when given; fails on any broken invariant.
fn random_phase(what: &str, seed: u64, frames: usize, progs: &[Prog], ns: Option<&Netns>) {
    let started = Instant::now();
    let frames = env_u64("LB_FUZZ_FRAMES").map_or(frames, |n| n as usize);
    let mut report =
        format!("fuzz {what}: seed {seed:#x} (LB_FUZZ_SEED), {frames} frames through {progs:?}\n");
    let (mut h, targets) = setup(&format!("fuzz-{what}"), seed);
    let before = h.stats();
    let mut rng = Rng(seed);
    let others = vec![NODE, NODE2, CLUSTER_IP, POD0, REMOTE0];
    let mut traffic = Traffic::new(targets, NODE, others);
    let mut run = || fuzz_loop(&mut h, &mut traffic, &mut rng, frames, progs, None);
    let mut o = match ns {
        Some(ns) => ns.enter(run),
        None => run(),
    };
    let d = deltas(&before, &h.stats());
    finish(
        &mut report,
        &mut o,
        &d,
        progs,
        started.elapsed().as_secs_f64(),
    );
    println!("{report}");
    assert!(
        o.failed == 0,
        "{} failures (seed {seed:#x}), first {}:\n{}",
        o.failed,
        o.failures.len(),
        o.failures.join("\n")
    );
}

#[test]
fn random_and_mutated_frames() {
    random_phase(
        "random",
        fuzz_seed(),
        RANDOM_FRAMES,
        &[Prog::Xdp, Prog::Tc],
        None,
    );
}

/// `--attach tc`: the random phase with the ingress program at TC ingress (and TC egress).
/// Run in a namespace without routes, so every FIB lookup fails as it does for XDP here.
#[test]
fn random_and_mutated_frames_through_tc_ingress() {
    lb_testkit::lab::require_root();
    let ns = Netns::empty("fuzz-tc");
    random_phase(
        "tc-in",
        fuzz_seed() ^ 0x7463_696e,
        TC_INGRESS_FRAMES,
        &[Prog::TcIngress, Prog::Tc],
        Some(&ns),
    );
}

/// The forwarding path of SNATed flows (FIB lookup, TTL decrement, MACs, XDP_TX) needs
/// routes and neighbours: a two-node lab, frames run as received on node0's uplink. Local
/// backends are node0's pod, remote ones node1's; clients are the lab's client (reachable)
/// and random ones (mostly unroutable: XDP_PASS fallback).
#[test]
fn random_frames_on_the_xdp_forwarding_path() {
    use lb_testkit::lab::{Topology, CLIENT_IP, NODE_UPLINK};
    let started = Instant::now();
    let seed = fuzz_seed() ^ 0x6669_6221;
    let frames = LAB_FRAMES;
    let mut report =
        format!("fuzz XDP forwarding path: seed {seed:#x}, {frames} frames through XDP in a lab\n");
    let cluster = Topology::new().nodes(2).pods_per_node(1).build();
    cluster.wait_reachable();
    let (node0, node1) = (&cluster.nodes[0], &cluster.nodes[1]);
    let ifindex = node0.ns.enter(|| {
        let name = std::ffi::CString::new(NODE_UPLINK).expect("name");
        // SAFETY: a valid NUL-terminated name.
        unsafe { libc::if_nametoindex(name.as_ptr()) }
    });
    assert!(ifindex > 0, "{NODE_UPLINK} in node0");
    let mut h = Harness::new("fuzz-fib", &Default::default());
    h.add_node_addr(node0.ip);
    set_snat(
        &PinLayout::new(h.pin_dir()),
        Some(node0.ip),
        &(SNAT_MIN..=SNAT_MAX),
    )
    .expect("SNAT config");
    let (local, remote) = (node0.pods[0].ip, node1.pods[0].ip);
    let specs = [
        FrontendSpec::nodeport(30080, IPPROTO_TCP, 1, &[sa(remote, 8080)]).remote(),
        FrontendSpec::nodeport(30081, IPPROTO_UDP, 2, &[sa(remote, 5000)]).remote(),
        FrontendSpec::nodeport(30082, IPPROTO_TCP, 3, &[sa(remote, 8080), sa(local, 8080)])
            .remote(),
        FrontendSpec::nodeport(30001, IPPROTO_TCP, 4, &[sa(local, 8080)]),
        FrontendSpec::nodeport(30099, IPPROTO_TCP, 5, &[]),
    ];
    let targets: Vec<Target> = specs
        .into_iter()
        .map(|spec| {
            h.add_frontend(&spec);
            Target {
                spec,
                addrs: vec![node0.ip],
            }
        })
        .collect();
    let mut traffic = Traffic::new(targets, node0.ip, vec![node0.ip, node1.ip, local, remote]);
    traffic.clients = vec![CLIENT_IP];
    let mut rng = Rng(seed);
    let before = h.stats();
    let progs = [Prog::Xdp];
    let mut o = node0.ns.enter(|| {
        fuzz_loop(
            &mut h,
            &mut traffic,
            &mut rng,
            frames,
            &progs,
            Some(ifindex),
        )
    });
    let d = deltas(&before, &h.stats());
    finish(
        &mut report,
        &mut o,
        &d,
        &progs,
        started.elapsed().as_secs_f64(),
    );
    println!("{report}");
    for r in [Reason::XdpSnatTx, Reason::XdpRevSnatTx] {
        if d.get(&r).is_none_or(|c| c.0 == 0) {
            o.fail(format!(
                "{}: never taken, the FIB path was not exercised",
                r.name()
            ));
        }
    }
    assert!(
        o.failed == 0,
        "{} failures (seed {seed:#x}), first {}:\n{}",
        o.failed,
        o.failures.len(),
        o.failures.join("\n")
    );
}

// ---------------------------------------------------------------------------------------
// Malformed frames: generator, state snapshots, exact checks

/// A frame the parser must reject: the XDP reason it must be dropped with (`None`: not
/// malformed for XDP, not run through it) and whether TC must pass it as malformed.
struct Case {
    frame: Vec<u8>,
    xdp: Option<Reason>,
    tc: bool,
}

/// A valid base frame for the malformed generators, independent of the datapath's choices:
/// forward frames of the seeded flows and new ones, replies from every backend to the
/// seeded clients (some tracked), replies on SNAT ports. Small payloads.
fn base_frame(rng: &mut Rng, targets: &[Target]) -> Vec<u8> {
    let t = rng.pick(targets);
    let proto = t.spec.proto;
    let client = if rng.percent(50) {
        let i = rng.below(SEED_CLIENTS.len());
        sa(SEED_CLIENTS[i], SEED_PORT + i as u16)
    } else {
        sa(random_client(rng), random_port(rng))
    };
    let fe = sa(*rng.pick(&t.addrs), t.spec.port);
    let (src, dst) = match (rng.below(4), t.spec.backends.is_empty(), t.spec.remote) {
        (2, false, false) => (*rng.pick(&t.spec.backends), client),
        (2 | 3, false, true) => (
            *rng.pick(&t.spec.backends),
            sa(NODE, rng.range(SNAT_MIN.into(), SNAT_MAX.into()) as u16),
        ),
        _ => (client, fe),
    };
    let plain = rng.percent(70);
    random_frame(rng, src, dst, proto, plain, 64)
}

/// One targeted defect (plus, sometimes, noise past the headers and fixed checksums), with
/// what each program must make of the result (possibly nothing: the caller draws again).
fn malform(rng: &mut Rng, mut f: Vec<u8>) -> Case {
    let ihl = usize::from(f[14] & 0x0f) * 4;
    let l4 = 14 + ihl;
    let l4_hdr = if f[23] == IPPROTO_TCP { 20 } else { 8 };
    let len = f.len();
    let mut fix = rng.percent(50);
    match rng.below(13) {
        0 => f.truncate(rng.range(14, (l4 + l4_hdr).min(len) - 1)),
        1 => {
            // Cut inside the headers (a third of the time before the ports end) with a
            // tot_len that agrees with the cut.
            let end = if rng.percent(33) {
                34 + 3
            } else {
                l4 + l4_hdr - 1
            };
            f.truncate(rng.range(34, end.min(len - 1)));
            let tot = f.len() - 14;
            set16(&mut f, 16, tot as u16);
            fix = true;
        }
        2 => f[14] = (*rng.pick(&[0u8, 1, 2, 3, 5, 6, 7, 15]) << 4) | (f[14] & 0x0f),
        3 => f[14] = (f[14] & 0xf0) | rng.below(5) as u8,
        4 => {
            let tot = rng.range(len - 14 + 1, 65535);
            set16(&mut f, 16, tot as u16);
        }
        5 => set16(&mut f, 16, rng.below(ihl) as u16),
        6 => {
            let ihl2 = rng.range(6, 15);
            f[14] = (f[14] & 0xf0) | ihl2 as u8;
            set16(&mut f, 16, rng.range(20, ihl2 * 4 - 1) as u16);
        }
        7 if len > l4 + 12 => f[l4 + 12] = ((rng.below(5) as u8) << 4) | (f[l4 + 12] & 0x0f),
        8 if len > l4 + 12 => {
            // A data offset beyond the segment, or a segment shrunk below the data offset.
            if rng.percent(50) {
                let seg = (len - l4) / 4;
                let doff = rng.range((seg + 1).clamp(5, 15), 15);
                f[l4 + 12] = ((doff as u8) << 4) | (f[l4 + 12] & 0x0f);
            } else {
                let tot = rng.range(ihl, ihl + 19);
                set16(&mut f, 16, tot as u16);
            }
        }
        9 => set16(&mut f, l4 + 4, rng.below(8) as u16),
        10 if len >= 14 + 24 + 4 => {
            // IP options (any IHL the frame holds), the frame cut within the L4 ports.
            let ihl2 = rng.range(6, ((len - 14 - 4) / 4).min(15));
            f[14] = (f[14] & 0xf0) | ihl2 as u8;
            f.truncate(14 + ihl2 * 4 + rng.below(4));
            let tot = f.len() - 14;
            set16(&mut f, 16, tot as u16);
            fix = true;
        }
        11 => {
            let seg = len.saturating_sub(l4);
            set16(&mut f, l4 + 4, rng.range(seg + 1, 65535) as u16);
        }
        _ => {
            f[23] = if f[23] == IPPROTO_TCP {
                IPPROTO_UDP
            } else {
                IPPROTO_TCP
            }
        }
    }
    if rng.percent(20) && f.len() > l4 + l4_hdr {
        // Noise past the headers.
        let i = rng.range(l4 + l4_hdr, f.len() - 1);
        f[i] ^= 1 << rng.below(8);
    }
    if fix {
        refresh_checksums(&mut f);
    }
    let xdp = xdp_malformed(&f);
    let tc = tc_malformed(&f) && !refused(Prog::Tc, &f);
    Case { frame: f, xdp, tc }
}

/// The next frame malformed for at least one program.
fn malformed_case(rng: &mut Rng, targets: &[Target]) -> Case {
    loop {
        let base = base_frame(rng, targets);
        let c = malform(rng, base);
        if c.xdp.is_some() || c.tc {
            return c;
        }
    }
}

/// The maps a malformed frame must never touch.
struct State {
    ct: HashMap<MapData, Ct4Key, Ct4Value>,
    snat: HashMap<MapData, Ct4Key, Snat4Value>,
    affinity: HashMap<MapData, Affinity4Key, Affinity4Value>,
}

#[derive(Clone, PartialEq)]
struct Snapshot {
    ct: BTreeMap<Ct4Key, Ct4Value>,
    snat: BTreeMap<Ct4Key, Snat4Value>,
    affinity: BTreeMap<Affinity4Key, Affinity4Value>,
}

fn entries<K: aya::Pod + Ord, V: aya::Pod>(m: &HashMap<MapData, K, V>) -> BTreeMap<K, V> {
    m.iter().map(|r| r.expect("iterate map")).collect()
}

/// Entries of `now` that are new or changed since `then` (removals are allowed: LRU maps
/// and lifetimes may drop entries).
fn grown<K: Ord + std::fmt::Debug, V: PartialEq + std::fmt::Debug>(
    name: &str,
    then: &BTreeMap<K, V>,
    now: &BTreeMap<K, V>,
) -> Vec<String> {
    now.iter()
        .filter(|(k, v)| then.get(k) != Some(v))
        .map(|(k, v)| match then.get(k) {
            None => format!("{name}: new entry {k:?} -> {v:?}"),
            Some(old) => format!("{name}: entry {k:?} changed {old:?} -> {v:?}"),
        })
        .collect()
}

impl State {
    fn open(h: &Harness) -> Self {
        let pins = PinLayout::new(h.pin_dir());
        let lru = |name| Map::LruHashMap(open_pinned_map(&pins, name).expect("open map"));
        Self {
            ct: HashMap::try_from(lru(maps::LB4_CT)).expect("LB4_CT"),
            snat: HashMap::try_from(lru(maps::LB4_SNAT)).expect("LB4_SNAT"),
            affinity: HashMap::try_from(lru(maps::LB4_AFFINITY)).expect("LB4_AFFINITY"),
        }
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            ct: entries(&self.ct),
            snat: entries(&self.snat),
            affinity: entries(&self.affinity),
        }
    }

    /// What changed beyond removals since `seeded`.
    fn changes(&self, seeded: &Snapshot) -> Vec<String> {
        let now = self.snapshot();
        let mut v = grown(maps::LB4_CT, &seeded.ct, &now.ct);
        v.extend(grown(maps::LB4_SNAT, &seeded.snat, &now.snat));
        v.extend(grown(maps::LB4_AFFINITY, &seeded.affinity, &now.affinity));
        v
    }

    /// Put the maps back to `seeded` (after a failure, to find the culprit frame).
    fn restore(&mut self, seeded: &Snapshot) {
        let now = self.snapshot();
        for k in now.ct.keys() {
            let _ = self.ct.remove(k);
        }
        for k in now.snat.keys() {
            let _ = self.snat.remove(k);
        }
        for k in now.affinity.keys() {
            let _ = self.affinity.remove(k);
        }
        for (k, v) in &seeded.ct {
            self.ct.insert(k, v, 0).expect("restore LB4_CT");
        }
        for (k, v) in &seeded.snat {
            self.snat.insert(k, v, 0).expect("restore LB4_SNAT");
        }
        for (k, v) in &seeded.affinity {
            self.affinity.insert(k, v, 0).expect("restore LB4_AFFINITY");
        }
    }
}

/// Establish flows from [`SEED_CLIENTS`] to every frontend with backends (forward, reply,
/// SNAT and affinity entries), so that malformed frames meet state they could corrupt.
fn seed_flows(h: &mut Harness, targets: &[Target]) {
    for t in targets.iter().filter(|t| !t.spec.backends.is_empty()) {
        for (i, c) in SEED_CLIENTS.iter().enumerate() {
            let syn = plain(
                sa(*c, SEED_PORT + i as u16),
                sa(t.addrs[0], t.spec.port),
                t.spec.proto,
                TCP_SYN,
            )
            .build();
            let (v, out) = h.run(Prog::Xdp, &syn);
            assert!(
                valid_action(Prog::Xdp, v) && v != XDP_DROP && out != syn,
                "seeding a flow to {}:{}: verdict {v}",
                t.addrs[0],
                t.spec.port
            );
        }
    }
}

/// What one run of cases did, for the figures.
#[derive(Default)]
struct Runs {
    xdp: BTreeMap<Reason, u64>,
    tc: u64,
}

/// Run `cases` (each through the programs it is malformed for) and check exactly: verdict,
/// untouched frame, counter deltas (packets and bytes) of the expected malformed reasons and
/// of no other, no new or changed state. On a counter or state difference the cases are run
/// again one by one, with the state restored, to name the frames at fault.
fn run_cases(
    h: &mut Harness,
    state: &mut State,
    seeded: &Snapshot,
    cases: &[Case],
    runs: &mut Runs,
) -> Vec<String> {
    let mut errs = Vec::new();
    let before = h.stats();
    let mut want: BTreeMap<Reason, (u64, u64)> = BTreeMap::new();
    for (i, c) in cases.iter().enumerate() {
        errs.extend(run_case(h, c).into_iter().map(|e| format!("case {i}: {e}")));
        if let Some(r) = c.xdp {
            let w = want.entry(r).or_default();
            *w = (w.0 + 1, w.1 + c.frame.len() as u64);
            *runs.xdp.entry(r).or_default() += 1;
        }
        if c.tc {
            let w = want.entry(Reason::TcPassMalformed).or_default();
            *w = (w.0 + 1, w.1 + c.frame.len() as u64);
            runs.tc += 1;
        }
    }
    let got = deltas(&before, &h.stats());
    let changes = state.changes(seeded);
    if got == want && changes.is_empty() {
        return errs;
    }
    errs.push(format!(
        "counter deltas {got:?}, want {want:?}; state: {changes:?}"
    ));
    state.restore(seeded);
    for (i, c) in cases.iter().enumerate() {
        let before = h.stats();
        run_case(h, c);
        let got = deltas(&before, &h.stats());
        let mut want = BTreeMap::new();
        if let Some(r) = c.xdp {
            want.insert(r, (1, c.frame.len() as u64));
        }
        if c.tc {
            let w = want.entry(Reason::TcPassMalformed).or_insert((0, 0));
            *w = (w.0 + 1, w.1 + c.frame.len() as u64);
        }
        let changes = state.changes(seeded);
        if got != want || !changes.is_empty() {
            errs.push(format!(
                "case {i} ({}): counters {got:?}, want {want:?}; state {changes:?}\n  frame {}",
                describe(c),
                hex(&c.frame)
            ));
            state.restore(seeded);
        }
    }
    errs
}

/// Run one case; differences in verdict or frame.
fn run_case(h: &mut Harness, c: &Case) -> Vec<String> {
    let mut errs = Vec::new();
    for (prog, on, want) in [
        (Prog::Xdp, c.xdp.is_some(), XDP_DROP),
        (Prog::Tc, c.tc, TC_ACT_OK),
    ] {
        if !on {
            continue;
        }
        let Some((v, out)) = run(h, prog, &c.frame) else {
            errs.push(format!(
                "{prog:?}: refused by BPF_PROG_RUN: {}",
                hex(&c.frame)
            ));
            continue;
        };
        if v != want || out != c.frame {
            errs.push(format!(
                "{prog:?} ({}): verdict {v}, want {want}{}\n  in  {}\n  out {}",
                describe(c),
                if out != c.frame {
                    ", frame rewritten"
                } else {
                    ""
                },
                hex(&c.frame),
                hex(&out)
            ));
        }
    }
    errs
}

fn describe(c: &Case) -> String {
    let x = c.xdp.map_or("-", |r| r.name());
    format!(
        "xdp {x}, tc {}",
        if c.tc { "tc_pass_malformed" } else { "-" }
    )
}

/// Frames shorter than an Ethernet header: `BPF_PROG_RUN` refuses them (EINVAL), so the L2
/// check cannot be reached this way. Should a kernel accept one, it must be an L2 drop.
fn l2_probe(h: &mut Harness) -> String {
    let frame = [0x45u8; 13];
    let before = h.stats();
    match run(h, Prog::Xdp, &frame) {
        None => "a 13-byte frame is refused by BPF_PROG_RUN: L2 not reachable".into(),
        Some((v, _)) => {
            let d = deltas(&before, &h.stats());
            assert_eq!(v, XDP_DROP, "13-byte frame");
            assert_eq!(
                d.get(&Reason::XdpDropMalformedL2).map(|c| c.0),
                Some(1),
                "13-byte frame: {d:?}"
            );
            "a 13-byte frame is an L2 drop".into()
        }
    }
}

fn report_runs(report: &mut String, runs: &Runs) {
    for (r, n) in &runs.xdp {
        let _ = writeln!(report, "    xdp {:<28} {n:>7}", r.name());
    }
    let name = Reason::TcPassMalformed.name();
    let _ = writeln!(report, "    tc  {name:<28} {:>7}", runs.tc);
}

#[test]
fn malformed_frames_leave_no_state() {
    let started = Instant::now();
    let seed = fuzz_seed() ^ 0x6d61_6c66_6f72_6d65;
    let mut report = format!("fuzz malformed phase: seed {seed:#x}, {MALFORMED_FRAMES} frames\n");
    let (mut h, targets) = setup("fuzz-malformed", seed);
    seed_flows(&mut h, &targets);
    let mut state = State::open(&h);
    let seeded = state.snapshot();
    assert!(
        !seeded.ct.is_empty() && !seeded.snat.is_empty() && !seeded.affinity.is_empty(),
        "seeded flows: {} conntrack, {} SNAT, {} affinity entries",
        seeded.ct.len(),
        seeded.snat.len(),
        seeded.affinity.len()
    );
    let _ = writeln!(report, "  {}", l2_probe(&mut h));
    let mut rng = Rng(seed);
    let mut runs = Runs::default();
    let mut errs = Vec::new();
    let mut done = 0;
    while done < MALFORMED_FRAMES {
        let n = BATCH.min(MALFORMED_FRAMES - done);
        let cases: Vec<Case> = (0..n).map(|_| malformed_case(&mut rng, &targets)).collect();
        errs.extend(run_cases(&mut h, &mut state, &seeded, &cases, &mut runs));
        done += n;
        if errs.len() > 20 {
            break;
        }
    }
    let now = state.snapshot();
    let _ = writeln!(
        report,
        "  {done} malformed frames in {:.1} s; conntrack {} -> {}, SNAT {} -> {}, affinity {} -> \
         {} entries",
        started.elapsed().as_secs_f64(),
        seeded.ct.len(),
        now.ct.len(),
        seeded.snat.len(),
        now.snat.len(),
        seeded.affinity.len(),
        now.affinity.len()
    );
    report_runs(&mut report, &runs);
    println!("{report}");
    assert!(
        errs.is_empty(),
        "{} failures (seed {seed:#x}):\n{}",
        errs.len(),
        errs.iter().take(20).cloned().collect::<Vec<_>>().join("\n")
    );
}

// ---------------------------------------------------------------------------------------
// The corpus

/// Per-frame expectation letters of `fuzz_corpus.txt`.
const CODES: [(char, Option<Reason>, bool); 5] = [
    ('A', Some(Reason::XdpDropMalformedL3), true),
    ('B', Some(Reason::XdpDropMalformedL3), false),
    ('C', Some(Reason::XdpDropMalformedL4), true),
    ('D', Some(Reason::XdpDropMalformedL4), false),
    ('E', None, true),
];

fn code_of(c: &Case) -> char {
    CODES
        .iter()
        .find(|(_, x, t)| *x == c.xdp && *t == c.tc)
        .map(|(ch, _, _)| *ch)
        .unwrap_or_else(|| panic!("no corpus letter for {}", describe(c)))
}

/// FNV-1a 64 over every frame, each preceded by its length.
fn digest(cases: &[Case]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for c in cases {
        for b in (c.frame.len() as u32).to_le_bytes().iter().chain(&c.frame) {
            h = (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

fn corpus_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(CORPUS_FILE)
}

fn render_corpus(cases: &[Case]) -> String {
    let mut s = String::new();
    s.push_str(
        "# Malformed-frame regression corpus of lb-testkit/tests/fuzz.rs (test `malformed_corpus`).\n\
         # The frames are regenerated from the seed by the test's own generator; the digest\n\
         # (FNV-1a 64 over every frame, each preceded by its u32 LE length) says it still makes\n\
         # the same ones. One letter per frame, in generation order, 100 a line:\n\
         #   A  XDP drop xdp_drop_malformed_l3, TC pass tc_pass_malformed\n\
         #   B  XDP drop xdp_drop_malformed_l3 (TC not run: its lenient parser accepts it, or\n\
         #      BPF_PROG_RUN refuses an IPv4 frame shorter than 34 bytes for TC)\n\
         #   C  XDP drop xdp_drop_malformed_l4, TC pass tc_pass_malformed\n\
         #   D  XDP drop xdp_drop_malformed_l4 (TC not run)\n\
         #   E  TC pass tc_pass_malformed (XDP not run: IP options, passed before L4 parsing)\n\
         # Every frame comes out untouched and leaves conntrack, SNAT and affinity maps alone.\n\
         # After a deliberate change of the generator or of the parser's contract:\n\
         #   LB_FUZZ_BLESS=1 cargo test -p lb-testkit --test fuzz malformed_corpus\n",
    );
    let _ = writeln!(s, "seed {CORPUS_SEED:#018x}");
    let _ = writeln!(s, "frames {}", cases.len());
    let _ = writeln!(s, "digest {:#018x}", digest(cases));
    let letters: Vec<char> = cases.iter().map(code_of).collect();
    for line in letters.chunks(100) {
        s.extend(line);
        s.push('\n');
    }
    s
}

/// (seed, frames, digest, letters) of the corpus file.
fn parse_corpus(text: &str) -> (u64, usize, u64, Vec<char>) {
    let mut seed = None;
    let mut frames = None;
    let mut dig = None;
    let mut letters = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(v) = line.strip_prefix("seed ") {
            seed = parse_u64(v);
        } else if let Some(v) = line.strip_prefix("frames ") {
            frames = v.trim().parse().ok();
        } else if let Some(v) = line.strip_prefix("digest ") {
            dig = parse_u64(v);
        } else {
            letters.extend(line.chars());
        }
    }
    (
        seed.expect("corpus: seed line"),
        frames.expect("corpus: frames line"),
        dig.expect("corpus: digest line"),
        letters,
    )
}

fn corpus_cases() -> Vec<Case> {
    let targets = targets();
    let mut rng = Rng(CORPUS_SEED);
    (0..CORPUS_FRAMES)
        .map(|_| malformed_case(&mut rng, &targets))
        .collect()
}

#[test]
fn malformed_corpus() {
    let started = Instant::now();
    let cases = corpus_cases();
    let path = corpus_path();
    if std::env::var("LB_FUZZ_BLESS").is_ok_and(|v| v == "1") {
        std::fs::write(&path, render_corpus(&cases)).expect("write the corpus");
        println!("corpus written to {}", path.display());
    }
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (LB_FUZZ_BLESS=1 writes it)", path.display()));
    let (seed, frames, dig, letters) = parse_corpus(&text);
    assert_eq!(seed, CORPUS_SEED, "corpus seed");
    assert_eq!(
        (frames, letters.len()),
        (CORPUS_FRAMES, CORPUS_FRAMES),
        "corpus size"
    );
    assert_eq!(
        dig,
        digest(&cases),
        "the generator no longer makes the corpus frames; if deliberate, re-bless (LB_FUZZ_BLESS=1)"
    );
    // The table, not the oracle, is the expectation; they agree unless the oracle changed.
    let drift: Vec<String> = cases
        .iter()
        .zip(&letters)
        .enumerate()
        .filter(|(_, (c, l))| code_of(c) != **l)
        .take(10)
        .map(|(i, (c, l))| {
            format!(
                "frame {i}: table {l}, oracle {}: {}",
                code_of(c),
                hex(&c.frame)
            )
        })
        .collect();
    assert!(
        drift.is_empty(),
        "oracle and corpus table differ:\n{}",
        drift.join("\n")
    );
    let expected: Vec<Case> = cases
        .into_iter()
        .zip(&letters)
        .map(|(c, l)| {
            let (_, xdp, tc) = CODES
                .iter()
                .find(|(ch, _, _)| ch == l)
                .unwrap_or_else(|| panic!("corpus letter {l}"));
            Case {
                frame: c.frame,
                xdp: *xdp,
                tc: *tc,
            }
        })
        .collect();

    let (mut h, targets) = setup("fuzz-corpus", CORPUS_SEED);
    seed_flows(&mut h, &targets);
    let mut state = State::open(&h);
    let seeded = state.snapshot();
    let mut runs = Runs::default();
    let mut errs = Vec::new();
    for (b, chunk) in expected.chunks(BATCH).enumerate() {
        errs.extend(
            run_cases(&mut h, &mut state, &seeded, chunk, &mut runs)
                .into_iter()
                .map(|e| format!("batch {b} (frames from {}): {e}", b * BATCH)),
        );
    }
    let mut count: BTreeMap<char, usize> = BTreeMap::new();
    for l in &letters {
        *count.entry(*l).or_default() += 1;
    }
    let mut report = format!(
        "malformed corpus: {} frames (seed {CORPUS_SEED:#x}), letters {count:?}, {:.1} s\n",
        expected.len(),
        started.elapsed().as_secs_f64()
    );
    report_runs(&mut report, &runs);
    println!("{report}");
    assert!(
        errs.is_empty(),
        "{} corpus differences:\n{}",
        errs.len(),
        errs.iter().take(20).cloned().collect::<Vec<_>>().join("\n")
    );
}

// ---------------------------------------------------------------------------------------
// Datapath bugs found by the fuzzer, minimized

/// Regression (found by `random_and_mutated_frames`, which tolerated it: TC_ACT_SHOT is a
/// valid action). TC egress parsed only the ports of a frame (lenient mode), then
/// reverse-NATed a tracked reply with `bpf_l4_csum_replace` on its TCP/UDP checksum field.
/// When the frame ended before that field (a TCP header cut after 4..17 bytes, a UDP
/// header after 4..7), the helper failed and the reply was dropped as `tc_drop_rewrite`,
/// where the documented policy passes an egress frame it cannot parse untouched as
/// `tc_pass_malformed`. Minimized: a tracked reply cut right after its ports, tot_len and
/// IPv4 checksum agreeing with the cut. Fixed: the lenient parse requires the checksum
/// field inside the packet.
#[test]
fn tc_passes_a_tracked_reply_cut_inside_its_l4_header_as_malformed() {
    let mut h = Harness::new("fuzz-bug-tc", &Default::default());
    h.add_node_addr(NODE);
    let client = sa(Ipv4Addr::new(10, 200, 0, 2), 40_000);
    let mut errs = Vec::new();
    for (proto, port, backend) in [
        (IPPROTO_TCP, 30001, sa(POD0, 8080)),
        (IPPROTO_UDP, 30053, sa(POD1, 53)),
    ] {
        h.add_frontend(&FrontendSpec::nodeport(
            port,
            proto,
            port.into(),
            &[backend],
        ));
        let first = plain(client, sa(NODE, port), proto, TCP_SYN).build();
        let (v, out) = h.run(Prog::Xdp, &first);
        assert!(
            v == XDP_PASS && out != first,
            "setting up the flow: verdict {v}"
        );
        let mut reply = plain(backend, client, proto, TCP_SYN | TCP_ACK).build();
        reply.truncate(14 + 20 + 4);
        set16(&mut reply, 16, 20 + 4);
        refresh_checksums(&mut reply);
        let before = h.stats();
        let (v, out) = h.run(Prog::Tc, &reply);
        let d = deltas(&before, &h.stats());
        let want = BTreeMap::from([(Reason::TcPassMalformed, (1, reply.len() as u64))]);
        println!(
            "proto {proto}: tracked reply {backend} -> {client} cut after its ports:\n  {}\n  \
             verdict {v} (want {TC_ACT_OK}), untouched {}, counters {d:?}",
            hex(&reply),
            out == reply
        );
        if v != TC_ACT_OK || out != reply || d != want {
            errs.push(format!(
                "proto {proto}: verdict {v}, untouched {}, counters {d:?}; want {TC_ACT_OK}, \
                 untouched, {want:?}\n  frame {}",
                out == reply,
                hex(&reply)
            ));
        }
    }
    assert!(errs.is_empty(), "{}", errs.join("\n"));
}
