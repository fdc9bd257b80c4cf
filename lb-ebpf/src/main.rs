//! Entry points only: ingress on the node's uplinks (DNAT) at XDP or, with `--attach tc`, at
//! TC ingress (the hook-specific half in `hook`), TC egress (reverse NAT) and the cgroup
//! socket hooks. Each thin entry calls a `try_` function (or its module's entry);
//! every verdict, pass or drop, is counted by reason.
//!
//! One module per concern, Cilium/Katran style: `parse` (headers, fragments, ICMP errors;
//! both programs), `lb` (frontend lookup, backend choice), `affinity` (sessionAffinity
//! ClientIP), `conntrack` (forward and reply entries, half-open flows, timeouts), `nat`
//! (rewrites), `nodeport` (SNAT for remote backends and forwarding from XDP), `icmp` (error
//! translation and the no-endpoint REJECT), `frag` (fragment tracking), `sock` (socket-level
//! load balancing for the node's own processes and pods, sharing `lb` and `affinity`),
//! `stats` (verdict counters), `redirect` (forwarding from TC ingress), `maps`. The pure
//! arithmetic (checksums, flow hash, slot choice) lives in `lb_common::{csum, select}` and
//! is property-tested on the host.
#![no_std]
#![no_main]

mod affinity;
mod clock;
mod conntrack;
mod frag;
mod hook;
mod icmp;
mod lb;
mod maps;
mod nat;
mod nodeport;
mod parse;
mod redirect;
mod sock;
mod stats;

use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_OK, TC_ACT_SHOT},
    helpers::bpf_ktime_get_ns,
    macros::{cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, TcContext, XdpContext},
};
use lb_common::{
    conntrack::{ct_flags, frag_flags, CT_FORWARD, CT_REPLY},
    service::port_bits,
    Backend4, Reason,
};

use crate::{
    hook::Ingress,
    nat::End,
    parse::{Malformed, Mode, Parsed, Skip},
    stats::Verdict,
};

/// XDP on the node's uplinks: DNAT packets addressed to a NodePort/hostPort frontend to the
/// flow's backend.
///
/// Forwarding choice: after the rewrite a packet for a local backend is handed to the kernel
/// stack (`XDP_PASS`), not redirected. The stack routes it to the pod's veth with its own FIB and
/// neighbour tables, decrements the TTL and applies the node's netfilter policy, and it works
/// for every egress device (veth peers would otherwise need an XDP program of their own to
/// accept `bpf_redirect` frames). The cost is one trip through the stack; the lookup, conntrack
/// and rewrite, which are what this project measures, stay in XDP. Packets SNATed for a remote
/// backend, and their replies, leave from XDP instead (see `nodeport`): the stack would drop
/// them as martian.
#[xdp]
pub fn lb_xdp_ingress(mut ctx: XdpContext) -> u32 {
    xdp_ingress(&mut ctx)
}

/// `lb_xdp_ingress` recording its own run time (`--latency-histogram`): a program of its
/// own, so that without the option the timing costs nothing.
#[xdp]
pub fn lb_xdp_ingress_timed(mut ctx: XdpContext) -> u32 {
    // SAFETY: no preconditions.
    let t0 = unsafe { bpf_ktime_get_ns() };
    let action = xdp_ingress(&mut ctx);
    stats::record_latency(0, t0);
    action
}

#[inline(always)]
fn xdp_ingress(ctx: &mut XdpContext) -> u32 {
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    let (reason, action) = match try_ingress(ctx, bytes) {
        Ok(v) => (v.reason, v.action),
        Err(reason) => (reason, xdp_action::XDP_DROP),
    };
    stats::count(reason, bytes);
    action
}

/// The ingress program at TC ingress instead of XDP (`lb-agent run --attach tc`): the same
/// lookups, conntrack and NAT; a packet for a local pod is handed straight to the pod's
/// namespace (`bpf_redirect_peer`) rather than to the stack (see `redirect`). For veth
/// uplinks, where XDP runs on a copy of every skb, this may be the cheaper hook.
#[classifier]
pub fn lb_tc_ingress(mut ctx: TcContext) -> i32 {
    tc_ingress(&mut ctx)
}

/// `lb_tc_ingress` recording its own run time (`--latency-histogram`), in the ingress
/// program's histogram.
#[classifier]
pub fn lb_tc_ingress_timed(mut ctx: TcContext) -> i32 {
    // SAFETY: no preconditions.
    let t0 = unsafe { bpf_ktime_get_ns() };
    let action = tc_ingress(&mut ctx);
    stats::record_latency(0, t0);
    action
}

#[inline(always)]
fn tc_ingress(ctx: &mut TcContext) -> i32 {
    let bytes = u64::from(ctx.len());
    let (reason, action) = match try_ingress(ctx, bytes) {
        Ok(v) => (v.reason, hook::tc_action(v.action)),
        Err(reason) => (reason, TC_ACT_SHOT),
    };
    stats::count(reason, bytes);
    action
}

/// The ingress program at either hook. `Ok(verdict)`: pass, TX or redirect with that
/// reason. `Err(reason)`: drop with that reason.
#[inline(always)]
fn try_ingress<C: Ingress>(ctx: &mut C, bytes: u64) -> Result<Verdict, Reason> {
    let flow = match parse::parse_v4(ctx, Mode::Strict) {
        Ok(Parsed::Flow(flow)) => flow,
        Ok(Parsed::Fragment(f)) => return frag::ingress_v4(ctx, &f, bytes),
        Ok(Parsed::IcmpErr(e)) => {
            return icmp::ingress_v4(ctx, &e)
                .unwrap_or(Ok(Verdict::pass(Reason::XdpPassNotService)));
        }
        Ok(Parsed::Skip(skip)) => return Ok(Verdict::pass(xdp_skip_reason(skip))),
        Err(Malformed::L2) => return Err(Reason::XdpDropMalformedL2),
        Err(Malformed::L3) => return Err(Reason::XdpDropMalformedL3),
        Err(Malformed::L4) => return Err(Reason::XdpDropMalformedL4),
    };
    if !lb::port_may_match_v4(flow.dport, port_bits::frontend(flow.proto)) {
        return Ok(Verdict::pass(Reason::XdpPassNotService));
    }
    // A tracked flow needs nothing but its conntrack entry: one lookup.
    if let Some(ct) = conntrack::lookup_v4(&flow) {
        return forward_flow_v4(ctx, &flow, &ct, false, bytes);
    }
    let Some(fe) = lb::lookup_frontend_v4(&flow) else {
        // Not a frontend: perhaps a remote backend's reply to a SNATed flow.
        return match nodeport::reverse_v4(ctx, &flow) {
            Some(r) => {
                let (verdict, svc_id) = r?;
                stats::count_svc(svc_id, bytes);
                Ok(verdict)
            }
            None => Ok(Verdict::pass(Reason::XdpPassNotService)),
        };
    };
    let chosen = if fe.svc.affinity_timeout_s != 0 {
        affinity::select_backend_v4(
            &fe,
            affinity::Client::addr(flow.saddr),
            lb::flow_hash_v4(&flow),
        )
    } else {
        lb::select_backend_v4(&fe, lb::flow_hash_v4(&flow)).map(|(id, b, _)| (id, b))
    };
    let (id, backend) = match chosen {
        Ok(c) => c,
        // kube-proxy's REJECT: an ICMP port unreachable, rate-limited.
        Err(Reason::XdpDropNoBackend) => return ctx.reject_v4(),
        Err(r) => return Err(r),
    };
    let flags = if nodeport::needs_snat(&fe, &backend) {
        ct_flags::SNAT
    } else {
        0
    };
    let ct = conntrack::create_v4(&flow, &fe, id, &backend, flags)?;
    forward_flow_v4(ctx, &flow, &ct, true, bytes)
}

/// DNAT (and for a remote backend, SNAT and send on) a packet of the flow pinned by `ct`.
#[inline(always)]
fn forward_flow_v4<C: Ingress>(
    ctx: &mut C,
    flow: &parse::Flow4,
    ct: &lb_common::Ct4Value,
    new: bool,
    bytes: u64,
) -> Result<Verdict, Reason> {
    // A flow to a remote backend gets its SNAT source first: a flow that cannot have one is
    // dropped untouched.
    let backend = Backend4 {
        addr: ct.nat_addr,
        port: ct.nat_port,
        ..Backend4::default()
    };
    let snat = match (ct.flags & ct_flags::SNAT != 0, new) {
        (false, _) => None,
        (true, true) => Some(
            nodeport::create_v4(flow, &backend, ct.svc_id).inspect_err(|_| {
                // No SNAT port: leave no half-made flow behind.
                conntrack::remove_v4(flow);
            })?,
        ),
        (true, false) => Some(nodeport::lookup_v4(flow, &backend, ct.svc_id)?),
    };
    ctx.rewrite_v4(flow, End::Dst, ct.nat_addr, ct.nat_port)?;
    stats::count_svc(ct.svc_id, bytes);
    if let Some(snat) = snat {
        frag::record_v4(
            flow,
            CT_FORWARD,
            snat.addr,
            ct.nat_addr,
            frag_flags::FORWARD,
            ct.svc_id,
        );
        return nodeport::forward_v4(ctx, flow, &backend, &snat);
    }
    frag::record_v4(flow, CT_FORWARD, flow.saddr, ct.nat_addr, 0, ct.svc_id);
    let reason = if new {
        Reason::XdpFwdNewFlow
    } else {
        Reason::XdpFwdTracked
    };
    Ok(ctx.deliver_v4(ct.nat_addr, reason))
}

#[inline(always)]
fn xdp_skip_reason(skip: Skip) -> Reason {
    match skip {
        Skip::NonIpv4 => Reason::XdpPassNonIpv4,
        Skip::IpOptions => Reason::XdpPassIpOptions,
        Skip::OtherProto => Reason::XdpPassNotService,
    }
}

/// Passes every frame. Attached to the far end of a veth uplink (a kind node's host side, the
/// lab's bridge ports), so that frames `lb_xdp_ingress` sends with XDP_TX or XDP_REDIRECT are
/// received at once: a veth wakes its peer for XDP frames only when the peer runs an XDP
/// program. Also the floor of the per-packet benchmark.
#[xdp]
pub fn lb_xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Passes every packet: the TC twin of `lb_xdp_pass`, the floor of the per-packet benchmark's
/// TC rows (never attached).
#[classifier]
pub fn lb_tc_pass(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}

/// TC egress on the node's uplinks: replies from backends get the frontend address and port
/// back as their source, so the client sees the address it connected to.
#[classifier]
pub fn lb_tc_egress(mut ctx: TcContext) -> i32 {
    tc_egress(&mut ctx)
}

/// `lb_tc_egress` recording its own run time (`--latency-histogram`).
#[classifier]
pub fn lb_tc_egress_timed(mut ctx: TcContext) -> i32 {
    // SAFETY: no preconditions.
    let t0 = unsafe { bpf_ktime_get_ns() };
    let action = tc_egress(&mut ctx);
    stats::record_latency(1, t0);
    action
}

#[inline(always)]
fn tc_egress(ctx: &mut TcContext) -> i32 {
    let bytes = u64::from(ctx.len());
    let (reason, action) = match try_tc_egress(ctx, bytes) {
        Ok(reason) => (reason, TC_ACT_OK),
        Err(reason) => (reason, TC_ACT_SHOT),
    };
    stats::count(reason, bytes);
    action
}

#[inline(always)]
fn try_tc_egress(ctx: &mut TcContext, bytes: u64) -> Result<Reason, Reason> {
    let flow = match parse::parse_v4(ctx, Mode::Lenient) {
        Ok(Parsed::Flow(flow)) => flow,
        Ok(Parsed::Fragment(f)) => {
            return Ok(match frag::egress_v4(ctx, &f, bytes)? {
                Some(()) => Reason::TcFragRevNat,
                None => Reason::TcPassNotTracked,
            });
        }
        Ok(Parsed::IcmpErr(e)) => {
            return Ok(match icmp::egress_v4(ctx, &e)? {
                Some(svc_id) => {
                    stats::count_svc(svc_id, bytes);
                    Reason::TcIcmpErrRevNat
                }
                None => Reason::TcPassNotTracked,
            });
        }
        Ok(Parsed::Skip(_)) => return Ok(Reason::TcPassOther),
        Err(_) => return Ok(Reason::TcPassMalformed),
    };
    if !lb::port_may_match_v4(flow.sport, port_bits::backend(flow.proto)) {
        return Ok(Reason::TcPassNotTracked);
    }
    let Some(ct) = conntrack::lookup_reply_v4(&flow) else {
        return Ok(Reason::TcPassNotTracked);
    };
    nat::revnat_v4(ctx, &flow, ct.nat_addr, ct.nat_port)?;
    frag::record_v4(&flow, CT_REPLY, ct.nat_addr, flow.daddr, 0, ct.svc_id);
    stats::count_svc(ct.svc_id, bytes);
    Ok(Reason::TcRevNat)
}

/// cgroup `connect4`: a socket connecting to a Service connects to a backend instead.
#[cgroup_sock_addr(connect4)]
pub fn lb_sock_connect4(ctx: SockAddrContext) -> i32 {
    sock::forward_v4(&ctx, Reason::SockConnectXlate)
}

/// cgroup `sendmsg4`: an unconnected datagram to a Service goes to a backend.
#[cgroup_sock_addr(sendmsg4)]
pub fn lb_sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::forward_v4(&ctx, Reason::SockSendmsgXlate)
}

/// cgroup `recvmsg4`: a datagram from a backend shows the Service as its source.
#[cgroup_sock_addr(recvmsg4)]
pub fn lb_sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::reverse_v4(&ctx, Reason::SockRecvmsgRevNat)
}

/// cgroup `getpeername4`: a socket connected through a Service has the Service as its peer.
#[cgroup_sock_addr(getpeername4)]
pub fn lb_sock_getpeername4(ctx: SockAddrContext) -> i32 {
    sock::reverse_v4(&ctx, Reason::SockGetpeernameRevNat)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
