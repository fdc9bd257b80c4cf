//! Map keys, values and constants shared by the kernel programs (`lb-ebpf`) and the agent,
//! and the pure datapath arithmetic ([`csum`], [`select`]) that host tests check against
//! from-scratch oracles.
//!
//! Every type here is `#[repr(C)]` with explicit padding and derives bytemuck `Pod`, so
//! hidden padding fails to compile. Addresses and ports are stored in network byte order;
//! counts, slots and identifiers are in host byte order.
#![no_std]

pub mod conntrack;
pub mod csum;
pub mod maps;
pub mod select;
pub mod service;
pub mod sock;
pub mod stats;

pub use conntrack::{Ct4Key, Ct4Value, Frag4Key, Frag4Value, HalfOpen4, Snat4Value};
pub use service::{Affinity4Key, Affinity4Value, Backend4, Frontend4Key, LbConfig, Service4Value};
pub use sock::{SockRev4Key, SockRev4Value};
pub use stats::{Counter, RateLimit, Reason};

/// IP protocol numbers used in keys.
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// Compile-time layout checks: a changed size is a layout break and needs a new map name.
const _: () = {
    assert!(core::mem::size_of::<Frontend4Key>() == 12);
    assert!(core::mem::size_of::<Service4Value>() == 16);
    assert!(core::mem::size_of::<Backend4>() == 12);
    assert!(core::mem::size_of::<Ct4Key>() == 16);
    assert!(core::mem::size_of::<Ct4Value>() == 32);
    assert!(core::mem::size_of::<Counter>() == 16);
    assert!(core::mem::size_of::<LbConfig>() == 48);
    assert!(core::mem::size_of::<Frag4Key>() == 12);
    assert!(core::mem::size_of::<Frag4Value>() == 16);
    assert!(core::mem::size_of::<RateLimit>() == 16);
    assert!(core::mem::size_of::<Affinity4Key>() == 12);
    assert!(core::mem::size_of::<Affinity4Value>() == 16);
    assert!(core::mem::size_of::<Snat4Value>() == 32);
    assert!(core::mem::size_of::<HalfOpen4>() == 64);
    assert!(core::mem::size_of::<SockRev4Key>() == 16);
    assert!(core::mem::size_of::<SockRev4Value>() == 8);
};

#[cfg(feature = "user")]
mod user {
    //! aya's `Pod` marker for every map type, so userspace can read and write them.
    use super::*;
    // SAFETY: all of these are `#[repr(C)]`, bytemuck::Pod (no padding, any bit pattern valid).
    unsafe impl aya::Pod for Frontend4Key {}
    unsafe impl aya::Pod for Service4Value {}
    unsafe impl aya::Pod for Backend4 {}
    unsafe impl aya::Pod for Ct4Key {}
    unsafe impl aya::Pod for Ct4Value {}
    unsafe impl aya::Pod for Counter {}
    unsafe impl aya::Pod for LbConfig {}
    unsafe impl aya::Pod for Affinity4Key {}
    unsafe impl aya::Pod for Affinity4Value {}
    unsafe impl aya::Pod for Snat4Value {}
    unsafe impl aya::Pod for HalfOpen4 {}
    unsafe impl aya::Pod for SockRev4Key {}
    unsafe impl aya::Pod for Frag4Key {}
    unsafe impl aya::Pod for Frag4Value {}
    unsafe impl aya::Pod for RateLimit {}
    unsafe impl aya::Pod for SockRev4Value {}
}
