//! The connection table: finding a packet's flow, opening flows on SYN,
//! following the handshake, FIN and RST on evidence, and counting each flow
//! on its backend exactly once.
//!
//! A flow's life, in its forward entry's state bits:
//!
//! ```text
//!   client SYN ──► half-open ── backend SYN-ACK acking the SYN ──► answered
//!              ── client ACK acking the SYN-ACK ──► established
//!   ── exact RST, or FIN both ways, or the agent, or aging ──► closed
//! ```
//!
//! "Answered" (`FLOW_ANSWERED`) keeps in the forward entry what the client's
//! ACK must acknowledge, so that ACK is judged without the reply entry.
//!
//! Each entry follows what its direction's sender has sent, acknowledged
//! and offered (`seq_next`, `acked`, `window`). A segment that changes a
//! flow must show it belongs to it, so nothing sent with the right ports
//! alone can close a flow or move it on:
//! - An RST closes the flow only when its sequence number is exactly what
//!   its receiver expects next (RFC 5961 §3); in the window but not exact it
//!   is forwarded and changes nothing (the endpoint answers with a challenge
//!   ACK); outside the window it is dropped.
//! - A FIN outside the receiver's window is dropped.
//! - Until the handshake completes, only the segments of a handshake pass:
//!   the backend's SYN-ACK (or refusal) must acknowledge the client's SYN,
//!   and the client's ACK the SYN-ACK. Anything else on those ports — a
//!   stray segment of an earlier connection, a forged answer — is dropped.
//!
//! A nat flow to a backend that only its service sends flows to gets its
//! reply entry when the backend first answers (`lazy_reply`), not at its
//! SYN: a SYN then writes one entry, not two (`ReplyEntry`).
//!
//! A DSR flow has its forward entry only (the backend answers the client
//! directly), and is followed on the client's segments alone: its
//! handshake completes with the client's ACK right after the SYN, and its
//! RSTs and FINs are judged against what the client has sent
//! (`judge_client_close`).
//!
//! A SYN that finds the table full makes room from this CPU's ring of
//! recent openings, oldest first, or failing that from another CPU's
//! (`make_room`).
//!
//! An established flow counts on its slot's count (`ACTIVE`), which every
//! CPU shares; a half-open one on the count of the CPU that opened it
//! (`HALF_OPEN`, `Flow::opened_on`), so that a SYN writes no line that
//! other CPUs write. Least connections weighs half-open ones lightly (its
//! own CPU's), and `max_conns`, drains and the status count established
//! ones. Every change of state is atomic (fetch-or, compare-and-swap), so
//! exactly one CPU or expire call sees a flow become established, or become
//! closed, and only that one moves its count.
//!
//! Packets of one flow, or of two connections on the same ports, may be
//! judged on several CPUs at once (a NIC's queues). The state's high bits
//! count the entry's reuses (its generation), and a reply entry records the
//! generation of the flow it was written for (`judged_forward`). A segment
//! changes a flow only by compare-and-swap against the state it was judged
//! by (`mark`, `note_answered`), so an old connection's straggler never
//! changes the new connection that took its 5-tuple or its full-NAT port
//! over meanwhile. A closed flow's state changes only when a SYN takes it
//! over, so that SYN's claim never fails for a straggler's sake; the SYN
//! marks the entry expired while it rewrites it, so no CPU judges the new
//! generation with the old fields. Aging (`expire`) claims a flow it
//! found idle, then reads its times again, and gives it back if a segment
//! noted one meanwhile; a segment notes its time, then reads the state,
//! and stops if the flow is claimed (`touched`). The tests in
//! `tests/tests/program/concurrency.rs` race each of these on two CPUs.
use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    programs::XdpContext,
};
use aya_ebpf::{
    cty::c_void,
    helpers::{bpf_get_prandom_u32, bpf_get_smp_processor_id, bpf_loop, bpf_map_lookup_percpu_elem},
};
use lb_common::{
    flow_closed, flow_generation, flow_last_active, flow_timeout, mode_is_dsr, seq_after, time_wait_accepts, Backend, BackendOwner, Clock, Counter, Flow, FlowKey, HalfOpenCounts,
    RingCursor, Service, ServiceKey, Timeouts, DIR_FORWARD, DIR_HOLD, DIR_REPLY, MAX_SNAT_ADDRS, MODE_DSR, MODE_DSR_IPIP, MODE_FULLNAT,
    MODE_NAT, SERVICE_DSR, SERVICE_FULLNAT, SERVICE_IPIP, FLOW_ABORTED, FLOW_BACKEND_FIN, FLOW_CLIENT_FIN, FLOW_ESTABLISHED, FLOW_EXPIRED,
    FLOW_ANSWERED, FLOW_GENERATION_ONE, FLOW_RESET, MAX_BACKENDS, PROTO_TCP, TCP_ACK, TCP_FIN, TCP_RST,
    TCP_SYN,
};

use crate::{
    atomic,
    clock::Now,
    maps::{
        RoomSearch, ACTIVE, BACKEND_OWNERS, CLOCK, FLOWS, HALF_OPEN, OPENED, OPENED_CURSOR, OPEN_SCRATCH, ROOM_SEARCH,
        SERVICES,
    },
    nat::csum_diffs,
    parse::{tcp_options, TcpOptions, TcpPacket},
    schedule, stats,
    zero::zero,
};

const EEXIST: i32 = 17;
const FLAG_BITS: u32 = FLOW_GENERATION_ONE - 1;
/// A FIN may be this far before what its receiver acknowledged (a
/// retransmission) at the least, or the receiver's window if larger.
const FIN_SLACK: u32 = 1 << 16;
/// How far a segment's sequence and acknowledgment numbers may be from what
/// its sender has sent and acknowledged so far, either way, and still be
/// taken as this connection's: far more than a connection moves between two
/// segments this balancer sees, and a chance of about 1 in 4,000 for a
/// stray segment of an earlier connection on the same ports.
const PLAUSIBLE: u32 = 1 << 26;

#[inline(always)]
pub fn lookup(key: &FlowKey) -> Option<*mut Flow> {
    FLOWS.get_ptr_mut(key)
}

/// A SYN on a closed flow's 5-tuple starts a new flow in the same entry.
#[inline(always)]
fn reusable(flow: *const Flow) -> bool {
    unsafe { (*flow).direction == DIR_FORWARD && flow_closed((*flow).state) }
}

pub enum Tracked {
    Forward,
    Drop(Counter),
    /// The backend refused the handshake and another backend can take the
    /// flow: the RST is dropped, and the client's SYN retransmission moves
    /// to that backend (the layer-4 form of nginx's next-upstream retry).
    RefusalSwallowed,
}

/// Bookkeeping for a packet of a known flow: what it proves, and whether it
/// goes on.
#[inline(always)]
pub fn track(ctx: &XdpContext, pkt: &TcpPacket, key: &FlowKey, entry: *mut Flow, now: &Now) -> Tracked {
    let own = unsafe { &mut *entry };
    let flags = pkt.flags;
    // Most packets: data or an ACK on an established flow.
    if flags & (TCP_SYN | TCP_FIN | TCP_RST) == 0 && settled(own) {
        if !plausible(own, pkt) {
            return Tracked::Drop(Counter::OutOfState);
        }
        return learned(own, pkt, now);
    }
    if flags & TCP_SYN != 0 && flags & (TCP_FIN | TCP_RST) != 0 {
        return Tracked::Drop(Counter::MalformedTcp);
    }
    if own.direction == DIR_HOLD {
        // The backend on an old connection's port (its TIME_WAIT answering,
        // say): no flow of ours any more.
        return Tracked::Drop(Counter::OutOfState);
    }
    // A SYN-ACK is judged against the forward entry whenever it comes, not
    // only while the reply entry waits for it: a straggler of an older
    // connection, judged on another CPU while a new one took this entry
    // over (a full-NAT port), may have written its time into it.
    if own.direction == DIR_REPLY && (own.last_seen == 0 || flags & TCP_SYN != 0) {
        return first_answer(ctx, pkt, key, own, now);
    }
    let forward = own.direction == DIR_FORWARD;
    if forward {
        let state = unsafe { core::ptr::read_volatile(&own.state) };
        if flow_closed(state) {
            // Trailing segments of a closed flow (the last ACK, a
            // retransmitted FIN) still reach their endpoint.
            note_closing_timestamp(ctx, pkt, own);
            return touched(own, now);
        }
        if flags & TCP_SYN != 0 {
            // A retransmitted SYN (`syn_opens` decided it opens nothing).
            return touched(own, now);
        }
        if state & FLOW_ESTABLISHED == 0 && flags & TCP_RST == 0 {
            // The client's ACK completing the handshake, or a stray.
            let completes = flags & TCP_ACK != 0
                && if mode_is_dsr(own.mode) {
                    // The backend's SYN-ACK went straight to the client:
                    // all there is to see is an ACK right after the SYN.
                    pkt.seq() == own.seq_next
                } else {
                    // The backend's SYN-ACK was seen (`first_answer`), and
                    // this acknowledges it.
                    state & FLOW_ANSWERED != 0 && pkt.ack_seq() == own.acked
                };
            if !completes {
                return Tracked::Drop(Counter::OutOfState);
            }
            // From here on its acknowledgments are followed.
            own.acked = pkt.ack_seq();
            if !establish(own) {
                return Tracked::Drop(Counter::OutOfState);
            }
        }
    }
    if flags & TCP_RST == 0 && !plausible(own, pkt) {
        return Tracked::Drop(Counter::OutOfState);
    }
    if flags & (TCP_RST | TCP_FIN) != 0 {
        if forward && flags & TCP_FIN != 0 {
            // Before the FIN may close the flow: a SYN taking its port over
            // on another CPU must not see it closed without the timestamp.
            // It only ever rises, so a forged FIN cannot lower it.
            note_closing_timestamp(ctx, pkt, own);
        }
        let judged = if mode_is_dsr(own.mode) { judge_client_close(pkt, key, own) } else { judge_close(pkt, key, own) };
        if let Some(dropped) = judged {
            return Tracked::Drop(dropped);
        }
        if flags & TCP_RST != 0 {
            // Nothing is learned from an RST: one that was only in the
            // window would move `seq_next` to itself, and a second, the
            // same, would then pass as exact.
            return Tracked::Forward;
        }
    }
    learned(own, pkt, now)
}

/// Keeps the timestamp of a full-NAT client's closing segment: should the
/// backend hold the connection in TIME_WAIT, it compares a new SYN on the
/// same port with it (`take_over`).
#[inline(always)]
fn note_closing_timestamp(ctx: &XdpContext, pkt: &TcpPacket, forward: &mut Flow) {
    if forward.mode != MODE_FULLNAT {
        return;
    }
    let options = tcp_options(ctx, pkt);
    if options.ts_seen != 0 && (forward.ts_seen == 0 || seq_after(options.ts, forward.ts_recent)) {
        forward.ts_recent = options.ts;
        forward.ts_seen = 1;
    }
}

/// Whether a segment's numbers are near enough to what its sender has sent
/// and acknowledged to be this connection's. One that is not is dropped and
/// nothing is learned from it, so a stray cannot move the windows that
/// judge this connection's RSTs and FINs.
#[inline(always)]
fn plausible(own: &Flow, pkt: &TcpPacket) -> bool {
    let near = |a: u32, b: u32| a.wrapping_sub(b).wrapping_add(PLAUSIBLE) < 2 * PLAUSIBLE;
    near(pkt.seq(), own.seq_next) && (pkt.flags & TCP_ACK == 0 || near(pkt.ack_seq(), own.acked))
}

/// Past the handshake and not closed (forward), or answered (reply): its
/// segments are judged by their numbers alone.
#[inline(always)]
fn settled(own: &Flow) -> bool {
    if own.direction == DIR_FORWARD {
        own.state & (FLAG_BITS & !FLOW_BACKEND_FIN & !FLOW_CLIENT_FIN & !FLOW_ANSWERED) == FLOW_ESTABLISHED
    } else {
        own.direction == DIR_REPLY && own.last_seen != 0
    }
}

/// The forward entry a reply entry belongs to: its client is the reply's
/// destination, its VIP the reply's rewrite target, and it chose the same
/// backend slot (a reused entry may not have).
#[inline(always)]
fn forward_of_reply(key: &FlowKey, reply: &Flow) -> Option<*mut Flow> {
    judged_forward(key, reply).map(|(forward, _)| forward)
}

/// `forward_of_reply`, and the forward entry's state as it was judged: read
/// before the fields that tie the entry to `reply`. A SYN rewriting the
/// entry for a new flow marks it `FLOW_EXPIRED` until its fields are all
/// written (`open`), so a state read without that mark belongs to the
/// fields read after it. `reply` must have been written for this very
/// flow (its generation), and not removed since: a CPU may still hold the
/// reply entry of an old connection on these ports, or of one aged out.
/// Whatever then changes the flow does it by compare-and-swap against the
/// state judged (`mark`, `note_answered`), so a new flow that takes the
/// entry over meanwhile is never changed by the old one's segments.
#[inline(always)]
fn judged_forward(key: &FlowKey, reply: &Flow) -> Option<(*mut Flow, u32)> {
    let forward = FLOWS.get_ptr_mut(&key.forward(reply))?;
    let (state, same) = unsafe {
        let state = core::ptr::read_volatile(&(*forward).state);
        let same = core::ptr::read_volatile(&(*forward).direction) == DIR_FORWARD
            && core::ptr::read_volatile(&(*forward).service) == reply.service
            && core::ptr::read_volatile(&(*forward).slot) == reply.slot
            && flow_generation(state) == reply.forward_generation
            && core::ptr::read_volatile(&reply.state) & FLOW_EXPIRED == 0;
        (state, same)
    };
    same.then_some((forward, state))
}

/// Whether the other side has acknowledged anything yet: the backend with
/// its SYN-ACK, the client with the ACK that completed the handshake.
#[inline(always)]
fn has_acked(peer: &Flow, forward_state: u32) -> bool {
    if peer.direction == DIR_REPLY {
        peer.last_seen != 0
    } else {
        forward_state & FLOW_ESTABLISHED != 0
    }
}

/// An RST or FIN of an answered flow, judged against what its receiver
/// expects. Returns the drop reason, or marks the flow and returns `None`.
#[inline(always)]
fn judge_close(pkt: &TcpPacket, key: &FlowKey, own: &mut Flow) -> Option<Counter> {
    let judged = if own.direction == DIR_FORWARD {
        Some((own as *mut Flow, unsafe { core::ptr::read_volatile(&own.state) }))
    } else {
        judged_forward(key, own)
    };
    let Some((forward, state)) = judged else {
        return Some(Counter::OutOfState);
    };
    // The other direction's entry: a reply's is the forward entry just
    // found. A nat flow's reply entry may not be written yet (`lazy_reply`):
    // then the backend has not answered and has acknowledged nothing.
    let peer = if own.direction == DIR_FORWARD { FLOWS.get_ptr_mut(&key.reply(own)) } else { Some(forward) };
    // The receiver, if it has acknowledged anything yet.
    let acked = peer.map(|p| unsafe { &*p }).filter(|p| has_acked(p, state));
    let seq = pkt.seq();
    if pkt.flags & TCP_RST != 0 {
        // Exact: what the receiver expects next, or (its acknowledgment may
        // lag what it has received) what the sender has sent up to.
        if seq == own.seq_next || acked.is_some_and(|peer| seq == peer.acked) {
            close(key, own, forward, FLOW_RESET, state);
            return None;
        }
        if acked.is_some_and(|peer| seq.wrapping_sub(peer.acked) < peer.window.max(1)) {
            stats::count(Counter::RstInWindow);
            return None;
        }
        return Some(Counter::RstOutOfWindow);
    }
    let Some(peer) = acked else {
        return Some(Counter::FinOutOfWindow);
    };
    let slack = peer.window.max(FIN_SLACK);
    let offset = seq.wrapping_sub(peer.acked);
    if offset >= slack && offset.wrapping_neg() > slack {
        return Some(Counter::FinOutOfWindow);
    }
    close(key, own, forward, if own.direction == DIR_FORWARD { FLOW_CLIENT_FIN } else { FLOW_BACKEND_FIN }, state);
    None
}

/// An RST or FIN of a DSR client, whose backend's side the balancer never
/// sees: judged against what the client has sent. An exact RST closes the
/// flow, one near it is forwarded and changes nothing, one far from it is
/// dropped. The client's FIN ends the flow here (the backend's FIN, before
/// or after it, is never seen), so a client that half-closes and keeps
/// reading no longer counts on its backend: least connections in DSR counts
/// connections the clients still send on.
#[inline(always)]
fn judge_client_close(pkt: &TcpPacket, key: &FlowKey, own: &mut Flow) -> Option<Counter> {
    let seq = pkt.seq();
    let offset = seq.wrapping_sub(own.seq_next);
    let near = offset < FIN_SLACK || offset.wrapping_neg() <= FIN_SLACK;
    if pkt.flags & TCP_RST != 0 {
        if seq == own.seq_next {
            let (forward, state): (*mut Flow, u32) = (own, own.state);
            close(key, own, forward, FLOW_RESET, state);
            return None;
        }
        if near {
            stats::count(Counter::RstInWindow);
            return None;
        }
        return Some(Counter::RstOutOfWindow);
    }
    if !near {
        return Some(Counter::FinOutOfWindow);
    }
    let (forward, state): (*mut Flow, u32) = (own, own.state);
    close(key, own, forward, FLOW_CLIENT_FIN | FLOW_BACKEND_FIN, state);
    None
}

/// Marks a flow (as `judged`) with a closing bit, seen in a packet of
/// `own`'s direction; a flow this closes goes back into the ring of
/// candidates for room, the first a full table takes.
#[inline(always)]
fn close(key: &FlowKey, own: &Flow, forward: *mut Flow, bit: u32, judged: u32) {
    if mark(forward, bit, judged) {
        remember(&if own.direction == DIR_FORWARD { *key } else { key.forward(own) });
    }
}

/// The backend's first answer to the client's SYN: a SYN-ACK, or an RST
/// refusing it, either acknowledging the SYN. Anything else on these ports
/// is not from this connection. Every SYN-ACK comes here, a retransmitted
/// one too: forwarded as long as it still acknowledges the client's SYN.
#[inline(always)]
fn first_answer(ctx: &XdpContext, pkt: &TcpPacket, key: &FlowKey, reply: &mut Flow, now: &Now) -> Tracked {
    // The flow as it is judged here: its answer marks it, not a new flow
    // that takes the 5-tuple over meanwhile.
    let Some((forward, judged)) = judged_forward(key, reply) else {
        return Tracked::Drop(Counter::OutOfState);
    };
    let acks_syn = pkt.flags & TCP_ACK != 0 && pkt.ack_seq() == unsafe { (*forward).seq_next };
    if pkt.flags & TCP_RST != 0 {
        if !acks_syn {
            return Tracked::Drop(Counter::RstOutOfWindow);
        }
        // A refusal: a passive health failure.
        if let Some(s) = stats::backend(reply.service, reply.slot) {
            unsafe { (*s).refused += 1 };
        }
        if schedule::choose(reply.service as u32, reply.slot as u32).is_some() {
            return Tracked::RefusalSwallowed;
        }
        close(key, reply, forward, FLOW_RESET, judged);
        return Tracked::Forward;
    }
    if pkt.flags & TCP_SYN == 0 || !acks_syn {
        return Tracked::Drop(Counter::OutOfState);
    }
    if judged & (FLOW_ANSWERED | FLOW_ESTABLISHED) != 0 && reply.last_seen != 0 {
        // A retransmitted SYN-ACK: what it says is known already.
        return touched(reply, now);
    }
    reply.wscale = tcp_options(ctx, pkt).scale as u8;
    // The window of a SYN-ACK is never scaled (RFC 7323 §2.2).
    reply.window = pkt.window();
    reply.seq_next = pkt.seq_end();
    reply.acked = pkt.ack_seq();
    reply.last_seen = now.ticks;
    if !note_answered(unsafe { &mut *forward }, judged, reply.seq_next) {
        // The client's retry moved the flow to another backend meanwhile
        // (`open`): had this answer reached the client, it would take it and
        // be stuck on a connection the balancer no longer sends to.
        return Tracked::Drop(Counter::OutOfState);
    }
    Tracked::Forward
}

/// Marks the forward entry answered, with what the client's ACK must
/// acknowledge (`FLOW_ANSWERED`). By compare-and-swap, retried while the
/// entry is still the flow that was judged (`judged`, its state then: the
/// same generation) and open: a closing bit set on another CPU meanwhile
/// is kept, and a new flow that took the 5-tuple over is left alone (its
/// own answer marks it). Returns whether the entry is still the flow
/// judged; a SYN that moves a flow claims it by compare-and-swap too, and
/// only an unanswered one (`open`), so of a late answer and the retry that
/// moves its flow exactly one wins.
#[inline(always)]
fn note_answered(forward: &mut Flow, judged: u32, expected_ack: u32) -> bool {
    for _ in 0..STATE_TRIES {
        let observed = unsafe { core::ptr::read_volatile(&forward.state) };
        if !same_flow(observed, judged) {
            return false;
        }
        if observed & (FLOW_ANSWERED | FLOW_ESTABLISHED) != 0 || flow_closed(observed) {
            return true;
        }
        forward.acked = expected_ack;
        if atomic::compare_exchange(&mut forward.state, observed, observed | FLOW_ANSWERED) {
            return true;
        }
    }
    // Lost every try to changes of the state bits alone: still this flow.
    true
}

/// Each try of a compare-and-swap on a flow's state (`note_answered`,
/// `mark`) loses only to another change of its state bits, of which there
/// are a handful.
const STATE_TRIES: u32 = 4;

/// A flow's state now (`observed`) is still that of the flow as it was
/// judged (`judged`): the same generation, and neither being rewritten for
/// a new flow nor deleted (`FLOW_EXPIRED`). Its state bits may differ.
#[inline(always)]
fn same_flow(observed: u32, judged: u32) -> bool {
    (observed ^ judged) & !FLAG_BITS == 0 && (observed | judged) & FLOW_EXPIRED == 0
}

/// Learns from a segment judged to be this connection's (`learn`), and
/// whether it goes on (`touched`).
#[inline(always)]
fn learned(own: &mut Flow, pkt: &TcpPacket, now: &Now) -> Tracked {
    learn(own, pkt, now);
    touched(own, now)
}

/// Follows what the sender has sent, acknowledged and offered.
#[inline(always)]
fn learn(own: &mut Flow, pkt: &TcpPacket, now: &Now) {
    let end = pkt.seq_end();
    if seq_after(end, own.seq_next) {
        own.seq_next = end;
    }
    if pkt.flags & TCP_ACK != 0 {
        let ack = pkt.ack_seq();
        if seq_after(ack, own.acked) {
            own.acked = ack;
        }
        // The largest window offered, as nf_conntrack keeps it: a superset
        // of the window at any moment, and written only when it grows.
        let window = pkt.window() << own.wscale;
        if window > own.window {
            own.window = window;
        }
    }
}

/// Notes the segment's time on its entry (at most every `touch_every`),
/// and whether it goes on: not if the agent's aging or a full table is
/// removing the flow right now (`expire`). The time is stored with a full
/// barrier and the state read after it, while `expire` claims the state
/// and reads the times after that: so either `expire` sees this time and
/// keeps the flow, or this sees the claim and the segment stops with the
/// flow. Never the segment through and the flow gone under it, where its
/// connection's next segment would find nothing, and the endpoint answer
/// it with an RST. A flow noted within `touch_every` is not idle, and no
/// timeout is shorter: `expire` does not take it.
#[inline(always)]
fn touched(own: &mut Flow, now: &Now) -> Tracked {
    if !touch(own, now) {
        return Tracked::Forward;
    }
    if unsafe { core::ptr::read_volatile(&own.state) } & FLOW_EXPIRED != 0 {
        return Tracked::Drop(Counter::OutOfState);
    }
    Tracked::Forward
}

/// Notes the segment's time on its entry, at most every `touch_every`;
/// returns whether it did.
#[inline(always)]
fn touch(own: &mut Flow, now: &Now) -> bool {
    if now.ticks.wrapping_sub(own.last_seen) < now.touch_every {
        return false;
    }
    atomic::store_fenced(&mut own.last_seen, now.ticks);
    true
}

/// The client completed the handshake: the flow counts as established.
/// Returns false if the flow is being removed (`expire`) right now: its
/// ACK goes no further, and should `expire` keep the flow after all, it
/// takes the bit off again, so the client's next segment completes the
/// handshake.
#[inline(always)]
fn establish(forward: *mut Flow) -> bool {
    let before = atomic::fetch_or(unsafe { &mut (*forward).state }, FLOW_ESTABLISHED);
    if before & FLOW_EXPIRED != 0 {
        return false;
    }
    if before & FLOW_ESTABLISHED == 0 && !flow_closed(before) {
        unsafe { uncount_half_open(&*forward) };
        if let Some(count) = unsafe { slot_count((*forward).service, (*forward).slot) } {
            atomic::add(count, 1);
        }
        stats::count(Counter::Established);
    }
    true
}

/// Sets a state bit on the flow as it was judged (`judged`: its state
/// then); takes the flow off its backend's count if this is what closed it,
/// and returns whether it did. By compare-and-swap, retried while only
/// state bits change: a new flow that took the entry over meanwhile is left
/// alone. A closed flow is never changed, so a SYN taking its 5-tuple over
/// on another CPU (`open`) does not lose its claim, and its client its SYN,
/// to a straggler of the old connection.
#[inline(always)]
fn mark(forward: *mut Flow, bit: u32, judged: u32) -> bool {
    for _ in 0..STATE_TRIES {
        let before = unsafe { core::ptr::read_volatile(&(*forward).state) };
        if !same_flow(before, judged) || flow_closed(before) || before & bit == bit {
            return false;
        }
        if atomic::compare_exchange(unsafe { &mut (*forward).state }, before, before | bit) {
            let closed_now = flow_closed(before | bit);
            if closed_now {
                unsafe { release(&*forward, before) };
            }
            return closed_now;
        }
    }
    false
}

#[inline(always)]
fn slot_count(service: u16, slot: u16) -> Option<*mut u64> {
    let counts = ACTIVE.get_ptr_mut(service as u32)?;
    Some(unsafe { &mut (*counts).active[(slot as u32 & (MAX_BACKENDS - 1)) as usize] })
}

/// Takes a flow (forward entry) that was live in `state` off its slot's
/// count.
#[inline(always)]
fn release(flow: &Flow, state: u32) {
    if state & FLOW_ESTABLISHED != 0 {
        if let Some(count) = slot_count(flow.service, flow.slot) {
            atomic::add(count, 1u64.wrapping_neg());
        }
    } else {
        uncount_half_open(flow);
    }
    stats::count(Counter::ClosedFlows);
}

/// Puts a new flow on this CPU's half-open count of its slot (`+1`), or
/// takes it off again (`-1`) where it could not be opened after all. Atomic:
/// another CPU may be taking one of this CPU's flows off at the same moment.
#[inline(always)]
fn count_half_open(service: u16, slot: u16, sign: i32) {
    if let Some(counts) = HALF_OPEN.get_ptr_mut(service as u32) {
        let count = unsafe { &mut (*counts).count[(slot as u32 & (MAX_BACKENDS - 1)) as usize] };
        atomic::add32(count, sign as u32);
    }
}

/// Takes a half-open flow off the count of the CPU that opened it.
#[inline(always)]
fn uncount_half_open(flow: &Flow) {
    let service = flow.service as u32;
    let cpu = flow.opened_on as u32;
    let counts = unsafe { percpu_elem(&HALF_OPEN as *const _ as *mut c_void, &service, cpu) } as *mut HalfOpenCounts;
    if !counts.is_null() {
        let count = unsafe { &mut (*counts).count[(flow.slot as u32 & (MAX_BACKENDS - 1)) as usize] };
        atomic::add32(count, 1u32.wrapping_neg());
    }
}

/// Counts a new flow in the statistics.
#[inline(always)]
fn count_new_flow(service: u16, slot: u16) {
    if let Some(s) = stats::backend(service, slot) {
        unsafe { (*s).new_flows += 1 };
    }
    stats::count(Counter::NewFlows);
}

/// Whether a client's SYN opens a flow, and if so which backend slot to
/// avoid (`NO_SLOT`: none). It opens one on a closed flow's ports; on a
/// live flow it is a retransmission, unless the backend left the first SYN
/// unanswered for long enough that this one is the client's retry (not a
/// duplicate): then the flow may move to another backend.
#[inline(always)]
pub fn syn_opens(key: &FlowKey, existing: Option<*mut Flow>, now: &Now) -> Option<u32> {
    match existing {
        None => Some(schedule::NO_SLOT),
        Some(entry) if reusable(entry) => Some(schedule::NO_SLOT),
        // A SYN on a reply entry's or a held port's key opens nothing.
        Some(entry) if unsafe { (*entry).direction } != DIR_FORWARD => None,
        Some(entry) if unanswered(key, entry, now) => {
            count_unanswered(entry);
            Some(unsafe { (*entry).slot } as u32)
        }
        Some(_) => None,
    }
}

/// The client is sending its SYN again, at least a retransmission timeout
/// (half a second; TCP starts at one) after the last, and the backend has
/// not answered: a passive health failure. A duplicate SYN that comes
/// sooner proves nothing about the backend.
#[inline(always)]
fn unanswered(key: &FlowKey, forward: *const Flow, now: &Now) -> bool {
    let (last_seen, established) =
        unsafe { ((*forward).last_seen, (*forward).state & FLOW_ESTABLISHED != 0) };
    if established || now.ticks.wrapping_sub(last_seen) < 2 * now.touch_every {
        return false;
    }
    match FLOWS.get_ptr(&key.reply(unsafe { &*forward })) {
        Some(reply) => unsafe { (*reply).last_seen == 0 },
        None => true,
    }
}

#[inline(always)]
fn count_unanswered(forward: *const Flow) {
    if let Some(s) = unsafe { stats::backend((*forward).service, (*forward).slot) } {
        unsafe { (*s).unanswered += 1 };
    }
}

pub enum Opened {
    /// The new flow's forward entry, in this CPU's scratch (valid for this
    /// packet).
    Flow(*const Flow),
    NotAService,
    /// Asked to avoid the flow's backend, and no other can take it.
    NoOtherBackend,
    Drop(Option<Counter>),
}

/// The `MODE_*` of a service's new flows.
#[inline(always)]
fn mode_of(service: &Service) -> u8 {
    if service.flags & SERVICE_DSR != 0 {
        if service.flags & SERVICE_IPIP != 0 {
            MODE_DSR_IPIP
        } else {
            MODE_DSR
        }
    } else if service.flags & SERVICE_FULLNAT != 0 {
        MODE_FULLNAT
    } else {
        MODE_NAT
    }
}

/// The service `key` is addressed to, if any.
#[inline(always)]
fn service_of(key: &FlowKey) -> Option<&'static Service> {
    let service_key = ServiceKey { addr: key.daddr, port: key.dport, proto: PROTO_TCP, _pad: 0 };
    unsafe { SERVICES.get(&service_key) }
}

/// `key` is addressed to a service.
#[inline(always)]
pub fn is_service(key: &FlowKey) -> bool {
    service_of(key).is_some()
}

/// The id of the service `key` is addressed to, or `TRACE_ANY_SERVICE`.
#[inline(always)]
pub fn service_id(key: &FlowKey) -> u32 {
    service_of(key).map_or(lb_common::TRACE_ANY_SERVICE, |s| s.id)
}

/// A SYN to open a flow: choose a backend and record the flow both ways.
/// `existing` is the forward entry on the same 5-tuple, if any: a closed
/// flow whose ports are reused, or (with `avoid` set to its slot, otherwise
/// `NO_SLOT`) a live one whose backend left the SYN unanswered.
#[inline(always)]
pub fn open(ctx: &XdpContext, pkt: &TcpPacket, key: &FlowKey, existing: Option<*mut Flow>, now: u64, avoid: u32) -> Opened {
    let Some(service) = service_of(key) else {
        return Opened::NotAService;
    };
    let service_id = service.id;
    let Some(choice) = schedule::choose(service_id, avoid) else {
        if avoid != schedule::NO_SLOT {
            return Opened::NoOtherBackend;
        }
        // Dropped, not refused: the client retries the SYN, and a backend may
        // be able to take it by then.
        return Opened::Drop(Some(Counter::NoBackend));
    };
    let backend = choice.backend;
    let mode = mode_of(service);
    let full_nat = mode == MODE_FULLNAT;
    // DSR flows have a forward entry only: the backend answers the client
    // directly.
    let dsr = mode_is_dsr(mode);
    let options = tcp_options(ctx, pkt);
    let service_row = service;
    let service = service_id as u16;
    // The two entries are built in this CPU's scratch, not on the stack,
    // which has no room for them.
    let Some(scratch) = OPEN_SCRATCH.get_ptr_mut(0) else {
        return Opened::Drop(None);
    };
    let scratch = unsafe { &mut *scratch };
    // The state of the entry this flow takes over, read once: the new flow
    // is its next generation, which the reply entry records (written before
    // the entry is claimed, in full NAT). In the scratch: the stack has no
    // room for them.
    if let Some(entry) = existing {
        scratch.taken = unsafe { core::ptr::read_volatile(&(*entry).state) };
        scratch.generation = next_generation(scratch.taken);
    } else {
        scratch.generation = 0;
    }

    // The reply entry, where the flow gets one with its SYN (full NAT, and
    // nat to a shared backend): the backend's answers get the VIP as their
    // source and the client as their destination.
    let (vip, client) = ((key.daddr, key.dport), (key.saddr, key.sport));
    // What the backend sees as the client: the client itself (nat), or an
    // address and port of the balancer's, taken by inserting the reply entry
    // under them (full NAT).
    let (peer_addr, peer_port) = if full_nat {
        new_entry(&mut scratch.reply, service, choice.slot, vip, client, DIR_REPLY, mode);
        scratch.reply.forward_generation = flow_generation(scratch.generation);
        let syn = (pkt.seq(), options);
        let mut taken = take_port(key, service_row, &backend, &mut scratch.reply, syn);
        if taken == TABLE_FULL && make_room(now) {
            taken = take_port(key, service_row, &backend, &mut scratch.reply, syn);
        }
        if taken == NO_PORT {
            return Opened::Drop(Some(Counter::SnatPortsExhausted));
        }
        if taken == TABLE_FULL {
            return Opened::Drop(Some(Counter::TableFull));
        }
        ((taken >> 16) as u32, (taken as u16).to_be())
    } else if mode == MODE_DSR_IPIP {
        // The tunnel's outer source; the client's packet is not changed.
        if backend.snat_addr == 0 {
            return Opened::Drop(Some(Counter::DsrUnroutable));
        }
        (backend.snat_addr, key.sport)
    } else {
        (key.saddr, key.sport)
    };
    let (ip_diff, l4_diff) = if dsr {
        (0, 0)
    } else {
        csum_diffs((key.daddr, key.dport), (backend.addr, backend.port), (key.saddr, key.sport), (peer_addr, peer_port))
    };
    let forward = &mut scratch.forward;
    new_entry(forward, service, choice.slot, (backend.addr, backend.port), (peer_addr, peer_port), DIR_FORWARD, mode);
    forward.wscale = options.scale as u8;
    forward.ip_csum_diff = ip_diff;
    forward.l4_csum_diff = l4_diff;
    forward.seq_next = pkt.seq_end();
    // The window of a SYN is never scaled (RFC 7323 §2.2).
    forward.window = pkt.window();
    forward.last_seen = now;
    forward.opened_on = unsafe { bpf_get_smp_processor_id() } as u16;
    let reply_key = key.reply(forward);
    let reply_entry = if mode == MODE_NAT { reply_entry_for(&backend, key) } else { ReplyEntry::Now(None) };
    let later = matches!(reply_entry, ReplyEntry::Later);
    if let ReplyEntry::Now(Some((vip, port))) = reply_entry {
        // The service that sent flows to this backend first may have one
        // on this client port whose reply entry is not written yet.
        let theirs = FlowKey { saddr: key.saddr, daddr: vip, sport: key.sport, dport: port };
        if let Some(other) = FLOWS.get_ptr(&theirs) {
            let live = unsafe {
                (*other).direction == DIR_FORWARD
                    && (*other).mode == MODE_NAT
                    && (*other).nat_addr == backend.addr
                    && (*other).nat_port == backend.port
                    && !flow_closed((*other).state)
            };
            if live {
                return Opened::Drop(Some(Counter::TupleInUse));
            }
        }
    }
    if mode == MODE_NAT && !later {
        if let Some(other) = FLOWS.get_ptr(&reply_key) {
            // The backend would see this flow on the ports of one it has: two
            // services sharing a backend, a client using one source port for
            // both. Its replies could not be told apart.
            let theirs = unsafe {
                (*other).direction == DIR_REPLY && ((*other).nat_addr != key.daddr || (*other).nat_port != key.dport)
            };
            if theirs {
                if let Some(owner) = forward_of_reply(&reply_key, unsafe { &*other }) {
                    if !flow_closed(unsafe { (*owner).state }) {
                        return Opened::Drop(Some(Counter::TupleInUse));
                    }
                }
            }
        }
        new_entry(&mut scratch.reply, service, choice.slot, vip, client, DIR_REPLY, mode);
        scratch.reply.forward_generation = flow_generation(scratch.generation);
        let (ip_diff, l4_diff) = reply_diffs(key, &backend, peer_addr, peer_port);
        scratch.reply.ip_csum_diff = ip_diff;
        scratch.reply.l4_csum_diff = l4_diff;
    }
    let forward = &mut scratch.forward;
    let reply = &scratch.reply;
    // On its count before any CPU can see the flow, so that one that ends
    // it at once takes it off a count it is on. The locked add then comes
    // before the entry's stores rather than after them, where it waited for
    // them to reach memory: 10 to 20 ns of a SYN on the test machines.
    count_half_open(service, choice.slot, 1);
    // Where this fails, the count goes back, and a full-NAT flow gives its
    // port back.
    let give_back = |reply_key: &FlowKey| {
        count_half_open(service, choice.slot, -1);
        if full_nat {
            let _ = FLOWS.remove(reply_key);
        }
    };

    match existing {
        Some(entry) => {
            let observed = unsafe { core::ptr::read_volatile(&scratch.taken) };
            if observed & FLOW_EXPIRED != 0 {
                // Being deleted or rewritten right now; the client's retry
                // finds it gone or new.
                give_back(&reply_key);
                return Opened::Drop(None);
            }
            if !flow_closed(observed) && observed & (FLOW_ANSWERED | FLOW_ESTABLISHED) != 0 {
                // A live flow whose backend answered after all, since
                // `unanswered` looked: the client gets that answer
                // (`note_answered`), and this SYN is a retransmission.
                give_back(&reply_key);
                return Opened::Drop(None);
            }
            // Claimed, and marked expired while its fields are rewritten, so
            // that no other CPU judges the new generation with the old
            // fields (`judged_forward`).
            let claimed = unsafe { core::ptr::read_volatile(&scratch.generation) } | FLOW_EXPIRED;
            if !atomic::compare_exchange(unsafe { &mut (*entry).state }, observed, claimed) {
                give_back(&reply_key);
                return Opened::Drop(None);
            }
            if !flow_closed(observed) {
                // A live flow moving to another backend: the claim above made
                // this CPU the one that ends it on the old one.
                unsafe { release(&*entry, observed) };
            }
            // The old reply entry goes even on the same key when the new
            // flow's is written later: the backend's first answer must not
            // find the old connection's numbers.
            let old_reply_key = key.reply(unsafe { &*entry });
            if old_reply_key != reply_key || later {
                release_reply(key, &old_reply_key, unsafe { &*entry }, observed, now);
            }
            forward.state = claimed;
            unsafe { *entry = *forward };
            // Nothing else changes an expired entry: this only orders the
            // new state after the fields (a plain store might not be).
            atomic::compare_exchange(unsafe { &mut (*entry).state }, claimed, claimed & !FLOW_EXPIRED);
            forward.state = claimed & !FLOW_EXPIRED;
        }
        None => {
            if let Err(e) = insert_making_room(key, forward, BPF_NOEXIST as u64, now) {
                // EEXIST: another CPU opened the same flow a moment ago.
                give_back(&reply_key);
                return Opened::Drop((e != -EEXIST).then_some(Counter::TableFull));
            }
        }
    }
    count_new_flow(service, choice.slot);
    remember(key);
    if mode != MODE_NAT || later {
        // A full-NAT flow's reply entry is in already; DSR has none; this
        // nat flow's comes with the backend's first answer.
        return Opened::Flow(&scratch.forward);
    }
    if insert_making_room(&reply_key, reply, BPF_ANY as u64, now).is_err() {
        // Without its reply entry the flow cannot work: close it again.
        if let Some(entry) = FLOWS.get_ptr_mut(key) {
            mark(entry, FLOW_RESET, forward.state);
        }
        return Opened::Drop(Some(Counter::TableFull));
    }
    Opened::Flow(&scratch.forward)
}

/// Zeroes `flow` (with word stores, not this target's byte-at-a-time
/// `memset`) and sets what every entry has: its service and slot, the
/// address and port its packets are rewritten to (`nat`), those of the
/// other side (`peer`), its direction and mode.
#[inline(always)]
fn new_entry(flow: &mut Flow, service: u16, slot: u16, nat: (u32, u16), peer: (u32, u16), direction: u8, mode: u8) {
    zero(flow);
    flow.service = service;
    flow.slot = slot;
    (flow.nat_addr, flow.nat_port) = nat;
    (flow.peer_addr, flow.peer_port) = peer;
    flow.direction = direction;
    flow.mode = mode;
}

/// When a new nat flow's reply entry is written.
enum ReplyEntry {
    /// At the backend's first answer (`lazy_reply`): only this service
    /// sends flows to the backend, so its address names the service.
    Later,
    /// With the SYN. The VIP and port of the service that first sent flows
    /// to the backend, where that is another one: its flows on the same
    /// client port may be waiting for their reply entries.
    Now(Option<(u32, u16)>),
}

/// Looks the backend up in the index of which service it serves, and
/// claims it for the SYN's service (`key`) where no service has yet. A
/// second service makes it shared for good: new flows to it then get both
/// entries at once, and a full index makes them do so too.
#[inline(always)]
fn reply_entry_for(backend: &Backend, key: &FlowKey) -> ReplyEntry {
    let index = ServiceKey { addr: backend.addr, port: backend.port, proto: PROTO_TCP, _pad: 0 };
    let mut owner = BACKEND_OWNERS.get_ptr_mut(&index);
    if owner.is_none() {
        let ours = BackendOwner { vip: key.daddr, port: key.dport, shared: 0, _pad: 0 };
        if BACKEND_OWNERS.insert(&index, &ours, BPF_NOEXIST as u64).is_ok() {
            return ReplyEntry::Later;
        }
        // Another CPU's SYN claimed it a moment ago (or the index is full).
        owner = BACKEND_OWNERS.get_ptr_mut(&index);
    }
    let Some(owner) = owner else {
        return ReplyEntry::Now(None);
    };
    let owner = unsafe { &mut *owner };
    if owner.vip == key.daddr && owner.port == key.dport {
        return if owner.shared == 0 { ReplyEntry::Later } else { ReplyEntry::Now(None) };
    }
    if owner.shared == 0 {
        owner.shared = 1;
    }
    ReplyEntry::Now(Some((owner.vip, owner.port)))
}

/// What `lazy_reply` found for a packet that missed the table.
pub enum FirstAnswer {
    /// The reply entry of the flow it answers, written just now (or by
    /// another CPU a moment ago).
    Entry(*mut Flow),
    /// No flow of ours waits for it.
    NotOurs,
    /// Ours, but the table has no room for its reply entry.
    TableFull,
}

/// A packet from a backend that missed the table (`key`, as it came): if it
/// answers a nat flow whose reply entry waits for the backend's first
/// answer (`ReplyEntry::Later`), writes that entry, as the SYN would have,
/// making room as a SYN does, and returns it. `track` then judges the
/// packet as it would have judged it (`first_answer`), so a forged answer
/// still teaches nothing.
#[inline(always)]
pub fn lazy_reply(key: &FlowKey, now: u64) -> FirstAnswer {
    let written = making_room(now, || match write_lazy_reply(key) {
        error if error < 0 => Err(error),
        answer => Ok(answer),
    });
    match written {
        Ok(LAZY_WRITTEN) => FLOWS.get_ptr_mut(key).map_or(FirstAnswer::NotOurs, FirstAnswer::Entry),
        Ok(_) => FirstAnswer::NotOurs,
        Err(_) => FirstAnswer::TableFull,
    }
}

/// `write_lazy_reply`'s answers besides the insert's error.
const LAZY_WRITTEN: i32 = 0;
const LAZY_NOT_OURS: i32 = 1;

/// Writes the reply entry `lazy_reply` looks for, once, if the flow is
/// there; returns the insert's error (negative) if it failed. A function of
/// its own (a BPF-to-BPF call): its locals would otherwise add to the
/// packet path's stack, which has none to spare.
#[inline(never)]
fn write_lazy_reply(key: &FlowKey) -> i32 {
    let index = ServiceKey { addr: key.saddr, port: key.sport, proto: PROTO_TCP, _pad: 0 };
    let Some(owner) = (unsafe { BACKEND_OWNERS.get(&index) }) else {
        return LAZY_NOT_OURS;
    };
    let (vip, port) = (owner.vip, owner.port);
    let forward_key = FlowKey { saddr: key.daddr, daddr: vip, sport: key.dport, dport: port };
    let Some(forward) = FLOWS.get_ptr(&forward_key) else {
        return LAZY_NOT_OURS;
    };
    // The state first, then the fields it belongs to (`judged_forward`).
    let state = unsafe { core::ptr::read_volatile(&(*forward).state) };
    let (service, slot, ours) = unsafe {
        (
            core::ptr::read_volatile(&(*forward).service),
            core::ptr::read_volatile(&(*forward).slot),
            core::ptr::read_volatile(&(*forward).direction) == DIR_FORWARD
                && core::ptr::read_volatile(&(*forward).mode) == MODE_NAT
                && core::ptr::read_volatile(&(*forward).nat_addr) == key.saddr
                && core::ptr::read_volatile(&(*forward).nat_port) == key.sport
                && !flow_closed(state),
        )
    };
    let Some(scratch) = OPEN_SCRATCH.get_ptr_mut(0) else {
        return LAZY_NOT_OURS;
    };
    if !ours {
        return LAZY_NOT_OURS;
    }
    let reply = unsafe { &mut (*scratch).reply };
    let client = (key.daddr, key.dport);
    let (ip_diff, l4_diff) = csum_diffs((key.saddr, key.sport), (vip, port), client, client);
    new_entry(reply, service, slot, (vip, port), client, DIR_REPLY, MODE_NAT);
    reply.forward_generation = flow_generation(state);
    reply.ip_csum_diff = ip_diff;
    reply.l4_csum_diff = l4_diff;
    match FLOWS.insert(key, reply, BPF_NOEXIST as u64) {
        Ok(()) => LAZY_WRITTEN,
        // Another CPU wrote it a moment ago.
        Err(e) if e == -EEXIST => LAZY_WRITTEN,
        Err(e) => e,
    }
}

/// Lets go of the reply entry of a flow (`old`, whose state was
/// `old_state`, on the client's `key`) whose 5-tuple a new flow has just
/// taken over. A full-NAT flow's port that the backend answered on and that
/// no RST ended stays taken, as a hold: the backend may keep the old
/// connection in TIME_WAIT, and a new flow given the port with a SYN that
/// TIME_WAIT refuses would stall (the one-second stall of balancers that
/// hand ports out again at once). Other entries are removed. Either way only
/// if the entry is still this flow's, claimed by compare-and-swap against a
/// `take_over` on another CPU.
#[inline(always)]
fn release_reply(key: &FlowKey, reply_key: &FlowKey, old: &Flow, old_state: u32, now: u64) {
    let Some(reply) = FLOWS.get_ptr_mut(reply_key) else {
        return;
    };
    let (observed, answered) = unsafe { (core::ptr::read_volatile(&(*reply).state), (*reply).last_seen != 0) };
    if !is_reply_of(unsafe { &*reply }, key) || observed & FLOW_EXPIRED != 0 {
        return;
    }
    if old.mode == MODE_FULLNAT && answered && old_state & FLOW_RESET == 0 {
        if atomic::compare_exchange(unsafe { &mut (*reply).state }, observed, next_generation(observed)) {
            unsafe {
                (*reply).seq_next = old.seq_next;
                (*reply).ts_recent = old.ts_recent;
                (*reply).ts_seen = old.ts_seen;
                (*reply).last_seen = now;
                (*reply).direction = DIR_HOLD;
            }
        }
        return;
    }
    remove_claimed(reply, observed, reply_key);
}

/// Whether `reply` is the reply entry of the flow on the client's `key`, and
/// not a new full-NAT flow's that took its port over (`take_over`).
#[inline(always)]
fn is_reply_of(reply: &Flow, key: &FlowKey) -> bool {
    reply.direction == DIR_REPLY
        && reply.nat_addr == key.daddr
        && reply.nat_port == key.dport
        && reply.peer_addr == key.saddr
        && reply.peer_port == key.sport
}

/// Removes `entry` (under `key`, its state `observed`) if no other CPU has
/// changed it meanwhile: a SYN taking a port over wins against its removal.
#[inline(always)]
fn remove_claimed(entry: *mut Flow, observed: u32, key: &FlowKey) -> bool {
    if !atomic::compare_exchange(unsafe { &mut (*entry).state }, observed, observed | FLOW_EXPIRED) {
        return false;
    }
    let _ = FLOWS.remove(key);
    true
}

/// The state a reused entry starts from: no flags, the next generation.
#[inline(always)]
fn next_generation(state: u32) -> u32 {
    (state & !FLAG_BITS).wrapping_add(FLOW_GENERATION_ONE)
}

/// The checksum differences of a reply's rewrite: the backend's address
/// becomes the VIP, and the peer it answered the client.
#[inline(always)]
fn reply_diffs(key: &FlowKey, backend: &Backend, peer_addr: u32, peer_port: u16) -> (u16, u16) {
    csum_diffs((backend.addr, backend.port), (key.daddr, key.dport), (peer_addr, peer_port), (key.saddr, key.sport))
}

/// Ports a full-NAT SYN tries, each picked at random (not one after the
/// other: taken ports cluster, and a run of them would fail a SYN long
/// before the range is full). With a fraction `f` of the range taken
/// towards a backend, a SYN finds none free with a chance of f^16: 1 in
/// 600 at two thirds full, 1 in 35 at 80 %.
const PORT_TRIES: u32 = 16;
/// `take_port`'s answers besides a port.
const NO_PORT: u64 = 0;
const TABLE_FULL: u64 = 1;

/// Takes a source address and port of the service's for a new full-NAT
/// flow to `backend`: the reply entry (`reply`, filled in but for its
/// checksums) goes into the table under the key the backend will answer
/// with, if no flow holds that key, or in place of a closed flow's entry
/// that the new SYN (`syn`) may take over (`take_over`); a live flow's port
/// is never handed out again. Ports are taken per address and backend: a
/// busy backend does not use up the others'. `PORT_TRIES` random ports are
/// tried. Returns the
/// address (network order) << 16 | port (host order), or `NO_PORT` when
/// every port tried is taken, or `TABLE_FULL`. (Plain integers: an Option's
/// payload would be spilled unset.)
#[inline(always)]
fn take_port(key: &FlowKey, service: &Service, backend: &Backend, reply: &mut Flow, syn: (u32, TcpOptions)) -> u64 {
    let count = service.snat_count;
    if count as usize > MAX_SNAT_ADDRS || service.port_last < service.port_first {
        return NO_PORT;
    }
    let addr = if count == 0 {
        backend.snat_addr
    } else {
        let random = unsafe { bpf_get_prandom_u32() };
        // Opaque, so LLVM keeps the mask the verifier needs (it proves it
        // redundant, count being at most 4, and would drop it).
        let index = core::hint::black_box((random % count) as usize) & (MAX_SNAT_ADDRS - 1);
        service.snat_addrs[index]
    };
    if addr == 0 {
        return NO_PORT;
    }
    let range = (service.port_last - service.port_first) as u32 + 1;
    for _ in 0..PORT_TRIES {
        let port = service.port_first + (unsafe { bpf_get_prandom_u32() } % range) as u16;
        let (ip_diff, l4_diff) = reply_diffs(key, backend, addr, port.to_be());
        reply.ip_csum_diff = ip_diff;
        reply.l4_csum_diff = l4_diff;
        let reply_key = FlowKey { saddr: backend.addr, daddr: addr, sport: backend.port, dport: port.to_be() };
        match FLOWS.insert(&reply_key, &*reply, BPF_NOEXIST as u64) {
            Ok(()) => return (addr as u64) << 16 | port as u64,
            Err(e) if e == -EEXIST => {
                if take_over(&reply_key, reply, syn) {
                    return (addr as u64) << 16 | port as u64;
                }
            }
            Err(_) => return TABLE_FULL,
        }
    }
    NO_PORT
}

/// Takes a port the table holds for a closed full-NAT flow (its reply
/// entry, or the hold a reused 5-tuple left) for a new flow, when the
/// backend will take the new SYN (`syn`: its sequence number and options)
/// even if it still has the old connection in TIME_WAIT: the old one ended
/// with an RST, or `time_wait_accepts` it (RFC 6191). Without this a port
/// would wait out the whole hold after every connection, and a busy service
/// would run out of ports at a few hundred connections a second. The entry
/// is claimed by compare-and-swap, against another CPU's SYN, the agent's
/// aging and the old flow's own reuse, and then rewritten in place as the
/// new flow's reply entry (`reply`).
#[inline(always)]
fn take_over(reply_key: &FlowKey, reply: &Flow, syn: (u32, TcpOptions)) -> bool {
    let Some(entry) = FLOWS.get_ptr_mut(reply_key) else {
        return false;
    };
    let observed = unsafe { core::ptr::read_volatile(&(*entry).state) };
    if observed & FLOW_EXPIRED != 0 {
        return false;
    }
    // What the old connection's client sent last, as the backend's
    // TIME_WAIT remembers it.
    let old: &Flow = match unsafe { (*entry).direction } {
        DIR_HOLD => unsafe { &*entry },
        DIR_REPLY => {
            let Some(forward) = forward_of_reply(reply_key, unsafe { &*entry }) else {
                return false;
            };
            let forward = unsafe { &*forward };
            let state = unsafe { core::ptr::read_volatile(&forward.state) };
            let points_here = forward.peer_addr == reply_key.daddr && forward.peer_port == reply_key.dport;
            if forward.mode != MODE_FULLNAT || !points_here || !flow_closed(state) || state & FLOW_EXPIRED != 0 {
                return false;
            }
            if state & FLOW_RESET != 0 {
                // An RST leaves no TIME_WAIT behind.
                return claim(entry, observed, reply);
            }
            forward
        }
        _ => return false,
    };
    let (seq, options) = syn;
    let old_ts = if old.ts_seen != 0 { Some(old.ts_recent) } else { None };
    let syn_ts = if options.ts_seen != 0 { Some(options.ts) } else { None };
    time_wait_accepts(old.seq_next, old_ts, seq, syn_ts) && claim(entry, observed, reply)
}

/// Makes `entry` (whose state was `observed`) `reply` if no other CPU has
/// changed it meanwhile.
#[inline(always)]
fn claim(entry: *mut Flow, observed: u32, reply: &Flow) -> bool {
    let state = next_generation(observed);
    if !atomic::compare_exchange(unsafe { &mut (*entry).state }, observed, state) {
        return false;
    }
    unsafe { *entry = Flow { state, ..*reply } };
    true
}

/// Inserts `value` under `key`, making room when the table is full, up to
/// `ROOM_ROUNDS` times while victims are found. Under a flood two CPUs can
/// choose the same victim, which goes once, or the room one CPU made can be
/// taken by the other's SYN before its own insert: the next round takes the
/// next victim.
#[inline(always)]
fn insert_making_room(key: &FlowKey, value: &Flow, flags: u64, now: u64) -> Result<(), i32> {
    making_room(now, || FLOWS.insert(key, value, flags))
}

/// Runs `insert` (an insert into the table, or what wraps one) again after
/// making room, while it fails for want of room and victims are found.
#[inline(always)]
fn making_room<T>(now: u64, mut insert: impl FnMut() -> Result<T, i32>) -> Result<T, i32> {
    let mut inserted = insert();
    for _ in 0..ROOM_ROUNDS {
        match inserted {
            Err(e) if e != -EEXIST && find_victim(now) => {
                evict_victim(now);
                inserted = insert();
            }
            _ => break,
        }
    }
    inserted
}

const ROOM_ROUNDS: u32 = 4;

/// Flows one search for room passes, at most, in one CPU's ring.
const ROOM_TRIES: u32 = 16;
/// Entries whose flows are gone already that one search passes on top, at
/// most. The agent's aging removes a run of the oldest flows at once (a few
/// thousand under a flood); were they judged like live ones, every SYN once
/// the flood has refilled the table would give up on 16 of them and be
/// dropped, until the run was passed. Each entry is passed once, so a run
/// costs the same however it is split; on one packet, at most about half a
/// millisecond on the test machines.
const GONE_PASSES: u32 = 4096;

/// Writes a flow just opened into this CPU's ring of recent openings.
#[inline(always)]
fn remember(key: &FlowKey) {
    let (Some(clock), Some(cursor)) = (CLOCK.get(0), OPENED_CURSOR.get_ptr_mut(0)) else {
        return;
    };
    let ring = clock.opened_ring;
    let c = unsafe { &mut *cursor };
    if ring == 0 || c.write >= ring {
        return;
    }
    if let Some(slot) = OPENED.get_ptr_mut(c.write) {
        unsafe { *slot = *key };
    }
    c.write = if c.write + 1 >= ring { 0 } else { c.write + 1 };
    if c.pending >= ring {
        // Lapped: the oldest entry now is the one after this.
        c.evict = c.write;
    } else {
        c.pending += 1;
    }
}

/// Makes room in a full table for a new flow, from the flows this CPU
/// opened, oldest first: the first that is dead — closed, or idle past its
/// state's eviction timeout (`Clock::evict`: half-open flows after a
/// second) — goes, through `expire`, so its count comes down exactly once
/// and a packet arriving meanwhile keeps it. Flows already gone, and
/// established ones in use, are passed for good; a half-open flow still
/// young ends the search, since every later one is younger. Under a SYN
/// flood the flood's own oldest flows make room for real clients; with no
/// agent running, closed flows do. When this CPU's own flows have none to
/// give (the flood's SYNs arrive on another CPU), another CPU's are
/// searched the same way (`another_cpus_victim`). O(1): at most
/// `ROOM_TRIES` flows and `GONE_PASSES` gone ones in each of two rings.
#[inline(always)]
fn make_room(now: u64) -> bool {
    find_victim(now) && evict_victim(now)
}

/// The search, and then the eviction, are each a function of their own in
/// the program (BPF-to-BPF calls), called from the packet path: the
/// verifier checks them once per call site instead of once per path through
/// the packet path, and neither's stack adds to the other's, nor to the
/// search's `bpf_loop` turns', within the 512 bytes the packet path leaves.
#[inline(never)]
fn find_victim(now: u64) -> bool {
    own_victim(now) || another_cpus_victim(now)
}

#[inline(never)]
fn evict_victim(now: u64) -> bool {
    let (Some(clock), Some(search)) = (CLOCK.get(0), ROOM_SEARCH.get_ptr(0)) else {
        return false;
    };
    // The victim stays in this CPU's search: nothing in `expire` searches.
    let freed = expire(unsafe { &(*search).victim }, &clock.evict, now);
    if freed {
        stats::count(Counter::Evicted);
    }
    freed
}

/// Finds a dead flow among the oldest this CPU opened (into
/// `RoomSearch::victim`). The search moves this CPU's cursor on past what it
/// passed, and past the victim too: a packet that keeps it alive proves it
/// alive.
#[inline(always)]
fn own_victim(now: u64) -> bool {
    let Some(cursor) = OPENED_CURSOR.get_ptr_mut(0) else { return false };
    let c = unsafe { &mut *cursor };
    let Some(search) = search_ring(now, unsafe { bpf_get_smp_processor_id() }, c.evict, c.pending) else {
        return false;
    };
    let search = unsafe { &*search };
    c.evict = search.at;
    c.pending = search.left;
    search.found != 0
}

/// Finds a dead flow among the oldest another CPU opened, for a CPU whose own
/// have none to give: its SYNs would otherwise all be dropped while a flood
/// arriving on other CPUs fills the table. The search goes through the
/// other CPU's ring as that CPU's own would, from where this CPU last took
/// from it, and keeps its place in this CPU's `RoomSearch`; the other CPU's
/// cursor is only read. A read that races with the other CPU's writes at
/// worst judges a different flow, which must still be dead, and `expire`
/// removes a flow atomically, so two CPUs choosing the same one free it
/// once.
#[inline(always)]
fn another_cpus_victim(now: u64) -> bool {
    let (Some(clock), Some(place)) = (CLOCK.get(0), ROOM_SEARCH.get_ptr(0)) else {
        return false;
    };
    let (cpus, ring) = (clock.cpus, clock.opened_ring);
    let me = unsafe { bpf_get_smp_processor_id() };
    if cpus < 2 || ring == 0 {
        return false;
    }
    let (mut other, mut at) = unsafe { ((*place).steal_cpu, (*place).steal_at) };
    if other == me || other >= cpus {
        other = (me + 1 + random() % (cpus - 1)) % cpus;
        at = u32::MAX;
    }
    let first = 0u32;
    let cursor = unsafe { percpu_elem(&OPENED_CURSOR as *const _ as *mut c_void, &first, other) } as *const RingCursor;
    if cursor.is_null() {
        return false;
    }
    let (evict, pending) =
        unsafe { (core::ptr::read_volatile(&(*cursor).evict), core::ptr::read_volatile(&(*cursor).pending)) };
    // Where this CPU left off, if the other CPU's own search has not passed
    // it since; else the other CPU's oldest.
    let ahead = if at < ring && evict < ring { (at + ring - evict) % ring } else { u32::MAX };
    let (at, left) = if ahead < pending { (at, pending - ahead) } else { (evict, pending) };
    let Some(search) = search_ring(now, other, at, left) else { return false };
    let search = unsafe { &mut *search };
    search.steal_at = search.at;
    // Nothing there: another CPU, at random, next time.
    search.steal_cpu = if search.found != 0 { other } else { u32::MAX };
    search.found != 0
}

/// Searches `cpu`'s ring for room from entry `at`, with `left` entries to
/// go, one entry a turn of a `bpf_loop` (`search_turn`): the verifier
/// checks the turn once, where a loop would be checked turn by turn.
#[inline(always)]
fn search_ring(now: u64, cpu: u32, at: u32, left: u32) -> Option<*mut RoomSearch> {
    let search = ROOM_SEARCH.get_ptr_mut(0)?;
    unsafe {
        let s = &mut *search;
        (s.now, s.cpu, s.at, s.left, s.judged, s.found) = (now, cpu, at, left, 0, 0);
        bpf_loop(ROOM_TRIES + GONE_PASSES, search_turn as *mut c_void, core::ptr::null_mut(), 0);
    }
    Some(search)
}

/// One turn of `search_ring`: 0 to go on, 1 to stop.
#[inline(never)]
extern "C" fn search_turn(_turn: u64, _context: *mut c_void) -> i64 {
    let (Some(clock), Some(search)) = (CLOCK.get(0), ROOM_SEARCH.get_ptr_mut(0)) else {
        return 1;
    };
    let s = unsafe { &mut *search };
    let ring = clock.opened_ring;
    if s.left == 0 || s.at >= ring || s.judged >= ROOM_TRIES {
        return 1;
    }
    let slot = unsafe { percpu_elem(&OPENED as *const _ as *mut c_void, &s.at, s.cpu) } as *const FlowKey;
    if slot.is_null() {
        return 1;
    }
    // Judged in a copy (another CPU may be writing the entry), kept in the
    // search rather than on the stack, which has no room to spare.
    s.victim = unsafe { *slot };
    let candidate = judge(&s.victim, clock, s.now);
    if matches!(candidate, Candidate::Young) {
        return 1; // so are all after it
    }
    s.at = if s.at + 1 >= ring { 0 } else { s.at + 1 };
    s.left -= 1;
    match candidate {
        Candidate::Dead => {
            s.found = 1;
            1
        }
        Candidate::Passed => {
            s.judged += 1;
            0
        }
        Candidate::Gone | Candidate::Young => 0,
    }
}

/// What a search for room makes of a ring entry's flow.
enum Candidate {
    /// Closed, or idle past its state's eviction timeout: it may go.
    Dead,
    /// Half-open and not idle long enough yet.
    Young,
    /// Established and in use, or the key is not a forward entry's now.
    Passed,
    /// No longer in the table.
    Gone,
}

#[inline(always)]
fn judge(key: &FlowKey, clock: &Clock, now: u64) -> Candidate {
    match unsafe { FLOWS.get(key) } {
        Some(flow) if flow.direction == DIR_FORWARD => {
            let idle = now.saturating_sub(flow.last_seen);
            if idle >= flow_timeout(&clock.evict, flow.state, flow.mode) {
                Candidate::Dead
            } else if flow.state & FLOW_ESTABLISHED == 0 && !flow_closed(flow.state) {
                Candidate::Young
            } else {
                Candidate::Passed
            }
        }
        Some(_) => Candidate::Passed,
        None => Candidate::Gone,
    }
}

#[inline(always)]
fn random() -> u32 {
    unsafe { bpf_get_prandom_u32() }
}

/// `cpu`'s value at `key` in a per-CPU map (`bpf_map_lookup_percpu_elem`).
#[inline(always)]
unsafe fn percpu_elem(map: *mut c_void, key: &u32, cpu: u32) -> *mut c_void {
    bpf_map_lookup_percpu_elem(map, key as *const u32 as *const c_void, cpu)
}

/// Closes a live flow at the agent's request (its backend died and the
/// service resets such flows): the count is released now, the entries stay
/// until aged, and the client's next packet is answered with an RST.
#[inline(always)]
pub fn reset(key: &FlowKey) -> bool {
    match FLOWS.get_ptr_mut(key) {
        Some(forward) if unsafe { (*forward).direction } == DIR_FORWARD => {
            mark(forward, FLOW_ABORTED, unsafe { core::ptr::read_volatile(&(*forward).state) })
        }
        _ => false,
    }
}

/// The client's packets on a flow the agent closed get an RST back instead
/// of going to a dead backend. Flows closed by their own endpoints do not:
/// their trailing segments go through.
#[inline(always)]
pub fn answer_with_reset(flow: &Flow) -> bool {
    flow.direction == DIR_FORWARD && flow.state & FLOW_ABORTED != 0 && flow.state & FLOW_EXPIRED == 0
}

/// Removes a forward flow and its reply entry, or a held port, if it has
/// been idle for its state's timeout. The agent calls this for entries its
/// scan found idle; the check is made again here, atomically with the
/// removal.
#[inline(always)]
pub fn expire(key: &FlowKey, timeouts: &Timeouts, now: u64) -> bool {
    let Some(forward) = FLOWS.get_ptr_mut(key) else {
        return false;
    };
    if unsafe { (*forward).direction } == DIR_HOLD {
        let hold = forward;
        let (observed, last_seen) = unsafe { (core::ptr::read_volatile(&(*hold).state), (*hold).last_seen) };
        let held_long_enough = now.saturating_sub(last_seen) >= flow_timeout(timeouts, FLOW_RESET, MODE_FULLNAT);
        return observed & FLOW_EXPIRED == 0 && held_long_enough && remove_claimed(hold, observed, key);
    }
    let observed = unsafe {
        if (*forward).direction != DIR_FORWARD {
            return false;
        }
        core::ptr::read_volatile(&(*forward).state)
    };
    if observed & FLOW_EXPIRED != 0 {
        return false;
    }
    // The flow's other fields are read where they are needed, not held
    // across the helper calls: this runs within the packet path's stack
    // (`evict_victim`), which has no room to keep them. Its service, slot
    // and mode change only with its state (a SYN reusing the entry claims
    // the state first), which the claim below checks; its `last_seen`,
    // read later, is only the fresher.
    let reply_key = key.reply(unsafe { &*forward });
    let dsr = mode_is_dsr(unsafe { (*forward).mode });
    let reply = if dsr { None } else { FLOWS.get_ptr_mut(&reply_key) };
    let reply_is_ours = reply.filter(|reply| is_reply_of(unsafe { &**reply }, key));
    let (replied_at, reply_state) = reply_is_ours
        .map_or((0, 0), |reply| unsafe { ((*reply).last_seen, core::ptr::read_volatile(&(*reply).state)) });
    let latest = flow_last_active(observed, unsafe { (*forward).last_seen }, replied_at);
    if now.saturating_sub(latest) < flow_timeout(timeouts, observed, unsafe { (*forward).mode }) {
        return false;
    }
    if !atomic::compare_exchange(unsafe { &mut (*forward).state }, observed, observed | FLOW_EXPIRED) {
        return false; // a packet changed it meanwhile: not idle after all
    }
    let reply = reply_is_ours.filter(|&reply| {
        reply_state & FLOW_EXPIRED == 0
            && atomic::compare_exchange(unsafe { &mut (*reply).state }, reply_state, reply_state | FLOW_EXPIRED)
    });
    // Claimed. A segment notes its time before it reads its entry's state
    // (`touched`): one that did so before these claims shows now, and the
    // flow stays; one after them sees a claim and goes no further.
    let replied_at = reply.map_or(replied_at, |reply| unsafe { core::ptr::read_volatile(&(*reply).last_seen) });
    let latest = flow_last_active(observed, unsafe { core::ptr::read_volatile(&(*forward).last_seen) }, replied_at);
    if now.saturating_sub(latest) < flow_timeout(timeouts, observed, unsafe { (*forward).mode }) {
        // Given back as it was. Nothing changes a claimed entry's state
        // (`same_flow`) but a handshake's ACK (`establish`), which counted
        // nothing and went no further: its bit goes too.
        if let Some(reply) = reply {
            atomic::and(unsafe { &mut (*reply).state }, !FLOW_EXPIRED);
        }
        atomic::and(unsafe { &mut (*forward).state }, !(FLOW_EXPIRED | (FLOW_ESTABLISHED & !observed)));
        return false;
    }
    if !flow_closed(observed) {
        unsafe { release(&*forward, observed) };
    }
    if reply.is_some() {
        let _ = FLOWS.remove(&reply_key);
    }
    let _ = FLOWS.remove(key);
    true
}
