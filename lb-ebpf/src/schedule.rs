//! Weighted least connections: the eligible backend with the fewest active
//! connections per unit of weight, lowest tier first, never one at its
//! `max_conns` cap. Over every candidate (`least_conn`, IPVS `wlc`), or
//! between two picked at random in proportion to their weights
//! (`random_two_least_conn`, nginx's `random two least_conn`), whose cost
//! does not grow with the pool.
//!
//! The agent keeps a packed list of the eligible backends (`candidates`),
//! lowest tier first, so the scan reads nothing else. Each candidate gets a
//! sort key, and the smallest wins:
//!
//! ```text
//!   tier << 61 | ((established × 256 + half-open) × WEIGHT_SCALE / weight) << 8
//!              | position after a random start
//! ```
//!
//! Half-open flows weigh 1/256 of an established one, as in IPVS's `wlc`:
//! enough that a burst of new connections spreads instead of all going to
//! the backend that was least loaded when it began, too little for a SYN
//! flood to push real connections around. They are this CPU's own (the
//! flows it opened, `HalfOpenCounts`): a burst spreads over the CPUs its
//! SYNs arrive on, and each spreads its share. `max_conns` caps established
//! connections.
//!
//! The position breaks ties in favour of the first candidate after a random
//! start, so ties (all idle, say) spread over every backend instead of
//! piling onto the first.
//!
//! The full scan runs under `bpf_loop`, so the verifier checks its body once
//! whatever the number of backends, and the kernel inlines the loop.
use core::ffi::c_void;

use aya_ebpf::helpers::{bpf_get_prandom_u32, bpf_loop};
use lb_common::{ActiveCounts, Backend, BackendSet, HalfOpenCounts, MAX_BACKENDS, PICK_TABLE, SCHEDULER_RANDOM_TWO};

use crate::maps::{ACTIVE, BACKENDS, HALF_OPEN};

const INDEX_MASK: u32 = MAX_BACKENDS - 1;

/// Means: no slot.
// Plain integers rather than Options here: LLVM leaves an Option's unused
// payload undefined, and the verifier rejects reading it when spilled.
pub const NO_SLOT: u32 = u32::MAX;

const MAX_HALF_OPEN_WEIGHT: u64 = 255;
const MAX_ESTABLISHED_WEIGHT: u64 = (1 << 24) - 1;

/// Above every real key (tiers are below 4, so keys are below 2^63).
const NO_KEY: u64 = i64::MAX as u64;

pub struct Choice {
    pub slot: u16,
    pub backend: Backend,
}

#[repr(C)]
struct Scan {
    set: *const BackendSet,
    counts: *const ActiveCounts,
    half_open: *const HalfOpenCounts,
    count: u32,
    start: u32,
    avoid: u32,
    _pad: u32,
    best: u64,
}

/// `avoid` is a slot not to choose (the backend that left a SYN unanswered)
/// or `NO_SLOT`; `None` when no backend (other than `avoid`) can take the flow.
#[inline(always)]
pub fn choose(service: u32, avoid: u32) -> Option<Choice> {
    let set = BACKENDS.get_ptr(service)?;
    let counts = ACTIVE.get_ptr(service)?;
    let half_open = HALF_OPEN.get_ptr(service)?;
    let count = unsafe { (*set).candidate_count };
    if count == 0 || count > MAX_BACKENDS {
        return None;
    }
    let random = unsafe { bpf_get_prandom_u32() };
    let mut scan = Scan { set, counts, half_open, count, start: 0, avoid, _pad: 0, best: NO_KEY };
    let lowest_tier = unsafe { (*set).lowest_tier_count };
    if unsafe { (*set).scheduler } == SCHEDULER_RANDOM_TWO && lowest_tier >= 2 && lowest_tier <= count {
        // Two candidates of the lowest tier, each picked with a chance in
        // proportion to its weight (as nginx does): a uniform pick would cap
        // a heavy backend's share at the chance of being picked. If neither
        // can take the flow, the full scan below finds one that can.
        let table = unsafe { &(*set).pick_table };
        let first = table[(random as usize) % PICK_TABLE] as u32;
        let mut second = table[((random >> 16) as usize) % PICK_TABLE] as u32;
        if second == first {
            second = if first + 1 < lowest_tier { first + 1 } else { 0 };
        }
        // Opaque, so LLVM keeps the index mask the verifier needs (it
        // proves the mask redundant here and would drop it).
        consider(&mut scan, core::hint::black_box(first));
        consider(&mut scan, core::hint::black_box(second));
    }
    if scan.best == NO_KEY {
        scan.start = random % count;
        let steps = count.div_ceil(CANDIDATES_PER_STEP);
        unsafe { bpf_loop(steps, step as *mut c_void, &mut scan as *mut Scan as *mut c_void, 0) };
        if scan.best == NO_KEY {
            return None;
        }
    }
    let index = (scan.best as u32).wrapping_add(scan.start) & INDEX_MASK;
    let slot = unsafe { (*set).candidates[index as usize].slot } as u32 & INDEX_MASK;
    Some(Choice { slot: slot as u16, backend: unsafe { (*set).slots[slot as usize] } })
}

/// Candidates one `bpf_loop` step looks at: the loop calls its callback once
/// per step, and that call costs about as much as a candidate.
const CANDIDATES_PER_STEP: u32 = 8;

#[inline(never)]
extern "C" fn step(i: u64, ctx: *mut c_void) -> i64 {
    let scan = unsafe { &mut *(ctx as *mut Scan) };
    for j in 0..CANDIDATES_PER_STEP {
        let index = (i as u32).wrapping_mul(CANDIDATES_PER_STEP).wrapping_add(j);
        if index >= scan.count {
            break;
        }
        consider(scan, index);
    }
    0
}

#[inline(always)]
fn consider(scan: &mut Scan, index: u32) {
    let candidate = unsafe { &(*scan.set).candidates[(index & INDEX_MASK) as usize] };
    let slot = candidate.slot as u32 & INDEX_MASK;
    let established = unsafe { core::ptr::read_volatile(&(*scan.counts).active[slot as usize]) } as u32;
    // Both rare, so these branches are predicted.
    if slot == scan.avoid || established >= candidate.cap {
        return;
    }
    // Below 2^24 established and 2^8 half-open, times at most WEIGHT_SCALE
    // = 2^20: the key does not overflow.
    let half_open = unsafe { (*scan.half_open).count[slot as usize] as u64 }.min(MAX_HALF_OPEN_WEIGHT);
    let weighed = (established as u64).min(MAX_ESTABLISHED_WEIGHT) << 8 | half_open;
    let load = weighed * candidate.per_connection as u64;
    let position = index.wrapping_sub(scan.start) & INDEX_MASK;
    let key = (candidate.tier as u64) << 61 | load << 8 | position as u64;
    if key < scan.best {
        scan.best = key;
    }
}
