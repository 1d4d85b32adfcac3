//! Map keys and values shared by the XDP program and the agent, one module
//! per concern: services and their backends, flows, the clock, statistics,
//! and the expire program's request.
//!
//! Every type is `#[repr(C)]` with explicit padding so both sides agree on the
//! layout byte for byte. Addresses and ports are kept in network byte order,
//! as they appear on the wire, so the data path never swaps bytes.
#![no_std]

pub mod clock;
pub mod expire;
pub mod flow;
pub mod service;
pub mod stats;
pub mod trace;

pub use clock::*;
pub use expire::*;
pub use flow::*;
pub use service::*;
pub use stats::*;
pub use trace::*;

#[cfg(feature = "user")]
mod pod {
    use super::*;
    macro_rules! pod {
        ($($t:ty),*) => {$(
            unsafe impl aya::Pod for $t {}
            unsafe impl bytemuck::Zeroable for $t {}
            unsafe impl bytemuck::Pod for $t {}
        )*};
    }
    pod!(
        ServiceKey, Service, Backend, BackendSet, ActiveCounts, FlowKey, Flow, BackendStats, Counters, Timeouts,
        ExpireRequest, Clock, NextHop, BackendHop, RingCursor, TraceConfig, TraceBudget, DecapStats, BackendOwner,
        HalfOpenCounts
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_hidden_padding() {
        assert_eq!(size_of::<ServiceKey>(), 8);
        assert_eq!(size_of::<BackendOwner>(), 8);
        assert_eq!(size_of::<Backend>(), 20);
        assert_eq!(size_of::<Candidate>(), 12);
        assert_eq!(size_of::<BackendSet>(), 16 + (20 + 12) * MAX_BACKENDS as usize + PICK_TABLE);
        assert_eq!(size_of::<FlowKey>(), 12);
        assert_eq!(size_of::<Flow>(), 80);
        assert_eq!(size_of::<NextHop>(), 24);
        assert_eq!(size_of::<BackendHop>(), 32);
        assert_eq!(size_of::<Timeouts>(), 32);
        assert_eq!(size_of::<ExpireRequest>(), 16 + 32 + 16 + 16 + 12 * EXPIRE_BATCH);
        assert_eq!(size_of::<Clock>(), 24 + 32 + 8);
        assert_eq!(size_of::<Counters>(), 8 * COUNTER_COUNT);
    }
}

/// A fingerprint of the pinned maps' layouts: every shared type's size and
/// the offset of each of its fields, hashed (FNV-1a) when this crate is
/// built. A new agent compares it with the one the running data path was
/// pinned with (the `LAYOUT` map) before taking anything over, so a changed
/// layout is never misread even if its sizes happen to stay the same.
pub const LAYOUT_HASH: u64 = {
    use core::mem::{offset_of, size_of};
    let numbers: [usize; 79] = [
        size_of::<ServiceKey>(), offset_of!(ServiceKey, addr), offset_of!(ServiceKey, port), offset_of!(ServiceKey, proto),
        size_of::<Service>(), offset_of!(Service, id), offset_of!(Service, flags), offset_of!(Service, snat_addrs),
        offset_of!(Service, snat_count), offset_of!(Service, port_first),
        size_of::<BackendOwner>(), offset_of!(BackendOwner, vip), offset_of!(BackendOwner, port),
        offset_of!(BackendOwner, shared),
        size_of::<Backend>(), offset_of!(Backend, addr), offset_of!(Backend, port), offset_of!(Backend, flags),
        offset_of!(Backend, tier), offset_of!(Backend, weight), offset_of!(Backend, max_conns),
        offset_of!(Backend, snat_addr),
        size_of::<Candidate>(), offset_of!(Candidate, per_connection), offset_of!(Candidate, cap),
        offset_of!(Candidate, slot), offset_of!(Candidate, tier),
        size_of::<BackendSet>(), offset_of!(BackendSet, len), offset_of!(BackendSet, candidate_count),
        offset_of!(BackendSet, lowest_tier_count), offset_of!(BackendSet, scheduler), offset_of!(BackendSet, slots),
        offset_of!(BackendSet, candidates), offset_of!(BackendSet, pick_table),
        size_of::<ActiveCounts>(), HALF_OPEN_ONE as usize >> 16, size_of::<HalfOpenCounts>(),
        size_of::<FlowKey>(), offset_of!(FlowKey, saddr), offset_of!(FlowKey, daddr), offset_of!(FlowKey, sport),
        offset_of!(FlowKey, dport),
        size_of::<Flow>(), offset_of!(Flow, state), offset_of!(Flow, service), offset_of!(Flow, slot),
        offset_of!(Flow, nat_addr), offset_of!(Flow, nat_port), offset_of!(Flow, direction), offset_of!(Flow, wscale),
        offset_of!(Flow, ip_csum_diff), offset_of!(Flow, l4_csum_diff), offset_of!(Flow, peer_addr),
        offset_of!(Flow, peer_port), offset_of!(Flow, mode), offset_of!(Flow, seq_next),
        offset_of!(Flow, acked), offset_of!(Flow, window), offset_of!(Flow, last_seen), offset_of!(Flow, hop),
        offset_of!(Flow, ts_seen), offset_of!(Flow, ts_recent), offset_of!(Flow, opened_on),
        offset_of!(Flow, forward_generation),
        offset_of!(NextHop, at), offset_of!(NextHop, mtu),
        size_of::<BackendStats>(), offset_of!(BackendStats, new_flows), offset_of!(BackendStats, refused),
        offset_of!(BackendStats, unanswered), size_of::<Counters>(), COUNTER_COUNT,
        // The state bits and their meaning.
        FLOW_ESTABLISHED as usize, FLOW_ABORTED as usize, FLOW_RESET as usize, FLOW_EXPIRED as usize,
        FLOW_ANSWERED as usize, FLOW_GENERATION_ONE as usize,
    ];
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < numbers.len() {
        hash = (hash ^ numbers[i] as u64).wrapping_mul(0x0100_0000_01b3);
        i += 1;
    }
    hash
};
