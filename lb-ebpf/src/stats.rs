//! Per-CPU counters: no locks and no shared cache lines on the packet path.
use lb_common::{backend_index, BackendStats, Counter, Flow, DIR_FORWARD};

use crate::maps::{BACKEND_STATS, COUNTERS};

#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(c) = COUNTERS.get_ptr_mut(0) {
        // The index is a constant below COUNTER_COUNT.
        unsafe { (*c).values[counter as usize] += 1 };
    }
}

/// Counts a packet and its verdict with one map lookup.
#[inline(always)]
pub fn count_verdict(verdict: Counter) {
    if let Some(c) = COUNTERS.get_ptr_mut(0) {
        unsafe {
            (*c).values[Counter::Packets as usize] += 1;
            (*c).values[verdict as usize] += 1;
        }
    }
}

#[inline(always)]
pub fn backend(service: u16, slot: u16) -> Option<*mut BackendStats> {
    BACKEND_STATS.get_ptr_mut(backend_index(service as u32, slot as u32))
}

/// Counts a forwarded packet on its backend, by direction.
#[inline(always)]
pub fn count_packet(flow: &Flow, len: u64) {
    if let Some(s) = backend(flow.service, flow.slot) {
        unsafe {
            if flow.direction == DIR_FORWARD {
                (*s).fwd_packets += 1;
                (*s).fwd_bytes += len;
            } else {
                (*s).reply_packets += 1;
                (*s).reply_bytes += len;
            }
        }
    }
}
