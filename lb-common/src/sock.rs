//! Entries of the socket hooks' reverse translation map (`LB4_SOCK_REVNAT`), Cilium's
//! `cilium_lb4_reverse_sk` shape: when `connect4` or `sendmsg4` sends a socket to a backend
//! instead of the Service address it asked for, it records (socket cookie, backend) ->
//! Service address, so `recvmsg4` can restore the Service address as a datagram's source
//! and `getpeername4` can return it.
use bytemuck::{Pod, Zeroable};

/// Key of `LB4_SOCK_REVNAT`. Address and port in network order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct SockRev4Key {
    /// `bpf_get_socket_cookie` of the socket.
    pub cookie: u64,
    /// The backend the socket was sent to.
    pub addr: u32,
    pub port: u16,
    pub _pad: [u8; 2],
}

/// Value of `LB4_SOCK_REVNAT`: the Service address and port the socket asked for. Network
/// order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SockRev4Value {
    pub addr: u32,
    pub port: u16,
    pub _pad: [u8; 2],
}
