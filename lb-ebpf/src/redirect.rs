//! Forwarding from TC ingress (`--attach tc`): a FIB lookup, the TTL decrement and the MACs a
//! router applies, then `bpf_redirect_peer` into a local pod's namespace (its host-side
//! device is a veth listed in `LB_PEER_IFS`), `bpf_redirect` out of the FIB's device, or
//! `bpf_redirect_neigh` when the next hop has no neighbour entry yet. Without a usable FIB
//! result (a local address, no route, TTL expiring, MTU exceeded) the packet goes to the stack.
//!
//! A packet forwarded here skips the node's own stack (routing, netfilter) on its way in, as
//! Cilium's host routing does; its reply still goes through it, then TC egress.
use aya_ebpf::{
    bindings::{
        bpf_fib_lookup, xdp_action, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        TC_ACT_REDIRECT,
    },
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer},
    programs::TcContext,
};
use lb_common::Reason;

use crate::{
    maps::PEER_IFS,
    parse::{raw16, Ipv4Hdr, Packet, ETH_HLEN, IP_CSUM_OFF, IP_TTL_OFF},
    stats::{self, Verdict},
};

const AF_INET: u8 = 2;

/// How a forwarded packet left.
enum Out {
    /// Into the namespace of the veth `ifindex`'s peer.
    Peer,
    /// Out of `ifindex` (the device it came in on, or another one).
    Dev { same: bool },
    /// Out of a device whose neighbour the kernel resolves.
    Neigh,
}

/// FIB lookup for the packet in `ctx` (its IPv4 header already translated) towards
/// `daddr`, then the router's part and the redirect. `None`: the stack must have it.
#[inline(always)]
fn forward(ctx: &mut TcContext, daddr: u32, peer_ok: bool) -> Option<Out> {
    let ip: Ipv4Hdr = ctx.read(ETH_HLEN)?;
    if ip.ttl <= 1 {
        // The stack sends the ICMP time exceeded.
        return None;
    }
    // SAFETY: ctx.skb.skb is the program's __sk_buff.
    let ingress = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: an all-zero bpf_fib_lookup is a valid value (plain integers and unions).
    let mut p: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    p.family = AF_INET;
    p.l4_protocol = ip.proto;
    // tot_len 0: the kernel checks the skb itself (GSO-aware) against the egress MTU.
    p.ifindex = ingress;
    p.__bindgen_anon_2.tos = ip.tos;
    p.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(ip.saddr);
    p.__bindgen_anon_4.ipv4_dst = daddr;
    // SAFETY: p is a valid bpf_fib_lookup of the size passed; ctx.skb.skb is the skb.
    let rc = unsafe {
        fib_lookup(
            ctx.skb.skb.cast(),
            &mut p,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    let neigh = rc == i64::from(BPF_FIB_LKUP_RET_NO_NEIGH);
    if rc != i64::from(BPF_FIB_LKUP_RET_SUCCESS) && !neigh {
        return None;
    }
    if !neigh {
        let mut macs = [0u8; 12];
        macs[..6].copy_from_slice(&p.dmac);
        macs[6..].copy_from_slice(&p.smac);
        ctx.store(0, &macs, 0).ok()?;
    }
    // The TTL as a router decrements it (the word it shares with the protocol).
    let old = raw16([ip.ttl, ip.proto]);
    let new = raw16([ip.ttl - 1, ip.proto]);
    ctx.l3_csum_replace(IP_CSUM_OFF, u64::from(old), u64::from(new), 2)
        .ok()?;
    ctx.store(IP_TTL_OFF, &(ip.ttl - 1), 0).ok()?;
    if neigh {
        // SAFETY: no parameters: the kernel looks the next hop up itself.
        let rc = unsafe { bpf_redirect_neigh(p.ifindex, core::ptr::null_mut(), 0, 0) };
        return (rc == i64::from(TC_ACT_REDIRECT)).then_some(Out::Neigh);
    }
    // SAFETY: plain data.
    let peer = peer_ok && p.ifindex != ingress && unsafe { PEER_IFS.get(p.ifindex) }.is_some();
    // SAFETY: bpf_redirect(_peer) have no preconditions (flags 0).
    let rc = unsafe {
        if peer {
            bpf_redirect_peer(p.ifindex, 0)
        } else {
            bpf_redirect(p.ifindex, 0)
        }
    };
    if rc != i64::from(TC_ACT_REDIRECT) {
        return None;
    }
    Some(if peer {
        Out::Peer
    } else {
        Out::Dev {
            same: p.ifindex == ingress,
        }
    })
}

#[inline(always)]
fn redirected(reason: Reason, event: Reason) -> Verdict {
    stats::count_n(event, 1);
    Verdict {
        reason,
        action: xdp_action::XDP_REDIRECT,
    }
}

/// A DNATed packet towards `daddr`, counted as `reason` whichever way it leaves.
#[inline(always)]
pub fn deliver_v4(ctx: &mut TcContext, daddr: u32, reason: Reason) -> Verdict {
    match forward(ctx, daddr, true) {
        Some(Out::Peer) => redirected(reason, Reason::TcRedirectPeer),
        Some(Out::Dev { .. }) => redirected(reason, Reason::TcRedirect),
        Some(Out::Neigh) => redirected(reason, Reason::TcRedirectNeigh),
        None => Verdict::pass(reason),
    }
}

/// A translated packet the stack would drop as martian (see `nodeport`): `reasons` are the
/// verdicts for leaving by the ingress device, by another device, and for the stack.
#[inline(always)]
pub fn out_v4(ctx: &mut TcContext, daddr: u32, reasons: [Reason; 3]) -> Result<Verdict, Reason> {
    Ok(match forward(ctx, daddr, false) {
        Some(Out::Dev { same: true }) => redirected(reasons[0], Reason::TcRedirect),
        Some(Out::Dev { same: false }) | Some(Out::Peer) => {
            redirected(reasons[1], Reason::TcRedirect)
        }
        Some(Out::Neigh) => redirected(reasons[1], Reason::TcRedirectNeigh),
        None => Verdict::pass(reasons[2]),
    })
}
