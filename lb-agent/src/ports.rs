//! The port filter (`LB_PORTS`): one byte of `port_bits` per port, which both packet
//! programs read before anything else, so traffic on a port no frontend and no backend uses
//! leaves after one array read. The agent keeps it a superset of what the services map needs
//! at every moment: before a sync it adds the ports of the new state, after a successful sync
//! it removes the ports nothing uses any more. The filter is switched on
//! (`config_flags::PORT_FILTER`) only once the map holds every port.
use std::collections::{BTreeMap, BTreeSet};
use std::ops::RangeInclusive;
use std::os::fd::AsFd as _;

use aya::maps::{Array, MapData};
use lb_common::service::{config_flags, port_bits};
use lb_common::{maps, LbConfig};

use crate::bpfsys;
use crate::model::Desired;
use crate::pins::{io_err, map_err, open_pinned_map, LoadError, PinLayout};

/// The bits every port needs for `d`, with the SNAT ports (replies to SNATed flows arrive
/// on them) marked as frontend ports of both protocols.
pub fn desired_ports(d: &Desired, snat: &RangeInclusive<u16>) -> BTreeMap<u16, u8> {
    let mut out: BTreeMap<u16, u8> = BTreeMap::new();
    for (id, fe) in &d.frontends {
        let proto = id.proto.ipproto();
        *out.entry(id.port).or_default() |= port_bits::frontend(proto);
        for b in &fe.backends {
            *out.entry(b.port).or_default() |= port_bits::backend(proto);
        }
    }
    with_snat(out, !d.frontends.is_empty(), snat)
}

/// The port bits the desired frontends need, reference-counted so that one frontend's
/// change costs O(its backends): per port and bit, how many frontends (as frontend port) or
/// frontend-backend pairs (as backend port) use it. The ports whose bits may have changed
/// are remembered until [`PortRefs::take_changed`].
#[derive(Debug, Clone)]
pub struct PortRefs {
    /// `[port][bit index]`, the four `port_bits` in order.
    counts: Vec<[u32; 4]>,
    /// The ports with any non-zero count.
    used: BTreeSet<u16>,
    changed: BTreeSet<u16>,
}

impl Default for PortRefs {
    fn default() -> Self {
        Self {
            counts: vec![[0; 4]; 1 << 16],
            used: BTreeSet::new(),
            changed: BTreeSet::new(),
        }
    }
}

impl PortRefs {
    /// Count (`add`) or uncount one frontend on `port` of `proto` and its backends' ports.
    pub fn frontend(
        &mut self,
        port: u16,
        proto: u8,
        backend_ports: impl Iterator<Item = u16>,
        add: bool,
    ) {
        self.bump(port, port_bits::frontend(proto), add);
        for p in backend_ports {
            self.bump(p, port_bits::backend(proto), add);
        }
    }

    fn bump(&mut self, port: u16, bit: u8, add: bool) {
        let counts = &mut self.counts[usize::from(port)];
        let c = &mut counts[bit.trailing_zeros() as usize];
        if add {
            *c += 1;
        } else {
            *c = c.saturating_sub(1);
        }
        if counts.iter().any(|n| *n > 0) {
            self.used.insert(port);
        } else {
            self.used.remove(&port);
        }
        self.changed.insert(port);
    }

    /// The bits `port` needs now.
    pub fn bits(&self, port: u16) -> u8 {
        self.counts[usize::from(port)]
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .fold(0, |b, (i, _)| b | (1 << i))
    }

    /// Every port that needs a bit, with its bits.
    pub fn all(&self) -> BTreeMap<u16, u8> {
        self.used.iter().map(|p| (*p, self.bits(*p))).collect()
    }

    /// The ports counted or uncounted since the last call.
    pub fn take_changed(&mut self) -> BTreeSet<u16> {
        std::mem::take(&mut self.changed)
    }
}

/// The SNAT ports' bits (replies to SNATed flows arrive on them) added to `ports`, when
/// there is any frontend at all.
pub fn with_snat(
    mut ports: BTreeMap<u16, u8>,
    any_frontend: bool,
    snat: &RangeInclusive<u16>,
) -> BTreeMap<u16, u8> {
    if any_frontend {
        for p in snat.clone() {
            *ports.entry(p).or_default() |= port_bits::TCP_FRONTEND | port_bits::UDP_FRONTEND;
        }
    }
    ports
}

/// The pinned `LB_PORTS` and what it holds (non-zero entries).
pub struct PortFilter {
    map: Array<MapData, u8>,
    held: BTreeMap<u16, u8>,
    pins: PinLayout,
}

impl PortFilter {
    /// Open the pinned map and read what it holds (an earlier agent's ports).
    pub fn open(pins: &PinLayout) -> Result<Self, LoadError> {
        let data = open_pinned_map(pins, maps::LB_PORTS)?;
        let held = {
            let fd = data.fd().as_fd();
            let all: Vec<(u32, u8)> = bpfsys::map_lookup_batch(fd, 8192)
                .map_err(io_err(format!("reading {} (batch)", maps::LB_PORTS)))?;
            all.into_iter()
                .filter(|(_, v)| *v != 0)
                .filter_map(|(k, v)| u16::try_from(k).ok().map(|p| (p, v)))
                .collect()
        };
        let map = Array::try_from(aya::maps::Map::Array(data))
            .map_err(|source| map_err(maps::LB_PORTS, source))?;
        Ok(Self {
            map,
            held,
            pins: pins.clone(),
        })
    }

    fn write(&mut self, port: u16, bits: u8) -> Result<(), LoadError> {
        self.map
            .set(u32::from(port), bits, 0)
            .map_err(|source| map_err(maps::LB_PORTS, source))?;
        if bits == 0 {
            self.held.remove(&port);
        } else {
            self.held.insert(port, bits);
        }
        Ok(())
    }

    /// Add every bit of `next` (keeping what is held): before a sync. Returns the writes.
    pub fn widen(&mut self, next: &BTreeMap<u16, u8>) -> Result<usize, LoadError> {
        let mut writes = 0;
        for (&port, &bits) in next {
            let cur = self.held.get(&port).copied().unwrap_or(0);
            if cur | bits != cur {
                self.write(port, cur | bits)?;
                writes += 1;
            }
        }
        Ok(writes)
    }

    /// Make the map exactly `next`: after a successful sync. Returns the writes.
    pub fn narrow(&mut self, next: &BTreeMap<u16, u8>) -> Result<usize, LoadError> {
        let mut writes = self.widen(next)?;
        let stale: Vec<(u16, u8)> = self
            .held
            .iter()
            .filter(|(p, b)| next.get(p).copied().unwrap_or(0) != **b)
            .map(|(p, _)| (*p, next.get(p).copied().unwrap_or(0)))
            .collect();
        for (port, bits) in stale {
            self.write(port, bits)?;
            writes += 1;
        }
        Ok(writes)
    }

    /// Make the listed ports exactly `bits(port)` (those a change touched): after a
    /// successful incremental sync. Returns the writes.
    pub fn narrow_ports(
        &mut self,
        ports: &BTreeSet<u16>,
        bits: impl Fn(u16) -> u8,
    ) -> Result<usize, LoadError> {
        let mut writes = 0;
        for &port in ports {
            let want = bits(port);
            if self.held.get(&port).copied().unwrap_or(0) != want {
                self.write(port, want)?;
                writes += 1;
            }
        }
        Ok(writes)
    }

    /// Switch the filter on or off in the pinned `LB_CONFIG`.
    pub fn set_active(&self, on: bool) -> Result<(), LoadError> {
        crate::loader::update_config(&self.pins, |c: &mut LbConfig| {
            if on {
                c.flags |= config_flags::PORT_FILTER;
            } else {
                c.flags &= !config_flags::PORT_FILTER;
            }
        })
    }

    /// Ports held now.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// Whether no port is held.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Backend, Frontend, FrontendId, Proto};
    use std::net::Ipv4Addr;

    fn fe(backends: &[u16]) -> Frontend {
        Frontend {
            flags: 0,
            owner: "ns/x:p".into(),
            backends: backends
                .iter()
                .map(|p| Backend {
                    addr: Ipv4Addr::new(10, 244, 0, 1),
                    port: *p,
                    remote: false,
                    terminating: false,
                })
                .collect(),
            affinity_timeout_s: 0,
        }
    }

    #[test]
    fn frontend_backend_and_snat_ports_get_their_bits() {
        let mut d = Desired::default();
        d.frontends.insert(
            FrontendId::new(Ipv4Addr::UNSPECIFIED, 30080, Proto::Tcp),
            fe(&[8080]),
        );
        d.frontends.insert(
            FrontendId::new(Ipv4Addr::new(10, 96, 0, 10), 53, Proto::Udp),
            fe(&[5353, 8080]),
        );
        let p = desired_ports(&d, &(61000..=61001));
        assert_eq!(p.get(&30080), Some(&port_bits::TCP_FRONTEND));
        assert_eq!(p.get(&53), Some(&port_bits::UDP_FRONTEND));
        assert_eq!(
            p.get(&8080),
            Some(&(port_bits::TCP_BACKEND | port_bits::UDP_BACKEND))
        );
        assert_eq!(p.get(&5353), Some(&port_bits::UDP_BACKEND));
        let both = port_bits::TCP_FRONTEND | port_bits::UDP_FRONTEND;
        assert_eq!((p.get(&61000), p.get(&61001)), (Some(&both), Some(&both)));
        assert_eq!(p.len(), 6);
        assert!(desired_ports(&Desired::default(), &(61000..=61001)).is_empty());
    }
}
