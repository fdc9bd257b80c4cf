//! Drift repair: the real `lb-agent` with a short `--resync-interval`; map entries changed,
//! removed or added behind its back (as a bug, a crash of another writer or a person with
//! bpftool might) are found and repaired at the next resync, and traffic works again.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use lb_agent::{
    dataplane::{BpfDataplane, Dataplane as _},
    loader::PinLayout,
};
use lb_common::{Backend4, Frontend4Key, Service4Value, IPPROTO_TCP};
use lb_testkit::{
    agent::{
        node_yaml, service_yaml, start_agent_with, write_manifest, Endpoint, ManifestDir, SvcPort,
        NODE_NAME,
    },
    bpffs::PinDir,
    lab::{http_get, pod_ip, Lab, LabConfig, NODE_IP},
};

const SVC_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const T: Duration = Duration::from_secs(3);

/// The maps as the datapath reads them: frontend -> (flags, count, svc id, backends in slot
/// order); and every backend id present.
type View = (
    BTreeMap<Frontend4Key, (u16, u16, Vec<Backend4>)>,
    Vec<u32>,
    usize,
);

fn view(dp: &BpfDataplane) -> View {
    let services: BTreeMap<Frontend4Key, Service4Value> =
        dp.services().expect("services").into_iter().collect();
    let backends: BTreeMap<u32, Backend4> = dp.backends().expect("backends").into_iter().collect();
    let fes = services
        .iter()
        .filter(|(k, _)| k.slot == 0)
        .map(|(k, m)| {
            let list = (1..=m.count)
                .map(|s| {
                    services
                        .get(&k.with_slot(s))
                        .and_then(|v| backends.get(&v.backend_id))
                        .copied()
                        .unwrap_or_default()
                })
                .collect();
            (*k, (m.flags, m.count, list))
        })
        .collect();
    (fes, backends.keys().copied().collect(), services.len())
}

fn wait(what: &str, deadline: Duration, mut ok: impl FnMut() -> bool) {
    let until = Instant::now() + deadline;
    while !ok() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn resync_repairs_entries_changed_behind_the_agents_back() {
    lb_testkit::lab::require_root();
    let mut lab = Lab::new(LabConfig { pods: 2 });
    lab.wait_reachable();
    lab.start_pod_servers(&[80], &[], &[]);
    let manifests = ManifestDir::new("resync");
    let ports = [SvcPort {
        name: "http",
        proto: "TCP",
        port: 80,
        target: 80,
        node_port: Some(30001),
    }];
    let eps: Vec<Endpoint> = [0, 1]
        .iter()
        .map(|i| Endpoint {
            ip: pod_ip(*i),
            ready: true,
            node: NODE_NAME,
        })
        .collect();
    write_manifest(
        manifests.path(),
        "node.yaml",
        &[node_yaml(NODE_NAME, NODE_IP)],
    );
    write_manifest(
        manifests.path(),
        "web.yaml",
        &[service_yaml("web", "NodePort", SVC_IP, false, &ports, &eps)],
    );
    let pins = PinDir::new("resync");
    let agent = start_agent_with(&lab, &pins, manifests.path(), &["--resync-interval", "1s"]);
    let np = SocketAddrV4::new(NODE_IP, 30001);
    let get = || lab.client.enter(|| http_get(np, "/", T));
    wait("the NodePort to answer", Duration::from_secs(10), || {
        get().is_ok()
    });
    let mut dp = BpfDataplane::open(&PinLayout::new(pins.path())).expect("open the maps");
    let good = view(&dp);
    assert_eq!(good.0.len(), 2, "NodePort and ClusterIP: {good:?}");
    // A resync of maps that are right writes nothing.
    wait(
        "a resync that found nothing to do",
        Duration::from_secs(10),
        || {
            agent
                .proc
                .log()
                .lines()
                .any(|l| l.contains("0 puts, 0 deletes") && l.contains("resync"))
        },
    );

    // Drift: the NodePort's slot 1 points at the other backend, the ClusterIP's master is
    // gone, a backend's port changed, and a stray frontend and backend appeared.
    let nodeport = Frontend4Key::new(0, 30001u16.to_be(), IPPROTO_TCP, 0);
    let clusterip = Frontend4Key::new(u32::from(SVC_IP).to_be(), 80u16.to_be(), IPPROTO_TCP, 0);
    let s1 = dp
        .service(&nodeport.with_slot(1))
        .expect("read")
        .expect("slot 1");
    let s2 = dp
        .service(&nodeport.with_slot(2))
        .expect("read")
        .expect("slot 2");
    dp.put_service(nodeport.with_slot(1), s2)
        .expect("corrupt slot 1");
    dp.delete_service(&clusterip).expect("delete a master");
    let (bid, mut b) = dp.backends().expect("backends")[0];
    b.port = 9u16.to_be();
    dp.put_backend(bid, b).expect("corrupt a backend");
    let stray = Frontend4Key::new(
        u32::from(Ipv4Addr::new(10, 96, 9, 9)).to_be(),
        80u16.to_be(),
        IPPROTO_TCP,
        0,
    );
    dp.put_service(stray, Service4Value::default())
        .expect("stray master");
    dp.put_backend(
        4_000_000,
        Backend4 {
            addr: 1,
            port: 1,
            proto: IPPROTO_TCP,
            flags: 0,
            node_addr: 0,
        },
    )
    .expect("stray backend");
    assert_ne!(view(&dp), good);
    let _ = s1;

    // The next resync puts everything back (the backend ids may differ: compare contents).
    let contents = |v: &View| (v.0.clone(), v.1.len(), v.2);
    wait(
        "the resync to repair the maps",
        Duration::from_secs(10),
        || contents(&view(&dp)) == contents(&good),
    );
    for _ in 0..20 {
        let body = get().expect("the NodePort answers after the repair");
        assert!(body.starts_with("pod"), "{body}");
    }
    assert!(agent.proc.log().contains("resync"), "{}", agent.proc.log());
}
