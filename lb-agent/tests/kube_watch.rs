//! The Kubernetes source against an in-process fake API server: readiness, snapshot contents,
//! event convergence, bookmarks, 410 Gone re-lists, dropped connections, shutdown, and the
//! whole path snapshot -> model -> sync -> maps.
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::{Resource, ResourceExt};
use lb_agent::dataplane::MemDataplane;
use lb_agent::model::{self, ModelConfig, Objects};
use lb_agent::source::kube::{KubeSource, Snapshot};
use lb_agent::sync::{Limits, Syncer};
use support::fake_apiserver::{FakeApiServer, Kind, KindStats};
use support::objects::{node, pod, service, slice};
use tokio::sync::watch;

const NODE: &str = "node-a";
const WAIT: Duration = Duration::from_secs(10);

/// A NodePort Service with its EndpointSlice, a hostPort pod on node-a, a pod on node-b,
/// and both Nodes.
async fn cluster() -> FakeApiServer {
    let _ = env_logger::builder().is_test(true).try_init();
    let server = FakeApiServer::start().await;
    server.apply(&service("web", "NodePort", "10.96.0.10", 80, Some(30080)));
    server.apply(&slice(
        "web-1",
        "web",
        &[("10.244.1.5", NODE), ("10.244.2.5", "node-b")],
    ));
    server.apply(&pod("hostport", NODE, "10.244.1.7", Some(8081)));
    server.apply(&pod("elsewhere", "node-b", "10.244.2.7", Some(8082)));
    server.apply(&node(NODE, "192.168.1.10"));
    server.apply(&node("node-b", "192.168.1.11"));
    server
}

async fn start(server: &FakeApiServer) -> watch::Receiver<Snapshot> {
    lb_agent::source::kube::watch(server.client(), NODE.to_string())
        .await
        .expect("start kube source")
}

/// Wait (at most [`WAIT`]) for a snapshot satisfying `pred`; return it.
async fn wait_snapshot(
    rx: &mut watch::Receiver<Snapshot>,
    what: &str,
    pred: impl FnMut(&Snapshot) -> bool,
) -> Snapshot {
    let r = tokio::time::timeout(WAIT, rx.wait_for(pred))
        .await
        .map(|r| r.map(|s| s.clone()));
    match r {
        Ok(Ok(s)) => s,
        Ok(Err(_)) => panic!("source stopped while waiting for {what}"),
        Err(_) => panic!(
            "timed out waiting for {what}; last snapshot: {}",
            summary(&rx.borrow())
        ),
    }
}

/// "ns/name" of each object.
fn names<K: ResourceExt>(objs: &[K]) -> Vec<String> {
    objs.iter()
        .map(|o| format!("{}/{}", o.namespace().unwrap_or_default(), o.name_any()))
        .collect()
}

fn summary(s: &Snapshot) -> String {
    format!(
        "ready={} generation={} services={:?} slices={:?} pods={:?} node={:?}",
        s.ready,
        s.generation,
        names(&s.objects.services),
        names(&s.objects.slices),
        names(&s.objects.pods),
        node_names(s),
    )
}

fn node_names(s: &Snapshot) -> Vec<String> {
    s.objects.nodes.iter().map(|n| n.name_any()).collect()
}

/// This node's own Node among the cluster-wide list.
fn own_node(s: &Snapshot) -> Option<&Node> {
    node_named(s, NODE)
}

fn node_named<'a>(s: &'a Snapshot, name: &str) -> Option<&'a Node> {
    s.objects.nodes.iter().find(|n| n.name_any() == name)
}

fn node_ip(s: &Snapshot) -> Option<String> {
    address_of(own_node(s)?)
}

fn address_of(node: &Node) -> Option<String> {
    let addrs = node.status.as_ref()?.addresses.as_ref()?;
    addrs.first().map(|a| a.address.clone())
}

fn service_port(s: &Snapshot, name: &str) -> Option<i32> {
    let svc = s.objects.services.iter().find(|o| o.name_any() == name)?;
    Some(svc.spec.as_ref()?.ports.as_ref()?.first()?.port)
}

async fn all_watching(server: &FakeApiServer) {
    server
        .wait_until("one open watch per kind", |s| {
            s.values().all(|k| k.open == 1)
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_only_after_every_kind_is_listed() {
    let server = cluster().await;
    server.hold_lists(Kind::Node, true);
    let mut rx = start(&server).await;
    server
        .wait_until(
            "services, slices and pods watched, the node list pending",
            |s| {
                s[&Kind::Service].open == 1
                    && s[&Kind::EndpointSlice].open == 1
                    && s[&Kind::Pod].open == 1
                    && s[&Kind::Node].lists == 1
            },
        )
        .await;
    {
        let snap = rx.borrow();
        assert!(
            !snap.ready,
            "ready without the node list: {}",
            summary(&snap)
        );
        assert_eq!(snap.generation, 0);
        assert!(snap.objects.services.is_empty() && snap.objects.nodes.is_empty());
    }
    server.hold_lists(Kind::Node, false);
    let snap = wait_snapshot(&mut rx, "ready", |s| s.ready).await;
    assert_eq!(snap.generation, 1, "{}", summary(&snap));
    assert_eq!(names(&snap.objects.services), ["default/web"]);
    assert_eq!(names(&snap.objects.slices), ["default/web-1"]);
    assert_eq!(names(&snap.objects.pods), ["default/hostport"]);
    assert_eq!(node_ip(&snap).as_deref(), Some("192.168.1.10"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_lists_are_retried_until_ready() {
    let server = cluster().await;
    server.fail_lists(Kind::Node, 403, 1);
    server.fail_lists(Kind::Service, 500, 1);
    let mut rx = start(&server).await;
    let snap = wait_snapshot(&mut rx, "ready after the failed lists", |s| s.ready).await;
    assert_eq!(names(&snap.objects.services), ["default/web"]);
    assert_eq!(node_ip(&snap).as_deref(), Some("192.168.1.10"));
    let stats = server.all_stats();
    assert_eq!(stats[&Kind::Node].lists, 2);
    assert_eq!(stats[&Kind::Service].lists, 2);
    assert_eq!(stats[&Kind::Pod].lists, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_has_only_this_nodes_pods_and_node_without_managed_fields() {
    let server = cluster().await;
    server.apply(&pod("b-second", NODE, "10.244.1.8", None));
    server.apply(&service("api", "ClusterIP", "10.96.0.11", 443, None));
    let mut rx = start(&server).await;
    let snap = wait_snapshot(&mut rx, "ready", |s| s.ready).await;
    assert_eq!(
        names(&snap.objects.services),
        ["default/api", "default/web"],
        "sorted"
    );
    assert_eq!(
        names(&snap.objects.pods),
        ["default/b-second", "default/hostport"]
    );
    assert_eq!(own_node(&snap).map(|n| n.name_any()).as_deref(), Some(NODE));
    for pod in &snap.objects.pods {
        let node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
        assert_eq!(node, Some(NODE));
    }
    // The server stores managedFields on every object; the source strips them.
    assert!(!server.objects::<Service>()[0].managed_fields().is_empty());
    let all_meta = snap
        .objects
        .services
        .iter()
        .map(|o| o.meta())
        .chain(snap.objects.slices.iter().map(|o| o.meta()))
        .chain(snap.objects.pods.iter().map(|o| o.meta()))
        .chain(snap.objects.nodes.iter().map(|o| o.meta()));
    for m in all_meta {
        assert!(m.managed_fields.as_ref().is_none_or(Vec::is_empty), "{m:?}");
        assert!(m.resource_version.is_some() && m.uid.is_some(), "{m:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn added_modified_deleted_converge() {
    let server = cluster().await;
    let mut rx = start(&server).await;
    let first = wait_snapshot(&mut rx, "ready", |s| s.ready).await;

    server.apply(&service("api", "ClusterIP", "10.96.0.11", 443, None));
    let s = wait_snapshot(&mut rx, "service api added", |s| {
        service_port(s, "api") == Some(443)
    })
    .await;
    assert!(s.generation > first.generation);

    server.apply(&service("web", "NodePort", "10.96.0.10", 81, Some(30080)));
    let s2 = wait_snapshot(&mut rx, "service web modified", |s| {
        service_port(s, "web") == Some(81)
    })
    .await;
    assert!(s2.generation > s.generation);

    // A pod on another node is never seen; one on this node is.
    server.apply(&pod("remote", "node-b", "10.244.2.9", None));
    server.apply(&pod("local", NODE, "10.244.1.9", None));
    let s3 = wait_snapshot(&mut rx, "local pod added", |s| {
        names(&s.objects.pods).contains(&"default/local".to_string())
    })
    .await;
    assert_eq!(
        names(&s3.objects.pods),
        ["default/hostport", "default/local"]
    );

    assert!(server.delete::<EndpointSlice>(Some("default"), "web-1"));
    wait_snapshot(&mut rx, "slice deleted", |s| s.objects.slices.is_empty()).await;
    assert!(server.delete::<Pod>(Some("default"), "hostport"));
    wait_snapshot(&mut rx, "pod deleted", |s| {
        names(&s.objects.pods) == ["default/local"]
    })
    .await;

    // Every Node is watched: another node changing is seen, and so is this one.
    server.apply(&node("node-b", "192.168.1.99"));
    wait_snapshot(&mut rx, "other node added", |s| {
        node_named(s, "node-b").and_then(address_of).as_deref() == Some("192.168.1.99")
    })
    .await;
    server.apply(&node(NODE, "192.168.1.20"));
    let s4 = wait_snapshot(&mut rx, "node modified", |s| {
        node_ip(s).as_deref() == Some("192.168.1.20")
    })
    .await;
    assert_eq!(node_names(&s4), [NODE, "node-b"], "sorted by name");

    assert!(server.delete::<Node>(None, NODE));
    wait_snapshot(&mut rx, "own node deleted", |s| {
        own_node(s).is_none() && node_names(s) == ["node-b"]
    })
    .await;

    // The watches were never restarted.
    for (kind, st) in server.all_stats() {
        assert_eq!((st.lists, st.watches, st.gone), (1, 1, 0), "{kind:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bookmark_keeps_watches_resumable() {
    let server = cluster().await;
    let mut rx = start(&server).await;
    wait_snapshot(&mut rx, "ready", |s| s.ready).await;
    all_watching(&server).await;

    // Events move the watches' resourceVersions only for their own kind; a bookmark moves
    // all of them to now. After compacting history at now and closing the watches, each one
    // resumes from its bookmark without a 410 (had it not taken the bookmark, its version
    // would be too old and it would have to re-list).
    server.apply(&service("api", "ClusterIP", "10.96.0.11", 443, None));
    wait_snapshot(&mut rx, "service api added", |s| {
        service_port(s, "api") == Some(443)
    })
    .await;
    assert_eq!(server.bookmark(), 4);
    server.compact();
    assert_eq!(server.close_watches(), 4);
    server.apply(&pod("after-bookmark", NODE, "10.244.1.9", None));
    wait_snapshot(&mut rx, "pod added after the bookmark", |s| {
        s.objects.pods.len() == 2
    })
    .await;
    server
        .wait_until("every kind watching again", |s| {
            s.values().all(|k| k.watches == 2 && k.open == 1)
        })
        .await;
    for (kind, st) in server.all_stats() {
        assert_eq!((st.lists, st.gone), (1, 0), "{kind:?} re-listed: {st:?}");
    }
    // And the source still follows changes.
    server.apply(&service("api", "ClusterIP", "10.96.0.11", 444, None));
    wait_snapshot(&mut rx, "service api modified", |s| {
        service_port(s, "api") == Some(444)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gone_410_forces_relist_and_converges() {
    let server = cluster().await;
    let mut rx = start(&server).await;
    let before = wait_snapshot(&mut rx, "ready", |s| s.ready).await;
    all_watching(&server).await;

    // Take the watches away and keep them away while the cluster changes.
    server.hold_watches(true);
    assert_eq!(server.close_watches(), 4);
    server
        .wait_until("every kind trying to watch again", |s| {
            s.values().all(|k| k.watches == 2)
        })
        .await;
    assert!(server.delete::<Service>(Some("default"), "web"));
    server.apply(&pod("while-gone", NODE, "10.244.1.9", None));
    server.apply(&pod("while-gone-remote", "node-b", "10.244.2.9", None));
    server.apply(&node(NODE, "192.168.1.20"));
    server.apply(&slice("web-1", "web", &[("10.244.1.6", NODE)]));
    // The history they would resume from is gone: every watch gets 410 and must re-list.
    server.compact();
    server.hold_watches(false);

    let after = wait_snapshot(
        &mut rx,
        "the changes made while the watches were gone",
        |s| {
            s.objects.services.is_empty()
                && names(&s.objects.pods) == ["default/hostport", "default/while-gone"]
                && node_ip(s).as_deref() == Some("192.168.1.20")
                && s.objects.slices.first().is_some_and(|sl| {
                    sl.endpoints
                        .as_ref()
                        .is_some_and(|e| e[0].addresses[0] == "10.244.1.6")
                })
        },
    )
    .await;
    assert!(after.ready && after.generation > before.generation);
    server
        .wait_until("410 for every kind, then a re-list and a new watch", |s| {
            s.values()
                .all(|k| k.gone >= 1 && k.lists >= 2 && k.open == 1)
        })
        .await;

    // Watching again from the re-list's version.
    server.apply(&service("web", "NodePort", "10.96.0.10", 80, Some(30080)));
    wait_snapshot(&mut rx, "service web re-created", |s| {
        service_port(s, "web") == Some(80)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_watch_connections_reconnect_and_converge() {
    let server = cluster().await;
    let mut rx = start(&server).await;
    wait_snapshot(&mut rx, "ready", |s| s.ready).await;
    all_watching(&server).await;

    // Connections aborted mid-stream.
    assert_eq!(server.drop_watches(), 4);
    server.apply(&service("api", "ClusterIP", "10.96.0.11", 443, None));
    server.apply(&pod("after-drop", NODE, "10.244.1.9", None));
    wait_snapshot(&mut rx, "changes after the drop", |s| {
        service_port(s, "api") == Some(443) && s.objects.pods.len() == 2
    })
    .await;
    server
        .wait_until("every kind watching again", |s| {
            s.values().all(|k| k.watches >= 2 && k.open == 1)
        })
        .await;

    // Watches ended cleanly (as on a server-side timeout).
    let watches: BTreeMap<Kind, KindStats> = server.all_stats();
    assert_eq!(server.close_watches(), 4);
    assert!(server.delete::<Service>(Some("default"), "api"));
    server.apply(&node(NODE, "192.168.1.20"));
    wait_snapshot(&mut rx, "changes after the close", |s| {
        service_port(s, "api").is_none() && node_ip(s).as_deref() == Some("192.168.1.20")
    })
    .await;
    server
        .wait_until("every kind watching again", |s| {
            s.iter()
                .all(|(kind, k)| k.watches > watches[kind].watches && k.open == 1)
        })
        .await;
    for (kind, st) in server.all_stats() {
        assert_eq!(st.gone, 0, "{kind:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_stop_when_every_receiver_is_dropped() {
    let server = cluster().await;
    let mut rx = start(&server).await;
    wait_snapshot(&mut rx, "ready", |s| s.ready).await;
    all_watching(&server).await;
    let rx2 = rx.clone();
    drop(rx);
    // One receiver left: still watching.
    server.apply(&service("api", "ClusterIP", "10.96.0.11", 443, None));
    let mut rx2 = rx2;
    wait_snapshot(&mut rx2, "service api added", |s| {
        service_port(s, "api") == Some(443)
    })
    .await;
    drop(rx2);
    server
        .wait_until("no open watch", |s| s.values().all(|k| k.open == 0))
        .await;

    // The same for a KubeSource handle.
    let source = KubeSource::start(server.client(), NODE).expect("start");
    let mut rx = source.subscribe();
    wait_snapshot(&mut rx, "ready", |s| s.ready).await;
    all_watching(&server).await;
    drop(source);
    server
        .wait_until("no open watch", |s| s.values().all(|k| k.open == 0))
        .await;
}

#[tokio::test]
async fn invalid_node_name_is_rejected() {
    let server = FakeApiServer::start().await;
    let r = lb_agent::source::kube::watch(server.client(), "a,metadata.name=b".to_string()).await;
    assert!(r.is_err());
}

/// The maps as frontend `(addr, port, proto)` -> backends `(addr, port)`, checking that
/// every slot and backend an entry refers to is there.
type MapView = (
    BTreeSet<Ipv4Addr>,
    BTreeMap<(Ipv4Addr, u16, u8), BTreeSet<(Ipv4Addr, u16)>>,
);

fn map_view(dp: &MemDataplane) -> MapView {
    let mut frontends = BTreeMap::new();
    for (k, v) in dp.services.iter().filter(|(k, _)| k.slot == 0) {
        let mut backends = BTreeSet::new();
        for slot in 1..=v.count {
            let key = lb_common::Frontend4Key { slot, ..*k };
            let s = dp.services.get(&key).expect("slot of a master entry");
            let b = dp.backends.get(&s.backend_id).expect("backend of a slot");
            backends.insert((Ipv4Addr::from(u32::from_be(b.addr)), u16::from_be(b.port)));
        }
        let id = (
            Ipv4Addr::from(u32::from_be(k.addr)),
            u16::from_be(k.port),
            k.proto,
        );
        frontends.insert(id, backends);
    }
    (dp.node_addrs.clone(), frontends)
}

fn desired_view(d: &model::Desired) -> MapView {
    let frontends = d
        .frontends
        .iter()
        .map(|(id, f)| {
            let backends = f.backends.iter().map(|b| (b.addr, b.port)).collect();
            ((id.addr, id.port, id.proto.ipproto()), backends)
        })
        .collect();
    (d.node_addrs.clone(), frontends)
}

/// What the maps should hold, computed straight from the server's objects.
fn expected(server: &FakeApiServer, cfg: &ModelConfig) -> MapView {
    let objects = Objects {
        services: server.objects(),
        slices: server.objects(),
        pods: server
            .objects::<Pod>()
            .into_iter()
            .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(NODE))
            .collect(),
        nodes: {
            let mut nodes = server.objects::<Node>();
            nodes.sort_by_key(|n| n.name_any());
            nodes
        },
    };
    desired_view(&model::compute(&objects, cfg))
}

/// Apply snapshots as they come until the maps equal the model of the server's objects.
async fn converge(
    server: &FakeApiServer,
    rx: &mut watch::Receiver<Snapshot>,
    syncer: &mut Syncer,
    dp: &mut MemDataplane,
    what: &str,
) -> MapView {
    let cfg = ModelConfig::new(NODE);
    let want = expected(server, &cfg);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let snap = rx.borrow_and_update().clone();
        if snap.ready {
            let report = syncer.apply(&model::compute(&snap.objects, &cfg), dp);
            assert!(report.is_ok(), "{what}: sync failed: {:?}", report.failures);
            let got = map_view(dp);
            if got == want {
                return got;
            }
        }
        if tokio::time::timeout_at(deadline, rx.changed())
            .await
            .is_err()
        {
            panic!(
                "{what}: maps did not converge\n want {want:?}\n got  {:?}\n last {}",
                map_view(dp),
                summary(&rx.borrow())
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maps_follow_the_cluster_through_model_and_sync() {
    let server = cluster().await;
    let mut rx = start(&server).await;
    let mut syncer = Syncer::new(Limits::default());
    let mut dp = MemDataplane::default();

    let v = converge(&server, &mut rx, &mut syncer, &mut dp, "initial").await;
    let any = Ipv4Addr::UNSPECIFIED;
    let tcp = lb_common::IPPROTO_TCP;
    let web_backends: BTreeSet<_> = [
        (Ipv4Addr::new(10, 244, 1, 5), 8080),
        (Ipv4Addr::new(10, 244, 2, 5), 8080),
    ]
    .into();
    assert_eq!(v.0, [Ipv4Addr::new(192, 168, 1, 10)].into());
    assert_eq!(
        v.1.get(&(Ipv4Addr::new(10, 96, 0, 10), 80, tcp)),
        Some(&web_backends)
    );
    assert_eq!(v.1.get(&(any, 30080, tcp)), Some(&web_backends));
    assert_eq!(
        v.1.get(&(any, 8081, tcp)),
        Some(&[(Ipv4Addr::new(10, 244, 1, 7), 80)].into()),
        "hostPort of the local pod"
    );
    assert!(
        !v.1.contains_key(&(any, 8082, tcp)),
        "hostPort of a pod on node-b"
    );

    // ADDED
    server.apply(&service("api", "ClusterIP", "10.96.0.11", 443, None));
    server.apply(&slice("api-1", "api", &[("10.244.1.20", NODE)]));
    let v = converge(&server, &mut rx, &mut syncer, &mut dp, "added").await;
    assert!(v.1.contains_key(&(Ipv4Addr::new(10, 96, 0, 11), 443, tcp)));

    // MODIFIED
    server.apply(&slice("web-1", "web", &[("10.244.1.6", NODE)]));
    server.apply(&node(NODE, "192.168.1.20"));
    let v = converge(&server, &mut rx, &mut syncer, &mut dp, "modified").await;
    assert_eq!(v.0, [Ipv4Addr::new(192, 168, 1, 20)].into());
    assert_eq!(
        v.1.get(&(any, 30080, tcp)),
        Some(&[(Ipv4Addr::new(10, 244, 1, 6), 8080)].into())
    );

    // DELETED
    assert!(server.delete::<Pod>(Some("default"), "hostport"));
    assert!(server.delete::<Service>(Some("default"), "api"));
    let v = converge(&server, &mut rx, &mut syncer, &mut dp, "deleted").await;
    assert!(!v.1.contains_key(&(any, 8081, tcp)));
    assert!(!v.1.contains_key(&(Ipv4Addr::new(10, 96, 0, 11), 443, tcp)));

    // BOOKMARK, then a change
    server.bookmark();
    server.apply(&pod("hostport2", NODE, "10.244.1.8", Some(8083)));
    let v = converge(&server, &mut rx, &mut syncer, &mut dp, "after a bookmark").await;
    assert!(v.1.contains_key(&(any, 8083, tcp)));

    // 410 Gone with changes while the watches are away
    all_watching(&server).await;
    server.hold_watches(true);
    server.close_watches();
    server
        .wait_until("every kind trying to watch again", |s| {
            s.values().all(|k| k.watches >= 2)
        })
        .await;
    assert!(server.delete::<Service>(Some("default"), "web"));
    server.apply(&service("db", "NodePort", "10.96.0.12", 5432, Some(30432)));
    server.apply(&slice("db-1", "db", &[("10.244.1.30", NODE)]));
    server.compact();
    server.hold_watches(false);
    let v = converge(&server, &mut rx, &mut syncer, &mut dp, "after 410 Gone").await;
    assert!(!v.1.contains_key(&(any, 30080, tcp)));
    assert!(v.1.contains_key(&(any, 30432, tcp)));
    server
        .wait_until("re-listed", |s| {
            s.values().all(|k| k.gone >= 1 && k.lists >= 2)
        })
        .await;

    // Dropped connections
    all_watching(&server).await;
    server.drop_watches();
    server.apply(&slice(
        "db-1",
        "db",
        &[("10.244.1.30", NODE), ("10.244.1.31", NODE)],
    ));
    let v = converge(
        &server,
        &mut rx,
        &mut syncer,
        &mut dp,
        "after dropped watches",
    )
    .await;
    assert_eq!(v.1.get(&(any, 30432, tcp)).map(BTreeSet::len), Some(2));
}

/// Every document of a deploy/ manifest, each checked to round-trip through its k8s-openapi
/// type unchanged (so a misspelled or misplaced field fails here, not in the cluster).
fn manifest(file: &str) -> Vec<serde_json::Value> {
    use serde::Deserialize;
    let path = format!("{}/../deploy/{file}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let docs: Vec<serde_json::Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde_json::Value::deserialize(d).unwrap_or_else(|e| panic!("{path}: {e}")))
        .collect();
    for doc in &docs {
        fn round_trip<T: serde::Serialize + serde::de::DeserializeOwned>(v: &serde_json::Value) {
            let typed: T = serde_json::from_value(v.clone()).expect("typed");
            assert_eq!(
                &serde_json::to_value(&typed).expect("json"),
                v,
                "round trip"
            );
        }
        use k8s_openapi::api::{apps::v1 as apps, core::v1 as core, rbac::v1 as rbac};
        match doc["kind"].as_str() {
            Some("ServiceAccount") => round_trip::<core::ServiceAccount>(doc),
            Some("ClusterRole") => round_trip::<rbac::ClusterRole>(doc),
            Some("ClusterRoleBinding") => round_trip::<rbac::ClusterRoleBinding>(doc),
            Some("DaemonSet") => round_trip::<apps::DaemonSet>(doc),
            other => panic!("{path}: unexpected kind {other:?}"),
        }
    }
    docs
}

fn of_kind<T: serde::de::DeserializeOwned>(docs: &[serde_json::Value], kind: &str) -> T {
    let doc = docs.iter().find(|d| d["kind"] == kind).expect(kind);
    serde_json::from_value(doc.clone()).expect(kind)
}

#[test]
fn deploy_manifests_are_valid_and_grant_what_the_source_watches() {
    use k8s_openapi::api::apps::v1::DaemonSet;
    use k8s_openapi::api::core::v1::ServiceAccount;
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
    use k8s_openapi::Resource as _;

    let rbac = manifest("rbac.yaml");
    let sa: ServiceAccount = of_kind(&rbac, "ServiceAccount");
    assert_eq!(sa.metadata.name.as_deref(), Some("lb-agent"));
    assert_eq!(sa.metadata.namespace.as_deref(), Some("kube-system"));

    let role: ClusterRole = of_kind(&rbac, "ClusterRole");
    let rules = role.rules.unwrap_or_default();
    let watched = [
        (Service::GROUP, Service::URL_PATH_SEGMENT),
        (EndpointSlice::GROUP, EndpointSlice::URL_PATH_SEGMENT),
        (Pod::GROUP, Pod::URL_PATH_SEGMENT),
        (Node::GROUP, Node::URL_PATH_SEGMENT),
    ];
    for (group, resource) in watched {
        for verb in ["get", "list", "watch"] {
            let granted = rules.iter().any(|r| {
                r.api_groups.iter().flatten().any(|g| g == group)
                    && r.resources.iter().flatten().any(|x| x == resource)
                    && r.verbs.iter().any(|v| v == verb)
            });
            assert!(
                granted,
                "ClusterRole does not grant {verb} on {group:?}/{resource}"
            );
        }
    }
    for r in &rules {
        assert!(
            r.verbs
                .iter()
                .all(|v| ["get", "list", "watch"].contains(&v.as_str())),
            "read-only: {r:?}"
        );
    }
    let binding: ClusterRoleBinding = of_kind(&rbac, "ClusterRoleBinding");
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(binding.role_ref.name, "lb-agent");
    let subject = &binding.subjects.unwrap_or_default()[0];
    assert_eq!(
        (
            subject.kind.as_str(),
            subject.name.as_str(),
            subject.namespace.as_deref()
        ),
        ("ServiceAccount", "lb-agent", Some("kube-system"))
    );

    let ds: DaemonSet = of_kind(&manifest("daemonset.yaml"), "DaemonSet");
    assert_eq!(ds.metadata.namespace.as_deref(), Some("kube-system"));
    let spec = ds.spec;
    let pod = spec.template.spec.expect("pod spec");
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.service_account_name.as_deref(), Some("lb-agent"));
    let tolerations = pod.tolerations.unwrap_or_default();
    assert!(
        tolerations
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists")
                && t.key.is_none()
                && t.effect.is_none()),
        "tolerates every taint: {tolerations:?}"
    );
    let c = &pod.containers[0];
    assert_eq!(
        c.args.as_deref().unwrap_or_default(),
        [
            "run",
            "--node-name",
            "$(NODE_NAME)",
            "--iface",
            "eth0",
            "--in-cluster",
            "--api-server",
            "https://CONTROL_PLANE_IP:6443",
            "--cgroup",
            "/run/lb/cgroupv2"
        ]
    );
    // --cgroup is the host's cgroup v2 root, not the container's namespaced view.
    let cg_mount = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == "/run/lb/cgroupv2")
        .expect("cgroup v2 mount at the --cgroup path");
    let cg_volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == cg_mount.name)
        .expect("cgroup volume");
    assert_eq!(
        cg_volume.host_path.as_ref().map(|h| h.path.as_str()),
        Some("/sys/fs/cgroup")
    );
    let env = c.env.as_deref().unwrap_or_default();
    let node_name = env
        .iter()
        .find(|e| e.name == "NODE_NAME")
        .expect("NODE_NAME");
    let field = node_name
        .value_from
        .as_ref()
        .and_then(|v| v.field_ref.as_ref());
    assert_eq!(field.map(|f| f.field_path.as_str()), Some("spec.nodeName"));
    let sc = c.security_context.as_ref().expect("securityContext");
    assert_eq!(sc.privileged, Some(false));
    let caps = sc
        .capabilities
        .as_ref()
        .and_then(|c| c.add.clone())
        .unwrap_or_default();
    for cap in ["BPF", "NET_ADMIN", "PERFMON"] {
        assert!(
            caps.iter().any(|c| c == cap),
            "capability {cap} missing: {caps:?}"
        );
    }
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == "/sys/fs/bpf")
        .expect("bpffs mount");
    let volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .expect("bpffs volume");
    assert_eq!(
        volume.host_path.as_ref().map(|h| h.path.as_str()),
        Some("/sys/fs/bpf")
    );
}
