//! The datapath's clock for the timestamps it keeps (conntrack, session affinity, SNAT):
//! CLOCK_MONOTONIC at tick resolution.
//!
//! `bpf_ktime_get_coarse_ns` reads the timekeeper's last tick instead of the clock source:
//! a few nanoseconds, where `bpf_ktime_get_ns` costs a clock-source read on every tracked
//! packet. The timestamps only meet timeouts of seconds and a refresh once a second, so a
//! tick (1-10 ms) of resolution changes nothing. It is the clock of `bpf_ktime_get_ns` and
//! of the agent's `CLOCK_MONOTONIC`, up to a tick behind them; comparisons saturate, so a
//! timestamp a finer clock wrote a moment later reads as fresh, not as ancient.
use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;

/// Now, in nanoseconds of CLOCK_MONOTONIC, at tick resolution.
#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: no preconditions.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// How long ago `then` was, at `now`; zero for a `then` after `now`.
#[inline(always)]
pub fn since(now: u64, then: u64) -> u64 {
    now.saturating_sub(then)
}
