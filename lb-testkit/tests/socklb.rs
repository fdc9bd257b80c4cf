//! Socket-level load balancing in the multi-node lab (need root): each node's agent puts its
//! socket hooks on that node's lab cgroup (`--cgroup`), which holds the node's processes and
//! its pods' processes. Clients are `lb-sockclient` processes started in a pod's or node's
//! namespace and that cgroup, so every check below goes through connect4, sendmsg4,
//! recvmsg4 or getpeername4; nothing in these paths is NATed per packet.
//!
//! Names follow kubernetes/kubernetes test/e2e/network/service.go and hostport.go.
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use lb_testkit::agent::{
    datapath_count, node_yaml, pod_yaml, service_yaml, start_agent_in, workspace_bin,
    write_manifest, Agent, Endpoint, ManifestDir, SvcPort,
};
use lb_testkit::bpffs::PinDir;
use lb_testkit::lab::{Cluster, Netns, Topology};
use serde_json::Value;

const HTTP: u16 = 8080;
const UDP: u16 = 5353;
const METRICS: u16 = 9464;
const WEB_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const WEB_NODE_PORT: u16 = 30080;
const EMPTY_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const LOCAL_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);
const LOCAL_NODE_PORT: u16 = 30085;
const HOST_PORT: u16 = 8081;
const NAMES: [&str; 2] = ["node0", "node1"];

fn podserver() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_lb-podserver"))
}

fn sockclient() -> &'static str {
    env!("CARGO_BIN_EXE_lb-sockclient")
}

/// Runs `lb-sockclient args` in `ns` (and the cgroup its processes join) and returns its
/// `RESULT` JSON.
fn probe(ns: &Netns, args: &[&str]) -> Value {
    let mut all = vec![sockclient()];
    all.extend_from_slice(args);
    let out = ns.try_run(&all).expect("run lb-sockclient");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .unwrap_or_else(|| {
            panic!(
                "lb-sockclient {args:?} printed no RESULT: {stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    serde_json::from_str(line).expect("RESULT is JSON")
}

fn count(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("{key} in {v}"))
}

/// `v[key]` as (name, count) pairs.
fn tally(v: &Value, key: &str) -> Vec<(String, u64)> {
    v[key]
        .as_object()
        .map(|o| {
            o.iter()
                .map(|(k, n)| (k.clone(), n.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default()
}

/// A datapath counter from the node's `/metrics`.
fn reason_count(ns: &Netns, reason: &str) -> u64 {
    datapath_count(ns, METRICS, reason)
}

/// The lab's Services: `web` (NodePort, TCP 80 and UDP 53, one endpoint per node), `empty`
/// (NodePort, no endpoints), `local` (NodePort, externalTrafficPolicy Local, its only
/// endpoint on node1), and a Pod on node0 (its second pod) with hostPort 8081 -> 8080.
fn write_cluster_manifests(cluster: &Cluster, dir: &Path) {
    let nodes: Vec<String> = cluster
        .nodes
        .iter()
        .zip(NAMES)
        .map(|(n, name)| node_yaml(name, n.ip))
        .collect();
    write_manifest(dir, "nodes.yaml", &nodes);
    let first_pods: Vec<Endpoint> = cluster
        .nodes
        .iter()
        .zip(NAMES)
        .map(|(n, name)| Endpoint {
            ip: n.pods[0].ip,
            ready: true,
            node: name,
        })
        .collect();
    let web_ports = [
        SvcPort {
            name: "http",
            proto: "TCP",
            port: 80,
            target: HTTP,
            node_port: Some(WEB_NODE_PORT),
        },
        SvcPort {
            name: "dns",
            proto: "UDP",
            port: 53,
            target: UDP,
            node_port: Some(30053),
        },
    ];
    let one_port = |np: u16| {
        [SvcPort {
            name: "http",
            proto: "TCP",
            port: 80,
            target: HTTP,
            node_port: Some(np),
        }]
    };
    let local_ep = [Endpoint {
        ip: cluster.nodes[1].pods[1].ip,
        ready: true,
        node: NAMES[1],
    }];
    write_manifest(
        dir,
        "services.yaml",
        &[
            service_yaml("web", "NodePort", WEB_IP, false, &web_ports, &first_pods),
            service_yaml("empty", "NodePort", EMPTY_IP, false, &one_port(30090), &[]),
            service_yaml(
                "local",
                "NodePort",
                LOCAL_IP,
                true,
                &one_port(LOCAL_NODE_PORT),
                &local_ep,
            ),
        ],
    );
    write_manifest(
        dir,
        "pods.yaml",
        &[pod_yaml(
            "hostport",
            cluster.nodes[0].pods[1].ip,
            NAMES[0],
            false,
            &[(HTTP, HOST_PORT, "TCP")],
        )],
    );
}

/// An agent per node with its socket hooks on that node's lab cgroup; node1's with
/// `--localhost-nodeports false`.
fn start_agents(cluster: &Cluster, dir: &Path) -> (Vec<PinDir>, Vec<Agent>) {
    let pins: Vec<PinDir> = NAMES.iter().map(|n| PinDir::new(n)).collect();
    let metrics = format!("127.0.0.1:{METRICS}");
    let agents = cluster
        .nodes
        .iter()
        .zip(NAMES)
        .zip(&pins)
        .enumerate()
        .map(|(k, ((node, name), pins))| {
            let cg = node.cgroup.path().to_string_lossy().into_owned();
            let mut extra = vec!["--metrics-addr", &metrics, "--cgroup", &cg];
            if k == 1 {
                extra.extend_from_slice(&["--localhost-nodeports", "false"]);
            }
            start_agent_in(&node.ns, name, pins, dir, &extra)
        })
        .collect();
    (pins, agents)
}

fn target(ip: Ipv4Addr, port: u16) -> String {
    format!("{ip}:{port}")
}

/// Upstream: "should serve a basic endpoint from pods", "should serve multiport endpoints
/// from pods", "should allow pods to hairpin back to themselves through services" and
/// "should be rejected when no endpoints exist" (service.go), and hostport.go's hostPort
/// reached through the node address, all from inside the cluster through the socket hooks.
#[test]
fn should_serve_clusterip_nodeport_and_hostport_from_pods_and_node_processes_through_the_socket_hooks(
) {
    let mut cluster = Topology::new().nodes(2).pods_per_node(2).build();
    cluster.wait_reachable();
    cluster.start_pod_servers_with(podserver(), &[HTTP], &[UDP], &[]);
    let dir = ManifestDir::new("socklb");
    write_cluster_manifests(&cluster, dir.path());
    let (_pins, _agents) = start_agents(&cluster, dir.path());
    let node0 = &cluster.nodes[0];
    let pod = &node0.pods[0].ns;
    let web = target(WEB_IP, 80);

    // Pod -> ClusterIP over TCP: 200 connections, 0 failures, both the local and the remote
    // endpoint answer, and getpeername shows the ClusterIP every time.
    let r = probe(pod, &["tcp", "--target", &web, "--count", "200"]);
    println!("pod -> ClusterIP TCP: {r}");
    assert_eq!((count(&r, "ok"), count(&r, "failed")), (200, 0), "{r}");
    let by = tally(&r, "answered_by");
    assert!(
        by.iter().any(|(p, n)| p == "node0-pod0" && *n > 0)
            && by.iter().any(|(p, n)| p == "node1-pod0" && *n > 0),
        "both the local and the remote endpoint answer: {r}"
    );
    assert_eq!(tally(&r, "peers"), vec![(web.clone(), 200)], "{r}");

    // Pod -> ClusterIP over unconnected UDP: every reply's source is the ClusterIP and the
    // service port (recvmsg4), and both endpoints answer.
    let dns = target(WEB_IP, 53);
    let r = probe(pod, &["udp", "--target", &dns, "--count", "200"]);
    println!("pod -> ClusterIP UDP (unconnected): {r}");
    assert_eq!((count(&r, "ok"), count(&r, "failed")), (200, 0), "{r}");
    assert_eq!(tally(&r, "peers"), vec![(dns.clone(), 200)], "{r}");
    assert_eq!(tally(&r, "answered_by").len(), 2, "local and remote: {r}");
    // Connected UDP: getpeername shows the service address.
    let r = probe(
        pod,
        &[
            "udp",
            "--target",
            &dns,
            "--count",
            "20",
            "--connected",
            "true",
        ],
    );
    assert_eq!(count(&r, "ok"), 20, "{r}");
    assert_eq!(tally(&r, "peers"), vec![(dns.clone(), 20)], "{r}");

    // Pod -> its own node's NodePort (hairpin through the node address).
    let np = target(node0.ip, WEB_NODE_PORT);
    let r = probe(pod, &["tcp", "--target", &np, "--count", "20"]);
    assert_eq!((count(&r, "ok"), count(&r, "failed")), (20, 0), "{r}");
    assert_eq!(tally(&r, "peers"), vec![(np.clone(), 20)], "{r}");

    // The hostPort pod -> its own hostPort through the node address: it reaches itself.
    let hp = target(node0.ip, HOST_PORT);
    let r = probe(
        &node0.pods[1].ns,
        &["tcp", "--target", &hp, "--count", "10"],
    );
    assert_eq!(
        tally(&r, "answered_by"),
        vec![("node0-pod1".to_string(), 10)],
        "{r}"
    );

    // Node processes: 127.0.0.1:NodePort, the ClusterIP and 127.0.0.1:hostPort.
    for (what, t) in [
        (
            "127.0.0.1:NodePort",
            target(Ipv4Addr::LOCALHOST, WEB_NODE_PORT),
        ),
        ("ClusterIP", web.clone()),
        ("127.0.0.1:hostPort", target(Ipv4Addr::LOCALHOST, HOST_PORT)),
    ] {
        let r = probe(&node0.ns, &["tcp", "--target", &t, "--count", "20"]);
        println!("node process -> {what}: {r}");
        assert_eq!(
            (count(&r, "ok"), count(&r, "failed")),
            (20, 0),
            "{what}: {r}"
        );
        assert_eq!(tally(&r, "peers"), vec![(t.clone(), 20)], "{what}: {r}");
    }
    // node1 runs with --localhost-nodeports false: 127.0.0.1:NodePort is left alone (and
    // nothing listens there), while its ClusterIP still works.
    let node1 = &cluster.nodes[1];
    let before = reason_count(&node1.ns, "sock_pass_localhost_nodeport");
    let r = probe(
        &node1.ns,
        &[
            "refused",
            "--target",
            &target(Ipv4Addr::LOCALHOST, WEB_NODE_PORT),
        ],
    );
    assert_eq!(count(&r, "errno"), 111, "{r}");
    assert_eq!(
        reason_count(&node1.ns, "sock_pass_localhost_nodeport"),
        before + 1
    );
    let r = probe(&node1.ns, &["tcp", "--target", &web, "--count", "5"]);
    assert_eq!(count(&r, "ok"), 5, "{r}");

    // externalTrafficPolicy Local, from inside the cluster: kube-proxy sends pods and node
    // processes to every endpoint, so node0 (no local endpoint) still serves it, from node1.
    let local_np = target(node0.ip, LOCAL_NODE_PORT);
    let r = probe(pod, &["tcp", "--target", &local_np, "--count", "10"]);
    assert_eq!(
        tally(&r, "answered_by"),
        vec![("node1-pod1".to_string(), 10)],
        "{r}"
    );
    let status = node0.ns.run(&[
        workspace_bin("lb-agent").to_str().expect("utf-8 path"),
        "status",
        "--bpffs",
        _pins[0].path().to_str().expect("utf-8 path"),
    ]);
    assert!(
        status.contains(&format!("*:{LOCAL_NODE_PORT}/TCP (in-cluster)")),
        "{status}"
    );

    // No endpoints: connect() fails at once with ECONNREFUSED, counted.
    let before = reason_count(&node0.ns, "sock_reject_no_backend");
    let r = probe(pod, &["refused", "--target", &target(EMPTY_IP, 80)]);
    println!("pod -> ClusterIP without endpoints: {r}");
    assert_eq!(count(&r, "errno"), 111, "ECONNREFUSED: {r}");
    assert!(count(&r, "micros") < 10_000, "under 10 ms: {r}");
    assert_eq!(
        reason_count(&node0.ns, "sock_reject_no_backend"),
        before + 1
    );

    // The hooks did the work, and counted it.
    assert!(reason_count(&node0.ns, "sock_connect_xlate") >= 200 + 20 + 10 + 60 + 10);
    assert!(reason_count(&node0.ns, "sock_sendmsg_xlate") >= 200);
    assert!(reason_count(&node0.ns, "sock_recvmsg_revnat") >= 200);
    assert!(reason_count(&node0.ns, "sock_getpeername_revnat") >= 200 + 20 + 60);

    // No namespace needed route_localnet for any of it.
    let mut namespaces: Vec<&Netns> = vec![&cluster.l2, &cluster.client];
    for n in &cluster.nodes {
        namespaces.push(&n.ns);
        namespaces.extend(n.pods.iter().map(|p| &p.ns));
    }
    for ns in namespaces {
        let bad: Vec<String> = ns.enter(|| {
            std::fs::read_dir("/proc/sys/net/ipv4/conf")
                .expect("read conf")
                .flatten()
                .filter_map(|e| {
                    let v = std::fs::read_to_string(e.path().join("route_localnet")).ok()?;
                    (v.trim() != "0").then(|| e.file_name().to_string_lossy().into_owned())
                })
                .collect()
        });
        assert!(bad.is_empty(), "{}: route_localnet on {bad:?}", ns.name());
    }
}

/// Upstream: "should work after the service has been recreated" / kube-proxy restarts
/// (service.go): the agent is killed (-9) and restarted twice while a pod connects to a
/// ClusterIP in a loop; the pinned links keep translating, and the restarted agent swaps its
/// programs into them in place. Not one connect fails. Then `detach` removes the hooks.
#[test]
fn should_keep_translating_clusterip_connects_while_the_agent_restarts() {
    let mut cluster = Topology::new().nodes(2).pods_per_node(2).build();
    cluster.wait_reachable();
    cluster.start_pod_servers_with(podserver(), &[HTTP], &[UDP], &[]);
    let dir = ManifestDir::new("socklb-restart");
    write_cluster_manifests(&cluster, dir.path());
    let (pins, mut agents) = start_agents(&cluster, dir.path());
    let node0 = &cluster.nodes[0];
    let web = target(WEB_IP, 80);
    let client = node0.pods[0].ns.spawn(&[
        sockclient(),
        "tcp",
        "--target",
        &web,
        "--count",
        "100000",
        "--max-seconds",
        "8",
        "--interval-ms",
        "2",
    ]);
    let cg = node0.cgroup.path().to_string_lossy().into_owned();
    let metrics = format!("127.0.0.1:{METRICS}");
    for round in 0..2 {
        std::thread::sleep(Duration::from_millis(1500));
        agents[0].proc.kill();
        std::thread::sleep(Duration::from_millis(500));
        agents[0] = start_agent_in(
            &node0.ns,
            NAMES[0],
            &pins[0],
            dir.path(),
            &["--metrics-addr", &metrics, "--cgroup", &cg],
        );
        assert!(
            agents[0]
                .proc
                .log()
                .contains("pinned links updated in place"),
            "round {round}: {}",
            agents[0].proc.log()
        );
    }
    client
        .wait_for_log("RESULT ", Duration::from_secs(20))
        .expect("client finishes");
    let log = client.log();
    let line = log
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .expect("RESULT");
    let r: Value = serde_json::from_str(line).expect("JSON");
    println!("pod -> ClusterIP in a loop across 2 agent restarts: {r}");
    assert_eq!(count(&r, "failed"), 0, "{r}");
    assert!(count(&r, "ok") > 500, "{r}");
    assert_eq!(tally(&r, "peers").len(), 1, "{r}");

    // detach removes the hooks: the ClusterIP is just an unrouted address again.
    agents[0].proc.kill();
    node0.ns.run(&[
        workspace_bin("lb-agent").to_str().expect("utf-8 path"),
        "detach",
        "--bpffs",
        pins[0].path().to_str().expect("utf-8 path"),
    ]);
    let r = probe(
        &node0.pods[0].ns,
        &[
            "tcp",
            "--target",
            &web,
            "--count",
            "1",
            "--timeout-ms",
            "300",
        ],
    );
    assert_eq!(count(&r, "failed"), 1, "no translation after detach: {r}");
}
