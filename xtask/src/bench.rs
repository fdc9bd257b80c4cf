//! `cargo xtask bench`: per-packet cost, end-to-end latency, throughput and control-plane cost
//! of our datapath, side by side with kube-proxy's iptables and nftables modes.
//!
//! The measuring is done by `lb-bench` (tests/src/bin/lb-bench, a release build), one part per
//! process; this command builds it, runs the selected parts with their progress streamed,
//! then writes `target/bench/report.md` (also printed), `target/bench/results.json` and the
//! plots (`*.svg`, `*.png`), and checks the report ([`check_report`]).
//!
//! `--quick` runs fewer sizes, runs and repeats (under 5 minutes); `--only PART[,PART]` runs
//! some parts (`per-packet`, `e2e`, `throughput`, `control-plane`). `--report-only`
//! re-renders the report and plots from an existing `results.json`.
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context as _};

use crate::progress::{fmt_duration, Done, Progress};
use crate::setup;
use crate::util::{self, Cmd, Echo};

mod plot;
mod report;
#[allow(
    dead_code,
    reason = "shared with lb-bench, which uses other parts of it"
)]
mod schema;
mod sysinfo;

pub use report::check_report;
use schema::{PartResult, Row, PARTS};

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

/// Everything one `cargo xtask bench` produced: `results.json`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Results {
    pub meta: sysinfo::Meta,
    pub parts: Vec<PartResult>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| util::target_dir().join("bench"));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let p = Progress::new();
    let results = if args.report_only {
        let path = out.join("results.json");
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "reading {} (run without --report-only first)",
                path.display()
            )
        })?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?
    } else {
        measure(&args, &out, &p, started)?
    };
    render(&results, &out, &p)
}

fn selected(args: &Args) -> Vec<&'static str> {
    PARTS
        .iter()
        .copied()
        .filter(|part| args.only.is_empty() || args.only.iter().any(|o| o == part))
        .collect()
}

fn measure(args: &Args, out: &Path, p: &Progress, started: Instant) -> anyhow::Result<Results> {
    if !util::is_root() {
        bail!(
            "cargo xtask bench needs root (it loads BPF programs and creates network \
             namespaces); run it as root, e.g. `sudo -E env PATH=\"$PATH\" cargo xtask bench`"
        );
    }
    setup::ensure(p)?;
    let parts = selected(args);
    let mut meta = sysinfo::Meta::collect(args.quick, &parts);
    p.section(parts.len() + 1);
    p.step("build lb-bench, lb-loadgen (release)", || {
        Cmd::new("cargo")
            .args(["build", "--release", "-p", "tests", "--bins"])
            .stream(p, Echo::Indented)?;
        Ok(Done::Ran(None))
    })?;
    let bin = util::target_dir().join("release").join("lb-bench");
    let raw = out.join("raw");
    std::fs::create_dir_all(&raw)?;
    let mut results = Vec::new();
    for part in &parts {
        let file = raw.join(format!("{part}.json"));
        let _ = std::fs::remove_file(&file);
        let what = format!("bench {part}{}", if args.quick { " (quick)" } else { "" });
        let r = p.step(&what, || {
            let mut cmd = Cmd::new(&bin).arg(part);
            if args.quick {
                cmd = cmd.arg("--quick");
            }
            cmd.arg("--out").arg(&file).stream(p, Echo::Indented)?;
            Ok(Done::Ran(None))
        });
        let part_result = r.and_then(|_| {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let pr: PartResult = serde_json::from_str(&text)
                .with_context(|| format!("parsing {}", file.display()))?;
            Ok(pr)
        });
        results.push(part_result.unwrap_or_else(|e| PartResult {
            part: (*part).to_owned(),
            quick: args.quick,
            rows: vec![Row::new(part, "run", "-", 0).failed(format!("{e:#}"))],
            ..Default::default()
        }));
    }
    meta.finish(started.elapsed().as_secs_f64());
    Ok(Results {
        meta,
        parts: results,
    })
}

fn render(results: &Results, out: &Path, p: &Progress) -> anyhow::Result<ExitCode> {
    let json = out.join("results.json");
    std::fs::write(&json, serde_json::to_vec_pretty(results)?)
        .with_context(|| format!("writing {}", json.display()))?;
    let mut plots = Vec::new();
    let mut plot_notes = Vec::new();
    for r in plot::all(results, out) {
        match r {
            Ok(files) => plots.extend(files),
            Err(e) => plot_notes.push(format!("{e:#}")),
        }
    }
    let md = report::markdown(results, &plots, &plot_notes);
    let md_path = out.join("report.md");
    std::fs::write(&md_path, &md).with_context(|| format!("writing {}", md_path.display()))?;
    p.raw("");
    for line in md.lines() {
        p.raw(line);
    }
    p.raw("");
    for n in &plot_notes {
        p.note(&format!("warning: plot not drawn: {n}"));
    }
    p.note(&format!(
        "bench: report {}, results {}, {} plot file(s) in {} ({} total)",
        md_path.display(),
        json.display(),
        plots.len(),
        out.display(),
        fmt_duration(std::time::Duration::from_secs_f64(
            results.meta.duration_s.max(0.0)
        ))
    ));
    match check_report(&md_path) {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            p.note(&format!("bench: the report is incomplete: {e:#}"));
            Ok(ExitCode::FAILURE)
        }
    }
}
