//! `lb-lab` (run by `cargo xtask run`): a multi-node lab. Three nodes and a client on one L2
//! segment, each node with a routed pod CIDR, two pods and its own `lb-agent run --manifests`
//! (its own pins), all agents reading the same cluster-wide manifests. It sends requests
//! through every frontend on every node and prints which node was asked, which pod answered
//! and which client address that pod saw. Then it keeps the lab up (re-probing every few
//! seconds) until Ctrl-C; `--once` checks, prints and tears down.
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    process::ExitCode,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use lb_testkit::{
    agent::{
        node_yaml, pod_yaml, service_yaml, start_agent_in, workspace_bin, write_manifest, Agent,
        Endpoint, ManifestDir, SvcPort,
    },
    bpffs::PinDir,
    lab::{http_request, udp_request, Cluster, Topology, CLIENT_IP},
};

/// Numbered step printer: `[k/N] what ... done in 0.3s (detail)`.
struct Steps {
    k: std::cell::Cell<usize>,
    total: usize,
}

impl Steps {
    fn step(&self, what: &str, f: impl FnOnce() -> anyhow::Result<String>) -> anyhow::Result<()> {
        let k = self.k.get() + 1;
        self.k.set(k);
        println!("[{k}/{}] {what} ...", self.total);
        let start = Instant::now();
        let detail = f().with_context(|| format!("step {k}: {what}"))?;
        let took = start.elapsed().as_secs_f64();
        if detail.is_empty() {
            println!("[{k}/{}] {what} ... done in {took:.1}s", self.total);
        } else {
            println!(
                "[{k}/{}] {what} ... done in {took:.1}s ({detail})",
                self.total
            );
        }
        Ok(())
    }
}

const T: Duration = Duration::from_secs(2);
const NODES: usize = 3;
const NODE_NAMES: [&str; NODES] = ["node0", "node1", "node2"];
const HOSTNET_PORT: u16 = 9100;
const WEB: u16 = 30001;
const DNS: u16 = 30053;
const LOCAL_WEB: u16 = 30002;
const LOCAL_WEB_HC: u16 = 32002;
const STICKY: u16 = 30003;

/// What a probe must see.
#[derive(Clone, Copy)]
enum Expect {
    /// Any pod of the cluster; it sees the client when it runs on the asked node, the asked
    /// node's address (SNAT) otherwise.
    AnyPod,
    /// This pod, seeing the client's own address.
    Pod(&'static str),
    /// No answer at all (externalTrafficPolicy Local without a local endpoint).
    Nothing,
    /// This HTTP status from a healthCheckNodePort.
    Status(u16),
}

/// One probe: the node asked, the frontend port, what kind it is, and what is right.
struct Probe {
    node: usize,
    port: u16,
    udp: bool,
    kind: &'static str,
    expect: Expect,
}

fn probes() -> Vec<Probe> {
    let p = |node, port, udp, kind, expect| Probe {
        node,
        port,
        udp,
        kind,
        expect,
    };
    let mut v = Vec::new();
    for k in 0..NODES {
        // Two requests per node to the same NodePort: new connections spread over all pods.
        v.push(p(k, WEB, false, "NodePort web (Cluster)", Expect::AnyPod));
        v.push(p(k, WEB, false, "NodePort web (Cluster)", Expect::AnyPod));
        v.push(p(k, DNS, true, "NodePort web dns/UDP", Expect::AnyPod));
        let local = if k == 0 {
            Expect::Pod("node0-pod1")
        } else {
            Expect::Nothing
        };
        v.push(p(k, LOCAL_WEB, false, "NodePort local-web (Local)", local));
        let hc = if k == 0 { 200 } else { 503 };
        v.push(p(
            k,
            LOCAL_WEB_HC,
            false,
            "healthCheckNodePort of local-web",
            Expect::Status(hc),
        ));
    }
    v.push(p(
        0,
        STICKY,
        false,
        "NodePort sticky (ClientIP)",
        Expect::AnyPod,
    ));
    v.push(p(
        0,
        STICKY,
        false,
        "NodePort sticky (ClientIP)",
        Expect::AnyPod,
    ));
    v.push(p(
        0,
        8000,
        false,
        "hostPort 8000 -> node0-pod0:80",
        Expect::Pod("node0-pod0"),
    ));
    v.push(p(
        0,
        44300,
        false,
        "hostPort 44300 -> node0-pod0:443",
        Expect::Pod("node0-pod0"),
    ));
    v.push(p(
        1,
        HOSTNET_PORT,
        false,
        "hostNetwork pod (no DNAT)",
        Expect::Pod("hostnet-pod"),
    ));
    v
}

/// The sample objects of a small cluster, the same for every node: every Node, the
/// Services with their EndpointSlices, and the pods with hostPorts.
fn write_samples(dir: &Path, cluster: &Cluster) {
    let http = |np| SvcPort {
        name: "http",
        proto: "TCP",
        port: 80,
        target: 80,
        node_port: Some(np),
    };
    let nodes: Vec<String> = cluster
        .nodes
        .iter()
        .zip(NODE_NAMES)
        .map(|(n, name)| node_yaml(name, n.ip))
        .collect();
    write_manifest(dir, "nodes.yaml", &nodes);
    let all: Vec<Endpoint> = cluster
        .nodes
        .iter()
        .zip(NODE_NAMES)
        .flat_map(|(n, name)| {
            n.pods.iter().map(move |p| Endpoint {
                ip: p.ip,
                ready: true,
                node: name,
            })
        })
        .collect();
    let dns = SvcPort {
        name: "dns",
        proto: "UDP",
        port: 53,
        target: 53,
        node_port: Some(DNS),
    };
    let web = service_yaml(
        "web",
        "NodePort",
        Ipv4Addr::new(10, 96, 0, 10),
        false,
        &[http(WEB), dns],
        &all,
    );
    // externalTrafficPolicy Local with its only endpoint on node0: only node0 answers, and
    // its healthCheckNodePort says so.
    let local = service_yaml(
        "local-web",
        "NodePort",
        Ipv4Addr::new(10, 96, 0, 11),
        true,
        &[http(LOCAL_WEB)],
        &[Endpoint {
            ip: cluster.nodes[0].pods[1].ip,
            ready: true,
            node: NODE_NAMES[0],
        }],
    )
    .replacen(
        "  externalTrafficPolicy: Local\n",
        &format!("  externalTrafficPolicy: Local\n  healthCheckNodePort: {LOCAL_WEB_HC}\n"),
        1,
    );
    let sticky = service_yaml(
        "sticky",
        "NodePort",
        Ipv4Addr::new(10, 96, 0, 12),
        false,
        &[http(STICKY)],
        &all,
    )
    .replacen(
        "  sessionAffinity: None\n",
        "  sessionAffinity: ClientIP\n",
        1,
    );
    write_manifest(dir, "services.yaml", &[web, local, sticky]);
    write_manifest(
        dir,
        "pods.yaml",
        &[
            pod_yaml(
                "node0-pod0",
                cluster.nodes[0].pods[0].ip,
                NODE_NAMES[0],
                false,
                &[(80, 8000, "TCP"), (443, 44300, "TCP")],
            ),
            // hostNetwork wins over hostPort: its port is the node's own, no DNAT.
            pod_yaml(
                "hostnet-pod",
                cluster.nodes[1].ip,
                NODE_NAMES[1],
                true,
                &[(HOSTNET_PORT, HOSTNET_PORT, "TCP")],
            ),
        ],
    );
}

/// One row of the table.
struct Row {
    asked: String,
    frontend: String,
    kind: &'static str,
    answered: String,
    client_seen: String,
    latency: Duration,
    ok: bool,
}

fn probe(cluster: &Cluster, p: &Probe) -> Row {
    let node = &cluster.nodes[p.node];
    let to = SocketAddrV4::new(node.ip, p.port);
    let udp = p.udp;
    let timeout = match p.expect {
        Expect::Nothing => Duration::from_millis(300),
        _ => T,
    };
    let start = Instant::now();
    // (who answered or the status, the address the pod saw)
    let r = cluster.client.enter(move || {
        if udp {
            udp_request(to, b"hello", timeout).map(|b| {
                let who = String::from_utf8_lossy(&b)
                    .split(':')
                    .next()
                    .unwrap_or_default()
                    .to_string();
                (who, "-".to_string(), 200)
            })
        } else {
            http_request(to, "/", timeout).map(|r| {
                let peer = r.header("x-peer").unwrap_or("-").to_string();
                (r.body.trim().to_string(), peer, r.status)
            })
        }
    });
    let latency = start.elapsed();
    let client_ip = |peer: &str| peer.split(':').next().unwrap_or_default().to_string();
    let (answered, client_seen, ok) = match (&r, p.expect) {
        (Err(_), Expect::Nothing) => ("(no answer)".to_string(), "-".to_string(), true),
        (Err(e), _) => (format!("error: {e}"), "-".to_string(), false),
        (Ok((body, _, status)), Expect::Status(want)) => {
            (format!("{status} {body}"), "-".to_string(), *status == want)
        }
        (Ok((who, peer, _)), Expect::Pod(want)) => {
            let ok = who == want && (udp || client_ip(peer) == CLIENT_IP.to_string());
            (who.clone(), client_ip(peer), ok)
        }
        (Ok((who, peer, _)), Expect::AnyPod) => {
            let local = node.pods.iter().any(|pod| pod.name == *who);
            let known = cluster.pods().any(|pod| pod.name == *who);
            let want_seen = if local { CLIENT_IP } else { node.ip };
            let ok = known && (udp || client_ip(peer) == want_seen.to_string());
            (who.clone(), client_ip(peer), ok)
        }
        (Ok((who, _, _)), Expect::Nothing) => (who.clone(), "-".to_string(), false),
    };
    Row {
        asked: format!("{} {}", node.name, node.ip),
        frontend: format!(":{}/{}", p.port, if udp { "UDP" } else { "TCP" }),
        kind: p.kind,
        answered,
        client_seen,
        latency,
        ok,
    }
}

fn table(cluster: &Cluster) -> bool {
    let rows: Vec<Row> = probes().iter().map(|p| probe(cluster, p)).collect();
    let cells: Vec<[String; 7]> = rows
        .iter()
        .map(|r| {
            [
                r.asked.clone(),
                r.frontend.clone(),
                r.kind.to_string(),
                r.answered.clone(),
                r.client_seen.clone(),
                format!("{:.0} µs", r.latency.as_secs_f64() * 1e6),
                if r.ok { "ok" } else { "WRONG" }.to_string(),
            ]
        })
        .collect();
    let head = [
        "NODE ASKED",
        "FRONTEND",
        "KIND",
        "ANSWERED BY",
        "CLIENT SEEN",
        "LATENCY",
        "CHECK",
    ];
    let widths: Vec<usize> = (0..head.len())
        .map(|i| {
            cells
                .iter()
                .map(|c| c[i].chars().count())
                .max()
                .unwrap_or(0)
                .max(head[i].len())
        })
        .collect();
    let line = |c: &[&str]| {
        let parts: Vec<String> = c
            .iter()
            .zip(&widths)
            .map(|(s, w)| format!("{s:<w$}"))
            .collect();
        println!("{}", parts.join("   ").trim_end());
    };
    println!();
    line(&head);
    for c in &cells {
        let refs: Vec<&str> = c.iter().map(String::as_str).collect();
        line(&refs);
    }
    println!("\n(the client is {CLIENT_IP}; a pod on another node than the one asked sees that node's address: SNAT)");
    rows.iter().all(|r| r.ok)
}

/// One connection from inside the cluster: `who` (a pod's or a node's namespace, in its
/// node's cgroup) runs `lb-sockclient` against `target`; `want` is the pod that must answer
/// (`None`: any), and the peer it reports must be `target` itself (getpeername4/recvmsg4
/// show the Service address, not the backend's).
struct Inside {
    from: String,
    target: String,
    kind: &'static str,
    udp: bool,
    want: Option<&'static str>,
}

fn inside_table(cluster: &Cluster) -> bool {
    let n0 = &cluster.nodes[0];
    let n1 = &cluster.nodes[1];
    let probes = [
        (
            &n0.pods[0].ns,
            Inside {
                from: "node0-pod0".into(),
                target: "10.96.0.10:80".into(),
                kind: "ClusterIP web",
                udp: false,
                want: None,
            },
        ),
        (
            &n0.pods[0].ns,
            Inside {
                from: "node0-pod0".into(),
                target: "10.96.0.10:53".into(),
                kind: "ClusterIP web dns/UDP (unconnected)",
                udp: true,
                want: None,
            },
        ),
        (
            &n0.pods[0].ns,
            Inside {
                from: "node0-pod0".into(),
                target: format!("{}:8000", n0.ip),
                kind: "its own hostPort via its node (hairpin)",
                udp: false,
                want: Some("node0-pod0"),
            },
        ),
        (
            &n1.ns,
            Inside {
                from: "node1 (process)".into(),
                target: format!("127.0.0.1:{WEB}"),
                kind: "NodePort web on localhost",
                udp: false,
                want: None,
            },
        ),
        (
            &n1.ns,
            Inside {
                from: "node1 (process)".into(),
                target: format!("{}:{LOCAL_WEB}", n1.ip),
                kind: "NodePort local-web (Local): in-cluster, any endpoint",
                udp: false,
                want: Some("node0-pod1"),
            },
        ),
    ];
    let bin = workspace_bin("lb-sockclient");
    let bin = bin.to_string_lossy();
    let mut rows = Vec::new();
    let mut all_ok = true;
    for (ns, p) in &probes {
        let mode = if p.udp { "udp" } else { "tcp" };
        let out = ns.try_run(&[&bin, mode, "--target", &p.target, "--count", "1"]);
        let result = out.ok().and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .find_map(|l| l.strip_prefix("RESULT "))
                .and_then(|j| serde_json::from_str::<serde_json::Value>(j).ok())
        });
        let first_key = |v: &serde_json::Value, k: &str| {
            v[k].as_object()
                .and_then(|o| o.keys().next().cloned())
                .unwrap_or_else(|| "-".into())
        };
        let (who, peer) = result
            .as_ref()
            .map_or(("(no answer)".to_string(), "-".to_string()), |v| {
                (first_key(v, "answered_by"), first_key(v, "peers"))
            });
        let ok = result.as_ref().is_some_and(|v| v["ok"] == 1)
            && peer == p.target
            && p.want.is_none_or(|w| w == who);
        all_ok &= ok;
        rows.push([
            p.from.clone(),
            p.target.clone(),
            p.kind.to_string(),
            who,
            peer,
            if ok { "ok" } else { "WRONG" }.to_string(),
        ]);
    }
    let head = [
        "FROM",
        "TARGET",
        "KIND",
        "ANSWERED BY",
        "PEER SEEN",
        "CHECK",
    ];
    let widths: Vec<usize> = (0..head.len())
        .map(|i| {
            rows.iter()
                .map(|c| c[i].chars().count())
                .max()
                .unwrap_or(0)
                .max(head[i].len())
        })
        .collect();
    let line = |c: &[&str]| {
        let parts: Vec<String> = c
            .iter()
            .zip(&widths)
            .map(|(s, w)| format!("{s:<w$}"))
            .collect();
        println!("{}", parts.join("   ").trim_end());
    };
    println!();
    line(&head);
    for c in &rows {
        let refs: Vec<&str> = c.iter().map(String::as_str).collect();
        line(&refs);
    }
    println!(
        "\n(translated once per connect by the socket hooks; PEER SEEN is what getpeername or \
         recvfrom returned: the Service address, never the pod's)"
    );
    all_ok
}

fn main() -> ExitCode {
    let once = match std::env::args().nth(1).as_deref() {
        None => false,
        Some("--once") => true,
        Some(other) => {
            eprintln!("usage: lb-lab [--once]   (unknown argument {other:?})");
            return ExitCode::from(2);
        }
    };
    lb_testkit::lab::require_root();
    lb_testkit::lab::require_tools();
    match run(once) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(once: bool) -> anyhow::Result<ExitCode> {
    let p = Steps {
        k: std::cell::Cell::new(0),
        total: 5,
    };
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst))
            .context("installing the Ctrl-C handler")?;
    }
    // Everything below is owned by guards: dropping them (on return, error or Ctrl-C) kills
    // the processes, detaches the datapath, deletes the namespaces and the files.
    let mut cluster_slot = None;
    p.step(
        "create the multi-node lab (client, 3 nodes on one bridge, 2 pods each)",
        || {
            let mut cluster = Topology::new().nodes(NODES).pods_per_node(2).build();
            cluster.wait_reachable();
            cluster.start_pod_servers(&[80, 443], &[53], &[]);
            let bin = lb_testkit::lab::podserver_bin();
            let hostnet = cluster.nodes[1].ns.spawn(&[
                &bin.to_string_lossy(),
                "--name",
                "hostnet-pod",
                "--http",
                &HOSTNET_PORT.to_string(),
            ]);
            hostnet.wait_for_log("ready", Duration::from_secs(5))?;
            cluster.adopt("hostnet-pod", hostnet);
            let prefix = cluster.prefix().to_string();
            cluster_slot = Some(cluster);
            Ok(format!("namespaces {prefix}*"))
        },
    )?;
    let cluster = cluster_slot.context("cluster")?;
    let manifests = ManifestDir::new("lab");
    p.step("write cluster-wide sample manifests", || {
        write_samples(manifests.path(), &cluster);
        Ok(manifests.path().display().to_string())
    })?;
    let pins: Vec<PinDir> = NODE_NAMES.iter().map(|n| PinDir::new(n)).collect();
    let mut agents: Vec<Agent> = Vec::new();
    p.step(
        "start one lb-agent per node (same manifests, own pins)",
        || {
            for ((node, name), pins) in cluster.nodes.iter().zip(NODE_NAMES).zip(&pins) {
                // Socket hooks on the node's lab cgroup: its processes and its pods'.
                let cg = node.cgroup.path().to_string_lossy().into_owned();
                agents.push(start_agent_in(
                    &node.ns,
                    name,
                    pins,
                    manifests.path(),
                    &["--cgroup", &cg],
                ));
            }
            Ok(format!("pins {}", pins[0].path().display()))
        },
    )?;
    let mut all_ok = true;
    p.step("send requests through every frontend on every node", || {
        all_ok = table(&cluster);
        Ok(String::new())
    })?;
    p.step(
        "connect from inside the cluster (pods and node processes: socket hooks)",
        || {
            all_ok &= inside_table(&cluster);
            Ok(String::new())
        },
    )?;
    let agent_bin = workspace_bin("lb-agent");
    let status_cmd = |k: usize| {
        format!(
            "nsenter --net=/run/netns/{ns} {agent} status --bpffs {pins}",
            ns = cluster.nodes[k].ns.name(),
            agent = agent_bin.display(),
            pins = pins[k].path().display(),
        )
    };
    println!("\n$ {}", status_cmd(0));
    print!(
        "{}",
        cluster.nodes[0].ns.run(&[
            &agent_bin.to_string_lossy(),
            "status",
            "--bpffs",
            &pins[0].path().to_string_lossy()
        ])
    );
    if once {
        drop(agents);
        return Ok(if all_ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    println!(
        "\nThe lab is up. Edit the manifests in {dir} (e.g. remove an endpoint from \
         services.yaml) and watch the answers change below (the agents re-read within 1 s).\n\
         Look inside each node:",
        dir = manifests.path().display(),
    );
    for k in 0..NODES {
        println!("  {}", status_cmd(k));
    }
    println!("Ctrl-C tears everything down.");
    let web = &probes()[0];
    while !stop.load(Ordering::SeqCst) {
        let start = Instant::now();
        let answers: Vec<String> = (0..NODES)
            .map(|k| {
                let row = probe(
                    &cluster,
                    &Probe {
                        node: k,
                        port: web.port,
                        udp: false,
                        kind: web.kind,
                        expect: Expect::AnyPod,
                    },
                );
                format!(
                    "{} -> {} (saw {})",
                    NODE_NAMES[k], row.answered, row.client_seen
                )
            })
            .collect();
        println!("web NodePort {WEB}: {}", answers.join("   "));
        while start.elapsed() < Duration::from_secs(3) && !stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    println!("\ntearing down the lab");
    drop(agents);
    Ok(ExitCode::SUCCESS)
}
