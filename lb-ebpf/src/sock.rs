//! Socket-level load balancing (cgroup `connect4`, `sendmsg4`, `recvmsg4`, `getpeername4`),
//! as Cilium's `bpf_sock.c`: a socket of the node's own processes or pods that asks for a
//! Service address is sent to a backend once per connect (or per unconnected datagram), so
//! these paths need no per-packet NAT at all.
//!
//! Which addresses are Services here: every exact frontend (ClusterIP, externalIP,
//! LoadBalancer IP, hostPort with hostIP), and the wildcard ones (NodePort, hostPort) on
//! any of this node's addresses and, for sockets of the node's own network namespace, on
//! 127.0.0.0/8 (NodePorts there only with [`config_flags::LOCALHOST_NODEPORTS`]). A Service
//! with externalTrafficPolicy Local uses its internal scope (every endpoint) here, as
//! kube-proxy does for in-cluster sources; internalTrafficPolicy is already in the ClusterIP
//! entries. Backends, slots and affinity are the XDP path's; the choice is random per
//! connect, and affinity is per client network namespace.
use aya_ebpf::{
    helpers::{bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_set_retval},
    programs::SockAddrContext,
    EbpfContext as _,
};
use lb_common::{
    service::{config_flags, flags, scope},
    Backend4, Reason, SockRev4Key, SockRev4Value, IPPROTO_TCP, IPPROTO_UDP,
};

use crate::{
    affinity,
    lb::{self, Frontend},
    maps::{CONFIG, SERVICES, SOCK_REVNAT},
};

const ECONNREFUSED: i32 = 111;
const ENOMEM: i32 = 12;
const EHOSTUNREACH: i32 = 113;
const BPF_ANY: u64 = 0;

/// A socket hook's answer: let the call go on, or fail it.
pub const SYS_PROCEED: i32 = 1;
pub const SYS_REJECT: i32 = 0;

/// `connect4` (`translated` = [`Reason::SockConnectXlate`]) and `sendmsg4`
/// ([`Reason::SockSendmsgXlate`]): send the socket to a backend when it asks for a Service.
/// A Service without a backend fails the call with ECONNREFUSED.
#[inline(always)]
pub fn forward_v4(ctx: &SockAddrContext, translated: Reason) -> i32 {
    match try_forward_v4(ctx) {
        Ok(false) => SYS_PROCEED,
        Ok(true) => {
            crate::stats::count(translated, 0);
            SYS_PROCEED
        }
        Err((reason, errno)) => {
            crate::stats::count(reason, 0);
            if reason == Reason::SockPassLocalhostNodePort {
                return SYS_PROCEED;
            }
            // SAFETY: sets this call's return value; allowed for connect4/sendmsg4.
            unsafe { bpf_set_retval(-errno) };
            SYS_REJECT
        }
    }
}

/// `Ok(true)`: translated. `Ok(false)`: not a Service, untouched. `Err((reason, errno))`:
/// counted under `reason`, and failed with `errno` unless the reason is a pass.
#[inline(always)]
fn try_forward_v4(ctx: &SockAddrContext) -> Result<bool, (Reason, i32)> {
    let sa = ctx.sock_addr;
    // SAFETY: the kernel hands a valid bpf_sock_addr; these fields are readable in every
    // sock_addr hook.
    let (addr, port, proto) = unsafe { ((*sa).user_ip4, (*sa).user_port as u16, (*sa).protocol) };
    let proto = match proto {
        6 => IPPROTO_TCP,
        17 => IPPROTO_UDP,
        _ => return Ok(false),
    };
    let Some(fe) = lookup_v4(ctx, addr, port, proto)? else {
        return Ok(false);
    };
    // SAFETY: no preconditions.
    let hash = unsafe { bpf_get_prandom_u32() };
    let chosen = if fe.svc.affinity_timeout_s != 0 {
        // SAFETY: ctx is a valid sock_addr context.
        let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
        affinity::select_backend_v4(&fe, affinity::Client::netns(netns), hash)
    } else {
        lb::select_backend_v4(&fe, hash).map(|(id, b, _)| (id, b))
    };
    let backend: Backend4 = match chosen {
        Ok((_, b)) => b,
        Err(Reason::XdpDropNoBackend) => return Err((Reason::SockRejectNoBackend, ECONNREFUSED)),
        Err(_) => return Err((Reason::SockRejectInternal, EHOSTUNREACH)),
    };
    // SAFETY: ctx is a valid sock_addr context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = SockRev4Key {
        cookie,
        addr: backend.addr,
        port: backend.port,
        _pad: [0; 2],
    };
    let value = SockRev4Value {
        addr,
        port,
        _pad: [0; 2],
    };
    // A datagram socket sends many times to the same backend: write only what changed.
    // SAFETY: plain data.
    let known = unsafe { SOCK_REVNAT.get(key) }.is_some_and(|v| *v == value);
    if !known && SOCK_REVNAT.insert(key, value, BPF_ANY).is_err() {
        return Err((Reason::SockRejectInternal, ENOMEM));
    }
    // SAFETY: user_ip4 and user_port are writable in connect4 and sendmsg4.
    unsafe {
        (*sa).user_ip4 = backend.addr;
        (*sa).user_port = u32::from(backend.port);
    }
    Ok(true)
}

/// The frontend a socket asking for `(addr, port, proto)` reaches, in the scope the socket
/// hooks use. `Err` only for a localhost NodePort that policy leaves alone.
#[inline(always)]
fn lookup_v4(
    ctx: &SockAddrContext,
    addr: u32,
    port: u16,
    proto: u8,
) -> Result<Option<Frontend>, (Reason, i32)> {
    let fe = match lb::lookup_exact_v4(addr, port, proto) {
        Some(fe) => fe,
        None => {
            let loopback = u32::from_be(addr) >> 24 == 127;
            if !(lb::is_node_addr(addr) || loopback && in_host_netns(ctx)) {
                return Ok(None);
            }
            let Some(fe) = lb::lookup_exact_v4(0, port, proto) else {
                return Ok(None);
            };
            let localhost_np = CONFIG
                .get(0)
                .is_some_and(|c| c.flags & config_flags::LOCALHOST_NODEPORTS != 0);
            if loopback && fe.svc.flags & flags::NODEPORT != 0 && !localhost_np {
                return Err((Reason::SockPassLocalhostNodePort, 0));
            }
            fe
        }
    };
    if fe.svc.flags & flags::EXT_LOCAL == 0 {
        return Ok(Some(fe));
    }
    let key = fe.key.with_scope(scope::INTERNAL);
    // SAFETY: plain data written whole by the agent.
    Ok(Some(match unsafe { SERVICES.get(key) } {
        Some(svc) => Frontend { key, svc: *svc },
        None => fe,
    }))
}

/// Whether the socket lives in the node's own network namespace (`LbConfig`), where
/// 127.0.0.0/8 is the node's loopback; a pod's loopback is its own.
#[inline(always)]
fn in_host_netns(ctx: &SockAddrContext) -> bool {
    let host = CONFIG.get(0).map_or(0, |c| c.host_netns_cookie);
    // SAFETY: ctx is a valid sock_addr context.
    host != 0 && unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } == host
}

/// `recvmsg4` ([`Reason::SockRecvmsgRevNat`]) and `getpeername4`
/// ([`Reason::SockGetpeernameRevNat`]): a backend address this socket was sent to instead
/// of a Service is shown as that Service. Never fails the call.
#[inline(always)]
pub fn reverse_v4(ctx: &SockAddrContext, translated: Reason) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: the kernel hands a valid bpf_sock_addr; user_ip4/user_port are readable here.
    let (addr, port) = unsafe { ((*sa).user_ip4, (*sa).user_port as u16) };
    // SAFETY: ctx is a valid sock_addr context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = SockRev4Key {
        cookie,
        addr,
        port,
        _pad: [0; 2],
    };
    // SAFETY: plain data.
    if let Some(v) = unsafe { SOCK_REVNAT.get(key) } {
        let v = *v;
        // SAFETY: user_ip4 and user_port are writable in recvmsg4 and getpeername4.
        unsafe {
            (*sa).user_ip4 = v.addr;
            (*sa).user_port = u32::from(v.port);
        }
        crate::stats::count(translated, 0);
    }
    SYS_PROCEED
}
