//! A loaded datapath (programs + pinned maps in a private pin dir) driven through
//! `BPF_PROG_RUN`: program frontends, run frames through XDP or TC, read counters and
//! conntrack. Shared by the packet-fixture tests and the per-packet benchmark.
use std::{collections::BTreeMap, net::SocketAddrV4, time::Duration};

use aya::programs::{TestRun, TestRunOptions};
use lb_agent::{
    dataplane::{BpfDataplane, Dataplane},
    loader::{open_pinned_map, Capacities, Datapath, PinLayout},
};
use lb_common::{
    maps, service, Affinity4Key, Affinity4Value, Backend4, Counter, Frontend4Key, Reason,
    Service4Value,
};

use crate::bpffs::PinDir;

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;

/// Whether `BPF_PROG_RUN` refuses `frame` as an skb (TC): shorter than an Ethernet header,
/// or an IPv4 or IPv6 frame shorter than its fixed IP header. Such frames cannot reach TC.
pub fn skb_refuses(frame: &[u8]) -> bool {
    frame.len() < 14
        || match [frame[12], frame[13]] {
            [0x08, 0x00] => frame.len() < 14 + 20,
            [0x86, 0xdd] => frame.len() < 14 + 40,
            _ => false,
        }
}

/// Which program a frame goes through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prog {
    Xdp,
    Tc,
    /// The ingress program at TC ingress (`lb_tc_ingress`, `--attach tc`).
    TcIngress,
}

pub struct Harness {
    pub datapath: Datapath,
    pub maps: BpfDataplane,
    next_backend: u32,
    /// The port-filter bits of every frontend added ([`Harness::enable_port_filter`]).
    ports: std::collections::BTreeMap<u16, u8>,
    /// Which program variant [`Harness::run`] runs.
    variant: Variant,
    // Declared last: removed after the datapath's fds are closed.
    _pins: PinDir,
}

/// The program variant a [`Harness`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// `lb_xdp_ingress`, `lb_tc_egress`.
    Plain,
    /// `lb_xdp_ingress_timed`, `lb_tc_egress_timed` (`--latency-histogram`).
    Timed,
    /// `lb_xdp_pass` and `lb_tc_pass`, empty programs that pass the packet (the
    /// benchmark's floors).
    Floor,
}

/// A frontend to program: address (`None` = any node address), port, protocol, kind flags.
pub struct FrontendSpec {
    pub addr: Option<std::net::Ipv4Addr>,
    pub port: u16,
    pub proto: u8,
    pub flags: u16,
    pub svc_id: u32,
    pub backends: Vec<SocketAddrV4>,
    /// sessionAffinity ClientIP timeout in seconds (0 = none).
    pub affinity_timeout_s: u32,
    /// The backends run on another node (`backend_flags::REMOTE`).
    pub remote: bool,
}

impl FrontendSpec {
    pub fn nodeport(port: u16, proto: u8, svc_id: u32, backends: &[SocketAddrV4]) -> Self {
        Self {
            addr: None,
            port,
            proto,
            flags: service::flags::NODEPORT,
            svc_id,
            backends: backends.to_vec(),
            affinity_timeout_s: 0,
            remote: false,
        }
    }

    /// The same frontend with its backends on another node.
    pub fn remote(self) -> Self {
        Self {
            remote: true,
            ..self
        }
    }

    /// The same frontend with sessionAffinity ClientIP for `secs` seconds.
    pub fn with_affinity(self, secs: u32) -> Self {
        Self {
            affinity_timeout_s: secs,
            ..self
        }
    }

    pub fn hostport(
        host_ip: Option<std::net::Ipv4Addr>,
        port: u16,
        proto: u8,
        svc_id: u32,
        backend: SocketAddrV4,
    ) -> Self {
        Self {
            addr: host_ip,
            port,
            proto,
            flags: service::flags::HOSTPORT,
            svc_id,
            backends: vec![backend],
            affinity_timeout_s: 0,
            remote: false,
        }
    }

    pub fn key(&self) -> Frontend4Key {
        let addr = self.addr.map_or(0, |a| u32::from(a).to_be());
        Frontend4Key::new(addr, self.port.to_be(), self.proto, 0)
    }
}

impl Harness {
    /// Load the datapath into a fresh pin dir. Panics with the loader's message on failure
    /// (missing privileges, no bpffs...).
    pub fn new(what: &str, caps: &Capacities) -> Self {
        Self::load(what, caps, false)
    }

    /// [`Harness::new`] with conntrack maps that keep one LRU list per CPU
    /// (`BPF_F_NO_COMMON_LRU`) instead of the datapath's shared one.
    pub fn new_per_cpu_lru(what: &str, caps: &Capacities) -> Self {
        Self::load(what, caps, true)
    }

    fn load(what: &str, caps: &Capacities, per_cpu_lru: bool) -> Self {
        crate::lab::require_root();
        let pins = PinDir::new(what);
        if per_cpu_lru {
            lb_agent::loader::precreate_per_cpu_conntrack(pins.path(), caps)
                .unwrap_or_else(|e| panic!("per-CPU conntrack in {}: {e}", pins.path().display()));
        }
        let mut datapath = Datapath::load(pins.path(), caps)
            .unwrap_or_else(|e| panic!("loading the datapath into {}: {e}", pins.path().display()));
        let maps = datapath
            .dataplane()
            .unwrap_or_else(|e| panic!("opening the pinned maps: {e}"));
        Self {
            datapath,
            maps,
            next_backend: 1,
            ports: Default::default(),
            variant: Variant::Plain,
            _pins: pins,
        }
    }

    /// Set the conntrack timeouts and the ICMP reject rate in the pinned `LB_CONFIG`.
    pub fn set_ct_policy(&mut self, p: &lb_agent::loader::CtPolicy) {
        lb_agent::loader::set_ct_policy(&PinLayout::new(self._pins.path()), p)
            .expect("set the conntrack policy");
    }

    pub fn add_node_addr(&mut self, addr: std::net::Ipv4Addr) {
        self.maps.put_node_addr(addr).expect("put node addr");
    }

    /// Run `variant` from now on.
    pub fn set_variant(&mut self, variant: Variant) {
        self.variant = variant;
    }

    /// Write the ports of every frontend added so far (and `snat`, where SNATed flows'
    /// replies arrive) into `LB_PORTS` and switch the port filter on, as the agent does.
    pub fn enable_port_filter(&mut self, snat: std::ops::RangeInclusive<u16>) {
        let mut ports = self.ports.clone();
        for p in snat {
            *ports.entry(p).or_default() |=
                service::port_bits::TCP_FRONTEND | service::port_bits::UDP_FRONTEND;
        }
        let mut f = lb_agent::ports::PortFilter::open(&PinLayout::new(self._pins.path()))
            .expect("open LB_PORTS");
        f.narrow(&ports).expect("write LB_PORTS");
        f.set_active(true).expect("switch the port filter on");
    }

    /// Program a frontend in the agent's order: backends, slots, then the master entry.
    /// Returns the backend ids, in `spec.backends` order.
    pub fn add_frontend(&mut self, spec: &FrontendSpec) -> Vec<u32> {
        let key = spec.key();
        *self.ports.entry(spec.port).or_default() |= service::port_bits::frontend(spec.proto);
        for b in &spec.backends {
            *self.ports.entry(b.port()).or_default() |= service::port_bits::backend(spec.proto);
        }
        let mut ids = Vec::new();
        for (i, b) in spec.backends.iter().enumerate() {
            let id = self.next_backend;
            self.next_backend += 1;
            let backend = Backend4 {
                addr: u32::from(*b.ip()).to_be(),
                port: b.port().to_be(),
                proto: spec.proto,
                flags: if spec.remote {
                    service::backend_flags::REMOTE
                } else {
                    0
                },
                node_addr: 0,
            };
            self.maps.put_backend(id, backend).expect("put backend");
            let slot = Service4Value {
                backend_id: id,
                ..Default::default()
            };
            self.maps
                .put_service(key.with_slot(i as u16 + 1), slot)
                .expect("put slot");
            ids.push(id);
        }
        let master = Service4Value {
            backend_id: 0,
            count: spec.backends.len() as u16,
            flags: spec.flags,
            svc_id: spec.svc_id,
            affinity_timeout_s: spec.affinity_timeout_s,
        };
        self.maps.put_service(key, master).expect("put master");
        ids
    }

    /// Run one frame through a program once. Returns (verdict, output frame).
    pub fn run(&mut self, prog: Prog, frame: &[u8]) -> (u32, Vec<u8>) {
        let (verdict, out, _) = self.run_repeat(prog, frame, 1);
        (verdict, out)
    }

    /// Run one frame `repeat` times in the kernel (`BPF_PROG_RUN`); returns the verdict, the
    /// output frame and the kernel's average time per run.
    /// Run one frame through the XDP program as if it arrived on interface `ifindex` of the
    /// calling thread's network namespace (`xdp_md.ingress_ifindex`), so that FIB lookups
    /// see that namespace's routes and neighbours and XDP_TX means "back out of `ifindex`".
    pub fn run_xdp_on(&mut self, ifindex: u32, frame: &[u8]) -> (u32, Vec<u8>) {
        let mut out = vec![0u8; frame.len() + 512];
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
        // egress_ifindex.
        let md: [u32; 6] = [0, frame.len() as u32, 0, ifindex, 0, 0];
        let ctx: Vec<u8> = md.iter().flat_map(|w| w.to_ne_bytes()).collect();
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            repeat: 1,
            ..Default::default()
        };
        let res = self
            .datapath
            .xdp_program()
            .expect("xdp program")
            .test_run(opts)
            .unwrap_or_else(|e| panic!("BPF_PROG_RUN on ifindex {ifindex}: {e}"));
        out.truncate(res.data_size_out as usize);
        (res.return_value, out)
    }

    pub fn run_repeat(
        &mut self,
        prog: Prog,
        frame: &[u8],
        repeat: u32,
    ) -> (u32, Vec<u8>, Duration) {
        let mut out = vec![0u8; frame.len() + 512];
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat,
            ..Default::default()
        };
        let (xdp, tc, tc_in) = match self.variant {
            Variant::Plain => (
                maps::PROG_XDP_INGRESS,
                maps::PROG_TC_EGRESS,
                maps::PROG_TC_INGRESS,
            ),
            Variant::Timed => (
                maps::PROG_XDP_INGRESS_TIMED,
                maps::PROG_TC_EGRESS_TIMED,
                maps::PROG_TC_INGRESS_TIMED,
            ),
            Variant::Floor => (maps::PROG_XDP_PASS, maps::PROG_TC_PASS, maps::PROG_TC_PASS),
        };
        let res = match prog {
            Prog::Xdp => self
                .datapath
                .xdp_program_named(xdp)
                .expect("xdp program")
                .test_run(opts),
            Prog::Tc => self
                .datapath
                .tc_program_named(tc)
                .expect("tc program")
                .test_run(opts),
            Prog::TcIngress => self
                .datapath
                .tc_program_named(tc_in)
                .expect("tc ingress program")
                .test_run(opts),
        }
        .unwrap_or_else(|e| panic!("BPF_PROG_RUN ({prog:?}, {} bytes): {e}", frame.len()));
        out.truncate(res.data_size_out as usize);
        (res.return_value, out, res.duration)
    }

    /// Verdict counters by reason (packets, bytes), summed over CPUs.
    pub fn stats(&self) -> BTreeMap<Reason, Counter> {
        self.maps.stats().expect("read stats").into_iter().collect()
    }

    pub fn ct_len(&self) -> usize {
        self.maps.conntrack().expect("read conntrack").len()
    }

    /// The pin directory of this datapath.
    pub fn pin_dir(&self) -> &std::path::Path {
        self._pins.path()
    }

    /// The pinned `LB4_AFFINITY` map, for reading and planting entries.
    pub fn affinity(&self) -> AffinityMap {
        let pins = PinLayout::new(self._pins.path());
        let data = open_pinned_map(&pins, maps::LB4_AFFINITY).expect("open LB4_AFFINITY");
        aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(data)).expect("LB4_AFFINITY")
    }
}

/// The affinity map as the tests see it.
pub type AffinityMap = aya::maps::HashMap<aya::maps::MapData, Affinity4Key, Affinity4Value>;

/// Per-reason packet deltas between two stats snapshots (only non-zero ones, verdicts
/// only: the conntrack events are in [`event_deltas`]).
pub fn stat_deltas(
    before: &BTreeMap<Reason, Counter>,
    after: &BTreeMap<Reason, Counter>,
) -> BTreeMap<Reason, (u64, u64)> {
    all_deltas(before, after)
        .into_iter()
        .filter(|(r, _)| !r.is_event())
        .collect()
}

/// The conntrack event counters that changed (`Reason::is_event`): entries created,
/// expired, restored, removed.
pub fn event_deltas(
    before: &BTreeMap<Reason, Counter>,
    after: &BTreeMap<Reason, Counter>,
) -> BTreeMap<Reason, u64> {
    all_deltas(before, after)
        .into_iter()
        .filter(|(r, _)| r.is_event())
        .map(|(r, (n, _))| (r, n))
        .collect()
}

fn all_deltas(
    before: &BTreeMap<Reason, Counter>,
    after: &BTreeMap<Reason, Counter>,
) -> BTreeMap<Reason, (u64, u64)> {
    after
        .iter()
        .filter_map(|(r, a)| {
            let b = before.get(r).copied().unwrap_or_default();
            let d = (a.packets - b.packets, a.bytes - b.bytes);
            (d != (0, 0)).then_some((*r, d))
        })
        .collect()
}
