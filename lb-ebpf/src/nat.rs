//! Address/port rewrites: in XDP with incremental checksums from `lb_common::csum` (there is
//! no skb yet), in TC (ingress DNAT with `--attach tc`, egress reverse NAT) with the kernel's
//! csum helpers, which also keep CHECKSUM_COMPLETE and CHECKSUM_PARTIAL skbs right.
use aya_ebpf::programs::{TcContext, XdpContext};
use lb_common::{csum, Reason, IPPROTO_TCP};

use crate::parse::{
    ptr_at, raw16, raw32, Flow4, Ipv4Hdr, TcpHdr, UdpHdr, ETH_HLEN, IP_CSUM_OFF, IP_DADDR_OFF,
    IP_SADDR_OFF, L4_OFF,
};

/// Which end of a packet a rewrite changes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum End {
    Src,
    Dst,
}

/// Rewrite the source or destination address and port of an IPv4 TCP/UDP packet already
/// validated by `parse_v4` in strict mode (no IP options, so L4 starts at `L4_OFF`). The IP
/// header checksum and the L4 checksum (pseudo-header address + port) are updated
/// incrementally; a UDP checksum of 0 stays 0.
#[inline(always)]
pub fn rewrite_v4(
    ctx: &XdpContext,
    proto: u8,
    end: End,
    new_addr: u32,
    new_port: u16,
) -> Result<(), Reason> {
    let ip: *mut Ipv4Hdr = ptr_at(ctx, ETH_HLEN).ok_or(Reason::XdpDropMalformedL3)?;
    // SAFETY: bounds checked by ptr_at; alignment 1; the packet is ours to write in XDP.
    let ip = unsafe { &mut *ip };
    let field = if end == End::Src {
        &mut ip.saddr
    } else {
        &mut ip.daddr
    };
    let old_addr = raw32(*field);
    *field = new_addr.to_ne_bytes();
    ip.check = csum::replace4(raw16(ip.check), old_addr, new_addr).to_ne_bytes();
    if proto == IPPROTO_TCP {
        let tcp: *mut TcpHdr = ptr_at(ctx, L4_OFF).ok_or(Reason::XdpDropMalformedL4)?;
        // SAFETY: as above.
        let tcp = unsafe { &mut *tcp };
        let port = if end == End::Src {
            &mut tcp.sport
        } else {
            &mut tcp.dport
        };
        let c = csum::replace4(raw16(tcp.check), old_addr, new_addr);
        tcp.check = csum::replace2(c, raw16(*port), new_port).to_ne_bytes();
        *port = new_port.to_ne_bytes();
    } else {
        let udp: *mut UdpHdr = ptr_at(ctx, L4_OFF).ok_or(Reason::XdpDropMalformedL4)?;
        // SAFETY: as above.
        let udp = unsafe { &mut *udp };
        let port = if end == End::Src {
            &mut udp.sport
        } else {
            &mut udp.dport
        };
        let old = raw16(udp.check);
        let c = csum::replace4(old, old_addr, new_addr);
        let c = csum::replace2(c, raw16(*port), new_port);
        udp.check = csum::udp_fixup(old, c).to_ne_bytes();
        *port = new_port.to_ne_bytes();
    }
    Ok(())
}

/// `bpf_l4_csum_replace` flag: the field is part of the pseudo-header (addresses).
const BPF_F_PSEUDO_HDR: u64 = 1 << 4;
/// `bpf_l4_csum_replace` flag: a zero UDP checksum means "none" and is left alone.
const BPF_F_MARK_MANGLED_0: u64 = 1 << 5;

/// Rewrite the source or destination address and port of an IPv4 TCP/UDP packet at TC
/// (either direction), with the IP and L4 checksums fixed by the kernel helpers: they are
/// pseudo-header aware for the address and keep `skb->csum` right for CHECKSUM_COMPLETE and
/// CHECKSUM_PARTIAL skbs, which direct writes would not.
#[inline(always)]
pub fn tc_rewrite_v4(
    ctx: &mut TcContext,
    flow: &Flow4,
    end: End,
    new_addr: u32,
    new_port: u16,
) -> Result<(), Reason> {
    let mangled0 = if flow.proto == IPPROTO_TCP {
        0
    } else {
        BPF_F_MARK_MANGLED_0
    };
    let (old_addr, old_port, addr_off, port_off) = match end {
        End::Src => (flow.saddr, flow.sport, IP_SADDR_OFF, flow.l4_off),
        End::Dst => (flow.daddr, flow.dport, IP_DADDR_OFF, flow.l4_off + 2),
    };
    let err = |_| Reason::TcDropRewrite;
    let l4_csum = flow.l4_csum_off();
    ctx.l4_csum_replace(
        l4_csum,
        u64::from(old_addr),
        u64::from(new_addr),
        BPF_F_PSEUDO_HDR | mangled0 | 4,
    )
    .map_err(err)?;
    ctx.l4_csum_replace(
        l4_csum,
        u64::from(old_port),
        u64::from(new_port),
        mangled0 | 2,
    )
    .map_err(err)?;
    ctx.l3_csum_replace(IP_CSUM_OFF, u64::from(old_addr), u64::from(new_addr), 4)
        .map_err(err)?;
    ctx.store(addr_off, &new_addr, 0).map_err(err)?;
    ctx.store(port_off, &new_port, 0).map_err(err)?;
    Ok(())
}

/// Restore `new_addr:new_port` (the frontend) as the source of the reply `flow` (TC egress).
#[inline(always)]
pub fn revnat_v4(
    ctx: &mut TcContext,
    flow: &Flow4,
    new_addr: u32,
    new_port: u16,
) -> Result<(), Reason> {
    tc_rewrite_v4(ctx, flow, End::Src, new_addr, new_port)
}
