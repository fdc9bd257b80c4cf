//! Step printer shared by every xtask command: `[k/N] what ... ok (skipped: why)` / `done in 12.3s`.
//!
//! A step's header is printed without a newline; if the step prints anything while it runs
//! (streamed command output, a ticker, a nested section) the header is closed first and the
//! verdict is printed again on its own line once the step ends, so the log always reads top
//! to bottom. Everything goes to stdout, which keeps the order of our lines and of the
//! children's lines intact in a CI log.
//!
//! Usage:
//! ```ignore
//! let p = Progress::new();
//! p.section(2);
//! p.step("rust-src for nightly", || Ok(Done::Skipped("already present".into())))?;
//! p.step("build", || { util::Cmd::new("cargo").arg("build").stream(&p, Echo::Indented)?; Ok(Done::Ran(None)) })?;
//! ```
use std::cell::Cell;
use std::io::Write as _;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// How a step ended when it did not fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Done {
    /// Nothing to do; the string says why (e.g. "already present").
    Skipped(String),
    /// The step did work; an optional detail is printed after the duration.
    Ran(Option<String>),
}

#[derive(Default)]
struct Shared {
    /// A step header (`[k/N] what ... `) is on screen without its newline.
    header_open: Cell<bool>,
}

/// Numbered step printer. [`Progress::nested`] gives an indented printer for a sub-section
/// (e.g. `setup` run as the first step of `test`) that shares the terminal state.
pub struct Progress {
    shared: Rc<Shared>,
    indent: String,
    k: Cell<usize>,
    total: Cell<usize>,
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

impl Progress {
    pub fn new() -> Self {
        Self {
            shared: Rc::new(Shared::default()),
            indent: String::new(),
            k: Cell::new(0),
            total: Cell::new(0),
        }
    }

    /// A printer for a sub-section, indented two more columns, with its own numbering.
    pub fn nested(&self) -> Self {
        Self {
            shared: Rc::clone(&self.shared),
            indent: format!("{}  ", self.indent),
            k: Cell::new(0),
            total: Cell::new(0),
        }
    }

    /// Starts a new numbered section of `total` steps (resets the counter).
    pub fn section(&self, total: usize) {
        self.k.set(0);
        self.total.set(total);
    }

    /// Runs one step, printing its header, its verdict and its duration.
    /// An error is printed as `FAILED after …` and returned unchanged.
    pub fn step(
        &self,
        what: &str,
        f: impl FnOnce() -> anyhow::Result<Done>,
    ) -> anyhow::Result<Done> {
        let k = self.k.get() + 1;
        self.k.set(k);
        let total = self.total.get().max(k);
        let header = format!("{}[{k}/{total}] {what} ...", self.indent);
        self.close_header();
        print!("{header}");
        flush();
        self.shared.header_open.set(true);

        let start = Instant::now();
        let result = f();
        let took = fmt_duration(start.elapsed());
        let verdict = match &result {
            Ok(Done::Skipped(why)) => format!("ok (skipped: {why})"),
            Ok(Done::Ran(None)) => format!("done in {took}"),
            Ok(Done::Ran(Some(detail))) => format!("done in {took} ({detail})"),
            Err(_) => format!("FAILED after {took}"),
        };
        if self.shared.header_open.get() {
            println!(" {verdict}");
            self.shared.header_open.set(false);
        } else {
            println!("{header} {verdict}");
        }
        flush();
        result
    }

    /// A line of a running step's output, indented under its header.
    pub fn line(&self, s: &str) {
        self.close_header();
        println!("{}    │ {s}", self.indent);
    }

    /// A line printed as is (e.g. `cargo test` output that is teed verbatim).
    pub fn raw(&self, s: &str) {
        self.close_header();
        println!("{s}");
    }

    /// A message at this printer's indentation (e.g. a final `setup: ready` line).
    pub fn note(&self, s: &str) {
        self.close_header();
        println!("{}{s}", self.indent);
        flush();
    }

    /// Called while a command is silent for a while, so the user sees it is still alive.
    pub fn tick(&self, elapsed: Duration) {
        self.line(&format!("… still running ({})", fmt_duration(elapsed)));
        flush();
    }

    fn close_header(&self) {
        if self.shared.header_open.replace(false) {
            println!();
        }
    }
}

fn flush() {
    // Nothing useful to do if stdout is gone.
    let _ = std::io::stdout().flush();
}

/// `0.4s`, `12.3s`, `2m05s`, `1h02m`.
pub fn fmt_duration(d: Duration) -> String {
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
}
