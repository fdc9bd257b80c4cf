//! What differs between the two hooks the ingress program runs at (`lb-agent run --attach
//! xdp|tc`): rewriting a TCP/UDP packet, sending a translated packet on, delivering a DNATed
//! packet and the no-backend reject. The lookups, conntrack and NAT decisions are shared.
//!
//! Verdicts carry XDP action codes at both hooks (`XDP_PASS`, `XDP_TX`, `XDP_REDIRECT`,
//! `XDP_DROP`); the TC entry maps them to `TC_ACT_*` ([`tc_action`]).
use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT},
    programs::{TcContext, XdpContext},
};
use lb_common::Reason;

use crate::{
    icmp,
    nat::{self, End},
    nodeport,
    parse::{Flow4, Packet},
    redirect,
    stats::Verdict,
};

/// The hook-specific half of the ingress program.
pub trait Ingress: Packet {
    /// Rewrite the source or destination of the strict-parsed TCP/UDP packet `flow`.
    fn rewrite_v4(&mut self, flow: &Flow4, end: End, addr: u32, port: u16) -> Result<(), Reason>;

    /// Send on a translated packet from `saddr` to `daddr` that the stack would drop as
    /// martian (SNATed flows, their replies, their ICMP errors and fragments). `reasons`:
    /// counted when it leaves by the interface it came in on, by another, or goes to the stack.
    fn out_v4(
        &mut self,
        proto: u8,
        saddr: u32,
        daddr: u32,
        reasons: [Reason; 3],
    ) -> Result<Verdict, Reason>;

    /// Deliver a DNATed packet (now to `daddr`) counted as `reason`: XDP hands it to the
    /// stack; TC ingress forwards it itself where the FIB allows.
    fn deliver_v4(&mut self, daddr: u32, reason: Reason) -> Verdict;

    /// Answer a new flow to a frontend without backends (`Err`: drop it as that reason).
    fn reject_v4(&mut self) -> Result<Verdict, Reason>;
}

impl Ingress for XdpContext {
    #[inline(always)]
    fn rewrite_v4(&mut self, flow: &Flow4, end: End, addr: u32, port: u16) -> Result<(), Reason> {
        nat::rewrite_v4(self, flow.proto, end, addr, port)
    }

    #[inline(always)]
    fn out_v4(
        &mut self,
        proto: u8,
        saddr: u32,
        daddr: u32,
        reasons: [Reason; 3],
    ) -> Result<Verdict, Reason> {
        nodeport::out_v4(self, proto, saddr, daddr, reasons)
    }

    #[inline(always)]
    fn deliver_v4(&mut self, _daddr: u32, reason: Reason) -> Verdict {
        Verdict::pass(reason)
    }

    #[inline(always)]
    fn reject_v4(&mut self) -> Result<Verdict, Reason> {
        icmp::reject_v4(self)
    }
}

impl Ingress for TcContext {
    #[inline(always)]
    fn rewrite_v4(&mut self, flow: &Flow4, end: End, addr: u32, port: u16) -> Result<(), Reason> {
        nat::tc_rewrite_v4(self, flow, end, addr, port)
    }

    #[inline(always)]
    fn out_v4(
        &mut self,
        _proto: u8,
        _saddr: u32,
        daddr: u32,
        reasons: [Reason; 3],
    ) -> Result<Verdict, Reason> {
        redirect::out_v4(self, daddr, reasons)
    }

    #[inline(always)]
    fn deliver_v4(&mut self, daddr: u32, reason: Reason) -> Verdict {
        redirect::deliver_v4(self, daddr, reason)
    }

    #[inline(always)]
    fn reject_v4(&mut self) -> Result<Verdict, Reason> {
        // Building the ICMP error in an skb (resize, checksum state, GSO) is not done here:
        // the packet is dropped and counted, as the XDP reject does beyond its rate.
        Err(Reason::XdpDropNoBackend)
    }
}

/// The TC verdict for an ingress [`Verdict`]'s XDP action.
#[inline(always)]
pub fn tc_action(xdp: u32) -> i32 {
    match xdp {
        xdp_action::XDP_PASS => TC_ACT_OK,
        xdp_action::XDP_TX | xdp_action::XDP_REDIRECT => TC_ACT_REDIRECT,
        _ => TC_ACT_SHOT,
    }
}
