//! Part 2: end-to-end request latency in the netns lab (client -> node -> pod), per path:
//! direct (no NAT), ours (NodePort through XDP/TC), kube-proxy iptables (target Service at
//! the end and in the middle of the chains) and kube-proxy nftables, at several Service
//! counts, for TCP_RR, TCP_CRR and UDP_RR.
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
//! transaction, forward and reverse.
use std::collections::BTreeMap;
use std::net::SocketAddrV4;
use std::path::Path;

use lb_agent::dataplane::Dataplane as _;
use lb_bench::schema::{PartResult, Row, Stat};
use lb_common::Reason;
use lb_testkit::lab::Lab;

use crate::labkit::{self, Active, ClientResult, PathKind};
use crate::services::Position;
use crate::Progress;

/// Request/response modes and the `lb-loadgen` name of each.
pub const MODES: [(&str, &str); 3] = [
    ("TCP_RR", "tcp_rr"),
    ("TCP_CRR", "tcp_crr"),
    ("UDP_RR", "udp_rr"),
];

pub const PATHS: [PathKind; 5] = [
    PathKind::Direct,
    PathKind::Ours,
    PathKind::Iptables(Position::End),
    PathKind::Iptables(Position::Middle),
    PathKind::Nftables,
];

struct Plan {
    sizes: Vec<usize>,
    rounds: usize,
    /// Transactions per run: RR (TCP and UDP), CRR.
    rr: u64,
    crr: u64,
    max_s: f64,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                sizes: vec![1, 1_000],
                rounds: 5,
                rr: 2_000,
                crr: 1_000,
                max_s: 20.0,
            }
        } else {
            Plan {
                sizes: vec![1, 1_000, 10_000],
                rounds: 7,
                rr: 10_000,
                crr: 3_000,
                max_s: 60.0,
            }
        }
    }
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
             Ns and of the paths rotated each round; lb-loadgen client in the client ns, server \
             in the pod ns; 1-byte request and reply; each transaction timed with the \
             monotonic clock",
            plan.rounds
        ),
    );
    // Every (N, path) lab is built first and kept alive, so the rounds can interleave all of
    // them: a change in the machine's load then hits every N and every path alike.
    let mut labs: Vec<(usize, PathLab)> = Vec::new();
    for &n in &plan.sizes {
        for kind in PATHS {
            p.say(&format!("e2e: N={n}: setting up path {}", kind.label()));
            match setup(n, kind, &loadgen, p) {
                Ok(pl) => {
                    if let Some(o) = &pl.active.ours {
                        out.facts
                            .insert("xdp_attach_mode".into(), format!("{:?}", o.mode));
                    }
                    labs.push((n, pl));
                }
                Err(e) => {
                    p.say(&format!("  FAILED: {e:#}"));
                    for (mode, _) in MODES {
                        out.rows.push(
                            Row::new("e2e", mode, &kind.label(), n as u64)
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
        for (mode, arg) in MODES {
            let count = if arg == "tcp_crr" { plan.crr } else { plan.rr };
            for group in rotate(&order, round) {
                let mut line = Vec::new();
                let mut n_of_group = 0;
                for idx in rotate(group, round) {
                    let (n, pl) = &mut labs[*idx];
                    n_of_group = *n;
                    if pl.error.is_some() {
                        continue;
                    }
                    let target = if arg == "udp_rr" { pl.udp } else { pl.tcp };
                    match one_run(&pl.lab, &loadgen, mode, arg, target, count, plan.max_s) {
                        Ok(res) => {
                            line.push(format!("{} {:.1}", pl.kind.label(), res.p50_us));
                            pl.results.entry(mode).or_default().push(res);
                        }
                        Err(e) => {
                            p.say(&format!(
                                "  N={n} {} {mode}: FAILED: {e:#}",
                                pl.kind.label()
                            ));
                            pl.error = Some(format!("{mode}: {e:#}"));
                        }
                    }
                }
                p.say(&format!(
                    "e2e: round {}/{} {mode} N={n_of_group} p50 µs: {}",
                    round + 1,
                    plan.rounds,
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

fn setup(n: usize, kind: PathKind, loadgen: &Path, p: &Progress) -> anyhow::Result<PathLab> {
    let lab = labkit::new_lab(1, loadgen)?;
    let set = labkit::service_set(&lab, n, kind)?;
    let active = labkit::activate(&lab, kind, &set, p)?;
    let (tcp, udp) = labkit::targets(&lab, kind, &set)?;
    Ok(PathLab {
        kind,
        lab,
        active,
        tcp,
        udp,
        results: BTreeMap::new(),
        error: None,
    })
}

fn one_run(
    lab: &Lab,
    loadgen: &Path,
    mode: &str,
    arg: &str,
    target: SocketAddrV4,
    count: u64,
    max_s: f64,
) -> anyhow::Result<ClientResult> {
    let res = labkit::client_run(&lab.client, loadgen, arg, target, count, max_s)?;
    anyhow::ensure!(
        res.count > 0,
        "{mode} via {target}: no transaction completed ({} errors, last: {})",
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
        "{mode}: {others} replies came from another pod"
    );
    Ok(res)
}

type Stats = Vec<(Reason, lb_common::Counter)>;

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
    // Ours: every transaction must have gone through XDP and TC.
    let mut check = None;
    if let (Some(o), Some(before)) = (&pl.active.ours, before) {
        let done: u64 = pl.results.values().flatten().map(|r| r.count).sum();
        check = Some(
            o.maps
                .stats()
                .map_err(anyhow::Error::from)
                .and_then(|after| {
                    let delta = |r: Reason| -> u64 {
                        let pk = |s: &Stats| {
                            s.iter()
                                .find(|(x, _)| *x == r)
                                .map_or(0, |(_, c)| c.packets)
                        };
                        pk(&after).saturating_sub(pk(&before))
                    };
                    let fwd = delta(Reason::XdpFwdNewFlow) + delta(Reason::XdpFwdTracked);
                    let rev = delta(Reason::TcRevNat);
                    anyhow::ensure!(
                        fwd >= done && rev >= done,
                        "the datapath counted {fwd} forwarded and {rev} reverse-NATed packets for \
                 {done} transactions: traffic did not go through it"
                    );
                    Ok(format!(
                "; XDP forwarded {fwd} and TC reverse-NATed {rev} packets for {done} transactions"
            ))
                }),
        );
    }
    for (mode, arg) in MODES {
        let row = Row::new("e2e", mode, &label, n as u64)
            .param("rounds", plan.rounds)
            .param(
                "transactions_per_run",
                if arg == "tcp_crr" { plan.crr } else { plan.rr },
            );
        let runs = pl.results.get(mode).map(Vec::as_slice).unwrap_or_default();
        if let Some(e) = &pl.error {
            rows.push(row.failed(e));
            continue;
        }
        if let Some(Err(e)) = &check {
            rows.push(row.failed(format!("{e:#}")));
            continue;
        }
        let verified = match &check {
            Some(Ok(s)) => s.as_str(),
            _ => "",
        };
        rows.push(
            labkit::with_latency(row, runs)
                .param("target", if arg == "udp_rr" { pl.udp } else { pl.tcp })
                .note(format!(
                    "median over {} interleaved rounds of each round's percentile; every reply \
                     came from the target pod{verified}",
                    runs.len()
                )),
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
}
