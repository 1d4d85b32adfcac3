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

pub use clock::*;
pub use expire::*;
pub use flow::*;
pub use service::*;
pub use stats::*;

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
        ExpireRequest, Clock, NextHop, BackendHop, RingCursor
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_hidden_padding() {
        assert_eq!(size_of::<ServiceKey>(), 8);
        assert_eq!(size_of::<Backend>(), 16);
        assert_eq!(size_of::<Candidate>(), 12);
        assert_eq!(size_of::<BackendSet>(), 16 + (16 + 12) * MAX_BACKENDS as usize + PICK_TABLE);
        assert_eq!(size_of::<FlowKey>(), 12);
        assert_eq!(size_of::<Flow>(), 64, "one cache line");
        assert_eq!(size_of::<NextHop>(), 24);
        assert_eq!(size_of::<BackendHop>(), 32);
        assert_eq!(size_of::<Timeouts>(), 32);
        assert_eq!(size_of::<ExpireRequest>(), 16 + 32 + 16 + 16 + 12 * EXPIRE_BATCH);
        assert_eq!(size_of::<Clock>(), 24 + 32 + 8);
        assert_eq!(size_of::<Counters>(), 8 * COUNTER_COUNT);
    }
}
