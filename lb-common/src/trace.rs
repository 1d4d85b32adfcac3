//! `lb trace`: what the agent tells the data path to log. Written by the
//! agent into the program's own TRACE map (one entry, not pinned: each
//! agent's program starts with tracing off).

/// `TraceConfig::service` for every service.
pub const TRACE_ANY_SERVICE: u32 = u32::MAX;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceConfig {
    /// 0: off, and the data path logs nothing.
    pub on: u32,
    /// A service id, or `TRACE_ANY_SERVICE`.
    pub service: u32,
    /// A client address (network byte order), or 0 for every client.
    pub client: u32,
    /// Lines each CPU may log per second (about 1.07 s: 2^30 ns); more are
    /// counted in `TraceBudget::suppressed`.
    pub per_second: u32,
}

/// Each CPU's use of its trace budget.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TraceBudget {
    /// `bpf_ktime_get_ns() >> 30` when the count began.
    pub second: u64,
    pub used: u32,
    /// Lines not logged for the budget, since the program was loaded.
    pub suppressed: u32,
}
