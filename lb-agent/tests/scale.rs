//! The control plane's own cost at scale, in process: views, controller, first flush and one
//! change for N ClusterIP Services x 10 endpoints, into a dataplane that keeps nothing (so
//! only the agent's work is timed), with the process RSS after each phase; and the same
//! objects read from 100 manifest files through the agent's `ManifestDir`.
//!
//! The agent fixes glibc's mmap threshold (`lb-agent run`); run with
//! `MALLOC_MMAP_THRESHOLD_=131072` to measure as it does.
//!
//! `cargo test --release -p lb-agent --test scale -- --ignored --nocapture`
//! (`LB_SCALE_N` sets N, default 100000).
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Instant;

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use lb_agent::controller::{Controller, Key};
use lb_agent::dataplane::{Dataplane, Result};
use lb_agent::model::{ModelConfig, ServiceView, SliceView, SERVICE_NAME_LABEL};
use lb_agent::sync::{Limits, Syncer};
use lb_common::{Backend4, Counter, Frontend4Key, Reason, Service4Value};

/// Counts writes, keeps nothing; batches always succeed.
#[derive(Default)]
struct Null {
    puts: usize,
}

impl Dataplane for Null {
    fn services(&self) -> Result<Vec<(Frontend4Key, Service4Value)>> {
        Ok(Vec::new())
    }
    fn put_service(&mut self, _: Frontend4Key, _: Service4Value) -> Result<()> {
        self.puts += 1;
        Ok(())
    }
    fn delete_service(&mut self, _: &Frontend4Key) -> Result<()> {
        Ok(())
    }
    fn backends(&self) -> Result<Vec<(u32, Backend4)>> {
        Ok(Vec::new())
    }
    fn put_backend(&mut self, _: u32, _: Backend4) -> Result<()> {
        self.puts += 1;
        Ok(())
    }
    fn delete_backend(&mut self, _: u32) -> Result<()> {
        Ok(())
    }
    fn node_addrs(&self) -> Result<Vec<Ipv4Addr>> {
        Ok(Vec::new())
    }
    fn put_node_addr(&mut self, _: Ipv4Addr) -> Result<()> {
        Ok(())
    }
    fn delete_node_addr(&mut self, _: Ipv4Addr) -> Result<()> {
        Ok(())
    }
    fn stats(&self) -> Result<Vec<(Reason, Counter)>> {
        Ok(Vec::new())
    }
    fn svc_stats(&self, _: u32) -> Result<Counter> {
        Ok(Counter::default())
    }
    fn reset_svc_stats(&mut self, _: u32) -> Result<()> {
        Ok(())
    }
    fn put_services_batch(&mut self, e: &[(Frontend4Key, Service4Value)]) -> usize {
        self.puts += e.len();
        e.len()
    }
    fn put_backends_batch(&mut self, e: &[(u32, Backend4)]) -> usize {
        self.puts += e.len();
        e.len()
    }
    fn reset_svc_stats_batch(&mut self, ids: &[u32]) -> usize {
        ids.len()
    }
}

fn rss_mib() -> (f64, f64) {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb = |k: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    (kb("VmRSS:"), kb("VmHWM:"))
}

/// N, from `LB_SCALE_N` (default 100,000).
fn scale_n() -> usize {
    std::env::var("LB_SCALE_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000)
}

/// Print a phase: its time since `t` and the process RSS after it.
fn say(what: &str, t: Instant) {
    let (rss, hwm) = rss_mib();
    eprintln!(
        "{what:<40} {:>8.1} ms   RSS {rss:>6.0} MiB (peak {hwm:.0})",
        t.elapsed().as_secs_f64() * 1e3
    );
}

/// A syncer with room for `n` counted frontends, given the controller's `frontends` as the
/// agent hands them over (shared, not copied).
fn syncer_with(n: usize, c: &Controller, frontends: &[lb_agent::model::FrontendId]) -> Syncer {
    let mut s = Syncer::new(Limits {
        svc_ids: n as u32 + 16,
        ..Limits::default()
    });
    for id in frontends {
        s.set_frontend_shared(*id, c.frontend_shared(id));
    }
    s
}

fn service(i: usize) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(format!("svc-{i}")),
            namespace: Some("bench".into()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            cluster_ip: Some(Ipv4Addr::from(0x0a60_000a + i as u32).to_string()),
            ports: Some(vec![ServicePort {
                name: Some("p80".into()),
                port: 80,
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn slice(i: usize, count: usize) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(format!("svc-{i}-abcde")),
            namespace: Some("bench".into()),
            labels: Some([(SERVICE_NAME_LABEL.to_string(), format!("svc-{i}"))].into()),
            ..Default::default()
        },
        address_type: "IPv4".into(),
        endpoints: Some(
            (0..count)
                .map(|k| Endpoint {
                    addresses: vec![SocketAddrV4::new(
                        Ipv4Addr::from(0x0a80_0000 + (i * 16 + k) as u32 + 1),
                        0,
                    )
                    .ip()
                    .to_string()],
                    conditions: Some(EndpointConditions {
                        ready: Some(true),
                        ..Default::default()
                    }),
                    node_name: Some("bench-node".into()),
                    ..Default::default()
                })
                .collect(),
        ),
        ports: Some(vec![EndpointPort {
            name: Some("p80".into()),
            port: Some(8080),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
    }
}

#[test]
#[ignore = "a measurement: run with --release --ignored --nocapture"]
fn control_plane_cost_at_scale() {
    let n = scale_n();
    let cfg = ModelConfig::new("bench-node");
    let t = Instant::now();
    let mut svcs = Vec::with_capacity(n);
    let mut slices = Vec::with_capacity(n);
    for i in 0..n {
        svcs.push(ServiceView::new(&service(i), &cfg));
        let s = slice(i, 10);
        slices.push((
            Key::new("bench", format!("svc-{i}-abcde")),
            SliceView::new(&s, &cfg),
        ));
    }
    say("views (objects built and converted)", t);
    let mut c = Controller::new(cfg.clone());
    let t = Instant::now();
    c.replace_services(svcs);
    c.replace_slices(slices);
    say("controller: lists applied", t);
    let t = Instant::now();
    let changes = c.reconcile();
    say("controller: reconcile", t);
    let mut dp = Null::default();
    let t = Instant::now();
    let mut s = syncer_with(n, &c, &changes.frontends);
    say("syncer: set_frontend", t);
    // What the agent does while the lists still arrive: new identities' backends.
    let t = Instant::now();
    let r = s.prewrite_new_backends(&mut dp);
    assert!(r.is_ok());
    assert_eq!(r.puts, 10 * n, "every backend is a new identity");
    say(&format!("syncer: new backends ({} puts)", r.puts), t);
    let t = Instant::now();
    let r = s.flush(&mut dp);
    assert!(r.is_ok());
    assert_eq!(r.puts, n + 10 * n, "every master and slot");
    say(&format!("syncer: first flush ({} puts)", r.puts), t);
    let mut lat = Vec::new();
    for k in 0..200 {
        let i = (k * 7919) % n;
        let v = SliceView::new(&slice(i, 11), &cfg);
        let t = Instant::now();
        c.upsert_slice("bench", &format!("svc-{i}-abcde"), v);
        let ch = c.reconcile();
        for id in &ch.frontends {
            s.set_frontend_shared(*id, c.frontend_shared(id));
        }
        let r = s.flush(&mut dp);
        assert_eq!(r.puts, 3, "one backend, one slot, the master");
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    lat.sort_by(f64::total_cmp);
    eprintln!(
        "one change (controller + sync)           p50 {:.1} µs, p99 {:.1} µs",
        lat[lat.len() / 2],
        lat[lat.len() * 99 / 100]
    );
    let (rss, hwm) = rss_mib();
    eprintln!("end: RSS {rss:.0} MiB, peak {hwm:.0} MiB");
}

/// The same N Services and slices as YAML in 100 files, as `lb-bench agent` writes them.
fn write_manifests(dir: &std::path::Path, n: usize) {
    let per_file = n.div_ceil(100).max(1);
    std::fs::create_dir_all(dir).expect("creating the manifests directory");
    for f in 0..n.div_ceil(per_file) {
        let mut y = String::new();
        for i in f * per_file..((f + 1) * per_file).min(n) {
            y.push_str(&format!(
                "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: svc-{i}\n  namespace: bench\nspec:\n  type: ClusterIP\n  clusterIP: {}\n  ports:\n  - name: p80\n    port: 80\n    protocol: TCP\n    targetPort: 8080\n",
                Ipv4Addr::from(0x0a60_000a + i as u32)
            ));
            y.push_str(&format!(
                "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: svc-{i}-abcde\n  namespace: bench\n  labels:\n    kubernetes.io/service-name: svc-{i}\naddressType: IPv4\nports:\n- name: p80\n  port: 8080\n  protocol: TCP\nendpoints:\n"
            ));
            for k in 0..10 {
                y.push_str(&format!(
                    "- addresses: [\"{}\"]\n  conditions: {{ready: true}}\n  nodeName: bench-node\n",
                    Ipv4Addr::from(0x0a80_0000 + (i * 16 + k) as u32 + 1)
                ));
            }
        }
        std::fs::write(dir.join(format!("svc-{f:03}.yaml")), y).expect("writing a manifest");
    }
}

#[test]
#[ignore = "a measurement: run with --release --ignored --nocapture"]
fn manifests_cost_at_scale() {
    let n = scale_n();
    let dir = std::env::temp_dir().join(format!("lb-scale-manifests-{}", std::process::id()));
    write_manifests(&dir, n);
    say("files written", Instant::now());
    let cfg = ModelConfig::new("bench-node");
    let mut c = Controller::new(cfg.clone());
    let t = Instant::now();
    let mut md = lb_agent::source::manifests::ManifestDir::new(&dir, cfg).expect("the directory");
    let mut changes = 0;
    md.poll_each(&mut |p| {
        for ch in p.changes {
            changes += 1;
            ch.apply(&mut c);
        }
    })
    .expect("reading the directory");
    assert_eq!(changes, 2 * n);
    say("manifests read and applied", t);
    // SAFETY: malloc_trim only returns free memory to the kernel.
    unsafe { libc::malloc_trim(0) };
    say("malloc_trim", Instant::now());
    let _ = std::fs::remove_dir_all(&dir);
    let t = Instant::now();
    let ch = c.reconcile();
    say("controller: reconcile", t);
    let mut dp = Null::default();
    let t = Instant::now();
    let mut s = syncer_with(n, &c, &ch.frontends);
    let r = s.prewrite_new_backends(&mut dp);
    assert!(r.is_ok());
    let r = s.flush(&mut dp);
    assert!(r.is_ok());
    say("syncer: set_frontend, backends, flush", t);
    drop(md);
    say("manifests state dropped", Instant::now());
}
