//! The agent's main loop.
//!
//! Threads and what runs on them:
//! - the sources: the Kubernetes watches on a runtime of their own (`lb-ingest`: they parse
//!   the API server's JSON and convert each object to its compact view), or the manifests
//!   reader (`lb-manifests`: it parses only the files that changed); both send
//!   [`Change`]s;
//! - the control thread (`lb-control`): applies the changes to the incremental
//!   [`Controller`], reconciles what they made dirty, hands the changed frontends to the
//!   [`Syncer`] and flushes them into the maps (the bpf syscalls), retries failures with
//!   backoff, and every `--resync-interval` re-reads the maps and repairs any drift. While
//!   the first lists arrive it already reconciles them and writes the backends of new
//!   identities (unreachable until a slot points at them), so that once every kind is
//!   listed only the slots and masters are left to write;
//! - the async runtime: signals, `/metrics` (its bpf reads run on the blocking pool),
//!   `/healthz`, and the healthCheckNodePort servers.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc,
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use lb_agent::controller::Controller;
use lb_agent::dataplane::BpfDataplane;
use lb_agent::health::{HealthServers, NodeHealth};
use lb_agent::model::{Frontend, FrontendId, HealthCheck};
use lb_agent::ports::{with_snat, PortFilter};
use lb_agent::source::{manifests::ManifestDir, Change};
use lb_agent::{
    loader::{Capacities, Datapath},
    model::ModelConfig,
    source,
    sync::{Limits, SyncReport, Syncer},
};
use lb_common::service::port_bits;

use crate::{metrics::Metrics, RunArgs};

/// How often the manifests directory is checked for changes.
const MANIFEST_POLL: Duration = Duration::from_millis(100);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// The control thread looks at the stop flag at least this often.
const CONTROL_TICK: Duration = Duration::from_millis(200);
/// A pass slower than this is logged at info level.
const SLOW_PASS: Duration = Duration::from_millis(100);
/// How often a summary of the passes is logged (each one is logged at debug level).
const SUMMARY_EVERY: Duration = Duration::from_secs(60);
/// At most this many changes are applied before a reconcile (a long list is applied and
/// reconciled in pieces as it arrives, but the maps are synced only once the source is ready).
const DRAIN_MAX: usize = 20_000;

type HealthChecks = BTreeMap<u16, HealthCheck>;

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    check_snat_ports(&args.snat_ports, &args.nodeport_range)?;
    let caps = Capacities {
        services: args.services_size,
        backends: args.backends_size,
        ct: args.ct_size,
        svc_stats: args.frontends_size,
    };
    let cfg = ModelConfig {
        node_name: args.node_name.clone(),
        nodeport_range: args.nodeport_range.clone(),
        extra_node_addrs: args.node_addr.clone(),
    };
    let (tx, rx) = mpsc::channel();
    // A manifests directory is parsed while the datapath loads and is verified: CPU work
    // with nothing to wait for. The Kubernetes watches start once the control thread runs,
    // so that it works on each list page as it arrives and acts on a complete list at once.
    let mut tx = Some(tx);
    if let Some(tx) = tx.take_if(|_| args.manifests.is_some()) {
        start_source(&args, &cfg, tx)?;
    }
    let mut datapath = Datapath::load(&args.bpffs, &caps)?;
    // The socket policy first: the hooks must know the node's namespace before they run.
    lb_agent::loader::set_socket_policy(datapath.pins(), args.localhost_nodeports)?;
    // The veths TC ingress may redirect to, listed before it runs.
    if args.attach == lb_agent::loader::Attach::Tc {
        spawn_peer_ifs(datapath.pins().clone())?;
    }
    for iface in &args.iface {
        let mode = datapath
            .attach_hook(iface, args.attach, args.latency_histogram)
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
    let dp = datapath.dataplane()?;
    let port_filter = match lb_agent::ports::PortFilter::open(datapath.pins()) {
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

    let metrics = Arc::new(std::sync::Mutex::new(Metrics {
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
    let (hc_tx, hc_rx) = tokio::sync::watch::channel(None);
    tokio::spawn(serve_health_checks(hc_rx, metrics.clone()));
    if let Some(tx) = tx.take() {
        start_source(&args, &cfg, tx)?;
    }

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    // Registered once, up front: a SIGINT that arrives while a sync runs is kept.
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .context("installing the SIGINT handler")?;

    let stop = Arc::new(AtomicBool::new(false));
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let control = Control {
        rx,
        stop: stop.clone(),
        controller: Controller::new(cfg),
        syncer,
        dp,
        metrics,
        node_health,
        hc_tx,
        bpffs: args.bpffs.clone(),
        snat_ports: args.snat_ports.clone(),
        resync_interval: args.resync_interval.0,
        port_filter,
        ports_to_narrow: BTreeSet::new(),
        snat_marked: false,
    };
    let thread = std::thread::Builder::new()
        .name("lb-control".into())
        .spawn(move || {
            let r = control.run();
            let _ = done_tx.send(());
            r
        })
        .context("starting the control thread")?;
    tokio::select! {
        _ = sigint.recv() => {}
        _ = sigterm.recv() => {}
        _ = done_rx => {}
    }
    stop.store(true, Ordering::Relaxed);
    let result = tokio::task::spawn_blocking(move || thread.join())
        .await
        .context("waiting for the control thread")?
        .map_err(|_| anyhow::anyhow!("the control thread panicked"))?;
    drop(datapath);
    result?;
    // The datapath stays attached through its pinned links: a restarted agent takes over
    // without a window. `lb-agent detach` removes it.
    log::info!(
        "stopping; the datapath stays attached (pinned under {})",
        args.bpffs.display()
    );
    Ok(())
}

/// The control thread's state.
struct Control {
    rx: mpsc::Receiver<Change>,
    stop: Arc<AtomicBool>,
    controller: Controller,
    syncer: Syncer,
    dp: BpfDataplane,
    metrics: Arc<std::sync::Mutex<Metrics>>,
    node_health: Arc<std::sync::RwLock<NodeHealth>>,
    hc_tx: tokio::sync::watch::Sender<Option<HealthChecks>>,
    bpffs: PathBuf,
    snat_ports: std::ops::RangeInclusive<u16>,
    resync_interval: Option<Duration>,
    /// `None` once it failed (switched off: every packet then goes through the lookups).
    port_filter: Option<PortFilter>,
    /// Ports whose bits may have shrunk since the filter was last narrowed to them.
    ports_to_narrow: BTreeSet<u16>,
    /// Whether the SNAT ports are counted (they are while any frontend exists).
    snat_marked: bool,
}

/// What the control thread has not handed to the metrics yet (the metrics lock is only
/// ever tried, so a scrape never delays a sync).
#[derive(Default)]
struct MetricsUpdate {
    syncs: u64,
    seconds: f64,
    last_seconds: f64,
    failed: u64,
    puts: u64,
    deletes: u64,
    frontends: BTreeMap<FrontendId, Option<(u32, Arc<Frontend>)>>,
    rebuild: bool,
}

/// Hand the memory the allocator holds free back to the kernel, before the first sync adds
/// its own. Parsing a first list or directory (JSON on the tokio threads, YAML on the parse
/// threads) leaves each of those threads' glibc arenas with free chunks between live ones,
/// which stay resident; at 100k Services this lowered the agent's peak by 5-7 MiB
/// (docs/perf/control-plane.md). `malloc_trim` gives back the free pages of every arena.
fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    {
        let t = Instant::now();
        // SAFETY: malloc_trim only returns free memory to the kernel; it is thread-safe.
        let released = unsafe { libc::malloc_trim(0) };
        log::debug!(
            "malloc_trim: {} in {:.1} ms",
            if released == 1 {
                "memory released"
            } else {
                "nothing to release"
            },
            t.elapsed().as_secs_f64() * 1e3
        );
    }
}

/// Passes since the last summary line.
#[derive(Default)]
struct Summary {
    passes: u64,
    changes: u64,
    puts: usize,
    deletes: usize,
    slowest: Duration,
}

impl Control {
    fn run(mut self) -> anyhow::Result<()> {
        let mut ready = false;
        let mut first = true;
        let mut backoff = BACKOFF_MIN;
        let mut retry_at: Option<Instant> = None;
        let mut next_resync: Option<Instant> = None;
        let mut snat_addr: Option<Option<Ipv4Addr>> = None;
        let mut last_node_warning: Option<String> = None;
        let mut update = MetricsUpdate::default();
        let mut summary = Summary::default();
        let mut summary_at = Instant::now() + SUMMARY_EVERY;
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            let now = Instant::now();
            let wake = [retry_at, next_resync, Some(now + CONTROL_TICK)]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or(now);
            let mut received = 0u64;
            match self.rx.recv_timeout(wake.saturating_duration_since(now)) {
                Ok(change) => {
                    ready |= change.apply(&mut self.controller);
                    received += 1;
                    while let Ok(change) = self.rx.try_recv() {
                        ready |= change.apply(&mut self.controller);
                        received += 1;
                        if received as usize >= DRAIN_MAX {
                            break;
                        }
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    anyhow::bail!("the object source stopped")
                }
            }
            self.publish_metrics(&mut update);
            if Instant::now() >= summary_at {
                summary_at = Instant::now() + SUMMARY_EVERY;
                if summary.passes > 0 {
                    log::info!(
                        "sync: {} passes for {} changes in the last {}s: {} puts, {} deletes, \
                         slowest {:.1} ms",
                        summary.passes,
                        summary.changes,
                        SUMMARY_EVERY.as_secs(),
                        summary.puts,
                        summary.deletes,
                        summary.slowest.as_secs_f64() * 1e3
                    );
                }
                summary = Summary::default();
            }
            if !ready {
                // Work on the lists while they arrive: reconcile what they made dirty and
                // hand it to the syncer, which only records it. Nothing is written before
                // every kind is listed (a partial view would program Services without
                // their endpoints); then only the flush is left.
                if received > 0 {
                    let changes = self.controller.reconcile();
                    self.hand_over(&changes.frontends);
                    // Backends of new identities are invisible to the datapath until a
                    // slot points at them: they may be written already.
                    let report = self.syncer.prewrite_new_backends(&mut self.dp);
                    for f in &report.failures {
                        log::debug!("sync (before the lists are complete): {f}");
                    }
                }
                continue;
            }
            let now = Instant::now();
            let due_retry = retry_at.is_some_and(|t| now >= t);
            let due_resync = next_resync.is_some_and(|t| now >= t);
            let started = Instant::now();
            let changes = self.controller.reconcile();
            if changes.is_empty()
                && !first
                && !due_retry
                && !due_resync
                && self.syncer.pending() == 0
            {
                continue;
            }
            self.node_state(&mut last_node_warning, &mut snat_addr);
            self.hand_over(&changes.frontends);
            self.syncer.set_node_addrs(self.controller.node_addrs());
            let full = first || due_resync;
            self.widen_ports(full);
            if first {
                release_free_memory();
            }
            let report = if due_resync {
                self.syncer.resync(&mut self.dp)
            } else {
                self.syncer.flush(&mut self.dp)
            };
            if report.is_ok() {
                self.narrow_ports(full);
            }
            let took = started.elapsed();
            for f in &report.failures {
                log::warn!("sync: {f}");
            }
            let line = format!(
                "sync: {} frontends, {} puts, {} deletes, {} failures in {:.1} ms{}",
                self.controller.frontend_count(),
                report.puts,
                report.deletes,
                report.failures.len(),
                took.as_secs_f64() * 1e3,
                if due_resync {
                    " (resync: the maps were read back and compared)"
                } else {
                    ""
                }
            );
            summary.passes += 1;
            summary.changes += received;
            summary.puts += report.puts;
            summary.deletes += report.deletes;
            summary.slowest = summary.slowest.max(took);
            if first || changes.health_checks {
                self.hc_tx
                    .send_replace(Some(self.controller.health_checks().clone()));
            }
            // Every completed pass counts, failures included (they are retried and
            // exported): an agent facing a full map is alive, and restarting it would not
            // help.
            if let Ok(mut h) = self.node_health.write() {
                h.last_sync = Some(std::time::SystemTime::now());
            }
            self.record(
                &mut update,
                took,
                &report,
                &changes.frontends,
                first || due_resync,
            );
            self.publish_metrics(&mut update);
            // The pass's line last: whoever waits for it finds /healthz and (unless a scrape
            // held the metrics lock just then) /metrics already reflecting the pass.
            if first || due_resync || !report.is_ok() || took >= SLOW_PASS {
                log::info!("{line}");
            } else {
                log::debug!("{line}");
            }
            if first || due_resync {
                next_resync = self.resync_interval.map(|d| Instant::now() + d);
            }
            first = false;
            if !report.is_ok() {
                log::warn!("sync: retrying failed entries in {backoff:?}");
                retry_at = Some(Instant::now() + backoff);
                backoff = (backoff * 2).min(BACKOFF_MAX);
            } else {
                backoff = BACKOFF_MIN;
                // Frontends waiting for a counter slot that was freed: right away.
                retry_at = (self.syncer.pending() > 0).then(Instant::now);
            }
        }
    }

    /// Hand the frontends a reconcile reported to the syncer (written at its next flush).
    fn hand_over(&mut self, frontends: &[FrontendId]) {
        for id in frontends {
            self.syncer
                .set_frontend_shared(*id, self.controller.frontend_shared(id));
        }
    }

    /// Log a change of the node warning, and program the SNAT source when the primary
    /// address changes.
    fn node_state(
        &mut self,
        last_node_warning: &mut Option<String>,
        snat_addr: &mut Option<Option<Ipv4Addr>>,
    ) {
        let warning = self.controller.node_warning().map(str::to_string);
        if warning != *last_node_warning {
            match &warning {
                Some(w) => log::warn!("{w}"),
                None if last_node_warning.is_some() => {
                    log::info!("Node {}: found", self.controller.config().node_name);
                }
                None => {}
            }
            *last_node_warning = warning;
        }
        let primary = self.controller.primary_addr();
        if *snat_addr != Some(primary) {
            let pins = lb_agent::loader::PinLayout::new(&self.bpffs);
            match lb_agent::loader::set_snat(&pins, primary, &self.snat_ports) {
                Ok(()) => {
                    log::info!(
                        "SNAT for remote backends: source {}, ports {}-{}",
                        primary.map_or("the address each client used".to_string(), |a| a
                            .to_string()),
                        self.snat_ports.start(),
                        self.snat_ports.end()
                    );
                    *snat_addr = Some(primary);
                }
                Err(e) => log::warn!("setting the SNAT configuration: {e}"),
            }
        }
    }

    /// The bits the port filter must hold for `port`: those of the desired frontends, and
    /// the SNAT ports' while any frontend exists.
    fn port_bits(syncer: &Syncer, snat: &std::ops::RangeInclusive<u16>, port: u16) -> u8 {
        let mut b = syncer.ports().bits(port);
        if syncer.frontend_count() > 0 && snat.contains(&port) {
            b |= port_bits::TCP_FRONTEND | port_bits::UDP_FRONTEND;
        }
        b
    }

    /// Before a flush: the port filter covers the ports the new state needs (the ports this
    /// pass touched, or all of them on a `full` pass) before the frontends exist.
    fn widen_ports(&mut self, full: bool) {
        let mut changed = self.syncer.take_changed_ports();
        let any = self.syncer.frontend_count() > 0;
        if any != self.snat_marked {
            changed.extend(self.snat_ports.clone());
            self.snat_marked = any;
        }
        self.ports_to_narrow.extend(&changed);
        if self.port_filter.is_none() {
            return;
        }
        let next: BTreeMap<u16, u8> = if full {
            with_snat(self.syncer.ports().all(), any, &self.snat_ports)
        } else {
            changed
                .iter()
                .map(|p| (*p, Self::port_bits(&self.syncer, &self.snat_ports, *p)))
                .collect()
        };
        if let Some(Err(e)) = self.port_filter.as_mut().map(|f| f.widen(&next)) {
            self.port_filter_off(&e);
        }
    }

    /// After a successful flush: the port filter lets go of the ports nothing uses any
    /// more, and is switched on.
    fn narrow_ports(&mut self, full: bool) {
        let Some(f) = self.port_filter.as_mut() else {
            return;
        };
        let (syncer, snat) = (&self.syncer, &self.snat_ports);
        let r = if full {
            f.narrow(&with_snat(
                syncer.ports().all(),
                syncer.frontend_count() > 0,
                snat,
            ))
        } else {
            f.narrow_ports(&self.ports_to_narrow, |p| Self::port_bits(syncer, snat, p))
        };
        match r.and_then(|_| f.set_active(true)) {
            Ok(()) => self.ports_to_narrow.clear(),
            Err(e) => self.port_filter_off(&e),
        }
    }

    /// A port filter that failed is switched off for good: every packet then goes through
    /// the lookups, which is correct, only slower for traffic no Service uses.
    fn port_filter_off(&mut self, e: &dyn std::fmt::Display) {
        log::warn!("port filter: {e}; switching it off");
        if let Some(f) = self.port_filter.take() {
            let _ = f.set_active(false);
        }
    }

    /// Note a pass for the metrics.
    fn record(
        &self,
        u: &mut MetricsUpdate,
        took: Duration,
        r: &SyncReport,
        changed: &[FrontendId],
        everything: bool,
    ) {
        u.syncs += 1;
        u.seconds += took.as_secs_f64();
        u.last_seconds = took.as_secs_f64();
        u.failed += r.failures.len() as u64;
        u.puts += r.puts as u64;
        u.deletes += r.deletes as u64;
        let entry = |id: &FrontendId| {
            let sid = self.syncer.svc_id(id)?;
            Some((sid, self.controller.frontend_shared(id)?))
        };
        if everything {
            u.rebuild = true;
            u.frontends = self
                .controller
                .frontends()
                .map(|(id, _)| (id, entry(&id)))
                .collect();
        } else {
            for id in changed.iter().chain(&r.unsynced) {
                u.frontends.insert(*id, entry(id));
            }
        }
    }

    /// Hand what the metrics have not seen yet to them, unless a scrape holds them.
    fn publish_metrics(&self, u: &mut MetricsUpdate) {
        let Ok(mut m) = self.metrics.try_lock() else {
            return;
        };
        m.syncs += std::mem::take(&mut u.syncs);
        m.sync_seconds_sum += std::mem::take(&mut u.seconds);
        if u.last_seconds > 0.0 {
            m.last_sync_seconds = std::mem::take(&mut u.last_seconds);
        }
        m.failed_updates += std::mem::take(&mut u.failed);
        m.puts += std::mem::take(&mut u.puts);
        m.deletes += std::mem::take(&mut u.deletes);
        if std::mem::take(&mut u.rebuild) {
            m.frontends.clear();
        }
        for (id, e) in std::mem::take(&mut u.frontends) {
            match e {
                Some(e) => {
                    m.frontends.insert(id, e);
                }
                None => {
                    m.frontends.remove(&id);
                }
            }
        }
        m.problems = self.controller.problem_count();
        m.uncounted = self.syncer.uncounted();
        m.own_node_found = self.controller.own_node_found();
        m.peer_nodes = self.controller.peer_nodes().len();
        m.entries = self.syncer.entry_counts().to_vec();
    }
}

/// Serve the healthCheckNodePorts the control thread publishes; ports that cannot be bound
/// are retried with backoff.
async fn serve_health_checks(
    mut rx: tokio::sync::watch::Receiver<Option<HealthChecks>>,
    metrics: Arc<std::sync::Mutex<Metrics>>,
) {
    let mut servers = HealthServers::default();
    let mut backoff = BACKOFF_MIN;
    loop {
        let wanted = rx.borrow_and_update().clone();
        if let Some(wanted) = wanted {
            let failed = servers.set(&wanted).await;
            for (port, why) in &failed {
                log::warn!("healthCheckNodePort {port}: {why}; retried in {backoff:?}");
            }
            if let Ok(mut m) = metrics.lock() {
                m.health_checks = servers.ports().len();
                m.health_check_bind_failures = failed.len();
            }
            if !failed.is_empty() {
                tokio::select! {
                    r = rx.changed() => if r.is_err() { return },
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
            backoff = BACKOFF_MIN;
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
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

/// How often `--attach tc` re-lists the veths (`LB_PEER_IFS`): a pod's veth newer than
/// that is sent to with `bpf_redirect` rather than `bpf_redirect_peer` meanwhile.
const PEER_IFS_EVERY: Duration = Duration::from_secs(1);

/// `--attach tc`: fill `LB_PEER_IFS` now (an error here is fatal: the map or the listing is
/// unusable), then keep it current on a thread of its own (errors there are logged).
fn spawn_peer_ifs(pins: lb_agent::pins::PinLayout) -> anyhow::Result<()> {
    let (added, _) = lb_agent::peer_ifs::refresh(&pins).context("listing the veth devices")?;
    log::info!("--attach tc: {added} veth device(s) reachable with bpf_redirect_peer");
    std::thread::Builder::new()
        .name("lb-peer-ifs".into())
        .spawn(move || loop {
            std::thread::sleep(PEER_IFS_EVERY);
            match lb_agent::peer_ifs::refresh(&pins) {
                Ok((0, 0)) => {}
                Ok((added, removed)) => {
                    log::debug!("veth devices: {added} added, {removed} removed")
                }
                Err(e) => log::warn!("refreshing the veth devices: {e:#}"),
            }
        })
        .context("starting the veth refresh thread")?;
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

/// Start the object source on a thread of its own, sending its changes to `tx`. Fails
/// early on a missing manifests directory or an unusable kubeconfig.
fn start_source(args: &RunArgs, cfg: &ModelConfig, tx: mpsc::Sender<Change>) -> anyhow::Result<()> {
    if let Some(dir) = &args.manifests {
        // Fail early on a missing directory; later read errors are logged and retried.
        let dir = ManifestDir::new(dir, cfg.clone())
            .with_context(|| format!("reading {}", dir.display()))?;
        std::thread::Builder::new()
            .name("lb-manifests".into())
            .spawn(move || watch_manifests(dir, tx))
            .context("starting the manifests thread")?;
        return Ok(());
    }
    let (started_tx, started_rx) = mpsc::channel();
    let (kubeconfig, in_cluster, api_server) = (
        args.kubeconfig.clone(),
        args.in_cluster,
        args.api_server.clone(),
    );
    let cfg = cfg.clone();
    std::thread::Builder::new()
        .name("lb-ingest".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("lb-ingest")
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = started_tx.send(Err(anyhow::Error::new(e)));
                    return;
                }
            };
            rt.block_on(async move {
                let client = match source::kube::client(
                    kubeconfig.as_deref(),
                    in_cluster,
                    api_server.as_ref(),
                )
                .await
                {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = started_tx.send(Err(e.into()));
                        return;
                    }
                };
                let watches = match source::kube::changes(client, &cfg, tx) {
                    Ok(w) => w,
                    Err(e) => {
                        let _ = started_tx.send(Err(e.into()));
                        return;
                    }
                };
                let _ = started_tx.send(Ok(()));
                // The watches run for the agent's lifetime.
                std::future::pending::<()>().await;
                drop(watches);
            });
        })
        .context("starting the Kubernetes source thread")?;
    started_rx
        .recv()
        .context("the Kubernetes source thread ended")?
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

/// Poll the manifests directory, sending the changes of the files that changed; the first
/// complete read makes the source ready.
fn watch_manifests(mut dir: ManifestDir, tx: mpsc::Sender<Change>) {
    let mut ready = false;
    loop {
        let started = Instant::now();
        // Changes go out as each part is read (the first read of a directory comes file by
        // file, applied while the rest is parsed).
        let (mut parsed, mut changes, mut gone) = (0, 0, false);
        let polled = dir.poll_each(&mut |p| {
            // A file that cannot be read, a document that is not valid, an object defined
            // twice: each is named, and the rest of the directory is applied.
            for problem in &p.problems {
                log::warn!("manifests: {problem}");
            }
            parsed += p.parsed;
            changes += p.changes.len();
            for c in p.changes {
                gone |= tx.send(c).is_err();
            }
        });
        if gone {
            return;
        }
        match polled {
            Ok(()) => {
                if parsed > 0 {
                    log::info!(
                        "manifests: read {parsed} file(s), {changes} object change(s) in \
                         {:.1} ms",
                        started.elapsed().as_secs_f64() * 1e3
                    );
                }
                if !ready {
                    ready = true;
                    if tx.send(Change::Ready).is_err() {
                        return;
                    }
                }
            }
            Err(e) => log::warn!("manifests: {e}"),
        }
        std::thread::sleep(MANIFEST_POLL);
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
