//! The BPF maps, pinned by name so a restarted agent re-uses them (names from `lb_common::maps`).
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use lb_common::{
    maps::*, Affinity4Key, Affinity4Value, Backend4, Counter, Ct4Key, Ct4Value, Frag4Key,
    Frag4Value, Frontend4Key, HalfOpen4, LbConfig, RateLimit, Service4Value, Snat4Value,
    SockRev4Key, SockRev4Value,
};

#[map(name = "LB4_SERVICES_V1")]
pub static SERVICES: HashMap<Frontend4Key, Service4Value> = HashMap::pinned(LB4_SERVICES_MAX, 0);

#[map(name = "LB4_BACKENDS_V1")]
pub static BACKENDS: HashMap<u32, Backend4> = HashMap::pinned(LB4_BACKENDS_MAX, 0);

#[map(name = "LB4_CT_V1")]
pub static CT: LruHashMap<Ct4Key, Ct4Value> = LruHashMap::pinned(LB4_CT_MAX, 0);

#[map(name = "LB4_CT_SYN_V2")]
pub static CT_SYN: Array<HalfOpen4> = Array::pinned(LB4_CT_SYN_MAX, 0);

#[map(name = "LB4_SNAT_V1")]
pub static SNAT: LruHashMap<Ct4Key, Snat4Value> = LruHashMap::pinned(LB4_SNAT_MAX, 0);

#[map(name = "LB4_AFFINITY_V1")]
pub static AFFINITY: LruHashMap<Affinity4Key, Affinity4Value> =
    LruHashMap::pinned(LB4_AFFINITY_MAX, 0);

#[map(name = "LB4_FRAG_V1")]
pub static FRAG: LruHashMap<Frag4Key, Frag4Value> = LruHashMap::pinned(LB4_FRAG_MAX, 0);

#[map(name = "LB_REJECT_RATE_V1")]
pub static REJECT_RATE: PerCpuArray<RateLimit> = PerCpuArray::pinned(LB_REJECT_RATE_MAX, 0);

#[map(name = "LB4_SOCK_REVNAT_V1")]
pub static SOCK_REVNAT: LruHashMap<SockRev4Key, SockRev4Value> =
    LruHashMap::pinned(LB4_SOCK_REVNAT_MAX, 0);

#[map(name = "LB4_NODE_ADDRS_V1")]
pub static NODE_ADDRS: HashMap<u32, u32> = HashMap::pinned(LB4_NODE_ADDRS_MAX, 0);

#[map(name = "LB_PEER_IFS_V1")]
pub static PEER_IFS: HashMap<u32, u32> = HashMap::pinned(LB_PEER_IFS_MAX, 0);

#[map(name = "LB_PORTS_V1")]
pub static PORTS: Array<u8> = Array::pinned(LB_PORTS_MAX, 0);

#[map(name = "LB_STATS_V1")]
pub static STATS: PerCpuArray<Counter> = PerCpuArray::pinned(LB_STATS_MAX, 0);

#[map(name = "LB_SVC_STATS_V1")]
pub static SVC_STATS: PerCpuArray<Counter> = PerCpuArray::pinned(LB_SVC_STATS_MAX, 0);

#[map(name = "LB_LATENCY_V1")]
pub static LATENCY: PerCpuArray<u64> = PerCpuArray::pinned(LB_LATENCY_MAX, 0);

#[map(name = "LB_CONFIG_V2")]
pub static CONFIG: Array<LbConfig> = Array::pinned(LB_CONFIG_MAX, 0);
