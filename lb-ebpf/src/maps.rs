//! The maps the program shares with the agent. Sizes here are defaults; the
//! agent sets the connection table's size at load time.
use aya_ebpf::{
    bindings::bpf_fib_lookup as FibParams,
    macros::map,
    maps::{Array, HashMap, PerCpuArray},
};
use lb_common::{
    ActiveCounts, BackendHop, BackendOwner, BackendSet, BackendStats, Clock, Counters, Flow, FlowKey, HalfOpenCounts,
    NextHop, RingCursor, Service, ServiceKey, TraceBudget, TraceConfig,
    DEFAULT_MAX_FLOWS, MAX_BACKENDS, MAX_SERVICES,
};

#[map]
pub static SERVICES: HashMap<ServiceKey, Service> = HashMap::with_max_entries(MAX_SERVICES, 0);

/// Indexed by service id.
#[map]
pub static BACKENDS: Array<BackendSet> = Array::with_max_entries(MAX_SERVICES, 0);

/// Indexed by service id; written only here, with atomic adds.
#[map]
pub static ACTIVE: Array<ActiveCounts> = Array::with_max_entries(MAX_SERVICES, 0);

/// Each CPU's half-open connections per backend, of the flows it opened.
/// Pinned with `ACTIVE`: the two are the counts.
#[map]
pub static HALF_OPEN: PerCpuArray<HalfOpenCounts> = PerCpuArray::with_max_entries(MAX_SERVICES, 0);

/// Two entries per flow: the forward one, keyed as the client sends, and the
/// reply one, keyed as the backend answers. A nat flow to a backend only
/// its service sends to gets its reply entry at the backend's first answer.
#[map]
pub static FLOWS: HashMap<FlowKey, Flow> = HashMap::with_max_entries(2 * DEFAULT_MAX_FLOWS, 0);

/// Which service each nat backend answers for (keyed by the backend's
/// address and port); written here, at a backend's first SYN, and pinned
/// with the flows whose reply entries it lets the data path make later.
#[map]
pub static BACKEND_OWNERS: HashMap<ServiceKey, BackendOwner> =
    HashMap::with_max_entries(MAX_SERVICES * MAX_BACKENDS, 0);

#[map]
pub static COUNTERS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(1, 0);

/// Indexed by `service id * MAX_BACKENDS + slot`.
#[map]
pub static BACKEND_STATS: PerCpuArray<BackendStats> =
    PerCpuArray::with_max_entries(MAX_SERVICES * MAX_BACKENDS, 0);

/// Each CPU's ring of the flows it opened last (its own per-CPU value at
/// each index), and its cursors: a full table makes room from the oldest.
/// The agent sizes the ring at load (`Clock::opened_ring`).
#[map]
pub static OPENED: PerCpuArray<FlowKey> = PerCpuArray::with_max_entries(DEFAULT_MAX_FLOWS, 0);
#[map]
pub static OPENED_CURSOR: PerCpuArray<RingCursor> = PerCpuArray::with_max_entries(1, 0);

/// The layout fingerprint (`lb_common::LAYOUT_HASH`) of the build that
/// pinned these maps; only the agent reads and writes it.
#[map]
pub static LAYOUT: Array<u64> = Array::with_max_entries(1, 0);

/// Written by the agent when it loads the program.
#[map]
pub static CLOCK: Array<Clock> = Array::with_max_entries(1, 0);

/// The next hop to each backend, indexed like `BACKEND_STATS`: a flow's first
/// packets reuse it instead of a route lookup of their own. Shared, not per
/// CPU: read on every new flow, written about once a second.
#[map]
pub static BACKEND_HOPS: Array<BackendHop> = Array::with_max_entries(MAX_SERVICES * MAX_BACKENDS, 0);

/// Each CPU's room for a route lookup: its parameter block and the next hop
/// it found, which the packet path's stack has no room for. Not pinned:
/// nothing in it outlives the packet.
#[repr(C)]
pub struct RouteScratch {
    pub fib: FibParams,
    pub hop: NextHop,
}

#[map]
pub static ROUTE_SCRATCH: PerCpuArray<RouteScratch> = PerCpuArray::with_max_entries(1, 0);

/// What `lb trace` asks to be logged; written by the agent, not pinned.
#[map]
pub static TRACE: Array<TraceConfig> = Array::with_max_entries(1, 0);

/// Each CPU's use of the trace's budget of lines per second.
#[map]
pub static TRACE_BUDGET: PerCpuArray<TraceBudget> = PerCpuArray::with_max_entries(1, 0);

/// Each CPU's room for the two entries of a flow being opened, which the
/// packet path's stack has no room for. Not pinned.
#[repr(C)]
pub struct OpenScratch {
    pub forward: Flow,
    pub reply: Flow,
    /// The state of the entry the new flow takes over, as read once, and
    /// the new flow's state from it (its next generation; 0 in a new entry).
    pub taken: u32,
    pub generation: u32,
}

#[map]
pub static OPEN_SCRATCH: PerCpuArray<OpenScratch> = PerCpuArray::with_max_entries(1, 0);

/// Each CPU's search for room in a full table (`conntrack::make_room`): the
/// state of the search under way, which its `bpf_loop` turns share, and
/// where in another CPU's ring this CPU last took room from. Not pinned.
#[repr(C)]
pub struct RoomSearch {
    pub now: u64,
    /// Whose ring, where the search is, and how many entries it has to go.
    pub cpu: u32,
    pub at: u32,
    pub left: u32,
    /// Live flows passed so far.
    pub judged: u32,
    pub found: u32,
    pub victim: FlowKey,
    /// The CPU this one last took room from (none: `u32::MAX` or itself),
    /// and where it got to in that CPU's ring.
    pub steal_cpu: u32,
    pub steal_at: u32,
}

#[map]
pub static ROOM_SEARCH: PerCpuArray<RoomSearch> = PerCpuArray::with_max_entries(1, 0);

/// The TCP options each CPU read last (`parse::tcp_options`). Not pinned.
#[map]
pub static OPTIONS_FOUND: PerCpuArray<crate::parse::TcpOptions> = PerCpuArray::with_max_entries(1, 0);
