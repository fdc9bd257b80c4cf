//! Ethernet/IPv4/TCP/UDP frame builder and an independent checksum verifier, for packet
//! fixtures and benchmarks. Checksums are computed from scratch here, never incrementally,
//! so they check the datapath's incremental updates independently.
use std::net::{Ipv4Addr, SocketAddrV4};

pub const ETH_HLEN: usize = 14;
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    Tcp {
        flags: u8,
    },
    Udp,
    /// Another IP protocol number (ICMP = 1, ...): an 8-byte opaque L4 header.
    Other(u8),
}

/// A frame description. `build()` gives its bytes with correct checksums.
#[derive(Clone, Debug)]
pub struct Pkt {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub l4: L4,
    pub payload: Vec<u8>,
    pub ip_options: Vec<u8>,
    /// Raw `frag_off` field (flags + offset), host order.
    pub frag_off: u16,
    pub ttl: u8,
    pub id: u16,
    /// Send a UDP checksum of 0 ("no checksum").
    pub udp_no_csum: bool,
    /// TCP options bytes (length must be a multiple of 4).
    pub tcp_options: Vec<u8>,
}

impl Pkt {
    pub fn tcp(src: SocketAddrV4, dst: SocketAddrV4, flags: u8) -> Self {
        Self::new(src, dst, L4::Tcp { flags })
    }

    pub fn udp(src: SocketAddrV4, dst: SocketAddrV4) -> Self {
        Self::new(src, dst, L4::Udp)
    }

    fn new(src: SocketAddrV4, dst: SocketAddrV4, l4: L4) -> Self {
        Self {
            src_mac: [0x02, 0, 0, 0, 0, 0x02],
            dst_mac: [0x02, 0, 0, 0, 0, 0x01],
            src,
            dst,
            l4,
            payload: Vec::new(),
            ip_options: Vec::new(),
            frag_off: 0x4000, // DF
            ttl: 64,
            id: 0x1234,
            udp_no_csum: false,
            tcp_options: Vec::new(),
        }
    }

    pub fn payload(mut self, p: &[u8]) -> Self {
        self.payload = p.to_vec();
        self
    }

    /// The same packet with another destination (what a DNAT should produce).
    pub fn with_dst(mut self, dst: SocketAddrV4) -> Self {
        self.dst = dst;
        self
    }

    /// The same packet with another source (what a reverse NAT should produce).
    pub fn with_src(mut self, src: SocketAddrV4) -> Self {
        self.src = src;
        self
    }

    fn l4_header(&self) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend_from_slice(&self.src.port().to_be_bytes());
        h.extend_from_slice(&self.dst.port().to_be_bytes());
        match self.l4 {
            L4::Tcp { flags } => {
                h.extend_from_slice(&0x0102_0304u32.to_be_bytes()); // seq
                let ack = if flags & TCP_ACK != 0 {
                    0x0a0b_0c0du32
                } else {
                    0
                };
                h.extend_from_slice(&ack.to_be_bytes());
                let doff = ((20 + self.tcp_options.len()) / 4) as u8;
                h.push(doff << 4);
                h.push(flags);
                h.extend_from_slice(&64240u16.to_be_bytes()); // window
                h.extend_from_slice(&[0, 0]); // checksum
                h.extend_from_slice(&[0, 0]); // urgent
                h.extend_from_slice(&self.tcp_options);
            }
            L4::Udp => {
                let len = (8 + self.payload.len()) as u16;
                h.extend_from_slice(&len.to_be_bytes());
                h.extend_from_slice(&[0, 0]);
            }
            L4::Other(_) => {
                h.truncate(0);
                h.extend_from_slice(&[8, 0, 0, 0, 0, 1, 0, 1]); // looks like an ICMP echo
            }
        }
        h
    }

    fn proto(&self) -> u8 {
        match self.l4 {
            L4::Tcp { .. } => 6,
            L4::Udp => 17,
            L4::Other(p) => p,
        }
    }

    /// The frame's bytes, with every checksum computed from scratch.
    pub fn build(&self) -> Vec<u8> {
        let mut l4 = self.l4_header();
        l4.extend_from_slice(&self.payload);
        match self.l4 {
            L4::Tcp { .. } => {
                let c = l4_checksum(*self.src.ip(), *self.dst.ip(), 6, &l4);
                l4[16..18].copy_from_slice(&c.to_be_bytes());
            }
            L4::Udp if !self.udp_no_csum => {
                let mut c = l4_checksum(*self.src.ip(), *self.dst.ip(), 17, &l4);
                if c == 0 {
                    c = 0xffff;
                }
                l4[6..8].copy_from_slice(&c.to_be_bytes());
            }
            L4::Udp => {}
            L4::Other(_) => {
                let c = !fold(sum16(&l4));
                l4[2..4].copy_from_slice(&c.to_be_bytes());
            }
        }
        let ihl = 20 + self.ip_options.len();
        let mut ip = vec![0u8; 20];
        ip[0] = 0x40 | (ihl / 4) as u8;
        ip[2..4].copy_from_slice(&((ihl + l4.len()) as u16).to_be_bytes());
        ip[4..6].copy_from_slice(&self.id.to_be_bytes());
        ip[6..8].copy_from_slice(&self.frag_off.to_be_bytes());
        ip[8] = self.ttl;
        ip[9] = self.proto();
        ip[12..16].copy_from_slice(&self.src.ip().octets());
        ip[16..20].copy_from_slice(&self.dst.ip().octets());
        ip.extend_from_slice(&self.ip_options);
        let c = !fold(sum16(&ip));
        ip[10..12].copy_from_slice(&c.to_be_bytes());

        let mut f = Vec::with_capacity(ETH_HLEN + ip.len() + l4.len());
        f.extend_from_slice(&self.dst_mac);
        f.extend_from_slice(&self.src_mac);
        f.extend_from_slice(&0x0800u16.to_be_bytes());
        f.extend_from_slice(&ip);
        f.extend_from_slice(&l4);
        f
    }
}

/// An ICMP error frame from `src` to `dst` (type, code, the 4 bytes after the checksum,
/// e.g. the next-hop MTU of a fragmentation-needed), quoting `quoted` (an IPv4 packet, or
/// its first bytes), with every checksum computed from scratch. MACs as [`Pkt`]'s.
pub fn icmp_error(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    type_: u8,
    code: u8,
    rest: [u8; 4],
    quoted: &[u8],
) -> Vec<u8> {
    let mut icmp = vec![type_, code, 0, 0];
    icmp.extend_from_slice(&rest);
    icmp.extend_from_slice(quoted);
    let c = !fold(sum16(&icmp));
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut ip = vec![0u8; 20];
    ip[0] = 0x45;
    ip[1] = 0xc0;
    ip[2..4].copy_from_slice(&((20 + icmp.len()) as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = 1;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let c = !fold(sum16(&ip));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut f = Vec::with_capacity(ETH_HLEN + ip.len() + icmp.len());
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&icmp);
    f
}

/// The IPv4 packet of `frame` (after the Ethernet header), its first `n` bytes at most.
pub fn ip_packet(frame: &[u8], n: usize) -> Vec<u8> {
    let ip = &frame[ETH_HLEN..];
    ip[..ip.len().min(n)].to_vec()
}

/// `frame` with new IPv4 addresses (`None` keeps one) and its IPv4 header checksum computed
/// again; nothing else changes (what a non-first fragment's translation should produce).
pub fn with_ip_addrs(frame: &[u8], src: Option<Ipv4Addr>, dst: Option<Ipv4Addr>) -> Vec<u8> {
    let mut f = frame.to_vec();
    if let Some(a) = src {
        f[26..30].copy_from_slice(&a.octets());
    }
    if let Some(a) = dst {
        f[30..34].copy_from_slice(&a.octets());
    }
    let ihl = usize::from(f[14] & 0x0f) * 4;
    f[24..26].copy_from_slice(&[0, 0]);
    let c = !fold(sum16(&f[14..14 + ihl]));
    f[24..26].copy_from_slice(&c.to_be_bytes());
    f
}

/// An ARP request frame (who-has `target` tell `sender`).
pub fn arp_request(sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    f.extend_from_slice(&0x0806u16.to_be_bytes());
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    f.extend_from_slice(&sender.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target.octets());
    f
}

/// Sum of big-endian 16-bit words (odd trailing byte padded with zero).
pub fn sum16(data: &[u8]) -> u64 {
    data.chunks(2)
        .map(|c| u64::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum()
}

pub fn fold(mut s: u64) -> u16 {
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// TCP/UDP checksum over the pseudo-header and `segment` (whose checksum field is zero).
pub fn l4_checksum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, segment: &[u8]) -> u16 {
    let mut s = sum16(&src.octets()) + sum16(&dst.octets());
    s += u64::from(proto) + segment.len() as u64;
    s += sum16(segment);
    !fold(s)
}

/// ICMP: the ICMP checksum; for an error, the quoted IPv4 header's checksum, and the quoted
/// TCP/UDP checksum when the quote holds the whole quoted packet.
fn verify_icmp(icmp: &[u8]) -> Result<(), String> {
    if icmp.len() < 8 || fold(sum16(icmp)) != 0xffff {
        return Err("bad ICMP checksum".into());
    }
    if !matches!(icmp[0], 3 | 11) || icmp.len() < 8 + 20 {
        return Ok(());
    }
    let q = &icmp[8..];
    let ihl = usize::from(q[0] & 0x0f) * 4;
    if q.len() < ihl || fold(sum16(&q[..ihl])) != 0xffff {
        return Err("bad quoted IPv4 header checksum".into());
    }
    let tot = usize::from(u16::from_be_bytes([q[2], q[3]]));
    if q.len() < tot || !matches!(q[9], 6 | 17) {
        return Ok(()); // a partial quote: its L4 checksum cannot be checked
    }
    let mut frame = vec![0u8; ETH_HLEN];
    frame[12..14].copy_from_slice(&[0x08, 0x00]);
    frame.extend_from_slice(&q[..tot]);
    verify_checksums(&frame).map_err(|e| format!("quoted packet: {e}"))
}

/// Verify every checksum of an IPv4 TCP/UDP/ICMP frame from scratch. Errors name the bad
/// field.
pub fn verify_checksums(frame: &[u8]) -> Result<(), String> {
    if frame.len() < ETH_HLEN + 20 || frame[12..14] != [0x08, 0x00] {
        return Err("not an IPv4 frame".into());
    }
    let ip = &frame[ETH_HLEN..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if fold(sum16(&ip[..ihl])) != 0xffff {
        return Err(format!(
            "bad IPv4 header checksum {:#06x}",
            u16::from_be_bytes([ip[10], ip[11]])
        ));
    }
    let tot = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let seg = &ip[ihl..tot];
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let proto = ip[9];
    if proto == 1 {
        return verify_icmp(seg);
    }
    // A non-first fragment carries no L4 header.
    if u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff != 0 {
        return Ok(());
    }
    let field = match proto {
        6 => 16,
        17 => 6,
        _ => return Ok(()),
    };
    let stored = u16::from_be_bytes([seg[field], seg[field + 1]]);
    if proto == 17 && stored == 0 {
        return Ok(()); // no checksum
    }
    let mut zeroed = seg.to_vec();
    zeroed[field] = 0;
    zeroed[field + 1] = 0;
    let mut want = l4_checksum(src, dst, proto, &zeroed);
    if proto == 17 && want == 0 {
        want = 0xffff;
    }
    // 0x0000 and 0xffff are the same one's-complement value for TCP.
    let same =
        stored == want || (proto == 6 && stored ^ want == 0xffff && (stored == 0 || want == 0));
    if !same {
        return Err(format!(
            "bad {} checksum {stored:#06x}, want {want:#06x}",
            if proto == 6 { "TCP" } else { "UDP" }
        ));
    }
    Ok(())
}
