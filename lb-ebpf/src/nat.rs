//! Address/port rewrites: DNAT in XDP (manual incremental checksums: no skb yet) and reverse
//! NAT in TC (kernel csum helpers, which also handle CHECKSUM_PARTIAL skbs correctly).
use aya_ebpf::programs::{TcContext, XdpContext};
use lb_common::{Reason, IPPROTO_TCP};

use crate::{
    csum,
    parse::{ptr_at, Ipv4Hdr, TcpHdr, UdpHdr, ETH_HLEN, L4_OFF},
};

/// Rewrite the destination of an IPv4 TCP/UDP packet already validated by `parse_v4`
/// (no IP options, so L4 starts at `L4_OFF`). The IP header checksum and the L4 checksum
/// (pseudo-header address + port) are updated incrementally; a UDP checksum of 0 stays 0.
#[inline(always)]
pub fn dnat_v4(ctx: &XdpContext, proto: u8, new_addr: u32, new_port: u16) -> Result<(), Reason> {
    let ip: *mut Ipv4Hdr = ptr_at(ctx, ETH_HLEN).ok_or(Reason::XdpDropMalformedL3)?;
    // SAFETY: bounds checked by ptr_at; the packet is ours to write in XDP.
    let ip = unsafe { &mut *ip };
    let old_addr = ip.daddr;
    ip.check = csum::replace4(ip.check, old_addr, new_addr);
    ip.daddr = new_addr;
    if proto == IPPROTO_TCP {
        let tcp: *mut TcpHdr = ptr_at(ctx, L4_OFF).ok_or(Reason::XdpDropMalformedL4)?;
        // SAFETY: as above.
        let tcp = unsafe { &mut *tcp };
        let c = csum::replace4(tcp.check, old_addr, new_addr);
        tcp.check = csum::replace2(c, tcp.dport, new_port);
        tcp.dport = new_port;
    } else {
        let udp: *mut UdpHdr = ptr_at(ctx, L4_OFF).ok_or(Reason::XdpDropMalformedL4)?;
        // SAFETY: as above.
        let udp = unsafe { &mut *udp };
        let c = csum::replace4(udp.check, old_addr, new_addr);
        let c = csum::replace2(c, udp.dport, new_port);
        udp.check = csum::udp_fixup(udp.check, c);
        udp.dport = new_port;
    }
    Ok(())
}

/// `bpf_l4_csum_replace` flag: the field is part of the pseudo-header (addresses).
const BPF_F_PSEUDO_HDR: u64 = 1 << 4;
/// `bpf_l4_csum_replace` flag: a zero UDP checksum means "none" and is left alone.
const BPF_F_MARK_MANGLED_0: u64 = 1 << 5;

/// Offsets of a reply's fields in the skb.
pub struct ReplyOffsets {
    pub ip_csum: usize,
    pub saddr: usize,
    pub sport: usize,
    pub l4_csum: usize,
}

/// Restore the frontend as the reply's source: source address and port, with the IP and L4
/// checksums fixed by the kernel helpers (pseudo-header aware for the address).
#[inline(always)]
pub fn revnat_v4(
    ctx: &mut TcContext,
    off: &ReplyOffsets,
    proto: u8,
    old_addr: u32,
    new_addr: u32,
    old_port: u16,
    new_port: u16,
) -> Result<(), Reason> {
    let mangled0 = if proto == IPPROTO_TCP {
        0
    } else {
        BPF_F_MARK_MANGLED_0
    };
    let err = |_| Reason::TcDropRewrite;
    ctx.l4_csum_replace(
        off.l4_csum,
        u64::from(old_addr),
        u64::from(new_addr),
        BPF_F_PSEUDO_HDR | mangled0 | 4,
    )
    .map_err(err)?;
    ctx.l4_csum_replace(
        off.l4_csum,
        u64::from(old_port),
        u64::from(new_port),
        mangled0 | 2,
    )
    .map_err(err)?;
    ctx.l3_csum_replace(off.ip_csum, u64::from(old_addr), u64::from(new_addr), 4)
        .map_err(err)?;
    ctx.store(off.saddr, &new_addr, 0).map_err(err)?;
    ctx.store(off.sport, &new_port, 0).map_err(err)?;
    Ok(())
}
