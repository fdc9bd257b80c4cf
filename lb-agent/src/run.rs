//! The agent's main loop: load and attach the datapath, then recompute the desired state
//! whenever the source changes and apply the difference, retrying failures with backoff.
use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;
use lb_agent::health::{HealthServers, NodeHealth};
use lb_agent::{
    loader::{Capacities, Datapath},
    model::{self, ModelConfig, Objects},
    source,
    sync::{Limits, Syncer},
};
use tokio::sync::Mutex;

use crate::{metrics::Metrics, RunArgs};

/// How often the manifests directory is checked for changes (edits show within 1 s).
const MANIFEST_POLL: Duration = Duration::from_millis(250);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    check_snat_ports(&args.snat_ports, &args.nodeport_range)?;
    let caps = Capacities {
        services: args.services_size,
        backends: args.backends_size,
        ct: args.ct_size,
        svc_stats: args.frontends_size,
    };
    let mut datapath = Datapath::load(&args.bpffs, &caps)?;
    // The socket policy first: the hooks must know the node's namespace before they run.
    lb_agent::loader::set_socket_policy(datapath.pins(), args.localhost_nodeports)?;
    for iface in &args.iface {
        let mode = datapath
            .attach_with(iface, args.latency_histogram)
            .with_context(|| format!("attaching to {iface}"))?;
        log::info!(
            "attached to {iface} ({mode:?}{})",
            if args.latency_histogram {
                ", with the latency histogram"
            } else {
                ""
            }
        );
        accept_local(iface);
    }
    match socket_cgroup(args.cgroup.as_deref())? {
        Some(cg) => {
            let updated = datapath
                .attach_cgroup(&cg)
                .with_context(|| format!("attaching the socket hooks to {}", cg.display()))?;
            log::info!(
                "socket hooks on cgroup {} ({}; NodePorts on 127.0.0.1: {})",
                cg.display(),
                if updated > 0 {
                    "pinned links updated in place"
                } else {
                    "attached"
                },
                if args.localhost_nodeports {
                    "on"
                } else {
                    "off"
                }
            );
        }
        None => {
            lb_agent::loader::detach_cgroup(&args.bpffs)?;
            log::info!("socket hooks off (--cgroup off)");
        }
    }
    datapath.remove_legacy_pins()?;
    let ct_cfg = lb_agent::loader::set_ct_policy(
        datapath.pins(),
        &lb_agent::loader::CtPolicy {
            tcp_syn_s: args.ct_timeout_tcp_syn,
            tcp_s: args.ct_timeout_tcp,
            tcp_fin_s: args.ct_timeout_tcp_fin,
            udp_s: args.ct_timeout_udp,
            reject_per_s: args.reject_rate,
        },
    )?;
    let gc_stats = Arc::new(lb_agent::ct_gc::GcStats::default());
    if args.ct_gc_interval > 0 {
        lb_agent::ct_gc::spawn(
            datapath.pins().clone(),
            ct_cfg,
            Duration::from_secs(u64::from(args.ct_gc_interval)),
            gc_stats.clone(),
        );
    }
    let mut dp = datapath.dataplane()?;
    let mut port_filter = match lb_agent::ports::PortFilter::open(datapath.pins()) {
        Ok(f) => Some(f),
        Err(e) => {
            log::warn!("port filter unavailable ({e}); every packet goes through the lookups");
            None
        }
    };
    let caps = dp.capacities();
    let mut syncer = Syncer::new(Limits {
        svc_ids: caps.svc_stats,
        ..Limits::default()
    });
    syncer
        .adopt(&dp)
        .context("reading the entries an earlier agent left in the pinned maps")?;

    let metrics = Arc::new(Mutex::new(Metrics {
        ct_gc: gc_stats,
        ct_capacity: u64::from(caps.ct),
        ..Metrics::default()
    }));
    if let Some(addr) = args.metrics_addr {
        crate::metrics::serve(addr, args.bpffs.clone(), metrics.clone()).await?;
        log::info!("metrics on http://{addr}/metrics");
    }
    let node_health = Arc::new(std::sync::RwLock::new(NodeHealth::default()));
    if let Some(addr) = args.healthz_addr.0 {
        lb_agent::health::serve_node_health(addr, node_health.clone())
            .await
            .with_context(|| format!("binding the --healthz-addr {addr}"))?;
        log::info!("node health on http://{addr}/healthz and /livez");
    }
    let mut health_servers = HealthServers::default();
    let cfg = ModelConfig {
        node_name: args.node_name.clone(),
        nodeport_range: args.nodeport_range.clone(),
        extra_node_addrs: args.node_addr.clone(),
    };
    let mut objects_rx = start_source(&args).await?;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    // Registered once, up front: a SIGINT that arrives while a sync runs is kept for the next
    // select (a `ctrl_c()` future made afresh each turn would miss it).
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .context("installing the SIGINT handler")?;
    let mut backoff = BACKOFF_MIN;
    let mut retry_at: Option<tokio::time::Instant> = None;
    let mut last: Option<Arc<Objects>> = None;
    let mut last_node_warning: Option<String> = None;
    let mut snat_addr: Option<Option<std::net::Ipv4Addr>> = None;
    loop {
        let retry = async {
            match retry_at {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            changed = objects_rx.changed() => {
                if changed.is_err() {
                    anyhow::bail!("the object source stopped");
                }
                let objs = objects_rx.borrow_and_update().clone();
                if let Some(objs) = objs {
                    last = Some(objs);
                    backoff = BACKOFF_MIN;
                } else {
                    continue; // not ready yet: nothing is deleted before the first full list
                }
            }
            () = retry => { retry_at = None; }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
        let Some(objs) = last.clone() else { continue };
        let started = Instant::now();
        let desired = model::compute(&objs, &cfg);
        if desired.node_warning != last_node_warning {
            match &desired.node_warning {
                Some(w) => log::warn!("{w}"),
                None if last_node_warning.is_some() => {
                    log::info!("Node {}: found", cfg.node_name);
                }
                None => {}
            }
            last_node_warning = desired.node_warning.clone();
        }
        if snat_addr != Some(desired.primary_addr) {
            let pins = lb_agent::loader::PinLayout::new(&args.bpffs);
            match lb_agent::loader::set_snat(&pins, desired.primary_addr, &args.snat_ports) {
                Ok(()) => {
                    log::info!(
                        "SNAT for remote backends: source {}, ports {}-{}",
                        desired
                            .primary_addr
                            .map_or("the address each client used".to_string(), |a| a
                                .to_string()),
                        args.snat_ports.start(),
                        args.snat_ports.end()
                    );
                    snat_addr = Some(desired.primary_addr);
                }
                Err(e) => log::warn!("setting the SNAT configuration: {e}"),
            }
        }
        // The port filter covers the new frontends before they exist, and lets go of the
        // old ones only once they are gone.
        let ports = lb_agent::ports::desired_ports(&desired, &args.snat_ports);
        if let Some(f) = port_filter.as_mut() {
            if let Err(e) = f.widen(&ports) {
                log::warn!("port filter: {e}; switching it off");
                let _ = f.set_active(false);
                port_filter = None;
            }
        }
        let report = syncer.apply(&desired, &mut dp);
        if let (Some(f), true) = (port_filter.as_mut(), report.is_ok()) {
            match f.narrow(&ports).and_then(|_| f.set_active(true)) {
                Ok(()) => {}
                Err(e) => {
                    log::warn!("port filter: {e}; switching it off");
                    let _ = f.set_active(false);
                    port_filter = None;
                }
            }
        }
        let took = started.elapsed();
        for f in &report.failures {
            log::warn!("sync: {f}");
        }
        let hc_failed = health_servers.set(&desired.health_checks).await;
        for (port, why) in &hc_failed {
            log::warn!("healthCheckNodePort {port}: {why}; retried on the next sync");
        }
        // Every completed pass counts, failures included (they are retried and exported):
        // an agent facing a full map is alive, and restarting it would not help.
        if let Ok(mut h) = node_health.write() {
            h.last_sync = Some(std::time::SystemTime::now());
        }
        {
            let mut m = metrics.lock().await;
            m.record_sync(took, &report, &desired, &syncer);
            m.entries = syncer.entry_counts().to_vec();
            m.health_checks = health_servers.ports().len();
            m.health_check_bind_failures = hc_failed.len();
        }
        // Logged once /metrics and the health endpoints show this sync (tests wait for it).
        log::info!(
            "sync: {} frontends, {} puts, {} deletes, {} failures in {:.1} ms",
            desired.frontends.len(),
            report.puts,
            report.deletes,
            report.failures.len(),
            took.as_secs_f64() * 1e3
        );
        if !report.is_ok() || !hc_failed.is_empty() {
            log::warn!("sync: retrying failed entries in {backoff:?}");
            retry_at = Some(tokio::time::Instant::now() + backoff);
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }
    // The datapath stays attached through its pinned links: a restarted agent takes over
    // without a window. `lb-agent detach` removes it.
    log::info!(
        "stopping; the datapath stays attached (pinned under {})",
        args.bpffs.display()
    );
    Ok(())
}

/// Refuses a `--snat-ports` range that overlaps the NodePort range (a backend's reply to a
/// SNAT port would be taken for a new NodePort flow), and warns when it overlaps this node's
/// `ip_local_port_range` (the node's own connections could share a tuple with a SNATed flow).
fn check_snat_ports(
    snat: &std::ops::RangeInclusive<u16>,
    nodeports: &std::ops::RangeInclusive<u16>,
) -> anyhow::Result<()> {
    let overlaps = |a: &std::ops::RangeInclusive<u16>, b: &std::ops::RangeInclusive<u16>| {
        a.start() <= b.end() && b.start() <= a.end()
    };
    if overlaps(snat, nodeports) {
        anyhow::bail!(
            "--snat-ports {}-{} overlaps the NodePort range {}-{}; choose a disjoint range \
             (the default 61000-65535 lies above both NodePorts and Linux's default \
             ip_local_port_range)",
            snat.start(),
            snat.end(),
            nodeports.start(),
            nodeports.end()
        );
    }
    let local = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| {
            let mut it = t.split_whitespace().filter_map(|v| v.parse::<u16>().ok());
            Some(it.next()?..=it.next()?)
        });
    if let Some(local) = local.filter(|l| overlaps(snat, l)) {
        log::warn!(
            "--snat-ports {}-{} overlaps this node's ip_local_port_range {}-{}: the node's own \
             connections may collide with SNATed flows",
            snat.start(),
            snat.end(),
            local.start(),
            local.end()
        );
    }
    Ok(())
}

/// `net.ipv4.conf.IFACE.accept_local=1`. Packets the datapath translated for a remote
/// backend carry one of this node's addresses as source (or come from one of its frontend
/// addresses); they normally leave from XDP, but when the FIB has no answer yet (a neighbour
/// not resolved) they go to the stack, which would drop them as martian without this. With
/// it, the stack routes them and resolves the neighbour.
fn accept_local(iface: &str) {
    let path = format!("/proc/sys/net/ipv4/conf/{iface}/accept_local");
    match std::fs::write(&path, "1") {
        Ok(()) => log::info!("set {path}=1 (the XDP_PASS fallback of SNATed packets)"),
        Err(e) => {
            log::warn!("setting {path}=1: {e}; SNATed packets without a FIB result will be dropped")
        }
    }
}

/// A receiver of full object snapshots; `None` until every kind has been listed once.
type ObjectsRx = tokio::sync::watch::Receiver<Option<Arc<Objects>>>;

async fn start_source(args: &RunArgs) -> anyhow::Result<ObjectsRx> {
    let (tx, rx) = tokio::sync::watch::channel(None);
    if let Some(dir) = &args.manifests {
        let dir = dir.clone();
        // Fail early on a missing directory; later read errors are logged and retried.
        std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?;
        tokio::spawn(watch_manifests(dir, tx));
    } else {
        let client = source::kube::client(
            args.kubeconfig.as_deref(),
            args.in_cluster,
            args.api_server.as_ref(),
        )
        .await?;
        let mut snaps = source::kube::watch(client, args.node_name.clone()).await?;
        tokio::spawn(async move {
            loop {
                let snap = snaps.borrow_and_update().clone();
                if snap.ready && tx.send(Some(Arc::new(snap.objects))).is_err() {
                    return;
                }
                if snaps.changed().await.is_err() {
                    return;
                }
            }
        });
    }
    Ok(rx)
}

/// The cgroup the socket hooks attach to: `--cgroup PATH`, none for `off`, else the cgroup
/// v2 root from /proc/mounts.
fn socket_cgroup(arg: Option<&str>) -> anyhow::Result<Option<PathBuf>> {
    match arg {
        Some("off") => Ok(None),
        Some(p) => Ok(Some(PathBuf::from(p))),
        None => {
            let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
            lb_agent::loader::cgroup2_mount(&mounts).map(Some).context(
                "no cgroup2 filesystem in /proc/mounts for the socket hooks (mount one, give \
                 --cgroup PATH, or --cgroup off)",
            )
        }
    }
}

/// Names, sizes and modification times of the YAML files: a change in any re-reads them.
fn fingerprint(dir: &Path) -> std::io::Result<Vec<(PathBuf, u64, SystemTime)>> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let p = e.path();
        if matches!(p.extension().and_then(|x| x.to_str()), Some("yaml" | "yml")) {
            let md = e.metadata()?;
            v.push((p, md.len(), md.modified()?));
        }
    }
    v.sort();
    Ok(v)
}

async fn watch_manifests(dir: PathBuf, tx: tokio::sync::watch::Sender<Option<Arc<Objects>>>) {
    let mut seen = None;
    loop {
        match fingerprint(&dir) {
            Ok(fp) if Some(&fp) != seen.as_ref() => match source::manifests::load_dir(&dir) {
                Ok((objs, problems)) => {
                    for p in &problems {
                        log::warn!("manifests: {p}");
                    }
                    log::info!(
                        "manifests: {} services, {} endpointslices, {} pods, {} nodes",
                        objs.services.len(),
                        objs.slices.len(),
                        objs.pods.len(),
                        objs.nodes.len(),
                    );
                    seen = Some(fp);
                    if tx.send(Some(Arc::new(objs))).is_err() {
                        return;
                    }
                }
                Err(e) => log::warn!("manifests: {e}"),
            },
            Ok(_) => {}
            Err(e) => log::warn!("manifests: reading {}: {e}", dir.display()),
        }
        tokio::time::sleep(MANIFEST_POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::check_snat_ports;

    #[test]
    fn snat_ports_must_not_overlap_the_nodeport_range() {
        let np = 30000..=32767;
        assert!(check_snat_ports(&(61000..=65535), &np).is_ok());
        assert!(check_snat_ports(&(32768..=32800), &np).is_ok());
        for bad in [30000..=30000, 32767..=40000, 1024..=65535, 31000..=31001] {
            let e = check_snat_ports(&bad, &np).expect_err("overlap");
            assert!(e.to_string().contains("overlaps the NodePort range"), "{e}");
        }
    }
}
