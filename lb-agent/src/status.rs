//! `lb-agent status`: what the pinned maps hold, as kubectl-style tables or JSON.
use std::{collections::BTreeMap, net::Ipv4Addr, path::Path};

use anyhow::Context as _;
use lb_agent::{
    dataplane::{BpfDataplane, Dataplane as _},
    loader::{attached_hooks, PinLayout},
};
use lb_common::{
    service::{backend_flags, flags, scope},
    Backend4, Frontend4Key, Service4Value, IPPROTO_TCP, IPPROTO_UDP,
};
use serde_json::json;

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
}

fn ip(be: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from_be(be))
}

fn proto(p: u8) -> &'static str {
    match p {
        IPPROTO_TCP => "TCP",
        IPPROTO_UDP => "UDP",
        _ => "?",
    }
}

fn frontend_name(k: &Frontend4Key) -> String {
    let addr = if k.addr == 0 {
        "*".to_string()
    } else {
        ip(k.addr).to_string()
    };
    let scope = if k.scope == scope::INTERNAL {
        " (in-cluster)"
    } else {
        ""
    };
    format!("{addr}:{}/{}{scope}", u16::from_be(k.port), proto(k.proto))
}

/// The kind, with `ClientIP affinity <timeout>s` when the frontend has session affinity.
fn kind_with_affinity(v: &Service4Value) -> String {
    let k = kind(v.flags);
    if v.affinity_timeout_s == 0 {
        k
    } else {
        format!("{k}, ClientIP affinity {}s", v.affinity_timeout_s)
    }
}

fn kind(f: u16) -> String {
    let mut v = Vec::new();
    for (bit, name) in [
        (flags::NODEPORT, "NodePort"),
        (flags::HOSTPORT, "HostPort"),
        (flags::CLUSTERIP, "ClusterIP"),
        (flags::LOADBALANCER, "LoadBalancer"),
        (flags::EXTERNAL_IP, "ExternalIP"),
    ] {
        if f & bit != 0 {
            v.push(name);
        }
    }
    let mut s = v.join("+");
    if f & flags::EXT_LOCAL != 0 {
        s.push_str(" (Local)");
    }
    s
}

fn backend_name(b: &Backend4) -> String {
    let mut s = format!("{}:{}", ip(b.addr), u16::from_be(b.port));
    if b.flags & backend_flags::REMOTE != 0 {
        s.push_str("(remote)");
    }
    if b.flags & backend_flags::TERMINATING != 0 {
        s.push_str("(terminating)");
    }
    s
}

/// Where the socket hooks pinned under `bpffs` are attached: the cgroup's path under the
/// cgroup v2 mount (found by its id, the directory's inode), or its id alone.
fn socket_hooks(bpffs: &Path) -> Option<String> {
    let id = lb_agent::loader::attached_cgroup_id(bpffs)?;
    let root = std::fs::read_to_string("/proc/mounts")
        .ok()
        .and_then(|m| lb_agent::loader::cgroup2_mount(&m));
    let path = root.and_then(|r| find_cgroup(&r, id));
    Some(match path {
        Some(p) => format!("{} (cgroup id {id})", p.display()),
        None => format!("cgroup id {id}"),
    })
}

/// The directory under `root` (at most 4 levels deep, 20,000 directories) whose inode is
/// `id`.
fn find_cgroup(root: &Path, id: u64) -> Option<std::path::PathBuf> {
    use std::os::unix::fs::MetadataExt as _;
    let mut queue = std::collections::VecDeque::from([(root.to_path_buf(), 0)]);
    let mut seen = 0;
    while let Some((dir, depth)) = queue.pop_front() {
        seen += 1;
        if seen > 20_000 {
            return None;
        }
        if std::fs::metadata(&dir).is_ok_and(|m| m.ino() == id) {
            return Some(dir);
        }
        if depth < 4 {
            for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    queue.push_back((e.path(), depth + 1));
                }
            }
        }
    }
    None
}

/// The run-time histogram (`--latency-histogram`): per program the runs, p50 and p99 (as
/// bucket upper bounds), then the non-empty buckets side by side.
fn print_latency(l: &lb_agent::dataplane::Latency) {
    use lb_agent::dataplane::Latency;
    let q = |b: &[u64], q: f64| {
        Latency::quantile_ns(b, q).map_or("-".to_string(), |v| format!("<= {v} ns"))
    };
    println!("DATAPATH RUN TIME (--latency-histogram; log2 buckets)");
    table(
        &["PROGRAM", "RUNS", "P50", "P99"],
        &[
            vec![
                "ingress (xdp or tc)".into(),
                l.xdp.iter().sum::<u64>().to_string(),
                q(&l.xdp, 0.5),
                q(&l.xdp, 0.99),
            ],
            vec![
                "tc egress".into(),
                l.tc.iter().sum::<u64>().to_string(),
                q(&l.tc, 0.5),
                q(&l.tc, 0.99),
            ],
        ],
    );
    let rows: Vec<Vec<String>> = (0..l.xdp.len())
        .filter(|k| l.xdp[*k] + l.tc[*k] > 0)
        .map(|k| {
            let lo = if k == 0 { 0 } else { 1u64 << (k - 1) };
            vec![
                format!("{lo}-{} ns", Latency::upper_ns(k)),
                l.xdp[k].to_string(),
                l.tc[k].to_string(),
            ]
        })
        .collect();
    println!();
    table(&["BUCKET", "INGRESS", "TC EGRESS"], &rows);
}

/// Print rows as aligned columns (like `kubectl get`).
fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = w[i]))
            .collect();
        println!("{}", s.join("   ").trim_end());
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}

pub fn print(bpffs: &Path, format: Format) -> anyhow::Result<()> {
    let pins = PinLayout::new(bpffs);
    let dp = BpfDataplane::open(&pins).with_context(|| {
        format!(
            "no datapath pinned under {} (is the agent running?)",
            bpffs.display()
        )
    })?;
    let services = dp.services()?;
    let backends: BTreeMap<u32, Backend4> = dp.backends()?.into_iter().collect();
    let slots: BTreeMap<Frontend4Key, Service4Value> = services.iter().copied().collect();
    let masters: Vec<(Frontend4Key, Service4Value)> = services
        .iter()
        .filter(|(k, _)| k.slot == 0)
        .copied()
        .collect();
    let mut fe_rows = Vec::new();
    let mut fe_json = Vec::new();
    for (k, v) in &masters {
        let bs: Vec<String> = (1..=v.count)
            .map(|s| {
                slots
                    .get(&k.with_slot(s))
                    .and_then(|sv| backends.get(&sv.backend_id))
                    .map_or_else(|| "<missing>".to_string(), backend_name)
            })
            .collect();
        let c = dp.svc_stats(v.svc_id).unwrap_or_default();
        fe_rows.push(vec![
            frontend_name(k),
            kind_with_affinity(v),
            if v.svc_id == lb_common::service::NO_SVC_ID {
                "- (no counters)".to_string()
            } else {
                v.svc_id.to_string()
            },
            if bs.is_empty() {
                "<none: drop>".to_string()
            } else {
                bs.join(",")
            },
            c.packets.to_string(),
            c.bytes.to_string(),
        ]);
        fe_json.push(json!({
            "frontend": frontend_name(k), "kind": kind(v.flags), "affinity_timeout_s": v.affinity_timeout_s, "svc_id": v.svc_id,
            "backends": bs, "packets": c.packets, "bytes": c.bytes,
        }));
    }
    fe_rows.sort();
    let node_addrs = dp.node_addrs()?;
    let stats = dp.stats()?;
    let ct = dp.conntrack()?.len();
    let ct_cap = dp.capacities().ct;
    let ct_pct = 100.0 * ct as f64 / f64::from(ct_cap.max(1));
    let hooked = attached_hooks(bpffs);
    let ifaces: Vec<&str> = hooked.iter().map(|(i, _)| i.as_str()).collect();
    let hooks = socket_hooks(bpffs);
    let latency = dp.latency();
    match format {
        Format::Json => {
            let out = json!({
                "interfaces": ifaces,
                "ingress_hooks": hooked.iter().cloned().collect::<BTreeMap<String, String>>(),
                "socket_hooks": hooks,
                "node_addrs": node_addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                "frontends": fe_json,
                "backends": backends.iter().map(|(id, b)| json!({"id": id, "backend": backend_name(b), "proto": proto(b.proto)})).collect::<Vec<_>>(),
                "counters": stats.iter().map(|(r, c)| json!({"reason": r.name(), "packets": c.packets, "bytes": c.bytes})).collect::<Vec<_>>(),
                "conntrack_entries": ct,
                "conntrack_capacity": ct_cap,
                "latency_ns_log2_buckets": latency.as_ref().map(|l| json!({"xdp": l.xdp, "tc": l.tc})),
            });
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        Format::Table => {
            println!(
                "INTERFACES: {}   NODE ADDRESSES: {}   CONNTRACK ENTRIES: {ct} / {ct_cap} ({ct_pct:.1}%)\n",
                if hooked.is_empty() {
                    "<none>".to_string()
                } else {
                    hooked
                        .iter()
                        .map(|(i, h)| format!("{i} ({h})"))
                        .collect::<Vec<_>>()
                        .join(",")
                },
                if node_addrs.is_empty() {
                    "<none>".to_string()
                } else {
                    node_addrs
                        .iter()
                        .map(|a| a.to_string())
                        .collect::<Vec<_>>()
                        .join(",")
                }
            );
            println!("SOCKET HOOKS: {}\n", hooks.as_deref().unwrap_or("off"));
            if node_addrs.is_empty() {
                println!(
                    "warning: no node addresses: NodePorts and wildcard hostPorts answer nowhere. \
                     Is this node's own Node object missing (--node-name must match it; see \
                     lb_node_found in /metrics and the agent's log), or add --node-addr.\n"
                );
            }
            table(
                &["FRONTEND", "KIND", "SVC-ID", "BACKENDS", "PACKETS", "BYTES"],
                &fe_rows,
            );
            println!();
            let b_rows: Vec<Vec<String>> = backends
                .iter()
                .map(|(id, b)| vec![id.to_string(), backend_name(b), proto(b.proto).to_string()])
                .collect();
            table(&["BACKEND-ID", "ADDRESS", "PROTO"], &b_rows);
            println!();
            let c_rows: Vec<Vec<String>> = stats
                .iter()
                .map(|(r, c)| {
                    let verdict = if r.is_event() {
                        "event"
                    } else if r.is_drop() {
                        "drop"
                    } else {
                        "pass"
                    };
                    vec![
                        r.name().to_string(),
                        verdict.to_string(),
                        c.packets.to_string(),
                        c.bytes.to_string(),
                    ]
                })
                .collect();
            table(&["REASON", "VERDICT", "PACKETS", "BYTES"], &c_rows);
            if let Some(l) = latency
                .as_ref()
                .filter(|l| l.xdp.iter().chain(&l.tc).any(|n| *n > 0))
            {
                println!();
                print_latency(l);
            }
        }
    }
    Ok(())
}
