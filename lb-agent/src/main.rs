//! lb-agent: the per-node daemon (`run`), a look at the pinned maps (`status`), and a
//! clean detach (`detach`).
mod metrics;
mod run;
mod status;

use std::{net::SocketAddr, ops::RangeInclusive, path::PathBuf};

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};
use lb_agent::loader::DEFAULT_BPFFS_DIR;

#[derive(Parser)]
#[command(
    name = "lb-agent",
    version,
    about = "eBPF service load balancer for Kubernetes"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Load and attach the datapath, then keep its maps in sync with the cluster (or manifests).
    // Boxed: the run flags are large, the other subcommands small.
    Run(Box<RunArgs>),
    /// Show frontends, backends, hostPorts and counters read from the pinned maps.
    Status {
        #[arg(long, default_value = DEFAULT_BPFFS_DIR)]
        bpffs: PathBuf,
        /// Output format: table or json.
        #[arg(short = 'o', long, default_value = "table")]
        output: status::Format,
    },
    /// Detach from interfaces and remove the pins (maps, programs, links).
    Detach {
        #[arg(long, default_value = DEFAULT_BPFFS_DIR)]
        bpffs: PathBuf,
        /// Only detach from these interfaces (default: all, and remove every pin).
        #[arg(long, value_delimiter = ',')]
        iface: Vec<String>,
    },
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["kubeconfig", "in_cluster", "manifests"])))]
pub struct RunArgs {
    /// This node's name (Pods' spec.nodeName, EndpointSlice nodeName, the Node object). The
    /// agent reads every Node and takes this one's InternalIP/ExternalIP as NodePort addresses.
    #[arg(long)]
    node_name: String,
    /// Extra IPv4 addresses of this node that NodePorts answer on, besides its Node object's
    /// (repeat or separate with commas).
    #[arg(long, value_delimiter = ',')]
    node_addr: Vec<std::net::Ipv4Addr>,
    /// Uplink interfaces to attach to (the ingress program + TC egress).
    #[arg(long, value_delimiter = ',', required = true)]
    iface: Vec<String>,
    /// The hook the ingress program (DNAT) runs at. `xdp`: XDP, native where the driver has
    /// it; DNATed packets go on through the node's stack. `tc`: TC ingress, no XDP program;
    /// packets for local pods go straight into the pod's namespace (bpf_redirect_peer).
    /// Switching on a restart replaces one hook's link with the other's.
    #[arg(long, value_enum, default_value_t = lb_agent::loader::Attach::Xdp)]
    attach: lb_agent::loader::Attach,
    /// Attach the program variants that record their own run time (bpf_ktime_get_ns at
    /// entry and exit) in per-CPU log2 nanosecond buckets, shown by `status` and exported as
    /// the lb_datapath_run_duration_ns histogram. Off, the plain programs run: no cost.
    #[arg(long)]
    latency_histogram: bool,
    #[arg(long, default_value = DEFAULT_BPFFS_DIR)]
    bpffs: PathBuf,
    /// Watch a cluster through this kubeconfig.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Watch the cluster the agent runs in (ServiceAccount token).
    #[arg(long)]
    in_cluster: bool,
    /// Read Service/EndpointSlice/Pod/Node objects from YAML files in this directory, and
    /// re-read them when a file changes.
    #[arg(long)]
    manifests: Option<PathBuf>,
    /// The API server's own URL (e.g. https://10.0.0.1:6443), used instead of the one the
    /// kubeconfig or in-cluster config gives. In-cluster config reaches the API through the
    /// `kubernetes` Service's ClusterIP, which this agent programs: it needs this to start.
    #[arg(long, value_parser = parse_url)]
    api_server: Option<http::Uri>,
    /// cgroup v2 directory whose processes (and their descendants' cgroups) get socket-level
    /// load balancing: ClusterIPs, and NodePorts, hostPorts, externalIPs and LoadBalancer IPs
    /// from the node's own processes and pods. Default: the cgroup v2 root found in
    /// /proc/mounts (the unified mount on a hybrid host); `off` disables the socket hooks.
    #[arg(long)]
    cgroup: Option<String>,
    /// Whether the node's own processes reach NodePorts on 127.0.0.1 (the socket hooks
    /// translate them; route_localnet stays 0). kube-proxy's iptables mode allowed it only
    /// through route_localnet (CVE-2020-8558); its nftables mode refuses it. hostPorts on
    /// 127.0.0.1 are served either way, as the CNI portmap plugin does.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    localhost_nodeports: bool,
    /// Serve Prometheus metrics on this address.
    #[arg(long)]
    metrics_addr: Option<SocketAddr>,
    /// Serve the node's /healthz and /livez here, like kube-proxy's :10256 (`off` to disable).
    /// healthCheckNodePorts of externalTrafficPolicy Local Services are served on their own
    /// ports on every address of the node.
    #[arg(long, default_value = "0.0.0.0:10256", value_parser = parse_listen)]
    healthz_addr: Listen,
    /// The cluster's NodePort range.
    #[arg(long, default_value = "30000-32767", value_parser = parse_range)]
    nodeport_range: RangeInclusive<u16>,
    /// Source ports of SNATed flows to remote backends (externalTrafficPolicy Cluster). The
    /// default lies above Linux's default ip_local_port_range (32768-60999) and the NodePort
    /// range, so it never collides with the node's own connections; keep it disjoint from
    /// both. Each (remote backend, node address) pair can have this many flows at once.
    #[arg(long, default_value = "61000-65535", value_parser = parse_range)]
    snat_ports: RangeInclusive<u16>,
    /// Conntrack idle timeout of TCP flows not yet established (SYN seen), e.g. 60s, 2m.
    #[arg(long, default_value = "60s", value_parser = parse_secs)]
    ct_timeout_tcp_syn: u32,
    /// Conntrack idle timeout of established TCP flows.
    #[arg(long, default_value = "6h", value_parser = parse_secs)]
    ct_timeout_tcp: u32,
    /// Conntrack idle timeout of closing TCP flows (FIN or RST seen).
    #[arg(long, default_value = "10s", value_parser = parse_secs)]
    ct_timeout_tcp_fin: u32,
    /// Conntrack idle timeout of UDP flows.
    #[arg(long, default_value = "60s", value_parser = parse_secs)]
    ct_timeout_udp: u32,
    /// How often the agent collects expired conntrack entries (`0s` disables the GC; the
    /// datapath still expires a flow on its next packet).
    #[arg(long, default_value = "30s", value_parser = parse_secs)]
    ct_gc_interval: u32,
    /// ICMP port-unreachable replies per second and CPU for new flows to frontends without
    /// endpoints (kube-proxy's REJECT); beyond it they are dropped. 0: always drop.
    #[arg(long, default_value_t = 1000)]
    reject_rate: u32,
    /// Conntrack map capacity (applies when the map is first created).
    #[arg(long, default_value_t = lb_common::maps::LB4_CT_MAX)]
    ct_size: u32,
    /// Service map capacity: master entries plus one per backend slot (first creation only).
    #[arg(long, default_value_t = lb_common::maps::LB4_SERVICES_MAX)]
    services_size: u32,
    /// Backend map capacity (first creation only).
    #[arg(long, default_value_t = lb_common::maps::LB4_BACKENDS_MAX)]
    backends_size: u32,
    /// Most frontends (one per-frontend counter slot each; first creation only).
    #[arg(long, default_value_t = lb_common::maps::LB_SVC_STATS_MAX)]
    frontends_size: u32,
    /// How often the maps are read back and compared with the desired state, repairing any
    /// drift (entries changed or removed behind the agent's back), e.g. 30s, 5m, 1h; 0 or
    /// off disables it. Changes are written as they come in any case.
    #[arg(long, default_value = "5m", value_parser = parse_interval)]
    resync_interval: Interval,
}

/// A period, or none (`0`, `off`).
#[derive(Clone, Copy, Debug)]
pub struct Interval(pub Option<std::time::Duration>);

fn parse_interval(s: &str) -> Result<Interval, String> {
    let t = s.trim();
    if t == "off" || t == "0" {
        return Ok(Interval(None));
    }
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a duration such as 30s, 5m or 1h, or off"))?;
    let secs = match unit {
        "ms" => n / 1e3,
        "s" | "" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (ms, s, m or h)")),
    };
    if !(secs.is_finite() && secs >= 0.0) {
        return Err(format!("{s:?}: not a duration"));
    }
    let d = std::time::Duration::from_secs_f64(secs);
    Ok(Interval((!d.is_zero()).then_some(d)))
}

/// A listen address, or `off`.
#[derive(Clone, Copy, Debug)]
pub struct Listen(pub Option<SocketAddr>);

fn parse_listen(s: &str) -> Result<Listen, String> {
    if s == "off" {
        return Ok(Listen(None));
    }
    s.parse()
        .map(|a| Listen(Some(a)))
        .map_err(|e| format!("{s:?}: {e} (expected ADDRESS:PORT or off)"))
}

/// A duration in whole seconds: `N`, `Ns`, `Nm`, `Nh` or `Nd`.
fn parse_secs(s: &str) -> Result<u32, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, 's')) => (&t[..i], 1),
        Some((i, 'm')) => (&t[..i], 60),
        Some((i, 'h')) => (&t[..i], 3600),
        Some((i, 'd')) => (&t[..i], 86_400),
        _ => (t, 1),
    };
    num.parse::<u32>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("{s:?}: expected a duration such as 30s, 10m, 6h"))
}

fn parse_url(s: &str) -> Result<http::Uri, String> {
    let uri: http::Uri = s
        .parse()
        .map_err(|e| format!("{s:?}: {e} (expected https://HOST:PORT)"))?;
    match (uri.scheme_str(), uri.host()) {
        (Some("https" | "http"), Some(_)) => Ok(uri),
        _ => Err(format!("{s:?}: expected https://HOST:PORT")),
    }
}

fn parse_range(s: &str) -> Result<RangeInclusive<u16>, String> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("{s:?}: expected FIRST-LAST, e.g. 30000-32767"))?;
    let a: u16 = a.trim().parse().map_err(|e| format!("{a:?}: {e}"))?;
    let b: u16 = b.trim().parse().map_err(|e| format!("{b:?}: {e}"))?;
    if a == 0 || a > b {
        return Err(format!("{s:?}: need 1 <= FIRST <= LAST"));
    }
    Ok(a..=b)
}

/// glibc's malloc, set for a daemon that builds large tables once and then changes them a
/// little at a time: a fixed mmap threshold (its default), so that every large block (the
/// hash tables as they grow, id vectors, batch buffers) keeps its own mapping and returns it
/// when freed. By default the threshold slides up to the size of the largest block freed,
/// after which such blocks are carved from the heap and their holes stay resident: about
/// 40 MiB of the peak at 100k Services (docs/perf/control-plane.md).
fn tune_malloc() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets an allocator parameter; nothing else runs yet.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Run(args) => {
            tune_malloc();
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("starting the tokio runtime")?;
            rt.block_on(run::run(*args))
        }
        Cmd::Status { bpffs, output } => {
            // `lb-agent status | head` ends quietly, like other CLI tools, not with a panic on
            // a closed pipe.
            // SAFETY: restoring the default disposition of SIGPIPE has no preconditions.
            unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
            status::print(&bpffs, output)
        }
        Cmd::Detach { bpffs, iface } => {
            if !bpffs.exists() {
                bail!("{} does not exist: nothing to detach", bpffs.display());
            }
            if iface.is_empty() {
                lb_agent::loader::teardown(&bpffs)?;
                println!("detached and removed all pins under {}", bpffs.display());
            } else {
                for i in &iface {
                    lb_agent::loader::detach(&bpffs, i)?;
                    println!("detached from {i}");
                }
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_interval;
    use std::time::Duration;

    #[test]
    fn resync_intervals() {
        let p = |s| parse_interval(s).map(|i| i.0);
        assert_eq!(p("5m"), Ok(Some(Duration::from_secs(300))));
        assert_eq!(p("30s"), Ok(Some(Duration::from_secs(30))));
        assert_eq!(p("1h"), Ok(Some(Duration::from_secs(3600))));
        assert_eq!(p("250ms"), Ok(Some(Duration::from_millis(250))));
        assert_eq!(p("90"), Ok(Some(Duration::from_secs(90))));
        assert_eq!(p("0"), Ok(None));
        assert_eq!(p("off"), Ok(None));
        assert_eq!(p("0s"), Ok(None));
        assert!(p("5x").is_err());
        assert!(p("soon").is_err());
    }
}
