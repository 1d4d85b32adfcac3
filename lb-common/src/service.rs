//! Services (VIP:port) and their backend slots, as the agent writes them and
//! the scheduler reads them.

/// Services the data path can hold (VIP:port pairs).
pub const MAX_SERVICES: u32 = 256;
/// Backend slots per service. A power of two so a slot index can be masked.
pub const MAX_BACKENDS: u32 = 256;

pub const PROTO_TCP: u8 = 6;

/// The index of a backend slot in the per-backend maps (`BACKEND_STATS`,
/// `BACKEND_HOPS`): the service's row, then the slot, masked so that the
/// verifier sees it in bounds.
#[inline(always)]
pub const fn backend_index(service: u32, slot: u32) -> u32 {
    service * MAX_BACKENDS + (slot & (MAX_BACKENDS - 1))
}

/// A virtual service: the VIP and port clients connect to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ServiceKey {
    pub addr: u32,
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// The one service a backend (keyed by its address and port, as a
/// `ServiceKey`) is known to serve nat flows for, written by the data path
/// at the first SYN it sends there. A nat flow to a backend that no other
/// service sends flows to gets its reply entry when the backend first
/// answers, not at its SYN: the backend's address alone then names the
/// flow's service (`vip`, `port`). A backend that two services send to is
/// `shared`, for good, and their new flows get both entries at once.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendOwner {
    pub vip: u32,
    pub port: u16,
    pub shared: u8,
    pub _pad: u8,
}

/// What the data path knows of a service: which row of `BACKENDS` and
/// `ACTIVE` is its own, and in full NAT the balancer's side of each flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Service {
    pub id: u32,
    /// `SERVICE_*`.
    pub flags: u32,
    /// Full NAT: the addresses backends see flows come from (network byte
    /// order), the first `snat_count`; none: each backend's own
    /// (`Backend::snat_addr`).
    pub snat_addrs: [u32; MAX_SNAT_ADDRS],
    pub snat_count: u32,
    /// Full NAT: the source ports, `port_first..=port_last` (host order).
    pub port_first: u16,
    pub port_last: u16,
}

/// The service rewrites both ends (`MODE_FULLNAT` flows).
pub const SERVICE_FULLNAT: u32 = 1;
/// Direct server return (`MODE_DSR` flows).
pub const SERVICE_DSR: u32 = 2;
/// With `SERVICE_DSR`: through an IPIP tunnel (`MODE_DSR_IPIP` flows).
pub const SERVICE_IPIP: u32 = 4;
/// Source addresses a full-NAT service may have.
pub const MAX_SNAT_ADDRS: usize = 4;

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
    /// Full NAT without configured source addresses, and DSR over IPIP (the
    /// tunnel's outer source): the address this host reaches the backend
    /// from (network byte order); 0 otherwise.
    pub snat_addr: u32,
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
            if i < self.lowest_tier_count as usize {
                self.slots[slot].weight as u64
            } else {
                0
            }
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

/// Connections per backend slot of one service, established ones in the low
/// half of each word and half-open ones in the high half (`HALF_OPEN_ONE`).
/// In the `ACTIVE` map the data path keeps only the established ones, with
/// atomic adds: one up when a flow's handshake completes, one down when an
/// established flow leaves the live state (closed, reset or expired). The
/// half-open ones are per CPU (`HalfOpenCounts`); the agent reads the two
/// together in this form.
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

/// Half-open connections per backend slot of one service that one CPU
/// opened (the per-CPU map `HALF_OPEN`). A SYN counts its flow on its own
/// CPU's line, not on a line every CPU writes; whichever CPU completes or
/// ends the handshake takes it off the opener's count (`Flow::opened_on`),
/// so no CPU's count goes below zero. The scheduler weighs its own CPU's;
/// the agent's counts are the sum over CPUs.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct HalfOpenCounts {
    pub count: [u32; MAX_BACKENDS as usize],
}

impl Default for HalfOpenCounts {
    fn default() -> Self {
        Self { count: [0; MAX_BACKENDS as usize] }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            snat_addr: 0,
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
