//! The demo `cargo xtask run` starts (`lb-lab --once`, needs root): the multi-node lab with
//! one agent per node must come up, answer through every frontend on every node as its table
//! says, print its `status` output and an `nsenter` hint (not `ip netns exec`), and tear
//! everything down. (`--once` tears down before the hint could be run; it was run by hand
//! against a lab left up.)
use std::process::Command;

use lb_testkit::lab::{list_namespaces, CLIENT_IP};

#[test]
fn lb_lab_once_answers_on_every_node_and_cleans_up() {
    lb_testkit::lab::require_root();
    let before = list_namespaces();
    let out = Command::new(env!("CARGO_BIN_EXE_lb-lab"))
        .arg("--once")
        .output()
        .expect("run lb-lab --once");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "lb-lab --once failed:\n{stdout}\n{stderr}"
    );
    assert!(!stdout.contains("WRONG"), "{stdout}");
    for header in ["NODE ASKED", "ANSWERED BY", "CLIENT SEEN"] {
        assert!(stdout.contains(header), "{header} missing:\n{stdout}");
    }
    // Every node was asked, pods on other nodes answered (seeing that node's address), and
    // the client's own address was seen on the local paths.
    for node in [
        "node0 10.200.0.10",
        "node1 10.200.0.11",
        "node2 10.200.0.12",
    ] {
        assert!(stdout.contains(node), "{node} never asked:\n{stdout}");
    }
    assert!(stdout.contains(&CLIENT_IP.to_string()), "{stdout}");
    assert!(
        stdout.contains("(no answer)"),
        "Local policy row:\n{stdout}"
    );
    assert!(stdout.contains("503"), "health check row:\n{stdout}");
    // The hint is an nsenter command (not `ip netns exec`, which hides the pins).
    let hint = stdout
        .lines()
        .find_map(|l| l.strip_prefix("$ nsenter --net="))
        .unwrap_or_else(|| panic!("no nsenter status hint:\n{stdout}"));
    assert!(hint.contains(" status --bpffs /sys/fs/bpf/"), "{hint}");
    assert!(!stdout.contains("ip netns exec"), "{stdout}");
    assert!(
        stdout.contains("NODE ADDRESSES: 10.200.0.10"),
        "status output:\n{stdout}"
    );
    let after = list_namespaces();
    let leaked: Vec<_> = after.iter().filter(|n| !before.contains(n)).collect();
    assert!(leaked.is_empty(), "namespaces left behind: {leaked:?}");
}
