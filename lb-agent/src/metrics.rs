//! Prometheus text metrics: sync timing, map entries, failed updates, the datapath's
//! per-reason counters and per-frontend packet/byte counters (read live from the pins).
use std::{collections::BTreeMap, fmt::Write as _, net::SocketAddr, path::PathBuf, sync::Arc};

use anyhow::Context as _;
use lb_agent::{
    dataplane::{BpfDataplane, Dataplane as _},
    http::{self, Response},
    loader::PinLayout,
    model::{Frontend, FrontendId},
};
use std::sync::Mutex;

/// What the control thread records for the metrics endpoint.
#[derive(Default, Clone)]
pub struct Metrics {
    pub syncs: u64,
    pub sync_seconds_sum: f64,
    pub last_sync_seconds: f64,
    pub failed_updates: u64,
    pub puts: u64,
    pub deletes: u64,
    pub entries: Vec<(&'static str, usize)>,
    /// svc id and frontend (shared with the controller, for its owner) of every synced
    /// frontend.
    pub frontends: BTreeMap<FrontendId, (u32, Arc<Frontend>)>,
    pub problems: usize,
    /// Whether this node's own Node object was found in the last model.
    pub own_node_found: bool,
    /// Nodes known besides this one.
    pub peer_nodes: usize,
    /// Frontends programmed without per-frontend counters (no free svc id).
    pub uncounted: usize,
    /// healthCheckNodePorts served, and those that could not be bound.
    pub health_checks: usize,
    pub health_check_bind_failures: usize,
    /// The conntrack GC's figures, and the conntrack map's capacity.
    pub ct_gc: Arc<lb_agent::ct_gc::GcStats>,
    pub ct_capacity: u64,
}

/// Escape a Prometheus label value.
fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub fn render(m: &Metrics, dp: &BpfDataplane) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "# HELP lb_sync_duration_seconds Time to compute and apply the desired state."
    );
    let _ = writeln!(o, "# TYPE lb_sync_duration_seconds summary");
    let _ = writeln!(o, "lb_sync_duration_seconds_sum {}", m.sync_seconds_sum);
    let _ = writeln!(o, "lb_sync_duration_seconds_count {}", m.syncs);
    let _ = writeln!(o, "# TYPE lb_last_sync_duration_seconds gauge");
    let _ = writeln!(o, "lb_last_sync_duration_seconds {}", m.last_sync_seconds);
    let _ = writeln!(
        o,
        "# HELP lb_sync_failed_updates_total Map updates that failed (retried with backoff)."
    );
    let _ = writeln!(o, "# TYPE lb_sync_failed_updates_total counter");
    let _ = writeln!(o, "lb_sync_failed_updates_total {}", m.failed_updates);
    let _ = writeln!(o, "# TYPE lb_sync_map_writes_total counter");
    let _ = writeln!(o, "lb_sync_map_writes_total{{op=\"put\"}} {}", m.puts);
    let _ = writeln!(o, "lb_sync_map_writes_total{{op=\"delete\"}} {}", m.deletes);
    let _ = writeln!(o, "# TYPE lb_model_problems gauge");
    let _ = writeln!(o, "lb_model_problems {}", m.problems);
    let _ = writeln!(
        o,
        "# HELP lb_node_found 1 when this node's own Node object is known (else NodePorts answer only on --node-addr addresses)"
    );
    let _ = writeln!(o, "# TYPE lb_node_found gauge");
    let _ = writeln!(o, "lb_node_found {}", u8::from(m.own_node_found));
    let _ = writeln!(o, "# HELP lb_peer_nodes Other Nodes known to this agent");
    let _ = writeln!(o, "# TYPE lb_peer_nodes gauge");
    let _ = writeln!(o, "lb_peer_nodes {}", m.peer_nodes);
    let _ = writeln!(
        o,
        "# HELP lb_frontends_uncounted Frontends programmed without per-frontend counters (--frontends-size is too small)"
    );
    let _ = writeln!(o, "# TYPE lb_frontends_uncounted gauge");
    let _ = writeln!(o, "lb_frontends_uncounted {}", m.uncounted);
    let _ = writeln!(
        o,
        "# HELP lb_health_check_node_ports healthCheckNodePorts served (externalTrafficPolicy Local)"
    );
    let _ = writeln!(o, "# TYPE lb_health_check_node_ports gauge");
    let _ = writeln!(o, "lb_health_check_node_ports {}", m.health_checks);
    let _ = writeln!(
        o,
        "# HELP lb_health_check_bind_failures healthCheckNodePorts that could not be bound"
    );
    let _ = writeln!(o, "# TYPE lb_health_check_bind_failures gauge");
    let _ = writeln!(
        o,
        "lb_health_check_bind_failures {}",
        m.health_check_bind_failures
    );
    let _ = writeln!(o, "# HELP lb_map_entries Entries per BPF map.");
    let _ = writeln!(o, "# TYPE lb_map_entries gauge");
    for (map, n) in &m.entries {
        let _ = writeln!(o, "lb_map_entries{{map=\"{map}\"}} {n}");
    }
    render_conntrack(&mut o, m, dp);
    render_latency(&mut o, dp);
    if let Ok(stats) = dp.stats() {
        let _ = writeln!(
            o,
            "# HELP lb_datapath_packets_total Datapath verdicts by reason."
        );
        let _ = writeln!(o, "# TYPE lb_datapath_packets_total counter");
        for (r, c) in &stats {
            let _ = writeln!(
                o,
                "lb_datapath_packets_total{{reason=\"{}\"}} {}",
                r.name(),
                c.packets
            );
        }
        let _ = writeln!(o, "# TYPE lb_datapath_bytes_total counter");
        for (r, c) in &stats {
            let _ = writeln!(
                o,
                "lb_datapath_bytes_total{{reason=\"{}\"}} {}",
                r.name(),
                c.bytes
            );
        }
    }
    let _ = writeln!(
        o,
        "# HELP lb_service_packets_total Packets through a frontend (both directions)."
    );
    let _ = writeln!(o, "# TYPE lb_service_packets_total counter");
    let mut bytes = String::new();
    for (fe, (sid, desired)) in &m.frontends {
        let owner = desired.owner.as_str();
        if let Ok(c) = dp.svc_stats(*sid) {
            let labels = format!(
                "frontend=\"{}\",service=\"{}\"",
                esc(&fe.to_string()),
                esc(owner)
            );
            let _ = writeln!(o, "lb_service_packets_total{{{labels}}} {}", c.packets);
            let _ = writeln!(bytes, "lb_service_bytes_total{{{labels}}} {}", c.bytes);
        }
    }
    let _ = writeln!(o, "# TYPE lb_service_bytes_total counter");
    o.push_str(&bytes);
    o
}

/// The timed programs' run time as a Prometheus histogram (`--latency-histogram`), per
/// program: cumulative log2 buckets, `le` the bucket's upper bound in ns. `_sum` is
/// estimated from the buckets' midpoints (the datapath keeps counts only).
fn render_latency(o: &mut String, dp: &BpfDataplane) {
    let Some(l) = dp.latency() else {
        return;
    };
    let _ = writeln!(
        o,
        "# HELP lb_datapath_run_duration_ns Run time of the datapath programs (--latency-histogram), log2 buckets."
    );
    let _ = writeln!(o, "# TYPE lb_datapath_run_duration_ns histogram");
    for (prog, buckets) in [("xdp", &l.xdp), ("tc", &l.tc)] {
        let last = buckets.iter().rposition(|n| *n > 0).unwrap_or(0);
        let (mut cum, mut sum) = (0u64, 0f64);
        for (k, n) in buckets.iter().enumerate().take(last.max(12) + 1) {
            cum += n;
            let hi = lb_agent::dataplane::Latency::upper_ns(k);
            let lo = if k == 0 { 0 } else { 1u64 << (k - 1) };
            sum += *n as f64 * (lo as f64 + hi as f64) / 2.0;
            let _ = writeln!(
                o,
                "lb_datapath_run_duration_ns_bucket{{prog=\"{prog}\",le=\"{hi}\"}} {cum}"
            );
        }
        let total: u64 = buckets.iter().sum();
        let _ = writeln!(
            o,
            "lb_datapath_run_duration_ns_bucket{{prog=\"{prog}\",le=\"+Inf\"}} {total}"
        );
        let _ = writeln!(
            o,
            "lb_datapath_run_duration_ns_sum{{prog=\"{prog}\"}} {sum}"
        );
        let _ = writeln!(
            o,
            "lb_datapath_run_duration_ns_count{{prog=\"{prog}\"}} {total}"
        );
    }
}

/// Conntrack occupancy and lifecycle: entries now (counted by the GC's last walk), the
/// capacity, what the GC expired, and LRU evictions estimated from the datapath's event
/// counters (entries created and restored, minus those expired or removed, minus those
/// present).
fn render_conntrack(o: &mut String, m: &Metrics, dp: &BpfDataplane) {
    use lb_common::Reason;
    use std::sync::atomic::Ordering::Relaxed;
    let g = &m.ct_gc;
    let entries = g.entries.load(Relaxed);
    let _ = writeln!(o, "# HELP lb_conntrack_entries Conntrack entries at the last GC walk (two per flow, one per SNATed flow).");
    let _ = writeln!(o, "# TYPE lb_conntrack_entries gauge");
    let _ = writeln!(o, "lb_conntrack_entries {entries}");
    let _ = writeln!(o, "# TYPE lb_conntrack_capacity gauge");
    let _ = writeln!(o, "lb_conntrack_capacity {}", m.ct_capacity);
    let _ = writeln!(
        o,
        "# HELP lb_conntrack_gc_expired_total Idle conntrack entries the GC deleted."
    );
    let _ = writeln!(o, "# TYPE lb_conntrack_gc_expired_total counter");
    let _ = writeln!(
        o,
        "lb_conntrack_gc_expired_total {}",
        g.expired.load(Relaxed)
    );
    let _ = writeln!(o, "# TYPE lb_conntrack_gc_runs_total counter");
    let _ = writeln!(o, "lb_conntrack_gc_runs_total {}", g.runs.load(Relaxed));
    let _ = writeln!(o, "# TYPE lb_conntrack_gc_failures_total counter");
    let _ = writeln!(
        o,
        "lb_conntrack_gc_failures_total {}",
        g.failures.load(Relaxed)
    );
    if let Ok(stats) = dp.stats() {
        let n = |r: Reason| {
            stats
                .iter()
                .find(|(x, _)| *x == r)
                .map_or(0, |(_, c)| c.packets)
        };
        let inserted = n(Reason::CtCreated) + n(Reason::CtRestored);
        let removed = n(Reason::CtExpired) + n(Reason::CtRemoved) + g.expired.load(Relaxed);
        let evicted = inserted.saturating_sub(removed + entries);
        let _ = writeln!(o, "# HELP lb_conntrack_evicted_estimate Conntrack entries the LRU evicted (estimate; exact only at a GC walk).");
        let _ = writeln!(o, "# TYPE lb_conntrack_evicted_estimate gauge");
        let _ = writeln!(o, "lb_conntrack_evicted_estimate {evicted}");
    }
}

/// Serve `GET /metrics` on `addr` (plain HTTP/1.1, one response per connection). The map
/// reads of a scrape (one per frontend) run on the blocking pool, from a copy of the
/// metrics taken under the lock.
pub async fn serve(addr: SocketAddr, bpffs: PathBuf, m: Arc<Mutex<Metrics>>) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics address {addr}"))?;
    // One set of map fds for every scrape; the agent pinned these maps before serving.
    let dp = Arc::new(BpfDataplane::open(&PinLayout::new(bpffs))?);
    let handler: http::Handler = Arc::new(move |path| {
        let (m, dp) = (m.clone(), dp.clone());
        Box::pin(async move {
            if path == "/metrics" {
                let copy = m.lock().map(|m| m.clone()).unwrap_or_default();
                match tokio::task::spawn_blocking(move || render(&copy, &dp)).await {
                    Ok(body) => Response::new(200, "text/plain; version=0.0.4", body),
                    Err(e) => Response::new(500, "text/plain", format!("rendering: {e}\n")),
                }
            } else {
                Response::new(404, "text/plain", "try /metrics\n".into())
            }
        })
    });
    // Runs for the agent's lifetime.
    drop(http::serve(listener, handler));
    Ok(())
}
