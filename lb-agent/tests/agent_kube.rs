//! End to end: the real `lb-agent run` binary, attached to `lo` of a network namespace this
//! test creates, watching the in-process fake API server (serving inside that namespace)
//! through `--kubeconfig`, observed through `lb-agent status -o json`.
//!
//! Needs root (network namespaces, bpffs, XDP). Nothing touches the root namespace's
//! interfaces: the agent, its `status` queries and the fake API server's socket all live in
//! the test's namespace; the pins live under `/sys/fs/bpf/lbt-<pid>-<n>-kube`. The namespace,
//! the pins and the temporary directory are removed on drop, also when the test fails.
mod support;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Pod, Service};
use serde_json::Value;
use support::fake_apiserver::{FakeApiServer, Kind, KindStats};
use support::objects::{node, pod, service, slice};

const AGENT: &str = env!("CARGO_BIN_EXE_lb-agent");
const NODE: &str = "node-a";
/// Upper bound for every wait on the agent or the server.
const WAIT: Duration = Duration::from_secs(15);
/// Upper bound for one helper command (`ip`, `lb-agent status`).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the agent has to exit after SIGTERM before it is killed.
const TERM_GRACE: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(100);

// ---------------------------------------------------------------------------------------
// Bounded commands

/// Runs `cmd` with stdin closed and stdout/stderr captured; kills it if it runs longer than
/// `timeout`.
fn output_with_timeout(mut cmd: Command, timeout: Duration) -> io::Result<Output> {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let drain = |r: Option<Box<dyn Read + Send>>| {
        thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    );
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
    Ok(Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// `ip args...` (only ever `netns add/del` or `-n OURS ...`); returns the output or an error
/// with `ip`'s stderr.
fn ip(args: &[&str]) -> Result<String, String> {
    let mut cmd = Command::new("ip");
    cmd.args(args);
    let shown = format!("ip {}", args.join(" "));
    match output_with_timeout(cmd, COMMAND_TIMEOUT) {
        Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout).into_owned()),
        Ok(o) => Err(format!(
            "`{shown}` failed ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Err(format!("`{shown}` could not run: {e}")),
    }
}

// ---------------------------------------------------------------------------------------
// Guards: each removes what it created when dropped

/// A network namespace created by this test, with `lo` up; deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn create(name: &str) -> Netns {
        if Path::new("/var/run/netns").join(name).exists() {
            // Left over by an earlier run that had this pid and was killed: ours to reuse.
            let _ = ip(&["netns", "del", name]);
        }
        ip(&["netns", "add", name]).unwrap_or_else(|e| panic!("creating the namespace: {e}"));
        let ns = Netns {
            name: name.to_string(),
        };
        ip(&["-n", name, "link", "set", "lo", "up"]).unwrap_or_else(|e| panic!("{e}"));
        ns
    }

    fn path(&self) -> PathBuf {
        Path::new("/var/run/netns").join(&self.name)
    }

    /// `nsenter --net=<ns> -- args...`: only the network namespace changes, so the bpffs
    /// mount stays visible (`ip netns exec` would remount /sys and hide it).
    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.path().display()))
            .arg("--")
            .arg(program);
        cmd
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("cleanup: {e}");
        }
    }
}

/// A directory (bpffs pins or temporary files) removed recursively on drop.
struct DirGuard(PathBuf);

impl DirGuard {
    /// Claims `path`, removing whatever an earlier, killed run left there.
    fn new(path: PathBuf) -> DirGuard {
        if path.exists() {
            std::fs::remove_dir_all(&path)
                .unwrap_or_else(|e| panic!("removing stale {}: {e}", path.display()));
        }
        DirGuard(path)
    }
}

impl Drop for DirGuard {
    fn drop(&mut self) {
        if self.0.exists() {
            if let Err(e) = std::fs::remove_dir_all(&self.0) {
                eprintln!("cleanup: removing {}: {e}", self.0.display());
            }
        }
    }
}

/// The fake API server, running on a dedicated thread that joined the test's namespace
/// before building its runtime and binding 127.0.0.1:0 (so the socket lives there).
struct ServerThread {
    server: Arc<FakeApiServer>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl ServerThread {
    fn start_in(ns: &Netns) -> ServerThread {
        let path = ns.path();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<Arc<FakeApiServer>, String>>();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = thread::Builder::new()
            .name("fake-apiserver".to_string())
            .spawn(move || {
                if let Err(e) = enter_netns(&path) {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("building the runtime: {e}")));
                        return;
                    }
                };
                rt.block_on(async move {
                    let server = Arc::new(FakeApiServer::start().await);
                    if ready_tx.send(Ok(Arc::clone(&server))).is_ok() {
                        // Until the test sends (or drops) `stop`.
                        let _ = stopped.await;
                    }
                });
                // Dropping the runtime ends the server task and closes its sockets.
            })
            .expect("spawning the server thread");
        let server = match ready_rx.recv_timeout(WAIT) {
            Ok(Ok(server)) => server,
            Ok(Err(e)) => panic!("fake API server: {e}"),
            Err(e) => panic!("fake API server thread did not start ({e}); it panicked?"),
        };
        ServerThread {
            server,
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for ServerThread {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Moves the calling thread into the network namespace at `path` and checks it is there.
fn enter_netns(path: &Path) -> Result<(), String> {
    let f = File::open(path).map_err(|e| format!("opening {}: {e}", path.display()))?;
    // SAFETY: setns on a valid, open namespace fd; it only changes this thread's namespace.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(format!(
            "setns({}): {}",
            path.display(),
            io::Error::last_os_error()
        ));
    }
    let want = std::fs::metadata(path).map_err(|e| e.to_string())?.ino();
    let have = std::fs::metadata("/proc/thread-self/ns/net")
        .map_err(|e| e.to_string())?
        .ino();
    if want != have {
        return Err(format!(
            "after setns the thread is in net namespace {have}, not {want}"
        ));
    }
    Ok(())
}

/// The `lb-agent run` process (exec'd by nsenter, so the child's pid is the agent's);
/// stopped on drop. Its stdout and stderr go to `log`.
struct Agent {
    child: Child,
    log: PathBuf,
    exited: Option<ExitStatus>,
}

impl Agent {
    fn spawn(ns: &Netns, bpffs: &Path, kubeconfig: &Path, log: PathBuf, extra: &[&str]) -> Agent {
        let out = File::create(&log).expect("creating the agent log");
        let err = out.try_clone().expect("cloning the agent log fd");
        let mut cmd = ns.command(AGENT);
        // The socket hooks would default to the machine's cgroup v2 root: never in tests.
        cmd.args([
            "run",
            "--node-name",
            NODE,
            "--iface",
            "lo",
            "--cgroup",
            "off",
        ])
        .arg("--bpffs")
        .arg(bpffs)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(extra)
        .env("RUST_LOG", "info")
        .env_remove("KUBECONFIG");
        for v in ["HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"] {
            cmd.env_remove(v).env_remove(v.to_lowercase());
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
        Agent {
            child,
            log,
            exited: None,
        }
    }

    /// The agent's output so far (the last 80 lines).
    fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(80)..].join("\n")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panics (with its output) if the agent has exited.
    fn assert_running(&mut self) {
        if let Some(status) = self.exited {
            panic!(
                "lb-agent exited ({status}); its output:\n{}",
                self.log_tail()
            );
        }
        match self.child.try_wait() {
            Ok(None) => {}
            Ok(Some(status)) => {
                self.exited = Some(status);
                panic!(
                    "lb-agent exited ({status}); its output:\n{}",
                    self.log_tail()
                );
            }
            Err(e) => panic!("waiting for lb-agent: {e}"),
        }
    }

    /// SIGTERM, then SIGKILL after [`TERM_GRACE`]; returns the exit status.
    fn stop(&mut self) -> io::Result<ExitStatus> {
        if let Some(status) = self.exited {
            return Ok(status);
        }
        if let Some(status) = self.child.try_wait()? {
            self.exited = Some(status);
            return Ok(status);
        }
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid");
        // SAFETY: signals our own child, which has not been reaped (try_wait said running).
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + TERM_GRACE;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                self.exited = Some(status);
                return Ok(status);
            }
            thread::sleep(Duration::from_millis(20));
        }
        self.child.kill()?;
        let status = self.child.wait()?;
        self.exited = Some(status);
        Ok(status)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("cleanup: stopping lb-agent: {e}");
        }
    }
}

// ---------------------------------------------------------------------------------------
// The harness

/// What `lb-agent status -o json` reports.
#[derive(Debug, Clone, Default)]
struct Status {
    interfaces: Vec<String>,
    node_addrs: Vec<String>,
    /// Frontend ("*:30080/TCP") -> its backends ("10.244.1.5:8080").
    frontends: BTreeMap<String, Vec<String>>,
}

impl Status {
    fn parse(json: &str) -> Result<Status, String> {
        let v: Value = serde_json::from_str(json).map_err(|e| format!("{e} in {json:?}"))?;
        let strings = |v: &Value| -> Vec<String> {
            v.as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        };
        let mut frontends = BTreeMap::new();
        for fe in v["frontends"].as_array().ok_or("no \"frontends\" array")? {
            let name = fe["frontend"].as_str().ok_or("frontend without a name")?;
            let mut backends = strings(&fe["backends"]);
            backends.sort();
            frontends.insert(name.to_string(), backends);
        }
        Ok(Status {
            interfaces: strings(&v["interfaces"]),
            node_addrs: strings(&v["node_addrs"]),
            frontends,
        })
    }

    fn backends(&self, frontend: &str) -> Option<Vec<&str>> {
        self.frontends
            .get(frontend)
            .map(|b| b.iter().map(String::as_str).collect())
    }
}

/// Everything the test created. Fields drop in declaration order: the agent stops first,
/// then the server, then the files, the pins and finally the namespace.
struct Harness {
    agent: Agent,
    server: ServerThread,
    _tmp: DirGuard,
    bpffs: DirGuard,
    ns: Netns,
}

impl Harness {
    fn server(&self) -> &FakeApiServer {
        &self.server.server
    }

    /// One `lb-agent status -o json` inside the namespace.
    fn status(&self) -> Result<Status, String> {
        let mut cmd = self.ns.command(AGENT);
        cmd.args(["status", "-o", "json", "--bpffs"])
            .arg(&self.bpffs.0);
        let out = output_with_timeout(cmd, COMMAND_TIMEOUT)
            .map_err(|e| format!("lb-agent status: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "lb-agent status failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Status::parse(&String::from_utf8_lossy(&out.stdout))
    }

    fn context(&self, last: &Result<Status, String>) -> String {
        format!(
            "last status: {last:#?}\nserver stats: {:?}\nlb-agent output (tail):\n{}",
            self.server().all_stats(),
            self.agent.log_tail()
        )
    }

    /// Polls the status (at most [`WAIT`]) until `pred` holds; returns that status.
    fn wait_status(&mut self, what: &str, pred: impl Fn(&Status) -> bool) -> Status {
        let start = Instant::now();
        loop {
            self.agent.assert_running();
            let last = self.status();
            if let Ok(s) = &last {
                if pred(s) {
                    return s.clone();
                }
            }
            if start.elapsed() > WAIT {
                panic!(
                    "timed out after {WAIT:?} waiting for {what}\n{}",
                    self.context(&last)
                );
            }
            thread::sleep(POLL);
        }
    }

    /// Polls the server's request counters (at most [`WAIT`]) until `pred` holds.
    fn wait_server(&mut self, what: &str, pred: impl Fn(&BTreeMap<Kind, KindStats>) -> bool) {
        let start = Instant::now();
        loop {
            self.agent.assert_running();
            if pred(&self.server().all_stats()) {
                return;
            }
            if start.elapsed() > WAIT {
                panic!(
                    "timed out after {WAIT:?} waiting for {what}\nserver stats: {:?}\n\
                     lb-agent output (tail):\n{}",
                    self.server().all_stats(),
                    self.agent.log_tail()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

fn kubeconfig(server_url: &str) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: fake
  cluster:
    server: {server_url}
users:
- name: tester
  user:
    token: not-a-real-token
contexts:
- name: fake
  context:
    cluster: fake
    user: tester
    namespace: default
current-context: fake
"
    )
}

/// Creates the namespace, starts the server in it (with `world` applied first), writes the
/// kubeconfig and starts the agent.
fn harness(world: impl FnOnce(&FakeApiServer)) -> Harness {
    harness_with(world, false)
}

/// [`harness`]; with `api_server_flag`, the kubeconfig names a server where nothing
/// listens and the real one is given with `--api-server`.
fn harness_with(world: impl FnOnce(&FakeApiServer), api_server_flag: bool) -> Harness {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "agent_kube needs root (network namespaces, bpffs pins, XDP on the namespace's lo); \
         run it as root, e.g. `sudo -E cargo test -p lb-agent --test agent_kube`"
    );
    // One tag per harness: the tests of this file run in parallel.
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tag = format!("lbt-{}-{n}-kube", std::process::id());
    let ns = Netns::create(&tag);
    let bpffs = DirGuard::new(Path::new("/sys/fs/bpf").join(&tag));
    let tmp = DirGuard::new(std::env::temp_dir().join(&tag));
    std::fs::create_dir_all(&tmp.0).expect("creating the temporary directory");
    let server = ServerThread::start_in(&ns);
    world(&server.server);
    let kc = tmp.0.join("kubeconfig");
    let url = server.server.url();
    let (kc_url, extra) = if api_server_flag {
        (
            "http://127.0.0.1:9".to_string(),
            vec!["--api-server", url.as_str()],
        )
    } else {
        (url.clone(), vec![])
    };
    std::fs::write(&kc, kubeconfig(&kc_url)).expect("writing the kubeconfig");
    let agent = Agent::spawn(&ns, &bpffs.0, &kc, tmp.0.join("agent.log"), &extra);
    Harness {
        agent,
        server,
        _tmp: tmp,
        bpffs,
        ns,
    }
}

const NODEPORT: &str = "*:30080/TCP";
const CLUSTERIP: &str = "10.96.0.10:80/TCP";
const HOSTPORT: &str = "*:8000/TCP";
/// The hostPort of the pod on node-b: never a frontend here.
const REMOTE_HOSTPORT: &str = "*:8001/TCP";

#[test]
fn agent_follows_the_api_server_through_kubeconfig() {
    let mut h = harness(|s| {
        // The agent's first list of Nodes waits until released below.
        s.hold_lists(Kind::Node, true);
        s.apply(&service("web", "NodePort", "10.96.0.10", 80, Some(30080)));
        s.apply(&slice(
            "web-1",
            "web",
            &[("10.244.1.5", NODE), ("10.244.1.6", NODE)],
        ));
        s.apply(&pod("hostport", NODE, "10.244.1.7", Some(8000)));
        s.apply(&pod("elsewhere", "node-b", "10.244.2.7", Some(8001)));
        s.apply(&node(NODE, "10.1.0.1"));
        s.apply(&node("node-b", "10.1.0.2"));
    });

    // 1. Nothing is synced before every kind has been listed once. The other three kinds are
    //    listed and watched; the Node list is held.
    h.wait_server(
        "services, slices and pods watched, the node list held",
        |s| {
            [Kind::Service, Kind::EndpointSlice, Kind::Pod]
                .iter()
                .all(|k| s[k].open == 1)
                && s[&Kind::Node].lists == 1
        },
    );
    let held = h.wait_status("the datapath pinned", |_| true);
    assert_eq!(held.interfaces, ["lo"], "{held:#?}");
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        let s = h.status();
        let ok = s
            .as_ref()
            .is_ok_and(|s| s.frontends.is_empty() && s.node_addrs.is_empty());
        assert!(
            ok,
            "the agent synced before the Node list arrived\n{}",
            h.context(&s)
        );
        h.agent.assert_running();
        thread::sleep(POLL);
    }
    assert!(
        !h.agent.log().contains("sync:"),
        "the agent synced before the Node list arrived:\n{}",
        h.agent.log_tail()
    );
    h.server().hold_lists(Kind::Node, false);

    // 2. The first full view: NodePort and ClusterIP with both endpoints, this node's
    //    hostPort, this node's address; not node-b's pod.
    let s = h.wait_status("the first sync", |s| {
        s.backends(NODEPORT).is_some_and(|b| b.len() == 2)
            && s.frontends.contains_key(HOSTPORT)
            && s.node_addrs == ["10.1.0.1"]
    });
    assert_eq!(
        s.backends(NODEPORT).unwrap(),
        ["10.244.1.5:8080", "10.244.1.6:8080"],
        "{s:#?}"
    );
    assert_eq!(
        s.backends(CLUSTERIP).as_deref(),
        Some(&["10.244.1.5:8080", "10.244.1.6:8080"][..]),
        "{s:#?}"
    );
    assert_eq!(
        s.backends(HOSTPORT).as_deref(),
        Some(&["10.244.1.7:80"][..]),
        "{s:#?}"
    );
    assert!(!s.frontends.contains_key(REMOTE_HOSTPORT), "{s:#?}");
    assert_eq!(s.frontends.len(), 3, "{s:#?}");

    // 3. An endpoint goes away.
    h.server()
        .apply(&slice("web-1", "web", &[("10.244.1.5", NODE)]));
    let s = h.wait_status("one backend left", |s| {
        s.backends(NODEPORT).as_deref() == Some(&["10.244.1.5:8080"][..])
    });
    assert_eq!(
        s.backends(CLUSTERIP).as_deref(),
        Some(&["10.244.1.5:8080"][..]),
        "{s:#?}"
    );

    // 4. The Service goes away: its frontends are swept, the hostPort stays.
    assert!(h.server().delete::<Service>(Some("default"), "web"));
    let s = h.wait_status("the service's frontends swept", |s| {
        !s.frontends.contains_key(NODEPORT) && !s.frontends.contains_key(CLUSTERIP)
    });
    assert_eq!(s.frontends.keys().collect::<Vec<_>>(), [HOSTPORT], "{s:#?}");
    assert_eq!(s.node_addrs, ["10.1.0.1"], "{s:#?}");

    // 5. The watches are cut and held away while the cluster changes (objects added,
    //    changed and deleted), then the history is compacted: every kind gets 410 Gone,
    //    re-lists and converges; what the new lists lack is deleted. Meanwhile the maps keep
    //    what they had.
    h.wait_server("one open watch per kind", |s| {
        s.values().all(|k| k.open == 1)
    });
    let before = h.server().all_stats();
    h.server().hold_watches(true);
    assert_eq!(h.server().drop_watches(), 4);
    h.wait_server("every kind trying to watch again", |s| {
        s.iter().all(|(k, st)| st.watches > before[k].watches)
    });
    h.server()
        .apply(&service("api", "NodePort", "10.96.0.11", 443, Some(30090)));
    h.server()
        .apply(&slice("api-1", "api", &[("10.244.1.8", NODE)]));
    h.server().apply(&node(NODE, "10.1.0.11"));
    assert!(h.server().delete::<Pod>(Some("default"), "hostport"));
    h.server().compact();
    let s = h.status();
    assert!(
        s.as_ref()
            .is_ok_and(|s| s.frontends.keys().eq([HOSTPORT]) && s.node_addrs == ["10.1.0.1"]),
        "the maps changed while the watches were away\n{}",
        h.context(&s)
    );
    h.server().hold_watches(false);
    let s = h.wait_status("the changes made while the watches were away", |s| {
        s.backends("*:30090/TCP").as_deref() == Some(&["10.244.1.8:8080"][..])
            && s.node_addrs == ["10.1.0.11"]
            && !s.frontends.contains_key(HOSTPORT)
    });
    assert_eq!(
        s.backends("10.96.0.11:443/TCP").as_deref(),
        Some(&["10.244.1.8:8080"][..]),
        "{s:#?}"
    );
    assert_eq!(
        s.frontends.len(),
        2,
        "the hostPort of a Pod deleted while the watches were away is gone: {s:#?}"
    );
    h.wait_server("410 for every kind, a re-list and a new watch", |s| {
        s.iter()
            .all(|(k, st)| st.gone > before[k].gone && st.lists > before[k].lists && st.open == 1)
    });

    // 6. Watching again from the re-list: later changes still arrive.
    h.server().apply(&slice(
        "api-1",
        "api",
        &[("10.244.1.8", NODE), ("10.244.1.9", NODE)],
    ));
    let s = h.wait_status("changes after the re-list", |s| {
        s.backends("*:30090/TCP").is_some_and(|b| b.len() == 2)
    });
    assert_eq!(
        s.backends("*:30090/TCP").unwrap(),
        ["10.244.1.8:8080", "10.244.1.9:8080"],
        "{s:#?}"
    );
    assert_eq!(s.frontends.len(), 2, "{s:#?}");

    // 7. SIGTERM: a clean exit.
    h.agent.assert_running();
    let status = h.agent.stop().expect("stopping lb-agent");
    assert!(
        status.success(),
        "lb-agent exited with {status} on SIGTERM; its output:\n{}",
        h.agent.log_tail()
    );
}

/// `--api-server` replaces the kubeconfig's server: the agent reaches the API server without
/// the address the kubeconfig (or in-cluster config, through a ClusterIP) would give it.
#[test]
fn agent_reaches_the_api_server_given_by_api_server() {
    let mut h = harness_with(
        |s| {
            s.apply(&service("web", "NodePort", "10.96.0.10", 80, Some(30080)));
            s.apply(&slice("web-1", "web", &[("10.244.1.5", NODE)]));
            s.apply(&node(NODE, "10.1.0.1"));
        },
        true,
    );
    let s = h.wait_status("the first sync through --api-server", |s| {
        s.backends(NODEPORT).is_some_and(|b| b.len() == 1)
    });
    assert_eq!(s.node_addrs, ["10.1.0.1"], "{s:#?}");
    h.agent.assert_running();
}
