//! Integration tests of the lab itself (need root): wiring, pod servers reached directly
//! from the client, process and namespace cleanup, and the stale-namespace sweep.
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::time::Duration;

use lb_testkit::lab::{
    http_get, http_request, list_namespaces, namespace_exists, node_veth, owner_pid, pid_alive,
    pod_ip, podserver_bin, sweep_stale_namespaces, udp_request, Lab, LabConfig, LineConn, Netns,
    CLIENT_IP, NODE_IP, POD_GW,
};

const T: Duration = Duration::from_secs(5);
const HTTP: u16 = 80;
const UDP: u16 = 5353;
const LINE: u16 = 7000;

fn podserver() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_lb-podserver"))
}

fn lab_with_servers(pods: usize) -> Lab {
    let mut lab = Lab::new(LabConfig { pods });
    lab.wait_reachable();
    lab.start_pod_servers_with(podserver(), &[HTTP], &[UDP], &[LINE]);
    lab
}

#[test]
fn client_reaches_each_pod_directly_over_http_udp_and_line() {
    let lab = lab_with_servers(2);
    assert_eq!(lab.pods.len(), 2);
    for (i, pod) in lab.pods.iter().enumerate() {
        assert_eq!(pod.name, format!("pod{i}"));
        assert_eq!(pod.ip, pod_ip(i));
        let (body, resp, udp, lines) = lab.client.enter(|| {
            let body = http_get(SocketAddrV4::new(pod.ip, HTTP), "/", T).expect("HTTP GET");
            let resp = http_request(SocketAddrV4::new(pod.ip, HTTP), "/any/path?q=1", T)
                .expect("HTTP request");
            let udp = udp_request(SocketAddrV4::new(pod.ip, UDP), b"hello", T).expect("UDP");
            let mut conn =
                LineConn::connect(SocketAddrV4::new(pod.ip, LINE), T).expect("line connect");
            let lines: Vec<String> = ["one", "two words", "three"]
                .iter()
                .map(|l| conn.request(l).expect("line request"))
                .collect();
            (body, resp, udp, lines)
        });
        let name = &pod.name;
        assert_eq!(body, format!("{name}\n"));
        assert_eq!(resp.status, 200);
        assert_eq!(resp.body, format!("{name}\n"));
        assert_eq!(resp.header("x-served-by"), Some(name.as_str()));
        // The direct path is not NATed: the pod sees the client's own address.
        let peer = resp.header("x-peer").expect("X-Peer header");
        assert!(
            peer.starts_with(&format!("{CLIENT_IP}:")),
            "pod saw {peer}, expected the client address {CLIENT_IP}"
        );
        assert_eq!(udp, format!("{name}:hello").into_bytes());
        assert_eq!(
            lines,
            [
                format!("{name}:one"),
                format!("{name}:two words"),
                format!("{name}:three")
            ]
        );
    }
}

#[test]
fn topology_matches_the_spec() {
    let lab = Lab::new(LabConfig::default());
    let node = &lab.node;
    let up0 = node.ip(&["-o", "addr", "show", "dev", "up0"]);
    assert!(up0.contains(&format!("{NODE_IP}/24")), "up0: {up0}");
    let client_eth0 = lab.client.ip(&["-o", "addr", "show", "dev", "eth0"]);
    assert!(
        client_eth0.contains(&format!("{CLIENT_IP}/24")),
        "{client_eth0}"
    );
    // Each veth pair joins two lab namespaces directly.
    let link = lab.client.ip(&["link", "show", "eth0"]);
    assert!(
        link.contains(&format!("link-netns {}", node.name())),
        "{link}"
    );
    let routes = lab.client.ip(&["route", "show"]);
    assert!(
        routes.contains(&format!("10.244.0.0/16 via {NODE_IP} dev eth0")),
        "{routes}"
    );
    let node_routes = node.ip(&["route", "show"]);
    for (i, pod) in lab.pods.iter().enumerate() {
        let veth = node_veth(i);
        assert_eq!(pod.node_veth, veth);
        let addr = node.ip(&["-o", "addr", "show", "dev", &veth]);
        assert!(addr.contains(&format!("{POD_GW}/32")), "{veth}: {addr}");
        assert!(
            node_routes.contains(&format!("{} dev {veth} scope link", pod.ip)),
            "{node_routes}"
        );
        let pod_addr = pod.ns.ip(&["-o", "addr", "show", "dev", "eth0"]);
        assert!(pod_addr.contains(&format!("{}/32", pod.ip)), "{pod_addr}");
        let pod_routes = pod.ns.ip(&["route", "show"]);
        assert!(
            pod_routes.contains(&format!("default via {POD_GW} dev eth0 onlink")),
            "{pod_routes}"
        );
        let link = pod.ns.ip(&["link", "show", "eth0"]);
        assert!(
            link.contains(&format!("link-netns {}", node.name())),
            "{link}"
        );
    }
    let forward = node.run(&["cat", "/proc/sys/net/ipv4/ip_forward"]);
    assert_eq!(forward.trim(), "1");
    let mut devs: Vec<(&Netns, String)> = vec![(&lab.client, "eth0".into()), (node, "up0".into())];
    for (i, pod) in lab.pods.iter().enumerate() {
        devs.push((&pod.ns, "eth0".into()));
        devs.push((node, node_veth(i)));
    }
    for (ns, dev) in devs {
        let features = ns.run(&["ethtool", "-k", &dev]);
        assert!(
            features.lines().any(|l| l.trim() == "tx-checksumming: off"),
            "TX checksum offload still on for {dev} in {}:\n{features}",
            ns.name()
        );
    }
}

#[test]
fn enter_runs_inside_the_namespace() {
    let lab = Lab::new(LabConfig { pods: 1 });
    // Only pod0's namespace owns 10.244.0.10, so binding it tells where the thread is.
    let in_pod = lab.pods[0]
        .ns
        .enter(|| UdpSocket::bind((pod_ip(0), 0)).map(|_| ()));
    assert!(in_pod.is_ok(), "bind in pod0: {in_pod:?}");
    let in_client = lab
        .client
        .enter(|| UdpSocket::bind((pod_ip(0), 0)).map(|_| ()));
    assert!(
        in_client.is_err(),
        "pod0's address bindable in the client namespace"
    );
    // Panics inside the closure reach the caller.
    let r = catch_unwind(AssertUnwindSafe(|| lab.client.enter(|| panic!("inner"))));
    assert!(r.is_err());
}

#[test]
fn wait_reachable_fails_on_a_broken_lab() {
    let lab = Lab::new(LabConfig { pods: 2 });
    lab.wait_reachable();
    lab.node.ip(&["link", "set", "veth1", "down"]);
    let r = catch_unwind(AssertUnwindSafe(|| lab.wait_reachable()));
    let msg = r
        .expect_err("wait_reachable passed with pod1's link down")
        .downcast::<String>()
        .map(|s| *s)
        .unwrap_or_default();
    assert!(msg.contains(&pod_ip(1).to_string()), "panic message: {msg}");
}

#[test]
fn http_keep_alive_head_and_errors() {
    let lab = lab_with_servers(1);
    let addr = SocketAddrV4::new(pod_ip(0), HTTP);
    let (first, second, head, post) = lab.client.enter(|| {
        let stream = TcpStream::connect_timeout(&addr.into(), T).expect("connect");
        stream.set_read_timeout(Some(T)).expect("timeout");
        let mut reader = BufReader::new(stream.try_clone().expect("clone"));
        let mut w = stream;
        let mut exchange = |req: &str, body: bool| {
            w.write_all(req.as_bytes()).expect("write");
            read_response(&mut reader, body)
        };
        let first = exchange("GET / HTTP/1.1\r\nHost: x\r\n\r\n", true);
        let second = exchange("GET /again HTTP/1.1\r\nHost: x\r\n\r\n", true);
        let head = exchange("HEAD / HTTP/1.1\r\nHost: x\r\n\r\n", false);
        let post = exchange(
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc",
            true,
        );
        // 405 closes the connection.
        let mut rest = Vec::new();
        let n = reader.read_to_end(&mut rest).expect("read to EOF");
        assert_eq!(n, 0, "data after the 405: {rest:?}");
        (first, second, head, post)
    });
    assert_eq!(first, (200, "keep-alive".into(), "pod0\n".into()));
    assert_eq!(second, (200, "keep-alive".into(), "pod0\n".into()));
    assert_eq!(head, (200, "keep-alive".into(), String::new()));
    assert_eq!(post.0, 405);
    assert_eq!(post.1, "close");

    // http_get turns a non-200 status into an error (a one-shot server inside the client ns).
    let err = lab.client.enter(|| {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().expect("accept");
            s.set_read_timeout(Some(T)).expect("timeout");
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            let _ = s.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 4\r\n\r\nnope");
        });
        let r = http_get(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port), "/", T);
        server.join().expect("server thread");
        r
    });
    let err = err.expect_err("http_get accepted a 404");
    assert!(err.to_string().contains("404"), "{err}");
}

/// Reads one response: (status, Connection header, body).
fn read_response(r: &mut BufReader<TcpStream>, has_body: bool) -> (u16, String, String) {
    let mut status_line = String::new();
    r.read_line(&mut status_line).expect("status line");
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let (mut len, mut conn) = (0usize, String::new());
    loop {
        let mut h = String::new();
        r.read_line(&mut h).expect("header");
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':').expect("header colon");
        match k.to_ascii_lowercase().as_str() {
            "content-length" => len = v.trim().parse().expect("length"),
            "connection" => conn = v.trim().to_owned(),
            _ => {}
        }
    }
    let mut body = vec![0u8; if has_body { len } else { 0 }];
    r.read_exact(&mut body).expect("body");
    (status, conn, String::from_utf8(body).expect("utf-8 body"))
}

#[test]
fn stopping_a_pod_server_exits_cleanly_and_closes_its_ports() {
    let mut lab = lab_with_servers(2);
    let status = lab.stop_pod_server(0).expect("pod0 server was running");
    assert!(status.success(), "lb-podserver exited with {status}");
    assert!(lab.pod_server_mut(0).is_none());
    let (pod0, pod1) = lab.client.enter(|| {
        (
            http_get(SocketAddrV4::new(pod_ip(0), HTTP), "/", T),
            http_get(SocketAddrV4::new(pod_ip(1), HTTP), "/", T),
        )
    });
    assert!(pod0.is_err(), "pod0 still answers: {pod0:?}");
    assert_eq!(pod1.expect("pod1 still serves"), "pod1\n");
}

#[test]
fn drop_kills_servers_and_deletes_all_namespaces() {
    let mut lab = lab_with_servers(2);
    let names = lab.namespace_names();
    assert_eq!(names.len(), 4);
    let listed = list_namespaces();
    for n in &names {
        assert!(n.starts_with(lab.prefix()), "{n}");
        assert!(listed.contains(n), "{n} missing from ip netns list");
    }
    let pids: Vec<i32> = (0..2)
        .map(|i| lab.pod_server_mut(i).expect("server").pid() as i32)
        .collect();
    drop(lab);
    let listed = list_namespaces();
    for n in &names {
        assert!(
            !listed.contains(n) && !namespace_exists(n),
            "{n} left behind"
        );
    }
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "pod server {pid} still running"
        );
    }
}

#[test]
fn sweep_removes_namespaces_of_dead_pids_only() {
    assert_eq!(owner_pid("lbt-123-0-client"), Some(123));
    assert_eq!(owner_pid("lbt-123-"), None);
    assert_eq!(owner_pid("lbt-x1-0-a"), None);
    assert_eq!(owner_pid("other-1-0-a"), None);

    let dead = (900_000..1_000_000)
        .rev()
        .find(|&p| !pid_alive(p))
        .expect("a free pid");
    let stale_name = format!("lbt-{dead}-0-x");
    // Dropped at the end: deletes it if the sweep did not (then the test fails anyway).
    let _stale = Netns::new(&stale_name);
    assert!(namespace_exists(&stale_name));
    let live = Lab::new(LabConfig { pods: 0 });
    // (A parallel test's Lab::new may sweep it first; either way it must be gone now.)
    assert!(
        !namespace_exists(&stale_name),
        "{stale_name} survived Lab::new"
    );
    assert!(!list_namespaces().contains(&stale_name));
    let again = sweep_stale_namespaces();
    assert!(!again.contains(&stale_name));
    // Namespaces of a live pid (this process) are kept.
    for n in live.namespace_names() {
        assert!(namespace_exists(&n), "live lab namespace {n} was swept");
    }
}

#[test]
fn parallel_labs_get_distinct_prefixes() {
    let a = Lab::new(LabConfig { pods: 1 });
    let b = Lab::new(LabConfig { pods: 1 });
    let pid = std::process::id();
    for lab in [&a, &b] {
        let p = lab.prefix();
        let n = p
            .strip_prefix(&format!("lbt-{pid}-"))
            .and_then(|r| r.strip_suffix('-'))
            .unwrap_or_else(|| panic!("prefix {p:?} is not lbt-{pid}-<n>-"));
        assert!(n.parse::<usize>().is_ok(), "{p}");
        assert_eq!(lab.client.name(), format!("{p}client"));
        assert_eq!(lab.node.name(), format!("{p}node"));
        assert_eq!(lab.pods[0].ns.name(), format!("{p}pod0"));
    }
    assert_ne!(a.prefix(), b.prefix());
    // Same addresses, separate namespaces: both work at once.
    a.wait_reachable();
    b.wait_reachable();
}

#[test]
fn podserver_bin_finds_the_built_binary() {
    let found = podserver_bin().canonicalize().expect("canonicalize");
    let expected = podserver().canonicalize().expect("canonicalize");
    assert_eq!(found, expected);
}
