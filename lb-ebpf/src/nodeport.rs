//! NodePort SNAT for remote backends (externalTrafficPolicy Cluster), and forwarding from
//! XDP itself (from TC ingress with `--attach tc`: `redirect`).
//!
//! A new flow from a client to a NodePort, LoadBalancer or external IP frontend whose chosen
//! backend lives on another node leaves this node with this node's address and a SNAT port
//! as its source, so the backend's reply comes back here. The port is allocated by inserting
//! the reply entry with `BPF_NOEXIST`: the insert is atomic across CPUs, so two flows never
//! share a live (backend, node address, port) tuple; after a bounded number of tries the
//! flow is dropped as `XdpDropSnatExhausted`. The reply is translated back (source = the
//! frontend the client used, destination = the client) on this node's XDP ingress.
//!
//! Translated packets carry one of this node's addresses as source (forward) or come from
//! a frontend address of this node (reply), which the stack would drop as martian on input.
//! So they leave from XDP: `bpf_fib_lookup` gives the next hop and MACs, then `XDP_TX` (same
//! interface) or `XDP_REDIRECT` (another one), with the TTL decremented as a router does.
//! Without a FIB result (no route, no neighbour yet, TTL expiring, MTU exceeded) the packet
//! goes to the stack (`XDP_PASS`), counted apart.
use aya_ebpf::{
    bindings::{bpf_fib_lookup, xdp_action, BPF_FIB_LKUP_RET_SUCCESS},
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect},
    programs::XdpContext,
};
use lb_common::{
    conntrack::{frag_flags, CT_FORWARD, CT_REPLY},
    csum, select,
    service::{backend_flags, flags},
    Backend4, Ct4Key, Reason, Snat4Value,
};

use crate::{
    clock,
    conntrack::forward_key_v4,
    frag,
    hook::Ingress,
    lb::Frontend,
    maps::{CONFIG, SNAT},
    nat::End,
    parse::{ptr_at, raw16, EthHdr, Flow4, Ipv4Hdr, ETH_HLEN},
    stats::Verdict,
};

/// Ports tried for one new flow before it is dropped as exhausted.
const SNAT_TRIES: u32 = 16;
const BPF_ANY: u64 = 0;
const BPF_NOEXIST: u64 = 1;
const AF_INET: u8 = 2;

/// Whether a new flow of `fe` to `backend` must be SNATed: a remote backend of a frontend
/// reached from outside the cluster with externalTrafficPolicy Cluster.
#[inline(always)]
pub fn needs_snat(fe: &Frontend, backend: &Backend4) -> bool {
    let external = flags::NODEPORT | flags::LOADBALANCER | flags::EXTERNAL_IP;
    backend.flags & backend_flags::REMOTE != 0
        && fe.svc.flags & flags::EXT_LOCAL == 0
        && fe.svc.flags & external != 0
}

/// Allocate a SNAT port for the new flow `flow` to `backend` and create its two `LB4_SNAT`
/// entries. Returns the forward entry (the new source).
#[inline(always)]
pub fn create_v4(flow: &Flow4, backend: &Backend4, svc_id: u32) -> Result<Snat4Value, Reason> {
    let cfg = CONFIG.get(0).ok_or(Reason::XdpDropSnatExhausted)?;
    let (min, max) = (cfg.snat_port_min, cfg.snat_port_max);
    if max == 0 || min > max {
        return Err(Reason::XdpDropSnatExhausted);
    }
    let src = if cfg.snat_addr != 0 {
        cfg.snat_addr
    } else {
        flow.daddr
    };
    let now = clock::now_ns();
    let reply = Snat4Value {
        addr: flow.saddr,
        port: flow.sport,
        fe_addr: flow.daddr,
        fe_port: flow.dport,
        svc_id,
        created_ns: now,
        ..Snat4Value::default()
    };
    let span = u32::from(max - min) + 1;
    // The config is in hand: hash with its seed rather than reading it again.
    let h = select::flow_hash_v4(
        flow.saddr,
        flow.daddr,
        flow.sport,
        flow.dport,
        flow.proto,
        cfg.hash_seed,
    );
    for i in 0..SNAT_TRIES {
        let port = (u32::from(min) + h.wrapping_add(i.wrapping_mul(0x9e37_79b9)) % span) as u16;
        let key = Ct4Key {
            saddr: backend.addr,
            daddr: src,
            sport: backend.port,
            dport: port.to_be(),
            proto: flow.proto,
            dir: CT_REPLY,
            _pad: [0; 2],
        };
        if SNAT.insert(key, reply, BPF_NOEXIST).is_ok() {
            let fwd = Snat4Value {
                addr: src,
                port: port.to_be(),
                svc_id,
                created_ns: now,
                ..Snat4Value::default()
            };
            if SNAT.insert(forward_key_v4(flow), fwd, BPF_ANY).is_err() {
                let _ = SNAT.remove(key);
                return Err(Reason::XdpDropCtInsert);
            }
            return Ok(fwd);
        }
    }
    Err(Reason::XdpDropSnatExhausted)
}

/// The SNAT source of a tracked SNATed flow; allocated again if its entries were evicted.
#[inline(always)]
pub fn lookup_v4(flow: &Flow4, backend: &Backend4, svc_id: u32) -> Result<Snat4Value, Reason> {
    // SAFETY: plain data; a concurrent LRU eviction at worst yields a stale copy.
    match unsafe { SNAT.get(forward_key_v4(flow)) } {
        Some(v) => Ok(*v),
        None => create_v4(flow, backend, svc_id),
    }
}

/// After the DNAT of `flow` to `backend`: rewrite the source to `snat` and send the packet
/// on from the ingress hook.
#[inline(always)]
pub fn forward_v4<C: Ingress>(
    ctx: &mut C,
    flow: &Flow4,
    backend: &Backend4,
    snat: &Snat4Value,
) -> Result<Verdict, Reason> {
    ctx.rewrite_v4(flow, End::Src, snat.addr, snat.port)?;
    ctx.out_v4(
        flow.proto,
        snat.addr,
        backend.addr,
        [
            Reason::XdpSnatTx,
            Reason::XdpSnatRedirect,
            Reason::XdpSnatPass,
        ],
    )
}

/// A packet to this node's address on a SNAT port: if it is the reply of a SNATed flow,
/// translate it back to the client and send it on. `None`: not ours.
#[inline(always)]
pub fn reverse_v4<C: Ingress>(ctx: &mut C, flow: &Flow4) -> Option<Result<(Verdict, u32), Reason>> {
    let cfg = CONFIG.get(0)?;
    let port = u16::from_be(flow.dport);
    if cfg.snat_port_max == 0 || port < cfg.snat_port_min || port > cfg.snat_port_max {
        return None;
    }
    let key = Ct4Key {
        dir: CT_REPLY,
        ..forward_key_v4(flow)
    };
    // SAFETY: plain data; a concurrent LRU eviction at worst yields a stale copy.
    let v = unsafe { SNAT.get(key) }.copied()?;
    Some(reverse_apply_v4(ctx, flow, &v))
}

/// Translate a remote backend's reply by its SNAT entry `v` and send it on. (A function,
/// not a closure: an outlined closure returning its result through the stack is rejected
/// by the verifier.)
#[inline(always)]
fn reverse_apply_v4<C: Ingress>(
    ctx: &mut C,
    flow: &Flow4,
    v: &Snat4Value,
) -> Result<(Verdict, u32), Reason> {
    ctx.rewrite_v4(flow, End::Src, v.fe_addr, v.fe_port)?;
    ctx.rewrite_v4(flow, End::Dst, v.addr, v.port)?;
    frag::record_v4(
        flow,
        CT_FORWARD,
        v.fe_addr,
        v.addr,
        frag_flags::FORWARD,
        v.svc_id,
    );
    let verdict = ctx.out_v4(
        flow.proto,
        v.fe_addr,
        v.addr,
        [
            Reason::XdpRevSnatTx,
            Reason::XdpRevSnatRedirect,
            Reason::XdpRevSnatPass,
        ],
    )?;
    Ok((verdict, v.svc_id))
}

/// Send a translated packet on from XDP: FIB lookup, TTL decrement, MACs, then `XDP_TX` or
/// `XDP_REDIRECT`; `XDP_PASS` when there is no usable FIB result. `reasons` are the counted
/// reasons for TX, REDIRECT and PASS.
#[inline(always)]
pub fn out_v4(
    ctx: &XdpContext,
    proto: u8,
    saddr: u32,
    daddr: u32,
    reasons: [Reason; 3],
) -> Result<Verdict, Reason> {
    let ip: *mut Ipv4Hdr = ptr_at(ctx, ETH_HLEN).ok_or(Reason::XdpDropMalformedL3)?;
    // SAFETY: bounds checked by ptr_at; alignment 1.
    let ip = unsafe { &mut *ip };
    if ip.ttl <= 1 {
        // The stack sends the ICMP time exceeded.
        return Ok(Verdict::pass(reasons[2]));
    }
    // SAFETY: an all-zero bpf_fib_lookup is a valid value (plain integers and unions).
    let mut p: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    p.family = AF_INET;
    p.l4_protocol = proto;
    p.__bindgen_anon_1.tot_len = u16::from_be_bytes(ip.tot_len);
    // SAFETY: ctx.ctx is the program's xdp_md.
    let ingress = unsafe { (*ctx.ctx).ingress_ifindex };
    p.ifindex = ingress;
    p.__bindgen_anon_2.tos = ip.tos;
    p.__bindgen_anon_3.ipv4_src = saddr;
    p.__bindgen_anon_4.ipv4_dst = daddr;
    // SAFETY: p is a valid bpf_fib_lookup of the size passed.
    let rc = unsafe {
        fib_lookup(
            ctx.ctx.cast(),
            &mut p,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    if rc != i64::from(BPF_FIB_LKUP_RET_SUCCESS) {
        return Ok(Verdict::pass(reasons[2]));
    }
    let old = raw16([ip.ttl, ip.proto]);
    ip.ttl -= 1;
    ip.check = csum::replace2(raw16(ip.check), old, raw16([ip.ttl, ip.proto])).to_ne_bytes();
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(Reason::XdpDropMalformedL2)?;
    // SAFETY: as above.
    let eth = unsafe { &mut *eth };
    eth.dst = p.dmac;
    eth.src = p.smac;
    if p.ifindex == ingress {
        return Ok(Verdict {
            reason: reasons[0],
            action: xdp_action::XDP_TX,
        });
    }
    // SAFETY: bpf_redirect has no preconditions; it returns XDP_REDIRECT or XDP_ABORTED.
    let action = unsafe { bpf_redirect(p.ifindex, 0) } as u32;
    Ok(Verdict {
        reason: reasons[1],
        action,
    })
}
