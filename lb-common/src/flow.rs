//! Flows: the connection table's keys and entries, their state bits and
//! idle timeouts, and the next hop each caches.

/// Default connection-table capacity in flows; each flow uses two entries.
pub const DEFAULT_MAX_FLOWS: u32 = 262_144;

// TCP header flags.
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

/// A TCP flow as seen in one direction on the wire.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
}

impl FlowKey {
    /// The key of the reply entry of the forward flow `self` → `forward`:
    /// the backend (`forward.nat_*`) answering whom it sees as its client
    /// (`forward.peer_*`: the client itself, or in full NAT the balancer's
    /// address and port).
    #[inline(always)]
    pub const fn reply(&self, forward: &Flow) -> FlowKey {
        FlowKey { saddr: forward.nat_addr, daddr: forward.peer_addr, sport: forward.nat_port, dport: forward.peer_port }
    }

    /// The key of the forward entry of the reply flow `self` → `reply`: the
    /// client (`self`'s destination) sending to the VIP (`reply.nat_*`).
    #[inline(always)]
    pub const fn forward(&self, reply: &Flow) -> FlowKey {
        FlowKey { saddr: reply.peer_addr, daddr: reply.nat_addr, sport: reply.peer_port, dport: reply.nat_port }
    }
}

/// The backend sees the client's own address (it routes replies through the
/// balancer).
pub const MODE_NAT: u8 = 0;
/// The backend sees the balancer's address and a port of its own for each
/// flow, so it needs no route to the clients.
pub const MODE_FULLNAT: u8 = 1;
/// Direct server return on the balancer's own segment: only the destination
/// MAC changes; the backend holds the VIP and answers the client directly,
/// so the balancer sees the client's side of the flow only.
pub const MODE_DSR: u8 = 2;
/// Direct server return through an IPIP tunnel: the client's packet, as it
/// came, inside an outer header from the balancer (`Flow::peer_addr`) to the
/// backend (`Flow::nat_addr`), which decapsulates it.
pub const MODE_DSR_IPIP: u8 = 3;

/// The balancer never sees the backend's side of the flow.
#[inline(always)]
pub const fn mode_is_dsr(mode: u8) -> bool {
    mode == MODE_DSR || mode == MODE_DSR_IPIP
}

/// Client to VIP: the destination is rewritten to the backend.
pub const DIR_FORWARD: u8 = 0;
/// Backend to client: the source is rewritten to the VIP.
pub const DIR_REPLY: u8 = 1;
/// A full-NAT flow's old reply entry, kept after the client reused the
/// flow's 5-tuple for a new connection (which took a port of its own): the
/// backend may hold the old connection in TIME_WAIT for a minute, and a new
/// flow handed this port would have its SYN answered for the old one. Nothing
/// is forwarded on it. It keeps the old client's `seq_next` and `ts_recent`:
/// a new flow may take the port over with a SYN that TIME_WAIT accepts
/// (`time_wait_accepts`); otherwise the agent removes it once the full-NAT
/// hold of a closed flow (`flow_timeout`) has passed since `last_seen`.
pub const DIR_HOLD: u8 = 2;

/// Flow state bits, kept in the forward entry and changed only atomically.
/// A flow is half-open from the client's SYN until `FLOW_ESTABLISHED`; it is
/// closed by an exact RST, FINs both ways, the agent, or aging.
/// In a reply entry or a hold, the generation alone: whoever takes the entry
/// over or removes it moves it by compare-and-swap.
pub const FLOW_CLIENT_FIN: u32 = 1;
pub const FLOW_BACKEND_FIN: u32 = 2;
/// An RST whose sequence number was exactly what its receiver expected.
pub const FLOW_RESET: u32 = 4;
/// Set by the expire program just before it deletes the flow; nothing else
/// touches an expired entry. A SYN that takes a forward entry over holds it
/// too, for the moment it rewrites the entry's fields.
pub const FLOW_EXPIRED: u32 = 8;
/// The client acknowledged the backend's SYN-ACK: the handshake is complete.
pub const FLOW_ESTABLISHED: u32 = 16;
/// Closed by the agent (its backend died, policy `reset`): the client's next
/// packets are answered with an RST from the VIP.
pub const FLOW_ABORTED: u32 = 32;
/// The backend answered the client's SYN with a SYN-ACK acknowledging it
/// (nat and full NAT); the forward entry's `acked` then holds what the
/// client's ACK must acknowledge to complete the handshake. The client's
/// ACK is judged on the forward entry alone, not its reply entry too.
pub const FLOW_ANSWERED: u32 = 64;
const FLOW_BOTH_FIN: u32 = FLOW_CLIENT_FIN | FLOW_BACKEND_FIN;
/// The high bits count reuses of the entry, so a compare-and-swap never
/// mistakes a reused entry for the one it read.
pub const FLOW_GENERATION_ONE: u32 = 1 << 8;

/// The generation in a forward entry's `state`, as a reply entry keeps it
/// (`Flow::forward_generation`): its low 16 bits, far more reuses than an
/// entry sees while one packet is judged.
#[inline(always)]
pub const fn flow_generation(state: u32) -> u16 {
    (state / FLOW_GENERATION_ONE) as u16
}

/// A flow no longer holds a connection slot on its backend.
#[inline(always)]
pub const fn flow_closed(state: u32) -> bool {
    state & (FLOW_RESET | FLOW_EXPIRED | FLOW_ABORTED) != 0 || state & FLOW_BOTH_FIN == FLOW_BOTH_FIN
}

/// A slot's connection count (`ActiveCounts::active`) holds two counts in
/// one word, so that a flow moves from one to the other with one atomic
/// add: established connections in the low half, half-open ones in the
/// high half.
pub const HALF_OPEN_ONE: u64 = 1 << 32;

/// Established connections in a slot's count.
#[inline(always)]
pub const fn established_count(count: u64) -> u64 {
    count & (HALF_OPEN_ONE - 1)
}

/// Half-open connections in a slot's count.
#[inline(always)]
pub const fn half_open_count(count: u64) -> u64 {
    count >> 32
}

/// Sequence numbers compare modulo 2^32: `a` is after `b`.
#[inline(always)]
pub const fn seq_after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// One direction of a tracked flow. Each flow has two entries in the table,
/// so that a packet of either direction is found with one lookup; a DSR
/// flow, whose replies never pass the balancer, has its forward one only.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Flow {
    /// `FLOW_*` bits and generation; meaningful in the forward entry only.
    pub state: u32,
    pub service: u16,
    pub slot: u16,
    /// Forward: the backend, the new destination; reply: the VIP, the new
    /// source.
    pub nat_addr: u32,
    pub nat_port: u16,
    pub direction: u8,
    /// The window scale this direction's sender announced in its SYN.
    pub wscale: u8,
    /// One's-complement differences the rewrite adds to each checksum,
    /// computed once when the flow is created.
    pub ip_csum_diff: u16,
    pub l4_csum_diff: u16,
    /// The other end the rewrite sets. Forward: the source the backend sees
    /// (the client itself in nat mode; the balancer's address and port in
    /// full NAT); reply: the client, the destination.
    pub peer_addr: u32,
    pub peer_port: u16,
    /// `MODE_*`, set when the flow opens.
    pub mode: u8,
    /// 1 when `ts_recent` holds a timestamp this direction's sender sent.
    pub ts_seen: u8,
    /// What this direction's sender has sent, acknowledged and offered, as
    /// seen here: its next sequence number (SND.NXT), the last number it
    /// acknowledged (its RCV.NXT), and the largest receive window it offered,
    /// scaled. RSTs and
    /// FINs from the other side are judged against them.
    pub seq_next: u32,
    pub acked: u32,
    pub window: u32,
    /// When the last packet in this direction came (`Clock` ticks); 0 in a
    /// reply entry until the backend has answered.
    pub last_seen: u64,
    /// Where this direction's packets go; reused for `Clock::hop_ttl`, so
    /// most packets skip the route lookup.
    pub hop: NextHop,
    /// The timestamp (RFC 7323 TSval) on the last of this direction's
    /// closing segments, as the other end's TIME_WAIT remembers it: a full-NAT
    /// port may go to a new flow whose SYN that TIME_WAIT will accept
    /// (`time_wait_accepts`). Forward entries and holds only.
    pub ts_recent: u32,
    /// The CPU whose `HalfOpenCounts` count this flow while its handshake
    /// is under way: the one that opened it. Forward entries only.
    pub opened_on: u16,
    /// Reply entries: the generation of the forward entry they were
    /// written for (`flow_generation`). A CPU may still hold an old
    /// connection's reply entry after a new connection took the 5-tuple
    /// over; its segments are then never judged as the new one's.
    pub forward_generation: u16,
}

/// Whether an endpoint in TIME_WAIT accepts a new connection's SYN on the
/// same 4-tuple (RFC 6191, as Linux and the BSDs do it): by timestamps when
/// both the old connection's last segment and the SYN carry one (a newer
/// one is accepted, an older one refused, an equal one decided by sequence
/// numbers), otherwise by sequence numbers (the SYN's beyond what the old
/// connection sent). `old_seq_next` and `old_ts` are what the old
/// connection's sender sent last; `syn_ts` is `None` for a SYN without the
/// option.
pub const fn time_wait_accepts(old_seq_next: u32, old_ts: Option<u32>, syn_seq: u32, syn_ts: Option<u32>) -> bool {
    match (old_ts, syn_ts) {
        (Some(old), Some(new)) if new != old => seq_after(new, old),
        _ => seq_after(syn_seq, old_seq_next),
    }
}

/// Where a CPU's ring of recently opened flows is written next, and where
/// the search for room reads next (the oldest entry it has not passed).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingCursor {
    pub write: u32,
    pub evict: u32,
    /// Entries written and not passed by the search yet (at most the ring's
    /// length: a writer that laps the search takes it along).
    pub pending: u32,
    pub _pad: u32,
}

/// A next hop from a successful route lookup (`ifindex` 0: none yet): the
/// egress interface, the destination and source MAC addresses, when it was
/// looked up (`Clock` ticks, the low 32 bits: only their difference from now
/// is read), and the route's MTU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NextHop {
    pub ifindex: u32,
    pub macs: [u8; 12],
    pub at: u32,
    pub mtu: u16,
    pub _pad: u16,
}

/// A backend's next hop, with the backend's address: a slot may have
/// changed backends since (its old flows' trailing packets must not take the
/// new one's hop).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendHop {
    pub addr: u32,
    pub _pad: u32,
    pub hop: NextHop,
}

/// Idle timeouts by flow state: in nanoseconds in the agent, in `Clock`
/// ticks on the way to the data path (`Clock::timeouts`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Timeouts {
    /// Half-open: the handshake is not complete.
    pub syn: u64,
    pub established: u64,
    /// One side has sent FIN.
    pub fin: u64,
    /// Closed; kept briefly so trailing ACKs and retransmitted FINs are still
    /// rewritten.
    pub closed: u64,
}

/// When a flow was last active, from its forward entry's state and both
/// entries' `last_seen`: a half-open flow counts only the client's packets,
/// since a backend retransmitting its SYN-ACK to a spoofed source proves
/// nothing about the client; once established, both directions count.
#[inline(always)]
pub const fn flow_last_active(state: u32, client_seen: u64, backend_seen: u64) -> u64 {
    if state & FLOW_ESTABLISHED != 0 && backend_seen > client_seen {
        backend_seen
    } else {
        client_seen
    }
}

/// Which timeout applies to a flow, from its forward state. Shared so the
/// agent's scan and the expire program agree on what is idle.
#[inline(always)]
pub const fn flow_timeout(t: &Timeouts, state: u32, mode: u8) -> u64 {
    if flow_closed(state) && mode == MODE_FULLNAT {
        // The balancer's port stays taken while the backend may still hold
        // the connection in TIME_WAIT (60 s on Linux): the `fin` timeout,
        // 120 s by default, or `closed` if that is longer.
        if t.closed > t.fin {
            t.closed
        } else {
            t.fin
        }
    } else if flow_closed(state) {
        t.closed
    } else if state & FLOW_BOTH_FIN != 0 {
        t.fin
    } else if state & FLOW_ESTABLISHED == 0 {
        t.syn
    } else {
        t.established
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_wait_accepts_by_timestamps_when_both_have_them_else_by_sequence_numbers() {
        // Different timestamps decide, whatever the sequence numbers say.
        assert!(time_wait_accepts(1000, Some(50), 10, Some(51)));
        assert!(!time_wait_accepts(1000, Some(50), 5000, Some(49)));
        // Equal (the same client within its clock's tick): sequence numbers.
        assert!(time_wait_accepts(1000, Some(50), 5000, Some(50)));
        assert!(!time_wait_accepts(1000, Some(50), 10, Some(50)));
        // Across the wrap of either.
        assert!(time_wait_accepts(1000, Some(u32::MAX - 5), 10, Some(3)));
        assert!(time_wait_accepts(u32::MAX - 5, None, 3, None));
        // Either without: the SYN must start beyond what the old one sent.
        assert!(time_wait_accepts(1000, Some(50), 1001, None));
        assert!(!time_wait_accepts(1000, None, 1000, Some(99)));
        assert!(!time_wait_accepts(1000, None, 999, None));
    }

    #[test]
    fn closed_when_reset_expired_or_both_fins() {
        assert!(!flow_closed(0));
        assert!(!flow_closed(FLOW_CLIENT_FIN));
        assert!(!flow_closed(FLOW_BACKEND_FIN | (5 * FLOW_GENERATION_ONE)));
        assert!(flow_closed(FLOW_CLIENT_FIN | FLOW_BACKEND_FIN));
        assert!(flow_closed(FLOW_RESET));
        assert!(flow_closed(FLOW_EXPIRED));
        assert!(flow_closed(FLOW_ABORTED));
        assert!(!flow_closed(FLOW_ESTABLISHED));
    }

    #[test]
    fn half_open_flows_have_the_syn_timeout_until_established() {
        let t = Timeouts { syn: 1, established: 2, fin: 3, closed: 4 };
        assert_eq!(flow_timeout(&t, 0, MODE_NAT), 1);
        assert_eq!(flow_timeout(&t, FLOW_ESTABLISHED, MODE_NAT), 2);
        assert_eq!(flow_timeout(&t, FLOW_ESTABLISHED | FLOW_CLIENT_FIN, MODE_NAT), 3);
        assert_eq!(flow_timeout(&t, FLOW_ESTABLISHED | FLOW_RESET, MODE_NAT), 4);
        // A closed full-NAT flow keeps its port through the backend's TIME_WAIT.
        let t = Timeouts { fin: 120, closed: 10, ..t };
        assert_eq!(flow_timeout(&t, FLOW_RESET, MODE_NAT), 10);
        assert_eq!(flow_timeout(&t, FLOW_RESET, MODE_FULLNAT), 120);
    }

    #[test]
    fn one_word_counts_both_and_moves_a_flow_with_one_add() {
        let count = 3 * HALF_OPEN_ONE + 5;
        let moved = count.wrapping_add(1u64.wrapping_sub(HALF_OPEN_ONE));
        assert_eq!((established_count(moved), half_open_count(moved)), (6, 2));
        assert!(seq_after(1, u32::MAX));
        assert!(!seq_after(u32::MAX, 1));
    }

    #[test]
    fn reply_and_forward_keys_mirror_each_other() {
        let client = FlowKey { saddr: 1, daddr: 2, sport: 3, dport: 4 };
        // nat: the backend sees the client; full NAT: the balancer (7:6).
        for (peer_addr, peer_port) in [(1, 3), (7, 6)] {
            let forward =
                Flow { nat_addr: 9, nat_port: 8, peer_addr, peer_port, direction: DIR_FORWARD, ..Flow::default() };
            let reply_key = client.reply(&forward);
            assert_eq!(reply_key, FlowKey { saddr: 9, daddr: peer_addr, sport: 8, dport: peer_port });
            let reply = Flow {
                nat_addr: client.daddr,
                nat_port: client.dport,
                peer_addr: client.saddr,
                peer_port: client.sport,
                direction: DIR_REPLY,
                ..Flow::default()
            };
            assert_eq!(reply_key.forward(&reply), client);
        }
    }
}
