//! Header layouts and strict, bounds-checked parsing of Ethernet/IPv4/TCP/UDP for XDP.
use aya_ebpf::programs::XdpContext;
use lb_common::{Reason, IPPROTO_TCP, IPPROTO_UDP};

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const IPV4_HLEN: usize = 20;
/// Offset of the L4 header: IPv4 packets with options are passed before L4 parsing, so the
/// L4 header always starts here on the rewrite path.
pub const L4_OFF: usize = ETH_HLEN + IPV4_HLEN;

pub const IP_CSUM_OFF: usize = ETH_HLEN + 10;
pub const IP_SADDR_OFF: usize = ETH_HLEN + 12;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

#[repr(C)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub ether_type: u16,
}

#[repr(C)]
pub struct Ipv4Hdr {
    pub vihl: u8,
    pub tos: u8,
    pub tot_len: u16,
    pub id: u16,
    pub frag_off: u16,
    pub ttl: u8,
    pub proto: u8,
    pub check: u16,
    pub saddr: u32,
    pub daddr: u32,
}

#[repr(C)]
pub struct TcpHdr {
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    /// Data offset (high nibble) and reserved bits.
    pub doff: u8,
    pub flags: u8,
    pub window: u16,
    pub check: u16,
    pub urg: u16,
}

#[repr(C)]
pub struct UdpHdr {
    pub sport: u16,
    pub dport: u16,
    pub len: u16,
    pub check: u16,
}

/// An IPv4 TCP/UDP packet that may be load-balanced. Addresses and ports in network order.
#[derive(Clone, Copy)]
pub struct Flow4 {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// TCP flags (0 for UDP).
    pub tcp_flags: u8,
}

/// The outcome of parsing: a flow to look up, or a verdict reason to pass/drop with.
pub enum Parsed {
    Flow(Flow4),
    /// Not ours to touch: pass with this reason.
    Pass(Reason),
}

/// A pointer to a `T` at `off`, if the whole `T` lies inside the packet.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *mut T)
}

/// Parse the frame strictly. `Err` is a drop reason: the kernel would drop these frames too,
/// and they must never be rewritten or create conntrack state.
#[inline(always)]
pub fn parse_v4(ctx: &XdpContext) -> Result<Parsed, Reason> {
    let frame_len = ctx.data_end() - ctx.data();
    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(Reason::XdpDropMalformedL2)?;
    // SAFETY: bounds checked by ptr_at.
    if unsafe { (*eth).ether_type } != ETH_P_IP.to_be() {
        return Ok(Parsed::Pass(Reason::XdpPassNonIpv4));
    }
    let ip: *const Ipv4Hdr = ptr_at(ctx, ETH_HLEN).ok_or(Reason::XdpDropMalformedL3)?;
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &*ip };
    let version = ip.vihl >> 4;
    let ihl = usize::from(ip.vihl & 0x0f) * 4;
    let tot_len = usize::from(u16::from_be(ip.tot_len));
    if version != 4 || ihl < IPV4_HLEN || tot_len < ihl || tot_len > frame_len - ETH_HLEN {
        return Err(Reason::XdpDropMalformedL3);
    }
    if u16::from_be(ip.frag_off) & 0x3fff != 0 {
        return Ok(Parsed::Pass(Reason::XdpPassFragment));
    }
    if ihl != IPV4_HLEN {
        return Ok(Parsed::Pass(Reason::XdpPassIpOptions));
    }
    let ip_payload = tot_len - IPV4_HLEN;
    let (sport, dport, tcp_flags) = match ip.proto {
        IPPROTO_TCP => {
            let tcp: *const TcpHdr = ptr_at(ctx, L4_OFF).ok_or(Reason::XdpDropMalformedL4)?;
            // SAFETY: bounds checked by ptr_at.
            let tcp = unsafe { &*tcp };
            let doff = usize::from(tcp.doff >> 4) * 4;
            if doff < 20 || doff > ip_payload || L4_OFF + doff > frame_len {
                return Err(Reason::XdpDropMalformedL4);
            }
            (tcp.sport, tcp.dport, tcp.flags)
        }
        IPPROTO_UDP => {
            let udp: *const UdpHdr = ptr_at(ctx, L4_OFF).ok_or(Reason::XdpDropMalformedL4)?;
            // SAFETY: bounds checked by ptr_at.
            let udp = unsafe { &*udp };
            let len = usize::from(u16::from_be(udp.len));
            if len < 8 || len > ip_payload {
                return Err(Reason::XdpDropMalformedL4);
            }
            (udp.sport, udp.dport, 0)
        }
        _ => return Ok(Parsed::Pass(Reason::XdpPassNotService)),
    };
    Ok(Parsed::Flow(Flow4 {
        saddr: ip.saddr,
        daddr: ip.daddr,
        sport,
        dport,
        proto: ip.proto,
        tcp_flags,
    }))
}
