//! What a benchmark result needs to be read later: the machine (kernel, CPU, cores, memory),
//! the code (git commit, dirty or not), the tools, when, how long and how busy the machine
//! was.
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// The work tree lb-bench was built from, whose commit a run records.
const SOURCE_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

/// The run's metadata, `meta` in `results.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Meta {
    /// UTC, RFC 3339.
    pub date: String,
    pub kernel: String,
    pub cpu_model: String,
    /// CPUs this process may run on.
    pub cores: usize,
    pub memory_gib: f64,
    pub git_commit: String,
    /// Uncommitted changes in the work tree when the benchmark ran.
    pub git_dirty: bool,
    pub quick: bool,
    pub parts: Vec<String>,
    /// `/proc/loadavg` before and after: a busy machine makes every number noisier.
    pub loadavg_before: String,
    pub loadavg_after: String,
    pub duration_s: f64,
    /// Tool versions (rustc, iptables, nft).
    pub tools: BTreeMap<String, String>,
}

impl Meta {
    pub fn collect(quick: bool, parts: &[&str]) -> Meta {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let cpu_model = read("/proc/cpuinfo")
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_owned())
            .unwrap_or_else(|| "unknown".into());
        let memory_gib = read("/proc/meminfo")
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / (1024.0 * 1024.0));
        let git = |args: &[&str]| {
            let mut all = vec!["-C", SOURCE_DIR];
            all.extend_from_slice(args);
            output("git", &all).ok()
        };
        let mut tools = BTreeMap::new();
        for (name, program) in [("rustc", "rustc"), ("iptables", "iptables"), ("nft", "nft")] {
            let v = output(program, &["--version"]).unwrap_or_else(|e| format!("unavailable: {e}"));
            tools.insert(name.to_owned(), v);
        }
        Meta {
            date: rfc3339(SystemTime::now()),
            kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
            cpu_model,
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            memory_gib,
            git_commit: git(&["rev-parse", "HEAD"]).unwrap_or_else(|| "unknown".into()),
            git_dirty: git(&["status", "--porcelain"]).is_some_and(|s| !s.is_empty()),
            quick,
            parts: parts.iter().map(|s| (*s).to_owned()).collect(),
            loadavg_before: read("/proc/loadavg").trim().to_owned(),
            loadavg_after: String::new(),
            duration_s: 0.0,
            tools,
        }
    }

    /// Records the end of the run.
    pub fn finish(&mut self, duration_s: f64) {
        self.loadavg_after = std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
            .to_owned();
        self.duration_s = duration_s;
    }
}

/// The trimmed stdout of `program args…`, or why there is none (it could not start, or it
/// failed: then with the last line it printed).
fn output(program: &str, args: &[&str]) -> Result<String, String> {
    let shown = format!("{program} {}", args.join(" "));
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(Stdio::null());
    // From the work tree, as its rust-toolchain file decides which rustc answers.
    if Path::new(SOURCE_DIR).is_dir() {
        cmd.current_dir(SOURCE_DIR);
    }
    let out = cmd
        .output()
        .map_err(|e| format!("could not start `{shown}`: {e}"))?;
    if !out.status.success() {
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let last = all
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        return Err(format!(
            "`{shown}` failed ({}): {}",
            out.status,
            last.trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// `2026-11-23T12:34:56Z` (no date crate needed).
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn formats_dates() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_795_437_296);
        assert_eq!(rfc3339(t), "2026-11-23T12:34:56Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00Z");
    }
}
