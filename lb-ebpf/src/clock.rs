//! The time as the packet path needs it: jiffies (see `lb_common::Clock`),
//! read only for packets of a flow or opening one.
use aya_ebpf::helpers::bpf_jiffies64;

use crate::maps::CLOCK;

pub struct Now {
    pub ticks: u64,
    pub hop_ttl: u64,
    pub touch_every: u64,
}

#[inline(always)]
pub fn now() -> Now {
    let ticks = unsafe { bpf_jiffies64() };
    match CLOCK.get(0) {
        Some(c) => Now { ticks, hop_ttl: c.hop_ttl, touch_every: c.touch_every },
        // Not written yet: no next hop is reused, every packet touches.
        None => Now { ticks, hop_ttl: 0, touch_every: 0 },
    }
}
