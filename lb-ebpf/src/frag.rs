//! IPv4 fragment tracking, as Cilium's `ipv4_frag`: only a datagram's first fragment has
//! the L4 header the flow is found by. When it is translated, the addresses it got are
//! recorded in `LB4_FRAG` under (source, destination, IP id, protocol) as it arrived; the
//! fragments that follow get the same addresses (and, for flows that leave from XDP, the
//! same way out). A fragment that overtakes its first one, or whose record was evicted,
//! passes untouched and counted (`XdpPassFragment`); Linux sends fragments in order.
use lb_common::{
    conntrack::{frag_flags, CT_FORWARD, CT_REPLY},
    csum, Frag4Key, Frag4Value, Reason,
};

use crate::{
    hook::Ingress,
    maps::FRAG,
    parse::{raw16, raw32, Flow4, Fragment4, Ipv4Hdr, Packet, ETH_HLEN},
    stats::{self, Verdict},
};

const BPF_ANY: u64 = 0;

/// Record the translation of the first fragment `flow` (as it arrived) in direction `dir`
/// (`CT_FORWARD`: XDP; `CT_REPLY`: TC egress). Best effort: without a record the later
/// fragments pass untouched.
#[inline(always)]
pub fn record_v4(flow: &Flow4, dir: u8, saddr: u32, daddr: u32, flags: u32, svc_id: u32) {
    if !flow.first_frag {
        return;
    }
    let key = Frag4Key {
        saddr: flow.saddr,
        daddr: flow.daddr,
        id: flow.ip_id,
        proto: flow.proto,
        dir,
    };
    let value = Frag4Value {
        saddr,
        daddr,
        flags,
        svc_id,
    };
    let _ = FRAG.insert(key, value, BPF_ANY);
}

#[inline(always)]
fn lookup(f: &Fragment4, dir: u8) -> Option<Frag4Value> {
    let key = Frag4Key {
        saddr: f.saddr,
        daddr: f.daddr,
        id: f.id,
        proto: f.proto,
        dir,
    };
    // SAFETY: plain data; a concurrent LRU eviction at worst yields a stale copy.
    unsafe { FRAG.get(key) }.copied()
}

/// Give the IPv4 header at `ETH_HLEN` the addresses `saddr`, `daddr` (checksum updated).
#[inline(always)]
fn rewrite_addrs<P: Packet>(pkt: &mut P, saddr: u32, daddr: u32) -> Option<()> {
    let mut ip: Ipv4Hdr = pkt.read(ETH_HLEN)?;
    let c = csum::replace4(raw16(ip.check), raw32(ip.saddr), saddr);
    let c = csum::replace4(c, raw32(ip.daddr), daddr);
    ip.saddr = saddr.to_ne_bytes();
    ip.daddr = daddr.to_ne_bytes();
    ip.check = c.to_ne_bytes();
    pkt.write(ETH_HLEN, ip)
}

/// Ingress: a non-first fragment arriving from the wire.
#[inline(always)]
pub fn ingress_v4<C: Ingress>(ctx: &mut C, f: &Fragment4, bytes: u64) -> Result<Verdict, Reason> {
    let Some(v) = lookup(f, CT_FORWARD) else {
        return Ok(Verdict::pass(Reason::XdpPassFragment));
    };
    rewrite_addrs(ctx, v.saddr, v.daddr).ok_or(Reason::XdpDropMalformedL3)?;
    stats::count_svc(v.svc_id, bytes);
    if v.flags & frag_flags::FORWARD != 0 {
        return ctx.out_v4(f.proto, v.saddr, v.daddr, [Reason::XdpFragFwd; 3]);
    }
    Ok(ctx.deliver_v4(v.daddr, Reason::XdpFragFwd))
}

/// TC egress: a non-first fragment of a backend's reply. `Ok(None)`: not of our flows.
#[inline(always)]
pub fn egress_v4<P: Packet>(pkt: &mut P, f: &Fragment4, bytes: u64) -> Result<Option<()>, Reason> {
    let Some(v) = lookup(f, CT_REPLY) else {
        return Ok(None);
    };
    rewrite_addrs(pkt, v.saddr, v.daddr).ok_or(Reason::TcDropRewrite)?;
    stats::count_svc(v.svc_id, bytes);
    Ok(Some(()))
}
