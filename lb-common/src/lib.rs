//! Map keys and values shared by the XDP program and the agent.
//!
//! Every type is `#[repr(C)]` with explicit padding so both sides agree on the
//! layout byte for byte. Addresses and ports are kept in network byte order,
//! as they appear on the wire, so the data path never swaps bytes.
#![no_std]

/// Services the data path can hold (VIP:port pairs).
pub const MAX_SERVICES: u32 = 256;
/// Backend slots per service. A power of two so a slot index can be masked.
pub const MAX_BACKENDS: u32 = 256;
/// Default connection-table capacity in flows; each flow uses two entries.
pub const DEFAULT_MAX_FLOWS: u32 = 262_144;
/// Flow keys the agent hands to the expire program in one call.
pub const EXPIRE_BATCH: usize = 64;

pub const PROTO_TCP: u8 = 6;

/// A virtual service: the VIP and port clients connect to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ServiceKey {
    pub addr: u32,
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// What the data path knows of a service: which row of `BACKENDS` and
/// `ACTIVE` is its own.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Service {
    pub id: u32,
    pub flags: u32,
}

/// The backend may be chosen for new flows. The agent clears it for backends
/// that are down, draining, disabled or removed; established flows are kept.
pub const BACKEND_ELIGIBLE: u8 = 1;

/// One backend slot of a service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    pub addr: u32,
    pub port: u16,
    pub flags: u8,
    /// 0 for primaries; backups have a higher tier and are chosen only when no
    /// backend of a lower tier can take the flow.
    pub tier: u8,
    /// Effective weight; 0 takes no new flows.
    pub weight: u32,
    /// Cap on active connections; 0 is no cap.
    pub max_conns: u32,
}

// How a service chooses among its candidates (`BackendSet::scheduler`):

/// Weighted least connections over every candidate (IPVS `wlc`, nginx `least_conn`).
pub const SCHEDULER_LEAST_CONN: u32 = 0;
/// Weighted least connections between two candidates picked at random (nginx
/// `random two least_conn`): a constant cost whatever the pool's size.
pub const SCHEDULER_RANDOM_TWO: u32 = 1;

/// The backend slots of one service. Written only by the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BackendSet {
    /// Slots in use are `0..len`; slots within may be ineligible.
    pub len: u32,
    /// Entries of `candidates` in use.
    pub candidate_count: u32,
    /// The first this many candidates are of the lowest tier present.
    pub lowest_tier_count: u32,
    /// `SCHEDULER_*`.
    pub scheduler: u32,
    pub slots: [Backend; MAX_BACKENDS as usize],
    /// The eligible slots, packed and sorted by tier, with what choosing
    /// among them needs: the data path's scan reads only these. Built from
    /// `slots` by `index_candidates`.
    pub candidates: [Candidate; MAX_BACKENDS as usize],
    /// Indexes of lowest-tier candidates, each in as many entries as its
    /// share of the tier's weight: `random_two_least_conn` picks a backend
    /// in proportion to its weight with one random entry.
    pub pick_table: [u8; PICK_TABLE],
}

/// Entries of `BackendSet::pick_table`: a weight's share is followed to
/// within half an entry, 0.05 % of the picks.
pub const PICK_TABLE: usize = 1024;

impl Default for BackendSet {
    fn default() -> Self {
        Self {
            len: 0,
            candidate_count: 0,
            lowest_tier_count: 0,
            scheduler: SCHEDULER_LEAST_CONN,
            slots: [Backend::default(); MAX_BACKENDS as usize],
            candidates: [Candidate::default(); MAX_BACKENDS as usize],
            pick_table: [0; PICK_TABLE],
        }
    }
}

impl BackendSet {
    /// Rebuilds `candidates` from `slots` (every eligible slot with a weight,
    /// lowest tier first) and the lowest tier's `pick_table`.
    pub fn index_candidates(&mut self) {
        let mut count = 0;
        for (slot, b) in self.slots.iter().enumerate().take(self.len.min(MAX_BACKENDS) as usize) {
            if b.flags & BACKEND_ELIGIBLE == 0 || b.weight == 0 {
                continue;
            }
            self.candidates[count] = Candidate {
                per_connection: WEIGHT_SCALE / b.weight,
                cap: if b.max_conns == 0 { u32::MAX } else { b.max_conns },
                slot: slot as u16,
                // The scheduler's sort key has two bits for it.
                tier: b.tier.min(3),
                _pad: 0,
            };
            count += 1;
        }
        let candidates = &mut self.candidates[..count];
        candidates.sort_unstable_by_key(|c| (c.tier, c.slot));
        let lowest = candidates.first().map(|c| c.tier);
        self.lowest_tier_count = candidates.iter().take_while(|c| Some(c.tier) == lowest).count() as u32;
        // The pick table: entry j is the lowest-tier candidate whose share
        // of the tier's total weight covers the point (j + ½) / PICK_TABLE.
        let weights: [u64; MAX_BACKENDS as usize] = core::array::from_fn(|i| {
            let slot = self.candidates[i].slot as usize;
            if i < self.lowest_tier_count as usize { self.slots[slot].weight as u64 } else { 0 }
        });
        let total: u64 = weights.iter().sum();
        let (mut candidate, mut covered) = (0usize, weights[0]);
        for (j, entry) in self.pick_table.iter_mut().enumerate() {
            let point = (2 * j as u64 + 1) * total / (2 * PICK_TABLE as u64);
            while covered <= point && candidate + 1 < self.lowest_tier_count as usize {
                candidate += 1;
                covered += weights[candidate];
            }
            *entry = candidate as u8;
        }
        self.candidate_count = count as u32;
        self.candidates[count..].fill(Candidate::default());
    }
}

/// `Candidate::per_connection` is this divided by the weight, so that
/// "fewest connections per unit of weight" compares products, not quotients.
/// Exact to within 0.1 % for weights up to 1,000.
pub const WEIGHT_SCALE: u32 = 1 << 20;

/// An eligible backend slot as the scheduler sees it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Candidate {
    /// The load one active connection puts on this backend: `WEIGHT_SCALE / weight`.
    pub per_connection: u32,
    /// Takes no new flow at this many active connections (`u32::MAX`: no cap).
    pub cap: u32,
    pub slot: u16,
    pub tier: u8,
    pub _pad: u8,
}

/// Active connections per backend slot of one service. Only the data path
/// writes it, with atomic adds: one up when a flow is assigned, one down when
/// the flow leaves the live state (closed, reset or expired).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ActiveCounts {
    pub active: [u64; MAX_BACKENDS as usize],
}

impl Default for ActiveCounts {
    fn default() -> Self {
        Self { active: [0; MAX_BACKENDS as usize] }
    }
}

/// A TCP flow as seen in one direction on the wire.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
}

/// Client to VIP: the destination is rewritten to the backend.
pub const DIR_FORWARD: u8 = 0;
/// Backend to client: the source is rewritten to the VIP.
pub const DIR_REPLY: u8 = 1;

/// Flow state bits, kept in the forward entry and changed only atomically.
pub const FLOW_CLIENT_FIN: u32 = 1;
pub const FLOW_BACKEND_FIN: u32 = 2;
pub const FLOW_RESET: u32 = 4;
/// Set by the expire program just before it deletes the flow; nothing else
/// touches an expired entry.
pub const FLOW_EXPIRED: u32 = 8;
const FLOW_BOTH_FIN: u32 = FLOW_CLIENT_FIN | FLOW_BACKEND_FIN;
/// The high bits count reuses of the entry, so a compare-and-swap never
/// mistakes a reused entry for the one it read.
pub const FLOW_GENERATION_ONE: u32 = 1 << 8;

/// A flow no longer holds a connection slot on its backend.
#[inline(always)]
pub const fn flow_closed(state: u32) -> bool {
    state & (FLOW_RESET | FLOW_EXPIRED) != 0 || state & FLOW_BOTH_FIN == FLOW_BOTH_FIN
}

/// One direction of a tracked flow. Each flow has two entries in the table,
/// so that a packet of either direction is found with one lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Flow {
    /// `FLOW_*` bits and generation; meaningful in the forward entry only.
    pub state: u32,
    pub service: u16,
    pub slot: u16,
    /// Forward: the backend address; reply: the VIP.
    pub nat_addr: u32,
    pub nat_port: u16,
    pub direction: u8,
    pub _pad: u8,
    /// One's-complement differences the rewrite adds to each checksum,
    /// computed once when the flow is created.
    pub ip_csum_diff: u16,
    pub l4_csum_diff: u16,
    pub _pad2: u32,
    /// When the last packet in this direction came (`Clock` ticks); 0 in a
    /// reply entry until the backend has answered.
    pub last_seen: u64,
    /// Where this direction's packets go; reused for `Clock::hop_ttl`, so
    /// most packets skip the route lookup.
    pub hop: NextHop,
}

/// A next hop from a successful route lookup (`ifindex` 0: none yet): the
/// egress interface, the destination and source MAC addresses, and when it
/// was looked up (`Clock` ticks).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NextHop {
    pub ifindex: u32,
    pub macs: [u8; 12],
    pub at: u64,
}

/// The data path's clock is the kernel's jiffies counter (`bpf_jiffies64`),
/// which ticks HZ times a second (100 to 1000, fixed when the kernel is
/// built): reading it costs a fraction of a nanosecond-clock read, and a
/// flow's times need no finer grain. The agent measures HZ when it loads the
/// program and writes this for it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Clock {
    pub ticks_per_second: u64,
    /// How long a flow's cached next hop is used before the route is looked
    /// up again (1 s): route and neighbour changes take effect within it.
    pub hop_ttl: u64,
    /// A flow's `last_seen` is refreshed at most this often (0.25 s), to
    /// keep its cache line clean on most packets.
    pub touch_every: u64,
}

impl Clock {
    pub fn new(ticks_per_second: u64) -> Self {
        Self { ticks_per_second, hop_ttl: ticks_per_second, touch_every: (ticks_per_second / 4).max(1) }
    }

    /// Nanoseconds to ticks, rounded up so a timeout is never shortened.
    pub fn ticks(&self, ns: u64) -> u64 {
        (ns as u128 * self.ticks_per_second as u128).div_ceil(1_000_000_000).min(u64::MAX as u128) as u64
    }

    pub fn seconds(&self, ticks: u64) -> f64 {
        ticks as f64 / self.ticks_per_second.max(1) as f64
    }

    /// `timeouts` (nanoseconds) in ticks.
    pub fn timeouts(&self, timeouts: &Timeouts) -> Timeouts {
        Timeouts {
            syn: self.ticks(timeouts.syn),
            established: self.ticks(timeouts.established),
            fin: self.ticks(timeouts.fin),
            closed: self.ticks(timeouts.closed),
        }
    }
}

/// Traffic per backend slot, per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct BackendStats {
    pub fwd_packets: u64,
    pub fwd_bytes: u64,
    pub reply_packets: u64,
    pub reply_bytes: u64,
    /// Flows assigned to this backend since the slot was last cleared.
    pub new_flows: u64,
    /// Passive health: handshakes the backend answered with RST.
    pub refused: u64,
    /// Passive health: SYNs the client had to retransmit, unanswered.
    pub unanswered: u64,
}

impl BackendStats {
    /// Field by field: for summing per-CPU values.
    pub fn add(self, other: &Self) -> Self {
        Self {
            fwd_packets: self.fwd_packets + other.fwd_packets,
            fwd_bytes: self.fwd_bytes + other.fwd_bytes,
            reply_packets: self.reply_packets + other.reply_packets,
            reply_bytes: self.reply_bytes + other.reply_bytes,
            new_flows: self.new_flows + other.new_flows,
            refused: self.refused + other.refused,
            unanswered: self.unanswered + other.unanswered,
        }
    }
}

/// Program-wide counters, per CPU. Indexes into `Counters::values`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    Packets = 0,
    VerdictPass,
    VerdictRedirect,
    VerdictDrop,
    NewFlows,
    ClosedFlows,
    /// SYN to a service whose backends cannot take a new flow.
    NoBackend,
    /// A retransmitted, unanswered SYN moved to another backend.
    SynRetried,
    /// A backend refused a handshake with RST; dropped so that the client's
    /// retransmitted SYN goes to another backend.
    RefusalSwallowed,
    /// A client packet of a reset flow answered with an RST.
    ResetSent,
    /// The connection table was full; the SYN was dropped (the client retries).
    TableFull,
    /// Forwarded to the kernel because the next hop's MAC is not known yet.
    NoNeighbour,
    /// The route lookup failed for another reason; the kernel decides.
    FibFailed,
    MalformedIp,
    MalformedTcp,
    /// IPv4 fragments are never rewritten: the kernel decides.
    Fragment,
}

pub const COUNTER_COUNT: usize = 16;

pub const COUNTER_NAMES: [&str; COUNTER_COUNT] = [
    "packets",
    "verdict_pass",
    "verdict_redirect",
    "verdict_drop",
    "new_flows",
    "closed_flows",
    "no_backend",
    "syn_retried",
    "refusal_swallowed",
    "reset_sent",
    "table_full",
    "no_neighbour",
    "fib_failed",
    "malformed_ip",
    "malformed_tcp",
    "fragment",
];

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Counters {
    pub values: [u64; COUNTER_COUNT],
}

impl Default for Counters {
    fn default() -> Self {
        Self { values: [0; COUNTER_COUNT] }
    }
}

/// Idle timeouts by flow state: in nanoseconds in the agent, in `Clock`
/// ticks on the way to the data path (`Clock::timeouts`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Timeouts {
    /// No answer from the backend yet.
    pub syn: u64,
    pub established: u64,
    /// One side has sent FIN.
    pub fin: u64,
    /// Closed; kept briefly so trailing ACKs and retransmitted FINs are still
    /// rewritten.
    pub closed: u64,
}

/// Which timeout applies to a flow, from its forward state and whether the
/// backend has answered. Shared so the agent's scan and the expire program
/// agree on what is idle.
#[inline(always)]
pub const fn flow_timeout(t: &Timeouts, state: u32, replied: bool) -> u64 {
    if flow_closed(state) {
        t.closed
    } else if state & FLOW_BOTH_FIN != 0 {
        t.fin
    } else if !replied {
        t.syn
    } else {
        t.established
    }
}

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
    pod!(ServiceKey, Service, Backend, BackendSet, ActiveCounts, FlowKey, Flow, BackendStats, Counters, Timeouts, ExpireRequest, Clock, NextHop);
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
        assert_eq!(size_of::<Flow>(), 56);
        assert_eq!(size_of::<NextHop>(), 24);
        assert_eq!(size_of::<Timeouts>(), 32);
        assert_eq!(size_of::<ExpireRequest>(), 16 + 32 + 16 + 16 + 12 * EXPIRE_BATCH);
        assert_eq!(size_of::<Clock>(), 24);
        assert_eq!(COUNTER_NAMES.len(), Counter::Fragment as usize + 1);
    }

    #[test]
    fn closed_when_reset_expired_or_both_fins() {
        assert!(!flow_closed(0));
        assert!(!flow_closed(FLOW_CLIENT_FIN));
        assert!(!flow_closed(FLOW_BACKEND_FIN | 5 * FLOW_GENERATION_ONE));
        assert!(flow_closed(FLOW_CLIENT_FIN | FLOW_BACKEND_FIN));
        assert!(flow_closed(FLOW_RESET));
        assert!(flow_closed(FLOW_EXPIRED));
    }

    #[test]
    fn candidates_are_the_eligible_slots_lowest_tier_first() {
        let mut set = BackendSet { len: 5, ..Default::default() };
        let backend = |tier, weight, eligible: bool, max_conns| Backend {
            addr: 1,
            port: 1,
            flags: if eligible { BACKEND_ELIGIBLE } else { 0 },
            tier,
            weight,
            max_conns,
        };
        set.slots[0] = backend(1, 1, true, 0);
        set.slots[1] = backend(0, 4, true, 7);
        set.slots[2] = backend(0, 1, false, 0);
        set.slots[3] = backend(0, 0, true, 0);
        set.slots[4] = backend(0, 1, true, 0);
        set.index_candidates();
        let slots: [u16; 3] = core::array::from_fn(|i| set.candidates[i].slot);
        assert_eq!((set.candidate_count, set.lowest_tier_count, slots), (3, 2, [1, 4, 0]));
        assert_eq!(set.candidates[0].per_connection, WEIGHT_SCALE / 4);
        // Weights 4 and 1 in the lowest tier: 4/5 and 1/5 of the pick table.
        let first = set.pick_table.iter().filter(|&&c| c == 0).count();
        let second = set.pick_table.iter().filter(|&&c| c == 1).count();
        assert_eq!((first, second), (819, 205));
        assert_eq!((set.candidates[0].cap, set.candidates[1].cap), (7, u32::MAX));
        // Only backups left: they are the lowest tier present.
        set.slots[1].flags = 0;
        set.slots[4].flags = 0;
        set.index_candidates();
        assert_eq!((set.candidate_count, set.lowest_tier_count, set.candidates[0].slot), (1, 1, 0));
        assert_eq!(set.candidates[1], Candidate::default());
    }
}
