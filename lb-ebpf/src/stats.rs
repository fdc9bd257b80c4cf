//! Per-CPU verdict and per-frontend counters (no atomics needed: one CPU owns each slot).
use lb_common::{Counter, Reason};

use crate::maps::{LATENCY, STATS, SVC_STATS};

#[inline(always)]
fn add(counter: Option<*mut Counter>, n: u64, bytes: u64) {
    if let Some(c) = counter {
        // SAFETY: a per-CPU array value is only touched by this CPU while we run.
        unsafe {
            (*c).packets += n;
            (*c).bytes += bytes;
        }
    }
}

/// Count one packet of `bytes` under `reason`.
#[inline(always)]
pub fn count(reason: Reason, bytes: u64) {
    add(STATS.get_ptr_mut(reason as u32), 1, bytes);
}

/// Count `n` events under the event reason `reason` (conntrack entries).
#[inline(always)]
pub fn count_n(reason: Reason, n: u64) {
    add(STATS.get_ptr_mut(reason as u32), n, 0);
}

/// Count one packet of `bytes` for the frontend `svc_id`.
#[inline(always)]
pub fn count_svc(svc_id: u32, bytes: u64) {
    add(SVC_STATS.get_ptr_mut(svc_id), 1, bytes);
}

/// Count one run of program `prog` (0 XDP, 1 TC) that started at `t0`
/// (`bpf_ktime_get_ns`) in its log2 latency bucket.
#[inline(always)]
pub fn record_latency(prog: u32, t0: u64) {
    // SAFETY: no preconditions.
    let dt = unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() }.wrapping_sub(t0);
    let bucket = (64 - dt.leading_zeros()).min(lb_common::maps::LATENCY_BUCKETS - 1);
    if let Some(c) = LATENCY.get_ptr_mut(prog * lb_common::maps::LATENCY_BUCKETS + bucket) {
        // SAFETY: a per-CPU value only this CPU touches while we run.
        unsafe { *c += 1 };
    }
}

/// What the XDP program does with a packet, and the reason it is counted under.
#[derive(Clone, Copy)]
pub struct Verdict {
    pub reason: Reason,
    /// `XDP_PASS`, `XDP_TX` or `XDP_REDIRECT`.
    pub action: u32,
}

impl Verdict {
    /// Hand the packet to the kernel stack.
    #[inline(always)]
    pub fn pass(reason: Reason) -> Self {
        Self {
            reason,
            action: aya_ebpf::bindings::xdp_action::XDP_PASS,
        }
    }
}
