//! The lab side of the benchmarks: a fresh netns lab per measured path, `lb-loadgen` servers
//! in the pods, the datapath under test set up in the node namespace (ours, kube-proxy's
//! iptables or nftables rules, or nothing for the direct path), checks that exactly that one
//! is active, and `lb-loadgen` client runs in the client namespace.
//!
//! All traffic stays inside the lab's namespaces: the client only ever targets the node's
//! uplink address or a pod address, both of which exist only inside the lab.
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use lb_agent::dataplane::{BpfDataplane, Dataplane};
use lb_agent::loader::{
    attached_cgroup_id, set_socket_policy, Attach, Capacities, Datapath, XdpAttachMode,
};
use lb_bench::schema::{Row, Stat};
use lb_testkit::bpffs::PinDir;
use lb_testkit::lab::netns::output_with_timeout;
use lb_testkit::lab::{Lab, LabConfig, Netns, Proc, NODE_IP, NODE_UPLINK, POD_CIDR};
use serde::Deserialize;

use crate::rules::{self, NodeConfig};
use crate::services::{self, Position, ServiceSet};
use crate::Progress;

/// First port of a pod server; servers listen on `SERVER_PORT..SERVER_PORT + PORTS`.
pub const SERVER_PORT: u16 = 8080;
pub const SERVER_PORTS: u16 = services::ENDPOINTS_PER_SERVICE as u16;
/// Bound on applying one rule set (iptables-restore of 10k Services takes a while).
const APPLY_TIMEOUT: Duration = Duration::from_secs(900);

/// A datapath under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathKind {
    /// Client to pod IP, routed by the node, no NAT: the floor.
    Direct,
    /// Our datapath on the node's uplink: XDP ingress, TC egress (`--attach xdp`).
    Ours,
    /// Our datapath with the ingress program at TC ingress (`--attach tc`).
    OursTc,
    /// kube-proxy iptables mode, target Service at that position of the chains.
    Iptables(Position),
    /// kube-proxy nftables mode.
    Nftables,
}

impl PathKind {
    pub fn label(self) -> String {
        match self {
            PathKind::Direct => "direct".into(),
            PathKind::Ours => "ours".into(),
            PathKind::OursTc => "ours-tc".into(),
            PathKind::Iptables(pos) => format!("iptables-{}", pos.label()),
            PathKind::Nftables => "nftables".into(),
        }
    }

    /// The `--attach` hook of our paths (`None`: not ours).
    pub fn hook(self) -> Option<Attach> {
        match self {
            PathKind::Ours => Some(Attach::Xdp),
            PathKind::OursTc => Some(Attach::Tc),
            _ => None,
        }
    }

    /// Where the target Service sits in the service list for this path. Only iptables
    /// walks the list; the others are put at the end too, for identical tables.
    pub fn position(self) -> Position {
        match self {
            PathKind::Iptables(pos) => pos,
            _ => Position::End,
        }
    }
}

/// The `lb-loadgen` binary next to this executable.
pub fn loadgen_bin() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating lb-bench")?;
    let dir = exe.parent().unwrap_or(Path::new("."));
    let p = dir.join("lb-loadgen");
    anyhow::ensure!(
        p.is_file(),
        "{} not found: build it with `cargo build --release -p lb-bench -p lb-testkit --bins`",
        p.display()
    );
    Ok(p)
}

/// Pod `i`'s server endpoints (`podIP:8080..8089`).
pub fn pod_endpoints(lab: &Lab, i: usize) -> Vec<SocketAddrV4> {
    (0..SERVER_PORTS)
        .map(|k| SocketAddrV4::new(lab.pods[i].ip, SERVER_PORT + k))
        .collect()
}

/// A wired lab with an `lb-loadgen server --id i` in every pod and the client tuned for many
/// short connections ([`tune_client`]).
pub fn new_lab(pods: usize, loadgen: &Path) -> anyhow::Result<Lab> {
    let mut lab = std::panic::catch_unwind(|| {
        let lab = Lab::new(LabConfig { pods });
        lab.wait_reachable();
        lab
    })
    .map_err(|e| anyhow!("building the lab: {}", panic_text(&e)))?;
    tune_client(&lab.client)?;
    for i in 0..pods {
        let proc = loadgen_server(&lab.pods[i].ns, loadgen, i)?;
        lab.adopt(format!("loadgen-server:{i}"), proc);
    }
    Ok(lab)
}

/// The client's sysctls for many short connections: `tcp_tw_reuse` and a wide ephemeral port
/// range (TCP_CRR opens thousands of connections).
pub fn tune_client(client: &Netns) -> anyhow::Result<()> {
    client.enter(|| -> anyhow::Result<()> {
        std::fs::write("/proc/sys/net/ipv4/tcp_tw_reuse", "1")?;
        std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", "10000 65000")?;
        Ok(())
    })
}

/// Starts `lb-loadgen server --id ID` on the TCP and UDP server ports in `ns` and waits
/// (bounded) for it to be ready.
pub fn loadgen_server(ns: &Netns, loadgen: &Path, id: usize) -> anyhow::Result<Proc> {
    let bin = loadgen.to_string_lossy().into_owned();
    let ports = format!("{SERVER_PORT}-{}", SERVER_PORT + SERVER_PORTS - 1);
    let id = id.to_string();
    let proc = ns.spawn(&[
        &bin, "server", "--id", &id, "--tcp", &ports, "--udp", &ports,
    ]);
    proc.wait_for_log("ready", Duration::from_secs(15))?;
    Ok(proc)
}

/// `row` with the latency percentiles and transaction rate of `runs` (medians over the
/// runs) and their error count.
pub fn with_latency(row: Row, runs: &[ClientResult]) -> Row {
    let col = |f: fn(&ClientResult) -> f64| Stat::of(&runs.iter().map(f).collect::<Vec<_>>());
    let errors: u64 = runs.iter().map(|r| r.errors).sum();
    row.metric("p50_us", "µs", col(|r| r.p50_us))
        .metric("p90_us", "µs", col(|r| r.p90_us))
        .metric("p99_us", "µs", col(|r| r.p99_us))
        .metric("tps", "1/s", col(|r| r.tps))
        .param("errors", errors)
}

pub fn panic_text(e: &Box<dyn std::any::Any + Send>) -> String {
    e.downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "panic".into())
}

/// Node settings for the kube-proxy rule generators.
pub fn node_config() -> NodeConfig {
    NodeConfig {
        // The lab's pod network plays the cluster CIDR.
        cluster_cidr: POD_CIDR.into(),
        node_ips: vec![NODE_IP],
    }
}

/// What is set up on the node for one path; dropping it tears ours down (the lab's
/// namespaces take the rules with them).
pub struct Active {
    pub ours: Option<Ours>,
    /// How long programming the Services took (map writes, iptables-restore, nft -f).
    pub program_s: f64,
    /// Rules (iptables) or map entries (ours) written.
    pub size: String,
}

/// Our datapath attached in a lab's node namespace.
pub struct Ours {
    pub maps: BpfDataplane,
    /// Kept open for as long as the path is measured.
    _datapath: Datapath,
    pub mode: XdpAttachMode,
    // Last: removed (detaching the pinned links) after the fds above are closed.
    pins: PinDir,
}

impl Ours {
    /// The id of the cgroup our socket hooks are attached to (`None`: not attached).
    pub fn sock_cgroup_id(&self) -> Option<u64> {
        attached_cgroup_id(self.pins.path())
    }
}

/// Loads our datapath, attaches it to the node's uplink (inside the node namespace) and,
/// with `sock_cgroup`, its socket hooks to that lab cgroup (what `lb-agent run --cgroup
/// PATH` does: the socket policy first, from the node's namespace, then the hooks), and
/// programs `set` in the agent's order. Returns it and the seconds spent programming.
pub fn attach_ours(
    lab: &Lab,
    set: &ServiceSet,
    sock_cgroup: Option<&Path>,
    hook: Attach,
) -> anyhow::Result<(Ours, f64, usize)> {
    let entries = services::entries(set);
    let caps = Capacities {
        services: (entries.slots.len() + entries.masters.len()) as u32 + 1024,
        backends: entries.backends.len() as u32 + 1024,
        svc_stats: set.ports.len() as u32 + 16,
        ..Capacities::default()
    };
    let pins = PinDir::new("bench-lab");
    let mut datapath = Datapath::load(pins.path(), &caps).context("loading the datapath")?;
    if let Some(cg) = sock_cgroup {
        // The hooks must know the node's namespace (its cookie) before they run.
        lab.node
            .enter(|| set_socket_policy(datapath.pins(), false))
            .context("setting the socket policy")?;
        datapath
            .attach_cgroup(cg)
            .with_context(|| format!("attaching the socket hooks to {}", cg.display()))?;
    }
    let mode = lab
        .node
        .enter(|| attach_to(&mut datapath, NODE_UPLINK, hook))
        .context("attaching to the node's uplink")?;
    let mut maps = datapath.dataplane().context("opening the maps")?;
    maps.put_node_addr(NODE_IP)?;
    let t = Instant::now();
    services::program(&mut maps, &entries)?;
    let took = t.elapsed().as_secs_f64();
    Ok((
        Ours {
            maps,
            _datapath: datapath,
            mode,
            pins,
        },
        took,
        entries.len(),
    ))
}

/// What `lb-agent run --iface IFACE --attach HOOK` attaches, from the calling thread's
/// namespace: the programs, and for TC the veths `bpf_redirect_peer` may use.
pub fn attach_to(
    datapath: &mut Datapath,
    iface: &str,
    hook: Attach,
) -> anyhow::Result<XdpAttachMode> {
    let mode = datapath.attach_hook(iface, hook, false)?;
    if hook == Attach::Tc {
        lb_agent::peer_ifs::refresh(datapath.pins()).context("listing the veth devices")?;
    }
    Ok(mode)
}

/// Runs `args` inside `ns` via `ip netns exec`, bounded by `timeout`; fails with stderr.
pub fn ns_exec(ns: &str, args: &[&str], timeout: Duration) -> anyhow::Result<String> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).args(args);
    let shown = format!("ip netns exec {ns} {}", args.join(" "));
    let out = output_with_timeout(cmd, timeout).with_context(|| format!("running `{shown}`"))?;
    if !out.status.success() {
        bail!(
            "`{shown}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Writes `text` to a temporary file and runs `tool... FILE` in the node namespace.
/// Loads a rule file with `tool FILE` in the namespace `node`; returns the seconds it took.
pub fn apply_file(node: &Netns, tool: &[&str], text: &str, tag: &str) -> anyhow::Result<f64> {
    let dir = std::env::temp_dir().join(format!("lb-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join(format!("{tag}.rules"));
    {
        let mut f = std::fs::File::create(&file)?;
        f.write_all(text.as_bytes())?;
    }
    let file_s = file.to_string_lossy().into_owned();
    let mut args: Vec<&str> = tool.to_vec();
    args.push(&file_s);
    let t = Instant::now();
    let r = ns_exec(node.name(), &args, APPLY_TIMEOUT);
    let took = t.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&file);
    let _ = std::fs::remove_dir(&dir); // only once empty
    r?;
    Ok(took)
}

/// Sets `kind` up on the lab's node for `set` (for ours, with its socket hooks on
/// `sock_cgroup` when given), then checks that it is the only datapath active there.
pub fn activate(
    lab: &Lab,
    kind: PathKind,
    set: &ServiceSet,
    sock_cgroup: Option<&Path>,
    p: &Progress,
) -> anyhow::Result<Active> {
    let mut active = Active {
        ours: None,
        program_s: 0.0,
        size: String::new(),
    };
    match kind {
        PathKind::Direct => {}
        PathKind::Ours | PathKind::OursTc => {
            let hook = kind.hook().unwrap_or_default();
            let (ours, took, entries) = attach_ours(lab, set, sock_cgroup, hook)?;
            p.say(&format!(
                "  {}: attached ({:?}){}, {entries} map entries written in {took:.2}s",
                kind.label(),
                ours.mode,
                if sock_cgroup.is_some() {
                    ", socket hooks on the client pod's cgroup"
                } else {
                    ""
                }
            ));
            if let Some(cg) = sock_cgroup {
                use std::os::unix::fs::MetadataExt as _;
                // On cgroup v2 a directory's inode number is its cgroup id.
                let want = std::fs::metadata(cg)
                    .with_context(|| format!("stat {}", cg.display()))?
                    .ino();
                let got = ours.sock_cgroup_id();
                anyhow::ensure!(
                    got == Some(want),
                    "the socket hooks are attached to cgroup id {got:?}, not to {} (id {want})",
                    cg.display()
                );
            }
            active.ours = Some(ours);
            active.program_s = took;
            active.size = format!("{entries} map entries");
        }
        PathKind::Iptables(_) => {
            let text = rules::iptables_restore(&set.ports, &node_config());
            let (filter, nat) = rules::count_iptables_rules(&text);
            let took = apply_file(&lab.node, &["iptables-restore"], &text, "iptables")?;
            p.say(&format!(
                "  iptables: {nat} nat + {filter} filter rules restored in {took:.2}s"
            ));
            active.program_s = took;
            active.size = format!("{nat} nat + {filter} filter rules");
        }
        PathKind::Nftables => {
            let text = rules::nftables_script(&set.ports, &node_config());
            let lines = text.lines().count();
            let took = apply_file(&lab.node, &["nft", "-f"], &text, "nftables")?;
            p.say(&format!(
                "  nftables: {lines}-line script loaded in {took:.2}s"
            ));
            active.program_s = took;
            active.size = format!("{lines} nft commands");
        }
    }
    check_only(lab, kind)?;
    Ok(active)
}

/// Verifies that the node runs exactly the datapath `kind` and nothing else: XDP on the
/// uplink only for ours (not for ours-tc), kube-proxy's iptables jump only for iptables, the
/// kube-proxy nft table only for nftables. (Each check reads one chain: dumping a 360k-rule
/// ruleset with `iptables-save` or `nft list ruleset` takes minutes.)
pub fn check_only(lab: &Lab, kind: PathKind) -> anyhow::Result<()> {
    let node = lab.node.name();
    let t = Duration::from_secs(300);
    let link = ns_exec(node, &["ip", "link", "show", NODE_UPLINK], t)?;
    let xdp = link.contains("xdp");
    let ipt =
        ns_exec(node, &["iptables", "-t", "nat", "-S", "PREROUTING"], t)?.contains("KUBE-SERVICES");
    let kp = ns_exec(
        node,
        &["nft", "list", "chain", "ip", "kube-proxy", "nat-prerouting"],
        t,
    )
    .is_ok_and(|s| s.contains("jump services"));
    let want = (
        kind == PathKind::Ours,
        matches!(kind, PathKind::Iptables(_)),
        kind == PathKind::Nftables,
    );
    let got = (xdp, ipt, kp);
    if want != got {
        bail!(
            "path {}: expected (XDP on {NODE_UPLINK}, kube-proxy iptables rules, kube-proxy nft \
             table) = {want:?} on the node, found {got:?}",
            kind.label()
        );
    }
    Ok(())
}

/// The addresses the client targets for `kind`: the node's NodePort, or the pod directly.
pub fn targets(
    lab: &Lab,
    kind: PathKind,
    set: &ServiceSet,
) -> anyhow::Result<(SocketAddrV4, SocketAddrV4)> {
    Ok(match kind {
        PathKind::Direct => {
            let pod = SocketAddrV4::new(lab.pods[0].ip, SERVER_PORT);
            (pod, pod)
        }
        _ => {
            let tcp = set
                .target_tcp()
                .node_port
                .ok_or_else(|| anyhow!("target Service has no NodePort"))?;
            let udp = set
                .target_udp()
                .node_port
                .ok_or_else(|| anyhow!("target Service has no UDP NodePort"))?;
            (
                SocketAddrV4::new(NODE_IP, tcp),
                SocketAddrV4::new(NODE_IP, udp),
            )
        }
    })
}

/// The service set of an e2e/throughput run: `n` NodePort Services, the target (pod 0's ten
/// server ports) at `kind`'s position.
pub fn service_set(lab: &Lab, n: usize, kind: PathKind) -> anyhow::Result<ServiceSet> {
    ServiceSet::synthetic(n, kind.position(), true, &pod_endpoints(lab, 0))
}

/// What `lb-loadgen client` prints.
#[derive(Debug, Clone, Deserialize)]
pub struct ClientResult {
    pub count: u64,
    pub errors: u64,
    pub last_error: String,
    pub tps: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub replies_by_id: std::collections::BTreeMap<String, u64>,
}

/// Runs `lb-loadgen args...` in the client namespace and parses its `RESULT` line; bounded by
/// `max_s` plus a grace period.
pub fn run_loadgen<T: serde::de::DeserializeOwned>(
    client: &Netns,
    loadgen: &Path,
    args: &[String],
    max_s: f64,
) -> anyhow::Result<T> {
    let bin = loadgen.to_string_lossy().into_owned();
    let mut full: Vec<&str> = vec![&bin];
    full.extend(args.iter().map(String::as_str));
    let mut proc = client.spawn(&full);
    let deadline = Instant::now() + Duration::from_secs_f64(max_s + 30.0);
    let status = loop {
        if let Some(s) = proc.try_wait() {
            break s;
        }
        if Instant::now() >= deadline {
            proc.kill();
            bail!("lb-loadgen {} did not finish in time", args.join(" "));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    // The output reader threads finish at EOF; give them a moment after the exit.
    let mut log = proc.log();
    for _ in 0..100 {
        if log.contains("RESULT ") {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
        log = proc.log();
    }
    let line = log
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .ok_or_else(|| {
            anyhow!(
                "lb-loadgen {} ({status}) printed no result:\n{log}",
                args.join(" ")
            )
        })?;
    serde_json::from_str(line).with_context(|| format!("parsing {line:?}"))
}

/// One `lb-loadgen client` run.
pub fn client_run(
    client: &Netns,
    loadgen: &Path,
    mode: &str,
    target: SocketAddrV4,
    count: u64,
    max_s: f64,
) -> anyhow::Result<ClientResult> {
    let args: Vec<String> = [
        "client",
        "--mode",
        mode,
        "--target",
        &target.to_string(),
        "--count",
        &count.to_string(),
        "--max-seconds",
        &max_s.to_string(),
        "--warmup",
        "50",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    run_loadgen(client, loadgen, &args, max_s)
}

/// Sends a UDP control datagram to pod `i`'s server from inside its namespace (loopback) and
/// returns the reply text.
pub fn pod_control(lab: &Lab, i: usize, msg: &[u8]) -> anyhow::Result<String> {
    let r = lab.pods[i].ns.enter(|| {
        lb_testkit::lab::udp_request(
            SocketAddrV4::new(Ipv4Addr::LOCALHOST, SERVER_PORT),
            msg,
            Duration::from_secs(2),
        )
    })?;
    Ok(String::from_utf8_lossy(&r).into_owned())
}
