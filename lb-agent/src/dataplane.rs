//! The typed dataplane API: the BPF maps behind a small trait, so `sync` can be tested
//! against [`MemDataplane`] without root, and runs against [`crate::loader::BpfDataplane`].
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use lb_common::{Backend4, Counter, Frontend4Key, Reason, Service4Value};

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
                return Err(full(lb_common::maps::LB4_BACKENDS, cap, format!("backend {id}")));
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
        Ok(Reason::ALL.iter().map(|r| (*r, Counter::default())).collect())
    }
    fn svc_stats(&self, _svc_id: u32) -> Result<Counter> {
        Ok(Counter::default())
    }
}
