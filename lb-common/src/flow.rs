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
    /// the backend (`forward.nat_*`) answering the client.
    #[inline(always)]
    pub const fn reply(&self, forward: &Flow) -> FlowKey {
        FlowKey { saddr: forward.nat_addr, daddr: self.saddr, sport: forward.nat_port, dport: self.sport }
    }

    /// The key of the forward entry of the reply flow `self` → `reply`: the
    /// client (`self`'s destination) sending to the VIP (`reply.nat_*`).
    #[inline(always)]
    pub const fn forward(&self, reply: &Flow) -> FlowKey {
        FlowKey { saddr: self.daddr, daddr: reply.nat_addr, sport: self.dport, dport: reply.nat_port }
    }
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


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closed_when_reset_expired_or_both_fins() {
        assert!(!flow_closed(0));
        assert!(!flow_closed(FLOW_CLIENT_FIN));
        assert!(!flow_closed(FLOW_BACKEND_FIN | (5 * FLOW_GENERATION_ONE)));
        assert!(flow_closed(FLOW_CLIENT_FIN | FLOW_BACKEND_FIN));
        assert!(flow_closed(FLOW_RESET));
        assert!(flow_closed(FLOW_EXPIRED));
    }

    #[test]
    fn reply_and_forward_keys_mirror_each_other() {
        let client = FlowKey { saddr: 1, daddr: 2, sport: 3, dport: 4 };
        let forward = Flow { nat_addr: 9, nat_port: 8, direction: DIR_FORWARD, ..Flow::default() };
        let reply_key = client.reply(&forward);
        assert_eq!(reply_key, FlowKey { saddr: 9, daddr: 1, sport: 8, dport: 3 });
        let reply = Flow { nat_addr: client.daddr, nat_port: client.dport, direction: DIR_REPLY, ..Flow::default() };
        assert_eq!(reply_key.forward(&reply), client);
    }
}
