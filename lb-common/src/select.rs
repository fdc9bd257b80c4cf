//! Backend selection shared by the kernel programs and host tests: the seeded flow hash and
//! the slot a new flow takes.

/// jhash-style final mix of a flow tuple (Bob Jenkins' `__jhash_final`), seeded per node.
/// Addresses and ports are taken as raw network-order words, as the datapath loads them.
#[inline(always)]
pub fn flow_hash_v4(saddr: u32, daddr: u32, sport: u16, dport: u16, proto: u8, seed: u32) -> u32 {
    let mut a = saddr ^ seed;
    let mut b = daddr;
    let mut c = ((u32::from(sport) << 16) | u32::from(dport)) ^ u32::from(proto);
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(14));
    a ^= c;
    a = a.wrapping_sub(c.rotate_left(11));
    b ^= a;
    b = b.wrapping_sub(a.rotate_left(25));
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(16));
    a ^= c;
    a = a.wrapping_sub(c.rotate_left(4));
    b ^= a;
    b = b.wrapping_sub(a.rotate_left(14));
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(24));
    c
}

/// The backend slot a new flow with `hash` takes among `count` slots: `hash % count + 1`
/// (slot 0 is the frontend's master entry). `None` when the frontend has no backend.
#[inline(always)]
pub fn slot_for(hash: u32, count: u16) -> Option<u16> {
    if count == 0 {
        return None;
    }
    // The remainder is below `count`, so it fits a u16 and `+ 1` cannot overflow.
    Some((hash % u32::from(count)) as u16 + 1)
}
