//! The network-namespace lab: a client, a node and N pods wired like a one-node cluster,
//! every address and route living only inside namespaces this code creates.
//!
//! ```text
//!  client ns                 node ns                              pod{i} ns
//!  eth0 10.200.0.2/24 ---- up0 10.200.0.1/24
//!                           veth{i} 10.244.0.1/32 ------------ eth0 10.244.0.{10+i}/32
//!                           route 10.244.0.{10+i}/32 dev veth{i}   default via 10.244.0.1 onlink
//!  route 10.244.0.0/16 via 10.200.0.1 (direct, no-NAT baseline)
//! ```
//!
//! Namespaces are named `lbt-<pid>-<n>-<role>`; each [`Lab::new`] first deletes namespaces
//! of earlier runs whose pid is gone, and dropping a [`Lab`] deletes its own.
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

pub mod client;
pub mod cluster;
pub mod netns;
pub mod procs;

pub use client::{http_get, http_request, ping, udp_request, HttpResponse, LineConn};
pub use cluster::{Cluster, NodeNs, Topology};
pub use netns::{list_namespaces, namespace_exists, pid_alive, Netns, Proc};
pub use procs::Procs;

/// Client address (client ns, `eth0`).
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
/// Node uplink address (node ns, `up0`): where NodePort traffic arrives.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
/// Prefix length of the client/node link.
pub const UPLINK_PREFIX_LEN: u8 = 24;
/// Gateway address every pod routes through (on each node-side `veth{i}`).
pub const POD_GW: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);
/// Pod network the client routes via the node.
pub const POD_CIDR: &str = "10.244.0.0/16";
/// Interface name of the client's and every pod's link.
pub const CLIENT_IF: &str = "eth0";
pub const POD_IF: &str = "eth0";
/// Node side of the client link.
pub const NODE_UPLINK: &str = "up0";
/// Most pods one lab can hold (pod addresses are `10.244.0.{10+i}`).
pub const MAX_PODS: usize = 240;
/// Namespace name prefix shared by every lab.
pub const NS_PREFIX: &str = "lbt-";

/// Timeout for one ping in [`Lab::wait_reachable`], and the number of tries.
const PING_TIMEOUT: Duration = Duration::from_secs(1);
const PING_TRIES: usize = 5;
/// How long [`Lab::start_pod_servers_with`] waits for each server's `ready`.
const SERVER_READY_TIMEOUT: Duration = Duration::from_secs(15);

/// Address of pod `i`: `10.244.0.{10+i}`.
pub fn pod_ip(i: usize) -> Ipv4Addr {
    assert!(
        i < MAX_PODS,
        "pod index {i} out of range (max {MAX_PODS} pods)"
    );
    Ipv4Addr::new(10, 244, 0, 10 + i as u8)
}

/// Node-side interface of pod `i`'s veth pair.
pub fn node_veth(i: usize) -> String {
    format!("veth{i}")
}

/// Panics unless running as root (euid 0).
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "these tests need root: CAP_NET_ADMIN + CAP_BPF (+ CAP_NET_RAW, CAP_SYS_ADMIN for \
         setns and network namespaces); running as euid {euid}. Run them with sudo or as root."
    );
}

/// Panics naming the package to install when `ip`, `ethtool` or `nsenter` is not on `PATH`.
pub fn require_tools() {
    for (tool, package) in [
        ("ip", "iproute2"),
        ("ethtool", "ethtool"),
        ("nsenter", "util-linux"),
    ] {
        assert!(
            find_in_path(tool).is_some(),
            "`{tool}` not found on PATH; install the `{package}` package (e.g. apt-get install {package})"
        );
    }
}

fn find_in_path(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// The pid encoded in a lab namespace name `lbt-<pid>-...`, if it is one.
pub fn owner_pid(ns_name: &str) -> Option<i32> {
    let rest = ns_name.strip_prefix(NS_PREFIX)?;
    let (pid, tail) = rest.split_once('-')?;
    if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) || tail.is_empty() {
        return None;
    }
    pid.parse().ok()
}

/// Deletes every `lbt-<pid>-...` namespace whose pid is not a live process (left over by
/// a run that was killed before it could clean up). Returns the names deleted.
pub fn sweep_stale_namespaces() -> Vec<String> {
    let mut swept = Vec::new();
    for name in list_namespaces() {
        let Some(pid) = owner_pid(&name) else {
            continue;
        };
        if pid_alive(pid) {
            continue;
        }
        match netns::delete_namespace(&name) {
            Ok(()) => swept.push(name),
            Err(e) => eprintln!("warning: could not sweep stale namespace {name}: {e}"),
        }
    }
    swept
}

/// Distinguishes labs created by one process.
pub(crate) static LAB_COUNTER: AtomicUsize = AtomicUsize::new(0);

/// How many pods a [`Lab`] gets.
#[derive(Clone, Debug)]
pub struct LabConfig {
    pub pods: usize,
}

impl Default for LabConfig {
    fn default() -> Self {
        LabConfig { pods: 2 }
    }
}

/// One pod: its namespace, name (`pod{i}`), address and the node-side veth name.
#[derive(Debug)]
pub struct PodNs {
    pub ns: Netns,
    pub name: String,
    pub ip: Ipv4Addr,
    pub node_veth: String,
}

/// A client, a node and pods, wired and ready (see the module docs). Dropping it kills the
/// processes it owns, then deletes all its namespaces.
#[derive(Debug)]
pub struct Lab {
    pub prefix: String,
    pub client: Netns,
    pub node: Netns,
    pub pods: Vec<PodNs>,
    /// Processes the lab owns, by label; killed before the namespaces go.
    procs: Procs,
}

impl Lab {
    /// Builds the lab. Panics with a clear message when not root, a tool is missing, or
    /// any step fails (namespaces created so far are deleted while unwinding).
    pub fn new(config: LabConfig) -> Lab {
        require_root();
        require_tools();
        assert!(
            config.pods <= MAX_PODS,
            "LabConfig::pods = {} exceeds {MAX_PODS}",
            config.pods
        );
        sweep_stale_namespaces();
        let n = LAB_COUNTER.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("{NS_PREFIX}{}-{n}-", std::process::id());

        let client = Netns::new(format!("{prefix}client"));
        let node = Netns::new(format!("{prefix}node"));
        let mut lab = Lab {
            prefix,
            client,
            node,
            pods: Vec::with_capacity(config.pods),
            procs: Procs::default(),
        };
        lab.wire_uplink();
        for i in 0..config.pods {
            lab.add_pod(i);
        }
        lab
    }

    /// `lbt-<pid>-<n>-`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Names of all namespaces of this lab (client, node, pods).
    pub fn namespace_names(&self) -> Vec<String> {
        [&self.client, &self.node]
            .into_iter()
            .chain(self.pods.iter().map(|p| &p.ns))
            .map(|ns| ns.name().to_owned())
            .collect()
    }

    fn wire_uplink(&mut self) {
        let client = &self.client;
        let node = &self.node;
        // Created directly between the two namespaces: the pair never exists in the root ns.
        client.ip(&[
            "link",
            "add",
            CLIENT_IF,
            "type",
            "veth",
            "peer",
            "name",
            NODE_UPLINK,
            "netns",
            node.name(),
        ]);
        let client_cidr = format!("{CLIENT_IP}/{UPLINK_PREFIX_LEN}");
        let node_cidr = format!("{NODE_IP}/{UPLINK_PREFIX_LEN}");
        client.ip(&["addr", "add", &client_cidr, "dev", CLIENT_IF]);
        client.ip(&["link", "set", CLIENT_IF, "up"]);
        node.ip(&["addr", "add", &node_cidr, "dev", NODE_UPLINK]);
        node.ip(&["link", "set", NODE_UPLINK, "up"]);
        client.ip(&["route", "add", POD_CIDR, "via", &NODE_IP.to_string()]);
        node.enter(|| {
            // /proc/sys/net is per network namespace of the writing thread.
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
                .expect("setting net.ipv4.ip_forward=1 in the node namespace");
        });
        disable_tx_csum(client, CLIENT_IF);
        disable_tx_csum(node, NODE_UPLINK);
    }

    fn add_pod(&mut self, i: usize) {
        let pod = wire_pod(
            &self.node,
            &self.prefix,
            format!("pod{i}"),
            pod_ip(i),
            POD_GW,
            node_veth(i),
        );
        self.pods.push(pod);
    }

    /// Pings (bounded: 5 tries of 1 s each) client -> node, node ->
    /// each pod and client -> each pod (forwarded by the node). Panics naming the first
    /// path that does not answer.
    pub fn wait_reachable(&self) {
        let mut paths: Vec<(&Netns, Ipv4Addr)> = vec![(&self.client, NODE_IP)];
        paths.extend(self.pods.iter().map(|p| (&self.node, p.ip)));
        paths.extend(self.pods.iter().map(|p| (&self.client, p.ip)));
        ping_all(&paths);
    }

    /// Starts `lb-podserver` (found by [`podserver_bin`]) in every pod; see
    /// [`Lab::start_pod_servers_with`].
    pub fn start_pod_servers(&mut self, http: &[u16], udp: &[u16], line: &[u16]) {
        let bin = podserver_bin();
        self.start_pod_servers_with(&bin, http, udp, line);
    }

    /// Starts `bin --name pod{i} --http P... --udp P... --line P...` in every pod and waits
    /// (bounded) for each to print `ready`. Replaces servers started earlier. The processes
    /// are owned by the lab under the label `podserver:pod{i}` ([`Lab::proc_mut`]).
    pub fn start_pod_servers_with(&mut self, bin: &Path, http: &[u16], udp: &[u16], line: &[u16]) {
        let pods: Vec<&PodNs> = self.pods.iter().collect();
        start_pod_servers_in(&mut self.procs, &pods, bin, http, udp, line);
    }

    /// Hands a process to the lab: it is killed when the lab drops (before the namespaces
    /// are deleted). A process already under `label` is killed and replaced.
    pub fn adopt(&mut self, label: impl Into<String>, proc: Proc) {
        self.procs.adopt(label, proc);
    }

    /// The owned process under `label`.
    pub fn proc_mut(&mut self, label: &str) -> Option<&mut Proc> {
        self.procs.get_mut(label)
    }

    /// Takes the owned process under `label` back from the lab.
    pub fn take_proc(&mut self, label: &str) -> Option<Proc> {
        self.procs.take(label)
    }

    /// Pod `i`'s server, if running under the lab.
    pub fn pod_server_mut(&mut self, i: usize) -> Option<&mut Proc> {
        self.proc_mut(&pod_server_label(i))
    }

    /// Stops pod `i`'s server with SIGTERM (a backend going away); returns its exit status.
    pub fn stop_pod_server(&mut self, i: usize) -> Option<ExitStatus> {
        self.take_proc(&pod_server_label(i))?.terminate()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Processes first, in reverse start order; the namespaces (fields) drop afterwards.
        self.procs.kill_all();
    }
}

/// Label of pod `i`'s server among a lab's processes.
pub fn pod_server_label(i: usize) -> String {
    server_label(&format!("pod{i}"))
}

/// Label of the server of the pod called `pod` among a lab's processes.
pub fn server_label(pod: &str) -> String {
    format!("podserver:{pod}")
}

/// Creates the pod namespace `<prefix><name>` with `eth0` at `ip/32` and a default route via
/// `gw`, and its peer `veth` in `node` with `gw/32`, up, and a host route to the pod.
pub(crate) fn wire_pod(
    node: &Netns,
    prefix: &str,
    name: String,
    ip: Ipv4Addr,
    gw: Ipv4Addr,
    veth: String,
) -> PodNs {
    let ns = Netns::new(format!("{prefix}{name}"));
    ns.ip(&[
        "link",
        "add",
        POD_IF,
        "type",
        "veth",
        "peer",
        "name",
        &veth,
        "netns",
        node.name(),
    ]);
    let pod_cidr = format!("{ip}/32");
    let gw_cidr = format!("{gw}/32");
    let gw = gw.to_string();
    ns.ip(&["addr", "add", &pod_cidr, "dev", POD_IF]);
    ns.ip(&["link", "set", POD_IF, "up"]);
    ns.ip(&[
        "route", "add", "default", "via", &gw, "dev", POD_IF, "onlink",
    ]);
    node.ip(&["addr", "add", &gw_cidr, "dev", &veth]);
    node.ip(&["link", "set", &veth, "up"]);
    node.ip(&["route", "add", &pod_cidr, "dev", &veth, "scope", "link"]);
    disable_tx_csum(&ns, POD_IF);
    disable_tx_csum(node, &veth);
    PodNs {
        ns,
        name,
        ip,
        node_veth: veth,
    }
}

/// Pings each `(from, to)` (bounded: 5 tries of 1 s each); panics naming the first path that
/// does not answer.
pub(crate) fn ping_all(paths: &[(&Netns, Ipv4Addr)]) {
    for (from, to) in paths {
        let to = *to;
        let result = from.enter(|| {
            let mut last = None;
            for _ in 0..PING_TRIES {
                match ping(to, PING_TIMEOUT) {
                    Ok(rtt) => return Ok(rtt),
                    Err(e) => last = Some(e),
                }
            }
            Err(last.map(|e| e.to_string()).unwrap_or_default())
        });
        if let Err(e) = result {
            panic!(
                "lab not wired: {to} does not answer pings from namespace {} after {PING_TRIES} tries: {e}",
                from.name()
            );
        }
    }
}

/// Starts `bin --name NAME --http P... --udp P... --line P...` in each pod, owned by `procs`
/// under [`server_label`], replacing servers started earlier, and waits (bounded) for each
/// to print `ready`.
pub(crate) fn start_pod_servers_in(
    procs: &mut Procs,
    pods: &[&PodNs],
    bin: &Path,
    http: &[u16],
    udp: &[u16],
    line: &[u16],
) {
    assert!(
        bin.is_file(),
        "pod server binary {} does not exist; build it with `cargo build -p lb-testkit --bins`",
        bin.display()
    );
    let bin_str = bin.to_string_lossy().into_owned();
    let mut started = Vec::new();
    for pod in pods {
        let label = server_label(&pod.name);
        drop(procs.take(&label));
        let mut args: Vec<String> = vec![bin_str.clone(), "--name".into(), pod.name.clone()];
        for (flag, ports) in [("--http", http), ("--udp", udp), ("--line", line)] {
            for p in ports {
                args.push(flag.into());
                args.push(p.to_string());
            }
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        procs.adopt(label.clone(), pod.ns.spawn(&args));
        started.push(label);
    }
    for label in started {
        if let Some(p) = procs.get_mut(&label) {
            if let Err(e) = p.wait_for_log("ready", SERVER_READY_TIMEOUT) {
                panic!("pod server {label} did not start: {e}");
            }
        }
    }
}

/// Turns TX checksum offload off on `dev` inside `ns`.
///
/// A veth hands the peer an skb that may still be CHECKSUM_PARTIAL: the L4 checksum field
/// holds only the pseudo-header sum, to be finished "by hardware" that never runs. The XDP
/// program fixes checksums incrementally, so on such a packet a wrong update would go
/// unnoticed. With offload off, the sender computes full checksums in software, so what
/// crosses the veth is complete, like on a physical NIC, and the receiver verifies it.
pub(crate) fn disable_tx_csum(ns: &Netns, dev: &str) {
    ns.run(&["ethtool", "-K", dev, "tx", "off"]);
}

/// `target/<profile>/lb-podserver`, next to the running executable (or one level up, for
/// test binaries in `target/<profile>/deps`). `LB_PODSERVER` overrides. Builds nothing;
/// panics with a hint when the binary is missing.
pub fn podserver_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("LB_PODSERVER") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("locating the current executable");
    let dir = exe.parent().unwrap_or(Path::new("."));
    let candidates: Vec<PathBuf> = [Some(dir), dir.parent()]
        .into_iter()
        .flatten()
        .map(|d| d.join("lb-podserver"))
        .collect();
    if let Some(found) = candidates.iter().find(|p| p.is_file()) {
        return found.clone();
    }
    panic!(
        "lb-podserver not found (looked at {candidates:?}); build it with `cargo build -p lb-testkit --bins` \
         or set LB_PODSERVER"
    );
}
