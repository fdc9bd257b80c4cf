//! Per-CPU verdict and per-frontend counters (no atomics needed: one CPU owns each slot).
use lb_common::{Counter, Reason};

use crate::maps::{STATS, SVC_STATS};

#[inline(always)]
fn add(counter: Option<*mut Counter>, bytes: u64) {
    if let Some(c) = counter {
        // SAFETY: a per-CPU array value is only touched by this CPU while we run.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
}

/// Count one packet of `bytes` under `reason`.
#[inline(always)]
pub fn count(reason: Reason, bytes: u64) {
    add(STATS.get_ptr_mut(reason as u32), bytes);
}

/// Count one packet of `bytes` for the frontend `svc_id`.
#[inline(always)]
pub fn count_svc(svc_id: u32, bytes: u64) {
    add(SVC_STATS.get_ptr_mut(svc_id), bytes);
}
