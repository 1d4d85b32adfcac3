//! Weighted least connections (IPVS `wlc`): the eligible backend with the
//! fewest active connections per unit of weight, lowest tier first.
use aya_ebpf::helpers::bpf_get_prandom_u32;
use lb_common::{Backend, BACKEND_ELIGIBLE, MAX_BACKENDS};

use crate::maps::{ACTIVE, BACKENDS};

const SLOT_MASK: u32 = MAX_BACKENDS - 1;

pub struct Choice {
    pub slot: u16,
    pub backend: Backend,
}

#[inline(always)]
pub fn choose(service: u32) -> Option<Choice> {
    let set = BACKENDS.get_ptr(service)?;
    let counts = ACTIVE.get_ptr(service)?;
    let len = unsafe { (*set).len };
    if len == 0 || len > MAX_BACKENDS {
        return None;
    }
    // Start the scan at a random slot so that ties (all idle, say) spread
    // over every backend instead of piling onto the first.
    let start = unsafe { bpf_get_prandom_u32() } % len;

    let mut best: Option<u32> = None;
    let mut best_tier = 0u8;
    let mut best_active = 0u64;
    let mut best_weight = 1u64;
    for i in 0..MAX_BACKENDS {
        if i >= len {
            break;
        }
        let mut slot = start + i;
        if slot >= len {
            slot -= len;
        }
        let slot = slot & SLOT_MASK;
        let backend = unsafe { &(*set).slots[slot as usize] };
        if backend.flags & BACKEND_ELIGIBLE == 0 || backend.weight == 0 {
            continue;
        }
        let active = unsafe { core::ptr::read_volatile(&(*counts).active[slot as usize]) };
        if backend.max_conns != 0 && active >= backend.max_conns as u64 {
            continue;
        }
        let weight = backend.weight as u64;
        // active/weight < best_active/best_weight, without division.
        let better = match best {
            None => true,
            Some(_) if backend.tier != best_tier => backend.tier < best_tier,
            Some(_) => active * best_weight < best_active * weight,
        };
        if better {
            best = Some(slot);
            best_tier = backend.tier;
            best_active = active;
            best_weight = weight;
        }
    }
    let slot = best?;
    Some(Choice { slot: slot as u16, backend: unsafe { (*set).slots[(slot & SLOT_MASK) as usize] } })
}
