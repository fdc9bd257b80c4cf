//! `lb-bench suite` and `lb-bench report`: runs the selected parts, each as a child process
//! of this executable (`lb-bench PART [--quick] --out DIR/raw/PART.json`, so a part that
//! fails or crashes becomes a failed row instead of losing the run), records the run's
//! metadata, writes `results.json`, `report.md` (also printed) and the plots, and checks the
//! report ([`report::check_report`]).
//!
//! Progress: `[k/N] bench PART ...`, the part's own lines indented below it, then
//! `[k/N] bench PART done in 1m05s` (or `FAILED after …`).
use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use lb_bench::schema::{PartResult, Results, Row, PARTS};
use lb_bench::{plot, report, sysinfo};

/// When a part prints nothing for this long, an elapsed-time line is printed.
const TICK: Duration = Duration::from_secs(10);
/// After a part exits, how long a pipe still held open by its leftovers may stay quiet
/// before we stop reading it.
const DRAIN: Duration = Duration::from_secs(2);

/// The parts to run, in run order: `only` (all if empty).
fn selected(only: &[String]) -> Vec<&'static str> {
    PARTS
        .iter()
        .copied()
        .filter(|part| only.is_empty() || only.iter().any(|o| o == part))
        .collect()
}

/// `lb-bench suite`: measures, writes everything into `out`; fails if the report is not
/// complete.
pub fn suite(quick: bool, only: &[String], out: &Path) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "the benchmark needs root (it loads BPF programs and creates network namespaces); \
             run it as root, or through `sudo -E env PATH=\"$PATH\" cargo xtask bench`"
        );
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    // Ctrl-C reaches the running part too (same process group): it dies, and we stop after
    // it instead of dying first.
    let interrupted = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&interrupted);
    ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst))
        .context("installing the Ctrl-C handler")?;

    let parts = selected(only);
    let mut meta = sysinfo::Meta::collect(quick, &parts);
    let exe = std::env::current_exe().context("locating lb-bench")?;
    let results = measure(&exe, &parts, quick, out, &interrupted)?;
    meta.finish(started.elapsed().as_secs_f64());
    render(
        &Results {
            meta,
            parts: results,
        },
        out,
    )
}

/// Runs `exe PART [--quick] --out out/raw/PART.json` for each part and reads what it wrote;
/// a part that fails gives a failed row. Stops (an error) once `interrupted` is set.
fn measure(
    exe: &Path,
    parts: &[&str],
    quick: bool,
    out: &Path,
    interrupted: &AtomicBool,
) -> anyhow::Result<Vec<PartResult>> {
    let raw = out.join("raw");
    std::fs::create_dir_all(&raw).with_context(|| format!("creating {}", raw.display()))?;
    let steps = Steps::new(parts.len());
    let mut results = Vec::new();
    for part in parts {
        let file = raw.join(format!("{part}.json"));
        // A file left by an earlier run must not pass for this run's result.
        let _ = std::fs::remove_file(&file);
        let what = format!("bench {part}{}", if quick { " (quick)" } else { "" });
        let r = steps.step(&what, || {
            let mut cmd = Command::new(exe);
            cmd.arg(part);
            if quick {
                cmd.arg("--quick");
            }
            cmd.arg("--out").arg(&file);
            stream(cmd, &format!("lb-bench {part}"))
        });
        if interrupted.load(Ordering::SeqCst) {
            bail!("interrupted during {part}: nothing written");
        }
        let part_result = r.and_then(|()| read_part(&file));
        results.push(part_result.unwrap_or_else(|e| PartResult {
            part: (*part).to_owned(),
            quick,
            rows: vec![Row::new(part, "run", "-", 0).failed(format!("{e:#}"))],
            ..Default::default()
        }));
    }
    Ok(results)
}

/// `lb-bench report`: re-renders from `out/results.json`.
pub fn report(out: &Path) -> anyhow::Result<ExitCode> {
    let path = out.join("results.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading {} (run `lb-bench suite` first)", path.display()))?;
    let results: Results =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    render(&results, out)
}

fn read_part(file: &Path) -> anyhow::Result<PartResult> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", file.display()))
}

/// Writes `results.json`, the plots and `report.md` into `out`, prints the report, and
/// checks it: failure if it is incomplete.
fn render(results: &Results, out: &Path) -> anyhow::Result<ExitCode> {
    let json = out.join("results.json");
    std::fs::write(&json, serde_json::to_vec_pretty(results)?)
        .with_context(|| format!("writing {}", json.display()))?;
    let mut plots: Vec<PathBuf> = Vec::new();
    let mut plot_notes = Vec::new();
    for r in plot::all(results, out) {
        match r {
            Ok(files) => plots.extend(files),
            Err(e) => plot_notes.push(e.to_string()),
        }
    }
    let md = report::markdown(results, &plots, &plot_notes);
    let md_path = out.join("report.md");
    std::fs::write(&md_path, &md).with_context(|| format!("writing {}", md_path.display()))?;
    say("");
    for line in md.lines() {
        say(line);
    }
    say("");
    for n in &plot_notes {
        say(&format!("warning: plot not drawn: {n}"));
    }
    say(&format!(
        "bench: report {}, results {}, {} plot file(s) in {} ({} total)",
        md_path.display(),
        json.display(),
        plots.len(),
        out.display(),
        fmt_duration(Duration::from_secs_f64(results.meta.duration_s.max(0.0)))
    ));
    match report::check_report(&md_path) {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            say(&format!(
                "bench: the report is incomplete: {:#}",
                anyhow::Error::new(e)
            ));
            Ok(ExitCode::FAILURE)
        }
    }
}

/// A line on stdout, flushed (the parent may be reading a pipe).
fn say(s: &str) {
    println!("{s}");
    // Nothing useful to do if stdout is gone.
    let _ = std::io::stdout().flush();
}

/// Numbered steps: `[k/N] what ...` when one starts, `[k/N] what done in 12.3s` (or
/// `FAILED after 3.0s: why`) when it ends.
struct Steps {
    k: std::cell::Cell<usize>,
    total: usize,
}

impl Steps {
    fn new(total: usize) -> Self {
        Self {
            k: std::cell::Cell::new(0),
            total,
        }
    }

    fn step(&self, what: &str, f: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<()> {
        let k = self.k.get() + 1;
        self.k.set(k);
        let head = format!("[{k}/{}] {what}", self.total.max(k));
        say(&format!("{head} ..."));
        let start = Instant::now();
        let r = f();
        let took = fmt_duration(start.elapsed());
        match &r {
            Ok(()) => say(&format!("{head} done in {took}")),
            Err(e) => say(&format!("{head} FAILED after {took}: {e:#}")),
        }
        r
    }
}

/// Runs `cmd` with its stdout and stderr (one pipe, so their lines keep their order)
/// printed line by line, indented, and an elapsed-time line whenever it is silent for a
/// while. A non-zero exit is an error (its output is already on screen).
fn stream(mut cmd: Command, shown: &str) -> anyhow::Result<()> {
    let (reader, writer) = std::io::pipe().context("creating a pipe")?;
    let writer2 = writer.try_clone().context("duplicating a pipe")?;
    cmd.stdin(Stdio::null()).stdout(writer).stderr(writer2);
    let spawned = cmd.spawn();
    // The Command holds our copies of the pipe's write end: drop them, or we never see EOF.
    drop(cmd);
    let mut child = spawned.with_context(|| format!("could not start `{shown}`"))?;

    let (tx, rx) = mpsc::channel::<String>();
    thread::spawn(move || {
        let mut r = BufReader::new(reader);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf);
                    if tx
                        .send(line.trim_end_matches(['\n', '\r']).to_owned())
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
    });

    let start = Instant::now();
    let mut last_line = Instant::now();
    let mut exited: Option<(ExitStatus, Instant)> = None;
    loop {
        match rx.recv_timeout(Duration::from_millis(250)) {
            Ok(line) => {
                say(&format!("    {line}"));
                last_line = Instant::now();
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if exited.is_none() {
                    if let Some(status) = child
                        .try_wait()
                        .with_context(|| format!("waiting for `{shown}`"))?
                    {
                        exited = Some((status, Instant::now()));
                    }
                }
                // A process the part left running (a leaked server) may hold the pipe open:
                // once the part itself has exited and the pipe has been quiet for a moment,
                // stop reading.
                if let Some((_, at)) = exited {
                    if at.elapsed() >= DRAIN && last_line.elapsed() >= DRAIN {
                        break;
                    }
                }
                if last_line.elapsed() >= TICK {
                    say(&format!(
                        "    … still running ({})",
                        fmt_duration(start.elapsed())
                    ));
                    last_line = Instant::now();
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let status = match exited {
        Some((status, _)) => status,
        None => child
            .wait()
            .with_context(|| format!("waiting for `{shown}`"))?,
    };
    if !status.success() {
        bail!("`{shown}` failed ({status})");
    }
    Ok(())
}

/// `0.4s`, `12.3s`, `2m05s`, `1h02m`.
fn fmt_duration(d: Duration) -> String {
    let secs = d.as_secs_f64();
    if secs < 60.0 {
        format!("{secs:.1}s")
    } else if secs < 3600.0 {
        let s = d.as_secs();
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        let s = d.as_secs();
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(fmt_duration(Duration::from_millis(400)), "0.4s");
        assert_eq!(fmt_duration(Duration::from_millis(12_340)), "12.3s");
        assert_eq!(fmt_duration(Duration::from_secs(125)), "2m05s");
        assert_eq!(fmt_duration(Duration::from_secs(3720)), "1h02m");
    }

    #[test]
    fn selects_parts_in_run_order() {
        assert_eq!(selected(&[]), PARTS);
        let only = ["control-plane".to_owned(), "per-packet".to_owned()];
        assert_eq!(selected(&only), ["per-packet", "control-plane"]);
    }

    #[test]
    fn streams_and_reports_the_exit_status() {
        let mut ok = Command::new("sh");
        ok.args(["-c", "echo one; echo two >&2; sleep 6 & exit 0"]);
        let start = Instant::now();
        stream(ok, "sh ok").expect("exit 0 is success");
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "waited for the leftover sleep"
        );
        let mut bad = Command::new("sh");
        bad.args(["-c", "exit 3"]);
        let e = stream(bad, "sh bad").expect_err("exit 3 is a failure");
        assert!(e.to_string().contains("`sh bad` failed"), "{e:#}");
    }

    #[test]
    fn a_failing_part_is_a_failed_row() -> anyhow::Result<()> {
        use std::os::unix::fs::PermissionsExt as _;
        let dir =
            std::env::temp_dir().join(format!("lb-bench-measure-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        // Stands in for lb-bench: e2e fails, the others write an empty part.
        let exe = dir.join("fake-lb-bench");
        std::fs::write(
            &exe,
            "#!/bin/sh\npart=$1; shift\n\
             while [ $# -gt 0 ]; do [ \"$1\" = --out ] && out=$2; shift; done\n\
             echo \"[$part +0.0s] measuring\"\n\
             [ \"$part\" = e2e ] && { echo boom >&2; exit 1; }\n\
             printf '{\"part\":\"%s\",\"quick\":true,\"rows\":[],\"facts\":{},\"elapsed_s\":0.5}' \
             \"$part\" > \"$out\"\n",
        )?;
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755))?;
        let stop = AtomicBool::new(false);
        let parts = measure(
            &exe,
            &["per-packet", "e2e", "throughput"],
            true,
            &dir,
            &stop,
        )?;
        let names: Vec<&str> = parts.iter().map(|p| p.part.as_str()).collect();
        assert_eq!(names, ["per-packet", "e2e", "throughput"]);
        assert!(parts[0].rows.is_empty() && parts[0].elapsed_s == 0.5);
        let failed = &parts[1].rows[0];
        assert!(
            failed
                .error
                .as_deref()
                .is_some_and(|e| e.contains("lb-bench e2e")),
            "{failed:?}"
        );
        assert!(dir.join("raw/throughput.json").is_file());
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn report_renders_and_checks_results_json() -> anyhow::Result<()> {
        let dir = std::env::temp_dir().join(format!("lb-bench-suite-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        assert!(report(&dir).is_err(), "no results.json yet");
        let results = Results {
            meta: sysinfo::Meta::default(),
            parts: vec![PartResult {
                part: "control-plane".into(),
                rows: vec![Row::new("control-plane", "memory", "ours", 1000).metric(
                    "rss_mib",
                    "MiB",
                    lb_bench::schema::Stat::single(12.0),
                )],
                ..Default::default()
            }],
        };
        std::fs::write(dir.join("results.json"), serde_json::to_vec(&results)?)?;
        let _ = report(&dir)?;
        assert!(dir.join("report.md").is_file());
        let failed = Results {
            parts: vec![PartResult {
                part: "e2e".into(),
                rows: vec![Row::new("e2e", "run", "-", 0).failed("boom")],
                ..Default::default()
            }],
            ..results
        };
        std::fs::write(dir.join("results.json"), serde_json::to_vec(&failed)?)?;
        assert_eq!(report(&dir)?, ExitCode::FAILURE);
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
