//! `lb trace`: a rate-limited log of the data path's decisions on new flows
//! and of what it drops, written through aya-log only while the agent has
//! switched tracing on (the TRACE map). Off, it costs one map read where a
//! SYN opens a flow or a packet is dropped, and nothing on established
//! packets.
use aya_ebpf::{helpers::bpf_ktime_get_ns, programs::XdpContext};
use aya_log_ebpf::info;
use lb_common::{Counter, Flow, FlowKey, TRACE_ANY_SERVICE};

use crate::maps::{ACTIVE, BACKENDS, HALF_OPEN, TRACE, TRACE_BUDGET};

/// Whether a line about `key`, of the service `service()` finds (read only
/// where the trace is of one service), is wanted now and within this CPU's
/// budget.
#[inline(always)]
fn wanted(key: &FlowKey, service: impl FnOnce() -> u32) -> bool {
    let Some(config) = TRACE.get(0) else { return false };
    if config.on == 0 {
        return false;
    }
    if config.client != 0 && config.client != key.saddr && config.client != key.daddr {
        return false;
    }
    if config.service != TRACE_ANY_SERVICE && config.service != service() {
        return false;
    }
    let Some(budget) = TRACE_BUDGET.get_ptr_mut(0) else { return false };
    let budget = unsafe { &mut *budget };
    let second = unsafe { bpf_ktime_get_ns() } >> 30;
    if budget.second != second {
        budget.second = second;
        budget.used = 0;
    }
    if budget.used >= config.per_second {
        budget.suppressed = budget.suppressed.wrapping_add(1);
        return false;
    }
    budget.used += 1;
    true
}

/// A SYN opened `flow`: who, to which service, which backend with what
/// load now, out of how many eligible.
#[inline(always)]
pub fn opened(ctx: &XdpContext, key: &FlowKey, flow: &Flow) {
    let service = flow.service as u32;
    if !wanted(key, || service) {
        return;
    }
    let (Some(set), Some(counts), Some(half_open)) = (BACKENDS.get(service), ACTIVE.get(service), HALF_OPEN.get(service))
    else {
        return;
    };
    let slot = flow.slot as u32 & INDEX_MASK;
    let count = counts.active[slot as usize];
    let eligible = set.candidate_count;
    info!(
        ctx,
        "new flow {:i}:{} -> {:i}:{} (service {}): backend {:i}:{} (slot {}), now {} established and {} half-open (this CPU's), the least loaded of {} eligible",
        u32::from_be(key.saddr),
        u16::from_be(key.sport),
        u32::from_be(key.daddr),
        u16::from_be(key.dport),
        service,
        u32::from_be(flow.nat_addr),
        u16::from_be(flow.nat_port),
        slot,
        count as u32,
        half_open.count[slot as usize],
        eligible
    );
    // The loads it was chosen among: the first few eligible backends.
    for i in 0..SHOWN_CANDIDATES {
        if i >= eligible {
            break;
        }
        let candidate = &set.candidates[(i & INDEX_MASK) as usize];
        let slot = candidate.slot as u32 & INDEX_MASK;
        let backend = &set.slots[slot as usize];
        let count = counts.active[slot as usize];
        info!(
            ctx,
            "  eligible {:i}:{} (slot {}, tier {}, weight {}): {} established, {} half-open (this CPU's)",
            u32::from_be(backend.addr),
            u16::from_be(backend.port),
            slot,
            candidate.tier,
            backend.weight,
            count as u32,
            half_open.count[slot as usize]
        );
    }
}

/// Eligible backends a new flow's trace lists with their loads, at most.
const SHOWN_CANDIDATES: u32 = 4;
const INDEX_MASK: u32 = lb_common::MAX_BACKENDS - 1;

/// A packet dropped, with its reason; `service()` finds its service.
#[inline(always)]
pub fn dropped(ctx: &XdpContext, key: &FlowKey, service: impl FnOnce() -> u32, syn: bool, reason: Counter) {
    if !wanted(key, service) {
        return;
    }
    let what = if syn { "SYN" } else { "segment" };
    info!(
        ctx,
        "{} {:i}:{} -> {:i}:{} dropped: {}",
        what,
        u32::from_be(key.saddr),
        u16::from_be(key.sport),
        u32::from_be(key.daddr),
        u16::from_be(key.dport),
        reason.name()
    );
}
