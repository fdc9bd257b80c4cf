//! Entry points only: XDP ingress on the node's uplinks (DNAT) and TC egress (reverse NAT).
//! Each thin entry calls a `try_` function; every verdict, pass or drop, is counted by reason.
#![no_std]
#![no_main]

mod conntrack;
mod csum;
mod lb;
mod maps;
mod nat;
mod parse;
mod stats;

use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_OK, TC_ACT_SHOT},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use lb_common::{conntrack::CT_REPLY, Ct4Key, Reason, IPPROTO_TCP, IPPROTO_UDP};

use crate::parse::{Parsed, ETH_HLEN, ETH_P_IP};

/// XDP on the node's uplinks: DNAT packets addressed to a NodePort/hostPort frontend to the
/// flow's backend.
///
/// Forwarding choice: after the rewrite the packet is handed to the kernel stack
/// (`XDP_PASS`), not redirected. The stack routes it to the pod's veth with its own FIB and
/// neighbour tables, decrements the TTL and applies the node's netfilter policy, and it works
/// for every egress device (veth peers would otherwise need an XDP program of their own to
/// accept `bpf_redirect` frames). The cost is one trip through the stack; the lookup, conntrack
/// and rewrite, which are what this project measures, stay in XDP.
#[xdp]
pub fn lb_xdp_ingress(ctx: XdpContext) -> u32 {
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    match try_xdp_ingress(&ctx, bytes) {
        Ok(reason) => {
            stats::count(reason, bytes);
            xdp_action::XDP_PASS
        }
        Err(reason) => {
            stats::count(reason, bytes);
            xdp_action::XDP_DROP
        }
    }
}

/// `Ok(reason)`: pass with that reason. `Err(reason)`: drop with that reason.
#[inline(always)]
fn try_xdp_ingress(ctx: &XdpContext, bytes: u64) -> Result<Reason, Reason> {
    let flow = match parse::parse_v4(ctx)? {
        Parsed::Flow(flow) => flow,
        Parsed::Pass(reason) => return Ok(reason),
    };
    let Some(fe) = lb::lookup_frontend_v4(&flow) else {
        return Ok(Reason::XdpPassNotService);
    };
    let (nat_addr, nat_port, reason) = match conntrack::lookup_v4(&flow) {
        Some(ct) => (ct.nat_addr, ct.nat_port, Reason::XdpFwdTracked),
        None => {
            let (id, backend) = lb::select_backend_v4(&fe, &flow)?;
            let ct = conntrack::create_v4(&flow, &fe, id, &backend)?;
            (ct.nat_addr, ct.nat_port, Reason::XdpFwdNewFlow)
        }
    };
    nat::dnat_v4(ctx, flow.proto, nat_addr, nat_port)?;
    stats::count_svc(fe.svc.svc_id, bytes);
    Ok(reason)
}

/// TC egress on the node's uplinks: replies from backends get the frontend address and port
/// back as their source, so the client sees the address it connected to.
#[classifier]
pub fn lb_tc_egress(mut ctx: TcContext) -> i32 {
    let bytes = u64::from(ctx.len());
    let (reason, action) = match try_tc_egress(&mut ctx, bytes) {
        Ok(reason) => (reason, TC_ACT_OK),
        Err(reason) => (reason, TC_ACT_SHOT),
    };
    stats::count(reason, bytes);
    action
}

#[inline(always)]
fn try_tc_egress(ctx: &mut TcContext, bytes: u64) -> Result<Reason, Reason> {
    let Ok(ether_type) = ctx.load::<u16>(12) else {
        return Ok(Reason::TcPassMalformed);
    };
    if ether_type != ETH_P_IP.to_be() {
        return Ok(Reason::TcPassOther);
    }
    let Ok(ip) = ctx.load::<parse::Ipv4Hdr>(ETH_HLEN) else {
        return Ok(Reason::TcPassMalformed);
    };
    let ihl = usize::from(ip.vihl & 0x0f) * 4;
    if ip.vihl >> 4 != 4 || ihl < parse::IPV4_HLEN {
        return Ok(Reason::TcPassMalformed);
    }
    if u16::from_be(ip.frag_off) & 0x3fff != 0 {
        return Ok(Reason::TcPassOther);
    }
    let l4 = ETH_HLEN + ihl;
    let l4_csum = match ip.proto {
        IPPROTO_TCP => l4 + 16,
        IPPROTO_UDP => l4 + 6,
        _ => return Ok(Reason::TcPassOther),
    };
    let Ok(ports) = ctx.load::<[u16; 2]>(l4) else {
        return Ok(Reason::TcPassMalformed);
    };
    let key = Ct4Key {
        saddr: ip.saddr,
        daddr: ip.daddr,
        sport: ports[0],
        dport: ports[1],
        proto: ip.proto,
        dir: CT_REPLY,
        _pad: [0; 2],
    };
    // SAFETY: plain data; a concurrent LRU eviction at worst yields a stale copy.
    let Some(ct) = (unsafe { maps::CT.get(key) }).copied() else {
        return Ok(Reason::TcPassNotTracked);
    };
    let off = nat::ReplyOffsets {
        ip_csum: parse::IP_CSUM_OFF,
        saddr: parse::IP_SADDR_OFF,
        sport: l4,
        l4_csum,
    };
    nat::revnat_v4(
        ctx,
        &off,
        ip.proto,
        ip.saddr,
        ct.nat_addr,
        ports[0],
        ct.nat_port,
    )?;
    stats::count_svc(ct.svc_id, bytes);
    Ok(Reason::TcRevNat)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
