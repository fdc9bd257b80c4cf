//! The loader's and dataplane API's failure modes give specific messages, and `detach`
//! really detaches: missing interface, missing privileges, full maps.
use std::{net::Ipv4Addr, net::SocketAddrV4, time::Duration};

use lb_agent::{
    dataplane::{Dataplane as _, DataplaneError},
    loader::{Capacities, Datapath, LoadError},
};
use lb_common::{Frontend4Key, Service4Value};
use lb_testkit::{
    agent::workspace_bin,
    bpffs::PinDir,
    harness::Harness,
    lab::{Lab, LabConfig},
};

#[test]
fn attach_to_a_missing_interface_names_it() {
    lb_testkit::lab::require_root();
    let pins = PinDir::new("noif");
    let mut dp = Datapath::load(pins.path(), &Capacities::default()).expect("load");
    let err = dp
        .attach("nope0")
        .expect_err("attach to a missing interface");
    assert!(
        matches!(err, LoadError::NoSuchInterface(ref i) if i == "nope0"),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "interface \"nope0\" does not exist in this network namespace"
    );
}

#[test]
fn a_full_map_is_reported_with_its_name_and_size() {
    let mut h = Harness::new(
        "full",
        &Capacities {
            services: 4,
            ..Capacities::default()
        },
    );
    let key = |port: u16| Frontend4Key::new(0, port.to_be(), 6, 0);
    for port in 0..4 {
        h.maps
            .put_service(key(port), Service4Value::default())
            .expect("fits");
    }
    let err = h
        .maps
        .put_service(key(99), Service4Value::default())
        .expect_err("fifth entry");
    assert!(
        matches!(err, DataplaneError::MapFull { capacity: 4, .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.starts_with("map LB4_SERVICES_V1 is full (4 entries): cannot insert"),
        "{msg}"
    );
    // Updating an existing entry of a full map still works.
    h.maps
        .put_service(
            key(1),
            Service4Value {
                count: 1,
                ..Default::default()
            },
        )
        .expect("update in place");
}

#[test]
fn agent_without_privileges_says_which_capabilities_it_needs() {
    lb_testkit::lab::require_root();
    let lab = Lab::new(LabConfig { pods: 0 });
    let dir = std::env::temp_dir().join(format!("lbt-{}-noprivs", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    let pins = PinDir::new("noprivs");
    let agent = workspace_bin("lb-agent");
    let out = lab
        .node
        .try_run(&[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
            agent.to_str().expect("path"),
            "run",
            "--node-name",
            "n",
            "--iface",
            "up0",
            "--bpffs",
            pins.path().to_str().expect("path"),
            "--manifests",
            dir.to_str().expect("path"),
            "--cgroup",
            "off",
        ])
        .expect("run setpriv");
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "an unprivileged agent must fail");
    assert!(
        stderr.contains("operation not permitted")
            && stderr.contains("CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON"),
        "{stderr}"
    );
}

#[test]
fn detach_removes_the_programs_and_the_pins() {
    let mut lab = Lab::new(LabConfig { pods: 1 });
    lab.wait_reachable();
    lab.start_pod_servers(&[80], &[], &[]);
    let pins = PinDir::new("detach");
    let dir = std::env::temp_dir().join(format!("lbt-{}-detach", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    let node_ip = lb_testkit::lab::NODE_IP;
    lb_testkit::agent::write_manifest(
        &dir,
        "all.yaml",
        &[
            lb_testkit::agent::node_yaml(lb_testkit::agent::NODE_NAME, node_ip),
            lb_testkit::agent::service_yaml(
                "web",
                "NodePort",
                Ipv4Addr::new(10, 96, 0, 1),
                false,
                &[lb_testkit::agent::SvcPort {
                    name: "http",
                    proto: "TCP",
                    port: 80,
                    target: 80,
                    node_port: Some(30001),
                }],
                &[lb_testkit::agent::Endpoint {
                    ip: lb_testkit::lab::pod_ip(0),
                    ready: true,
                    node: lb_testkit::agent::NODE_NAME,
                }],
            ),
        ],
    );
    let mut agent = lb_testkit::agent::start_agent(&lab, &pins, &dir);
    let np = SocketAddrV4::new(node_ip, 30001);
    let t = Duration::from_secs(2);
    assert_eq!(
        lab.client
            .enter(|| lb_testkit::lab::http_get(np, "/", t))
            .expect("via NodePort")
            .trim(),
        "pod0"
    );
    assert!(
        lab.node.ip(&["link", "show", "up0"]).contains("xdp"),
        "XDP attached"
    );
    assert_eq!(tcx_egress_programs(&lab), 1, "TC egress attached");
    agent.proc.kill();
    let bin = workspace_bin("lb-agent");
    lab.node.run(&[
        bin.to_str().expect("path"),
        "detach",
        "--bpffs",
        pins.path().to_str().expect("path"),
    ]);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!pins.path().exists(), "pins removed");
    assert!(
        !lab.node.ip(&["link", "show", "up0"]).contains("xdp"),
        "XDP detached"
    );
    assert_eq!(tcx_egress_programs(&lab), 0, "TC egress detached");
    // Nothing DNATs the NodePort any more: the node itself refuses the connection.
    let r = lab.client.enter(|| lb_testkit::lab::http_get(np, "/", t));
    assert!(r.is_err(), "NodePort must not answer after detach: {r:?}");
}

/// `detach` without `--iface` removes a whole pin directory, so it must refuse one that holds
/// anything but its own layout (`--bpffs /sys/fs/bpf` must not remove other programs' pins),
/// and remove nothing.
#[test]
fn detach_refuses_a_directory_that_is_not_its_pin_layout() {
    lb_testkit::lab::require_root();
    let pins = PinDir::new("foreign");
    let foreign = pins.path().join("tc").join("globals");
    std::fs::create_dir_all(&foreign).expect("mkdir on bpffs");
    std::fs::create_dir_all(pins.path().join("maps")).expect("mkdir on bpffs");
    let bin = workspace_bin("lb-agent");
    let out = std::process::Command::new(&bin)
        .args(["detach", "--bpffs"])
        .arg(pins.path())
        .output()
        .expect("run lb-agent detach");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "detach must fail: {stderr}");
    assert!(
        stderr.contains("does not hold lb-agent's pin layout") && stderr.contains("tc"),
        "{stderr}"
    );
    assert!(foreign.is_dir(), "the foreign pins were removed");
    assert!(pins.path().join("maps").is_dir(), "nothing may be removed");
}

/// Programs attached to the node uplink's TCX egress hook.
fn tcx_egress_programs(lab: &Lab) -> usize {
    use aya::programs::{SchedClassifier, TcAttachType};
    lab.node
        .enter(|| SchedClassifier::query_tcx("up0", TcAttachType::Egress))
        .map(|(_, progs)| progs.len())
        .expect("query tcx")
}

#[test]
fn reset_svc_stats_zeroes_every_cpu() {
    use lb_testkit::{
        harness::{FrontendSpec, Prog},
        packet::{Pkt, TCP_SYN},
    };
    let mut h = Harness::new("svcreset", &Capacities::default());
    let node = Ipv4Addr::new(10, 200, 0, 1);
    h.add_node_addr(node);
    h.add_frontend(&FrontendSpec::nodeport(
        30001,
        6,
        9,
        &[SocketAddrV4::new(Ipv4Addr::new(10, 244, 0, 10), 80)],
    ));
    let syn = Pkt::tcp(
        SocketAddrV4::new(Ipv4Addr::new(10, 200, 0, 2), 4000),
        SocketAddrV4::new(node, 30001),
        TCP_SYN,
    )
    .build();
    // One call per packet: with `repeat`, later runs would see the already-DNATed frame.
    for _ in 0..10 {
        h.run(Prog::Xdp, &syn);
    }
    let c = h.maps.svc_stats(9).expect("svc stats");
    assert_eq!((c.packets, c.bytes), (10, 10 * syn.len() as u64));
    h.maps.reset_svc_stats(9).expect("reset");
    let c = h.maps.svc_stats(9).expect("svc stats");
    assert_eq!((c.packets, c.bytes), (0, 0));
}

/// `--attach tc` lists only the veths `bpf_redirect_peer` can use: in the lab's node, its
/// uplink and the pods' veths (peers in other namespaces); a veth pair with both ends in
/// the node's namespace, and a bridge, are left out.
#[test]
fn peer_ifs_are_the_veths_whose_peer_is_in_another_namespace() {
    lb_testkit::lab::require_root();
    let lab = Lab::new(LabConfig { pods: 2 });
    lab.node.ip(&[
        "link", "add", "same0", "type", "veth", "peer", "name", "same1",
    ]);
    lab.node.ip(&["link", "add", "br-x", "type", "bridge"]);
    let index = |name: &str| {
        let c = std::ffi::CString::new(name).expect("name");
        // SAFETY: a valid NUL-terminated name.
        unsafe { libc::if_nametoindex(c.as_ptr()) }
    };
    let (got, want) = lab.node.enter(|| {
        let got = lb_agent::peer_ifs::veth_ifindexes().expect("netlink dump");
        let want: std::collections::BTreeSet<u32> =
            [lb_testkit::lab::NODE_UPLINK, "veth0", "veth1"]
                .iter()
                .map(|n| index(n))
                .collect();
        (got, want)
    });
    assert!(!want.contains(&0), "lab devices exist: {want:?}");
    assert_eq!(got, want);
}
