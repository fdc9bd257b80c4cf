//! A named network namespace owned by the test ([`Netns`]), processes running inside one
//! ([`Proc`]), and bounded command execution.
//!
//! Every command here either only touches a namespace this code created (`ip netns
//! exec NAME ...`, `ip -n NAME ...`) or manages namespace names (`ip netns add/del/list`).
//! Nothing configures an interface, address or route of the root namespace.
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

/// Upper bound for one helper command (`ip`, `ethtool`, ...). They normally take
/// milliseconds; the bound only keeps a wedged command from hanging a test forever.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// How long [`Proc::terminate`] waits after SIGTERM before it sends SIGKILL.
pub const TERMINATE_GRACE: Duration = Duration::from_secs(10);

/// Where `ip netns` keeps its bind mounts.
pub const NETNS_DIR: &str = "/var/run/netns";

/// Serialises `ip netns add/del` inside this process: the first `add` on a machine sets up
/// the shared `/var/run/netns` mount, and parallel test threads racing there can stack mounts.
static NETNS_LOCK: Mutex<()> = Mutex::new(());

fn netns_lock() -> MutexGuard<'static, ()> {
    // A panic while holding the lock leaves nothing half-done that later users depend on.
    NETNS_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `cmd` to completion with stdin closed, capturing stdout and stderr; kills it and
/// returns `ErrorKind::TimedOut` if it runs longer than `timeout`.
pub fn output_with_timeout(mut cmd: Command, timeout: Duration) -> io::Result<Output> {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let out_reader = child.stdout.take().map(drain_thread);
    let err_reader = child.stderr.take().map(drain_thread);
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{shown} did not finish within {timeout:?}"),
            ));
        }
        thread::sleep(Duration::from_millis(5));
    };
    let join = |h: Option<thread::JoinHandle<Vec<u8>>>| {
        h.map(|h| h.join().unwrap_or_default()).unwrap_or_default()
    };
    Ok(Output {
        status,
        stdout: join(out_reader),
        stderr: join(err_reader),
    })
}

fn drain_thread<R: Read + Send + 'static>(mut r: R) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        buf
    })
}

/// Runs `ip args...` (in the root namespace's `ip` process; callers only pass `netns ...`
/// or `-n NAME ...`), bounded by [`COMMAND_TIMEOUT`].
pub fn ip_try(args: &[&str]) -> io::Result<Output> {
    let mut cmd = Command::new("ip");
    cmd.args(args);
    output_with_timeout(cmd, COMMAND_TIMEOUT)
}

/// [`ip_try`] that panics with the command and its stderr when it fails; returns stdout.
pub fn ip(args: &[&str]) -> String {
    let out = ip_try(args).unwrap_or_else(|e| panic!("`ip {}` could not run: {e}", args.join(" ")));
    check_output(&format!("ip {}", args.join(" ")), out)
}

fn check_output(shown: &str, out: Output) -> String {
    if !out.status.success() {
        panic!(
            "`{shown}` failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            if out.stdout.is_empty() {
                String::new()
            } else {
                format!(" (stdout: {})", String::from_utf8_lossy(&out.stdout).trim())
            }
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Names of all network namespaces `ip netns list` knows, in its order.
pub fn list_namespaces() -> Vec<String> {
    ip(&["netns", "list"])
        .lines()
        // Lines look like `NAME (id: 3)` or just `NAME`.
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// Whether a namespace called `name` exists (`/var/run/netns/NAME`).
pub fn namespace_exists(name: &str) -> bool {
    Path::new(NETNS_DIR).join(name).exists()
}

/// Deletes the namespace `name` (`ip netns del`). Processes still inside keep the kernel
/// namespace alive until they exit, but the name is gone.
pub fn delete_namespace(name: &str) -> io::Result<()> {
    let _guard = netns_lock();
    let out = ip_try(&["netns", "del", name])?;
    if out.status.success() || !namespace_exists(name) {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "ip netns del {name}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// A named network namespace created by this process. Dropping it kills whatever is still
/// running inside and deletes it.
#[derive(Debug)]
pub struct Netns {
    name: String,
    /// The cgroup every process started in this namespace joins (a lab node's cgroup, which
    /// its socket hooks act on); `None`: the caller's cgroup.
    cgroup: Option<PathBuf>,
}

impl Netns {
    /// An empty namespace of this run, `lbt-<pid>-<what>` (swept if the run dies): only
    /// its loopback, no routes. For `BPF_PROG_RUN` whose FIB lookups must fail everywhere.
    pub fn empty(what: &str) -> Netns {
        Netns::new(format!("{}{}-{what}", super::NS_PREFIX, std::process::id()))
    }

    /// Creates namespace `name` with its loopback up. Panics with `ip`'s error on failure
    /// (for instance when the name is taken).
    pub fn new(name: impl Into<String>) -> Netns {
        let name = name.into();
        Netns::create(&name).unwrap_or_else(|e| panic!("creating network namespace {name}: {e}"))
    }

    /// Creates namespace `name` with its loopback up.
    pub fn create(name: &str) -> io::Result<Netns> {
        {
            let _guard = netns_lock();
            let out = ip_try(&["netns", "add", name])?;
            if !out.status.success() {
                return Err(io::Error::other(format!(
                    "ip netns add {name}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
        }
        // From here on, dropping `ns` deletes the namespace again.
        let ns = Netns {
            name: name.to_owned(),
            cgroup: None,
        };
        let out = ip_try(&["-n", name, "link", "set", "lo", "up"])?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "ip -n {name} link set lo up: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/var/run/netns/NAME`, the handle `setns` opens.
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.name)
    }

    /// Processes started in this namespace from now on ([`Netns::spawn`], [`Netns::run`])
    /// join the cgroup v2 directory `cgroup` before they exec (a lab cgroup, never the root
    /// one). Threads of this process that [`Netns::enter`] stay in the caller's cgroup.
    pub fn set_cgroup(&mut self, cgroup: &Path) {
        self.cgroup = Some(cgroup.to_path_buf());
    }

    /// The cgroup processes started here join, if any.
    pub fn cgroup(&self) -> Option<&Path> {
        self.cgroup.as_deref()
    }

    /// `nsenter --net=<ns> args...`: joins only the network namespace. (`ip netns exec`
    /// also remounts /sys in a private mount namespace, which hides the host's bpffs: an
    /// agent started that way could not see, or leave, pins that outlive it.) With a
    /// cgroup set, a shell first moves itself into it and then execs nsenter, so the
    /// program runs in that cgroup from its first instruction.
    fn exec_command(&self, args: &[&str]) -> Command {
        let net = format!("--net={}", self.path().display());
        match &self.cgroup {
            None => {
                let mut cmd = Command::new("nsenter");
                cmd.arg(net).arg("--").args(args);
                cmd
            }
            Some(cg) => {
                let mut cmd = Command::new("sh");
                cmd.args([
                    "-c",
                    r#"echo $$ > "$1/cgroup.procs" || exit 125; net=$2; shift 2; exec nsenter "$net" -- "$@""#,
                    "lb-cgroup-exec",
                ])
                .arg(cg)
                .arg(net)
                .args(args);
                cmd
            }
        }
    }

    /// Runs `args` inside the namespace (bounded by [`COMMAND_TIMEOUT`]).
    pub fn try_run(&self, args: &[&str]) -> io::Result<Output> {
        output_with_timeout(self.exec_command(args), COMMAND_TIMEOUT)
    }

    /// Runs `args` inside the namespace and returns its stdout; panics with the command and
    /// its stderr if it cannot run, times out or exits unsuccessfully.
    pub fn run(&self, args: &[&str]) -> String {
        let shown = format!(
            "nsenter --net={} -- {}",
            self.path().display(),
            args.join(" ")
        );
        let out = self
            .try_run(args)
            .unwrap_or_else(|e| panic!("`{shown}` could not run: {e}"));
        check_output(&shown, out)
    }

    /// Runs `ip -n NAME args...` (an `ip` subcommand inside the namespace) and returns its
    /// stdout; panics on failure.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// Starts `args` as a child process inside the namespace. Its stdout and stderr are
    /// collected (see [`Proc::wait_for_log`]); stderr lines are also echoed to the test's
    /// stderr. Panics if the process cannot be started.
    pub fn spawn(&self, args: &[&str]) -> Proc {
        let label = format!("{}:{}", self.name, args.join(" "));
        let mut cmd = self.exec_command(args);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning `{label}`: {e}"));
        Proc::new(child, label)
    }

    /// Runs `f` on a fresh thread that first joins this namespace (`setns(CLONE_NEWNET)`),
    /// so sockets it opens live inside the namespace. Panics in `f` propagate.
    pub fn enter<F, R>(&self, f: F) -> R
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        let path = self.path();
        let thread_name = format!("ns-{}", self.name);
        thread::scope(|s| {
            let handle = thread::Builder::new()
                .name(thread_name)
                .spawn_scoped(s, move || {
                    if let Err(e) = setns_net(&path) {
                        panic!("setns into {}: {e}", path.display());
                    }
                    f()
                })
                .expect("spawning a thread for Netns::enter");
            match handle.join() {
                Ok(r) => r,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// PIDs of processes whose network namespace is this one (`ip netns pids`).
    pub fn pids(&self) -> Vec<i32> {
        match ip_try(&["netns", "pids", &self.name]) {
            Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect(),
            _ => Vec::new(),
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Anything still inside was started into this namespace by this run without a
        // `Proc` owning it; kill it so the kernel namespace really goes away.
        let me = std::process::id() as i32;
        for pid in self.pids() {
            if pid != me {
                // SAFETY: kill(2) has no memory-safety preconditions.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        if let Err(e) = delete_namespace(&self.name) {
            eprintln!(
                "warning: could not delete network namespace {}: {e}",
                self.name
            );
        }
    }
}

/// Moves the calling thread into the network namespace bound at `path`.
pub fn setns_net(path: &Path) -> io::Result<()> {
    let f = File::open(path)?;
    // SAFETY: `f` is an open namespace file descriptor for the duration of the call;
    // setns only affects the calling thread's network namespace.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether a process with this pid exists (zombies count as alive).
pub fn pid_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 only checks for existence and permission.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

#[derive(Default)]
struct LogState {
    lines: Vec<String>,
    /// Output streams (stdout, stderr) not yet at EOF.
    open: usize,
}

#[derive(Default)]
struct Log {
    state: Mutex<LogState>,
    changed: Condvar,
}

impl Log {
    fn lock(&self) -> MutexGuard<'_, LogState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A child process running inside a namespace. Dropping it kills (SIGKILL) and reaps it.
pub struct Proc {
    child: Child,
    label: String,
    log: Arc<Log>,
    status: Option<ExitStatus>,
}

impl std::fmt::Debug for Proc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proc")
            .field("pid", &self.child.id())
            .field("label", &self.label)
            .field("status", &self.status)
            .finish()
    }
}

impl Proc {
    fn new(mut child: Child, label: String) -> Proc {
        let log = Arc::new(Log::default());
        let streams: Vec<(Box<dyn Read + Send>, bool)> = [
            child
                .stdout
                .take()
                .map(|s| (Box::new(s) as Box<dyn Read + Send>, false)),
            child
                .stderr
                .take()
                .map(|s| (Box::new(s) as Box<dyn Read + Send>, true)),
        ]
        .into_iter()
        .flatten()
        .collect();
        log.lock().open = streams.len();
        for (stream, is_stderr) in streams {
            let log = Arc::clone(&log);
            let label = label.clone();
            // Detached: the thread ends at EOF, i.e. when the process exits.
            thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    if is_stderr {
                        eprintln!("[{label}] {line}");
                    }
                    log.lock().lines.push(line);
                    log.changed.notify_all();
                }
                log.lock().open -= 1;
                log.changed.notify_all();
            });
        }
        Proc {
            child,
            label,
            log,
            status: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `NETNS:command line`, for messages.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Everything the process printed so far (stdout and stderr lines, interleaved).
    pub fn log(&self) -> String {
        self.log.lock().lines.join("\n")
    }

    /// The exit status if the process has exited (reaping it), `None` while it runs.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Sends SIGKILL and reaps the process. No-op if it already exited.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        if self.try_wait().is_none() {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
        self.status
    }

    /// Sends SIGTERM and waits up to [`TERMINATE_GRACE`] for the process to exit, then
    /// SIGKILLs it. Returns its exit status.
    pub fn terminate(&mut self) -> Option<ExitStatus> {
        if self.try_wait().is_some() {
            return self.status;
        }
        // SAFETY: kill(2) has no memory-safety preconditions; the child is not reaped yet,
        // so its pid cannot have been reused.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + TERMINATE_GRACE;
        while Instant::now() < deadline {
            if self.try_wait().is_some() {
                return self.status;
            }
            thread::sleep(Duration::from_millis(10));
        }
        eprintln!(
            "warning: [{}] ignored SIGTERM for {TERMINATE_GRACE:?}, killing",
            self.label
        );
        self.kill()
    }

    /// Waits until a line containing `needle` has been printed. Fails with the log so far
    /// when the process closes its output (exits) first or `timeout` passes.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        let mut state = self.log.lock();
        loop {
            if state.lines.iter().any(|l| l.contains(needle)) {
                return Ok(());
            }
            let (kind, why) = if state.open == 0 {
                (io::ErrorKind::UnexpectedEof, "exited")
            } else if Instant::now() >= deadline {
                (io::ErrorKind::TimedOut, "timed out")
            } else {
                let left = deadline.saturating_duration_since(Instant::now());
                state = self
                    .log
                    .changed
                    .wait_timeout(state, left)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
                continue;
            };
            return Err(io::Error::new(
                kind,
                format!(
                    "[{}] {why} before printing {needle:?} (waited up to {timeout:?}); output:\n{}",
                    self.label,
                    state.lines.join("\n")
                ),
            ));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}
