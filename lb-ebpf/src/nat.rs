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
/// (either direction). Address, IP checksum and port are written directly where they lie
/// in the skb's linear part (by the helpers otherwise); the L4 checksum always goes through
/// `bpf_l4_csum_replace`, which is pseudo-header aware and keeps CHECKSUM_COMPLETE and
/// CHECKSUM_PARTIAL skbs right, as an incremental update of the field would not.
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
    // The address (with the IP checksum, incrementally: a change its checksum compensates
    // leaves a CHECKSUM_COMPLETE skb's csum as it was) and the port by direct writes where
    // they lie in the linear part; otherwise by the helpers.
    if !tc_write_direct_v4(ctx, flow.l4_off, end, old_addr, new_addr, new_port) {
        ctx.l3_csum_replace(IP_CSUM_OFF, u64::from(old_addr), u64::from(new_addr), 4)
            .map_err(err)?;
        ctx.store(addr_off, &new_addr, 0).map_err(err)?;
        ctx.store(port_off, &new_port, 0).map_err(err)?;
    }
    // The L4 checksum by the helpers, last (a helper call invalidates packet pointers).
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
    Ok(())
}

/// [`tc_rewrite_v4`]'s address, IP checksum and port writes through the skb's linear data.
/// `false`: they do not all lie there (nothing written).
#[inline(always)]
fn tc_write_direct_v4(
    ctx: &TcContext,
    l4_off: usize,
    end: End,
    old_addr: u32,
    new_addr: u32,
    new_port: u16,
) -> bool {
    // At most Ethernet + a 60-byte IPv4 header (a bound the verifier can see).
    if !(L4_OFF..=ETH_HLEN + 60).contains(&l4_off) {
        return false;
    }
    let (start, data_end) = (ctx.data(), ctx.data_end());
    let port_off = if end == End::Src { l4_off } else { l4_off + 2 };
    // Two checks the verifier can follow: the fixed IPv4 header, then the port.
    if start + L4_OFF > data_end || start + port_off + 2 > data_end {
        return false;
    }
    // SAFETY: the IPv4 header lies before data_end (checked); alignment 1; direct writes
    // are allowed at TC (the kernel unclones the skb first).
    let ip = unsafe { &mut *((start + ETH_HLEN) as *mut Ipv4Hdr) };
    let field = if end == End::Src {
        &mut ip.saddr
    } else {
        &mut ip.daddr
    };
    *field = new_addr.to_ne_bytes();
    ip.check = csum::replace4(raw16(ip.check), old_addr, new_addr).to_ne_bytes();
    // SAFETY: the port lies before data_end (checked).
    unsafe { core::ptr::write_unaligned((start + port_off) as *mut u16, new_port) };
    true
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
