//! The Markdown report of a benchmark run, and [`check_report`], the smoke check that a
//! report was produced and that every table row holds numbers (it never judges speed).
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::schema::{PartResult, Results, Row, Stat, CLUSTERIP_CASE, CT_LRU_SECTION};

/// Why [`check_report`] rejected a report.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("reading {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing {}", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{} has no table", .0.display())]
    NoTable(PathBuf),
    #[error("{} problem(s) in {}:\n  {}", problems.len(), path.display(), problems.join("\n  "))]
    Incomplete {
        path: PathBuf,
        problems: Vec<String>,
    },
}

/// A number with as many digits as it deserves.
pub fn num(x: f64) -> String {
    if !x.is_finite() {
        return "—".into();
    }
    let a = x.abs();
    if a >= 100.0 {
        format!("{x:.0}")
    } else if a >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

/// `median (min–max)`, or the median alone for a single run.
pub fn cell(s: &Stat) -> String {
    if !s.is_valid() {
        return "—".into();
    }
    if s.runs <= 1 || s.min == s.max {
        num(s.median)
    } else {
        format!("{} ({}–{})", num(s.median), num(s.min), num(s.max))
    }
}

/// `a / b` of two paths measured in the same run: the median of the per-run ratios when both
/// have the same runs (interleaved rounds are paired), else the ratio of the medians.
pub fn ratio(a: &Stat, b: &Stat) -> Option<f64> {
    if !a.is_valid() || !b.is_valid() {
        return None;
    }
    if a.samples.len() == b.samples.len() && !a.samples.is_empty() {
        let r: Vec<f64> = a
            .samples
            .iter()
            .zip(&b.samples)
            .filter(|(_, y)| **y != 0.0)
            .map(|(x, y)| x / y)
            .collect();
        let s = Stat::of(&r);
        return s.is_valid().then_some(s.median);
    }
    (b.median != 0.0).then(|| a.median / b.median)
}

fn ratio_cell(a: Option<&Stat>, b: Option<&Stat>) -> String {
    match (a, b) {
        (Some(a), Some(b)) => ratio(a, b).map_or("—".into(), |r| format!("{r:.2}×")),
        _ => "—".into(),
    }
}

/// `1`, `1k`, `10k`, `100k`, `1M`.
pub fn count(n: u64) -> String {
    if n >= 1_000_000 && n.is_multiple_of(1_000_000) {
        format!("{}M", n / 1_000_000)
    } else if n >= 1_000 && n.is_multiple_of(1_000) {
        format!("{}k", n / 1_000)
    } else {
        n.to_string()
    }
}

/// A Markdown table.
struct Table {
    head: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(head: &[&str]) -> Table {
        Table {
            head: head.iter().map(|s| (*s).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn render(&self, out: &mut String) {
        let line = |cells: &[String]| format!("| {} |\n", cells.join(" | "));
        out.push_str(&line(&self.head));
        out.push_str(&format!("|{}\n", "---|".repeat(self.head.len())));
        for r in &self.rows {
            out.push_str(&line(r));
        }
        out.push('\n');
    }
}

/// Distinct values in order of first appearance.
fn ordered<T: PartialEq + Clone>(it: impl Iterator<Item = T>) -> Vec<T> {
    let mut v: Vec<T> = Vec::new();
    for x in it {
        if !v.contains(&x) {
            v.push(x);
        }
    }
    v
}

fn failed(r: &Row) -> Option<String> {
    r.error.as_ref().map(|_| "FAILED".to_owned())
}

fn metric_cell(r: &Row, name: &str) -> String {
    failed(r).unwrap_or_else(|| r.get(name).map_or("—".into(), cell))
}

pub fn markdown(results: &Results, plots: &[PathBuf], plot_notes: &[String]) -> String {
    let m = &results.meta;
    let mut out = String::new();
    out.push_str("# lb benchmark report\n\n");
    let _ = writeln!(out, "- date: {}", m.date);
    let _ = writeln!(
        out,
        "- code: `{}`{}",
        m.git_commit,
        if m.git_dirty {
            " (with uncommitted changes)"
        } else {
            ""
        }
    );
    let _ = writeln!(out, "- kernel: {}", m.kernel);
    let _ = writeln!(
        out,
        "- machine: {}, {} cores, {:.1} GiB",
        m.cpu_model, m.cores, m.memory_gib
    );
    let _ = writeln!(
        out,
        "- mode: {} ({})",
        if m.quick { "--quick" } else { "full" },
        m.parts.join(", ")
    );
    let _ = writeln!(
        out,
        "- load average: before `{}`, after `{}` (a busy machine makes latency and throughput noisier; compare paths within this report only)",
        m.loadavg_before, m.loadavg_after
    );
    for (k, v) in &m.tools {
        let _ = writeln!(out, "- {k}: {v}");
    }
    let _ = writeln!(out, "- duration: {:.0} s\n", m.duration_s);
    out.push_str(
        "Every comparison between two paths below is taken within this run, on the same \
         machine, with the same topology, payload and number of runs. Cells read \
         `median (min–max)` over the runs.\n\n",
    );
    for part in &results.parts {
        match part.part.as_str() {
            "per-packet" => per_packet(part, &mut out),
            "e2e" => e2e(part, &mut out),
            "throughput" => throughput(part, &mut out),
            "control-plane" => control_plane(part, &mut out),
            other => {
                let _ = writeln!(out, "## {other}\n\n(unknown part)\n");
            }
        }
    }
    let failures: Vec<&Row> = results
        .parts
        .iter()
        .flat_map(|p| &p.rows)
        .filter(|r| r.error.is_some())
        .collect();
    if !failures.is_empty() {
        out.push_str("## Failed measurements\n\n");
        for r in failures {
            let _ = writeln!(
                out,
                "- {} / {} / {} / N={}: {}",
                r.part,
                r.case,
                r.path,
                r.services,
                r.error.as_deref().unwrap_or_default()
            );
        }
        out.push('\n');
    }
    if !plots.is_empty() || !plot_notes.is_empty() {
        out.push_str("## Plots\n\n");
        for p in plots
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "png"))
        {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default();
            let _ = writeln!(out, "![{name}]({name})\n");
        }
        for n in plot_notes {
            let _ = writeln!(out, "- not drawn: {n}");
        }
        out.push('\n');
    }
    caveats(results, &mut out);
    out.push_str("## How these numbers were made\n\n");
    for part in &results.parts {
        for (k, v) in &part.facts {
            let _ = writeln!(out, "- {} / {k}: {v}", part.part);
        }
        let notes = ordered(
            part.rows
                .iter()
                .filter(|r| !r.note.is_empty())
                .map(|r| (r.case.clone(), generic_note(&r.note))),
        );
        for (case, note) in notes {
            let _ = writeln!(out, "- {} / {case}: {note}", part.part);
        }
        if part.elapsed_s > 0.0 {
            let _ = writeln!(out, "- {} took {:.0} s", part.part, part.elapsed_s);
        }
    }
    out
}

/// What a reader must know before quoting a number, for the parts present.
fn caveats(results: &Results, out: &mut String) {
    let has = |part: &str| results.parts.iter().any(|p| p.part == part);
    let mut c: Vec<&str> = Vec::new();
    if has("per-packet") {
        c.push(
            "Per-packet numbers are the BPF programs alone (`BPF_PROG_RUN`): no driver, no \
             stack, no cache misses from other traffic. The SYN row includes a fixed per-call \
             cost of the test harness; the row below it removes it using the established \
             flow measured both ways.",
        );
    }
    if has("e2e") || has("throughput") {
        c.push(
            "The lab's links are veth pairs. Driver-mode XDP on a veth switches its receive \
             side to NAPI and, for packets that lack XDP's 256-byte headroom (as locally sent \
             ones do), copies each packet into a fresh page before the program runs. A \
             physical NIC in driver mode has neither cost, and the iptables/nftables paths do \
             not pay it here. Lab latency and throughput of `ours` are therefore pessimistic \
             compared with a real NIC; the per-packet part isolates the program's own cost.",
        );
        c.push(
            "kube-proxy masquerades NodePort traffic (externalTrafficPolicy: Cluster), so its \
             pods see the node's address; ours keeps the client address for local endpoints. \
             Each path does what its implementation does.",
        );
        c.push(
            "iptables is the distribution's `iptables` (see its version above: nf_tables \
             backend unless it says legacy). With conntrack, only a connection's first packet \
             walks the rules: TCP_CRR shows the rule walk, TCP_RR and UDP_RR mostly don't.",
        );
        c.push(
            "This machine may be shared: the load average above tells how busy it was. The \
             runs are interleaved so that load changes hit every path alike; prefer the ratio \
             columns (paired per round) to absolute numbers.",
        );
    }
    if c.is_empty() {
        return;
    }
    out.push_str("## Caveats\n\n");
    for x in c {
        let _ = writeln!(out, "- {x}");
    }
    out.push('\n');
}

/// Notes with their run-specific counts removed, so equal notes collapse into one line.
fn generic_note(note: &str) -> String {
    note.split("; verified")
        .next()
        .unwrap_or(note)
        .split("; XDP forwarded")
        .next()
        .unwrap_or(note)
        .to_owned()
}

fn per_packet(part: &PartResult, out: &mut String) {
    let (lru, rest): (Vec<Row>, Vec<Row>) = part
        .rows
        .iter()
        .cloned()
        .partition(|r| r.params.get("section").map(String::as_str) == Some(CT_LRU_SECTION));
    per_packet_main(
        &PartResult {
            rows: rest,
            ..part.clone()
        },
        out,
    );
    ct_lru(&lru, out);
}

/// The conntrack LRU flavours under new-connection load: one row per flavour, one column
/// per case (in the order measured), then the share held and the 2-CPU rate.
fn ct_lru(rows: &[Row], out: &mut String) {
    let mut cases: Vec<&str> = Vec::new();
    let mut flavours: Vec<&str> = Vec::new();
    for r in rows {
        if !cases.contains(&r.case.as_str()) {
            cases.push(&r.case);
        }
        if !flavours.contains(&r.path.as_str()) {
            flavours.push(&r.path);
        }
    }
    if flavours.is_empty() {
        return;
    }
    out.push_str("### Conntrack map flavour under new-connection load\n\n");
    out.push_str(
        "Fresh handshakes, a SYN (one half-open slot) and its ACK (two `LB4_CT` inserts), one \
         packet per `BPF_PROG_RUN` call, per-call overhead included; ns per handshake: the \
         shared LRU against one LRU list per CPU. `held` is the share of the `LB4_CT` \
         capacity still holding entries after one CPU filled it past capacity; \
         `handshakes/s` is both CPUs together, per second of wall time.\n\n",
    );
    let mut header = vec!["flavour"];
    header.extend(cases.iter().copied());
    header.extend(["held", "handshakes/s (2 CPUs)"]);
    let mut t = Table::new(&header);
    for flavour in flavours {
        let mine: Vec<&Row> = rows.iter().filter(|r| r.path == flavour).collect();
        let mut cells = vec![flavour.to_owned()];
        for case in &cases {
            cells.push(
                mine.iter()
                    .find(|r| r.case == *case)
                    .map_or_else(|| "—".to_owned(), |r| metric_cell(r, "ns_per_handshake")),
            );
        }
        for metric in ["held_share", "handshakes_per_s"] {
            cells.push(
                mine.iter()
                    .find_map(|r| r.get(metric))
                    .map_or_else(|| "—".to_owned(), cell),
            );
        }
        t.row(cells);
    }
    t.render(out);
}

fn per_packet_main(part: &PartResult, out: &mut String) {
    out.push_str("## 1. Per-packet datapath cost (ns per packet)\n\n");
    out.push_str(
        "Kernel-reported time per packet (`BPF_PROG_RUN`), JIT on; each row is checked \
         against the datapath's verdict counters. Columns: Services programmed (10 \
         endpoints each); the last one also has 1M conntrack entries loaded.\n\n",
    );
    let configs = ordered(part.rows.iter().map(|r| {
        (
            r.params.get("ct_entries").cloned().unwrap_or_default(),
            r.services,
        )
    }));
    let mut configs = configs;
    configs.sort_by_key(|(ct, n)| (ct.parse::<u64>().unwrap_or(0), *n));
    let mut head = vec!["frame".to_owned(), "program".to_owned()];
    for (ct, n) in &configs {
        let ct_n: u64 = ct.parse().unwrap_or(0);
        head.push(if ct_n > 0 {
            format!("N={} + {} CT", count(*n), count(ct_n))
        } else {
            format!("N={}", count(*n))
        });
    }
    let mut t = Table {
        head,
        rows: Vec::new(),
    };
    let find = |case: &str, cfg: &(String, u64)| {
        part.rows.iter().find(|r| {
            r.case == case
                && r.services == cfg.1
                && r.params.get("ct_entries").cloned().unwrap_or_default() == cfg.0
        })
    };
    for case in ordered(
        part.rows
            .iter()
            .filter(|r| r.case != "setup")
            .map(|r| r.case.clone()),
    ) {
        let prog = part
            .rows
            .iter()
            .find(|r| r.case == case)
            .map_or(String::new(), |r| {
                r.path.replace("ours ", "").replace(['(', ')'], "")
            });
        let mut cells = vec![case.clone(), prog.clone()];
        for cfg in &configs {
            cells.push(find(&case, cfg).map_or("—".into(), |r| metric_cell(r, "ns_per_packet")));
        }
        t.row(cells);
        if part
            .rows
            .iter()
            .any(|r| r.case == case && r.get("adjusted_ns").is_some())
        {
            let mut cells = vec![
                "↳ same, minus the per-call overhead".to_owned(),
                prog.clone(),
            ];
            for cfg in &configs {
                cells.push(find(&case, cfg).map_or("—".into(), |r| metric_cell(r, "adjusted_ns")));
            }
            t.row(cells);
        }
        if part
            .rows
            .iter()
            .any(|r| r.case == case && r.get("above_floor_ns").is_some())
        {
            let mut cells = vec!["↳ above the empty-program floor".to_owned(), prog.clone()];
            for cfg in &configs {
                cells.push(
                    find(&case, cfg).map_or("—".into(), |r| metric_cell(r, "above_floor_ns")),
                );
            }
            t.row(cells);
        }
    }
    for r in part.rows.iter().filter(|r| r.case == "setup") {
        t.row(vec![
            format!("setup N={}", count(r.services)),
            "-".into(),
            "FAILED".into(),
        ]);
    }
    t.render(out);
}

fn e2e(part: &PartResult, out: &mut String) {
    out.push_str("## 2. End-to-end latency in the netns lab\n\n");
    out.push_str(
        "Client namespace -> node namespace -> pod namespace, 1-byte request and reply. \
         `direct`: client to the pod IP, routed, no NAT (the floor). `ours`: NodePort through \
         our datapath, `lb-agent run --attach xdp` (XDP ingress, TC egress; DNATed packets \
         go on through the node's stack). `ours-tc`: the same with `--attach tc` (the ingress \
         program at TC ingress hands packets for local pods straight to the pod's namespace \
         with `bpf_redirect_peer`, skipping the node's stack). `iptables-end` / `iptables-middle`: kube-proxy iptables-mode \
         rules with the target Service last / in the middle of the chains. `nftables`: \
         kube-proxy nftables-mode rules. Ratios are per-round (paired) medians. A pod's \
         process connecting to a ClusterIP has a section of its own below.\n\n",
    );
    let modes = ordered(
        part.rows
            .iter()
            .filter(|r| r.case != "program Services" && r.case != CLUSTERIP_CASE)
            .map(|r| r.case.clone()),
    );
    for mode in modes {
        let _ = writeln!(out, "### {mode} (µs)\n");
        let mut t = Table::new(&[
            "N",
            "path",
            "p50",
            "p90",
            "p99",
            "transactions/s",
            "p50 ÷ direct",
            "p50 ÷ ours",
        ]);
        let rows: Vec<&Row> = part.rows.iter().filter(|r| r.case == mode).collect();
        let by = |n: u64, path: &str| {
            rows.iter()
                .find(|r| r.services == n && r.path == path && r.error.is_none())
                .and_then(|r| r.get("p50_us"))
        };
        for r in &rows {
            let p50 = r.get("p50_us").filter(|_| r.error.is_none());
            t.row(vec![
                count(r.services),
                r.path.clone(),
                metric_cell(r, "p50_us"),
                metric_cell(r, "p90_us"),
                metric_cell(r, "p99_us"),
                metric_cell(r, "tps"),
                failed(r).unwrap_or_else(|| ratio_cell(p50, by(r.services, "direct"))),
                failed(r).unwrap_or_else(|| ratio_cell(p50, by(r.services, "ours"))),
            ]);
        }
        t.render(out);
    }
    clusterip(part, out);
    let prog: Vec<&Row> = part
        .rows
        .iter()
        .filter(|r| r.case == "program Services")
        .collect();
    if !prog.is_empty() {
        out.push_str("### Time to program the N Services on each path\n\n");
        let mut t = Table::new(&["N", "path", "what", "seconds"]);
        for r in prog {
            t.row(vec![
                count(r.services),
                r.path.clone(),
                r.params.get("size").cloned().unwrap_or_default(),
                metric_cell(r, "program_s"),
            ]);
        }
        t.render(out);
    }
}

/// The target for ours ÷ direct in [`CLUSTERIP_CASE`] (p50, paired rounds).
pub const CLUSTERIP_TARGET: f64 = 1.03;

/// `ours ÷ path` of [`CLUSTERIP_CASE`]'s p50 at `n` Services, paired per round: ours against
/// the direct path (the target), against nftables, against iptables.
pub fn clusterip_ours_over(part: &PartResult, n: u64, path: &str) -> Option<f64> {
    let p50 = |path: &str| {
        part.rows
            .iter()
            .find(|r| {
                r.case == CLUSTERIP_CASE && r.services == n && r.path == path && r.error.is_none()
            })
            .and_then(|r| r.get("p50_us"))
    };
    ratio(p50("ours")?, p50(path)?)
}

/// [`CLUSTERIP_CASE`]: a pod's process to a ClusterIP served by another pod of the node.
fn clusterip(part: &PartResult, out: &mut String) {
    let rows: Vec<&Row> = part
        .rows
        .iter()
        .filter(|r| r.case == CLUSTERIP_CASE)
        .collect();
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(out, "### {CLUSTERIP_CASE} (µs per connection)\n");
    out.push_str(
        "A client process in pod 1 opens a new connection per transaction to a ClusterIP \
         whose endpoints are pod 0's ports on the same node. `direct`: to pod 0's IP, no \
         translation (the floor). `ours`: socket-level load balancing, the connect4 hook on \
         the client's cgroup rewrites connect() to pod 0's address once per connection; no \
         packet is NATed. `nftables` / `iptables-*`: kube-proxy's rules on the node, the SYN \
         goes pod 1 -> node (PREROUTING DNAT) -> pod 0. The last column is ours' p50 divided \
         by the row's, paired per round: on the `direct` row it is the overhead of the socket \
         hooks (target: ≤ 1.03×).\n\n",
    );
    let mut t = Table::new(&[
        "N",
        "path",
        "p50",
        "p90",
        "p99",
        "connections/s",
        "p50 ÷ direct",
        "ours p50 ÷ this path",
    ]);
    let by = |n: u64, path: &str| {
        rows.iter()
            .find(|r| r.services == n && r.path == path && r.error.is_none())
            .and_then(|r| r.get("p50_us"))
    };
    for r in &rows {
        let p50 = r.get("p50_us").filter(|_| r.error.is_none());
        t.row(vec![
            count(r.services),
            r.path.clone(),
            metric_cell(r, "p50_us"),
            metric_cell(r, "p90_us"),
            metric_cell(r, "p99_us"),
            metric_cell(r, "tps"),
            failed(r).unwrap_or_else(|| ratio_cell(p50, by(r.services, "direct"))),
            failed(r).unwrap_or_else(|| ratio_cell(by(r.services, "ours"), p50)),
        ]);
    }
    t.render(out);
    for n in ordered(rows.iter().map(|r| r.services)) {
        let Some(direct) = clusterip_ours_over(part, n, "direct") else {
            continue;
        };
        let others: Vec<String> = ordered(rows.iter().map(|r| r.path.clone()))
            .into_iter()
            .filter(|p| p != "direct" && p != "ours")
            .filter_map(|p| {
                clusterip_ours_over(part, n, &p).map(|x| format!("ours ÷ {p} = {x:.2}×"))
            })
            .collect();
        let _ = writeln!(
            out,
            "- N={}: ours ÷ direct = {direct:.3}× ({} the ≤ {CLUSTERIP_TARGET:.2}× target){}",
            count(n),
            if direct <= CLUSTERIP_TARGET {
                "within"
            } else {
                "over"
            },
            others.iter().map(|o| format!("; {o}")).collect::<String>()
        );
    }
    out.push('\n');
}

fn throughput(part: &PartResult, out: &mut String) {
    out.push_str("## 3. UDP flood throughput (18-byte datagrams, counted at the pod)\n\n");
    out.push_str(
        "CPU columns are machine-wide per delivered packet (no per-namespace CPU accounting \
         exists): softirq is where the node's forwarding runs; busy is all non-idle time, \
         including the sender, the receiver and anything else running on the machine.\n\n",
    );
    let mut t = Table::new(&[
        "N",
        "path",
        "pkt/s at the pod",
        "sent pkt/s",
        "loss %",
        "softirq ns/pkt",
        "busy ns/pkt",
        "pkt/s ÷ iptables-end",
    ]);
    let base = |n: u64| {
        part.rows
            .iter()
            .find(|r| r.services == n && r.path == "iptables-end" && r.error.is_none())
            .and_then(|r| r.get("rx_pps"))
    };
    for r in &part.rows {
        t.row(vec![
            count(r.services),
            r.path.clone(),
            metric_cell(r, "rx_pps"),
            metric_cell(r, "tx_pps"),
            metric_cell(r, "loss_pct"),
            metric_cell(r, "softirq_ns_per_pkt"),
            metric_cell(r, "busy_ns_per_pkt"),
            failed(r).unwrap_or_else(|| ratio_cell(r.get("rx_pps"), base(r.services))),
        ]);
    }
    t.render(out);
}

fn control_plane(part: &PartResult, out: &mut String) {
    out.push_str("## 4. Control plane\n\n");
    let rows_of =
        |case: &str| -> Vec<&Row> { part.rows.iter().filter(|r| r.case == case).collect() };
    let methods = [
        "one syscall per entry",
        "BPF_MAP_UPDATE_BATCH",
        "manifests -> model -> sync",
    ];
    let prog: Vec<&Row> = part
        .rows
        .iter()
        .filter(|r| methods.contains(&r.case.as_str()))
        .collect();
    if !prog.is_empty() {
        out.push_str("### Programming N Services × 10 endpoints into empty maps\n\n");
        let mut t = Table::new(&[
            "N",
            "method",
            "map writes",
            "total ms",
            "ns per entry",
            "÷ one syscall per entry",
        ]);
        let single = |n: u64| {
            prog.iter()
                .find(|r| r.services == n && r.case == methods[0] && r.error.is_none())
                .and_then(|r| r.get("ns_per_entry"))
        };
        for r in &prog {
            t.row(vec![
                count(r.services),
                r.case.clone(),
                r.params.get("entries").cloned().unwrap_or_default(),
                metric_cell(r, "total_ms"),
                metric_cell(r, "ns_per_entry"),
                failed(r).unwrap_or_else(|| ratio_cell(r.get("ns_per_entry"), single(r.services))),
            ]);
        }
        t.render(out);
        let model = rows_of(methods[2]);
        if !model.is_empty() {
            out.push_str("Agent pipeline by stage (ms):\n\n");
            let mut t = Table::new(&["N", "parse YAML", "model", "sync"]);
            for r in model {
                t.row(vec![
                    count(r.services),
                    metric_cell(r, "parse_ms"),
                    metric_cell(r, "model_ms"),
                    metric_cell(r, "sync_ms"),
                ]);
            }
            t.render(out);
        }
    }
    let change = rows_of("one endpoint change (model + sync)");
    if !change.is_empty() {
        out.push_str("### One endpoint change through the model and the sync\n\n");
        let mut t = Table::new(&["N", "model ms", "sync ms", "map writes"]);
        for r in change {
            t.row(vec![
                count(r.services),
                metric_cell(r, "model_ms"),
                metric_cell(r, "sync_ms"),
                failed(r)
                    .unwrap_or_else(|| r.params.get("map_writes").cloned().unwrap_or_default()),
            ]);
        }
        t.render(out);
    }
    let switch = rows_of("backend change -> first new connection on the new pod");
    if !switch.is_empty() {
        out.push_str("### Backend change in the maps -> traffic on the new pod (lab)\n\n");
        let mut t = Table::new(&[
            "N",
            "switches",
            "write -> first new-pod connection done, µs",
            "slot write, µs",
            "one connection, µs",
            "stale connections",
        ]);
        for r in switch {
            t.row(vec![
                count(r.services),
                r.params.get("switches").cloned().unwrap_or_default(),
                metric_cell(r, "latency_us"),
                metric_cell(r, "map_write_us"),
                metric_cell(r, "connection_us"),
                failed(r).unwrap_or_else(|| {
                    r.params
                        .get("stale_connections")
                        .cloned()
                        .unwrap_or_default()
                }),
            ]);
        }
        t.render(out);
    }
    let mem = rows_of("memory");
    if !mem.is_empty() {
        out.push_str("### Memory after programming (MiB)\n\n");
        let mut t = Table::new(&[
            "N",
            "process RSS",
            "process peak RSS",
            "services map",
            "backends map",
            "conntrack map",
        ]);
        for r in mem {
            t.row(vec![
                count(r.services),
                metric_cell(r, "rss_mib"),
                metric_cell(r, "peak_rss_mib"),
                metric_cell(r, "services_map_mib"),
                metric_cell(r, "backends_map_mib"),
                metric_cell(r, "ct_map_mib"),
            ]);
        }
        t.render(out);
    }
    agent_rows(part, out);
    let known: Vec<&str> = methods
        .iter()
        .copied()
        .chain([
            "one endpoint change (model + sync)",
            "backend change -> first new connection on the new pod",
            "memory",
        ])
        .chain(AGENT_CASES)
        .collect();
    let other: Vec<&Row> = part
        .rows
        .iter()
        .filter(|r| !known.contains(&r.case.as_str()))
        .collect();
    if !other.is_empty() {
        let mut t = Table::new(&["N", "case", "result"]);
        for r in other {
            t.row(vec![
                count(r.services),
                r.case.clone(),
                failed(r).unwrap_or_else(|| "—".into()),
            ]);
        }
        t.render(out);
    }
}

/// The agent's own rows (`lb-agent run`, measured from outside).
const AGENT_CASES: [&str; 6] = [
    "agent: list complete -> maps programmed",
    "agent: one EndpointSlice change -> map written",
    "agent: sustained EndpointSlice changes",
    "agent: manifests from files -> maps programmed",
    "agent: one manifest file edit -> map written",
    "agent: peak RSS",
];

/// The agent's target rows: one line per measurement, with the target.
fn agent_rows(part: &PartResult, out: &mut String) {
    let rows: Vec<&Row> = part
        .rows
        .iter()
        .filter(|r| AGENT_CASES.contains(&r.case.as_str()))
        .collect();
    if rows.is_empty() {
        return;
    }
    let n = rows.iter().map(|r| r.services).max().unwrap_or(0);
    out.push_str(&format!(
        "### The agent (`lb-agent run`), {} Services × 10 endpoints, observed through its maps

",
        count(n)
    ));
    let mut t = Table::new(&["source", "measure", "result", "target"]);
    let ms = |r: &Row, m: &str| {
        r.get(m)
            .map_or_else(|| "—".to_string(), |v| format!("{:.1} ms", v.median))
    };
    for r in rows {
        let source = r.params.get("source").cloned().unwrap_or_default();
        let (measure, result, target) = match r.case.as_str() {
            "agent: list complete -> maps programmed" => (
                "list complete → maps fully programmed".to_string(),
                format!(
                    "{} ({} from the agent's start)",
                    ms(r, "list_to_programmed_ms"),
                    ms(r, "start_to_programmed_ms")
                ),
                "≤ 2 s",
            ),
            "agent: one EndpointSlice change -> map written" => (
                format!(
                    "one EndpointSlice change → map written ({} changes)",
                    r.params.get("changes").cloned().unwrap_or_default()
                ),
                format!("p50 {}, p99 {}", ms(r, "p50_ms"), ms(r, "p99_ms")),
                "p50 ≤ 2 ms, p99 ≤ 10 ms",
            ),
            "agent: sustained EndpointSlice changes" => (
                format!(
                    "{}/s for {} s",
                    r.params.get("rate_per_s").cloned().unwrap_or_default(),
                    r.params.get("duration_s").cloned().unwrap_or_default()
                ),
                format!(
                    "p50 {}, p99 {}, max {}; p99 first/last {} s: {} / {}; unapplied after \
                     10 s: {}",
                    ms(r, "p50_ms"),
                    ms(r, "p99_ms"),
                    ms(r, "max_ms"),
                    r.params.get("window_s").cloned().unwrap_or_default(),
                    ms(r, "first_window_p99_ms"),
                    ms(r, "last_window_p99_ms"),
                    r.params
                        .get("unapplied_after_10s")
                        .cloned()
                        .unwrap_or_default()
                ),
                "no growing backlog",
            ),
            "agent: manifests from files -> maps programmed" => (
                format!(
                    "from {} files → maps fully programmed",
                    r.params.get("files").cloned().unwrap_or_default()
                ),
                format!("{} from the agent's start", ms(r, "start_to_programmed_ms")),
                "≤ 5 s",
            ),
            "agent: one manifest file edit -> map written" => (
                format!(
                    "one file edit → map written ({} edits)",
                    r.params.get("changes").cloned().unwrap_or_default()
                ),
                format!("p50 {}, max {}", ms(r, "p50_ms"), ms(r, "max_ms")),
                "≤ 500 ms",
            ),
            _ => (
                "agent peak RSS (VmHWM)".to_string(),
                r.get("peak_rss_mib")
                    .map_or_else(|| "—".to_string(), |v| format!("{:.0} MiB", v.median)),
                "≤ 250 MB",
            ),
        };
        let result = failed(r).unwrap_or(result);
        t.row(vec![source, measure, result, target.to_string()]);
    }
    t.render(out);
}

/// Checks a report written by `lb-bench suite` (`cargo xtask bench`): it exists, has at
/// least one table, and every table row has a number in each of its value cells (no `—`, no
/// `FAILED`); and, when `results.json` sits next to it, no measurement failed and every
/// metric is a finite number. Never looks at how fast anything was.
pub fn check_report(path: &Path) -> Result<(), CheckError> {
    let read = |p: &Path| {
        std::fs::read_to_string(p).map_err(|source| CheckError::Read {
            path: p.to_path_buf(),
            source,
        })
    };
    let text = read(path)?;
    let mut tables = 0;
    let mut problems = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    let mut i = 0;
    while i < lines.len() {
        if !lines[i].starts_with('|') {
            i += 1;
            continue;
        }
        tables += 1;
        let head = lines[i];
        i += 2; // header and separator
        let mut rows = 0;
        while i < lines.len() && lines[i].starts_with('|') {
            let row = lines[i];
            rows += 1;
            let cells: Vec<&str> = row.trim_matches('|').split('|').map(str::trim).collect();
            let bad: Vec<&str> = cells
                .iter()
                .copied()
                .filter(|c| c.is_empty() || *c == "—" || c.contains("FAILED"))
                .collect();
            if !bad.is_empty() || !row.chars().any(|c| c.is_ascii_digit()) {
                problems.push(format!("row without a number: {row}"));
            }
            i += 1;
        }
        if rows == 0 {
            problems.push(format!("table without rows: {head}"));
        }
    }
    if tables == 0 {
        return Err(CheckError::NoTable(path.to_path_buf()));
    }
    if let Some(dir) = path.parent() {
        let json = dir.join("results.json");
        if json.exists() {
            let text = read(&json)?;
            let results: Results =
                serde_json::from_str(&text).map_err(|source| CheckError::Parse {
                    path: json.clone(),
                    source,
                })?;
            for r in results.parts.iter().flat_map(|p| &p.rows) {
                if let Some(e) = &r.error {
                    problems.push(format!("{} / {} / {}: failed: {e}", r.part, r.case, r.path));
                } else if r.metrics.is_empty() {
                    problems.push(format!("{} / {} / {}: no metric", r.part, r.case, r.path));
                }
                for m in &r.metrics {
                    if !m.stat.is_valid() {
                        problems.push(format!(
                            "{} / {} / {} / N={}: {} is not a number",
                            r.part, r.case, r.path, r.services, m.name
                        ));
                    }
                }
            }
        }
    }
    if !problems.is_empty() {
        return Err(CheckError::Incomplete {
            path: path.to_path_buf(),
            problems,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sysinfo::Meta;

    fn stat(v: &[f64]) -> Stat {
        Stat::of(v)
    }

    fn sample() -> Results {
        let pp = |case: &str, n: u64, ct: u64, ns: f64| {
            Row::new("per-packet", case, "ours (XDP)", n)
                .param("ct_entries", ct)
                .metric("ns_per_packet", "ns", stat(&[ns, ns + 2.0, ns - 1.0]))
        };
        let e2e = |path: &str, n: u64, p50: &[f64]| {
            Row::new("e2e", "TCP_CRR", path, n)
                .metric("p50_us", "µs", stat(p50))
                .metric("p90_us", "µs", stat(p50))
                .metric("p99_us", "µs", stat(p50))
                .metric("tps", "1/s", stat(&[1000.0, 1100.0]))
        };
        Results {
            meta: Meta {
                git_commit: "abc".into(),
                quick: true,
                parts: vec!["per-packet".into(), "e2e".into()],
                ..Meta::default()
            },
            parts: vec![
                PartResult {
                    part: "per-packet".into(),
                    rows: vec![
                        pp("no service match", 1, 0, 90.0),
                        pp("no service match", 1000, 0, 91.0),
                        pp("no service match", 1000, 1_000_000, 95.0).metric(
                            "adjusted_ns",
                            "ns",
                            Stat::single(50.0),
                        ),
                    ],
                    ..Default::default()
                },
                PartResult {
                    part: "e2e".into(),
                    rows: vec![
                        e2e("direct", 1000, &[100.0, 110.0]),
                        e2e("ours", 1000, &[100.0, 120.0]),
                        e2e("iptables-end", 1000, &[200.0, 360.0]),
                    ],
                    ..Default::default()
                },
            ],
        }
    }

    #[test]
    fn formats_numbers_and_cells() {
        assert_eq!(num(1234.4), "1234");
        assert_eq!(num(12.34), "12.3");
        assert_eq!(num(1.234), "1.23");
        assert_eq!(num(f64::NAN), "—");
        assert_eq!(cell(&stat(&[3.0, 1.0, 2.0])), "2.00 (1.00–3.00)");
        assert_eq!(cell(&stat(&[150.0])), "150");
        assert_eq!(cell(&stat(&[])), "—");
        assert_eq!(count(1), "1");
        assert_eq!(count(10_000), "10k");
        assert_eq!(count(1_000_000), "1M");
        assert_eq!(count(1_500), "1500");
    }

    #[test]
    fn ratios_are_paired_per_run() {
        // Per-run ratios 2.0 and 3.0: median 2.5, not 280/115.
        let a = stat(&[200.0, 360.0]);
        let b = stat(&[100.0, 120.0]);
        assert_eq!(ratio(&a, &b), Some(2.5));
        // Different run counts fall back to the ratio of medians.
        assert_eq!(ratio(&stat(&[300.0]), &b), Some(300.0 / 110.0));
        assert_eq!(ratio(&stat(&[]), &b), None);
    }

    #[test]
    fn ct_lru_rows_get_their_own_table_one_row_per_flavour() {
        let row = |case: &str, path: &str, ns: f64| {
            Row::new("per-packet", case, path, 1)
                .param("section", CT_LRU_SECTION)
                .metric("ns_per_handshake", "ns", stat(&[ns]))
        };
        let mut results = sample();
        for (path, held) in [("shared", 1.0), ("per-CPU", 0.5)] {
            results.parts[0].rows.extend([
                row("filling", path, 1500.0),
                row("full", path, 1900.0).metric("held_share", "ratio", stat(&[held])),
                row("2 CPUs", path, 2100.0).metric("handshakes_per_s", "1/s", stat(&[440_000.0])),
            ]);
        }
        let md = markdown(&results, &[], &[]);
        assert!(
            md.contains("| flavour | filling | full | 2 CPUs | held | handshakes/s (2 CPUs) |"),
            "{md}"
        );
        assert!(
            md.contains("| per-CPU | 1500 | 1900 | 2100 | 0.50 | 440000 |"),
            "{md}"
        );
        // Not in the main per-packet table.
        assert!(!md.contains("\n| filling"), "{md}");
    }

    #[test]
    fn clusterip_section_has_ours_over_each_path() {
        let row = |path: &str, p50: &[f64]| {
            Row::new("e2e", CLUSTERIP_CASE, path, 1)
                .metric("p50_us", "µs", stat(p50))
                .metric("p90_us", "µs", stat(p50))
                .metric("p99_us", "µs", stat(p50))
                .metric("tps", "1/s", stat(&[9000.0, 9100.0]))
        };
        let mut results = sample();
        results.parts[1].rows.extend([
            row("direct", &[100.0, 110.0]),
            row("ours", &[101.0, 112.2]),
            row("iptables-end", &[202.0, 224.4]),
            row("nftables", &[150.0, 170.0]),
        ]);
        let part = &results.parts[1];
        // Paired: 1.01 and 1.02 -> 1.015.
        let direct = clusterip_ours_over(part, 1, "direct").expect("ratio");
        assert!((direct - 1.015).abs() < 1e-9, "{direct}");
        let ipt = clusterip_ours_over(part, 1, "iptables-end").expect("ratio");
        assert!((ipt - 0.5).abs() < 1e-9, "{ipt}");
        assert_eq!(clusterip_ours_over(part, 1000, "direct"), None);
        let md = markdown(&results, &[], &[]);
        assert!(
            md.contains(&format!("### {CLUSTERIP_CASE} (µs per connection)")),
            "{md}"
        );
        // Not also among the NodePort tables.
        assert!(
            !md.contains(&format!("### {CLUSTERIP_CASE} (µs)\n")),
            "{md}"
        );
        assert!(
            md.contains("| 1 | iptables-end | 213 (202–224) | 213 (202–224) | 213 (202–224) | 9050 (9000–9100) | 2.03× | 0.50× |"),
            "{md}"
        );
        assert!(md.contains("| 1 | ours | "), "{md}");
        assert!(
            md.contains("- N=1: ours ÷ direct = 1.015× (within the ≤ 1.03× target); ours ÷ iptables-end = 0.50×; ours ÷ nftables = 0.67×"),
            "{md}"
        );
        let mut failed = results.clone();
        let last = failed.parts[1].rows.len() - 3;
        failed.parts[1].rows[last].error = Some("boom".into());
        let md = markdown(&failed, &[], &[]);
        assert!(md.contains("| 1 | ours | FAILED |"), "{md}");
        assert!(!md.contains("- N=1: ours ÷ direct"), "{md}");
    }

    #[test]
    fn markdown_has_the_tables() {
        let md = markdown(&sample(), &[PathBuf::from("/x/e2e_latency.png")], &[]);
        assert!(
            md.contains("| frame | program | N=1 | N=1k | N=1k + 1M CT |"),
            "{md}"
        );
        assert!(md.contains("| no service match | XDP | 90.0 (89.0–92.0) | 91.0 (90.0–93.0) | 95.0 (94.0–97.0) |"), "{md}");
        assert!(
            md.contains("| ↳ same, minus the per-call overhead | XDP | — | — | 50.0 |"),
            "{md}"
        );
        assert!(md.contains("| 1k | iptables-end | 280 (200–360) |"), "{md}");
        // iptables-end vs ours: paired ratios 2.0 and 3.0.
        assert!(md.contains("| 2.50× |"), "{md}");
        assert!(md.contains("![e2e_latency.png](e2e_latency.png)"), "{md}");
    }

    fn write_tmp(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "lb-bench-report-test-{}-{name}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let p = dir.join("report.md");
        std::fs::write(&p, text).expect("write");
        p
    }

    #[test]
    fn check_accepts_complete_and_rejects_gaps() {
        let good = write_tmp("good", "# r\n\n| a | b |\n|---|---|\n| x | 1.0 |\n");
        check_report(&good).expect("complete report");
        let gap = write_tmp("gap", "# r\n\n| a | b |\n|---|---|\n| x | — |\n");
        assert!(check_report(&gap).is_err());
        let failed = write_tmp("failed", "| a | b |\n|---|---|\n| x | FAILED |\n");
        assert!(check_report(&failed).is_err());
        let none = write_tmp("none", "# no tables here\n");
        assert!(check_report(&none).is_err());
        assert!(check_report(Path::new("/nonexistent/report.md")).is_err());
    }

    #[test]
    fn check_reads_results_next_to_the_report() {
        let mut results = sample();
        let p = write_tmp("json", &markdown(&results, &[], &[]));
        let dir = p.parent().expect("dir");
        // The sample has a "—" cell (adjusted_ns only at one config): the check flags it.
        assert!(check_report(&p).is_err());
        results.parts[0].rows[2].metrics.pop();
        std::fs::write(&p, markdown(&results, &[], &[])).expect("write");
        std::fs::write(
            dir.join("results.json"),
            serde_json::to_vec(&results).expect("json"),
        )
        .expect("write json");
        check_report(&p).expect("complete");
        results.parts[1].rows[0].error = Some("boom".into());
        std::fs::write(
            dir.join("results.json"),
            serde_json::to_vec(&results).expect("json"),
        )
        .expect("write json");
        assert!(check_report(&p).is_err());
    }
}
