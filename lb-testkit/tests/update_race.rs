//! The update race (needs root): XDP never drops a packet because the agent is between two
//! writes. New flows run through `BPF_PROG_RUN` in a loop while the agent's own `Syncer`
//! applies 10,000 backend changes (growing, shrinking, replacing) to the same pinned maps;
//! `xdp_drop_backend_missing` must stay at 0, and every rewritten frame goes to a backend.
use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lb_agent::dataplane::BpfDataplane;
use lb_agent::loader::PinLayout;
use lb_agent::model::{Backend, Desired, Frontend, FrontendId, Proto};
use lb_agent::sync::{Limits, Syncer};
use lb_common::{service::flags, Reason};
use lb_testkit::{
    harness::{stat_deltas, Harness, Prog, XDP_PASS},
    packet::{Pkt, TCP_SYN},
};

const NODE: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
const NODE_PORT: u16 = 30080;
const CHANGES: usize = 10_000;
/// Bound on the whole test, whatever the machine's speed.
const DEADLINE: Duration = Duration::from_secs(240);

fn pool(i: u8) -> Backend {
    Backend {
        addr: Ipv4Addr::new(10, 244, 0, 10 + i),
        port: 8080,
        remote: false,
        terminating: false,
    }
}

/// A desired state with the NodePort frontend backed by `backends`.
fn desired(backends: &[u8]) -> Desired {
    let mut d = Desired::default();
    d.node_addrs.insert(NODE);
    let mut bs: Vec<Backend> = backends.iter().map(|i| pool(*i)).collect();
    bs.sort();
    bs.dedup();
    d.frontends.insert(
        FrontendId::new(Ipv4Addr::UNSPECIFIED, NODE_PORT, Proto::Tcp),
        Frontend {
            flags: flags::NODEPORT,
            owner: "default/web:http".into(),
            backends: bs,
            affinity_timeout_s: 0,
        },
    );
    d
}

#[test]
fn xdp_never_drops_while_the_agent_applies_10000_backend_changes() {
    let mut h = Harness::new("race", &Default::default());
    let pins = PinLayout::new(h.pin_dir());
    let mut dp = BpfDataplane::open(&pins).expect("open the pinned maps");
    let mut syncer = Syncer::new(Limits::default());
    assert!(syncer.apply(&desired(&[0, 1, 2, 3]), &mut dp).is_ok());

    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let done = done.clone();
        std::thread::spawn(move || {
            // A deterministic walk over sizes 1..=8 from a pool of 16 backends.
            let mut x: u32 = 0x9e37_79b9;
            let start = Instant::now();
            let mut applied = 0;
            for _ in 0..CHANGES {
                if start.elapsed() > DEADLINE / 2 {
                    break;
                }
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                // Mostly the widest swings (8 backends to 1 and back: a shrink deletes 7 slots
                // right after the master's count drops), sometimes a random set.
                let set: Vec<u8> = match applied % 4 {
                    0 | 2 => (0..8).collect(),
                    1 => vec![((x >> 8) % 16) as u8],
                    _ => {
                        let n = 1 + (x % 8) as u8;
                        let first = ((x >> 8) % 16) as u8;
                        (0..n).map(|k| (first + k * 3) % 16).collect()
                    }
                };
                let r = syncer.apply(&desired(&set), &mut dp);
                assert!(r.is_ok(), "{:?}", r.failures);
                applied += 1;
            }
            done.store(true, Ordering::SeqCst);
            applied
        })
    };

    let before = h.stats();
    let all: BTreeSet<SocketAddrV4> = (0..16)
        .map(|i| SocketAddrV4::new(pool(i).addr, 8080))
        .collect();
    let start = Instant::now();
    let (mut runs, mut dropped) = (0u64, 0u64);
    let mut i = 0u32;
    while !done.load(Ordering::SeqCst) && start.elapsed() < DEADLINE {
        i += 1;
        let client = SocketAddrV4::new(
            Ipv4Addr::from(0x0a01_0000 + i / 50_000),
            10_000 + (i % 50_000) as u16,
        );
        let (v, out) = h.run(
            Prog::Xdp,
            &Pkt::tcp(client, SocketAddrV4::new(NODE, NODE_PORT), TCP_SYN).build(),
        );
        runs += 1;
        if v != XDP_PASS {
            dropped += 1;
            continue;
        }
        let dst = SocketAddrV4::new(
            Ipv4Addr::new(out[30], out[31], out[32], out[33]),
            u16::from_be_bytes([out[36], out[37]]),
        );
        assert!(
            all.contains(&dst),
            "run {runs}: DNATed to {dst}, not a backend"
        );
    }
    let applied = writer.join().expect("the writer thread");
    let d = stat_deltas(&before, &h.stats());
    println!(
        "{applied} backend changes applied while {runs} new flows ran through XDP, {dropped} \
         dropped: {d:?}"
    );
    assert_eq!(applied, CHANGES, "the writer did not finish in time");
    assert!(runs > 1_000, "only {runs} flows ran during the changes");
    assert_eq!(dropped, 0, "{dropped} of {runs} new flows dropped: {d:?}");
    assert_eq!(d.get(&Reason::XdpDropBackendMissing), None, "{d:?}");
    assert_eq!(
        d.get(&Reason::XdpFwdNewFlow).map(|c| c.0),
        Some(runs),
        "{d:?}"
    );
}
