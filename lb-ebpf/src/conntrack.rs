//! The connection table: finding a packet's flow, opening flows on SYN,
//! following FIN/RST, and counting each flow on its backend exactly once.
//!
//! A flow counts as active from the moment it is assigned until its forward
//! entry's state first becomes closed. Every change of that state is atomic
//! (fetch-or, compare-and-swap), so exactly one CPU or expire call sees the
//! change from live to closed, and only that one takes the count down.
use aya_ebpf::bindings::{BPF_ANY, BPF_NOEXIST};
use lb_common::{
    flow_closed, flow_timeout, Counter, Flow, FlowKey, ServiceKey, Timeouts, DIR_FORWARD,
    DIR_REPLY, FLOW_BACKEND_FIN, FLOW_CLIENT_FIN, FLOW_EXPIRED, FLOW_GENERATION_ONE, FLOW_RESET,
    MAX_BACKENDS, PROTO_TCP, TCP_FIN, TCP_RST,
};

use crate::{
    atomic,
    clock::Now,
    maps::{ACTIVE, FLOWS, SERVICES},
    nat::csum_diffs,
    parse::TcpPacket,
    schedule, stats,
};

const EEXIST: i32 = 17;
const FLAG_BITS: u32 = FLOW_GENERATION_ONE - 1;

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
    /// The backend refused the handshake and another backend can take the
    /// flow: the RST is dropped, and the client's SYN retransmission moves
    /// to that backend (the layer-4 form of nginx's next-upstream retry).
    RefusalSwallowed,
}

/// Bookkeeping for a packet of a known flow.
#[inline(always)]
pub fn track(pkt: &TcpPacket, key: &FlowKey, flow: *mut Flow, now: &Now) -> Tracked {
    let last_seen = unsafe { (*flow).last_seen };
    let direction = unsafe { (*flow).direction };
    if direction == DIR_REPLY && last_seen == 0 && pkt.flags & TCP_RST != 0 {
        // The backend's first answer is a refusal: a passive health failure.
        let (service, slot) = unsafe { ((*flow).service, (*flow).slot) };
        if let Some(s) = stats::backend(service, slot) {
            unsafe { (*s).refused += 1 };
        }
        if schedule::choose(service as u32, slot as u32).is_some() {
            return Tracked::RefusalSwallowed;
        }
    }
    if now.ticks.wrapping_sub(last_seen) >= now.touch_every {
        unsafe { (*flow).last_seen = now.ticks };
    }
    if pkt.flags & (TCP_FIN | TCP_RST) == 0 {
        return Tracked::Forward;
    }
    let bit = if pkt.flags & TCP_RST != 0 {
        FLOW_RESET
    } else if direction == DIR_FORWARD {
        FLOW_CLIENT_FIN
    } else {
        FLOW_BACKEND_FIN
    };
    if direction == DIR_FORWARD {
        mark(flow, bit);
    } else if let Some(forward) = forward_of_reply(key, flow) {
        mark(forward, bit);
    }
    Tracked::Forward
}

/// The forward entry a reply entry belongs to: its client is the reply's
/// destination, its VIP the reply's rewrite target.
#[inline(always)]
fn forward_of_reply(key: &FlowKey, reply: *const Flow) -> Option<*mut Flow> {
    let (service, slot) = unsafe { ((*reply).service, (*reply).slot) };
    let forward = FLOWS.get_ptr_mut(&key.forward(unsafe { &*reply }))?;
    let same = unsafe {
        (*forward).direction == DIR_FORWARD
            && (*forward).service == service
            && (*forward).slot == slot
    };
    same.then_some(forward)
}

/// Sets a state bit; takes the flow off its backend's count if this is what
/// closed it.
#[inline(always)]
fn mark(forward: *mut Flow, bit: u32) {
    let before = atomic::fetch_or(unsafe { &mut (*forward).state }, bit);
    if !flow_closed(before) && flow_closed(before | bit) {
        unsafe { release((*forward).service, (*forward).slot) };
    }
}

#[inline(always)]
fn active_count(service: u16, slot: u16) -> Option<*mut u64> {
    let counts = ACTIVE.get_ptr_mut(service as u32)?;
    Some(unsafe { &mut (*counts).active[(slot as u32 & (MAX_BACKENDS - 1)) as usize] })
}

#[inline(always)]
fn release(service: u16, slot: u16) {
    if let Some(count) = active_count(service, slot) {
        atomic::add(count, u64::MAX); // minus one
    }
    stats::count(Counter::ClosedFlows);
}

#[inline(always)]
fn assign(service: u16, slot: u16) {
    if let Some(count) = active_count(service, slot) {
        atomic::add(count, 1);
    }
    if let Some(s) = stats::backend(service, slot) {
        unsafe { (*s).new_flows += 1 };
    }
    stats::count(Counter::NewFlows);
}

/// Whether a client's SYN opens a flow, and if so which backend slot to
/// avoid (`NO_SLOT`: none). It opens one unless its flow is live and
/// answered (then it is a retransmission); a live flow whose backend left
/// the SYN unanswered moves to another backend if one can take it.
#[inline(always)]
pub fn syn_opens(key: &FlowKey, existing: Option<*mut Flow>) -> Option<u32> {
    match existing {
        None => Some(schedule::NO_SLOT),
        Some(entry) if reusable(entry) => Some(schedule::NO_SLOT),
        Some(entry) if unanswered(key, entry) => {
            count_unanswered(entry);
            Some(unsafe { (*entry).slot } as u32)
        }
        Some(_) => None,
    }
}

/// The client is sending its SYN again and the backend has not answered:
/// a passive health failure, and the flow may move to another backend.
#[inline(always)]
fn unanswered(key: &FlowKey, forward: *const Flow) -> bool {
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
    Flow(Flow),
    NotAService,
    /// Asked to avoid the flow's backend, and no other can take it.
    NoOtherBackend,
    Drop(Option<Counter>),
}

/// A SYN to open a flow: choose a backend and record the flow both ways.
/// `existing` is the forward entry on the same 5-tuple, if any: a closed
/// flow whose ports are reused, or (with `avoid` set to its slot, otherwise
/// `NO_SLOT`) a live one whose backend left the SYN unanswered.
#[inline(always)]
pub fn open(key: &FlowKey, existing: Option<*mut Flow>, now: u64, avoid: u32) -> Opened {
    let service_key = ServiceKey { addr: key.daddr, port: key.dport, proto: PROTO_TCP, _pad: 0 };
    let Some(service) = (unsafe { SERVICES.get(&service_key) }) else {
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
    let service = service_id as u16;

    let (ip_diff, l4_diff) = csum_diffs(key.daddr, key.dport, backend.addr, backend.port);
    let mut forward = Flow {
        state: 0,
        service,
        slot: choice.slot,
        nat_addr: backend.addr,
        nat_port: backend.port,
        direction: DIR_FORWARD,
        ip_csum_diff: ip_diff,
        l4_csum_diff: l4_diff,
        last_seen: now,
        ..Flow::default()
    };
    let reply_key = key.reply(&forward);
    let (ip_diff, l4_diff) = csum_diffs(backend.addr, backend.port, key.daddr, key.dport);
    let reply = Flow {
        service,
        slot: choice.slot,
        nat_addr: key.daddr,
        nat_port: key.dport,
        direction: DIR_REPLY,
        ip_csum_diff: ip_diff,
        l4_csum_diff: l4_diff,
        ..Flow::default()
    };

    match existing {
        Some(entry) => {
            let observed = unsafe { core::ptr::read_volatile(&(*entry).state) };
            if observed & FLOW_EXPIRED != 0 {
                // Being deleted right now; the client's retry finds it gone.
                return Opened::Drop(None);
            }
            forward.state = (observed & !FLAG_BITS).wrapping_add(FLOW_GENERATION_ONE);
            if !atomic::compare_exchange(unsafe { &mut (*entry).state }, observed, forward.state) {
                return Opened::Drop(None);
            }
            if !flow_closed(observed) {
                // A live flow moving to another backend: the claim above made
                // this CPU the one that ends it on the old one.
                unsafe { release((*entry).service, (*entry).slot) };
            }
            let old_reply_key = key.reply(unsafe { &*entry });
            if old_reply_key != reply_key {
                let _ = FLOWS.remove(&old_reply_key);
            }
            unsafe { *entry = forward };
        }
        None => {
            if let Err(e) = FLOWS.insert(key, &forward, BPF_NOEXIST as u64) {
                // EEXIST: another CPU opened the same flow a moment ago.
                return Opened::Drop((e != -EEXIST).then_some(Counter::TableFull));
            }
        }
    }
    assign(service, choice.slot);
    if FLOWS.insert(&reply_key, &reply, BPF_ANY as u64).is_err() {
        // Without its reply entry the flow cannot work: close it again.
        if let Some(entry) = FLOWS.get_ptr_mut(key) {
            mark(entry, FLOW_RESET);
        }
        return Opened::Drop(Some(Counter::TableFull));
    }
    Opened::Flow(forward)
}

/// Closes a live flow at the agent's request (its backend died and the
/// service resets such flows): the count is released now, the entries stay
/// until aged, and the client's next packet is answered with an RST.
#[inline(always)]
pub fn reset(key: &FlowKey) -> bool {
    match FLOWS.get_ptr_mut(key) {
        Some(forward) if unsafe { (*forward).direction } == DIR_FORWARD => {
            let before = atomic::fetch_or(unsafe { &mut (*forward).state }, FLOW_RESET);
            let closed_now = !flow_closed(before);
            if closed_now {
                unsafe { release((*forward).service, (*forward).slot) };
            }
            closed_now
        }
        _ => false,
    }
}

/// The client's packets on a reset flow get an RST back instead of going to
/// a dead backend.
#[inline(always)]
pub fn answer_with_reset(flow: &Flow) -> bool {
    flow.direction == DIR_FORWARD && flow.state & FLOW_RESET != 0 && flow.state & FLOW_EXPIRED == 0
}

/// Removes a forward flow and its reply entry if it has been idle for its
/// state's timeout. The agent calls this for flows its scan found idle; the
/// check is made again here, atomically with the removal.
#[inline(always)]
pub fn expire(key: &FlowKey, timeouts: &Timeouts, now: u64) -> bool {
    let Some(forward) = FLOWS.get_ptr_mut(key) else {
        return false;
    };
    let (observed, last_seen, service, slot) = unsafe {
        if (*forward).direction != DIR_FORWARD {
            return false;
        }
        (core::ptr::read_volatile(&(*forward).state), (*forward).last_seen, (*forward).service, (*forward).slot)
    };
    if observed & FLOW_EXPIRED != 0 {
        return false;
    }
    let reply_key = key.reply(unsafe { &*forward });
    let mut replied_at = 0u64;
    let mut reply_is_ours = false;
    if let Some(reply) = FLOWS.get_ptr(&reply_key) {
        unsafe {
            reply_is_ours = (*reply).direction == DIR_REPLY
                && (*reply).nat_addr == key.daddr
                && (*reply).nat_port == key.dport;
            if reply_is_ours {
                replied_at = (*reply).last_seen;
            }
        }
    }
    let latest = if replied_at > last_seen { replied_at } else { last_seen };
    if now.saturating_sub(latest) < flow_timeout(timeouts, observed, replied_at != 0) {
        return false;
    }
    if !atomic::compare_exchange(unsafe { &mut (*forward).state }, observed, observed | FLOW_EXPIRED) {
        return false; // a packet changed it meanwhile: not idle after all
    }
    if !flow_closed(observed) {
        release(service, slot);
    }
    if reply_is_ours {
        let _ = FLOWS.remove(&reply_key);
    }
    let _ = FLOWS.remove(key);
    true
}
