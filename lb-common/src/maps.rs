//! Map names and default capacities, one constant each. The agent may raise a capacity at
//! load time (`EbpfLoader::map_max_entries`); the names carry a layout version (`_V1`), so an
//! upgraded agent with a new layout never misreads an old pin.

/// Frontends and their backend slots: [`crate::Frontend4Key`] -> [`crate::Service4Value`].
pub const LB4_SERVICES: &str = "LB4_SERVICES_V1";
/// Default entries of [`LB4_SERVICES`]: master entries plus one per backend slot.
pub const LB4_SERVICES_MAX: u32 = 65_536;

/// Backends by id: `u32` -> [`crate::Backend4`].
pub const LB4_BACKENDS: &str = "LB4_BACKENDS_V1";
pub const LB4_BACKENDS_MAX: u32 = 65_536;

/// Connection tracking, LRU: [`crate::Ct4Key`] -> [`crate::Ct4Value`].
pub const LB4_CT: &str = "LB4_CT_V1";
pub const LB4_CT_MAX: u32 = 262_144;

/// Conntrack of TCP flows not yet established (a SYN seen, no ACK from the client yet): an
/// array of [`crate::HalfOpen4`] slots, one per client hash, each standing for both
/// directions of its flow. Kept apart so that a SYN flood displaces only other half-open
/// flows, never established ones: a flow moves to `LB4_CT` with the client's first ACK.
/// (V1 was an LRU hash of forward and reply entries: two LRU inserts per SYN.)
pub const LB4_CT_SYN: &str = "LB4_CT_SYN_V2";
/// Default slots of [`LB4_CT_SYN`]; the agent sizes it to a quarter of the conntrack's,
/// rounded down to a power of two.
pub const LB4_CT_SYN_MAX: u32 = 65_536;

/// SNAT of flows to remote backends, LRU: [`crate::Ct4Key`] -> [`crate::Snat4Value`].
pub const LB4_SNAT: &str = "LB4_SNAT_V1";
pub const LB4_SNAT_MAX: u32 = 131_072;

/// Default SNAT source ports: above Linux's default `ip_local_port_range` (32768-60999) and
/// the NodePort range, so they never collide with the node's own connections.
pub const DEFAULT_SNAT_PORTS: (u16, u16) = (61_000, 65_535);

/// sessionAffinity ClientIP, LRU: [`crate::Affinity4Key`] -> [`crate::Affinity4Value`].
pub const LB4_AFFINITY: &str = "LB4_AFFINITY_V1";
pub const LB4_AFFINITY_MAX: u32 = 65_536;

/// The node's own IPv4 addresses (network order) -> flags (0). NodePort and wildcard
/// hostPort frontends (address 0) match only packets addressed to one of these.
pub const LB4_NODE_ADDRS: &str = "LB4_NODE_ADDRS_V1";
pub const LB4_NODE_ADDRS_MAX: u32 = 256;
/// `--attach tc`: this node's veth devices whose peer is in another namespace (ifindex -> 1),
/// which TC ingress may hand a pod's packets to with `bpf_redirect_peer`; any other device
/// gets `bpf_redirect`. Kept by the agent.
pub const LB_PEER_IFS: &str = "LB_PEER_IFS_V1";
pub const LB_PEER_IFS_MAX: u32 = 4096;

/// The port filter: `u8` bits ([`crate::service::port_bits`]) per host-order port, read
/// first by both packet programs so that traffic no frontend or backend uses leaves after
/// one array read. Used only while `LbConfig::flags` has `PORT_FILTER` (set by the agent
/// once it has written every port).
pub const LB_PORTS: &str = "LB_PORTS_V1";
pub const LB_PORTS_MAX: u32 = 65_536;

/// Per-CPU verdict counters indexed by [`crate::Reason`]: `u32` -> [`crate::Counter`].
pub const LB_STATS: &str = "LB_STATS_V1";
pub const LB_STATS_MAX: u32 = 64;

/// Per-CPU per-frontend counters indexed by `Service4Value::svc_id`: `u32` -> [`crate::Counter`].
pub const LB_SVC_STATS: &str = "LB_SVC_STATS_V1";
pub const LB_SVC_STATS_MAX: u32 = 65_536;

/// Fragment tracking, LRU: [`crate::Frag4Key`] -> [`crate::Frag4Value`].
pub const LB4_FRAG: &str = "LB4_FRAG_V1";
pub const LB4_FRAG_MAX: u32 = 8_192;

/// Per-CPU token bucket of the ICMP rejects: one [`crate::RateLimit`].
pub const LB_REJECT_RATE: &str = "LB_REJECT_RATE_V1";
pub const LB_REJECT_RATE_MAX: u32 = 1;

/// Reverse translation of the socket hooks, LRU: [`crate::SockRev4Key`] (socket cookie and
/// backend) -> [`crate::SockRev4Value`] (the Service address the socket asked for).
pub const LB4_SOCK_REVNAT: &str = "LB4_SOCK_REVNAT_V1";
pub const LB4_SOCK_REVNAT_MAX: u32 = 262_144;

/// Per-CPU log2 histogram of the programs' own run time (`--latency-histogram`): `u64`
/// counts at `prog * LATENCY_BUCKETS + bucket`, `prog` 0 for the ingress program (XDP or
/// TC ingress) and 1 for TC egress; bucket `k` counts runs of `2^(k-1)` to `2^k - 1` ns
/// (bucket 0: 0 ns). Written only by the `_timed` program variants.
pub const LB_LATENCY: &str = "LB_LATENCY_V1";
pub const LATENCY_BUCKETS: u32 = 64;
pub const LB_LATENCY_MAX: u32 = 2 * LATENCY_BUCKETS;

/// One-entry array holding [`crate::LbConfig`] (V2: with the host netns cookie).
pub const LB_CONFIG: &str = "LB_CONFIG_V2";
pub const LB_CONFIG_MAX: u32 = 1;

/// Every map the agent pins, for sweeps and `status`.
pub const ALL_MAPS: [&str; 16] = [
    LB4_SERVICES,
    LB4_BACKENDS,
    LB4_CT,
    LB4_CT_SYN,
    LB4_SNAT,
    LB4_FRAG,
    LB_REJECT_RATE,
    LB4_AFFINITY,
    LB4_SOCK_REVNAT,
    LB4_NODE_ADDRS,
    LB_PEER_IFS,
    LB_PORTS,
    LB_STATS,
    LB_SVC_STATS,
    LB_LATENCY,
    LB_CONFIG,
];

/// Map names of earlier layouts: a restarted agent removes their pins once its programs
/// have replaced the old ones, and `detach` accepts them as this tool's own.
pub const LEGACY_MAPS: [&str; 2] = ["LB_CONFIG_V1", "LB4_CT_SYN_V1"];

/// Program names, as the kernel objects name them (`#[xdp]`/`#[classifier]` fn names).
pub const PROG_XDP_INGRESS: &str = "lb_xdp_ingress";
pub const PROG_TC_EGRESS: &str = "lb_tc_egress";
/// The same programs recording their own run time in `LB_LATENCY` (`--latency-histogram`).
pub const PROG_XDP_INGRESS_TIMED: &str = "lb_xdp_ingress_timed";
/// The ingress program at TC ingress instead of XDP (`lb-agent run --attach tc`).
pub const PROG_TC_INGRESS: &str = "lb_tc_ingress";
pub const PROG_TC_INGRESS_TIMED: &str = "lb_tc_ingress_timed";
pub const PROG_TC_EGRESS_TIMED: &str = "lb_tc_egress_timed";
/// An XDP program that passes every frame, for the far end of veth uplinks.
pub const PROG_XDP_PASS: &str = "lb_xdp_pass";
/// A TC program that passes every packet: the benchmark's floor for the TC rows.
pub const PROG_TC_PASS: &str = "lb_tc_pass";
/// The cgroup socket hooks (socket-level load balancing), with their attach points.
pub const PROG_SOCK_CONNECT4: &str = "lb_sock_connect4";
pub const PROG_SOCK_SENDMSG4: &str = "lb_sock_sendmsg4";
pub const PROG_SOCK_RECVMSG4: &str = "lb_sock_recvmsg4";
pub const PROG_SOCK_GETPEERNAME4: &str = "lb_sock_getpeername4";
/// `(program, attach point)` of every socket hook; the link pin is `links/cgroup-<point>`.
pub const SOCK_PROGS: [(&str, &str); 4] = [
    (PROG_SOCK_CONNECT4, "connect4"),
    (PROG_SOCK_SENDMSG4, "sendmsg4"),
    (PROG_SOCK_RECVMSG4, "recvmsg4"),
    (PROG_SOCK_GETPEERNAME4, "getpeername4"),
];
