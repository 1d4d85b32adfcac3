//! Weighted least connections (IPVS `wlc`): the eligible backend with the
//! fewest active connections per unit of weight, lowest tier first, never
//! one at its `max_conns` cap.
//!
//! The scan runs under `bpf_loop`, so the verifier checks its body once
//! whatever the number of backends (an unrolled 256-slot scan exceeds its
//! budget), and the kernel inlines the loop.
use core::ffi::c_void;

use aya_ebpf::helpers::{bpf_get_prandom_u32, bpf_loop};
use lb_common::{ActiveCounts, Backend, BackendSet, BACKEND_ELIGIBLE, MAX_BACKENDS};

use crate::maps::{ACTIVE, BACKENDS};

const SLOT_MASK: u32 = MAX_BACKENDS - 1;

/// Means: no slot.
// Plain integers rather than Options here: LLVM leaves an Option's unused
// payload undefined, and the verifier rejects reading it when spilled.
pub const NO_SLOT: u32 = u32::MAX;

pub struct Choice {
    pub slot: u16,
    pub backend: Backend,
}

#[repr(C)]
struct Scan {
    set: *const BackendSet,
    counts: *const ActiveCounts,
    len: u32,
    start: u32,
    avoid: u32,
    best: u32,
    best_tier: u32,
    _pad: u32,
    best_active: u64,
    best_weight: u64,
}

/// `avoid` is a slot not to choose (the backend that left a SYN unanswered)
/// or `NO_SLOT`; `None` when no backend (other than `avoid`) can take the flow.
#[inline(always)]
pub fn choose(service: u32, avoid: u32) -> Option<Choice> {
    let set = BACKENDS.get_ptr(service)?;
    let counts = ACTIVE.get_ptr(service)?;
    let len = unsafe { (*set).len };
    if len == 0 || len > MAX_BACKENDS {
        return None;
    }
    let mut scan = Scan {
        set,
        counts,
        len,
        // Start at a random slot so that ties (all idle, say) spread over
        // every backend instead of piling onto the first.
        start: unsafe { bpf_get_prandom_u32() } % len,
        avoid,
        best: NO_SLOT,
        best_tier: 0,
        _pad: 0,
        best_active: 0,
        best_weight: 1,
    };
    let steps = len.div_ceil(SLOTS_PER_STEP);
    unsafe { bpf_loop(steps, step as *mut c_void, &mut scan as *mut Scan as *mut c_void, 0) };
    if scan.best == NO_SLOT {
        return None;
    }
    Some(Choice { slot: scan.best as u16, backend: unsafe { (*set).slots[(scan.best & SLOT_MASK) as usize] } })
}

/// Slots one `bpf_loop` step looks at: the loop calls its callback once per
/// step, and that call is most of a one-slot step's cost.
const SLOTS_PER_STEP: u32 = 4;

/// One step of the scan: `SLOTS_PER_STEP` slots from the random start.
#[inline(never)]
extern "C" fn step(i: u64, ctx: *mut c_void) -> i64 {
    let scan = unsafe { &mut *(ctx as *mut Scan) };
    for j in 0..SLOTS_PER_STEP {
        let k = (i as u32).wrapping_mul(SLOTS_PER_STEP).wrapping_add(j);
        if k >= scan.len {
            break;
        }
        consider(scan, k);
    }
    0
}

/// The k-th slot from the random start.
#[inline(always)]
fn consider(scan: &mut Scan, k: u32) {
    let mut slot = scan.start.wrapping_add(k);
    if slot >= scan.len {
        slot = slot.wrapping_sub(scan.len);
    }
    let slot = slot & SLOT_MASK;
    let backend = unsafe { &(*scan.set).slots[slot as usize] };
    if backend.flags & BACKEND_ELIGIBLE == 0 || backend.weight == 0 || slot == scan.avoid {
        return;
    }
    let active = unsafe { core::ptr::read_volatile(&(*scan.counts).active[slot as usize]) };
    if backend.max_conns != 0 && active >= backend.max_conns as u64 {
        return;
    }
    let weight = backend.weight as u64;
    let tier = backend.tier as u32;
    // active/weight < best_active/best_weight, without division.
    let better = scan.best == NO_SLOT
        || tier < scan.best_tier
        || (tier == scan.best_tier && active * scan.best_weight < scan.best_active * weight);
    if better {
        scan.best = slot;
        scan.best_tier = tier;
        scan.best_active = active;
        scan.best_weight = weight;
    }
}
