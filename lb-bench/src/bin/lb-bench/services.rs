//! The synthetic Service set every benchmark path is programmed with: N Services of 10
//! endpoints each, plus one target Service whose endpoints are the lab's pod servers.
//!
//! The same [`ServiceSet`] feeds our maps ([`program`]), the iptables rules and the nftables
//! rules (`rules.rs`), so every path holds exactly the same Services.
use std::net::{Ipv4Addr, SocketAddrV4};

use lb_agent::dataplane::Dataplane;
use lb_common::{service::flags, Backend4, Frontend4Key, Service4Value};

/// Endpoints per Service.
pub const ENDPOINTS_PER_SERVICE: usize = 10;
/// First NodePort; Service `i` gets `NODEPORT_BASE + i`. This goes past the API server's
/// default range (30000-32767), as `--service-node-port-range` allows, so 10k NodePort
/// Services fit.
pub const NODEPORT_BASE: u16 = 30000;
/// Most Services that get a NodePort (ports up to 65535).
pub const MAX_NODEPORT_SERVICES: usize = (u16::MAX - NODEPORT_BASE) as usize;
/// ClusterIPs are allocated from 10.96.0.0/12 (kubeadm's default service CIDR).
pub const SERVICE_CIDR: &str = "10.96.0.0/12";
const CLUSTER_IP_BASE: u32 = 0x0a60_000a; // 10.96.0.10
/// Filler endpoints live in 10.128.0.0/12, a range nothing in the lab routes to: they are
/// never sent traffic, they only make the tables as big as a real cluster's.
const FILLER_EP_BASE: u32 = 0x0a80_0000; // 10.128.0.0
/// Port every filler endpoint listens on.
pub const FILLER_EP_PORT: u16 = 8080;
/// Service port of every Service (ClusterIP side).
pub const SERVICE_PORT: u16 = 80;
/// Namespace of every synthetic Service.
pub const NAMESPACE: &str = "bench";

/// L4 protocol of a Service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    /// Lower-case name, as kube-proxy uses it in chain hashes and nft (`tcp`, `udp`).
    pub fn lower(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }

    /// IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => lb_common::IPPROTO_TCP,
            Proto::Udp => lb_common::IPPROTO_UDP,
        }
    }
}

/// One Service port, as kube-proxy sees it (`ServicePortName` + its endpoints).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub namespace: String,
    pub name: String,
    /// The port's name (`p80`).
    pub port_name: String,
    pub proto: Proto,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    pub node_port: Option<u16>,
    /// Ready endpoints (podIP:targetPort).
    pub endpoints: Vec<SocketAddrV4>,
}

impl ServicePort {
    /// `namespace/name:port` (kube-proxy's `ServicePortName.String()`).
    pub fn svc_port_name(&self) -> String {
        format!("{}/{}:{}", self.namespace, self.name, self.port_name)
    }
}

/// Where the target Service sits in the list (and so in the iptables chains).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Position {
    /// Last: a new connection walks every other Service's rules first (iptables worst case).
    End,
    /// In the middle (iptables typical case).
    Middle,
}

impl Position {
    pub fn index(self, n: usize) -> usize {
        match self {
            Position::End => n.saturating_sub(1),
            Position::Middle => n / 2,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Position::End => "end",
            Position::Middle => "middle",
        }
    }
}

/// N Service ports in list order; the target Service has a TCP and a UDP port, adjacent.
#[derive(Clone, Debug)]
pub struct ServiceSet {
    pub ports: Vec<ServicePort>,
    /// Index in `ports` of the target's TCP port.
    pub target_tcp: usize,
    /// Index in `ports` of the target's UDP port.
    pub target_udp: usize,
}

impl ServiceSet {
    /// `n` Services (n >= 1), each with a ClusterIP and, if `nodeports`, a NodePort; the
    /// target (at `pos`) has `target_endpoints` as endpoints for both of its ports, the
    /// others [`ENDPOINTS_PER_SERVICE`] filler endpoints each.
    pub fn synthetic(
        n: usize,
        pos: Position,
        nodeports: bool,
        target_endpoints: &[SocketAddrV4],
    ) -> anyhow::Result<ServiceSet> {
        anyhow::ensure!(n >= 1, "a service set needs at least one Service");
        if nodeports {
            anyhow::ensure!(
                n < MAX_NODEPORT_SERVICES,
                "{n} NodePort Services do not fit in ports {NODEPORT_BASE}..65535"
            );
        }
        let target = pos.index(n);
        let mut ports = Vec::with_capacity(n + 1);
        let mut filler_ep = 0u32;
        let (mut target_tcp, mut target_udp) = (0, 0);
        for i in 0..n {
            let cluster_ip = Ipv4Addr::from(CLUSTER_IP_BASE + i as u32);
            let node_port = nodeports.then(|| NODEPORT_BASE + i as u16);
            let name = format!("svc-{i}");
            let mk = |proto: Proto, endpoints: Vec<SocketAddrV4>| ServicePort {
                namespace: NAMESPACE.to_owned(),
                name: name.clone(),
                port_name: format!("p{SERVICE_PORT}-{}", proto.lower()),
                proto,
                cluster_ip,
                port: SERVICE_PORT,
                node_port,
                endpoints,
            };
            if i == target {
                target_tcp = ports.len();
                ports.push(mk(Proto::Tcp, target_endpoints.to_vec()));
                target_udp = ports.len();
                ports.push(mk(Proto::Udp, target_endpoints.to_vec()));
            } else {
                let eps = (0..ENDPOINTS_PER_SERVICE)
                    .map(|_| {
                        filler_ep += 1;
                        SocketAddrV4::new(
                            Ipv4Addr::from(FILLER_EP_BASE + filler_ep),
                            FILLER_EP_PORT,
                        )
                    })
                    .collect();
                ports.push(mk(Proto::Tcp, eps));
            }
        }
        Ok(ServiceSet {
            ports,
            target_tcp,
            target_udp,
        })
    }

    pub fn target_tcp(&self) -> &ServicePort {
        &self.ports[self.target_tcp]
    }

    pub fn target_udp(&self) -> &ServicePort {
        &self.ports[self.target_udp]
    }

    /// Map entries [`program`] writes: backends, slots and master entries.
    #[cfg(test)]
    pub fn map_entries(&self) -> usize {
        self.ports
            .iter()
            .map(|p| {
                let fes = 1 + usize::from(p.node_port.is_some());
                p.endpoints.len() + fes * (p.endpoints.len() + 1)
            })
            .sum()
    }
}

/// The map entries of a service set, in the agent's write order (backends, then slots, then
/// master entries): what [`program`] writes one at a time and `control_plane` writes in
/// batches.
#[derive(Default)]
pub struct Entries {
    pub backends: Vec<(u32, Backend4)>,
    pub slots: Vec<(Frontend4Key, Service4Value)>,
    pub masters: Vec<(Frontend4Key, Service4Value)>,
}

impl Entries {
    pub fn len(&self) -> usize {
        self.backends.len() + self.slots.len() + self.masters.len()
    }
}

/// Our map entries for `set`: every port gets a ClusterIP frontend and, when it has one, a
/// NodePort frontend (address 0), both pointing at the same backend ids. `svc_id` of port
/// `j` is `j + 1`.
pub fn entries(set: &ServiceSet) -> Entries {
    let mut e = Entries::default();
    let mut next_backend = 1u32;
    for (j, p) in set.ports.iter().enumerate() {
        let proto = p.proto.number();
        let ids: Vec<u32> = p
            .endpoints
            .iter()
            .map(|ep| {
                let id = next_backend;
                next_backend += 1;
                e.backends.push((
                    id,
                    Backend4 {
                        addr: u32::from(*ep.ip()).to_be(),
                        port: ep.port().to_be(),
                        proto,
                        flags: 0,
                        node_addr: 0,
                    },
                ));
                id
            })
            .collect();
        let mut frontends = vec![(
            Frontend4Key::new(u32::from(p.cluster_ip).to_be(), p.port.to_be(), proto, 0),
            flags::CLUSTERIP,
        )];
        if let Some(np) = p.node_port {
            frontends.push((Frontend4Key::new(0, np.to_be(), proto, 0), flags::NODEPORT));
        }
        for (key, kind) in frontends {
            for (slot, id) in ids.iter().enumerate() {
                e.slots.push((
                    key.with_slot(slot as u16 + 1),
                    Service4Value {
                        backend_id: *id,
                        ..Default::default()
                    },
                ));
            }
            e.masters.push((
                key,
                Service4Value {
                    backend_id: 0,
                    count: ids.len() as u16,
                    flags: kind,
                    svc_id: j as u32 + 1,
                    affinity_timeout_s: 0,
                },
            ));
        }
    }
    e
}

/// Writes `entries` one map update at a time through the [`Dataplane`] trait, in the agent's
/// order (backends, slots, masters), so the datapath never sees a half-programmed Service.
pub fn program(dp: &mut impl Dataplane, entries: &Entries) -> anyhow::Result<()> {
    for (id, b) in &entries.backends {
        dp.put_backend(*id, *b)?;
    }
    for (k, v) in entries.slots.iter().chain(&entries.masters) {
        dp.put_service(*k, *v)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::new(10, 244, 0, 10), port)
    }

    #[test]
    fn target_position_and_counts() {
        let set = ServiceSet::synthetic(5, Position::End, true, &[pod(8080)]).expect("set");
        assert_eq!(set.ports.len(), 6);
        assert_eq!((set.target_tcp, set.target_udp), (4, 5));
        assert_eq!(set.target_tcp().proto, Proto::Tcp);
        assert_eq!(set.target_udp().proto, Proto::Udp);
        assert_eq!(set.target_tcp().node_port, Some(30004));
        assert_eq!(set.target_udp().node_port, Some(30004));
        let mid = ServiceSet::synthetic(5, Position::Middle, true, &[pod(8080)]).expect("set");
        assert_eq!(mid.target_tcp, 2);
        assert_eq!(mid.ports[0].endpoints.len(), ENDPOINTS_PER_SERVICE);
        // Filler endpoints are distinct and outside the lab's ranges.
        let mut all: Vec<_> = mid.ports.iter().flat_map(|p| p.endpoints.clone()).collect();
        all.retain(|e| e.ip().octets()[1] == 128);
        let before = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), before);
        assert_eq!(before, 4 * ENDPOINTS_PER_SERVICE);
    }

    #[test]
    fn entries_follow_agent_layout() {
        let set =
            ServiceSet::synthetic(2, Position::End, true, &[pod(8080), pod(8081)]).expect("set");
        let e = entries(&set);
        // svc-0: 10 backends, 2 frontends x (10 slots + master); target: 2 ports x 2 backends,
        // 2 frontends x (2 slots + master) each.
        assert_eq!(e.backends.len(), 10 + 2 + 2);
        assert_eq!(e.slots.len(), 20 + 4 + 4);
        assert_eq!(e.masters.len(), 2 + 2 + 2);
        assert_eq!(e.len(), set.map_entries());
        let np = e
            .masters
            .iter()
            .find(|(k, v)| k.addr == 0 && v.svc_id == 2)
            .expect("target nodeport master");
        assert_eq!(u16::from_be(np.0.port), 30001);
        assert_eq!(np.1.count, 2);
        assert_eq!(np.1.flags, flags::NODEPORT);
    }

    #[test]
    fn refuses_too_many_nodeports() {
        assert!(ServiceSet::synthetic(40_000, Position::End, true, &[pod(1)]).is_err());
        assert!(ServiceSet::synthetic(40_000, Position::End, false, &[pod(1)]).is_ok());
    }
}
