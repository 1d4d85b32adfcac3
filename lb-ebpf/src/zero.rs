//! Zeroing memory with word stores. This target's `memset` stores a byte at
//! a time, and LLVM calls it for a struct update such as `..Flow::default()`
//! (50 to 90 iterations for each entry a SYN builds). Volatile word stores
//! are neither merged back into such a call nor dropped.
use core::{mem, ptr};

/// Zeroes `*value`, of a type 8-aligned whose size is a multiple of 8.
#[inline(always)]
pub fn zero<T>(value: *mut T) {
    const { assert!(mem::size_of::<T>() % 8 == 0 && mem::align_of::<T>() >= 8) };
    let words = value as *mut u64;
    for i in 0..mem::size_of::<T>() / 8 {
        unsafe { ptr::write_volatile(words.add(i), 0) };
    }
}
