//! Conntrack garbage collection. The datapath expires an idle flow when its next packet
//! comes; flows that never send again are collected here: every `--ct-gc-interval` the
//! agent reads the whole `LB4_CT` map and the half-open table `LB4_CT_SYN` with
//! `BPF_MAP_LOOKUP_BATCH`, deletes with `BPF_MAP_DELETE_BATCH` every entry idle for longer
//! than its timeout (by protocol and TCP state, `LbConfig::ct_timeout_s`), and empties the
//! half-open slots whose flow expired. It runs on a thread of its own, never on the async
//! workers.
use std::os::fd::AsFd as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lb_common::{maps, Ct4Key, Ct4Value, HalfOpen4, LbConfig};

use crate::bpfsys;
use crate::pins::{io_err, open_pinned_map, LoadError, PinLayout};

/// Entries read or deleted per batch syscall.
const BATCH: usize = 4096;
const NS_PER_SEC: u64 = 1_000_000_000;

/// Whether the entry (`key`, `v`) has been idle past its timeout at `now_ns`
/// (`CLOCK_MONOTONIC`, the clock of `bpf_ktime_get_coarse_ns`, whose timestamps trail it by
/// up to a tick).
pub fn is_expired(key: &Ct4Key, v: &Ct4Value, now_ns: u64, cfg: &LbConfig) -> bool {
    let timeout = u64::from(cfg.ct_timeout_s(key.proto, v.flags)) * NS_PER_SEC;
    now_ns.saturating_sub(v.last_seen_ns) > timeout
}

/// The keys of `entries` expired at `now_ns`.
pub fn expired_keys(entries: &[(Ct4Key, Ct4Value)], now_ns: u64, cfg: &LbConfig) -> Vec<Ct4Key> {
    entries
        .iter()
        .filter(|(k, v)| is_expired(k, v, now_ns, cfg))
        .map(|(k, _)| *k)
        .collect()
}

/// The slots of the half-open table (`LB4_CT_SYN`, an array) that hold a flow, with their
/// indexes.
pub fn half_open_slots(map: std::os::fd::BorrowedFd<'_>) -> std::io::Result<Vec<(u32, HalfOpen4)>> {
    let mut slots: Vec<(u32, HalfOpen4)> = bpfsys::map_lookup_batch(map, BATCH)?;
    slots.retain(|(_, s)| s.sealed());
    Ok(slots)
}

/// The conntrack entries half-open slots stand for: each its forward entry, and its reply
/// entry unless the flow is SNATed (as `LB4_CT` holds them once established).
pub fn half_open_entries(slots: &[(u32, HalfOpen4)]) -> Vec<(Ct4Key, Ct4Value)> {
    slots
        .iter()
        .flat_map(|(_, s)| std::iter::once(s.forward()).chain(s.reply()))
        .collect()
}

/// Whether the half-open flow in `slot` has been idle past its timeout at `now_ns`.
fn half_open_expired(slot: &HalfOpen4, now_ns: u64, cfg: &LbConfig) -> bool {
    let (k, v) = slot.forward();
    is_expired(&k, &v, now_ns, cfg)
}

/// `CLOCK_MONOTONIC` now, in nanoseconds.
pub fn monotonic_ns() -> u64 {
    // SAFETY: clock_gettime into a zeroed timespec.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: as above; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * NS_PER_SEC + ts.tv_nsec as u64
}

/// One collection's outcome.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Entries in the map when it was read.
    pub entries: usize,
    /// Entries deleted as expired.
    pub expired: usize,
    pub took: Duration,
}

/// The entries a GC walk found expired, per map, not deleted yet.
#[derive(Debug, Clone, Default)]
pub struct Scan {
    /// Entries in both maps when they were read.
    pub entries: usize,
    pub expired: Vec<(&'static str, Vec<Ct4Key>)>,
    /// Half-open slots whose flow expired, as read.
    pub expired_half_open: Vec<(u32, HalfOpen4)>,
}

/// A GC walk's first half: read every entry of both conntrack maps (`LB4_CT` and the
/// half-open table `LB4_CT_SYN`) in batches and pick the expired ones.
pub fn scan(pins: &PinLayout, cfg: &LbConfig) -> Result<Scan, LoadError> {
    let mut out = Scan::default();
    let name = maps::LB4_CT;
    let map = open_pinned_map(pins, name)?;
    let entries: Vec<(Ct4Key, Ct4Value)> = bpfsys::map_lookup_batch(map.fd().as_fd(), BATCH)
        .map_err(io_err(format!("reading {name} (batch)")))?;
    out.entries += entries.len();
    out.expired
        .push((name, expired_keys(&entries, monotonic_ns(), cfg)));
    let name = maps::LB4_CT_SYN;
    let map = open_pinned_map(pins, name)?;
    let mut slots =
        half_open_slots(map.fd().as_fd()).map_err(io_err(format!("reading {name} (batch)")))?;
    out.entries += half_open_entries(&slots).len();
    let now = monotonic_ns();
    slots.retain(|(_, s)| half_open_expired(s, now, cfg));
    out.expired_half_open = slots;
    Ok(out)
}

/// A GC walk's second half: delete the keys of `scan` whose entries are still expired. Each
/// is read again first: between the walk and now the datapath may have replaced an expired
/// flow by a new one under the same tuple (a client reusing its port), whose entries must
/// stay. Returns how many were deleted.
pub fn delete_expired(pins: &PinLayout, cfg: &LbConfig, scan: &Scan) -> Result<usize, LoadError> {
    let mut deleted = 0;
    for (name, keys) in &scan.expired {
        if keys.is_empty() {
            continue;
        }
        let data = open_pinned_map(pins, name)?;
        let fd = data.fd().as_fd();
        let now = monotonic_ns();
        let still: Vec<Ct4Key> = keys
            .iter()
            .filter(|k| {
                bpfsys::map_lookup::<Ct4Key, Ct4Value>(fd, k)
                    .ok()
                    .flatten()
                    .is_some_and(|v| is_expired(k, &v, now, cfg))
            })
            .copied()
            .collect();
        deleted += bpfsys::map_delete_batch(fd, &still, BATCH)
            .map_err(io_err(format!("deleting from {name} (batch)")))?;
    }
    if !scan.expired_half_open.is_empty() {
        deleted += empty_half_open(pins, &scan.expired_half_open)?;
    }
    Ok(deleted)
}

/// Empty the half-open `slots` that still hold the flow they held when read (a SYN may have
/// stored a newer flow there meanwhile; it stays). Returns how many conntrack entries the
/// emptied slots stood for. A SYN storing into a slot between this re-read and the write
/// loses its slot: its ACK then starts an established flow on the backend the flow hash
/// picks, the same one unless the backends changed within that instant.
pub fn empty_half_open(pins: &PinLayout, slots: &[(u32, HalfOpen4)]) -> Result<usize, LoadError> {
    let name = maps::LB4_CT_SYN;
    let data = open_pinned_map(pins, name)?;
    let fd = data.fd().as_fd();
    let mut emptied = Vec::new();
    for (i, slot) in slots {
        let now = bpfsys::map_lookup::<u32, HalfOpen4>(fd, i)
            .map_err(io_err(format!("reading {name} slot {i}")))?;
        if now.as_ref() == Some(slot) {
            emptied.push((*i, *slot));
        }
    }
    let zeroed: Vec<(u32, HalfOpen4)> = emptied
        .iter()
        .map(|(i, _)| (*i, HalfOpen4::default()))
        .collect();
    let (n, r) = bpfsys::update_batch(fd, &zeroed);
    r.map_err(io_err(format!("emptying {name} slots (batch)")))?;
    Ok(half_open_entries(&emptied[..n]).len())
}

/// Collect once: [`scan`], then [`delete_expired`].
pub fn collect(pins: &PinLayout, cfg: &LbConfig) -> Result<GcReport, LoadError> {
    let started = Instant::now();
    let s = scan(pins, cfg)?;
    let expired = delete_expired(pins, cfg, &s)?;
    Ok(GcReport {
        entries: s.entries,
        expired,
        took: started.elapsed(),
    })
}

/// What the collector has done, for `/metrics`.
#[derive(Debug, Default)]
pub struct GcStats {
    pub runs: AtomicU64,
    pub expired: AtomicU64,
    /// Entries at the last collection.
    pub entries: AtomicU64,
    pub failures: AtomicU64,
}

impl GcStats {
    fn record(&self, r: &GcReport) {
        self.runs.fetch_add(1, Ordering::Relaxed);
        self.expired.fetch_add(r.expired as u64, Ordering::Relaxed);
        self.entries.store(r.entries as u64, Ordering::Relaxed);
    }
}

/// Collect every `interval` on a thread of its own, for the life of the process.
pub fn spawn(pins: PinLayout, cfg: LbConfig, interval: Duration, stats: Arc<GcStats>) {
    let spawned = std::thread::Builder::new()
        .name("ct-gc".into())
        .spawn(move || loop {
            std::thread::sleep(interval);
            match collect(&pins, &cfg) {
                Ok(r) => {
                    stats.record(&r);
                    if r.expired > 0 {
                        log::info!(
                            "conntrack GC: {} of {} entries expired, in {:.1} ms",
                            r.expired,
                            r.entries,
                            r.took.as_secs_f64() * 1e3
                        );
                    }
                }
                Err(e) => {
                    stats.failures.fetch_add(1, Ordering::Relaxed);
                    log::warn!("conntrack GC: {e}");
                }
            }
        });
    if let Err(e) = spawned {
        log::warn!("conntrack GC: cannot start its thread: {e}; idle flows expire only on their next packet");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::{conntrack::ct_flags, IPPROTO_TCP, IPPROTO_UDP};

    fn entry(proto: u8, flags: u16, last_seen_s: u64) -> (Ct4Key, Ct4Value) {
        (
            Ct4Key {
                proto,
                sport: last_seen_s as u16,
                ..Ct4Key::default()
            },
            Ct4Value {
                flags,
                last_seen_ns: last_seen_s * NS_PER_SEC,
                ..Ct4Value::default()
            },
        )
    }

    #[test]
    fn timeouts_follow_protocol_and_tcp_state() {
        let cfg = LbConfig {
            ct_timeout_tcp_syn_s: 60,
            ct_timeout_tcp_s: 3600,
            ct_timeout_tcp_fin_s: 10,
            ct_timeout_udp_s: 30,
            ..LbConfig::default()
        };
        let now = 10_000 * NS_PER_SEC;
        let at = |s: u64| 10_000 - s;
        let entries = [
            entry(IPPROTO_TCP, 0, at(59)),                       // SYN, fresh
            entry(IPPROTO_TCP, 0, at(61)),                       // SYN, expired
            entry(IPPROTO_TCP, ct_flags::ESTABLISHED, at(3599)), // established, fresh
            entry(IPPROTO_TCP, ct_flags::ESTABLISHED, at(3601)), // expired
            entry(
                IPPROTO_TCP,
                ct_flags::ESTABLISHED | ct_flags::CLOSING,
                at(11),
            ), // closing
            entry(IPPROTO_UDP, 0, at(29)),                       // fresh
            entry(IPPROTO_UDP, 0, at(31)),                       // expired
        ];
        let expired: Vec<u16> = expired_keys(&entries, now, &cfg)
            .iter()
            .map(|k| k.sport)
            .collect();
        assert_eq!(
            expired,
            [at(61), at(3601), at(11), at(31)].map(|s| s as u16)
        );
    }

    #[test]
    fn zero_timeouts_mean_the_defaults() {
        let cfg = LbConfig::default();
        use lb_common::service::ct_timeouts as d;
        assert_eq!(cfg.ct_timeout_s(IPPROTO_TCP, 0), d::TCP_SYN);
        assert_eq!(
            cfg.ct_timeout_s(IPPROTO_TCP, ct_flags::ESTABLISHED),
            d::TCP_ESTABLISHED
        );
        assert_eq!(cfg.ct_timeout_s(IPPROTO_TCP, ct_flags::CLOSING), d::TCP_FIN);
        assert_eq!(cfg.ct_timeout_s(IPPROTO_UDP, 0), d::UDP);
        // A last_seen in the future (clock read before the datapath wrote it) is fresh.
        let (k, v) = entry(IPPROTO_UDP, 0, 100);
        assert!(!is_expired(&k, &v, 50 * NS_PER_SEC, &cfg));
    }
}
