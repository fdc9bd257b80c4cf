//! Incremental Internet checksum updates (RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m')), shared
//! by the kernel programs and host tests.
//!
//! All values are raw memory words (network order loaded as-is): the one's-complement sum is
//! byte-order independent as long as every operand is taken the same way.

/// Fold a wide one's-complement sum to 16 bits. Three folds cover any sum below 2^35.
#[inline(always)]
pub fn fold(s: u64) -> u16 {
    let s = (s & 0xffff) + (s >> 16);
    let s = (s & 0xffff) + (s >> 16);
    let s = (s & 0xffff) + (s >> 16);
    s as u16
}

/// Update `check` for a 32-bit field changing from `from` to `to`.
#[inline(always)]
pub fn replace4(check: u16, from: u32, to: u32) -> u16 {
    let nf = !from;
    let s = u64::from(!check)
        + u64::from(nf & 0xffff)
        + u64::from(nf >> 16)
        + u64::from(to & 0xffff)
        + u64::from(to >> 16);
    !fold(s)
}

/// Update `check` for a 16-bit field changing from `from` to `to`.
#[inline(always)]
pub fn replace2(check: u16, from: u16, to: u16) -> u16 {
    !fold(u64::from(!check) + u64::from(!from) + u64::from(to))
}

/// UDP variant: a zero checksum means "none" and stays zero; a computed zero is sent as
/// 0xffff (RFC 768).
#[inline(always)]
pub fn udp_fixup(old: u16, new: u16) -> u16 {
    if old == 0 {
        0
    } else if new == 0 {
        0xffff
    } else {
        new
    }
}
