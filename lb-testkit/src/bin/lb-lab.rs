//! `lb-lab` (run by `cargo xtask run`): wires a client, a node and pods in network
//! namespaces, writes sample manifests, starts `lb-agent run --manifests` in the node, sends
//! requests through every frontend and prints who answered. Then it keeps the lab up
//! (re-probing every few seconds) until Ctrl-C; `--once` checks and tears down.
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
        node_yaml, pod_yaml, service_yaml, start_agent, workspace_bin, write_manifest, Endpoint,
        ManifestDir, SvcPort, NODE_NAME,
    },
    bpffs::PinDir,
    lab::{http_get, pod_ip, udp_request, Lab, LabConfig, NODE_IP},
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
const HOSTNET_PORT: u16 = 9100;

/// One probe: a frontend, what kind it is, and which answers are right.
struct Probe {
    frontend: SocketAddrV4,
    udp: bool,
    kind: &'static str,
    expect: &'static [&'static str],
}

fn probes() -> Vec<Probe> {
    let np = |port| SocketAddrV4::new(NODE_IP, port);
    let p = |frontend, udp, kind, expect| Probe {
        frontend,
        udp,
        kind,
        expect,
    };
    // Four requests to the same NodePort, to show new connections spreading over both pods.
    let mut v: Vec<Probe> = (0..4)
        .map(|_| {
            p(
                np(30001),
                false,
                "NodePort web (Cluster)",
                &["pod0", "pod1"],
            )
        })
        .collect();
    v.extend([
        p(np(30053), true, "NodePort web dns/UDP", &["pod0", "pod1"]),
        p(np(30002), false, "NodePort local-web (Local)", &["pod2"]),
        p(np(8000), false, "hostPort 8000 -> pod0:80", &["pod0"]),
        p(np(44300), false, "hostPort 44300 -> pod0:443", &["pod0"]),
        p(
            np(HOSTNET_PORT),
            false,
            "hostNetwork pod (no DNAT)",
            &["hostnet-pod"],
        ),
    ]);
    v
}

/// The sample objects: what a small cluster would hold for this node.
fn write_samples(dir: &Path) {
    let http = |np| SvcPort {
        name: "http",
        proto: "TCP",
        port: 80,
        target: 80,
        node_port: Some(np),
    };
    let ep = |i, node| Endpoint {
        ip: pod_ip(i),
        ready: true,
        node,
    };
    write_manifest(dir, "node.yaml", &[node_yaml(NODE_NAME, NODE_IP)]);
    write_manifest(
        dir,
        "web.yaml",
        &[service_yaml(
            "web",
            "NodePort",
            Ipv4Addr::new(10, 96, 0, 10),
            false,
            &[
                http(30001),
                SvcPort {
                    name: "dns",
                    proto: "UDP",
                    port: 53,
                    target: 53,
                    node_port: Some(30053),
                },
            ],
            &[ep(0, NODE_NAME), ep(1, NODE_NAME)],
        )],
    );
    // externalTrafficPolicy: Local with one endpoint here and one on another node: only the
    // local one may answer on this node's NodePort.
    let remote = Endpoint {
        ip: Ipv4Addr::new(10, 244, 1, 7),
        ready: true,
        node: "node-b",
    };
    write_manifest(
        dir,
        "local-web.yaml",
        &[service_yaml(
            "local-web",
            "NodePort",
            Ipv4Addr::new(10, 96, 0, 11),
            true,
            &[http(30002)],
            &[ep(2, NODE_NAME), remote],
        )],
    );
    write_manifest(
        dir,
        "pods.yaml",
        &[
            pod_yaml(
                "pod0",
                pod_ip(0),
                NODE_NAME,
                false,
                &[(80, 8000, "TCP"), (443, 44300, "TCP")],
            ),
            // hostNetwork wins over hostPort: its port is the node's own, no DNAT.
            pod_yaml(
                "hostnet-pod",
                NODE_IP,
                NODE_NAME,
                true,
                &[(HOSTNET_PORT, HOSTNET_PORT, "TCP")],
            ),
        ],
    );
}

fn probe(lab: &Lab, p: &Probe) -> (String, Duration, bool) {
    let to = p.frontend;
    let udp = p.udp;
    let start = Instant::now();
    let r = lab.client.enter(move || {
        if udp {
            udp_request(to, b"hello", T).map(|b| {
                String::from_utf8_lossy(&b)
                    .split(':')
                    .next()
                    .unwrap_or_default()
                    .to_string()
            })
        } else {
            http_get(to, "/", T).map(|b| b.trim().to_string())
        }
    });
    let took = start.elapsed();
    match r {
        Ok(who) => {
            let ok = p.expect.contains(&who.as_str());
            (who, took, ok)
        }
        Err(e) => (format!("error: {e}"), took, false),
    }
}

fn table(lab: &Lab) -> bool {
    let rows: Vec<(String, String, String, String, bool)> = probes()
        .iter()
        .map(|p| {
            let (who, took, ok) = probe(lab, p);
            let proto = if p.udp { "UDP" } else { "TCP" };
            (
                format!("{}/{proto}", p.frontend),
                p.kind.to_string(),
                who,
                format!("{:.0} µs", took.as_secs_f64() * 1e6),
                ok,
            )
        })
        .collect();
    let w = |f: fn(&(String, String, String, String, bool)) -> usize, h: &str| {
        rows.iter().map(f).max().unwrap_or(0).max(h.len())
    };
    let (w0, w1, w2) = (
        w(|r| r.0.len(), "FRONTEND"),
        w(|r| r.1.len(), "KIND"),
        w(|r| r.2.len(), "ANSWERED BY"),
    );
    println!(
        "\n{:<w0$}   {:<w1$}   {:<w2$}   {:>9}   CHECK",
        "FRONTEND", "KIND", "ANSWERED BY", "LATENCY"
    );
    for r in &rows {
        println!(
            "{:<w0$}   {:<w1$}   {:<w2$}   {:>9}   {}",
            r.0,
            r.1,
            r.2,
            r.3,
            if r.4 { "ok" } else { "WRONG" }
        );
    }
    rows.iter().all(|r| r.4)
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
        total: 4,
    };
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst))
            .context("installing the Ctrl-C handler")?;
    }
    // Everything below is owned by guards: dropping them (on return, error or Ctrl-C) kills
    // the processes, detaches the datapath, deletes the namespaces and the files.
    let mut lab_slot = None;
    p.step("create the netns lab (client, node, 3 pods)", || {
        let mut lab = Lab::new(LabConfig { pods: 3 });
        lab.wait_reachable();
        lab.start_pod_servers(&[80, 443], &[53], &[]);
        let bin = lb_testkit::lab::podserver_bin();
        let hostnet = lab.node.spawn(&[
            &bin.to_string_lossy(),
            "--name",
            "hostnet-pod",
            "--http",
            &HOSTNET_PORT.to_string(),
        ]);
        hostnet.wait_for_log("ready", Duration::from_secs(5))?;
        lab.adopt("hostnet-pod", hostnet);
        let prefix = lab.prefix().to_string();
        lab_slot = Some(lab);
        Ok(format!("namespaces {prefix}*"))
    })?;
    let lab = lab_slot.context("lab")?;
    let manifests = ManifestDir::new("lab");
    p.step("write sample manifests", || {
        write_samples(manifests.path());
        Ok(manifests.path().display().to_string())
    })?;
    let pins = PinDir::new("lab");
    let mut agent_slot = None;
    p.step(
        "start lb-agent run --manifests in the node namespace",
        || {
            agent_slot = Some(start_agent(&lab, &pins, manifests.path()));
            Ok(format!("pins {}", pins.path().display()))
        },
    )?;
    let agent = agent_slot.context("agent")?;
    let mut all_ok = true;
    p.step("send requests through every frontend", || {
        all_ok = table(&lab);
        Ok(String::new())
    })?;
    let status = workspace_bin("lb-agent");
    println!("\n$ lb-agent status   (in the node namespace)");
    print!(
        "{}",
        lab.node.run(&[
            &status.to_string_lossy(),
            "status",
            "--bpffs",
            &pins.path().to_string_lossy()
        ])
    );
    if once {
        drop(agent);
        return Ok(if all_ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    println!(
        "\nThe lab is up. Edit the manifests in {dir} — e.g. remove pod1's endpoint from web.yaml —\n\
         and watch the answers change below (the agent re-reads within 1 s).\n\
         Look inside: ip netns exec {node} {agent} status --bpffs {pins}\n\
         Ctrl-C tears everything down.",
        dir = manifests.path().display(),
        node = lab.node.name(),
        agent = status.display(),
        pins = pins.path().display(),
    );
    while !stop.load(Ordering::SeqCst) {
        let start = Instant::now();
        let mut answers = Vec::new();
        for _ in 0..6 {
            answers.push(probe(&lab, &probes()[0]).0);
        }
        println!("web NodePort 30001 answered by: {}", answers.join(" "));
        while start.elapsed() < Duration::from_secs(3) && !stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    println!("\ntearing down the lab");
    drop(agent);
    Ok(ExitCode::SUCCESS)
}
