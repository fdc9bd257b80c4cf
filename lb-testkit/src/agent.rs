//! Running the real `lb-agent` binary inside a lab's node namespace, fed from a manifests
//! directory, plus builders for the Kubernetes YAML it reads (as `kubectl get -o yaml`
//! prints it).
use std::{
    fmt::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::Duration,
};

use crate::{
    bpffs::PinDir,
    lab::{Lab, Netns, Proc},
};

/// The node name the lab's manifests use.
pub const NODE_NAME: &str = "lab-node";

/// Locate a workspace binary (`lb-agent`, `lb-podserver`, ...) next to the running test or
/// tool: `target/<profile>/<name>`. Panics with the build command when it is missing.
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: build it first (cargo build -p {} --bins)",
        p.display(),
        if name == "lb-agent" {
            "lb-agent"
        } else {
            "lb-testkit"
        }
    );
    p
}

/// A running agent in the lab's node namespace. Dropping it kills the process but leaves
/// the pins (the datapath stays attached) until the [`PinDir`] is dropped.
pub struct Agent {
    pub proc: Proc,
}

/// Start `lb-agent run` in the node namespace on `up0`, reading `manifests`.
pub fn start_agent(lab: &Lab, pins: &PinDir, manifests: &Path) -> Agent {
    start_agent_with(lab, pins, manifests, &[])
}

pub fn start_agent_with(lab: &Lab, pins: &PinDir, manifests: &Path, extra: &[&str]) -> Agent {
    start_agent_in(&lab.node, NODE_NAME, pins, manifests, extra)
}

/// Start `lb-agent run --node-name <node_name>` in the namespace `node` on its `up0`, reading
/// `manifests`, and wait (bounded) for its first sync. For one node of a multi-node lab.
pub fn start_agent_in(
    node: &Netns,
    node_name: &str,
    pins: &PinDir,
    manifests: &Path,
    extra: &[&str],
) -> Agent {
    let bin = workspace_bin("lb-agent");
    let pins_s = pins.path().to_string_lossy().to_string();
    let man = manifests.to_string_lossy().to_string();
    // Every pass's `sync:` line (the agent logs the routine ones at debug level): tests
    // wait for them. A RUST_LOG of the caller's wins.
    let log = format!(
        "RUST_LOG={}",
        std::env::var("RUST_LOG").unwrap_or_else(|_| "info,lb_agent::run=debug".to_string())
    );
    let mut args = vec![
        "env",
        &log,
        bin.to_str().expect("utf-8 path"),
        "run",
        "--node-name",
        node_name,
        "--iface",
        crate::lab::NODE_UPLINK,
        "--bpffs",
        &pins_s,
        "--manifests",
        &man,
    ];
    args.extend_from_slice(extra);
    // The socket hooks default to the machine's cgroup v2 root, which tests must never
    // touch: without an explicit lab cgroup they are off.
    if !extra.contains(&"--cgroup") {
        args.extend_from_slice(&["--cgroup", "off"]);
    }
    let proc = node.spawn(&args);
    proc.wait_for_log("sync:", Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("lb-agent did not sync within 20 s: {e}\n{}", proc.log()));
    Agent { proc }
}

/// One Service port.
pub struct SvcPort {
    pub name: &'static str,
    pub proto: &'static str,
    pub port: u16,
    pub target: u16,
    pub node_port: Option<u16>,
}

/// One endpoint of a Service.
pub struct Endpoint {
    pub ip: Ipv4Addr,
    pub ready: bool,
    pub node: &'static str,
}

pub fn node_yaml(name: &str, ip: Ipv4Addr) -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n  labels:\n    kubernetes.io/hostname: {name}\nstatus:\n  addresses:\n  - address: {ip}\n    type: InternalIP\n  - address: {name}\n    type: Hostname\n"
    )
}

/// A Service plus its EndpointSlice.
pub fn service_yaml(
    name: &str,
    svc_type: &str,
    cluster_ip: Ipv4Addr,
    local: bool,
    ports: &[SvcPort],
    endpoints: &[Endpoint],
) -> String {
    let mut s = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\n  uid: 3f1c2a9e-0000-4000-8000-{:012x}\n  resourceVersion: \"1001\"\nspec:\n  type: {svc_type}\n  clusterIP: {cluster_ip}\n  clusterIPs:\n  - {cluster_ip}\n  selector:\n    app: {name}\n  sessionAffinity: None\n",
        name.len()
    );
    if svc_type != "ClusterIP" {
        let _ = writeln!(
            s,
            "  externalTrafficPolicy: {}",
            if local { "Local" } else { "Cluster" }
        );
    }
    s.push_str("  ports:\n");
    for p in ports {
        let _ = write!(
            s,
            "  - name: {}\n    port: {}\n    protocol: {}\n    targetPort: {}\n",
            p.name, p.port, p.proto, p.target
        );
        if let Some(np) = p.node_port {
            let _ = writeln!(s, "    nodePort: {np}");
        }
    }
    s.push_str("status:\n  loadBalancer: {}\n---\n");
    let _ = write!(
        s,
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\naddressType: IPv4\nmetadata:\n  name: {name}-x7k2p\n  namespace: default\n  labels:\n    kubernetes.io/service-name: {name}\n    endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io\nports:\n"
    );
    for p in ports {
        let _ = write!(
            s,
            "- name: {}\n  port: {}\n  protocol: {}\n",
            p.name, p.target, p.proto
        );
    }
    s.push_str("endpoints:\n");
    for e in endpoints {
        let _ = write!(
            s,
            "- addresses:\n  - {}\n  conditions:\n    ready: {}\n    serving: {}\n    terminating: false\n  nodeName: {}\n",
            e.ip, e.ready, e.ready, e.node
        );
    }
    if endpoints.is_empty() {
        s.push_str("  []\n");
        s = s.replace("endpoints:\n  []\n", "endpoints: []\n");
    }
    s
}

/// A running Pod on `node` with `(containerPort, hostPort, protocol)` ports.
pub fn pod_yaml(
    name: &str,
    ip: Ipv4Addr,
    node: &str,
    host_network: bool,
    ports: &[(u16, u16, &str)],
) -> String {
    let mut s = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\n  creationTimestamp: \"2026-11-23T10:00:00Z\"\nspec:\n  nodeName: {node}\n  hostNetwork: {host_network}\n  containers:\n  - name: app\n    image: registry.example/app:1.0\n    ports:\n"
    );
    for (cp, hp, proto) in ports {
        let _ = write!(
            s,
            "    - containerPort: {cp}\n      hostPort: {hp}\n      protocol: {proto}\n"
        );
    }
    let _ = write!(
        s,
        "status:\n  phase: Running\n  podIP: {ip}\n  podIPs:\n  - ip: {ip}\n"
    );
    s
}

/// Write `docs` (YAML documents) to `dir/name`, atomically (write + rename), so the agent
/// never reads a half-written file.
pub fn write_manifest(dir: &Path, name: &str, docs: &[String]) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, docs.join("---\n")).expect("write manifest");
    std::fs::rename(&tmp, dir.join(name)).expect("rename manifest");
}

/// A manifests directory (`/tmp/lbt-<pid>-<n>-<what>`), removed on drop.
pub struct ManifestDir(PathBuf);

impl ManifestDir {
    pub fn new(what: &str) -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("lbt-{}-{n}-{what}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("creating {}: {e}", p.display()));
        Self(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ManifestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The `/metrics` text of the agent of namespace `ns`, scraped from inside it on `port`.
pub fn scrape(ns: &Netns, port: u16) -> String {
    ns.enter(|| {
        crate::lab::http_get(
            std::net::SocketAddrV4::new(Ipv4Addr::LOCALHOST, port),
            "/metrics",
            Duration::from_secs(3),
        )
    })
    .unwrap_or_else(|e| panic!("GET /metrics in {}: {e}", ns.name()))
}

/// The value of the first metrics line that starts with `prefix` (name and labels, then a
/// space), 0 when there is none.
pub fn metric(body: &str, prefix: &str) -> u64 {
    body.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// The datapath counter `lb_datapath_packets_total{reason}` of the agent in `ns`.
pub fn datapath_count(ns: &Netns, port: u16, reason: &str) -> u64 {
    metric(
        &scrape(ns, port),
        &format!("lb_datapath_packets_total{{reason=\"{reason}\"}} "),
    )
}
