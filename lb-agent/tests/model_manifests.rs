//! Tests of the manifests source: YAML files in a temporary directory in, objects and
//! problems out.
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use lb_agent::model::{compute, ModelConfig, Objects, Problem};
use lb_agent::source::manifests::{load_dir, load_str, ManifestError};

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "lb-agent-manifests-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        Self(p)
    }

    fn write(&self, name: &str, text: &str) -> &Self {
        std::fs::write(self.0.join(name), text).expect("write manifest");
        self
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const SVC: &str = "apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
spec:
  clusterIP: 10.96.0.100
  ports:
  - name: http
    port: 80
    targetPort: http
";

const SLICE: &str = "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
addressType: IPv4
metadata:
  name: web-abc
  namespace: shop
  labels:
    kubernetes.io/service-name: web
endpoints:
- addresses: [10.244.0.5]
  nodeName: node-a
ports:
- name: http
  port: 8080
";

fn load(dir: &TempDir) -> (Objects, Vec<Problem>) {
    load_dir(dir.path()).expect("readable dir")
}

fn problem_at<'a>(problems: &'a [Problem], object: &str) -> &'a Problem {
    problems
        .iter()
        .find(|p| p.object == object)
        .unwrap_or_else(|| panic!("no problem for {object}: {problems:?}"))
}

#[test]
fn multi_document_file_is_loaded_and_served() {
    let dir = TempDir::new();
    dir.write("web.yaml", &format!("---\n{SVC}---\n{SLICE}---\n"));
    let (o, problems) = load(&dir);
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(o.services.len(), 1);
    assert_eq!(o.slices.len(), 1);
    let d = compute(&o, &ModelConfig::new("node-a"));
    assert!(d.problems.is_empty(), "{:?}", d.problems);
    assert_eq!(d.frontends.len(), 1);
    let fe = d.frontends.values().next().expect("frontend");
    assert_eq!(fe.owner, "shop/web:http");
    assert_eq!(fe.backends.len(), 1);
    assert_eq!(fe.backends[0].port, 8080);
}

#[test]
fn yaml_and_yml_files_in_name_order_others_ignored() {
    let dir = TempDir::new();
    let pod = |name: &str| {
        format!("apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  containers: []\n")
    };
    dir.write("b.yml", &pod("from-b"))
        .write("a.yaml", &pod("from-a"))
        .write("c.json", &pod("from-json"))
        .write("notes.txt", "hello")
        .write(".hidden.yaml", &pod("hidden"))
        .write("README.md", "# not a manifest");
    std::fs::create_dir(dir.path().join("sub.yaml")).expect("mkdir");
    let (o, problems) = load(&dir);
    assert!(problems.is_empty(), "{problems:?}");
    let names: Vec<_> = o
        .pods
        .iter()
        .map(|p| p.metadata.name.clone().unwrap_or_default())
        .collect();
    assert_eq!(names, vec!["from-a", "from-b"]);
}

#[test]
fn kubectl_list_and_typed_lists() {
    let dir = TempDir::new();
    // `kubectl get svc,endpointslices -o yaml`: kind List, items with their own kind.
    let list = format!(
        "apiVersion: v1\nkind: List\nmetadata:\n  resourceVersion: \"\"\nitems:\n{}{}",
        indent_item(SVC),
        indent_item(SLICE)
    );
    dir.write("list.yaml", &list);
    // The raw API list: items carry no apiVersion/kind.
    dir.write(
        "typed.yaml",
        "apiVersion: v1\nkind: ServiceList\nmetadata:\n  resourceVersion: \"42\"\nitems:\n- metadata:\n    name: other\n    namespace: default\n  spec:\n    clusterIP: 10.96.0.200\n    ports:\n    - port: 443\n",
    );
    let (o, problems) = load(&dir);
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(o.services.len(), 2);
    assert_eq!(o.slices.len(), 1);
}

fn indent_item(doc: &str) -> String {
    let mut out = String::new();
    for (i, line) in doc.lines().enumerate() {
        out.push_str(if i == 0 { "- " } else { "  " });
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[test]
fn unknown_kinds_become_problems_with_file_and_document() {
    let dir = TempDir::new();
    dir.write(
        "app.yaml",
        &format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\n---\n{SVC}---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: cfg\ndata: {{}}\n"
        ),
    );
    let (o, problems) = load(&dir);
    assert_eq!(o.services.len(), 1);
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(problem_at(&problems, "app.yaml document 1")
        .reason
        .contains("Deployment"));
    assert!(problem_at(&problems, "app.yaml document 3")
        .reason
        .contains("ConfigMap"));
}

#[test]
fn broken_documents_do_not_hide_the_others() {
    let dir = TempDir::new();
    dir.write(
        "mixed.yaml",
        &format!("key: [unclosed\n---\n{SVC}---\n- just\n- a list\n---\nfoo: bar\n---\n{SLICE}"),
    );
    let (o, problems) = load(&dir);
    assert_eq!(o.services.len(), 1);
    assert_eq!(o.slices.len(), 1);
    assert!(problem_at(&problems, "mixed.yaml document 1")
        .reason
        .contains("invalid YAML"));
    assert!(problem_at(&problems, "mixed.yaml document 3")
        .reason
        .contains("not a Kubernetes object"));
    assert!(problem_at(&problems, "mixed.yaml document 4")
        .reason
        .contains("no apiVersion/kind"));
    assert_eq!(problems.len(), 3);
}

#[test]
fn wrongly_typed_field_is_a_problem() {
    let dir = TempDir::new();
    dir.write(
        "bad.yaml",
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: bad\nspec:\n  ports:\n  - port: eighty\n",
    );
    let (o, problems) = load(&dir);
    assert!(o.services.is_empty());
    let p = problem_at(&problems, "bad.yaml document 1");
    assert!(p.reason.contains("invalid Service \"bad\""), "{p}");
}

#[test]
fn missing_namespace_defaults_to_default() {
    let dir = TempDir::new();
    dir.write("svc.yaml", &SVC.replace("  namespace: shop\n", ""));
    let (o, _) = load(&dir);
    assert_eq!(o.services[0].metadata.namespace.as_deref(), Some("default"));
}

#[test]
fn empty_files_comments_and_document_end_markers() {
    let dir = TempDir::new();
    dir.write("empty.yaml", "")
        .write("comments.yaml", "# nothing here\n---\n# still nothing\n")
        .write("ended.yaml", &format!("{SVC}...\n---\n{SLICE}"));
    let (o, problems) = load(&dir);
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(o.services.len(), 1);
    assert_eq!(o.slices.len(), 1);
}

#[test]
fn unreadable_directory_is_an_error() {
    let dir = TempDir::new();
    let missing = dir.path().join("does-not-exist");
    match load_dir(&missing) {
        Err(ManifestError::ReadDir { dir, .. }) => assert_eq!(dir, missing),
        other => panic!("expected ReadDir error, got {other:?}"),
    }
}

/// A cluster-wide Node dump is the normal input: every agent reading the same directory finds
/// its own Node by name and knows the others; a missing own Node is a reported problem.
#[test]
fn every_agent_finds_its_own_node_in_a_cluster_wide_dump() {
    let dir = TempDir::new();
    let node = |name: &str, addr: &str| {
        format!("apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\nstatus:\n  addresses:\n  - type: InternalIP\n    address: {addr}\n  - type: Hostname\n    address: {name}\n")
    };
    dir.write(
        "nodes.yaml",
        &format!(
            "{}---\n{}---\n{}",
            node("node-a", "192.168.1.10"),
            node("node-b", "192.168.1.11"),
            node("node-a", "192.168.1.99"),
        ),
    );
    let (o, problems) = load(&dir);
    let names: Vec<_> = o
        .nodes
        .iter()
        .filter_map(|n| n.metadata.name.clone())
        .collect();
    assert_eq!(names, ["node-a", "node-b"]);
    assert!(problem_at(&problems, "nodes.yaml document 3")
        .reason
        .contains("Node node-a is defined again"));

    let ip = |s: &str| s.parse::<std::net::Ipv4Addr>().expect("ip");
    for (me, mine, peer, peer_ip) in [
        ("node-a", "192.168.1.10", "node-b", "192.168.1.11"),
        ("node-b", "192.168.1.11", "node-a", "192.168.1.10"),
    ] {
        let d = compute(&o, &ModelConfig::new(me));
        assert!(d.own_node_found, "{me}");
        assert!(d.problems.is_empty(), "{me}: {:?}", d.problems);
        assert_eq!(
            d.node_addrs.into_iter().collect::<Vec<_>>(),
            vec![ip(mine)],
            "{me}"
        );
        assert_eq!(
            d.peer_nodes.into_iter().collect::<Vec<_>>(),
            vec![(peer.to_string(), ip(peer_ip))],
            "{me}"
        );
    }

    // No Node for this agent: a reported condition, and only the --node-addr addresses.
    let mut cfg = ModelConfig::new("node-c");
    cfg.extra_node_addrs = vec![ip("10.0.0.7")];
    let d = compute(&o, &cfg);
    assert!(!d.own_node_found);
    assert_eq!(
        d.node_addrs.into_iter().collect::<Vec<_>>(),
        vec![ip("10.0.0.7")]
    );
    assert_eq!(d.peer_nodes.len(), 2);
    let w = d.node_warning.expect("a warning for the missing Node");
    assert!(
        w.starts_with("Node node-c:")
            && w.contains("not found among 2 Node(s)")
            && w.contains("10.0.0.7"),
        "{w}"
    );
    let d = compute(&o, &ModelConfig::new("node-a"));
    assert_eq!(d.node_warning, None);
}

#[test]
fn load_str_appends_to_existing_objects() {
    let mut o = Objects::default();
    let mut problems = Vec::new();
    load_str("one", SVC, &mut o, &mut problems);
    load_str("two", SLICE, &mut o, &mut problems);
    load_str("three", "kind: Service\n", &mut o, &mut problems);
    assert_eq!(o.services.len(), 1);
    assert_eq!(o.slices.len(), 1);
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].object, "three document 1");
}

#[test]
fn crlf_line_endings_are_fine() {
    let dir = TempDir::new();
    dir.write(
        "win.yaml",
        &format!("{SVC}---\n{SLICE}").replace('\n', "\r\n"),
    );
    let (o, problems) = load(&dir);
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(o.services.len(), 1);
    assert_eq!(o.slices.len(), 1);
}

#[test]
fn byte_order_mark_and_merge_keys() {
    let dir = TempDir::new();
    dir.write("bom.yaml", &format!("\u{feff}{SVC}"));
    dir.write(
        "anchors.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: &meta\n  name: a\n  namespace: default\n  labels: {app: x}\nspec:\n  containers: []\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  <<: {namespace: default, labels: {app: y}}\n  name: b\nspec:\n  containers: []\n",
    );
    let (o, problems) = load(&dir);
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(o.services.len(), 1);
    assert_eq!(o.pods.len(), 2);
    let b = &o.pods[1];
    assert_eq!(b.metadata.name.as_deref(), Some("b"));
    let labels = b.metadata.labels.as_ref().expect("merged labels");
    assert_eq!(labels.get("app").map(String::as_str), Some("y"));
}

/// A Local Service with a healthCheckNodePort and its EndpointSlice (endpoints on `nodes`).
fn local_svc(name: &str, node_port: u16, hc: u16, nodes: &[(&str, &str, bool)]) -> String {
    let mut s = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.{}\n  externalTrafficPolicy: Local\n  healthCheckNodePort: {hc}\n  ports:\n  - name: http\n    port: 80\n    targetPort: 8080\n    nodePort: {node_port}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  namespace: default\n  labels:\n    kubernetes.io/service-name: {name}\naddressType: IPv4\nports:\n- name: http\n  port: 8080\n  protocol: TCP\nendpoints:\n",
        name.len()
    );
    for (ip, node, ready) in nodes {
        s.push_str(&format!(
            "- addresses: [\"{ip}\"]\n  nodeName: {node}\n  conditions:\n    ready: {ready}\n"
        ));
    }
    s
}

/// healthCheckNodePort: served for Local Services with the count of this node's ready
/// endpoints (distinct addresses); a port that collides with a NodePort frontend or another
/// Service's health check is a problem and not served, the rest still are.
#[test]
fn health_check_node_ports_count_local_ready_endpoints_and_report_collisions() {
    let dir = TempDir::new();
    dir.write(
        "svcs.yaml",
        &[
            local_svc(
                "web",
                30080,
                32000,
                &[
                    ("10.244.0.10", "node-a", true),
                    ("10.244.0.11", "node-a", false),
                    ("10.244.1.10", "node-b", true),
                ],
            ),
            local_svc("api", 30081, 32000, &[("10.244.0.12", "node-a", true)]),
            local_svc("clash", 30082, 30080, &[("10.244.0.13", "node-a", true)]),
        ]
        .join("---\n"),
    );
    let (o, problems) = load(&dir);
    assert!(problems.is_empty(), "{problems:?}");
    let d = compute(&o, &ModelConfig::new("node-a"));
    let served: Vec<_> = d
        .health_checks
        .iter()
        .map(|(p, h)| (*p, h.namespace.as_str(), h.name.as_str(), h.local_endpoints))
        .collect();
    // Services without a creationTimestamp claim in namespace/name order: api before web.
    assert_eq!(served, [(32000, "default", "api", 1)]);
    let reasons: Vec<_> = d
        .problems
        .iter()
        .map(|p| (p.object.as_str(), p.reason.as_str()))
        .collect();
    assert!(
        reasons.iter().any(|(o, r)| *o == "Service default/web"
            && r.contains("healthCheckNodePort 32000 is already the health check of default/api")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|(o, r)| *o == "Service default/clash"
            && r.contains("healthCheckNodePort 30080 collides with the frontend")
            && r.contains("default/web")),
        "{reasons:?}"
    );

    // Another node: web's only ready endpoint there counts; api has none there (503 later).
    let dir = TempDir::new();
    dir.write(
        "svcs.yaml",
        &local_svc(
            "web",
            30080,
            32000,
            &[
                ("10.244.0.10", "node-a", true),
                ("10.244.1.10", "node-b", true),
                ("10.244.1.11", "node-b", false),
            ],
        ),
    );
    let (o, _) = load(&dir);
    for (node, want) in [("node-a", 1), ("node-b", 1), ("node-c", 0)] {
        let d = compute(&o, &ModelConfig::new(node));
        assert_eq!(
            d.health_checks.get(&32000).map(|h| h.local_endpoints),
            Some(want),
            "{node}"
        );
    }
}

/// sessionAffinity ClientIP: every frontend of the Service carries the timeout (default
/// 10800 s); an out-of-range timeout is a problem and the default is used.
#[test]
fn session_affinity_client_ip_timeout_on_every_frontend() {
    let svc = |name: &str, affinity: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.{}\n{affinity}  ports:\n  - name: http\n    port: 80\n    targetPort: 8080\n    nodePort: 3008{}\n",
            name.len(),
            name.len()
        )
    };
    let dir = TempDir::new();
    dir.write(
        "svcs.yaml",
        &[
            svc("a", "  sessionAffinity: ClientIP\n"),
            svc("bb", "  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      timeoutSeconds: 60\n"),
            svc("ccc", "  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      timeoutSeconds: 90000\n"),
            svc("dddd", "  sessionAffinity: None\n"),
        ]
        .join("---\n"),
    );
    let (o, problems) = load(&dir);
    assert!(problems.is_empty(), "{problems:?}");
    let d = compute(&o, &ModelConfig::new("node-a"));
    let mut by_owner: std::collections::BTreeMap<String, std::collections::BTreeSet<u32>> =
        Default::default();
    for fe in d.frontends.values() {
        by_owner
            .entry(fe.owner.to_string())
            .or_default()
            .insert(fe.affinity_timeout_s);
    }
    let got: Vec<(String, Vec<u32>)> = by_owner
        .into_iter()
        .map(|(k, v)| (k, v.into_iter().collect()))
        .collect();
    assert_eq!(
        got,
        [
            ("default/a:http".to_string(), vec![10_800]),
            ("default/bb:http".to_string(), vec![60]),
            ("default/ccc:http".to_string(), vec![10_800]),
            ("default/dddd:http".to_string(), vec![0]),
        ]
    );
    assert_eq!(
        d.frontends.len(),
        8,
        "a ClusterIP and a NodePort frontend each"
    );
    assert!(
        d.problems.iter().any(|p| p.object == "Service default/ccc"
            && p.reason
                .contains("timeoutSeconds 90000 is not in 1..=86400")),
        "{:?}",
        d.problems
    );
}

/// kube-proxy's semantics for two review findings: a missing `serving` condition means
/// serving (a terminating endpoint without it is still a fallback backend), and Services
/// labelled for another proxy or as headless are skipped.
#[test]
fn missing_serving_means_serving_and_proxy_name_or_headless_labels_skip() {
    let svc = |name: &str, labels: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\n{labels}spec:\n  clusterIP: 10.96.1.{}\n  ports:\n  - name: http\n    port: 80\n    targetPort: 8080\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  namespace: default\n  labels:\n    kubernetes.io/service-name: {name}\naddressType: IPv4\nports:\n- name: http\n  port: 8080\n  protocol: TCP\nendpoints:\n- addresses: [\"10.244.0.9\"]\n  nodeName: node-a\n  conditions:\n    ready: false\n    terminating: true\n",
            name.len()
        )
    };
    let dir = TempDir::new();
    dir.write(
        "svcs.yaml",
        &[
            svc("plain", ""),
            svc(
                "other",
                "  labels:\n    service.kubernetes.io/service-proxy-name: cilium\n",
            ),
            svc(
                "hl",
                "  labels:\n    service.kubernetes.io/headless: \"\"\n",
            ),
        ]
        .join("---\n"),
    );
    let (o, problems) = load(&dir);
    assert!(problems.is_empty(), "{problems:?}");
    let d = compute(&o, &ModelConfig::new("node-a"));
    let owners: Vec<&str> = d.frontends.values().map(|f| f.owner.as_str()).collect();
    assert_eq!(
        owners,
        ["default/plain:http"],
        "only the unlabelled Service"
    );
    let fe = d.frontends.values().next().expect("one frontend");
    assert_eq!(
        fe.backends.len(),
        1,
        "the terminating endpoint without `serving` serves"
    );
    assert!(fe.backends[0].terminating);
}

// ---------------------------------------------------------------------------------------
// The agent's incremental reader (`ManifestDir`)

fn service_yaml(name: &str, ip: &str, port: u16) -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\n\
         spec:\n  clusterIP: {ip}\n  ports:\n  - name: http\n    port: {port}\n    \
         protocol: TCP\n"
    )
}

/// The frontends `(address, port)` the controller `c` holds, after a reconcile.
fn frontends_of(c: &mut lb_agent::controller::Controller) -> Vec<(String, u16)> {
    c.reconcile();
    c.desired()
        .frontends
        .keys()
        .map(|id| (id.addr.to_string(), id.port))
        .collect()
}

/// The first read of a directory comes file by file, in name order (applied while the rest
/// is parsed); an object defined again in a later file keeps the first definition there as
/// when read at once, and takes the later one when the first file goes.
#[test]
fn first_read_streams_file_by_file_and_keeps_the_first_definition() {
    use lb_agent::controller::Controller;
    use lb_agent::source::manifests::ManifestDir;
    let dir = TempDir::new();
    for i in 0..12 {
        dir.write(
            &format!("f{i:02}.yaml"),
            &service_yaml(&format!("svc{i}"), &format!("10.96.0.{}", 10 + i), 80),
        );
    }
    // f03 defines web first; f07 defines it again on another port.
    dir.write(
        "f03.yaml",
        &(service_yaml("svc3", "10.96.0.13", 80) + &service_yaml("web", "10.96.1.1", 80)),
    );
    dir.write(
        "f07.yaml",
        &(service_yaml("svc7", "10.96.0.17", 80) + &service_yaml("web", "10.96.1.1", 8080)),
    );
    let cfg = ModelConfig::new("node-a");
    let mut reader = ManifestDir::new(dir.path(), cfg.clone()).expect("dir");
    let mut parts = Vec::new();
    reader
        .poll_each(&mut |p| parts.push(p))
        .expect("first read");
    assert_eq!(parts.len(), 12, "one part per file");
    assert!(parts.iter().all(|p| p.parsed == 1));
    let mut c = Controller::new(cfg.clone());
    let mut problems = Vec::new();
    for p in parts {
        problems.extend(p.problems);
        for ch in p.changes {
            ch.apply(&mut c);
        }
    }
    let fes = frontends_of(&mut c);
    assert_eq!(fes.len(), 13, "{fes:?}");
    assert!(fes.contains(&("10.96.1.1".into(), 80)), "{fes:?}");
    assert!(!fes.contains(&("10.96.1.1".into(), 8080)), "{fes:?}");
    assert!(
        problems
            .iter()
            .any(|p| p.object.starts_with("f07.yaml") && p.reason.contains("defined again")),
        "{problems:?}"
    );

    // The same as the reader's batch path: a directory holding one file at first, then
    // the other eleven read by one poll.
    let batch = TempDir::new();
    std::fs::copy(dir.path().join("f00.yaml"), batch.path().join("f00.yaml")).expect("copy");
    let mut other = ManifestDir::new(batch.path(), cfg.clone()).expect("dir");
    let mut c2 = Controller::new(cfg.clone());
    let first = other.poll().expect("read");
    assert_eq!(first.parsed, 1);
    for ch in first.changes {
        ch.apply(&mut c2);
    }
    for i in 1..12 {
        let f = format!("f{i:02}.yaml");
        std::fs::copy(dir.path().join(&f), batch.path().join(&f)).expect("copy");
    }
    let rest = other.poll().expect("read");
    assert_eq!(rest.parsed, 11);
    for ch in rest.changes {
        ch.apply(&mut c2);
    }
    assert_eq!(frontends_of(&mut c2), fes);

    // The first definer goes: the later one takes over.
    std::fs::remove_file(dir.path().join("f03.yaml")).expect("remove");
    for ch in reader.poll().expect("poll").changes {
        ch.apply(&mut c);
    }
    let fes = frontends_of(&mut c);
    assert!(fes.contains(&("10.96.1.1".into(), 8080)), "{fes:?}");
    assert!(!fes.contains(&("10.96.0.13".into(), 80)), "{fes:?}");
    assert_eq!(fes.len(), 12, "{fes:?}");
}

/// Random edits of a directory (files written, rewritten and removed; objects defined in
/// several files and twice in one), polled after each: the objects the incremental reader
/// reported, applied in turn, are always those a full read gives, each by its first
/// definition in file-name order. 400 steps over 6 files and 10 objects.
#[test]
fn incremental_reads_match_a_full_read_under_random_edits() {
    use lb_agent::model::{ServiceView, SliceView};
    use lb_agent::source::manifests::ManifestDir;
    use lb_agent::source::Change;
    use std::collections::BTreeMap;
    use std::time::{Duration, SystemTime};

    let dir = TempDir::new();
    let cfg = ModelConfig::new("node-a");
    let mut reader = ManifestDir::new(dir.path(), cfg.clone()).expect("dir");
    // What the reader reported so far: object -> its view, as text.
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let mut clock = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    for step in 0..400 {
        let file = format!("f{}.yaml", next(6));
        let path = dir.path().join(&file);
        if next(5) == 0 {
            let _ = std::fs::remove_file(&path);
        } else {
            let mut text = String::new();
            for _ in 0..next(5) {
                let i = next(10);
                let port = 80 + next(3) as u16;
                if next(2) == 0 {
                    text += &service_yaml(&format!("svc{i}"), &format!("10.96.0.{i}"), port);
                } else {
                    text += &format!(
                        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  \
                         name: svc{i}-x\n  namespace: default\n  labels:\n    \
                         kubernetes.io/service-name: svc{i}\naddressType: IPv4\nports:\n- \
                         name: http\n  port: {port}\n  protocol: TCP\nendpoints:\n- addresses: \
                         [\"10.244.0.{i}\"]\n"
                    );
                }
            }
            std::fs::write(&path, &text).expect("write");
            // A new modification time every step: the reader's fingerprint is (size, mtime).
            clock += Duration::from_secs(1);
            let f = std::fs::File::options()
                .write(true)
                .open(&path)
                .expect("open");
            f.set_modified(clock).expect("set mtime");
        }
        for ch in reader.poll().expect("poll").changes {
            match ch {
                Change::Service(k, v) => {
                    let key = format!("Service {}/{}", k.namespace, k.name);
                    match v {
                        Some(v) => seen.insert(key, format!("{v:?}")),
                        None => seen.remove(&key),
                    };
                }
                Change::Slice(k, v) => {
                    let key = format!("EndpointSlice {}/{}", k.namespace, k.name);
                    match v {
                        Some(v) => seen.insert(key, format!("{v:?}")),
                        None => seen.remove(&key),
                    };
                }
                other => panic!("step {step}: unexpected change {other:?}"),
            }
        }
        // A full read: the first definition of each object, in file-name order.
        let (objects, _) = load_dir(dir.path()).expect("load");
        let mut want: BTreeMap<String, String> = BTreeMap::new();
        for s in &objects.services {
            let v = ServiceView::new(s, &cfg);
            want.entry(format!("Service {}/{}", v.namespace, v.name))
                .or_insert(format!("{v:?}"));
        }
        for s in &objects.slices {
            let key = format!(
                "EndpointSlice {}/{}",
                s.metadata.namespace.as_deref().unwrap_or(""),
                s.metadata.name.as_deref().unwrap_or("")
            );
            if let Some(v) = SliceView::new(s, &cfg) {
                want.entry(key).or_insert(format!("{v:?}"));
            }
        }
        assert_eq!(seen, want, "step {step}");
    }
}
