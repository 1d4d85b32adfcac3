//! The data path's clock, and how the agent converts to and from it.
use crate::Timeouts;

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
    /// When a SYN finds the table full, a flow idle this long in its state
    /// makes room for it (`Clock` ticks): closed flows at once, half-open
    /// ones after `EVICT_HALF_OPEN_NS`, others after their timeouts. So the
    /// table never stays full of dead flows, with the agent or without it.
    pub evict: Timeouts,
    /// Entries of each CPU's ring of recently opened flows (`OPENED`): the
    /// candidates a full table evicts first, oldest first.
    pub opened_ring: u32,
    /// CPUs that may run the program (the per-CPU maps' count): a CPU whose
    /// own ring has no victim looks at another's.
    pub cpus: u32,
}

/// How long a half-open flow must have been idle before a SYN that finds the
/// table full may take its place: longer than a handshake takes, shorter
/// than a client's first SYN retransmission.
pub const EVICT_HALF_OPEN_NS: u64 = 1_000_000_000;

impl Clock {
    /// A clock ticking `ticks_per_second`, evicting by `timeouts` (ns).
    pub fn new(ticks_per_second: u64, timeouts: &Timeouts) -> Self {
        let mut clock = Self {
            ticks_per_second,
            hop_ttl: ticks_per_second,
            touch_every: (ticks_per_second / 4).max(1),
            evict: Timeouts::default(),
            opened_ring: 0,
            cpus: 0,
        };
        let evict = Timeouts { syn: timeouts.syn.min(EVICT_HALF_OPEN_NS), closed: 0, ..*timeouts };
        clock.evict = clock.timeouts(&evict);
        clock
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

