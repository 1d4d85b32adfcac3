//! Atomic operations on map values, which both CPUs may touch at once.
//! `core::sync::atomic` has no read-modify-write operations for the BPF target,
//! so these use the intrinsics; the fetching forms need BPF CPU v3 (the build
//! passes `-C target-cpu=v3`).
use core::intrinsics::{atomic_and, atomic_cxchg, atomic_or, atomic_xadd, atomic_xchg, AtomicOrdering::SeqCst};

#[inline(always)]
pub fn add(value: *mut u64, delta: u64) {
    unsafe { atomic_xadd::<u64, u64, { SeqCst }>(value, delta) };
}

#[inline(always)]
pub fn add32(value: *mut u32, delta: u32) {
    unsafe { atomic_xadd::<u32, u32, { SeqCst }>(value, delta) };
}

/// Sets `bits` and returns the value before.
#[inline(always)]
pub fn fetch_or(value: *mut u32, bits: u32) -> u32 {
    unsafe { atomic_or::<u32, u32, { SeqCst }>(value, bits) }
}

/// Clears what `mask` does not keep.
#[inline(always)]
pub fn and(value: *mut u32, mask: u32) {
    unsafe { atomic_and::<u32, u32, { SeqCst }>(value, mask) };
}

#[inline(always)]
pub fn compare_exchange(value: *mut u32, current: u32, new: u32) -> bool {
    unsafe { atomic_cxchg::<u32, { SeqCst }, { SeqCst }>(value, current, new) }.1
}

/// Stores `new` with a full barrier: loads after it see what other CPUs
/// stored before it (BPF_XCHG), as a plain store does not promise.
#[inline(always)]
pub fn store_fenced(value: *mut u64, new: u64) {
    unsafe { atomic_xchg::<u64, { SeqCst }>(value, new) };
}
