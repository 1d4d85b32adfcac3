//! Statistics: per-backend traffic and the program-wide counters, both per
//! CPU so the packet path shares no cache line.

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

/// Defines `Counter` with each counter's name written once, next to it:
/// the metrics, the status and the tests all take names from here.
macro_rules! counters {
    ($($(#[$doc:meta])* $variant:ident = $name:literal,)*) => {
        /// Program-wide counters, per CPU. Indexes into `Counters::values`.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Counter {
            $($(#[$doc])* $variant,)*
        }

        impl Counter {
            /// Every counter, in index order.
            pub const ALL: [Counter; COUNTER_COUNT] = [$(Counter::$variant,)*];

            /// The name it has in the status, the metrics and the docs.
            pub const fn name(self) -> &'static str {
                match self {
                    $(Counter::$variant => $name,)*
                }
            }
        }

        pub const COUNTER_COUNT: usize = [$($name,)*].len();
    };
}

counters! {
    Packets = "packets",
    VerdictPass = "verdict_pass",
    VerdictRedirect = "verdict_redirect",
    VerdictDrop = "verdict_drop",
    NewFlows = "new_flows",
    ClosedFlows = "closed_flows",
    /// SYN to a service whose backends cannot take a new flow.
    NoBackend = "no_backend",
    /// A retransmitted, unanswered SYN moved to another backend.
    SynRetried = "syn_retried",
    /// A backend refused a handshake with RST; dropped so that the client's
    /// retransmitted SYN goes to another backend.
    RefusalSwallowed = "refusal_swallowed",
    /// A client packet of a reset flow answered with an RST.
    ResetSent = "reset_sent",
    /// The connection table was full; the SYN was dropped (the client retries).
    TableFull = "table_full",
    /// Forwarded to the kernel because the next hop's MAC is not known yet.
    NoNeighbour = "no_neighbour",
    /// The route lookup failed for another reason; the kernel decides.
    FibFailed = "fib_failed",
    MalformedIp = "malformed_ip",
    MalformedTcp = "malformed_tcp",
    /// IPv4 fragments are never rewritten: the kernel decides.
    Fragment = "fragment",
    /// Handshakes completed: the client acknowledged the backend's SYN-ACK.
    Established = "established_flows",
    /// RSTs whose sequence number is outside the receiver's window: dropped.
    RstOutOfWindow = "rst_out_of_window",
    /// RSTs in the window but not exact: forwarded (the endpoint answers
    /// with a challenge ACK), the flow left as it was.
    RstInWindow = "rst_in_window",
    /// FINs outside the receiver's window: dropped.
    FinOutOfWindow = "fin_out_of_window",
    /// Segments that do not fit the flow's handshake (a stray segment of an
    /// earlier connection on the same ports, a forged answer): dropped.
    OutOfState = "out_of_state",
    /// A SYN whose backend-side ports are in use by another service's live
    /// flow (two services sharing a backend): dropped, the client retries.
    TupleInUse = "tuple_in_use",
    /// A SYN found the table full and a dead flow made room for it.
    Evicted = "evicted_for_room",
    /// A packet of a flow too big for its next hop, with DF set: its sender
    /// got ICMP fragmentation needed, about the packet as it sent it.
    IcmpFragNeededSent = "icmp_frag_needed_sent",
    /// A packet of a flow with TTL 1 or 0: its sender got ICMP time
    /// exceeded instead of a forwarded TTL 0.
    IcmpTimeExceededSent = "icmp_time_exceeded_sent",
    /// ICMP errors about a tracked flow (unreachable, fragmentation needed,
    /// time exceeded), translated and sent on to the flow's other side (in
    /// DSR, about a backend's reply: sent on to that backend as they came).
    IcmpTranslated = "icmp_translated",
    /// A packet of a flow too big for its next hop, without DF: the kernel
    /// fragments it.
    TooBigToKernel = "too_big_to_kernel",
    /// Packets of a flow that could not be answered with ICMP (IP options),
    /// or ICMP errors whose TTL ran out here: dropped.
    IcmpNotSent = "icmp_not_sent",
    /// A full-NAT SYN found no free source port towards its backend (every
    /// port it tried holds a live or recently closed flow): dropped, the
    /// client retries.
    SnatPortsExhausted = "snat_ports_exhausted",
    /// A DSR packet the balancer cannot send on: its backend's MAC is not
    /// resolved yet (the agent keeps on-link backends resolved), or it is
    /// too big for the tunnel and has no DF. Dropped, since the kernel would
    /// deliver it to the VIP here; the client retransmits.
    DsrUnroutable = "dsr_unroutable",
}

impl Counter {
    /// Why packets were dropped: the metrics' `lb_drops` reasons.
    pub const DROPS: [Counter; 11] = [
        Counter::MalformedIp,
        Counter::MalformedTcp,
        Counter::NoBackend,
        Counter::TableFull,
        Counter::RefusalSwallowed,
        Counter::RstOutOfWindow,
        Counter::FinOutOfWindow,
        Counter::OutOfState,
        Counter::TupleInUse,
        Counter::SnatPortsExhausted,
        Counter::DsrUnroutable,
    ];
    /// Other events of the data path: the metrics' `lb_events`.
    pub const EVENTS: [Counter; 15] = [
        Counter::NewFlows,
        Counter::Evicted,
        Counter::Established,
        Counter::RstInWindow,
        Counter::ClosedFlows,
        Counter::SynRetried,
        Counter::ResetSent,
        Counter::NoNeighbour,
        Counter::FibFailed,
        Counter::Fragment,
        Counter::IcmpFragNeededSent,
        Counter::IcmpTimeExceededSent,
        Counter::IcmpTranslated,
        Counter::TooBigToKernel,
        Counter::IcmpNotSent,
    ];
}

/// What a backend's decapsulation program (`lb decap`) did, per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DecapStats {
    /// IPIP packets to one of its VIPs, handed on as the inner packet.
    pub decapsulated: u64,
    /// IPIP packets it left alone: to another address, with outer options,
    /// or fragmented.
    pub passed: u64,
}

/// The VIPs one decapsulation program serves, at most.
pub const MAX_DECAP_VIPS: u32 = 256;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_indexed_in_order_and_named_once() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
        }
        assert_eq!(Counter::DsrUnroutable as usize + 1, COUNTER_COUNT);
        assert_eq!(Counter::TableFull.name(), "table_full");
    }
}
