//! e2e, remote backend: TCP_CRR through node0's NodePort to a pod on node1 of a two-node lab
//! (one bridge), side by side: `direct` (client to the pod, routed by node1, no NAT: the
//! floor), `ours` (XDP DNAT + SNAT on node0, forwarded with XDP_TX both ways), and kube-proxy's
//! iptables (`KUBE-MARK-MASQ` + `MASQUERADE`) and nftables rules on node0. One lab per path,
//! all alive together; rounds interleave the paths.
use std::net::SocketAddrV4;
use std::path::Path;

use anyhow::Context as _;
use lb_agent::dataplane::Dataplane as _;
use lb_agent::loader::{set_snat, Capacities, Datapath, PinLayout};
use lb_bench::schema::Row;
use lb_common::{service::backend_flags, Reason};
use lb_testkit::bpffs::PinDir;
use lb_testkit::lab::{Cluster, Topology, NODE_UPLINK};

use crate::labkit::{self, ClientResult, PathKind, SERVER_PORT, SERVER_PORTS};
use crate::rules::{self, NodeConfig};
use crate::services::{self, Position, ServiceSet};
use crate::Progress;

pub const CASE: &str = "TCP_CRR remote (SNAT)";
const PATHS: [PathKind; 5] = [
    PathKind::Direct,
    PathKind::Ours,
    PathKind::OursTc,
    PathKind::Iptables(Position::End),
    PathKind::Nftables,
];

/// Our datapath on node0, kept for as long as the path is measured.
struct OursOnNode0 {
    maps: lb_agent::dataplane::BpfDataplane,
    _datapath: Datapath,
    _pins: PinDir,
}

struct PathLab {
    kind: PathKind,
    cluster: Cluster,
    ours: Option<OursOnNode0>,
    target: SocketAddrV4,
    results: Vec<ClientResult>,
    error: Option<String>,
}

fn setup(kind: PathKind, loadgen: &Path, p: &Progress) -> anyhow::Result<PathLab> {
    let mut cluster = std::panic::catch_unwind(|| {
        let c = Topology::new().nodes(2).pods_per_node(1).build();
        c.wait_reachable();
        c
    })
    .map_err(|e| anyhow::anyhow!("building the lab: {}", labkit::panic_text(&e)))?;
    labkit::tune_client(&cluster.client)?;
    let server = labkit::loadgen_server(&cluster.nodes[1].pods[0].ns, loadgen, 0)?;
    cluster.adopt("loadgen-server", server);
    let pod = cluster.nodes[1].pods[0].ip;
    let node0 = cluster.nodes[0].ip;
    let eps: Vec<SocketAddrV4> = (0..SERVER_PORTS)
        .map(|k| SocketAddrV4::new(pod, SERVER_PORT + k))
        .collect();
    let set = ServiceSet::synthetic(1, Position::End, true, &eps)?;
    let node_port = set
        .target_tcp()
        .node_port
        .context("the target Service has no NodePort")?;
    let cfg = NodeConfig {
        cluster_cidr: "10.244.0.0/16".into(),
        node_ips: vec![node0],
    };
    let mut ours = None;
    match kind {
        PathKind::Direct => {}
        PathKind::Ours | PathKind::OursTc => {
            let hook = kind.hook().unwrap_or_default();
            let mut entries = services::entries(&set);
            for (_, b) in &mut entries.backends {
                b.flags |= backend_flags::REMOTE;
            }
            let pins = PinDir::new("bench-remote");
            let mut datapath = Datapath::load(pins.path(), &Capacities::default())
                .context("loading the datapath")?;
            let mode = cluster.nodes[0]
                .ns
                .enter(|| labkit::attach_to(&mut datapath, NODE_UPLINK, hook))
                .context("attaching to node0's uplink")?;
            let mut maps = datapath.dataplane()?;
            maps.put_node_addr(node0)?;
            services::program(&mut maps, &entries)?;
            set_snat(
                &PinLayout::new(pins.path()),
                Some(node0),
                &(61_000..=65_535),
            )?;
            cluster.nodes[0]
                .ns
                .enter(|| std::fs::write("/proc/sys/net/ipv4/conf/up0/accept_local", "1"))?;
            p.say(&format!(
                "  remote/{}: {mode:?} on node0, SNAT to {node0}",
                kind.label()
            ));
            ours = Some(OursOnNode0 {
                maps,
                _datapath: datapath,
                _pins: pins,
            });
        }
        PathKind::Iptables(_) => {
            let text = rules::iptables_restore(&set.ports, &cfg);
            labkit::apply_file(
                &cluster.nodes[0].ns,
                &["iptables-restore"],
                &text,
                "iptables",
            )?;
        }
        PathKind::Nftables => {
            let text = rules::nftables_script(&set.ports, &cfg);
            labkit::apply_file(&cluster.nodes[0].ns, &["nft", "-f"], &text, "nftables")?;
        }
    }
    let target = match kind {
        PathKind::Direct => SocketAddrV4::new(pod, SERVER_PORT),
        _ => SocketAddrV4::new(node0, node_port),
    };
    Ok(PathLab {
        kind,
        cluster,
        ours,
        target,
        results: Vec::new(),
        error: None,
    })
}

/// The rows of the remote-backend comparison: `rounds` interleaved rounds of `crr`
/// connections per path.
pub fn rows(loadgen: &Path, rounds: usize, crr: u64, max_s: f64, p: &Progress) -> Vec<Row> {
    let mut labs = Vec::new();
    let mut rows = Vec::new();
    for kind in PATHS {
        p.say(&format!("e2e remote: setting up path {}", kind.label()));
        match setup(kind, loadgen, p) {
            Ok(l) => labs.push(l),
            Err(e) => {
                rows.push(Row::new("e2e", CASE, &kind.label(), 1).failed(format!("setup: {e:#}")))
            }
        }
    }
    let before: Vec<_> = labs
        .iter()
        .map(|l| l.ours.as_ref().and_then(|o| o.maps.stats().ok()))
        .collect();
    for round in 0..rounds {
        let mut line = Vec::new();
        for idx in crate::e2e::rotate(&(0..labs.len()).collect::<Vec<_>>(), round) {
            let l = &mut labs[*idx];
            if l.error.is_some() {
                continue;
            }
            match labkit::client_run(&l.cluster.client, loadgen, "tcp_crr", l.target, crr, max_s) {
                Ok(r) if r.count > 0 => {
                    line.push(format!("{} {:.1}", l.kind.label(), r.p50_us));
                    l.results.push(r);
                }
                Ok(r) => l.error = Some(format!("no connection completed: {}", r.last_error)),
                Err(e) => l.error = Some(format!("{e:#}")),
            }
        }
        p.say(&format!(
            "e2e remote: round {}/{rounds} TCP_CRR p50 µs: {}",
            round + 1,
            line.join(" | ")
        ));
    }
    for (l, before) in labs.iter().zip(before) {
        let row = Row::new("e2e", CASE, &l.kind.label(), 1)
            .param("rounds", rounds)
            .param("transactions_per_run", crr)
            .param("target", l.target);
        if let Some(e) = &l.error {
            rows.push(row.failed(e));
            continue;
        }
        // Ours: the SNAT path must have carried every connection, out and back, from XDP.
        let mut verified = String::new();
        if let (Some(o), Some(before)) = (&l.ours, before) {
            let after = match o.maps.stats() {
                Ok(a) => a,
                Err(e) => {
                    rows.push(row.failed(format!("reading counters: {e}")));
                    continue;
                }
            };
            let delta = |r: Reason| {
                let pk = |s: &Vec<(Reason, lb_common::Counter)>| {
                    s.iter()
                        .find(|(x, _)| *x == r)
                        .map_or(0, |(_, c)| c.packets)
                };
                pk(&after).saturating_sub(pk(&before))
            };
            let done: u64 = l.results.iter().map(|r| r.count).sum();
            let (tx, rev) = (delta(Reason::XdpSnatTx), delta(Reason::XdpRevSnatTx));
            if tx < done || rev < done {
                rows.push(row.failed(format!(
                    "{done} connections but {tx} SNAT XDP_TX and {rev} reverse XDP_TX packets"
                )));
                continue;
            }
            verified = format!("; XDP_TX carried {tx} SNATed and {rev} reverse-translated packets");
        }
        rows.push(labkit::with_latency(row, &l.results).note(format!(
            "client -> node0 NodePort -> pod on node1 (direct: client -> pod via node1); \
                     median over {} interleaved rounds{verified}",
            l.results.len()
        )));
    }
    rows
}
