//! Property tests of the pure datapath arithmetic that the kernel programs run (incremental
//! checksums, the flow hash, slot choice, the half-open slots' seal) against from-scratch
//! oracles, 10,000 cases each.
//!
//! Packets are byte buffers in network order, and the functions under test see raw
//! native-order words loaded from them, exactly as the XDP program does.
use lb_common::conntrack::{ct_flags, half_open_slot_v4, CT_FORWARD, CT_REPLY};
use lb_common::csum::{replace2, replace4, udp_fixup};
use lb_common::select::{flow_hash_v4, slot_for};
use lb_common::HalfOpen4;
use proptest::prelude::*;

const CASES: u32 = 10_000;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: CASES,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------
// Oracles, written from the definitions (RFC 1071, RFC 768, include/linux/jhash.h).

/// One's-complement sum of big-endian 16-bit words (an odd tail is padded with zero).
fn ones_sum(bytes: &[u8]) -> u32 {
    let mut sum: u32 = 0;
    for chunk in bytes.chunks(2) {
        let hi = u32::from(chunk[0]) << 8;
        let lo = chunk.get(1).map_or(0, |b| u32::from(*b));
        sum += hi | lo;
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
    }
    sum
}

/// The Internet checksum of `bytes` (its checksum field must hold zero).
fn internet_checksum(bytes: &[u8]) -> u16 {
    !(ones_sum(bytes) as u16)
}

/// TCP/UDP checksum over the pseudo-header and `segment` (checksum field zeroed).
fn l4_checksum(saddr: [u8; 4], daddr: [u8; 4], proto: u8, segment: &[u8]) -> u16 {
    let len = segment.len() as u16;
    let mut buf = Vec::with_capacity(12 + segment.len());
    buf.extend_from_slice(&saddr);
    buf.extend_from_slice(&daddr);
    buf.extend_from_slice(&[0, proto]);
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(segment);
    internet_checksum(&buf)
}

/// UDP as sent: a computed zero goes out as 0xffff (RFC 768).
fn udp_checksum(saddr: [u8; 4], daddr: [u8; 4], segment: &[u8]) -> u16 {
    match l4_checksum(saddr, daddr, 17, segment) {
        0 => 0xffff,
        c => c,
    }
}

/// A raw (native-order) word of the datapath from network-order bytes.
fn raw2(b: &[u8]) -> u16 {
    u16::from_ne_bytes([b[0], b[1]])
}

fn raw4(b: &[u8]) -> u32 {
    u32::from_ne_bytes([b[0], b[1], b[2], b[3]])
}

/// `__jhash_final(a, b, c)` from include/linux/jhash.h, with `rol32` spelled out.
fn jhash_final_oracle(mut a: u32, mut b: u32, mut c: u32) -> u32 {
    fn rol32(w: u32, s: u32) -> u32 {
        ((u64::from(w) << s) as u32) | ((u64::from(w) >> (32 - s)) as u32)
    }
    fn sub(x: u32, y: u32) -> u32 {
        ((u64::from(x) + (1 << 32) - u64::from(y)) & 0xffff_ffff) as u32
    }
    c ^= b;
    c = sub(c, rol32(b, 14));
    a ^= c;
    a = sub(a, rol32(c, 11));
    b ^= a;
    b = sub(b, rol32(a, 25));
    c ^= b;
    c = sub(c, rol32(b, 16));
    a ^= c;
    a = sub(a, rol32(c, 4));
    b ^= a;
    b = sub(b, rol32(a, 14));
    c ^= b;
    c = sub(c, rol32(b, 24));
    c
}

// ---------------------------------------------------------------------------------------
// Generators.

/// An IPv4-header-like buffer (20..=60 bytes, version/IHL word non-zero, checksum at 10..12
/// filled in from scratch) and the even offset of a field of `width` bytes after the
/// checksum.
fn header_with_field(width: usize) -> impl Strategy<Value = (Vec<u8>, usize)> {
    (10usize..=30)
        .prop_flat_map(move |words| {
            let len = words * 2;
            (
                proptest::collection::vec(any::<u8>(), len),
                (12 / 2)..=((len - width) / 2),
            )
        })
        .prop_map(|(mut buf, field_word)| {
            buf[0] = 0x45;
            buf[10] = 0;
            buf[11] = 0;
            let c = internet_checksum(&buf);
            buf[10..12].copy_from_slice(&c.to_be_bytes());
            (buf, field_word * 2)
        })
}

/// A TCP or UDP segment (header + payload, at least one payload word to tune) and its
/// addresses. Returns (saddr, daddr, segment).
fn segment(min_len: usize) -> impl Strategy<Value = ([u8; 4], [u8; 4], Vec<u8>)> {
    (
        any::<[u8; 4]>(),
        any::<[u8; 4]>(),
        proptest::collection::vec(any::<u8>(), min_len..min_len + 64),
    )
}

/// DNAT of a segment as the XDP program does it: daddr (pseudo-header) and dport change.
fn dnat_incremental(
    check: u16,
    old_daddr: u32,
    new_daddr: u32,
    old_port: u16,
    new_port: u16,
) -> u16 {
    replace2(replace4(check, old_daddr, new_daddr), old_port, new_port)
}

/// Sets the payload word at `at` so that the segment's checksum from scratch, with
/// `daddr`, is zero (before the RFC 768 substitution).
fn force_zero_checksum(
    saddr: [u8; 4],
    daddr: [u8; 4],
    proto: u8,
    seg: &mut [u8],
    check_off: usize,
    at: usize,
) {
    seg[at] = 0;
    seg[at + 1] = 0;
    seg[check_off] = 0;
    seg[check_off + 1] = 0;
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&saddr);
    pseudo.extend_from_slice(&daddr);
    pseudo.extend_from_slice(&[0, proto]);
    pseudo.extend_from_slice(&(seg.len() as u16).to_be_bytes());
    pseudo.extend_from_slice(seg);
    let s = ones_sum(&pseudo);
    // s + filler == 0xffff in one's complement, so the checksum ~0xffff is 0.
    let filler = (0xffff - s) as u16;
    seg[at..at + 2].copy_from_slice(&filler.to_be_bytes());
}

// ---------------------------------------------------------------------------------------
// Properties.

proptest! {
    #![proptest_config(config())]

    /// A 32-bit field (an address) changes: the incremental IP header checksum equals the
    /// one computed from scratch.
    #[test]
    fn replace4_matches_scratch((mut buf, off) in header_with_field(4), new in any::<[u8; 4]>()) {
        let old = raw4(&buf[off..]);
        let check = raw2(&buf[10..]);
        buf[off..off + 4].copy_from_slice(&new);
        let got = replace4(check, old, raw4(&new));
        buf[10] = 0;
        buf[11] = 0;
        let want = internet_checksum(&buf);
        prop_assert_eq!(got.to_ne_bytes(), want.to_be_bytes());
    }

    /// A sealed half-open slot is refused once any byte of its contents changes (a second
    /// writer's store landing in it), and a zeroed slot is never sealed.
    #[test]
    fn a_half_open_slot_is_sealed_only_as_written(
        words in any::<[u32; 10]>(),
        byte in 0usize..40,
        flip in 1u8..=255,
    ) {
        let mut s = HalfOpen4 {
            client_addr: words[0],
            client_port: words[1] as u16,
            proto: (words[1] >> 16) as u8 | 1,
            fe_addr: words[2],
            fe_port: words[3] as u16,
            flags: (words[3] >> 16) as u16,
            be_addr: words[4],
            be_port: words[5] as u16,
            backend_id: words[6],
            svc_id: words[7],
            created_ns: u64::from(words[8]) << 32 | u64::from(words[9]),
            ..HalfOpen4::default()
        };
        prop_assert!(!s.sealed());
        s.check = s.checksum();
        prop_assert!(s.sealed());
        // Bytes 0..40 are the contents (padding bytes 7 and 22..24 excepted: not hashed).
        prop_assume!(![7, 22, 23].contains(&byte));
        let mut torn = s;
        bytemuck::bytes_of_mut(&mut torn)[byte] ^= flip;
        prop_assert!(!torn.sealed(), "byte {} changed", byte);
        prop_assert!(!HalfOpen4::default().sealed());
    }

    /// A 16-bit field (a port) changes.
    #[test]
    fn replace2_matches_scratch((mut buf, off) in header_with_field(2), new in any::<[u8; 2]>()) {
        let old = raw2(&buf[off..]);
        let check = raw2(&buf[10..]);
        buf[off..off + 2].copy_from_slice(&new);
        let got = replace2(check, old, raw2(&new));
        buf[10] = 0;
        buf[11] = 0;
        let want = internet_checksum(&buf);
        prop_assert_eq!(got.to_ne_bytes(), want.to_be_bytes());
    }

    /// TCP DNAT (pseudo-header daddr and dport), including segments whose new checksum is
    /// exactly zero.
    #[test]
    fn tcp_dnat_matches_scratch(
        (saddr, daddr, mut seg) in segment(22),
        new_daddr in any::<[u8; 4]>(),
        new_port in any::<[u8; 2]>(),
        zero in any::<bool>(),
    ) {
        if zero {
            let mut after = seg.clone();
            after[2..4].copy_from_slice(&new_port);
            force_zero_checksum(saddr, new_daddr, 6, &mut after, 16, 20);
            seg[20..22].copy_from_slice(&after[20..22]);
        }
        seg[16] = 0;
        seg[17] = 0;
        let c = l4_checksum(saddr, daddr, 6, &seg);
        seg[16..18].copy_from_slice(&c.to_be_bytes());
        let got = dnat_incremental(raw2(&seg[16..]), raw4(&daddr), raw4(&new_daddr), raw2(&seg[2..]), raw2(&new_port));
        seg[2..4].copy_from_slice(&new_port);
        seg[16] = 0;
        seg[17] = 0;
        let want = l4_checksum(saddr, new_daddr, 6, &seg);
        if zero {
            prop_assert_eq!(want, 0);
        }
        prop_assert_eq!(got.to_ne_bytes(), want.to_be_bytes());
    }

    /// UDP DNAT: a computed zero is sent as 0xffff, including segments forced to zero.
    #[test]
    fn udp_dnat_matches_scratch(
        (saddr, daddr, mut seg) in segment(10),
        new_daddr in any::<[u8; 4]>(),
        new_port in any::<[u8; 2]>(),
        zero in any::<bool>(),
    ) {
        let len = seg.len() as u16;
        seg[4..6].copy_from_slice(&len.to_be_bytes());
        if zero {
            let mut after = seg.clone();
            after[2..4].copy_from_slice(&new_port);
            force_zero_checksum(saddr, new_daddr, 17, &mut after, 6, 8);
            seg[8..10].copy_from_slice(&after[8..10]);
        }
        seg[6] = 0;
        seg[7] = 0;
        let c = udp_checksum(saddr, daddr, &seg);
        seg[6..8].copy_from_slice(&c.to_be_bytes());
        let old_check = raw2(&seg[6..]);
        let got = udp_fixup(
            old_check,
            dnat_incremental(old_check, raw4(&daddr), raw4(&new_daddr), raw2(&seg[2..]), raw2(&new_port)),
        );
        seg[2..4].copy_from_slice(&new_port);
        seg[6] = 0;
        seg[7] = 0;
        let want = udp_checksum(saddr, new_daddr, &seg);
        if zero {
            prop_assert_eq!(want, 0xffff);
        }
        prop_assert_eq!(got.to_ne_bytes(), want.to_be_bytes());
    }

    /// UDP without a checksum (0) keeps 0 whatever changes.
    #[test]
    fn udp_checksum_zero_stays_zero(
        old_daddr in any::<u32>(), new_daddr in any::<u32>(),
        old_port in any::<u16>(), new_port in any::<u16>(),
    ) {
        let got = udp_fixup(0, dnat_incremental(0, old_daddr, new_daddr, old_port, new_port));
        prop_assert_eq!(got, 0);
    }

    /// The flow hash is `__jhash_final(saddr ^ seed, daddr, ports ^ proto)`.
    #[test]
    fn flow_hash_matches_jhash_final(
        saddr in any::<u32>(), daddr in any::<u32>(),
        sport in any::<u16>(), dport in any::<u16>(),
        proto in any::<u8>(), seed in any::<u32>(),
    ) {
        let c = ((u32::from(sport) << 16) | u32::from(dport)) ^ u32::from(proto);
        prop_assert_eq!(
            flow_hash_v4(saddr, daddr, sport, dport, proto, seed),
            jhash_final_oracle(saddr ^ seed, daddr, c)
        );
    }

    /// A new flow's slot is `hash mod count + 1`, always in `1..=count`; no slot without
    /// backends.
    #[test]
    fn slot_is_in_range(hash in any::<u32>(), count in any::<u16>()) {
        match slot_for(hash, count) {
            None => prop_assert_eq!(count, 0),
            Some(slot) => {
                prop_assert!(count > 0);
                prop_assert!((1..=count).contains(&slot));
                prop_assert_eq!(u64::from(slot), u64::from(hash) % u64::from(count) + 1);
            }
        }
    }
}

/// Every slot is reachable: over many flows to one frontend, each of `count` slots is taken.
#[test]
fn every_slot_is_taken() {
    for count in [1u16, 2, 3, 7, 10, 64] {
        let mut seen = vec![false; usize::from(count) + 1];
        for sport in 0..4096u16 {
            let h = flow_hash_v4(0x0200_000a, 0x0100_c80a, sport.to_be(), 80u16.to_be(), 6, 7);
            if let Some(s) = slot_for(h, count) {
                seen[usize::from(s)] = true;
            }
        }
        assert!(!seen[0], "slot 0 is the master entry");
        assert!(
            seen[1..].iter().all(|s| *s),
            "count {count}: a slot was never taken"
        );
    }
}

/// A half-open slot stands for the two entries `LB4_CT` holds once the flow is established
/// (one for a SNATed flow), and clients spread over the slots.
#[test]
fn a_half_open_slot_stands_for_both_directions() {
    let s = HalfOpen4 {
        client_addr: 1,
        client_port: 2,
        proto: 6,
        fe_addr: 3,
        fe_port: 4,
        be_addr: 5,
        be_port: 6,
        backend_id: 7,
        svc_id: 8,
        created_ns: 9,
        ..HalfOpen4::default()
    };
    let (fk, fv) = s.forward();
    assert_eq!(
        (fk.saddr, fk.sport, fk.daddr, fk.dport, fk.dir),
        (1, 2, 3, 4, CT_FORWARD)
    );
    assert_eq!(
        (fv.nat_addr, fv.nat_port, fv.backend_id, fv.svc_id),
        (5, 6, 7, 8)
    );
    let (rk, rv) = s.reply().expect("reply");
    assert_eq!(
        (rk.saddr, rk.sport, rk.daddr, rk.dport, rk.dir),
        (5, 6, 1, 2, CT_REPLY)
    );
    assert_eq!((rv.nat_addr, rv.nat_port), (3, 4));
    let snat = HalfOpen4 {
        flags: ct_flags::SNAT,
        ..s
    };
    assert!(snat.reply().is_none());

    // 65,536 clients of one address over 4,096 slots: every slot used, none more than 3x
    // the mean.
    let mask = 4095;
    let mut per_slot = vec![0u32; 4096];
    for port in 0..=u16::MAX {
        let h = half_open_slot_v4(0x0a00_c80a, port.to_be(), 6, 0x1234_5678);
        per_slot[(h & mask) as usize] += 1;
    }
    assert!(
        per_slot.iter().all(|n| (1..=48).contains(n)),
        "{:?}",
        per_slot.iter().max()
    );
}
