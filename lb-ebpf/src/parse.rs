//! Header layouts and bounds-checked parsing of Ethernet/IPv4/TCP/UDP, shared by the XDP and
//! TC programs through the [`Packet`] trait.
//!
//! Every header field is a byte array, so a header has alignment 1 and may be read or
//! written at any packet offset without a misaligned reference (the IPv4 header starts at
//! offset 14). Multi-byte values are taken as raw words ([`raw16`], [`raw32`]): network order
//! loaded as-is, which is how keys and checksums use them.
use aya_ebpf::programs::{TcContext, XdpContext};
use lb_common::{IPPROTO_TCP, IPPROTO_UDP};

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const IPV4_HLEN: usize = 20;
/// Offset of the L4 header of a packet without IPv4 options (the XDP rewrite path passes
/// packets with options before L4 parsing).
pub const L4_OFF: usize = ETH_HLEN + IPV4_HLEN;

/// Offsets of the IPv4 TTL (followed by the protocol), checksum and addresses in a frame.
pub const IP_TTL_OFF: usize = ETH_HLEN + 8;
pub const IP_CSUM_OFF: usize = ETH_HLEN + 10;
pub const IP_SADDR_OFF: usize = ETH_HLEN + 12;
pub const IP_DADDR_OFF: usize = ETH_HLEN + 16;
/// Offsets of the checksum field inside the TCP and UDP headers.
pub const TCP_CSUM_OFF: usize = 16;
pub const UDP_CSUM_OFF: usize = 6;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub ether_type: [u8; 2],
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv4Hdr {
    pub vihl: u8,
    pub tos: u8,
    pub tot_len: [u8; 2],
    pub id: [u8; 2],
    pub frag_off: [u8; 2],
    pub ttl: u8,
    pub proto: u8,
    pub check: [u8; 2],
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct TcpHdr {
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub seq: [u8; 4],
    pub ack: [u8; 4],
    /// Data offset (high nibble) and reserved bits.
    pub doff: u8,
    pub flags: u8,
    pub window: [u8; 2],
    pub check: [u8; 2],
    pub urg: [u8; 2],
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct UdpHdr {
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub len: [u8; 2],
    pub check: [u8; 2],
}

/// A raw (network-order) 16-bit word.
#[inline(always)]
pub fn raw16(b: [u8; 2]) -> u16 {
    u16::from_ne_bytes(b)
}

/// A raw (network-order) 32-bit word.
#[inline(always)]
pub fn raw32(b: [u8; 4]) -> u32 {
    u32::from_ne_bytes(b)
}

/// A packet the parser can read: the XDP frame or the TC skb.
pub trait Packet {
    /// Bytes from the start of the Ethernet header to the end of the packet.
    fn frame_len(&self) -> usize;
    /// A copy of the `T` at `off`, if the whole `T` lies inside the packet.
    fn read<T: Copy>(&self, off: usize) -> Option<T>;
    /// Write `v` at `off`, if the whole `T` lies inside the packet.
    fn write<T: Copy>(&mut self, off: usize, v: T) -> Option<()>;
}

/// A pointer to a `T` at `off` of an XDP frame, if the whole `T` lies inside the frame.
/// The header types above have alignment 1, so the pointer may be dereferenced as is.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *mut T)
}

impl Packet for XdpContext {
    #[inline(always)]
    fn frame_len(&self) -> usize {
        self.data_end() - self.data()
    }

    #[inline(always)]
    fn read<T: Copy>(&self, off: usize) -> Option<T> {
        let p = ptr_at::<T>(self, off)?;
        // SAFETY: bounds checked by ptr_at; an unaligned read is valid for any T.
        Some(unsafe { core::ptr::read_unaligned(p) })
    }

    #[inline(always)]
    fn write<T: Copy>(&mut self, off: usize, v: T) -> Option<()> {
        let p = ptr_at::<T>(self, off)?;
        // SAFETY: bounds checked by ptr_at; the frame is ours to write in XDP.
        unsafe { core::ptr::write_unaligned(p, v) };
        Some(())
    }
}

impl Packet for TcContext {
    #[inline(always)]
    fn frame_len(&self) -> usize {
        self.len() as usize
    }

    #[inline(always)]
    fn read<T: Copy>(&self, off: usize) -> Option<T> {
        // The linear part directly (no helper call: the headers are there on the common
        // path); beyond it bpf_skb_load_bytes, which also reads the non-linear part.
        let (start, end) = (self.data(), self.data_end());
        if start + off + core::mem::size_of::<T>() <= end {
            // SAFETY: bounds checked against data_end; an unaligned read is valid for any T.
            return Some(unsafe { core::ptr::read_unaligned((start + off) as *const T) });
        }
        TcContext::load::<T>(self, off).ok()
    }

    #[inline(always)]
    fn write<T: Copy>(&mut self, off: usize, v: T) -> Option<()> {
        // bpf_skb_store_bytes: also writes the non-linear part (unclones the skb first).
        TcContext::store(self, off, &v, 0).ok()
    }
}

/// An IPv4 TCP/UDP packet that may be load-balanced. Addresses and ports are raw words.
#[derive(Clone, Copy)]
pub struct Flow4 {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// TCP flags (0 for UDP, and in [`Mode::Lenient`]).
    pub tcp_flags: u8,
    /// Offset of the L4 header from the start of the frame.
    pub l4_off: usize,
    /// The IP identification field (raw word).
    pub ip_id: u16,
    /// The first fragment of a fragmented datagram (MF set, offset 0): the fragments that
    /// follow need its translation ([`Parsed::Fragment`]).
    pub first_frag: bool,
}

impl Flow4 {
    /// Offset of the L4 checksum field from the start of the frame.
    #[inline(always)]
    pub fn l4_csum_off(&self) -> usize {
        if self.proto == IPPROTO_TCP {
            self.l4_off + TCP_CSUM_OFF
        } else {
            self.l4_off + UDP_CSUM_OFF
        }
    }
}

/// A fragment without the L4 header (offset > 0): translated like its datagram's first
/// fragment, found by these fields. Raw words.
#[derive(Clone, Copy)]
pub struct Fragment4 {
    pub saddr: u32,
    pub daddr: u32,
    pub id: u16,
    pub proto: u8,
}

/// An ICMP destination-unreachable or time-exceeded error quoting an IPv4 TCP/UDP packet.
/// Raw words; offsets from the start of the frame.
#[derive(Clone, Copy)]
pub struct IcmpErr4 {
    /// The error's sender.
    pub saddr: u32,
    /// Offset of the ICMP header.
    pub icmp_off: usize,
    /// Offset of the quoted IPv4 header (no options).
    pub inner_off: usize,
    /// The quoted packet's addresses, ports and protocol, as it was sent.
    pub inner: Flow4,
}

/// ICMP types whose errors are translated.
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_TIME_EXCEEDED: u8 = 11;
pub const IPPROTO_ICMP: u8 = 1;
pub const ICMP_HLEN: usize = 8;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct IcmpHdr {
    pub type_: u8,
    pub code: u8,
    pub check: [u8; 2],
    pub rest: [u8; 4],
}

/// Why a packet is not a flow to look up (it passes untouched).
#[derive(Clone, Copy)]
pub enum Skip {
    NonIpv4,
    /// IPv4 options ([`Mode::Strict`] only).
    IpOptions,
    /// Neither TCP nor UDP.
    OtherProto,
}

/// The layer whose header is truncated or inconsistent.
#[derive(Clone, Copy)]
pub enum Malformed {
    L2,
    L3,
    L4,
}

/// The outcome of parsing: a flow to look up, a fragment or ICMP error to translate like
/// one, or a packet that is not ours.
pub enum Parsed {
    Flow(Flow4),
    Fragment(Fragment4),
    IcmpErr(IcmpErr4),
    Skip(Skip),
}

/// How strictly to parse.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Ingress from the wire: every length must agree (IPv4 total length, TCP data offset,
    /// UDP length) or the frame is malformed, and IPv4 options are skipped. Such frames must
    /// never be rewritten or create conntrack state.
    Strict,
    /// Egress built by the local stack: only what the reverse NAT needs is read (version,
    /// header length, ports); IPv4 options are followed.
    Lenient,
}

/// Parse `pkt` as Ethernet/IPv4/TCP-or-UDP.
#[inline(always)]
pub fn parse_v4<P: Packet>(pkt: &P, mode: Mode) -> Result<Parsed, Malformed> {
    let frame_len = pkt.frame_len();
    let eth: EthHdr = pkt.read(0).ok_or(Malformed::L2)?;
    if u16::from_be_bytes(eth.ether_type) != ETH_P_IP {
        return Ok(Parsed::Skip(Skip::NonIpv4));
    }
    let ip: Ipv4Hdr = pkt.read(ETH_HLEN).ok_or(Malformed::L3)?;
    let version = ip.vihl >> 4;
    let ihl = usize::from(ip.vihl & 0x0f) * 4;
    if version != 4 || ihl < IPV4_HLEN {
        return Err(Malformed::L3);
    }
    let tot_len = usize::from(u16::from_be_bytes(ip.tot_len));
    if mode == Mode::Strict && (tot_len < ihl || tot_len > frame_len - ETH_HLEN) {
        return Err(Malformed::L3);
    }
    let frag = u16::from_be_bytes(ip.frag_off);
    if frag & 0x1fff != 0 {
        return Ok(Parsed::Fragment(Fragment4 {
            saddr: raw32(ip.saddr),
            daddr: raw32(ip.daddr),
            id: raw16(ip.id),
            proto: ip.proto,
        }));
    }
    let first_frag = frag & 0x2000 != 0;
    let l4_off = match mode {
        Mode::Strict if ihl != IPV4_HLEN => return Ok(Parsed::Skip(Skip::IpOptions)),
        Mode::Strict => L4_OFF,
        Mode::Lenient => ETH_HLEN + ihl,
    };
    // The L4 length this packet must hold: all of it, or for a first fragment what the
    // fragment carries (the rest follows).
    let l4_len = tot_len.saturating_sub(ihl);
    let (sport, dport, tcp_flags) = match (ip.proto, mode) {
        (IPPROTO_TCP | IPPROTO_UDP, Mode::Lenient) => {
            let ports: [[u8; 2]; 2] = pkt.read(l4_off).ok_or(Malformed::L4)?;
            // The reverse NAT rewrites the L4 checksum: it must be inside the packet.
            let csum_off = if ip.proto == IPPROTO_TCP {
                TCP_CSUM_OFF
            } else {
                UDP_CSUM_OFF
            };
            let _: [u8; 2] = pkt.read(l4_off + csum_off).ok_or(Malformed::L4)?;
            (raw16(ports[0]), raw16(ports[1]), 0)
        }
        (IPPROTO_TCP, Mode::Strict) => {
            let tcp: TcpHdr = pkt.read(L4_OFF).ok_or(Malformed::L4)?;
            let doff = usize::from(tcp.doff >> 4) * 4;
            if doff < 20 || doff > l4_len || L4_OFF + doff > frame_len {
                return Err(Malformed::L4);
            }
            (raw16(tcp.sport), raw16(tcp.dport), tcp.flags)
        }
        (IPPROTO_UDP, Mode::Strict) => {
            let udp: UdpHdr = pkt.read(L4_OFF).ok_or(Malformed::L4)?;
            let len = usize::from(u16::from_be_bytes(udp.len));
            // A first fragment carries only part of the datagram its length describes.
            let fits = if first_frag {
                len >= l4_len
            } else {
                len <= l4_len
            };
            if len < 8 || l4_len < 8 || !fits {
                return Err(Malformed::L4);
            }
            (raw16(udp.sport), raw16(udp.dport), 0)
        }
        (IPPROTO_ICMP, _) if !first_frag => {
            let err = parse_icmp_err(pkt, raw32(ip.saddr), l4_off);
            return Ok(match err {
                Some(e) => Parsed::IcmpErr(e),
                None => Parsed::Skip(Skip::OtherProto),
            });
        }
        _ => return Ok(Parsed::Skip(Skip::OtherProto)),
    };
    Ok(Parsed::Flow(Flow4 {
        saddr: raw32(ip.saddr),
        daddr: raw32(ip.daddr),
        sport,
        dport,
        proto: ip.proto,
        tcp_flags,
        l4_off,
        ip_id: raw16(ip.id),
        first_frag,
    }))
}

/// An ICMP destination-unreachable or time-exceeded error at `icmp_off` quoting a TCP/UDP
/// packet with a plain IPv4 header and at least its ports; `None` for any other ICMP (it
/// passes untouched: the stack handles it).
#[inline(always)]
fn parse_icmp_err<P: Packet>(pkt: &P, saddr: u32, icmp_off: usize) -> Option<IcmpErr4> {
    let icmp: IcmpHdr = pkt.read(icmp_off)?;
    if icmp.type_ != ICMP_DEST_UNREACH && icmp.type_ != ICMP_TIME_EXCEEDED {
        return None;
    }
    let inner_off = icmp_off + ICMP_HLEN;
    let ip: Ipv4Hdr = pkt.read(inner_off)?;
    if ip.vihl != 0x45 || u16::from_be_bytes(ip.frag_off) & 0x1fff != 0 {
        return None;
    }
    if ip.proto != IPPROTO_TCP && ip.proto != IPPROTO_UDP {
        return None;
    }
    let l4_off = inner_off + IPV4_HLEN;
    let ports: [[u8; 2]; 2] = pkt.read(l4_off)?;
    Some(IcmpErr4 {
        saddr,
        icmp_off,
        inner_off,
        inner: Flow4 {
            saddr: raw32(ip.saddr),
            daddr: raw32(ip.daddr),
            sport: raw16(ports[0]),
            dport: raw16(ports[1]),
            proto: ip.proto,
            tcp_flags: 0,
            l4_off,
            ip_id: raw16(ip.id),
            first_frag: false,
        },
    })
}
