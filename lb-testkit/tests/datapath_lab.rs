//! The datapath under real traffic in the netns lab (need root): kube-proxy's REJECT for
//! Services without endpoints, IPv4 fragments both ways (local and SNATed remote backends),
//! path MTU discovery through a NodePort (ICMP fragmentation-needed translated for the
//! backend), and a spoofed SYN flood of twice the conntrack capacity.
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

use lb_testkit::agent::{
    datapath_count, metric, node_yaml, scrape, service_yaml, start_agent_in, workspace_bin,
    write_manifest, Agent, Endpoint, ManifestDir, SvcPort,
};
use lb_testkit::bpffs::PinDir;
use lb_testkit::lab::{http_get, Cluster, LineConn, Netns, Topology, CLIENT_IF};

const METRICS: u16 = 9464;
const HTTP: u16 = 8080;
const UDP: u16 = 5353;
const LINE: u16 = 7000;
const T: Duration = Duration::from_secs(3);

fn podserver() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_lb-podserver"))
}

/// A datapath counter from the node's `/metrics`.
fn counter(ns: &Netns, reason: &str) -> u64 {
    datapath_count(ns, METRICS, reason)
}

/// A Service `name` with one HTTP NodePort (30080) whose only endpoint is `node`'s first pod.
fn one_pod_web(name: &str, node: &lb_testkit::lab::NodeNs) -> String {
    service_yaml(
        name,
        "NodePort",
        Ipv4Addr::new(10, 96, 0, 80),
        false,
        &[port("http", "TCP", 80, HTTP, 30080)],
        &[Endpoint {
            ip: node.pods[0].ip,
            ready: true,
            node: "node0",
        }],
    )
}

fn port(name: &'static str, proto: &'static str, port: u16, target: u16, np: u16) -> SvcPort {
    SvcPort {
        name,
        proto,
        port,
        target,
        node_port: Some(np),
    }
}

fn names(cluster: &Cluster) -> Vec<&'static str> {
    ["node0", "node1", "node2"][..cluster.nodes.len()].to_vec()
}

/// Nodes and `services` in a manifest dir, one agent per node (metrics on [`METRICS`]).
fn start(
    cluster: &Cluster,
    services: &[String],
    extra: &[&str],
) -> (ManifestDir, Vec<PinDir>, Vec<Agent>) {
    let dir = ManifestDir::new("dplab");
    let nodes: Vec<String> = cluster
        .nodes
        .iter()
        .zip(names(cluster))
        .map(|(n, name)| node_yaml(name, n.ip))
        .collect();
    write_manifest(dir.path(), "nodes.yaml", &nodes);
    write_manifest(dir.path(), "services.yaml", services);
    let metrics = format!("127.0.0.1:{METRICS}");
    let mut args = vec!["--metrics-addr", metrics.as_str()];
    args.extend_from_slice(extra);
    let pins: Vec<PinDir> = names(cluster).iter().map(|n| PinDir::new(n)).collect();
    let agents = cluster
        .nodes
        .iter()
        .zip(names(cluster))
        .zip(&pins)
        .map(|((n, name), p)| start_agent_in(&n.ns, name, p, dir.path(), &args))
        .collect();
    (dir, pins, agents)
}

/// Upstream: "should be rejected when no endpoints exist" (test/e2e/network/service.go):
/// kube-proxy REJECTs; here XDP answers the first packet with an ICMP port unreachable.
/// A TCP connect to the NodePort fails with ECONNREFUSED in under 100 ms, and a UDP
/// client gets ECONNREFUSED too.
#[test]
fn should_be_rejected_when_no_endpoints_exist() {
    let cluster = Topology::new().nodes(1).pods_per_node(1).build();
    cluster.wait_reachable();
    let svc = service_yaml(
        "empty",
        "NodePort",
        Ipv4Addr::new(10, 96, 0, 90),
        false,
        &[
            port("http", "TCP", 80, HTTP, 30090),
            port("dns", "UDP", 53, UDP, 30091),
        ],
        &[],
    );
    let (_dir, _pins, _agents) = start(&cluster, &[svc], &[]);
    let node = &cluster.nodes[0];
    let before = counter(&node.ns, "xdp_reject_no_backend");
    let tcp = SocketAddrV4::new(node.ip, 30090);
    let (r, took) = cluster.client.enter(|| {
        let t = Instant::now();
        let r = TcpStream::connect_timeout(&tcp.into(), Duration::from_secs(2));
        (r.map(|_| ()), t.elapsed())
    });
    println!("connect to a NodePort without endpoints: {r:?} after {took:?}");
    let e = r.expect_err("the connect must fail");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
    assert!(took < Duration::from_millis(100), "took {took:?}");

    let udp = SocketAddrV4::new(node.ip, 30091);
    let r = cluster.client.enter(|| -> std::io::Result<usize> {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.connect(udp)?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.send(b"anyone?")?;
        let mut buf = [0u8; 64];
        s.recv(&mut buf)
    });
    println!("UDP to a NodePort without endpoints: {r:?}");
    let e = r.expect_err("no answer but a refusal");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
    assert_eq!(counter(&node.ns, "xdp_reject_no_backend"), before + 2);
}

/// 4 KB UDP datagrams over MTU 1500 (three fragments each way) to a NodePort are echoed
/// back, from a backend on the node and from one on another node (SNATed, forwarded from
/// XDP): the later fragments follow their first one through the fragment records.
#[test]
fn udp_datagrams_of_4kb_are_fragmented_and_echoed_back_through_a_nodeport() {
    let mut cluster = Topology::new().nodes(2).pods_per_node(1).build();
    cluster.wait_reachable();
    cluster.start_pod_servers_with(podserver(), &[], &[UDP], &[]);
    let ep = |k: usize| Endpoint {
        ip: cluster.nodes[k].pods[0].ip,
        ready: true,
        node: ["node0", "node1"][k],
    };
    let services = [
        service_yaml(
            "local",
            "NodePort",
            Ipv4Addr::new(10, 96, 0, 53),
            false,
            &[port("dns", "UDP", 53, UDP, 30053)],
            &[ep(0)],
        ),
        service_yaml(
            "remote",
            "NodePort",
            Ipv4Addr::new(10, 96, 0, 54),
            false,
            &[port("dns", "UDP", 53, UDP, 30054)],
            &[ep(1)],
        ),
    ];
    let (_dir, _pins, _agents) = start(&cluster, &services, &[]);
    let node0 = &cluster.nodes[0];
    let payload: Vec<u8> = (0..4000u32).map(|i| b'A' + (i % 23) as u8).collect();
    for (np, pod) in [(30053, "node0-pod0"), (30054, "node1-pod0")] {
        let target = SocketAddrV4::new(node0.ip, np);
        let before = (
            counter(&node0.ns, "xdp_frag_fwd"),
            counter(&node0.ns, "tc_frag_revnat"),
        );
        let ok = cluster.client.enter(|| {
            let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
            s.connect(target).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(2)))
                .expect("timeout");
            let mut ok = 0;
            let mut buf = vec![0u8; 65_536];
            for _ in 0..20 {
                s.send(&payload).expect("send");
                if let Ok(n) = s.recv(&mut buf) {
                    let want = [format!("{pod}:").as_bytes(), &payload].concat();
                    assert_eq!(&buf[..n], &want[..], "the echo of {target}");
                    ok += 1;
                }
            }
            ok
        });
        let after = (
            counter(&node0.ns, "xdp_frag_fwd"),
            counter(&node0.ns, "tc_frag_revnat"),
        );
        println!(
            "4000-byte UDP to {target} ({pod}): {ok}/20 echoed; node0 xdp_frag_fwd +{}, \
             tc_frag_revnat +{}",
            after.0 - before.0,
            after.1 - before.1
        );
        assert_eq!(ok, 20, "{target}");
        // Two later fragments per datagram on the way in (both cases), and on the way back
        // either through TC (local backend) or through XDP (the remote backend's reply).
        assert!(after.0 - before.0 >= 40, "{before:?} -> {after:?}");
        if np == 30053 {
            assert!(after.1 - before.1 >= 40, "{before:?} -> {after:?}");
        } else {
            assert!(after.0 - before.0 >= 80, "{before:?} -> {after:?}");
        }
    }
}

/// Path MTU discovery through a NodePort: the client sits behind a router whose link to it
/// has an MTU of 1280. The backend's 1500-byte segments are answered by the router with
/// ICMP fragmentation-needed, sent to the NodePort's address; XDP translates the error for
/// the backend (outer destination and quoted header), the backend lowers its path MTU, and
/// a 1 MB HTTP response completes. Without the translation the error would reach the node
/// for a connection it does not have, and the transfer would stall.
#[test]
fn path_mtu_discovery_works_through_a_nodeport_behind_a_smaller_mtu_hop() {
    let mut cluster = Topology::new()
        .nodes(1)
        .pods_per_node(1)
        .client_behind_router(1280)
        .build();
    cluster.wait_reachable();
    cluster.start_pod_servers_with(podserver(), &[HTTP], &[], &[]);
    let node = &cluster.nodes[0];
    let svc = one_pod_web("big", node);
    let (_dir, _pins, _agents) = start(&cluster, &[svc], &[]);
    let target = SocketAddrV4::new(node.ip, 30080);
    const SIZE: usize = 1 << 20;
    let (got, took) = cluster.client.enter(|| {
        let t = Instant::now();
        let mut s =
            TcpStream::connect_timeout(&target.into(), Duration::from_secs(3)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(15)))
            .expect("timeout");
        s.write_all(format!("GET /bytes/{SIZE} HTTP/1.0\r\n\r\n").as_bytes())
            .expect("request");
        let mut raw = Vec::new();
        let r = s.read_to_end(&mut raw);
        (r.map(|_| raw), t.elapsed())
    });
    let raw = got.expect("the 1 MB response must complete (stalled: PMTU blackholed?)");
    let body_at = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("an HTTP header")
        + 4;
    let body = &raw[body_at..];
    assert_eq!(body.len(), SIZE);
    assert!(body
        .iter()
        .enumerate()
        .all(|(i, b)| *b == b'a' + (i % 26) as u8));
    let icmp = counter(&node.ns, "xdp_icmp_err_dnat");
    println!(
        "1 MB through a NodePort behind an MTU-1280 hop: {} bytes in {took:?}; \
         xdp_icmp_err_dnat {icmp}",
        body.len()
    );
    assert!(
        icmp >= 1,
        "the router's fragmentation-needed went through XDP"
    );
}

/// A spoofed SYN flood of twice the conntrack capacity (`--ct-size 8192`: 8,192 + 2,048
/// half-open entries; 22,528 SYNs from random 10.250.0.0/16 sources, 2.2 times the
/// capacity, so that at least twice the capacity reaches the datapath even when the busy
/// veth drops a few hundred: a CI run once counted 19,969 of 20,480) at a NodePort does
/// not break established flows: 50 connections opened before it answer every request
/// during and after it, and a new connection right after it succeeds at once (its time
/// is printed). Half-open flows live in their own map, so the flood evicts only those.
#[test]
fn a_spoofed_syn_flood_of_twice_the_conntrack_capacity_breaks_no_established_flow() {
    let mut cluster = Topology::new().nodes(1).pods_per_node(2).build();
    cluster.wait_reachable();
    cluster.start_pod_servers_with(podserver(), &[HTTP], &[], &[LINE]);
    let node = &cluster.nodes[0];
    let eps: Vec<Endpoint> = node
        .pods
        .iter()
        .map(|p| Endpoint {
            ip: p.ip,
            ready: true,
            node: "node0",
        })
        .collect();
    let svc = service_yaml(
        "web",
        "NodePort",
        Ipv4Addr::new(10, 96, 0, 80),
        false,
        &[
            port("line", "TCP", 7000, LINE, 30070),
            port("http", "TCP", 80, HTTP, 30080),
        ],
        &eps,
    );
    let (_dir, _pins, _agents) = start(&cluster, &[svc], &["--ct-size", "8192"]);
    let line = SocketAddrV4::new(node.ip, 30070);
    let mut conns: Vec<LineConn> = cluster.client.enter(|| {
        (0..50)
            .map(|_| LineConn::connect(line, T).expect("connect"))
            .collect()
    });
    let round = |conns: &mut Vec<LineConn>, tag: &str| -> usize {
        cluster.client.enter(|| {
            conns
                .iter_mut()
                .enumerate()
                .map(|(i, c)| {
                    c.request(&format!("{tag}-{i}"))
                        .is_ok_and(|r| r.ends_with(&format!(":{tag}-{i}")))
                })
                .filter(|ok| *ok)
                .count()
        })
    };
    assert_eq!(round(&mut conns, "before"), 50);

    // (nsenter keeps the host's /sys: ask ip for the uplink's MAC.)
    let link = node
        .ns
        .ip(&["-o", "link", "show", lb_testkit::lab::NODE_UPLINK]);
    let mac = link
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .unwrap_or_else(|| panic!("no MAC in {link}"))
        .to_string();
    let flood_target = SocketAddrV4::new(node.ip, 30080).to_string();
    let loadgen = workspace_bin("lb-loadgen");
    let flood = cluster.client.spawn(&[
        loadgen.to_str().expect("utf-8 path"),
        "synflood",
        "--iface",
        CLIENT_IF,
        "--dst-mac",
        &mac,
        "--target",
        &flood_target,
        "--count",
        "22528",
        "--max-seconds",
        "30",
    ]);
    // Requests on the established flows while the flood runs.
    let mut during = 0;
    let mut rounds = 0;
    let flood_started = Instant::now();
    while !flood.log().contains("RESULT ") && flood_started.elapsed() < Duration::from_secs(35) {
        during += round(&mut conns, &format!("during{rounds}"));
        rounds += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    flood
        .wait_for_log("RESULT ", Duration::from_secs(5))
        .expect("the flood finishes");
    let flood_log = flood.log();
    let ended = Instant::now();
    // A new legitimate connection right after the flood.
    let http = SocketAddrV4::new(node.ip, 30080);
    let (first_ok, attempts) = cluster.client.enter(|| {
        let mut attempts = 0;
        loop {
            attempts += 1;
            if http_get(http, "/", Duration::from_millis(500)).is_ok() || attempts >= 20 {
                return (ended.elapsed(), attempts);
            }
        }
    });
    let after = round(&mut conns, "after");
    let entries = |what: &str| -> u64 { metric(&scrape(&node.ns, METRICS), what) };
    println!(
        "SYN flood: {}; established flows answered {during}/{} requests during it and \
         {after}/50 after it; a new connection succeeded {first_ok:?} after the flood \
         ({attempts} attempt(s)); ct_created {}",
        flood_log
            .lines()
            .find(|l| l.starts_with("RESULT"))
            .unwrap_or(""),
        rounds * 50,
        entries("lb_datapath_packets_total{reason=\"ct_created\"} "),
    );
    assert!(flood_log.contains("\"sent\":22528"), "{flood_log}");
    assert_eq!(
        during,
        rounds * 50,
        "every request during the flood answered"
    );
    assert_eq!(after, 50, "every established flow survives");
    assert_eq!(attempts, 1, "a new connection succeeds at once");
    // Two entries (one per direction) for each flooding SYN the datapath saw: at least
    // twice the capacity's worth of SYNs.
    let created = entries("lb_datapath_packets_total{reason=\"ct_created\"} ");
    assert!(
        created >= 2 * 2 * 10_240,
        "the flood reached the datapath: {created} entries created"
    );
}

/// `--latency-histogram`: the timed programs record their own run time; after 50 requests
/// through a NodePort, `status` shows the run-time table and `/metrics` the histogram, both
/// with every run the verdict counters saw.
#[test]
fn latency_histogram_shows_in_status_and_metrics() {
    let mut cluster = Topology::new().nodes(1).pods_per_node(1).build();
    cluster.wait_reachable();
    cluster.start_pod_servers_with(podserver(), &[HTTP], &[], &[]);
    let node = &cluster.nodes[0];
    let svc = one_pod_web("web", node);
    let (_dir, pins, agents) = start(&cluster, &[svc], &["--latency-histogram"]);
    assert!(
        agents[0].proc.log().contains("with the latency histogram"),
        "{}",
        agents[0].proc.log()
    );
    let target = SocketAddrV4::new(node.ip, 30080);
    for _ in 0..50 {
        cluster
            .client
            .enter(|| http_get(target, "/", T))
            .expect("GET through the NodePort");
    }
    let status = node.ns.run(&[
        workspace_bin("lb-agent").to_str().expect("utf-8 path"),
        "status",
        "--bpffs",
        pins[0].path().to_str().expect("utf-8 path"),
    ]);
    println!("{status}");
    assert!(status.contains("DATAPATH RUN TIME"), "{status}");
    let body = scrape(&node.ns, METRICS);
    let get = |prefix: &str| -> u64 { metric(&body, prefix) };
    let xdp_runs = get("lb_datapath_run_duration_ns_count{prog=\"xdp\"} ");
    let tc_runs = get("lb_datapath_run_duration_ns_count{prog=\"tc\"} ");
    let inf = get("lb_datapath_run_duration_ns_bucket{prog=\"xdp\",le=\"+Inf\"} ");
    println!("histogram: {xdp_runs} XDP runs, {tc_runs} TC runs");
    // Every request is at least SYN, ACK, data, FIN in and SYN-ACK, data, FIN out.
    assert!(xdp_runs >= 50 * 4 && tc_runs >= 50 * 3, "{body}");
    assert_eq!(inf, xdp_runs);
    let tracked = counter(&node.ns, "xdp_fwd_tracked") + counter(&node.ns, "xdp_fwd_new_flow");
    assert!(xdp_runs >= tracked, "every counted packet was timed");
}
