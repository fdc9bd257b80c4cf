//! Part 2: end-to-end request latency in the netns lab (client -> node -> pod), per path:
//! direct (no NAT), ours (NodePort through XDP/TC), kube-proxy iptables (target Service at
//! the end and in the middle of the chains) and kube-proxy nftables, at several Service
//! counts, for TCP_RR, TCP_CRR and UDP_RR.
//!
//! Plus [`CLUSTERIP_CASE`]: TCP_CRR from a client process in pod 1 to the target Service's
//! ClusterIP, whose endpoints are pod 0's ports on the same node. The client runs in a lab
//! cgroup of its own (socket hooks act on the cgroup of the process that makes the socket).
//! `direct`: pod 1 to pod 0's IP. `ours`: the socket hooks (connect4, sendmsg4, recvmsg4,
//! getpeername4) attached to that cgroup, as `lb-agent run --cgroup PATH` attaches them:
//! connect() is translated to pod 0's address once per connection and no packet is NATed.
//! iptables / nftables: kube-proxy's rules on the node; the SYN goes pod 1 -> node
//! (PREROUTING DNAT) -> pod 0 and the replies are un-DNATed by conntrack.
//!
//! Every path has a lab of its own (its own client, node and pod namespaces), so exactly one
//! datapath is active on each node and no conntrack state or rule leftovers carry over. All
//! labs (every N, every path) exist at the same time and the runs are interleaved: round r
//! runs every mode on every lab, in an order rotated each round. A change in the machine's load (this
//! machine is shared) then hits every path alike, and round r of two paths is a paired
//! measurement: the report's ratios are per-round ratios. Same N Services, same server,
//! same payload (1 byte each way), same number of runs and transactions on every path.
//!
//! A reply from the pod on `NODE_IP:nodePort` proves the NAT path carried it: nothing
//! listens on the node itself. For ours, the verdict counters must also have counted every
//! transaction, forward and reverse. Likewise nothing listens on (or routes) a ClusterIP: a
//! reply proves a DNAT (iptables, nftables) or a translated connect (ours, whose
//! `SockConnectXlate` counter must have counted every connection).
use std::collections::BTreeMap;
use std::net::SocketAddrV4;
use std::path::Path;

use anyhow::anyhow;
use lb_agent::dataplane::Dataplane as _;
use lb_bench::schema::{PartResult, Row, Stat, CLUSTERIP_CASE};
use lb_common::Reason;
use lb_testkit::cgroup::LabCgroup;
use lb_testkit::lab::{Lab, Netns};

use crate::labkit::{self, Active, ClientResult, PathKind};
use crate::services::Position;
use crate::Progress;

/// A request/response mode: the row's case, the `lb-loadgen` mode, and where the client is.
#[derive(Clone, Copy, Debug)]
pub struct Mode {
    pub case: &'static str,
    pub arg: &'static str,
    /// The client runs in [`CLIENT_POD`] and targets the ClusterIP (else: the client
    /// namespace, targeting the NodePort).
    pub from_pod: bool,
}

/// The modes, in run order.
pub const MODES: [Mode; 4] = [
    Mode {
        case: "TCP_RR",
        arg: "tcp_rr",
        from_pod: false,
    },
    Mode {
        case: "TCP_CRR",
        arg: "tcp_crr",
        from_pod: false,
    },
    Mode {
        case: "UDP_RR",
        arg: "udp_rr",
        from_pod: false,
    },
    Mode {
        case: CLUSTERIP_CASE,
        arg: "tcp_crr",
        from_pod: true,
    },
];

/// The pod the ClusterIP client runs in; pod 0 holds the target Service's endpoints.
pub const CLIENT_POD: usize = 1;

pub const PATHS: [PathKind; 6] = [
    PathKind::Direct,
    PathKind::Ours,
    PathKind::OursTc,
    PathKind::Iptables(Position::End),
    PathKind::Iptables(Position::Middle),
    PathKind::Nftables,
];

struct Plan {
    sizes: Vec<usize>,
    /// The sizes the pod -> ClusterIP case runs at (their labs get the client pod).
    clusterip_sizes: Vec<usize>,
    rounds: usize,
    /// Transactions per run: RR (TCP and UDP), CRR, pod -> ClusterIP CRR.
    rr: u64,
    crr: u64,
    clusterip_crr: u64,
    max_s: f64,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            // The ClusterIP case adds a few seconds only: one N, fewer connections.
            Plan {
                sizes: vec![1, 1_000],
                clusterip_sizes: vec![1],
                rounds: 5,
                rr: 2_000,
                crr: 1_000,
                clusterip_crr: 300,
                max_s: 20.0,
            }
        } else {
            Plan {
                sizes: vec![1, 1_000, 10_000],
                clusterip_sizes: vec![1, 1_000, 10_000],
                rounds: 7,
                rr: 10_000,
                crr: 3_000,
                clusterip_crr: 3_000,
                max_s: 60.0,
            }
        }
    }

    /// Transactions per run of `mode`.
    fn count(&self, mode: &Mode) -> u64 {
        match (mode.from_pod, mode.arg) {
            (true, _) => self.clusterip_crr,
            (false, "tcp_crr") => self.crr,
            _ => self.rr,
        }
    }
}

/// The client pod of a lab that runs the pod -> ClusterIP case.
struct ClientPod {
    /// What the client in [`CLIENT_POD`] connects to: the target's ClusterIP (direct: pod 0).
    target: SocketAddrV4,
    /// The pod's cgroup (ours: where the socket hooks are); removed on drop.
    _cgroup: LabCgroup,
}

/// One path's lab, set up and ready.
struct PathLab {
    kind: PathKind,
    lab: Lab,
    active: Active,
    tcp: SocketAddrV4,
    udp: SocketAddrV4,
    /// Per mode, one result per round.
    results: BTreeMap<&'static str, Vec<ClientResult>>,
    error: Option<String>,
    /// Only at the sizes the ClusterIP case runs at. Last: its cgroup is removed after the
    /// lab's processes and our links are gone.
    client_pod: Option<ClientPod>,
}

impl PathLab {
    /// Where `mode`'s client runs and what it targets; `None`: this lab does not run `mode`.
    fn client(&self, mode: &Mode) -> Option<(&Netns, SocketAddrV4)> {
        if mode.from_pod {
            let cp = self.client_pod.as_ref()?;
            Some((&self.lab.pods[CLIENT_POD].ns, cp.target))
        } else if mode.arg == "udp_rr" {
            Some((&self.lab.client, self.udp))
        } else {
            Some((&self.lab.client, self.tcp))
        }
    }
}

pub fn run(quick: bool, p: &Progress) -> anyhow::Result<PartResult> {
    let plan = Plan::new(quick);
    let loadgen = labkit::loadgen_bin()?;
    let mut out = PartResult {
        part: "e2e".into(),
        quick,
        ..Default::default()
    };
    out.facts
        .insert("iptables".into(), tool_version(&["iptables", "--version"]));
    out.facts
        .insert("nft".into(), tool_version(&["nft", "--version"]));
    out.facts.insert(
        "method".into(),
        format!(
            "one netns lab per (N, path), all alive together; {} interleaved rounds: each \
             round runs every mode on every lab, one N's paths back to back, the order of the \
             Ns and of the paths rotated each round; lb-loadgen client in the client ns (the \
             {CLUSTERIP_CASE} case: in pod {CLIENT_POD}, in a lab cgroup of its own where ours \
             attaches its socket hooks), server in pod 0; 1-byte request and reply; each \
             transaction timed with the monotonic clock",
            plan.rounds
        ),
    );
    // Every (N, path) lab is built first and kept alive, so the rounds can interleave all of
    // them: a change in the machine's load then hits every N and every path alike.
    let mut labs: Vec<(usize, PathLab)> = Vec::new();
    for &n in &plan.sizes {
        for kind in PATHS {
            p.say(&format!("e2e: N={n}: setting up path {}", kind.label()));
            let with_pod = plan.clusterip_sizes.contains(&n);
            match setup(n, kind, with_pod, &loadgen, p) {
                Ok(pl) => {
                    if let Some(o) = &pl.active.ours {
                        out.facts
                            .insert("xdp_attach_mode".into(), format!("{:?}", o.mode));
                    }
                    labs.push((n, pl));
                }
                Err(e) => {
                    p.say(&format!("  FAILED: {e:#}"));
                    for mode in MODES.iter().filter(|m| with_pod || !m.from_pod) {
                        out.rows.push(
                            Row::new("e2e", mode.case, &kind.label(), n as u64)
                                .failed(format!("setup: {e:#}")),
                        );
                    }
                }
            }
        }
    }
    let before: Vec<_> = labs
        .iter()
        .map(|(_, l)| l.active.ours.as_ref().and_then(|o| o.maps.stats().ok()))
        .collect();
    let order = interleaving(&labs.iter().map(|(n, _)| *n).collect::<Vec<_>>());
    for round in 0..plan.rounds {
        for mode in MODES {
            let count = plan.count(&mode);
            for group in rotate(&order, round) {
                let mut line = Vec::new();
                let mut n_of_group = 0;
                for idx in rotate(group, round) {
                    let (n, pl) = &mut labs[*idx];
                    n_of_group = *n;
                    if pl.error.is_some() {
                        continue;
                    }
                    let Some((ns, target)) = pl.client(&mode) else {
                        continue;
                    };
                    match one_run(ns, &loadgen, &mode, target, count, plan.max_s) {
                        Ok(res) => {
                            line.push(format!("{} {:.1}", pl.kind.label(), res.p50_us));
                            pl.results.entry(mode.case).or_default().push(res);
                        }
                        Err(e) => {
                            p.say(&format!(
                                "  N={n} {} {}: FAILED: {e:#}",
                                pl.kind.label(),
                                mode.case
                            ));
                            pl.error = Some(format!("{}: {e:#}", mode.case));
                        }
                    }
                }
                if line.is_empty() {
                    continue;
                }
                p.say(&format!(
                    "e2e: round {}/{} {} N={n_of_group} p50 µs: {}",
                    round + 1,
                    plan.rounds,
                    mode.case,
                    line.join(" | ")
                ));
            }
        }
    }
    for ((n, pl), before) in labs.iter().zip(before) {
        out.rows.extend(rows_for(*n, pl, before, &plan));
    }
    drop(labs);
    // A NodePort whose endpoint runs on another node: SNAT (ours) against MASQUERADE.
    out.rows.extend(crate::remote::rows(
        &loadgen,
        plan.rounds,
        plan.crr,
        plan.max_s,
        p,
    ));
    Ok(out)
}

/// Lab indices grouped by N (in first-appearance order): the runs of one N's paths follow
/// each other, so the paths a ratio compares are measured seconds apart, not minutes.
pub fn interleaving(ns: &[usize]) -> Vec<Vec<usize>> {
    let mut groups: Vec<(usize, Vec<usize>)> = Vec::new();
    for (i, n) in ns.iter().enumerate() {
        match groups.iter_mut().find(|(m, _)| m == n) {
            Some((_, g)) => g.push(i),
            None => groups.push((*n, vec![i])),
        }
    }
    groups.into_iter().map(|(_, g)| g).collect()
}

/// `v` rotated left by `by` (round r starts with element r): every element takes every
/// position over the rounds, so no path always runs first or right after another.
pub fn rotate<T>(v: &[T], by: usize) -> impl Iterator<Item = &T> {
    let k = v.len().max(1);
    (0..v.len()).map(move |i| &v[(i + by) % k])
}

fn tool_version(cmd: &[&str]) -> String {
    std::process::Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|e| format!("unavailable: {e}"))
}

/// One path's lab for `n` Services; `with_pod`: with the client pod of the ClusterIP case.
fn setup(
    n: usize,
    kind: PathKind,
    with_pod: bool,
    loadgen: &Path,
    p: &Progress,
) -> anyhow::Result<PathLab> {
    // Pod 0: the target's endpoints; pod 1: the ClusterIP client.
    let pods = if with_pod { CLIENT_POD + 1 } else { 1 };
    let mut lab = labkit::new_lab(pods, loadgen)?;
    let cgroup = if with_pod {
        Some(client_cgroup(&mut lab.pods[CLIENT_POD].ns)?)
    } else {
        None
    };
    let set = labkit::service_set(&lab, n, kind)?;
    let sock = cgroup
        .as_ref()
        .filter(|_| matches!(kind, PathKind::Ours | PathKind::OursTc))
        .map(LabCgroup::path);
    let active = labkit::activate(&lab, kind, &set, sock, p)?;
    let (tcp, udp) = labkit::targets(&lab, kind, &set)?;
    let target = match kind {
        PathKind::Direct => SocketAddrV4::new(lab.pods[0].ip, labkit::SERVER_PORT),
        _ => {
            let t = set.target_tcp();
            SocketAddrV4::new(t.cluster_ip, t.port)
        }
    };
    Ok(PathLab {
        kind,
        lab,
        active,
        tcp,
        udp,
        results: BTreeMap::new(),
        error: None,
        client_pod: cgroup.map(|cgroup| ClientPod {
            target,
            _cgroup: cgroup,
        }),
    })
}

/// A lab cgroup every process later started in `pod` joins, and `pod` tuned for many short
/// connections. The same on every path, so the only difference is what is attached to it.
fn client_cgroup(pod: &mut Netns) -> anyhow::Result<LabCgroup> {
    let cg = std::panic::catch_unwind(|| LabCgroup::new("bench-client-pod")).map_err(|e| {
        anyhow!(
            "creating the client pod's cgroup: {}",
            labkit::panic_text(&e)
        )
    })?;
    pod.set_cgroup(cg.path());
    labkit::tune_client(pod)?;
    Ok(cg)
}

fn one_run(
    ns: &Netns,
    loadgen: &Path,
    mode: &Mode,
    target: SocketAddrV4,
    count: u64,
    max_s: f64,
) -> anyhow::Result<ClientResult> {
    let res = labkit::client_run(ns, loadgen, mode.arg, target, count, max_s)?;
    anyhow::ensure!(
        res.count > 0,
        "{} via {target}: no transaction completed ({} errors, last: {})",
        mode.case,
        res.errors,
        res.last_error
    );
    let others: u64 = res
        .replies_by_id
        .iter()
        .filter(|(id, _)| id.as_str() != "0")
        .map(|(_, c)| c)
        .sum();
    anyhow::ensure!(
        others == 0,
        "{}: {others} replies came from another pod",
        mode.case
    );
    Ok(res)
}

type Stats = Vec<(Reason, lb_common::Counter)>;

/// Transactions of the runs of the modes `pick` selects.
fn done(pl: &PathLab, pick: impl Fn(&Mode) -> bool) -> u64 {
    MODES
        .iter()
        .filter(|m| pick(m))
        .filter_map(|m| pl.results.get(m.case))
        .flatten()
        .map(|r| r.count)
        .sum()
}

/// Ours: the counters must show that the traffic went through our datapath. NodePort
/// transactions through XDP and TC (a packet each way at least); ClusterIP connections
/// through connect4 (one translation each, at least: warm-up connections count too). The
/// results are `(NodePort check, ClusterIP check)`, each `Ok(what was verified)`.
fn ours_checks(
    o: &labkit::Ours,
    before: &Stats,
    pl: &PathLab,
) -> (Result<String, String>, Result<String, String>) {
    let after = match o.maps.stats() {
        Ok(a) => a,
        Err(e) => {
            let e = format!("reading the datapath counters: {e}");
            return (Err(e.clone()), Err(e));
        }
    };
    let delta = |r: Reason| -> u64 {
        let pk = |s: &Stats| {
            s.iter()
                .find(|(x, _)| *x == r)
                .map_or(0, |(_, c)| c.packets)
        };
        pk(&after).saturating_sub(pk(before))
    };
    let nodeport = done(pl, |m| !m.from_pod);
    let fwd = delta(Reason::XdpFwdNewFlow) + delta(Reason::XdpFwdTracked);
    let rev = delta(Reason::TcRevNat);
    let peer = delta(Reason::TcRedirectPeer);
    let xdp = if fwd >= nodeport && rev >= nodeport {
        Ok(format!(
            "; ingress forwarded {fwd} ({peer} by bpf_redirect_peer) and TC egress reverse-NATed \
             {rev} packets for {nodeport} transactions"
        ))
    } else {
        Err(format!(
            "the datapath counted {fwd} forwarded and {rev} reverse-NATed packets for \
             {nodeport} transactions: traffic did not go through it"
        ))
    };
    let conns = done(pl, |m| m.from_pod);
    let xlate = delta(Reason::SockConnectXlate);
    let sock = if xlate >= conns {
        Ok(format!(
            "; verified: connect4 translated {xlate} connects for {conns} connections"
        ))
    } else {
        Err(format!(
            "connect4 translated {xlate} connects for {conns} connections to the ClusterIP: \
             the connections did not go through the socket hooks"
        ))
    };
    (xdp, sock)
}

fn rows_for(n: usize, pl: &PathLab, before: Option<Stats>, plan: &Plan) -> Vec<Row> {
    let label = pl.kind.label();
    let mut rows = Vec::new();
    if pl.kind != PathKind::Direct {
        rows.push(
            Row::new("e2e", "program Services", &label, n as u64)
                .metric("program_s", "s", Stat::single(pl.active.program_s))
                .param("size", &pl.active.size)
                .note("time to program the N Services (map writes, iptables-restore, nft -f)"),
        );
    }
    let checks = match (&pl.active.ours, &before) {
        (Some(o), Some(before)) => Some(ours_checks(o, before, pl)),
        (Some(_), None) => {
            let e = "the datapath counters could not be read before the runs".to_owned();
            Some((Err(e.clone()), Err(e)))
        }
        _ => None,
    };
    for mode in MODES {
        let Some((_, target)) = pl.client(&mode) else {
            continue;
        };
        let row = Row::new("e2e", mode.case, &label, n as u64)
            .param("rounds", plan.rounds)
            .param("transactions_per_run", plan.count(&mode));
        let runs = pl
            .results
            .get(mode.case)
            .map(Vec::as_slice)
            .unwrap_or_default();
        if let Some(e) = &pl.error {
            rows.push(row.failed(e));
            continue;
        }
        let check = checks
            .as_ref()
            .map(|(xdp, sock)| if mode.from_pod { sock } else { xdp });
        let verified = match check {
            Some(Err(e)) => {
                rows.push(row.failed(e));
                continue;
            }
            Some(Ok(s)) => s.as_str(),
            None => "",
        };
        let how = if mode.from_pod {
            format!(
                "client in pod {CLIENT_POD} (its own lab cgroup) -> the ClusterIP, endpoints on \
                 pod 0 of the same node (direct: pod {CLIENT_POD} -> pod 0); median over {} \
                 interleaved rounds of each round's percentile; every reply came from pod 0 \
                 (nothing listens on the ClusterIP: a reply through it proves the \
                 translation){verified}",
                runs.len()
            )
        } else {
            format!(
                "median over {} interleaved rounds of each round's percentile; every reply \
                 came from the target pod{verified}",
                runs.len()
            )
        };
        rows.push(
            labkit::with_latency(row, runs)
                .param("target", target)
                .note(how),
        );
    }
    rows
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn interleaves_by_n_and_rotates() {
        let g = interleaving(&[1, 1, 1000, 1000, 1000]);
        assert_eq!(g, vec![vec![0, 1], vec![2, 3, 4]]);
        let r: Vec<_> = rotate(&g[1], 1).copied().collect();
        assert_eq!(r, vec![3, 4, 2]);
        let r: Vec<_> = rotate(&g[1], 3).copied().collect();
        assert_eq!(r, vec![2, 3, 4]);
        assert_eq!(rotate::<u8>(&[], 2).count(), 0);
    }

    #[test]
    fn one_mode_runs_from_a_pod_to_the_clusterip() {
        let from_pod: Vec<&Mode> = MODES.iter().filter(|m| m.from_pod).collect();
        assert_eq!(from_pod.len(), 1);
        assert_eq!(from_pod[0].case, CLUSTERIP_CASE);
        assert_eq!(from_pod[0].arg, "tcp_crr");
        let mut cases: Vec<&str> = MODES.iter().map(|m| m.case).collect();
        cases.sort_unstable();
        cases.dedup();
        assert_eq!(cases.len(), MODES.len(), "case names are row keys");
        assert_ne!(CLIENT_POD, 0, "pod 0 holds the endpoints");
    }
}
