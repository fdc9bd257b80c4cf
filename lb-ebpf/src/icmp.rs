//! ICMP: translation of the errors that quote a translated flow (destination unreachable,
//! fragmentation needed among them, and time exceeded), in both directions, and the
//! port-unreachable reject of a frontend without backends.
//!
//! An error quotes the packet that caused it, as that packet was when the error was made.
//! For the error to reach the endpoint that sent that packet, and to match its socket, the
//! outer destination and the quoted header must be translated the way the flow is:
//!
//! * XDP, DNATed flow: a router between the client and this node quotes a reply we sent
//!   (frontend -> client); it goes to the backend, quoting backend -> client. This is what
//!   keeps path MTU discovery working through a NodePort.
//! * XDP, SNATed flow: a quoted node:SNAT-port -> backend goes back to the client, quoting
//!   client -> frontend; a quoted frontend -> client goes to the remote backend, quoting
//!   backend -> node:SNAT-port. Both leave from XDP, as the flow's packets do.
//! * TC egress: an error a backend (or this node's stack) sends about a DNATed packet
//!   (client -> backend) leaves quoting client -> frontend, from the frontend when the
//!   backend itself sent it.
//!
//! The outer IPv4 checksum, the quoted IPv4 header's checksum, the quoted TCP/UDP checksum
//! (when it is inside the quote; a UDP checksum of 0 stays 0) and the ICMP checksum are
//! all updated incrementally.
use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_ktime_get_ns, bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{
    conntrack::{ct_flags, CT_REPLY},
    csum, Ct4Key, Reason, IPPROTO_TCP,
};

use crate::{
    conntrack::{forward_key_v4, reply_key_v4},
    hook::Ingress,
    maps::{CONFIG, CT, REJECT_RATE, SNAT},
    parse::{
        raw16, raw32, Flow4, IcmpErr4, Ipv4Hdr, Packet, ETH_HLEN, ICMP_DEST_UNREACH, IPPROTO_ICMP,
        IPV4_HLEN, TCP_CSUM_OFF, UDP_CSUM_OFF,
    },
    stats::Verdict,
};

const NS_PER_SEC: u64 = 1_000_000_000;

/// New addresses (and ports, for the quoted packet) of one ICMP error; `None` keeps one.
#[derive(Clone, Copy, Default)]
struct Rewrite {
    outer_saddr: Option<u32>,
    outer_daddr: Option<u32>,
    inner_src: Option<(u32, u16)>,
    inner_dst: Option<(u32, u16)>,
}

/// The three checksums a quoted-header change touches, as raw words.
struct Sums {
    icmp: u16,
    inner_ip: u16,
    inner_l4: u16,
}

/// Rewrite one address and port of the quoted packet, updating the running checksums.
#[inline(always)]
fn quoted_field<P: Packet>(
    pkt: &mut P,
    addr_off: usize,
    port_off: usize,
    old: (u32, u16),
    new: (u32, u16),
    s: &mut Sums,
) -> Option<()> {
    pkt.write(addr_off, new.0.to_ne_bytes())?;
    pkt.write(port_off, new.1.to_ne_bytes())?;
    s.icmp = csum::replace2(csum::replace4(s.icmp, old.0, new.0), old.1, new.1);
    s.inner_ip = csum::replace4(s.inner_ip, old.0, new.0);
    // The quoted L4 checksum covers the quoted addresses through its pseudo-header.
    s.inner_l4 = csum::replace2(csum::replace4(s.inner_l4, old.0, new.0), old.1, new.1);
    Some(())
}

/// Apply `rw` to the error `e` in `pkt`. `None`: the packet is shorter than its parse said
/// (nothing is half-written that matters: the caller drops it).
#[inline(always)]
fn rewrite_v4<P: Packet>(pkt: &mut P, e: &IcmpErr4, rw: &Rewrite) -> Option<()> {
    let q = &e.inner;
    let icmp_csum_off = e.icmp_off + 2;
    let ip_csum_off = e.inner_off + 10;
    let l4_csum_off = q.l4_off
        + if q.proto == IPPROTO_TCP {
            TCP_CSUM_OFF
        } else {
            UDP_CSUM_OFF
        };
    let old_ip = raw16(pkt.read(ip_csum_off)?);
    // A TCP checksum is quoted only when the error quotes more than 8 bytes of TCP.
    let old_l4: Option<u16> = pkt.read::<[u8; 2]>(l4_csum_off).map(raw16);
    let mut s = Sums {
        icmp: raw16(pkt.read(icmp_csum_off)?),
        inner_ip: old_ip,
        inner_l4: old_l4.unwrap_or(0),
    };
    if let Some(new) = rw.inner_src {
        quoted_field(
            pkt,
            e.inner_off + 12,
            q.l4_off,
            (q.saddr, q.sport),
            new,
            &mut s,
        )?;
    }
    if let Some(new) = rw.inner_dst {
        quoted_field(
            pkt,
            e.inner_off + 16,
            q.l4_off + 2,
            (q.daddr, q.dport),
            new,
            &mut s,
        )?;
    }
    pkt.write(ip_csum_off, s.inner_ip.to_ne_bytes())?;
    s.icmp = csum::replace2(s.icmp, old_ip, s.inner_ip);
    if let Some(old) = old_l4 {
        let new = if q.proto == IPPROTO_TCP {
            s.inner_l4
        } else {
            csum::udp_fixup(old, s.inner_l4)
        };
        pkt.write(l4_csum_off, new.to_ne_bytes())?;
        s.icmp = csum::replace2(s.icmp, old, new);
    }
    pkt.write(icmp_csum_off, s.icmp.to_ne_bytes())?;
    // The outer header: no pseudo-header in ICMP, so only the IPv4 checksum changes.
    let mut ip: Ipv4Hdr = pkt.read(ETH_HLEN)?;
    let mut c = raw16(ip.check);
    if let Some(a) = rw.outer_saddr {
        c = csum::replace4(c, raw32(ip.saddr), a);
        ip.saddr = a.to_ne_bytes();
    }
    if let Some(a) = rw.outer_daddr {
        c = csum::replace4(c, raw32(ip.daddr), a);
        ip.daddr = a.to_ne_bytes();
    }
    ip.check = c.to_ne_bytes();
    pkt.write(ETH_HLEN, ip)
}

/// The flow a quoted packet `q` belongs to, seen from its other end: `q` reversed.
#[inline(always)]
fn reversed(q: &Flow4) -> Flow4 {
    Flow4 {
        saddr: q.daddr,
        daddr: q.saddr,
        sport: q.dport,
        dport: q.sport,
        ..*q
    }
}

/// XDP ingress: an ICMP error quoting a packet of a translated flow. `None`: it quotes
/// nothing of ours (it passes untouched).
#[inline(always)]
pub fn ingress_v4<C: Ingress>(ctx: &mut C, e: &IcmpErr4) -> Option<Result<Verdict, Reason>> {
    let q = &e.inner;
    // 1. A packet we sent to a client (frontend -> client): the flow's forward entry.
    // SAFETY: plain data; a concurrent LRU eviction at worst yields a stale copy.
    if let Some(ct) = unsafe { CT.get(forward_key_v4(&reversed(q))) }.copied() {
        let backend = (ct.nat_addr, ct.nat_port);
        if ct.flags & ct_flags::SNAT == 0 {
            let rw = Rewrite {
                outer_daddr: Some(ct.nat_addr),
                inner_src: Some(backend),
                ..Rewrite::default()
            };
            return Some(match rewrite_v4(ctx, e, &rw) {
                Some(()) => Ok(ctx.deliver_v4(ct.nat_addr, Reason::XdpIcmpErrDnat)),
                None => Err(Reason::XdpDropMalformedL4),
            });
        }
        // A SNATed flow: the remote backend sent that packet as backend -> node:SNAT port.
        // SAFETY: as above.
        let snat = unsafe { SNAT.get(forward_key_v4(&reversed(q))) }.copied()?;
        let rw = Rewrite {
            outer_daddr: Some(ct.nat_addr),
            inner_src: Some(backend),
            inner_dst: Some((snat.addr, snat.port)),
            ..Rewrite::default()
        };
        return Some(forward(ctx, e, &rw, ct.nat_addr));
    }
    // 2. A packet we sent to a remote backend (node:SNAT port -> backend).
    let key = Ct4Key {
        dir: CT_REPLY,
        ..forward_key_v4(&reversed(q))
    };
    // SAFETY: as above.
    let v = unsafe { SNAT.get(key) }.copied()?;
    let rw = Rewrite {
        // From the backend itself: from the frontend the client knows.
        outer_saddr: (e.saddr == q.daddr).then_some(v.fe_addr),
        outer_daddr: Some(v.addr),
        inner_src: Some((v.addr, v.port)),
        inner_dst: Some((v.fe_addr, v.fe_port)),
    };
    Some(forward(ctx, e, &rw, v.addr))
}

/// Rewrite, then send on from the ingress hook towards `to` (as the SNATed flow's packets go).
#[inline(always)]
fn forward<C: Ingress>(
    ctx: &mut C,
    e: &IcmpErr4,
    rw: &Rewrite,
    to: u32,
) -> Result<Verdict, Reason> {
    rewrite_v4(ctx, e, rw).ok_or(Reason::XdpDropMalformedL4)?;
    let from = rw.outer_saddr.unwrap_or(e.saddr);
    ctx.out_v4(IPPROTO_ICMP, from, to, [Reason::XdpIcmpErrSnat; 3])
}

/// TC egress: an ICMP error about a DNATed packet (client -> backend), from the backend or
/// this node. `Ok(None)`: not about one of our flows.
#[inline(always)]
pub fn egress_v4<P: Packet>(pkt: &mut P, e: &IcmpErr4) -> Result<Option<u32>, Reason> {
    let q = &e.inner;
    // The flow's reply entry: backend -> client, i.e. the quoted packet reversed.
    // SAFETY: plain data; a concurrent LRU eviction at worst yields a stale copy.
    let Some(ct) = unsafe { CT.get(reply_key_v4(&reversed(q))) }.copied() else {
        return Ok(None);
    };
    let rw = Rewrite {
        outer_saddr: (e.saddr == q.daddr).then_some(ct.nat_addr),
        inner_dst: Some((ct.nat_addr, ct.nat_port)),
        ..Rewrite::default()
    };
    rewrite_v4(pkt, e, &rw).ok_or(Reason::TcDropRewrite)?;
    Ok(Some(ct.svc_id))
}

/// ICMP destination unreachable, port unreachable.
const ICMP_PORT_UNREACH: u8 = 3;
/// The reject's size: Ethernet, IPv4, ICMP, then the quoted IPv4 header and 8 bytes of L4.
const REJECT_LEN: usize = ETH_HLEN + IPV4_HLEN + 8 + IPV4_HLEN + 8;
/// How much the reject grows the frame at its head.
const REJECT_GROW: i32 = (IPV4_HLEN + 8) as i32;

/// One's-complement sum of `N` bytes as raw words (`N` even).
#[inline(always)]
fn sum_words<const N: usize>(b: &[u8; N]) -> u64 {
    let mut s = 0u64;
    let mut i = 0;
    while i + 1 < N {
        s += u64::from(u16::from_ne_bytes([b[i], b[i + 1]]));
        i += 2;
    }
    s
}

/// Whether this CPU may send one more reject now (`LbConfig::reject_per_s`, a token bucket
/// holding at most one second's worth).
#[inline(always)]
fn reject_allowed() -> bool {
    let rate = CONFIG.get(0).map_or(0, |c| u64::from(c.reject_per_s));
    if rate == 0 {
        return false;
    }
    let Some(b) = REJECT_RATE.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: a per-CPU value only this CPU touches while we run.
    let b = unsafe { &mut *b };
    let elapsed = now.wrapping_sub(b.last_ns).min(NS_PER_SEC);
    let add = elapsed * rate / NS_PER_SEC;
    if add > 0 {
        b.tokens = (b.tokens + add).min(rate);
        b.last_ns = now;
    }
    if b.tokens == 0 {
        return false;
    }
    b.tokens -= 1;
    true
}

/// Answer the packet in `ctx` (a new TCP/UDP flow to a frontend without backends) with an
/// ICMP port unreachable from the address it was sent to, as kube-proxy's REJECT does, and
/// send it back with XDP_TX. `Err`: not allowed now (rate), or the packet cannot be quoted
/// (IPv4 options): the caller drops it.
#[inline(always)]
pub fn reject_v4(ctx: &XdpContext) -> Result<Verdict, Reason> {
    let frame = ctx.data_end() - ctx.data();
    let orig: [u8; ETH_HLEN + IPV4_HLEN + 8] =
        Packet::read(ctx, 0).ok_or(Reason::XdpDropNoBackend)?;
    if orig[ETH_HLEN] != 0x45 || !reject_allowed() {
        return Err(Reason::XdpDropNoBackend);
    }
    let mut out = [0u8; REJECT_LEN];
    // Ethernet: back where it came from.
    out[..6].copy_from_slice(&orig[6..12]);
    out[6..12].copy_from_slice(&orig[..6]);
    out[12] = 0x08;
    // IPv4: from the address the client used, to the client.
    let ip = ETH_HLEN;
    out[ip] = 0x45;
    out[ip + 1] = 0xc0;
    out[ip + 2..ip + 4].copy_from_slice(&((REJECT_LEN - ETH_HLEN) as u16).to_be_bytes());
    out[ip + 8] = 64;
    out[ip + 9] = IPPROTO_ICMP;
    out[ip + 12..ip + 16].copy_from_slice(&orig[ETH_HLEN + 16..ETH_HLEN + 20]);
    out[ip + 16..ip + 20].copy_from_slice(&orig[ETH_HLEN + 12..ETH_HLEN + 16]);
    // ICMP, then the quote: the client's IPv4 header and the first 8 bytes of its L4.
    let icmp = ip + IPV4_HLEN;
    out[icmp] = ICMP_DEST_UNREACH;
    out[icmp + 1] = ICMP_PORT_UNREACH;
    out[icmp + 8..].copy_from_slice(&orig[ETH_HLEN..]);
    let mut iph = [0u8; IPV4_HLEN];
    iph.copy_from_slice(&out[ip..icmp]);
    let ip_csum = !csum::fold(sum_words(&iph));
    out[ip + 10..ip + 12].copy_from_slice(&ip_csum.to_ne_bytes());
    let mut body = [0u8; REJECT_LEN - ETH_HLEN - IPV4_HLEN];
    body.copy_from_slice(&out[icmp..]);
    let icmp_csum = !csum::fold(sum_words(&body));
    out[icmp + 2..icmp + 4].copy_from_slice(&icmp_csum.to_ne_bytes());

    // SAFETY: ctx.ctx is this program's xdp_md; a failed adjust leaves the frame as it was.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -REJECT_GROW) } != 0 {
        return Err(Reason::XdpDropNoBackend);
    }
    let shrink = REJECT_LEN as i32 - (frame as i32 + REJECT_GROW);
    // SAFETY: as above; the frame is at least REJECT_LEN long (checked by the read above).
    if shrink != 0 && unsafe { bpf_xdp_adjust_tail(ctx.ctx, shrink) } != 0 {
        return Err(Reason::XdpDropNoBackend);
    }
    let p = crate::parse::ptr_at::<[u8; REJECT_LEN]>(ctx, 0).ok_or(Reason::XdpDropNoBackend)?;
    // SAFETY: bounds checked by ptr_at; alignment 1.
    unsafe { core::ptr::write_unaligned(p, out) };
    Ok(Verdict {
        reason: Reason::XdpRejectNoBackend,
        action: xdp_action::XDP_TX,
    })
}
