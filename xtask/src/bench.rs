//! `cargo xtask bench`: per-packet cost, end-to-end latency, throughput and control-plane cost
//! of our datapath, side by side with kube-proxy's iptables and nftables modes.
//!
//! The benchmark is the `lb-bench` crate; this command only orchestrates it: it checks for
//! root, runs the set-up, builds `lb-bench` (and `lb-agent`, whose binary the control-plane
//! part runs, and `lb-loadgen`, `lb-podserver` from `lb-testkit`) in release, then runs `lb-bench suite` with its progress streamed. That
//! runs each selected part in a process of its own, writes `target/bench/report.md` (also
//! printed), `target/bench/results.json` and the plots (`*.svg`, `*.png`), and fails unless
//! the report is complete (`lb_bench::report::check_report`).
//!
//! `--quick` runs fewer sizes, runs and repeats (under 5 minutes); `--only PART[,PART]` runs
//! some parts (`per-packet`, `e2e`, `throughput`, `control-plane`). `--report-only`
//! re-renders the report and plots from an existing `results.json` (`lb-bench report`).
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context as _};

use crate::progress::{Done, Progress};
use crate::setup;
use crate::util::{self, Cmd, Echo};

/// The benchmark parts, in run order. Must equal `lb_bench::schema::PARTS` (xtask does not
/// link lb-bench, which pulls in plotters and the agent; a test compares the two).
const PARTS: [&str; 4] = ["per-packet", "e2e", "throughput", "control-plane"];

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Fewer sizes, runs and repeats: finishes in under 5 minutes.
    #[arg(long)]
    pub quick: bool,
    /// Run only these parts (repeat the flag or separate with commas).
    #[arg(long, value_delimiter = ',', value_parser = clap::builder::PossibleValuesParser::new(PARTS))]
    pub only: Vec<String>,
    /// Directory for report.md, results.json and the plots [default: <workspace>/target/bench].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Do not measure: re-render the report and plots from OUT/results.json.
    #[arg(long)]
    pub report_only: bool,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let out = match &args.out {
        // lb-bench runs in the workspace root: a relative path is the caller's.
        Some(o) => std::path::absolute(o).with_context(|| format!("resolving {}", o.display()))?,
        None => util::target_dir().join("bench"),
    };
    let bin = util::target_dir().join("release").join("lb-bench");
    let p = Progress::new();
    if args.report_only {
        let json = out.join("results.json");
        if !json.is_file() {
            bail!(
                "reading {} (run without --report-only first): no such file",
                json.display()
            );
        }
        p.section(2);
        build(
            &p,
            "build lb-bench (release)",
            &["-p", "lb-bench", "--bin", "lb-bench"],
        )?;
        let cmd = Cmd::new(&bin).arg("report").arg("--out").arg(&out);
        lb_bench(&p, "lb-bench report", cmd)?;
        return Ok(ExitCode::SUCCESS);
    }

    if !util::is_root() {
        bail!(
            "cargo xtask bench needs root (it loads BPF programs and creates network \
             namespaces); run it as root, e.g. `sudo -E env PATH=\"$PATH\" cargo xtask bench`"
        );
    }
    setup::ensure(&p)?;
    p.section(2);
    build(
        &p,
        "build lb-bench, lb-agent, lb-loadgen, lb-podserver (release)",
        &[
            "-p",
            "lb-bench",
            "-p",
            "lb-agent",
            "-p",
            "lb-testkit",
            "--bins",
        ],
    )?;
    // Ctrl-C reaches lb-bench too (same process group); it stops after the running part,
    // and we wait for it instead of dying first.
    ctrlc::set_handler(|| {}).context("installing the Ctrl-C handler")?;
    let mut cmd = Cmd::new(&bin).arg("suite");
    let mut what = "lb-bench suite".to_owned();
    if args.quick {
        cmd = cmd.arg("--quick");
        what.push_str(" --quick");
    }
    if !args.only.is_empty() {
        let only = args.only.join(",");
        cmd = cmd.arg("--only").arg(&only);
        what.push_str(&format!(" --only {only}"));
    }
    cmd = cmd.arg("--out").arg(&out);
    lb_bench(&p, &what, cmd)?;
    Ok(ExitCode::SUCCESS)
}

/// `cargo build --release ARGS` as a step.
fn build(p: &Progress, what: &str, args: &[&str]) -> anyhow::Result<Done> {
    p.step(what, || {
        Cmd::new("cargo")
            .args(["build", "--release"])
            .args(args)
            .stream(p, Echo::Indented)?;
        Ok(Done::Ran(None))
    })
}

/// Runs `cmd` (the release `lb-bench`) as a step, its output indented under it; its failure
/// (a failed part, an incomplete report) is ours.
fn lb_bench(p: &Progress, what: &str, cmd: Cmd) -> anyhow::Result<Done> {
    p.step(what, || {
        cmd.stream(p, Echo::Indented)?;
        Ok(Done::Ran(None))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`PARTS`] is a copy of lb-bench's: compare with the source it was copied from.
    #[test]
    fn parts_match_lb_bench() -> anyhow::Result<()> {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../lb-bench/src/schema.rs");
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
        let line = text
            .lines()
            .find(|l| l.starts_with("pub const PARTS"))
            .with_context(|| format!("no `pub const PARTS` in {path}"))?;
        let theirs: Vec<&str> = line.split('"').skip(1).step_by(2).collect();
        assert_eq!(theirs, PARTS, "{line}");
        Ok(())
    }

    #[test]
    fn only_accepts_parts() {
        use clap::Parser as _;
        #[derive(clap::Parser, Debug)]
        struct Cli {
            #[command(flatten)]
            bench: Args,
        }
        let cli = Cli::try_parse_from(["bench", "--quick", "--only", "per-packet,e2e"])
            .expect("valid flags");
        assert_eq!(cli.bench.only, ["per-packet", "e2e"]);
        assert!(Cli::try_parse_from(["bench", "--only", "nope"]).is_err());
        assert!(Cli::try_parse_from(["bench", "--report-only", "--out", "x"]).is_ok());
    }
}
