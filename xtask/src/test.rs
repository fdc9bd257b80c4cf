//! `cargo xtask test`: set-up, formatting, lints, build and every test, in order, stopping at
//! the first failure, then a table of the steps and the `N passed, N failed` line summed over
//! every `test result:` line of `cargo test`.
//!
//! To add a step that runs after the tests (a bench smoke test, say), add it to
//! [`extra_steps`].
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};

use crate::progress::{fmt_duration, Done, Progress};
use crate::setup;
use crate::util::{self, Cmd, Echo};

/// Which packages the host-side cargo steps cover: the whole workspace but the eBPF crate,
/// which only builds for the BPF target (it is `no_std`/`no_main`; `lb-agent`'s build script
/// compiles it with aya-build, so its errors still fail the build).
const HOST_SCOPE: &[&str] = &["--workspace", "--exclude", "lb-ebpf"];

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Skip clippy on the eBPF crate (nightly, bpfel-unknown-none, -Z build-std=core; ~1 min).
    #[arg(long)]
    pub skip_lint_ebpf: bool,
    /// Passed to the test binaries after cargo test's `--`, e.g. a test-name filter or
    /// `--nocapture`: `cargo xtask test -- fixtures`.
    #[arg(last = true)]
    pub test_args: Vec<String>,
}

/// Totals over the `test result:` lines of `cargo test`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
    /// Whether any `test result:` line was seen.
    pub ran: bool,
}

type StepFn = Box<dyn FnOnce(&Progress, &mut Counts) -> anyhow::Result<Done>>;

/// One step of the pipeline.
pub struct Step {
    name: String,
    run: StepFn,
}

impl Step {
    pub fn new(
        name: impl Into<String>,
        run: impl FnOnce(&Progress, &mut Counts) -> anyhow::Result<Done> + 'static,
    ) -> Self {
        Self {
            name: name.into(),
            run: Box::new(run),
        }
    }
}

/// A `cargo …` step whose output is streamed indented under its header.
fn cargo_step(name: &str, args: Vec<String>) -> Step {
    Step::new(name, move |p, _| {
        Cmd::new("cargo").args(&args).stream(p, Echo::Indented)?;
        Ok(Done::Ran(None))
    })
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

fn steps(args: &Args) -> Vec<Step> {
    let mut v = vec![
        Step::new("setup", |p, _| {
            setup::ensure(&p.nested())?;
            Ok(Done::Ran(None))
        }),
        cargo_step(
            "cargo fmt --check",
            strings(&["fmt", "--all", "--", "--check"]),
        ),
        cargo_step(
            "cargo clippy -D warnings",
            [strings(&["clippy"]), strings(HOST_SCOPE)]
                .concat()
                .into_iter()
                .chain(strings(&["--all-targets", "--", "-D", "warnings"]))
                .collect(),
        ),
    ];
    if !args.skip_lint_ebpf {
        v.push(cargo_step(
            "cargo clippy (eBPF crate, bpfel)",
            strings(&[
                "+nightly",
                "clippy",
                "-p",
                "lb-ebpf",
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
                "--",
                "-D",
                "warnings",
            ]),
        ));
    }
    v.push(cargo_step(
        "cargo build --all-targets",
        [
            strings(&["build"]),
            strings(HOST_SCOPE),
            strings(&["--all-targets"]),
        ]
        .concat(),
    ));
    let test_args = args.test_args.clone();
    v.push(Step::new("cargo test", move |p, counts| {
        cargo_test(p, counts, &test_args)
    }));
    v.extend(extra_steps());
    v
}

/// Hook: steps run after `cargo test`, in order, with the same fail-fast and summary.
/// For example, once `cargo xtask bench` exists:
/// ```ignore
/// v.push(cargo_step(
///     "bench smoke (per-packet)",
///     strings(&["xtask", "bench", "--quick", "--only", "per-packet"]),
/// ));
/// ```
fn extra_steps() -> Vec<Step> {
    // The benchmark's smoke test: the per-packet part in quick mode must produce a complete
    // report (bench checks every row has a number and fails otherwise); never a speed limit.
    vec![cargo_step(
        "bench smoke (per-packet, quick)",
        strings(&["xtask", "bench", "--quick", "--only", "per-packet"]),
    )]
}

fn cargo_test(p: &Progress, counts: &mut Counts, test_args: &[String]) -> anyhow::Result<Done> {
    if !util::is_root() {
        bail!(
            "cargo test needs root (the privileged tests create network namespaces and load \
             XDP/TC programs); run as root, e.g. `sudo -E env PATH=\"$PATH\" cargo xtask test`"
        );
    }
    let mut cmd = Cmd::new("cargo")
        .arg("test")
        .args(HOST_SCOPE)
        .arg("--no-fail-fast");
    if !test_args.is_empty() {
        cmd = cmd.arg("--").args(test_args);
    }
    let shown = cmd.display();
    let out = cmd.stream_unchecked(p, Echo::Verbatim)?;
    for line in out.stdout.lines().chain(out.stderr.lines()) {
        if let Some(c) = parse_test_result(line) {
            counts.passed += c.passed;
            counts.failed += c.failed;
            counts.ignored += c.ignored;
            counts.ran = true;
        }
    }
    let tally = format!("{} passed, {} failed", counts.passed, counts.failed);
    if !out.status.success() {
        return Err(anyhow!("`{shown}` failed ({}): {tally}", out.status));
    }
    Ok(Done::Ran(Some(tally)))
}

/// Parses `test result: ok. 5 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; …`.
fn parse_test_result(line: &str) -> Option<Counts> {
    let rest = line.trim().strip_prefix("test result:")?;
    let mut c = Counts {
        ran: true,
        ..Counts::default()
    };
    for part in rest.split(';') {
        // The first part reads "ok. 5 passed" / "FAILED. 1 passed".
        let part = part.rsplit('.').next().unwrap_or(part);
        let mut words = part.split_whitespace();
        let (Some(n), Some(what)) = (words.next(), words.next()) else {
            continue;
        };
        let Ok(n) = n.parse::<u64>() else { continue };
        match what {
            "passed" => c.passed = n,
            "failed" => c.failed = n,
            "ignored" => c.ignored = n,
            _ => {}
        }
    }
    Some(c)
}

enum Status {
    Ok,
    Skipped,
    Failed,
    NotRun,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let p = Progress::new();
    let steps = steps(&args);
    p.section(steps.len());
    let mut counts = Counts::default();
    let mut rows: Vec<(String, Status, Option<Duration>)> = Vec::new();
    let mut failure: Option<(String, anyhow::Error)> = None;

    for step in steps {
        if failure.is_some() {
            rows.push((step.name, Status::NotRun, None));
            continue;
        }
        let start = Instant::now();
        let run = step.run;
        let res = p.step(&step.name, || run(&p, &mut counts));
        let took = Some(start.elapsed());
        match res {
            Ok(Done::Skipped(_)) => rows.push((step.name, Status::Skipped, took)),
            Ok(Done::Ran(_)) => rows.push((step.name, Status::Ok, took)),
            Err(e) => {
                p.note(&format!("    error: {e:#}"));
                rows.push((step.name.clone(), Status::Failed, took));
                failure = Some((step.name, e));
            }
        }
    }

    let width = rows.iter().map(|r| r.0.len()).max().unwrap_or(0).max(4);
    println!();
    println!("summary:");
    println!("  {:<width$}  {:<7}  time", "step", "status");
    for (name, status, took) in &rows {
        let status = match status {
            Status::Ok => "ok",
            Status::Skipped => "skipped",
            Status::Failed => "FAILED",
            Status::NotRun => "not run",
        };
        let took = took.map(fmt_duration).unwrap_or_else(|| "-".into());
        println!("  {name:<width$}  {status:<7}  {took}");
    }
    if let Some((name, e)) = &failure {
        println!();
        println!("FAILED at step `{name}`: {e:#}");
    }
    if !counts.ran {
        println!("(no `test result:` line from cargo test)");
    }
    let ignored = if counts.ignored > 0 {
        format!(", {} skipped", counts.ignored)
    } else {
        String::new()
    };
    println!(
        "{} passed, {} failed{ignored}",
        counts.passed, counts.failed
    );
    Ok(if failure.is_some() || counts.failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_result_lines() {
        let ok = parse_test_result(
            "test result: ok. 5 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s",
        );
        assert_eq!(
            ok,
            Some(Counts {
                passed: 5,
                failed: 0,
                ignored: 1,
                ran: true
            })
        );
        let bad = parse_test_result(
            "test result: FAILED. 3 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.50s",
        );
        assert_eq!(bad.map(|c| (c.passed, c.failed)), Some((3, 2)));
        assert_eq!(parse_test_result("test foo ... ok"), None);
    }
}
