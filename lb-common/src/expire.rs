//! The request the agent hands the expire program (BPF_PROG_TEST_RUN).
use crate::{FlowKey, Timeouts};

/// Flow keys the agent hands to the expire program in one call.
pub const EXPIRE_BATCH: usize = 64;

/// The message the agent passes to the expire program through
/// BPF_PROG_TEST_RUN. It starts with room for an Ethernet header because the
/// kernel requires one in XDP test input.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ExpireRequest {
    pub _eth: [u8; 16],
    pub timeouts: Timeouts,
    /// `EXPIRE_IDLE` or `EXPIRE_RESET`.
    pub mode: u32,
    pub _pad: u32,
    pub count: u32,
    /// Written by the program: how many of the flows it expired.
    pub expired: u32,
    /// Written by the program: its clock (`Clock` ticks) and
    /// CLOCK_MONOTONIC (ns) when it ran.
    pub now: u64,
    pub now_ns: u64,
    pub keys: [FlowKey; EXPIRE_BATCH],
}

/// Remove the flows that are idle past their timeout.
pub const EXPIRE_IDLE: u32 = 0;
/// Close these flows now (their backend died, policy `reset`): the count is
/// released and the client's next packet is answered with an RST.
pub const EXPIRE_RESET: u32 = 1;

impl Default for ExpireRequest {
    fn default() -> Self {
        Self {
            _eth: [0; 16],
            timeouts: Timeouts::default(),
            mode: EXPIRE_IDLE,
            _pad: 0,
            count: 0,
            expired: 0,
            now: 0,
            now_ns: 0,
            keys: [FlowKey::default(); EXPIRE_BATCH],
        }
    }
}

