//! Running commands: quietly with captured output, or streamed through a [`Progress`] while
//! also captured. Every error names the full command line (with the env vars we set).
use std::ffi::OsStr;
use std::io::{BufRead as _, BufReader, IsTerminal as _};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use crate::progress::Progress;

/// How streamed lines are shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Echo {
    /// Indented under the running step's header (`    │ line`).
    Indented,
    /// Printed as is (for output a user or a CI log parser reads directly, e.g. `cargo test`).
    Verbatim,
}

/// When a streamed command prints nothing for this long, an elapsed-time line is printed.
const TICK: Duration = Duration::from_secs(10);
/// After a streamed command exits, how long a pipe still held open by its leftovers may stay
/// quiet before we stop reading it.
const DRAIN: Duration = Duration::from_secs(2);
/// How many trailing lines of a quiet command's output are quoted in its error.
const ERROR_TAIL: usize = 30;

/// What a finished command printed.
#[derive(Debug)]
pub struct Captured {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Captured {
    /// stdout and stderr, for searching either.
    pub fn all(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// A [`Command`] that remembers how to print itself.
pub struct Cmd {
    inner: Command,
    shown_env: Vec<String>,
    shown: Vec<String>,
}

impl Cmd {
    pub fn new(program: impl AsRef<OsStr>) -> Self {
        let program = program.as_ref();
        let mut inner = Command::new(program);
        inner.current_dir(workspace_root());
        Self {
            inner,
            shown_env: Vec::new(),
            shown: vec![quote(program)],
        }
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.shown.push(quote(arg.as_ref()));
        self.inner.arg(arg);
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        for a in args {
            self = self.arg(a);
        }
        self
    }

    pub fn env(mut self, key: impl AsRef<OsStr>, val: impl AsRef<OsStr>) -> Self {
        self.shown_env.push(format!(
            "{}={}",
            key.as_ref().to_string_lossy(),
            quote(val.as_ref())
        ));
        self.inner.env(key, val);
        self
    }

    /// The command line as a shell would take it, env assignments first.
    pub fn display(&self) -> String {
        let mut parts = self.shown_env.clone();
        parts.extend(self.shown.iter().cloned());
        parts.join(" ")
    }

    /// Runs quietly; output is returned whatever the exit status. Fails only if it can't start.
    pub fn capture_unchecked(mut self) -> anyhow::Result<Captured> {
        let shown = self.display();
        let out = self
            .inner
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("could not start `{shown}`"))?;
        Ok(Captured {
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// Runs quietly; a non-zero exit is an error quoting the end of the output.
    pub fn capture(self) -> anyhow::Result<Captured> {
        let shown = self.display();
        let out = self.capture_unchecked()?;
        if !out.status.success() {
            bail!("`{shown}` failed ({}){}", out.status, tail(&out.all()));
        }
        Ok(out)
    }

    /// Runs with stdout and stderr shown line by line through `p` (and captured), with an
    /// elapsed-time line whenever it is silent for a while. Fails only if it can't start.
    ///
    /// Both streams go into one pipe, so their lines keep the order the command wrote them in;
    /// the result has them all in `stdout` (and `stderr` empty).
    pub fn stream_unchecked(self, p: &Progress, echo: Echo) -> anyhow::Result<Captured> {
        let shown = self.display();
        let (reader, writer) = std::io::pipe().context("creating a pipe")?;
        let writer2 = writer.try_clone().context("duplicating a pipe")?;
        let mut inner = self.inner;
        inner.stdin(Stdio::null()).stdout(writer).stderr(writer2);
        let spawned = inner.spawn();
        // The Command holds our copies of the pipe's write end: drop them, or we never see EOF.
        drop(inner);
        let mut child = spawned.with_context(|| format!("could not start `{shown}`"))?;

        // Children may colour their output even into a pipe (rustfmt does); keep colours for a
        // terminal, drop them for a log.
        let keep_ansi = std::io::stdout().is_terminal();
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
                        let line = line.trim_end_matches(['\n', '\r']);
                        let line = if keep_ansi {
                            line.to_owned()
                        } else {
                            strip_ansi(line)
                        };
                        if tx.send(line).is_err() {
                            break;
                        }
                    }
                }
            }
        });

        let start = Instant::now();
        let mut last_line = Instant::now();
        let mut last_tick = Instant::now();
        let mut exited: Option<(ExitStatus, Instant)> = None;
        let mut output = String::new();
        loop {
            match rx.recv_timeout(Duration::from_millis(250)) {
                Ok(line) => {
                    match echo {
                        Echo::Indented => p.line(&line),
                        Echo::Verbatim => p.raw(&line),
                    }
                    output.push_str(&line);
                    output.push('\n');
                    last_line = Instant::now();
                    last_tick = last_line;
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
                    // A process the command left running in the background (a daemon, a
                    // leaked server) may hold the pipe open: once the command itself has exited
                    // and the pipe has been quiet for a moment, stop reading.
                    if let Some((_, at)) = exited {
                        if at.elapsed() >= DRAIN && last_line.elapsed() >= DRAIN {
                            break;
                        }
                    }
                    if last_tick.elapsed() >= TICK {
                        p.tick(start.elapsed());
                        last_tick = Instant::now();
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
        Ok(Captured {
            status,
            stdout: output,
            stderr: String::new(),
        })
    }

    /// Like [`Cmd::stream_unchecked`]; a non-zero exit is an error (the output is already on
    /// screen, so it is not repeated).
    pub fn stream(self, p: &Progress, echo: Echo) -> anyhow::Result<Captured> {
        let shown = self.display();
        let out = self.stream_unchecked(p, echo)?;
        if !out.status.success() {
            bail!("`{shown}` failed ({})", out.status);
        }
        Ok(out)
    }
}

/// The last lines of `s`, indented, for an error message (empty if `s` is blank).
fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    if lines.iter().all(|l| l.trim().is_empty()) {
        return String::new();
    }
    let from = lines.len().saturating_sub(ERROR_TAIL);
    let mut out = String::from(":");
    for l in &lines[from..] {
        out.push_str("\n    ");
        out.push_str(l);
    }
    out
}

/// Removes terminal escape sequences (CSI `ESC [ … final`, charset `ESC ( B`, and other
/// two-byte `ESC x`).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('[') => {
                for c in chars.by_ref() {
                    if ('\u{40}'..='\u{7e}').contains(&c) {
                        break;
                    }
                }
            }
            Some('(' | ')') => {
                chars.next();
            }
            _ => {}
        }
    }
    out
}

/// Quotes an argument for display if a shell would need it.
fn quote(s: &OsStr) -> String {
    let s = s.to_string_lossy();
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%^".contains(c));
    if plain {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// The cargo workspace root (the parent of this crate's manifest directory).
pub fn workspace_root() -> PathBuf {
    let xtask = Path::new(env!("CARGO_MANIFEST_DIR"));
    xtask.parent().unwrap_or(xtask).to_path_buf()
}

/// Whether we run with effective uid 0 (read from /proc, no libc needed).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// `$CARGO_HOME/bin` (default `~/.cargo/bin`), where `cargo install` puts binaries.
pub fn cargo_bin_dir() -> Option<PathBuf> {
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        return Some(PathBuf::from(home).join("bin"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo").join("bin"))
}

/// The first executable file named `name` in `PATH`.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

pub fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Makes sure `PATH` has `$CARGO_HOME/bin` (freshly installed bpf-linker) and the sbin
/// directories (ip, tc, iptables, … for non-login root shells). Called once at start-up,
/// before any thread exists; children inherit it.
pub fn normalize_path() {
    let current = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&current).collect();
    if let Some(bin) = cargo_bin_dir() {
        if !dirs.contains(&bin) {
            dirs.insert(0, bin);
        }
    }
    for d in [
        "/usr/local/sbin",
        "/usr/local/bin",
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
        "/bin",
    ] {
        let d = PathBuf::from(d);
        if !dirs.contains(&d) {
            dirs.push(d);
        }
    }
    if let Ok(joined) = std::env::join_paths(dirs) {
        std::env::set_var("PATH", joined);
    }
}

/// The cargo target directory (`CARGO_TARGET_DIR`, relative to the workspace, or `target/`).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|p| {
            if p.is_relative() {
                workspace_root().join(p)
            } else {
                p
            }
        })
        .unwrap_or_else(|| workspace_root().join("target"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_quotes() {
        let c =
            Cmd::new("cargo")
                .env("LLVM_PREFIX", "/a b")
                .args(["install", "--version", "^0.13"]);
        assert_eq!(
            c.display(),
            "LLVM_PREFIX='/a b' cargo install --version ^0.13"
        );
    }

    #[test]
    fn stream_keeps_order_and_does_not_wait_for_leftovers() -> anyhow::Result<()> {
        let p = Progress::new();
        let start = Instant::now();
        let out = Cmd::new("sh")
            .args(["-c", "echo one; echo two >&2; echo three; sleep 6 & exit 3"])
            .stream_unchecked(&p, Echo::Indented)?;
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "waited for the leftover sleep"
        );
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(out.stdout, "one\ntwo\nthree\n");
        Ok(())
    }

    #[test]
    fn strips_ansi() {
        assert_eq!(strip_ansi("\u{1b}[31m-  a\u{1b}(B\u{1b}[m b"), "-  a b");
        assert_eq!(strip_ansi("plain │ text"), "plain │ text");
    }

    #[test]
    fn tail_keeps_last_lines() {
        let s: String = (0..40).map(|i| format!("l{i}\n")).collect();
        let t = tail(&s);
        assert!(t.starts_with(":\n    l10"));
        assert!(t.ends_with("l39"));
        assert_eq!(tail("  \n"), "");
    }
}
