//! Part 1: the per-packet cost of the datapath, in ns per packet as the kernel reports it
//! (`BPF_PROG_RUN`), for each kind of frame, at 1 to 100k Services and with 1M conntrack
//! entries present.
//!
//! How each number is obtained, and why:
//!
//! * `BPF_PROG_RUN` with `repeat = R` runs the program R times **on the same buffer**: a
//!   rewrite made by run k is what run k+1 sees. A NodePort frame DNATed to a pod would turn
//!   into a "no service" frame after the first run, and the average would measure the wrong
//!   path. So every frame measured with a large `repeat` targets a frontend whose backends are
//!   the frontend itself (`NODE_IP:port -> NODE_IP:port`): the program does all its work
//!   (lookups, conntrack, checksum updates and stores), but the rewrite leaves the packet as
//!   it was, so every one of the R runs takes the same path.
//! * A conntrack *miss* cannot be repeated on one buffer (run 1 inserts the entry, runs 2..R
//!   hit it). The SYN miss+insert case therefore runs many distinct frames (a fresh source
//!   address/port each) with `repeat = 1` each and averages the kernel's per-call times. That
//!   number includes a fixed per-call cost of the test harness (timer reads around a single
//!   run); the "established, 1 frame per call" row measures a conntrack hit the same way, so
//!   (miss, 1/call) - (hit, 1/call) + (hit, repeated) is the miss+insert cost on the same
//!   footing as the other rows; it is reported as `adjusted_ns`.
//! * Every run is checked against the datapath's own verdict counters: the expected reason
//!   (`xdp_fwd_new_flow`, `xdp_fwd_tracked`, `tc_revnat`, `xdp_pass_not_service`) must have
//!   counted exactly the packets run, and no other reason any. A mismatch fails the row
//!   instead of printing a number for the wrong path.
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::AsFd;
use std::time::Instant;

use lb_agent::loader::{set_snat, Capacities};
use lb_bench::schema::{PartResult, Row, Stat};
use lb_common::{
    conntrack::{CT_FORWARD, CT_REPLY},
    service::{backend_flags, flags},
    Backend4, Ct4Key, Ct4Value, Frontend4Key, Reason, Service4Value, Snat4Value, IPPROTO_TCP,
};
use lb_testkit::harness::{stat_deltas, Harness, Prog, Variant, TC_ACT_OK, XDP_PASS};
use lb_testkit::lab::NODE_IP;
use lb_testkit::packet::{Pkt, TCP_ACK, TCP_SYN};

use crate::services::{self, Position, ServiceSet};
use crate::{bpf_batch, Progress};

/// NodePort of the measured Service (TCP and UDP).
const NODE_PORT: u16 = 30080;
/// hostPort of the measured pod (hostIP = the node address).
const HOST_PORT: u16 = 8081;
/// NodePort of a Service whose backends all run on another node (SNAT).
const SNAT_NODE_PORT: u16 = 30081;
/// SNAT source ports for the bench: wide, so the new-flow row never runs out.
const SNAT_PORTS: std::ops::RangeInclusive<u16> = 1024..=65_535;
/// The SNAT port of the planted self-looping reply entry.
const SNAT_REPLY_PORT: u16 = 65_000;
/// Most new SNAT flows per run (each holds two `LB4_SNAT` entries).
const SNAT_FRAMES: usize = 2_000;
/// A port nothing is configured on ("no service" frames).
const NO_SERVICE_PORT: u16 = 22;
/// Conntrack capacity of the normal configurations: room for every flow the miss case
/// creates, so it measures inserts, not LRU evictions.
const CT_CAPACITY: u32 = 1 << 20;
/// Conntrack capacity when 1M entries are pre-loaded.
const CT_CAPACITY_FILLED: u32 = 1 << 21;
/// Entries pre-loaded in the "1M conntrack entries" configuration.
const CT_FILL: usize = 1_000_000;

struct Plan {
    sizes: Vec<usize>,
    /// Repeats per `BPF_PROG_RUN` for the repeated cases.
    repeat: u32,
    /// Runs per case (each gives one sample).
    runs: usize,
    /// Distinct frames per run for the 1-frame-per-call cases.
    frames: usize,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                sizes: vec![1, 1_000, 10_000, 100_000],
                repeat: 100_000,
                runs: 5,
                frames: 4_000,
            }
        } else {
            Plan {
                sizes: vec![1, 1_000, 10_000, 100_000],
                repeat: 1_000_000,
                runs: 11,
                frames: 20_000,
            }
        }
    }
}

/// Source of distinct client tuples (10.1.0.0/16, ports 10000..60000).
struct Clients(u32);

impl Clients {
    fn next(&mut self) -> SocketAddrV4 {
        let i = self.0;
        self.0 += 1;
        let ip = Ipv4Addr::from(0x0a01_0000 + i / 50_000);
        SocketAddrV4::new(ip, 10_000 + (i % 50_000) as u16)
    }
}

fn node(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(NODE_IP, port)
}

pub fn run(quick: bool, p: &Progress) -> anyhow::Result<PartResult> {
    let plan = Plan::new(quick);
    let mut out = PartResult {
        part: "per-packet".into(),
        quick,
        ..Default::default()
    };
    out.facts.insert(
        "bpf_jit_enable".into(),
        std::fs::read_to_string("/proc/sys/net/core/bpf_jit_enable")
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|e| format!("unreadable: {e}")),
    );
    out.facts.insert(
        "method".into(),
        "BPF_PROG_RUN; repeated frames target a self-looping frontend so every repeat takes \
         the same path; conntrack misses use one fresh frame per call; every run checked \
         against the verdict counters"
            .into(),
    );
    // The verifier's processed-instruction counts of the programs measured.
    let mut probe = Harness::new("bench-pp-insns", &Capacities::default());
    let insns: Vec<String> = [
        lb_common::maps::PROG_XDP_INGRESS,
        lb_common::maps::PROG_XDP_INGRESS_TIMED,
        lb_common::maps::PROG_TC_EGRESS,
        lb_common::maps::PROG_TC_EGRESS_TIMED,
        lb_common::maps::PROG_TC_INGRESS,
        lb_common::maps::PROG_TC_INGRESS_TIMED,
    ]
    .iter()
    .map(|name| {
        let count = if name.starts_with("lb_xdp") {
            probe
                .datapath
                .xdp_program_named(name)
                .ok()
                .and_then(|p| p.info().ok())
                .and_then(|i| i.verified_instruction_count())
        } else {
            probe
                .datapath
                .tc_program_named(name)
                .ok()
                .and_then(|p| p.info().ok())
                .and_then(|i| i.verified_instruction_count())
        };
        format!("{name} {}", count.map_or("?".into(), |c| c.to_string()))
    })
    .collect();
    drop(probe);
    out.facts
        .insert("verifier_processed_insns".into(), insns.join(", "));
    let largest = plan.sizes.iter().copied().max().unwrap_or(1);
    let mut configs: Vec<(usize, usize)> = plan.sizes.iter().map(|n| (*n, 0)).collect();
    configs.push((largest, CT_FILL));
    let mut clients = Clients(0);
    let ns = lb_testkit::lab::Netns::empty("pp");
    for (n, fill) in configs {
        let label = if fill > 0 {
            format!("N={n} with {fill} conntrack entries")
        } else {
            format!("N={n}")
        };
        p.say(&format!("per-packet: {label}: loading and programming"));
        // In a namespace of this run with no routes: the TC-ingress rows' FIB lookups must
        // fail the same way on every machine (XDP's, with no ingress interface, always do).
        let rows = ns
            .enter(|| measure(n, fill, &plan, &mut clients, p))
            .unwrap_or_else(|e| {
                vec![Row::new("per-packet", "setup", "ours", n as u64).failed(format!("{e:#}"))]
            });
        out.rows.extend(rows);
    }
    out.rows.extend(crate::ct_lru::rows(quick, p));
    Ok(out)
}

/// The service set of one configuration: `n` Services (the last one the measured NodePort
/// Service, whose TCP and UDP ports loop back to the node) plus a hostPort frontend.
fn entries_for(n: usize) -> anyhow::Result<(services::Entries, usize)> {
    let self_loop = vec![node(NODE_PORT); services::ENDPOINTS_PER_SERVICE];
    let mut set = ServiceSet::synthetic(n, Position::End, false, &self_loop)?;
    let (t, u) = (set.target_tcp, set.target_udp);
    set.ports[t].node_port = Some(NODE_PORT);
    set.ports[u].node_port = Some(NODE_PORT);
    let mut e = services::entries(&set);
    let hp_id = e.backends.len() as u32 + 1;
    e.backends.push((
        hp_id,
        Backend4 {
            addr: u32::from(NODE_IP).to_be(),
            port: HOST_PORT.to_be(),
            proto: IPPROTO_TCP,
            flags: 0,
            node_addr: 0,
        },
    ));
    let hp = Frontend4Key::new(
        u32::from(NODE_IP).to_be(),
        HOST_PORT.to_be(),
        IPPROTO_TCP,
        0,
    );
    e.slots.push((
        hp.with_slot(1),
        Service4Value {
            backend_id: hp_id,
            ..Default::default()
        },
    ));
    e.masters.push((
        hp,
        Service4Value {
            backend_id: 0,
            count: 1,
            flags: flags::HOSTPORT,
            svc_id: set.ports.len() as u32 + 1,
            affinity_timeout_s: 0,
        },
    ));
    // A NodePort whose endpoints all run on another node: new flows are SNATed.
    let snat_fe = Frontend4Key::new(0, SNAT_NODE_PORT.to_be(), IPPROTO_TCP, 0);
    let first = e.backends.len() as u32 + 1;
    for (i, id) in (first..first + REMOTE_BACKENDS).enumerate() {
        e.backends.push((
            id,
            Backend4 {
                addr: remote_backend(i).to_be(),
                port: 8080u16.to_be(),
                proto: IPPROTO_TCP,
                flags: backend_flags::REMOTE,
                node_addr: 0,
            },
        ));
        e.slots.push((
            snat_fe.with_slot(i as u16 + 1),
            Service4Value {
                backend_id: id,
                ..Default::default()
            },
        ));
    }
    e.masters.push((
        snat_fe,
        Service4Value {
            backend_id: 0,
            count: REMOTE_BACKENDS as u16,
            flags: flags::NODEPORT,
            svc_id: set.ports.len() as u32 + 2,
            affinity_timeout_s: 0,
        },
    ));
    Ok((e, set.ports.len() + 3))
}

/// Remote backends of the SNAT frontend.
const REMOTE_BACKENDS: u32 = 10;

/// Address of remote backend `i` (10.128.0.1 and up; no route to it here).
fn remote_backend(i: usize) -> u32 {
    0x0a80_0001 + i as u32
}

/// The port filter as the agent keeps it: every frontend and backend port of `e`, and the
/// SNAT ports; then switched on.
fn enable_port_filter(
    pins: &lb_agent::loader::PinLayout,
    e: &services::Entries,
) -> anyhow::Result<()> {
    use lb_common::service::port_bits;
    let mut ports = std::collections::BTreeMap::<u16, u8>::new();
    for (k, _) in &e.masters {
        *ports.entry(u16::from_be(k.port)).or_default() |= port_bits::frontend(k.proto);
    }
    for (_, b) in &e.backends {
        *ports.entry(u16::from_be(b.port)).or_default() |= port_bits::backend(b.proto);
    }
    for p in SNAT_PORTS {
        *ports.entry(p).or_default() |= port_bits::TCP_FRONTEND | port_bits::UDP_FRONTEND;
    }
    let mut f = lb_agent::ports::PortFilter::open(pins)?;
    f.narrow(&ports)?;
    f.set_active(true)?;
    Ok(())
}

fn measure(
    n: usize,
    fill: usize,
    plan: &Plan,
    clients: &mut Clients,
    p: &Progress,
) -> anyhow::Result<Vec<Row>> {
    let t0 = Instant::now();
    let (entries, svc_ids) = entries_for(n)?;
    let service_entries = entries.slots.len() + entries.masters.len();
    let caps = Capacities {
        services: service_entries as u32 + 1024,
        backends: entries.backends.len() as u32 + 1024,
        ct: if fill > 0 {
            CT_CAPACITY_FILLED
        } else {
            CT_CAPACITY
        },
        svc_stats: svc_ids as u32 + 16,
    };
    let mut h = Harness::new("bench-pp", &caps);
    h.add_node_addr(NODE_IP);
    bpf_batch::program(h.datapath.pins(), &entries, 8192)?;
    enable_port_filter(h.datapath.pins(), &entries)?;
    if fill > 0 {
        fill_conntrack(&h, fill)?;
        let len = h.ct_len();
        anyhow::ensure!(
            len >= fill,
            "conntrack holds {len} entries after loading {fill}"
        );
    }
    p.say(&format!(
        "per-packet: N={n}: {} map entries{} ready in {:.1}s; measuring",
        entries.len(),
        if fill > 0 {
            format!(" + {fill} conntrack entries")
        } else {
            String::new()
        },
        t0.elapsed().as_secs_f64()
    ));

    let base = |case: &str, prog: Prog| {
        Row::new(
            "per-packet",
            case,
            match prog {
                Prog::Xdp => "ours (XDP)",
                Prog::Tc => "ours (TC)",
                Prog::TcIngress => "ours (TC ingress)",
            },
            n as u64,
        )
        .param("hook", hook_of(prog))
        .param("ct_entries", fill)
        .param("ct_capacity", caps.ct)
        .param("service_map_entries", service_entries)
        .param("runs", plan.runs)
    };
    let mut rows = Vec::new();

    // Established NodePort flow: warm the tuple with its SYN, then repeat an ACK.
    let est_client = clients.next();
    h.run(
        Prog::Xdp,
        &Pkt::tcp(est_client, node(NODE_PORT), TCP_SYN).build(),
    );
    let est = Pkt::tcp(est_client, node(NODE_PORT), TCP_ACK).build();
    let hit = repeated(&mut h, Prog::Xdp, &est, Reason::XdpFwdTracked, plan);
    let hit_med = median_of(&hit);
    rows.push(finish(
        base(CASE_EST, Prog::Xdp).param("repeat", plan.repeat),
        hit,
        "one ACK of a tracked flow, repeated in the kernel",
    ));

    // SYN: conntrack miss + insert, one fresh tuple per call; and its per-call baseline.
    rows.extend(syn_rows(
        &mut h,
        Prog::Xdp,
        clients,
        plan,
        hit_med,
        &base,
        str::to_owned,
    ));

    // hostPort (hostIP = node address), established.
    let hp_client = clients.next();
    h.run(
        Prog::Xdp,
        &Pkt::tcp(hp_client, node(HOST_PORT), TCP_SYN).build(),
    );
    let hp = Pkt::tcp(hp_client, node(HOST_PORT), TCP_ACK).build();
    rows.push(finish(
        base(CASE_HOSTPORT, Prog::Xdp).param("repeat", plan.repeat),
        repeated(&mut h, Prog::Xdp, &hp, Reason::XdpFwdTracked, plan),
        "one ACK of a tracked hostPort flow, repeated",
    ));

    // UDP NodePort, tracked flow.
    let udp_client = clients.next();
    let udp = Pkt::udp(udp_client, node(NODE_PORT)).payload(b"x").build();
    h.run(Prog::Xdp, &udp);
    rows.push(finish(
        base(CASE_UDP, Prog::Xdp).param("repeat", plan.repeat),
        repeated(&mut h, Prog::Xdp, &udp, Reason::XdpFwdTracked, plan),
        "one datagram of a tracked UDP flow, repeated",
    ));

    // Reply of the established flow through TC egress: reverse NAT.
    let reply = Pkt::tcp(node(NODE_PORT), est_client, TCP_ACK).build();
    rows.push(finish(
        base(CASE_REPLY, Prog::Tc).param("repeat", plan.repeat),
        repeated(&mut h, Prog::Tc, &reply, Reason::TcRevNat, plan),
        "the backend's reply of a tracked flow, repeated through TC egress",
    ));

    // SNAT: a new flow to a remote backend (DNAT, SNAT port allocation with a BPF_NOEXIST
    // insert, the FIB lookup), one fresh SYN per call. This namespace has no route to the
    // backends, so the FIB lookup fails and the packet takes the counted XDP_PASS fallback.
    set_snat(h.datapath.pins(), Some(NODE_IP), &SNAT_PORTS)?;
    let snat_plan = Plan {
        sizes: Vec::new(),
        repeat: 1,
        runs: plan.runs,
        frames: plan.frames.min(SNAT_FRAMES),
    };
    rows.push(finish(
        base(CASE_SNAT_NEW, Prog::Xdp).param("frames_per_run", snat_plan.frames),
        per_frame(&mut h, Prog::Xdp, Reason::XdpSnatPass, &snat_plan, |_| {
            Pkt::tcp(clients.next(), node(SNAT_NODE_PORT), TCP_SYN).build()
        }),
        "one fresh SYN per call to a NodePort whose backends are on another node: DNAT, \
         SNAT port allocation (BPF_NOEXIST insert), FIB lookup (no route here: XDP_PASS \
         fallback); includes the per-call overhead like the SYN row",
    ));

    // SNAT reply, repeated: a planted reply entry maps the frame onto itself (client = the
    // SNAT address and port, frontend = the backend), so every repeat takes the same path.
    let (b, bp) = (remote_backend(0).to_be(), 8080u16.to_be());
    let (na, sp) = (u32::from(NODE_IP).to_be(), SNAT_REPLY_PORT.to_be());
    let snat_map = bpf_batch::open(h.datapath.pins(), lb_common::maps::LB4_SNAT)?;
    let key = Ct4Key {
        saddr: b,
        daddr: na,
        sport: bp,
        dport: sp,
        proto: IPPROTO_TCP,
        dir: CT_REPLY,
        _pad: [0; 2],
    };
    let value = Snat4Value {
        addr: na,
        port: sp,
        fe_addr: b,
        fe_port: bp,
        svc_id: 1,
        ..Default::default()
    };
    bpf_batch::update_chunked(snat_map.fd().as_fd(), &[(key, value)], 1)?;
    let reply_frame = Pkt::tcp(
        SocketAddrV4::new(Ipv4Addr::from(remote_backend(0)), 8080),
        node(SNAT_REPLY_PORT),
        TCP_ACK,
    )
    .build();
    rows.push(finish(
        base(CASE_SNAT_REPLY, Prog::Xdp).param("repeat", plan.repeat),
        repeated(
            &mut h,
            Prog::Xdp,
            &reply_frame,
            Reason::XdpRevSnatPass,
            plan,
        ),
        "a remote backend's reply to a SNATed flow, repeated: LB4_SNAT lookup, source and \
         destination rewrite, FIB lookup (no route here: XDP_PASS fallback)",
    ));

    // No service: TCP to a node port nothing listens on.
    let none = Pkt::tcp(clients.next(), node(NO_SERVICE_PORT), TCP_SYN).build();
    rows.push(finish(
        base(CASE_NONE, Prog::Xdp).param("repeat", plan.repeat),
        repeated(&mut h, Prog::Xdp, &none, Reason::XdpPassNotService, plan),
        "a SYN to the node on a port no frontend uses, repeated (the port filter passes it)",
    ));

    // The ingress program at TC ingress (`--attach tc`), the same cases. This namespace has
    // no routes: the DNATed packets go to the stack (TC_ACT_OK), as the XDP rows' do.
    let tc_client = clients.next();
    h.run(
        Prog::TcIngress,
        &Pkt::tcp(tc_client, node(NODE_PORT), TCP_SYN).build(),
    );
    let tc_est = Pkt::tcp(tc_client, node(NODE_PORT), TCP_ACK).build();
    rows.push(finish(
        base(&tc_case(CASE_EST), Prog::TcIngress).param("repeat", plan.repeat),
        repeated(
            &mut h,
            Prog::TcIngress,
            &tc_est,
            Reason::XdpFwdTracked,
            plan,
        ),
        "one ACK of a tracked flow through lb_tc_ingress, repeated",
    ));
    let tc_hit_rep = rows
        .last()
        .and_then(|r| r.get("ns_per_packet"))
        .map(|s| s.median);
    rows.extend(syn_rows(
        &mut h,
        Prog::TcIngress,
        clients,
        plan,
        tc_hit_rep,
        &base,
        tc_case,
    ));
    rows.push(finish(
        base(&tc_case(CASE_NONE), Prog::TcIngress).param("repeat", plan.repeat),
        repeated(
            &mut h,
            Prog::TcIngress,
            &none,
            Reason::XdpPassNotService,
            plan,
        ),
        "a SYN to an unused node port through lb_tc_ingress, repeated",
    ));

    // The timed variants (--latency-histogram): the same frames; the histogram must count
    // every run, and the difference to the plain rows is the histogram's own cost.
    h.set_variant(Variant::Timed);
    for (case, prog, frame, want) in [
        (CASE_EST, Prog::Xdp, &est, Reason::XdpFwdTracked),
        (CASE_REPLY, Prog::Tc, &reply, Reason::TcRevNat),
        (CASE_NONE, Prog::Xdp, &none, Reason::XdpPassNotService),
    ] {
        let before = h.maps.latency().unwrap_or_default();
        let m = repeated(&mut h, prog, frame, want, plan).and_then(|(stat, v)| {
            let after = h.maps.latency().unwrap_or_default();
            let counted = |l: &lb_agent::dataplane::Latency| -> u64 {
                match prog {
                    Prog::Xdp | Prog::TcIngress => l.xdp.iter().sum(),
                    Prog::Tc => l.tc.iter().sum(),
                }
            };
            let runs = u64::from(plan.repeat) * plan.runs as u64;
            anyhow::ensure!(
                counted(&after) - counted(&before) == runs,
                "the histogram counted {} of {runs} runs",
                counted(&after) - counted(&before)
            );
            Ok((stat, format!("{v}; the histogram counted all {runs} runs")))
        });
        let mut row = Row::new(
            "per-packet",
            &format!("{case} [timed]"),
            match prog {
                Prog::Xdp => "ours (XDP, --latency-histogram)",
                Prog::Tc => "ours (TC, --latency-histogram)",
                Prog::TcIngress => "ours (TC ingress, --latency-histogram)",
            },
            n as u64,
        )
        .param("hook", hook_of(prog))
        .param("ct_entries", fill)
        .param("ct_capacity", caps.ct)
        .param("service_map_entries", service_entries)
        .param("runs", plan.runs)
        .param("repeat", plan.repeat);
        row = finish(
            row,
            m,
            "the timed program variant on the same frame, repeated",
        );
        rows.push(row);
    }

    // The floors: empty programs that pass the packet, through the same harness, one per
    // hook (a TC run pays for an skb that an XDP run does not).
    h.set_variant(Variant::Floor);
    let floors = [
        (CASE_FLOOR, "floor (lb_xdp_pass)", Prog::Xdp, XDP_PASS),
        (CASE_FLOOR_TC, "floor (lb_tc_pass)", Prog::Tc, TC_ACT_OK),
    ]
    .map(|(case, path, prog, verdict)| {
        let m = floor(&mut h, prog, verdict, &est, plan);
        let med = median_of(&m);
        let row = finish(
            Row::new("per-packet", case, path, n as u64)
                .param("hook", hook_of(prog))
                .param("ct_entries", fill)
                .param("repeat", plan.repeat)
                .param("runs", plan.runs),
            m,
            "an empty program that passes the packet, through the same harness: the cost \
             every row of that hook pays before any work of ours",
        );
        (row, med)
    });
    h.set_variant(Variant::Plain);
    // Every row's cost above its hook's floor.
    for row in rows.iter_mut().filter(|r| r.error.is_none()) {
        let floor = if row.params.get("hook").map(String::as_str) == Some(hook_of(Prog::Tc)) {
            floors[1].1
        } else {
            floors[0].1
        };
        let base = row
            .metrics
            .iter()
            .find(|m| m.name == "adjusted_ns")
            .or_else(|| row.metrics.iter().find(|m| m.name == "ns_per_packet"))
            .map(|m| m.stat.median);
        if let (Some(b), Some(f)) = (base, floor) {
            *row = row
                .clone()
                .metric("above_floor_ns", "ns", Stat::single(b - f));
        }
    }
    rows.extend(floors.into_iter().map(|(row, _)| row));
    Ok(rows)
}

/// The floor rows' cases.
pub const CASE_FLOOR: &str = "floor: empty XDP program (XDP_PASS)";
pub const CASE_FLOOR_TC: &str = "floor: empty TC program (TC_ACT_OK)";

/// `frame` through the floor program of `prog`'s hook ([`Variant::Floor`]), repeated: it
/// must come back unchanged with `verdict`, and no counter may move.
fn floor(h: &mut Harness, prog: Prog, verdict: u32, frame: &[u8], plan: &Plan) -> Measured {
    let before = h.stats();
    let mut samples = Vec::with_capacity(plan.runs);
    for _ in 0..plan.runs {
        let (v, out, d) = h.run_repeat(prog, frame, plan.repeat);
        anyhow::ensure!(
            v == verdict && out == frame,
            "the floor changed the frame or returned {v}"
        );
        samples.push(d.as_nanos() as f64);
    }
    anyhow::ensure!(
        stat_deltas(&before, &h.stats()).is_empty(),
        "the floor program touched the counters"
    );
    Ok((Stat::of(&samples), "no counter touched".to_string()))
}

pub const CASE_SYN: &str = "NodePort TCP SYN (conntrack miss + insert)";
pub const CASE_EST: &str = "NodePort TCP established (conntrack hit)";
pub const CASE_EST_1CALL: &str = "NodePort TCP established, 1 frame per call";
pub const CASE_FIRST_ACK: &str = "NodePort TCP first ACK (half-open -> conntrack)";
pub const CASE_HOSTPORT: &str = "hostPort TCP established";
pub const CASE_UDP: &str = "NodePort UDP (tracked flow)";
pub const CASE_REPLY: &str = "reply, reverse NAT (TC egress)";
pub const CASE_NONE: &str = "no service match";
pub const CASE_SNAT_NEW: &str = "NodePort TCP SYN to a remote backend (SNAT new flow)";
pub const CASE_SNAT_REPLY: &str = "remote backend's reply, reverse SNAT (XDP)";

/// A measured stat and the verification text, or why it failed.
type Measured = anyhow::Result<(Stat, String)>;

fn median_of(m: &Measured) -> Option<f64> {
    m.as_ref().ok().map(|(s, _)| s.median)
}

fn finish(row: Row, m: Measured, how: &str) -> Row {
    match m {
        Ok((stat, verified)) => row
            .metric("ns_per_packet", "ns", stat)
            .note(format!("{how}; {verified}")),
        Err(e) => row.failed(format!("{e:#}")),
    }
}

fn expected_verdict(prog: Prog) -> u32 {
    match prog {
        Prog::Xdp => XDP_PASS,
        Prog::Tc | Prog::TcIngress => TC_ACT_OK,
    }
}

/// The SYN row through `prog` (one fresh SYN per `BPF_PROG_RUN` call), the row of those
/// flows' first ACKs (each moving its flow from the half-open table to `LB4_CT`: the
/// conntrack inserts a SYN no longer makes), and their per-call baseline (one tracked ACK
/// per call). The SYN and first-ACK rows' `adjusted_ns` = row - baseline + `hit_rep` (the
/// established flow's repeated median): the cost without the per-call overhead. `name`
/// gives a case's row name for this program.
fn syn_rows(
    h: &mut Harness,
    prog: Prog,
    clients: &mut Clients,
    plan: &Plan,
    hit_rep: Option<f64>,
    base: &dyn Fn(&str, Prog) -> Row,
    name: fn(&str) -> String,
) -> [Row; 3] {
    // Clients with a half-open slot each, so that every first ACK finds its flow there (a
    // client sharing a slot displaces the earlier flow, whose ACK would start a new one).
    let fresh = distinct_half_open_slots(h, clients, plan.frames * plan.runs);
    let miss = per_frame(h, prog, Reason::XdpFwdNewFlow, plan, |i| {
        Pkt::tcp(fresh[i], node(NODE_PORT), TCP_SYN).build()
    });
    let first_ack = per_frame(h, prog, Reason::XdpFwdTracked, plan, |i| {
        Pkt::tcp(fresh[i], node(NODE_PORT), TCP_ACK).build()
    });
    // Established flows, measured the same way (one frame per call).
    let tuples: Vec<SocketAddrV4> = (0..plan.frames * plan.runs)
        .map(|_| clients.next())
        .collect();
    establish(h, prog, &tuples);
    let hit1 = per_frame(h, prog, Reason::XdpFwdTracked, plan, |i| {
        Pkt::tcp(tuples[i], node(NODE_PORT), TCP_ACK).build()
    });
    let hit1_med = median_of(&hit1);
    let adjusted = |row: Row, m: Option<f64>| match (m, hit1_med, hit_rep) {
        (Some(m), Some(h1), Some(hr)) if row.error.is_none() => {
            row.metric("adjusted_ns", "ns", Stat::single(m - h1 + hr))
        }
        _ => row,
    };
    let miss_med = median_of(&miss);
    let syn = adjusted(
        finish(
            base(&name(CASE_SYN), prog).param("frames_per_run", plan.frames),
            miss,
            "one fresh SYN per BPF_PROG_RUN call (repeat=1), mean of the kernel's per-call \
             times; adjusted_ns = this - (established, 1 frame/call) + (established, repeated)",
        ),
        miss_med,
    );
    let ack_med = median_of(&first_ack);
    let ack = adjusted(
        finish(
            base(&name(CASE_FIRST_ACK), prog).param("frames_per_run", plan.frames),
            first_ack,
            "the first ACK of each SYN's flow, one per call: it moves the flow from its \
             half-open slot into LB4_CT (two inserts); adjusted_ns as for the SYN row",
        ),
        ack_med,
    );
    let baseline = finish(
        base(&name(CASE_EST_1CALL), prog).param("frames_per_run", plan.frames),
        hit1,
        "one tracked ACK per BPF_PROG_RUN call (repeat=1): the per-call baseline for the SYN row",
    );
    [syn, ack, baseline]
}

/// `n` fresh clients whose half-open slots (under the datapath's seed and mask) differ.
fn distinct_half_open_slots(h: &Harness, clients: &mut Clients, n: usize) -> Vec<SocketAddrV4> {
    let cfg = lb_agent::loader::read_config(h.datapath.pins()).unwrap_or_default();
    let mut used = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(n);
    // Bounded: at most a slot's worth of misses per client wanted.
    for _ in 0..n.saturating_mul(16) {
        if out.len() == n {
            break;
        }
        let c = clients.next();
        let slot = lb_common::conntrack::half_open_slot_v4(
            u32::from(*c.ip()).to_be(),
            c.port().to_be(),
            IPPROTO_TCP,
            cfg.hash_seed,
        ) & cfg.half_open_mask;
        if used.insert(slot) {
            out.push(c);
        }
    }
    // Too few slots for `n` distinct ones: the rest share (the first-ACK row then fails
    // its counter check, and says so).
    while out.len() < n {
        out.push(clients.next());
    }
    out
}

/// Make every client's flow to the NodePort established: its SYN (a half-open slot in
/// `LB4_CT_SYN`), then its first ACK (which moves it to `LB4_CT`). With SYNs alone, clients
/// sharing a half-open slot would displace each other.
fn establish(h: &mut Harness, prog: Prog, clients: &[SocketAddrV4]) {
    for c in clients {
        h.run(prog, &Pkt::tcp(*c, node(NODE_PORT), TCP_SYN).build());
        h.run(prog, &Pkt::tcp(*c, node(NODE_PORT), TCP_ACK).build());
    }
}

/// The hook a program runs at (a row's `hook` param: which floor it is measured against).
fn hook_of(prog: Prog) -> &'static str {
    match prog {
        Prog::Xdp => "xdp",
        Prog::Tc | Prog::TcIngress => "tc",
    }
}

/// The case name of a row measured through `lb_tc_ingress`.
pub fn tc_case(case: &str) -> String {
    format!("{case} [TC ingress]")
}

/// Checks that exactly `packets` packets were counted, all under `want`.
fn verify(
    h: &Harness,
    before: &std::collections::BTreeMap<Reason, lb_common::Counter>,
    want: Reason,
    packets: u64,
) -> anyhow::Result<String> {
    let deltas = stat_deltas(before, &h.stats());
    let got = deltas.get(&want).map_or(0, |d| d.0);
    let others: Vec<String> = deltas
        .iter()
        .filter(|(r, _)| **r != want)
        .map(|(r, d)| format!("{}={}", r.name(), d.0))
        .collect();
    anyhow::ensure!(
        got == packets && others.is_empty(),
        "verdict counters disagree: expected {packets} x {}, got {got}{}",
        want.name(),
        if others.is_empty() {
            String::new()
        } else {
            format!(" and {}", others.join(", "))
        }
    );
    Ok(format!(
        "verified: {packets}/{packets} packets counted as {}",
        want.name()
    ))
}

/// `plan.runs` runs of `frame` repeated `plan.repeat` times each; one sample per run.
fn repeated(h: &mut Harness, prog: Prog, frame: &[u8], want: Reason, plan: &Plan) -> Measured {
    let before = h.stats();
    let mut samples = Vec::with_capacity(plan.runs);
    for _ in 0..plan.runs {
        let (verdict, out, d) = h.run_repeat(prog, frame, plan.repeat);
        anyhow::ensure!(
            verdict == expected_verdict(prog),
            "verdict {verdict}, want {}",
            expected_verdict(prog)
        );
        anyhow::ensure!(
            out == frame,
            "the self-looping rewrite changed the frame, so repeats would not take the same path"
        );
        samples.push(d.as_nanos() as f64);
    }
    let v = verify(h, &before, want, u64::from(plan.repeat) * plan.runs as u64)?;
    Ok((Stat::of(&samples), v))
}

/// `plan.runs` runs of `plan.frames` distinct frames, one `BPF_PROG_RUN` call each
/// (`repeat = 1`); one sample (mean ns per call) per run. `frame(i)` builds frame `i` of all.
fn per_frame(
    h: &mut Harness,
    prog: Prog,
    want: Reason,
    plan: &Plan,
    mut frame: impl FnMut(usize) -> Vec<u8>,
) -> Measured {
    let before = h.stats();
    let mut samples = Vec::with_capacity(plan.runs);
    for r in 0..plan.runs {
        let frames: Vec<Vec<u8>> = (0..plan.frames)
            .map(|i| frame(r * plan.frames + i))
            .collect();
        let mut total_ns = 0u128;
        for f in &frames {
            let (verdict, _, d) = h.run_repeat(prog, f, 1);
            anyhow::ensure!(
                verdict == expected_verdict(prog),
                "verdict {verdict}, want {}",
                expected_verdict(prog)
            );
            total_ns += d.as_nanos();
        }
        samples.push(total_ns as f64 / plan.frames as f64);
    }
    let v = verify(h, &before, want, (plan.frames * plan.runs) as u64)?;
    Ok((Stat::of(&samples), v))
}

/// Loads `entries` conntrack entries (half forward, half reply, as real flows come in
/// pairs) with batch updates: flows from 10.2.0.0/15 to NodePorts 30000..31000, backends in
/// the filler endpoint range.
fn fill_conntrack(h: &Harness, entries: usize) -> anyhow::Result<()> {
    let ct = bpf_batch::open(h.datapath.pins(), lb_common::maps::LB4_CT)?;
    let mut batch: Vec<(Ct4Key, Ct4Value)> = Vec::with_capacity(entries);
    let node_be = u32::from(NODE_IP).to_be();
    for f in 0..(entries / 2) as u32 {
        let client = (0x0a02_0000 + f / 32_768).to_be();
        let sport = (20_000 + (f % 32_768) as u16).to_be();
        let dport = (30_000 + (f % 1_000) as u16).to_be();
        let backend = (0x0a80_0000 + (f % 100_000) + 1).to_be();
        let bport = 8080u16.to_be();
        let fwd = Ct4Key {
            saddr: client,
            daddr: node_be,
            sport,
            dport,
            proto: IPPROTO_TCP,
            dir: CT_FORWARD,
            _pad: [0; 2],
        };
        let rev = Ct4Key {
            saddr: backend,
            daddr: client,
            sport: bport,
            dport: sport,
            proto: IPPROTO_TCP,
            dir: CT_REPLY,
            _pad: [0; 2],
        };
        let v = Ct4Value {
            nat_addr: backend,
            nat_port: bport,
            backend_id: f % 100_000 + 1,
            svc_id: 1,
            ..Default::default()
        };
        batch.push((fwd, v));
        batch.push((
            rev,
            Ct4Value {
                nat_addr: node_be,
                nat_port: dport,
                ..v
            },
        ));
    }
    bpf_batch::update_chunked(ct.fd().as_fd(), &batch, 65_536)?;
    Ok(())
}
