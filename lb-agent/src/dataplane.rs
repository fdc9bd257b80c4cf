//! The typed dataplane API: the BPF maps behind a small trait, so `sync` can be tested
//! against [`MemDataplane`] without root, and runs against [`BpfDataplane`].
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use lb_common::{Backend4, Counter, Frontend4Key, Reason, Service4Value};

use crate::pins::{open_pinned_map, Capacities, LoadError, PinLayout};

/// Errors from map operations. Each names the map and the failing entry.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("map {map} is full ({capacity} entries): cannot insert {entry}")]
    MapFull {
        map: &'static str,
        capacity: u32,
        entry: String,
    },
    #[error("map {map}: {op} {entry} failed: {source}")]
    Map {
        map: &'static str,
        op: &'static str,
        entry: String,
        #[source]
        source: std::io::Error,
    },
}

impl DataplaneError {
    /// Classify an aya map error: E2BIG/ENOSPC/ENOMEM on insert mean the map is full.
    pub fn from_io(
        map: &'static str,
        capacity: u32,
        op: &'static str,
        entry: String,
        source: std::io::Error,
    ) -> Self {
        match source.raw_os_error() {
            Some(libc::E2BIG) | Some(libc::ENOSPC) | Some(libc::ENOMEM) if op == "insert" => {
                DataplaneError::MapFull {
                    map,
                    capacity,
                    entry,
                }
            }
            _ => DataplaneError::Map {
                map,
                op,
                entry,
                source,
            },
        }
    }
}

pub type Result<T, E = DataplaneError> = std::result::Result<T, E>;

/// One-entry-at-a-time access to the load-balancing maps. Implementations must make each
/// call atomic for its entry (BPF map updates are); ordering across calls is `sync`'s job.
pub trait Dataplane {
    fn services(&self) -> Result<Vec<(Frontend4Key, Service4Value)>>;
    fn put_service(&mut self, key: Frontend4Key, value: Service4Value) -> Result<()>;
    fn delete_service(&mut self, key: &Frontend4Key) -> Result<()>;

    fn backends(&self) -> Result<Vec<(u32, Backend4)>>;
    fn put_backend(&mut self, id: u32, value: Backend4) -> Result<()>;
    fn delete_backend(&mut self, id: u32) -> Result<()>;

    fn node_addrs(&self) -> Result<Vec<Ipv4Addr>>;
    fn put_node_addr(&mut self, addr: Ipv4Addr) -> Result<()>;
    fn delete_node_addr(&mut self, addr: Ipv4Addr) -> Result<()>;

    /// Per-reason verdict counters, summed over CPUs.
    fn stats(&self) -> Result<Vec<(Reason, Counter)>>;
    /// Per-frontend counters for `svc_id`, summed over CPUs.
    fn svc_stats(&self, svc_id: u32) -> Result<Counter>;
    /// Zero the counters of `svc_id` (before the id is given to a new frontend).
    fn reset_svc_stats(&mut self, svc_id: u32) -> Result<()>;

    /// Write `entries` in order, many per syscall (`BPF_MAP_UPDATE_BATCH`). Returns how many
    /// were written: all, or those before the first that failed (the caller writes the rest
    /// one by one, which reports the failure). The default writes none.
    fn put_services_batch(&mut self, entries: &[(Frontend4Key, Service4Value)]) -> usize {
        let _ = entries;
        0
    }

    /// [`Dataplane::put_services_batch`] for backends.
    fn put_backends_batch(&mut self, entries: &[(u32, Backend4)]) -> usize {
        let _ = entries;
        0
    }

    /// [`Dataplane::reset_svc_stats`] of many ids; returns how many were reset (the caller
    /// resets the rest one by one). The default resets none.
    fn reset_svc_stats_batch(&mut self, svc_ids: &[u32]) -> usize {
        let _ = svc_ids;
        0
    }
}

/// In-memory dataplane for tests, with optional capacities to exercise "map full" paths.
#[derive(Debug, Default, Clone)]
pub struct MemDataplane {
    pub services: BTreeMap<Frontend4Key, Service4Value>,
    pub backends: BTreeMap<u32, Backend4>,
    pub node_addrs: std::collections::BTreeSet<Ipv4Addr>,
    pub services_capacity: Option<u32>,
    pub backends_capacity: Option<u32>,
    /// Every mutating call, in order, for ordering assertions.
    pub log: Vec<MemOp>,
}

/// A recorded mutation of [`MemDataplane`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemOp {
    PutService(Frontend4Key, Service4Value),
    DeleteService(Frontend4Key),
    PutBackend(u32, Backend4),
    DeleteBackend(u32),
    PutNodeAddr(Ipv4Addr),
    DeleteNodeAddr(Ipv4Addr),
}

fn full(map: &'static str, capacity: u32, entry: String) -> DataplaneError {
    DataplaneError::MapFull {
        map,
        capacity,
        entry,
    }
}

impl Dataplane for MemDataplane {
    fn services(&self) -> Result<Vec<(Frontend4Key, Service4Value)>> {
        Ok(self.services.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn put_service(&mut self, key: Frontend4Key, value: Service4Value) -> Result<()> {
        if let Some(cap) = self.services_capacity {
            if !self.services.contains_key(&key) && self.services.len() as u32 >= cap {
                return Err(full(lb_common::maps::LB4_SERVICES, cap, format!("{key:?}")));
            }
        }
        self.services.insert(key, value);
        self.log.push(MemOp::PutService(key, value));
        Ok(())
    }
    fn delete_service(&mut self, key: &Frontend4Key) -> Result<()> {
        self.services.remove(key);
        self.log.push(MemOp::DeleteService(*key));
        Ok(())
    }
    fn backends(&self) -> Result<Vec<(u32, Backend4)>> {
        Ok(self.backends.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn put_backend(&mut self, id: u32, value: Backend4) -> Result<()> {
        if let Some(cap) = self.backends_capacity {
            if !self.backends.contains_key(&id) && self.backends.len() as u32 >= cap {
                return Err(full(
                    lb_common::maps::LB4_BACKENDS,
                    cap,
                    format!("backend {id}"),
                ));
            }
        }
        self.backends.insert(id, value);
        self.log.push(MemOp::PutBackend(id, value));
        Ok(())
    }
    fn delete_backend(&mut self, id: u32) -> Result<()> {
        self.backends.remove(&id);
        self.log.push(MemOp::DeleteBackend(id));
        Ok(())
    }
    fn node_addrs(&self) -> Result<Vec<Ipv4Addr>> {
        Ok(self.node_addrs.iter().copied().collect())
    }
    fn put_node_addr(&mut self, addr: Ipv4Addr) -> Result<()> {
        self.node_addrs.insert(addr);
        self.log.push(MemOp::PutNodeAddr(addr));
        Ok(())
    }
    fn delete_node_addr(&mut self, addr: Ipv4Addr) -> Result<()> {
        self.node_addrs.remove(&addr);
        self.log.push(MemOp::DeleteNodeAddr(addr));
        Ok(())
    }
    fn stats(&self) -> Result<Vec<(Reason, Counter)>> {
        Ok(Reason::ALL
            .iter()
            .map(|r| (*r, Counter::default()))
            .collect())
    }
    fn svc_stats(&self, _svc_id: u32) -> Result<Counter> {
        Ok(Counter::default())
    }
    fn reset_svc_stats(&mut self, _svc_id: u32) -> Result<()> {
        Ok(())
    }
    fn put_services_batch(&mut self, entries: &[(Frontend4Key, Service4Value)]) -> usize {
        entries
            .iter()
            .take_while(|(k, v)| self.put_service(*k, *v).is_ok())
            .count()
    }
    fn put_backends_batch(&mut self, entries: &[(u32, Backend4)]) -> usize {
        entries
            .iter()
            .take_while(|(id, v)| self.put_backend(*id, *v).is_ok())
            .count()
    }
    fn reset_svc_stats_batch(&mut self, svc_ids: &[u32]) -> usize {
        svc_ids.len()
    }
}

/// The real dataplane: typed views of the pinned BPF maps.
pub struct BpfDataplane {
    services: aya::maps::HashMap<aya::maps::MapData, Frontend4Key, Service4Value>,
    backends: aya::maps::HashMap<aya::maps::MapData, u32, Backend4>,
    node_addrs: aya::maps::HashMap<aya::maps::MapData, u32, u32>,
    ct: aya::maps::HashMap<aya::maps::MapData, lb_common::Ct4Key, lb_common::Ct4Value>,
    /// Half-open TCP flows (`LB4_CT_SYN`, an array of slots).
    ct_syn: aya::maps::MapData,
    stats: aya::maps::PerCpuArray<aya::maps::MapData, Counter>,
    svc_stats: aya::maps::PerCpuArray<aya::maps::MapData, Counter>,
    /// The timed programs' run-time histogram (absent in pins of older agents).
    latency: Option<aya::maps::PerCpuArray<aya::maps::MapData, u64>>,
    caps: Capacities,
    pins: PinLayout,
}

/// The datapath's run-time histogram: per program (XDP ingress, TC egress), the runs in each
/// log2 nanosecond bucket (`lb_common::maps::LB_LATENCY`), summed over CPUs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Latency {
    pub xdp: Vec<u64>,
    pub tc: Vec<u64>,
}

impl Latency {
    /// The upper bound in ns of bucket `k` (`2^k - 1`; bucket 0 is 0 ns).
    pub fn upper_ns(k: usize) -> u64 {
        if k >= 64 {
            u64::MAX
        } else {
            (1u64 << k) - 1
        }
    }

    /// The bucket upper bound below which `q` (0..1) of `buckets` lie, `None` if empty.
    pub fn quantile_ns(buckets: &[u64], q: f64) -> Option<u64> {
        let total: u64 = buckets.iter().sum();
        if total == 0 {
            return None;
        }
        let want = (q * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (k, n) in buckets.iter().enumerate() {
            seen += n;
            if seen >= want {
                return Some(Self::upper_ns(k));
            }
        }
        None
    }
}

fn aya_io(e: aya::maps::MapError) -> std::io::Error {
    match e {
        aya::maps::MapError::SyscallError(s) => s.io_error,
        aya::maps::MapError::KeyNotFound => std::io::Error::from(std::io::ErrorKind::NotFound),
        other => std::io::Error::other(other),
    }
}

fn ipv4_be(addr: Ipv4Addr) -> u32 {
    u32::from(addr).to_be()
}

impl BpfDataplane {
    /// Open the maps pinned under `pins` (by a running or earlier agent).
    pub fn open(pins: &PinLayout) -> Result<Self, LoadError> {
        use lb_common::maps as m;
        fn typed<T>(
            name: &'static str,
            r: std::result::Result<T, aya::maps::MapError>,
        ) -> std::result::Result<T, LoadError> {
            r.map_err(|source| LoadError::Map { name, source })
        }
        let open = |name| -> std::result::Result<aya::maps::Map, LoadError> {
            let data = open_pinned_map(pins, name)?;
            typed(name, aya::maps::Map::from_map_data(data))
        };
        let services = typed(m::LB4_SERVICES, open(m::LB4_SERVICES)?.try_into())?;
        let backends = typed(m::LB4_BACKENDS, open(m::LB4_BACKENDS)?.try_into())?;
        let node_addrs = typed(m::LB4_NODE_ADDRS, open(m::LB4_NODE_ADDRS)?.try_into())?;
        let lru = |name: &'static str| -> std::result::Result<_, LoadError> {
            match open(name)? {
                aya::maps::Map::LruHashMap(d) => typed(
                    name,
                    aya::maps::HashMap::try_from(aya::maps::Map::HashMap(d)),
                ),
                other => typed(name, aya::maps::HashMap::try_from(other)),
            }
        };
        let ct = lru(m::LB4_CT)?;
        let ct_syn = open_pinned_map(pins, m::LB4_CT_SYN)?;
        let stats = typed(m::LB_STATS, open(m::LB_STATS)?.try_into())?;
        let svc_stats = typed(m::LB_SVC_STATS, open(m::LB_SVC_STATS)?.try_into())?;
        let latency = open(m::LB_LATENCY)
            .ok()
            .and_then(|map| aya::maps::PerCpuArray::try_from(map).ok());
        let caps = Capacities {
            services: services_cap(pins, m::LB4_SERVICES),
            backends: services_cap(pins, m::LB4_BACKENDS),
            ct: services_cap(pins, m::LB4_CT),
            svc_stats: services_cap(pins, m::LB_SVC_STATS),
        };
        Ok(Self {
            services,
            backends,
            node_addrs,
            ct,
            ct_syn,
            stats,
            svc_stats,
            latency,
            caps,
            pins: pins.clone(),
        })
    }

    /// The run-time histogram of the timed programs, summed over CPUs (`None`: the pins
    /// have no histogram map).
    pub fn latency(&self) -> Option<Latency> {
        let map = self.latency.as_ref()?;
        let n = lb_common::maps::LATENCY_BUCKETS;
        let read = |prog: u32| -> Vec<u64> {
            (0..n)
                .map(|b| {
                    map.get(&(prog * n + b), 0)
                        .map(|v| v.iter().sum())
                        .unwrap_or(0)
                })
                .collect()
        };
        Some(Latency {
            xdp: read(0),
            tc: read(1),
        })
    }

    /// The capacities the pinned maps were created with.
    pub fn capacities(&self) -> Capacities {
        self.caps
    }

    /// The entry at `key` of the services map, if any (one lookup).
    pub fn service(&self, key: &Frontend4Key) -> Result<Option<Service4Value>> {
        match self.services.get(key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(
                lb_common::maps::LB4_SERVICES,
                0,
                "read",
                format!("{key:?}"),
                e,
            )),
        }
    }

    /// All conntrack entries, established (`LB4_CT`) then half-open (`LB4_CT_SYN`), for
    /// tests and `status`.
    pub fn conntrack(&self) -> Result<Vec<(lb_common::Ct4Key, lb_common::Ct4Value)>> {
        let mut v = self.conntrack_established()?;
        v.extend(self.conntrack_half_open()?);
        Ok(v)
    }

    /// The entries of `LB4_CT`.
    pub fn conntrack_established(&self) -> Result<Vec<(lb_common::Ct4Key, lb_common::Ct4Value)>> {
        self.ct
            .iter()
            .map(|r| {
                r.map_err(|e| map_err(lb_common::maps::LB4_CT, 0, "iterate", String::new(), e))
            })
            .collect()
    }

    /// The entries the half-open flows of `LB4_CT_SYN` stand for: each its forward entry,
    /// and its reply entry unless SNATed (as `LB4_CT` holds them once established).
    pub fn conntrack_half_open(&self) -> Result<Vec<(lb_common::Ct4Key, lb_common::Ct4Value)>> {
        Ok(crate::ct_gc::half_open_entries(&self.half_open_slots()?))
    }

    /// The slots of `LB4_CT_SYN` that hold a flow, with their indexes.
    pub fn half_open_slots(&self) -> Result<Vec<(u32, lb_common::HalfOpen4)>> {
        use std::os::fd::AsFd as _;
        crate::ct_gc::half_open_slots(self.ct_syn.fd().as_fd()).map_err(|e| {
            DataplaneError::from_io(lb_common::maps::LB4_CT_SYN, 0, "read", String::new(), e)
        })
    }

    /// Remove every conntrack entry, both maps (tests).
    pub fn clear_conntrack(&mut self) -> Result<()> {
        for (k, _) in self.conntrack_established()? {
            let _ = self.ct.remove(&k);
        }
        let slots = self.half_open_slots()?;
        crate::ct_gc::empty_half_open(&self.pins, &slots).map_err(|e| {
            DataplaneError::from_io(
                lb_common::maps::LB4_CT_SYN,
                0,
                "write",
                String::new(),
                std::io::Error::other(e.to_string()),
            )
        })?;
        Ok(())
    }
}

/// Entries per `BPF_MAP_LOOKUP_BATCH` when reading a whole map.
const DUMP_CHUNK: usize = 8192;

fn services_cap(pins: &PinLayout, name: &'static str) -> u32 {
    open_pinned_map(pins, name)
        .ok()
        .and_then(|d| d.info().ok())
        .map_or(0, |i| i.max_entries())
}

fn map_err(
    map: &'static str,
    capacity: u32,
    op: &'static str,
    entry: String,
    e: aya::maps::MapError,
) -> DataplaneError {
    DataplaneError::from_io(map, capacity, op, entry, aya_io(e))
}

fn ignore_missing(
    r: std::result::Result<(), aya::maps::MapError>,
) -> std::result::Result<(), aya::maps::MapError> {
    match r {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(s))
            if s.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        other => other,
    }
}

impl Dataplane for BpfDataplane {
    fn services(&self) -> Result<Vec<(Frontend4Key, Service4Value)>> {
        use aya::maps::IterableMap as _;
        use std::os::fd::AsFd as _;
        if let Ok(all) =
            crate::bpfsys::map_lookup_batch(self.services.map().fd().as_fd(), DUMP_CHUNK)
        {
            return Ok(all);
        }
        // A kernel without batch lookups: one entry at a time.
        self.services
            .iter()
            .map(|r| {
                r.map_err(|e| {
                    map_err(
                        lb_common::maps::LB4_SERVICES,
                        0,
                        "iterate",
                        String::new(),
                        e,
                    )
                })
            })
            .collect()
    }
    fn put_service(&mut self, key: Frontend4Key, value: Service4Value) -> Result<()> {
        self.services.insert(key, value, 0).map_err(|e| {
            map_err(
                lb_common::maps::LB4_SERVICES,
                self.caps.services,
                "insert",
                format!("{key:?}"),
                e,
            )
        })
    }
    fn delete_service(&mut self, key: &Frontend4Key) -> Result<()> {
        ignore_missing(self.services.remove(key)).map_err(|e| {
            map_err(
                lb_common::maps::LB4_SERVICES,
                self.caps.services,
                "delete",
                format!("{key:?}"),
                e,
            )
        })
    }
    fn backends(&self) -> Result<Vec<(u32, Backend4)>> {
        use aya::maps::IterableMap as _;
        use std::os::fd::AsFd as _;
        if let Ok(all) =
            crate::bpfsys::map_lookup_batch(self.backends.map().fd().as_fd(), DUMP_CHUNK)
        {
            return Ok(all);
        }
        self.backends
            .iter()
            .map(|r| {
                r.map_err(|e| {
                    map_err(
                        lb_common::maps::LB4_BACKENDS,
                        0,
                        "iterate",
                        String::new(),
                        e,
                    )
                })
            })
            .collect()
    }
    fn put_backend(&mut self, id: u32, value: Backend4) -> Result<()> {
        self.backends.insert(id, value, 0).map_err(|e| {
            map_err(
                lb_common::maps::LB4_BACKENDS,
                self.caps.backends,
                "insert",
                format!("backend {id}"),
                e,
            )
        })
    }
    fn delete_backend(&mut self, id: u32) -> Result<()> {
        ignore_missing(self.backends.remove(&id)).map_err(|e| {
            map_err(
                lb_common::maps::LB4_BACKENDS,
                self.caps.backends,
                "delete",
                format!("backend {id}"),
                e,
            )
        })
    }
    fn node_addrs(&self) -> Result<Vec<Ipv4Addr>> {
        self.node_addrs
            .keys()
            .map(|r| {
                r.map(|k| Ipv4Addr::from(u32::from_be(k))).map_err(|e| {
                    map_err(
                        lb_common::maps::LB4_NODE_ADDRS,
                        0,
                        "iterate",
                        String::new(),
                        e,
                    )
                })
            })
            .collect()
    }
    fn put_node_addr(&mut self, addr: Ipv4Addr) -> Result<()> {
        self.node_addrs.insert(ipv4_be(addr), 0, 0).map_err(|e| {
            map_err(
                lb_common::maps::LB4_NODE_ADDRS,
                lb_common::maps::LB4_NODE_ADDRS_MAX,
                "insert",
                addr.to_string(),
                e,
            )
        })
    }
    fn delete_node_addr(&mut self, addr: Ipv4Addr) -> Result<()> {
        ignore_missing(self.node_addrs.remove(&ipv4_be(addr))).map_err(|e| {
            map_err(
                lb_common::maps::LB4_NODE_ADDRS,
                0,
                "delete",
                addr.to_string(),
                e,
            )
        })
    }
    fn stats(&self) -> Result<Vec<(Reason, Counter)>> {
        Reason::ALL
            .iter()
            .map(|r| {
                let per_cpu = self.stats.get(&(*r as u32), 0).map_err(|e| {
                    map_err(
                        lb_common::maps::LB_STATS,
                        0,
                        "read",
                        r.name().to_string(),
                        e,
                    )
                })?;
                Ok((*r, sum(per_cpu.iter())))
            })
            .collect()
    }
    fn svc_stats(&self, svc_id: u32) -> Result<Counter> {
        let per_cpu = self.svc_stats.get(&svc_id, 0).map_err(|e| {
            map_err(
                lb_common::maps::LB_SVC_STATS,
                0,
                "read",
                format!("svc {svc_id}"),
                e,
            )
        })?;
        Ok(sum(per_cpu.iter()))
    }
    fn put_services_batch(&mut self, entries: &[(Frontend4Key, Service4Value)]) -> usize {
        use aya::maps::IterableMap as _;
        use std::os::fd::AsFd as _;
        let (n, r) = crate::bpfsys::update_batch(self.services.map().fd().as_fd(), entries);
        if let Err(e) = r {
            log::debug!(
                "BPF_MAP_UPDATE_BATCH on {}: {e} after {n} entries",
                lb_common::maps::LB4_SERVICES
            );
        }
        n
    }
    fn put_backends_batch(&mut self, entries: &[(u32, Backend4)]) -> usize {
        use aya::maps::IterableMap as _;
        use std::os::fd::AsFd as _;
        let (n, r) = crate::bpfsys::update_batch(self.backends.map().fd().as_fd(), entries);
        if let Err(e) = r {
            log::debug!(
                "BPF_MAP_UPDATE_BATCH on {}: {e} after {n} entries",
                lb_common::maps::LB4_BACKENDS
            );
        }
        n
    }
    fn reset_svc_stats_batch(&mut self, svc_ids: &[u32]) -> usize {
        use std::os::fd::AsFd as _;
        let Ok(cpus) = aya::util::nr_cpus() else {
            return 0;
        };
        let Ok(map) = open_pinned_map(&self.pins, lb_common::maps::LB_SVC_STATS) else {
            return 0;
        };
        let mut done = 0;
        for chunk in svc_ids.chunks(crate::bpfsys::BATCH_CHUNK) {
            // One zeroed Counter per possible CPU for each id (a per-CPU value).
            let values = vec![0u8; chunk.len() * cpus * std::mem::size_of::<Counter>()];
            // SAFETY: LB_SVC_STATS has u32 keys and per-CPU Counter values; `values` holds
            // `cpus` Counters (16 bytes, already 8-aligned) for each of the `chunk` keys.
            let (n, r) = unsafe {
                crate::bpfsys::map_update_batch(
                    map.fd().as_fd(),
                    bytemuck::cast_slice(chunk),
                    &values,
                    chunk.len(),
                )
            };
            done += n;
            if r.is_err() {
                break;
            }
        }
        done
    }
    fn reset_svc_stats(&mut self, svc_id: u32) -> Result<()> {
        let map = lb_common::maps::LB_SVC_STATS;
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| {
            DataplaneError::from_io(map, 0, "update", format!("svc {svc_id}"), e)
        })?;
        let zeros = aya::maps::PerCpuValues::try_from(vec![Counter::default(); cpus])
            .map_err(|e| DataplaneError::from_io(map, 0, "update", format!("svc {svc_id}"), e))?;
        self.svc_stats.set(svc_id, zeros, 0).map_err(|e| {
            map_err(
                map,
                self.caps.svc_stats,
                "update",
                format!("svc {svc_id}"),
                e,
            )
        })
    }
}

fn sum<'a>(it: impl Iterator<Item = &'a Counter>) -> Counter {
    it.fold(Counter::default(), |acc, c| Counter {
        packets: acc.packets + c.packets,
        bytes: acc.bytes + c.bytes,
    })
}
