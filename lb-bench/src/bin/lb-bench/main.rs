//! `lb-bench`: the benchmarks of `lb` (what `cargo xtask bench` runs).
//!
//! * `lb-bench suite [--quick] [--only PART,…] --out DIR` runs the selected parts (all by
//!   default), each in a child process of this executable, then writes `DIR/results.json`,
//!   `DIR/report.md` (also printed) and the plots, and fails unless the report is complete
//!   (see `suite.rs`).
//! * `lb-bench report --out DIR` re-renders the report and the plots from `DIR/results.json`.
//! * `lb-bench per-packet|e2e|throughput|control-plane [--quick] --out FILE` measures one
//!   part and writes its rows as JSON (the format in `lb_bench::schema`).
//! * `lb-bench rules iptables|nftables N [end|middle]` prints the exact kube-proxy rule set
//!   the baselines load for N Services (the lab's pod 0 as the target's endpoints).
//!
//! Measuring needs root (BPF, network namespaces). Progress goes to stdout, one line per
//! step, each with the part's elapsed time.
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand, ValueEnum};
use lb_bench::schema::PARTS;

mod agent;
mod bpf_batch;
mod control_plane;
mod ct_lru;
mod e2e;
/// The agent tests' fake Kubernetes API server (one source, two users).
#[path = "../../../../lb-agent/tests/support/fake_apiserver.rs"]
mod fake_apiserver;
mod labkit;
mod per_packet;
mod remote;
mod rules;
mod services;
mod suite;
mod throughput;

#[derive(Parser, Debug)]
#[command(
    name = "lb-bench",
    about = "The benchmarks of lb: our datapath side by side with kube-proxy's iptables and \
             nftables modes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the selected parts (each in a process of its own), then write results.json,
    /// report.md and the plots into OUT and check the report.
    Suite(SuiteArgs),
    /// Re-render the report and plots from OUT/results.json (nothing is measured).
    Report(ReportArgs),
    /// Print the kube-proxy rule set the baselines load for N Services.
    Rules(RulesArgs),
    /// Only the agent measurements of the control-plane part (lb-agent run, kube source and
    /// manifests); `$LB_BENCH_AGENT` names another agent binary to measure the same way.
    Agent(PartArgs),
    /// Only the conntrack-flavour rows of the per-packet part (shared against per-CPU LRU
    /// under SYN load).
    #[command(name = "ct-lru")]
    CtLru(PartArgs),
    #[command(flatten)]
    Part(Part),
}

/// The parts, one subcommand each (named as in [`PARTS`]).
#[derive(Subcommand, Debug)]
enum Part {
    /// Part 1: per-packet cost of the BPF programs (BPF_PROG_RUN), 1 to 100k Services.
    #[command(name = "per-packet")]
    PerPacket(PartArgs),
    /// Part 2: end-to-end latency in the netns lab, per datapath.
    #[command(name = "e2e")]
    E2e(PartArgs),
    /// Part 3: small-packet UDP throughput in the netns lab, with its CPU cost.
    #[command(name = "throughput")]
    Throughput(PartArgs),
    /// Part 4: control-plane cost (programming N Services, endpoint changes, memory).
    #[command(name = "control-plane")]
    ControlPlane(PartArgs),
}

#[derive(clap::Args, Debug)]
struct SuiteArgs {
    /// Fewer sizes, runs and repeats: finishes in under 5 minutes.
    #[arg(long)]
    quick: bool,
    /// Run only these parts (repeat the flag or separate with commas).
    #[arg(long, value_delimiter = ',', value_parser = clap::builder::PossibleValuesParser::new(PARTS))]
    only: Vec<String>,
    /// Directory for report.md, results.json, the plots and raw/PART.json.
    #[arg(long)]
    out: PathBuf,
}

#[derive(clap::Args, Debug)]
struct ReportArgs {
    /// Directory holding results.json; report.md and the plots are written next to it.
    #[arg(long)]
    out: PathBuf,
}

#[derive(clap::Args, Debug)]
struct PartArgs {
    /// Fewer sizes, runs and repeats.
    #[arg(long)]
    quick: bool,
    /// Where to write the part's rows (JSON).
    #[arg(long)]
    out: PathBuf,
}

#[derive(clap::Args, Debug)]
struct RulesArgs {
    /// Which kube-proxy mode's rules.
    format: RulesFormat,
    /// How many Services.
    n: usize,
    /// Where the target Service sits in the list.
    #[arg(default_value = "end")]
    position: RulesPosition,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum RulesFormat {
    Iptables,
    Nftables,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum RulesPosition {
    End,
    Middle,
}

impl Part {
    /// The part's name, one of [`PARTS`].
    fn name(&self) -> &'static str {
        match self {
            Part::PerPacket(_) => "per-packet",
            Part::E2e(_) => "e2e",
            Part::Throughput(_) => "throughput",
            Part::ControlPlane(_) => "control-plane",
        }
    }

    fn args(&self) -> &PartArgs {
        match self {
            Part::PerPacket(a) | Part::E2e(a) | Part::Throughput(a) | Part::ControlPlane(a) => a,
        }
    }
}

/// Progress lines of a part: `[part +12.3s] message`.
pub struct Progress {
    part: String,
    start: Instant,
}

impl Progress {
    pub fn say(&self, msg: &str) {
        println!(
            "[{} +{:.1}s] {msg}",
            self.part,
            self.start.elapsed().as_secs_f64()
        );
        // Nothing useful to do if stdout is gone.
        let _ = std::io::stdout().flush();
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Suite(a) => suite::suite(a.quick, &a.only, &a.out),
        Command::Report(a) => suite::report(&a.out),
        Command::Rules(a) => print_rules(a).map(|()| ExitCode::SUCCESS),
        Command::Agent(a) => run_rows("control-plane", a, agent::run).map(|()| ExitCode::SUCCESS),
        Command::CtLru(a) => run_rows("per-packet", a, ct_lru::rows).map(|()| ExitCode::SUCCESS),
        Command::Part(part) => run_part(part).map(|()| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("lb-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `lb-bench rules iptables|nftables N [end|middle]`: prints a baseline rule set.
fn print_rules(a: &RulesArgs) -> anyhow::Result<()> {
    let pos = match a.position {
        RulesPosition::End => services::Position::End,
        RulesPosition::Middle => services::Position::Middle,
    };
    let pod = std::net::Ipv4Addr::new(10, 244, 0, 10);
    let eps: Vec<std::net::SocketAddrV4> = (0..labkit::SERVER_PORTS)
        .map(|k| std::net::SocketAddrV4::new(pod, labkit::SERVER_PORT + k))
        .collect();
    let set = services::ServiceSet::synthetic(a.n, pos, true, &eps)?;
    let text = match a.format {
        RulesFormat::Iptables => rules::iptables_restore(&set.ports, &labkit::node_config()),
        RulesFormat::Nftables => rules::nftables_script(&set.ports, &labkit::node_config()),
    };
    std::io::stdout().write_all(text.as_bytes())?;
    Ok(())
}

/// `lb-bench agent|ct-lru [--quick] --out FILE`: some rows of one part alone.
fn run_rows(
    part: &str,
    a: &PartArgs,
    rows: impl FnOnce(bool, &Progress) -> Vec<lb_bench::schema::Row>,
) -> anyhow::Result<()> {
    lb_testkit::lab::require_root();
    let p = Progress {
        part: part.to_owned(),
        start: Instant::now(),
    };
    let result = lb_bench::schema::PartResult {
        part: part.into(),
        quick: a.quick,
        rows: rows(a.quick, &p),
        elapsed_s: p.start.elapsed().as_secs_f64(),
        ..Default::default()
    };
    std::fs::write(&a.out, serde_json::to_vec_pretty(&result)?)?;
    p.say(&format!(
        "done: {} rows written to {}",
        result.rows.len(),
        a.out.display()
    ));
    Ok(())
}

/// `lb-bench PART [--quick] --out FILE`: measures one part and writes its rows.
fn run_part(part: &Part) -> anyhow::Result<()> {
    lb_testkit::lab::require_root();
    let a = part.args();
    let p = Progress {
        part: part.name().to_owned(),
        start: Instant::now(),
    };
    let mut result = match part {
        Part::PerPacket(_) => per_packet::run(a.quick, &p)?,
        Part::E2e(_) => e2e::run(a.quick, &p)?,
        Part::Throughput(_) => throughput::run(a.quick, &p)?,
        Part::ControlPlane(_) => control_plane::run(a.quick, &p)?,
    };
    result.elapsed_s = p.start.elapsed().as_secs_f64();
    let out = &a.out;
    let tmp = out.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&result)?)?;
    std::fs::rename(&tmp, out)?;
    let failed = result.rows.iter().filter(|r| r.error.is_some()).count();
    p.say(&format!(
        "done: {} rows ({failed} failed) written to {}",
        result.rows.len(),
        out.display()
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_part_is_a_subcommand() {
        for part in PARTS {
            let cli = Cli::try_parse_from(["lb-bench", part, "--quick", "--out", "x.json"])
                .unwrap_or_else(|e| panic!("{part}: {e}"));
            let Command::Part(p) = cli.command else {
                panic!("{part}: not a part: {cli:?}");
            };
            assert_eq!(p.name(), part);
            assert!(p.args().quick);
            assert_eq!(p.args().out, PathBuf::from("x.json"));
        }
    }

    #[test]
    fn parses_suite_report_and_rules() {
        let cli = Cli::try_parse_from([
            "lb-bench",
            "suite",
            "--quick",
            "--only",
            "per-packet,e2e",
            "--out",
            "/tmp/b",
        ])
        .expect("suite");
        let Command::Suite(s) = cli.command else {
            panic!("not suite: {cli:?}");
        };
        assert!(s.quick);
        assert_eq!(s.only, ["per-packet", "e2e"]);
        assert!(
            Cli::try_parse_from(["lb-bench", "suite", "--only", "nope", "--out", "d"]).is_err()
        );
        assert!(Cli::try_parse_from(["lb-bench", "report"]).is_err());
        let cli = Cli::try_parse_from(["lb-bench", "rules", "nftables", "10"]).expect("rules");
        let Command::Rules(r) = cli.command else {
            panic!("not rules: {cli:?}");
        };
        assert!(matches!(
            (r.format, r.n, r.position),
            (RulesFormat::Nftables, 10, RulesPosition::End)
        ));
        assert!(Cli::try_parse_from(["lb-bench", "rules", "iptables", "5", "middle"]).is_ok());
        assert!(Cli::try_parse_from(["lb-bench", "per-packet"]).is_err());
    }
}
