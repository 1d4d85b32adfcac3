//! The XDP load balancer: parse → look up → choose → rewrite → send.
#![no_std]
#![no_main]
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod atomic;
mod clock;
mod conntrack;
mod csum;
mod decap;
mod forward;
mod icmp;
mod ipv4;
mod maps;
mod nat;
mod parse;
mod reset;
mod schedule;
mod stats;
mod trace;
mod tunnel;
mod zero;

use aya_ebpf::{
    bindings::xdp_action::{XDP_ABORTED, XDP_DROP, XDP_PASS},
    helpers::{bpf_jiffies64, bpf_ktime_get_ns},
    macros::xdp,
    programs::XdpContext,
};
use conntrack::{FirstAnswer, Opened};
use lb_common::{Counter, ExpireRequest, Flow, EXPIRE_BATCH, EXPIRE_RESET};
use parse::Parsed;
use schedule::NO_SLOT;

const PASS: (u32, Counter) = (XDP_PASS, Counter::VerdictPass);
const DROP: (u32, Counter) = (XDP_DROP, Counter::VerdictDrop);

#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    let (action, verdict) = balance(&ctx);
    stats::count_verdict(verdict);
    action
}

#[inline(always)]
fn balance(ctx: &XdpContext) -> (u32, Counter) {
    // Parse.
    let pkt = match parse::parse(ctx) {
        Parsed::Tcp(pkt) => pkt,
        Parsed::Icmp(err) => return answered(icmp::translate(ctx, &err)),
        Parsed::Pass(reason) => {
            if let Some(reason) = reason {
                stats::count(reason);
            }
            return PASS;
        }
        Parsed::Drop(reason) => {
            stats::count(reason);
            return DROP;
        }
    };

    // Look up the flow; on a SYN that opens one, choose a backend.
    let key = pkt.key();
    let mut existing = conntrack::lookup(&key);
    if existing.is_none() && !pkt.is_syn() {
        // A backend's first answer to a nat flow, whose reply entry it
        // writes; or not a flow of ours: the host's own traffic, or a stray
        // segment the kernel will answer.
        match conntrack::lazy_reply(&key, unsafe { bpf_jiffies64() }) {
            FirstAnswer::Entry(entry) => existing = Some(entry),
            FirstAnswer::NotOurs => return PASS,
            FirstAnswer::TableFull => {
                stats::count(Counter::TableFull);
                return DROP;
            }
        }
    }
    if pkt.ttl() <= 1 {
        // Forwarding would leave TTL 0: a router answers time exceeded.
        let from = match existing {
            Some(entry) => icmp::our_address(&key, unsafe { &*entry }),
            None if conntrack::is_service(&key) => key.daddr,
            None => return PASS,
        };
        return answered(icmp::answer(ctx, &pkt, forward::Refusal::TtlExpired, from));
    }
    let now = clock::now();
    let mut opened = None;
    if pkt.is_syn() {
        if let Some(avoid) = conntrack::syn_opens(&key, existing, &now) {
            match conntrack::open(ctx, &pkt, &key, existing, now.ticks, avoid) {
                Opened::Flow(flow) => {
                    if avoid != NO_SLOT {
                        stats::count(Counter::SynRetried);
                    }
                    trace::opened(ctx, &key, unsafe { &*flow });
                    opened = Some(flow);
                }
                Opened::NoOtherBackend => {}
                Opened::NotAService => return PASS,
                Opened::Drop(reason) => {
                    if let Some(reason) = reason {
                        stats::count(reason);
                        trace::dropped(ctx, &key, || conntrack::service_id(&key), true, reason);
                    }
                    return DROP;
                }
            }
        }
    }
    let (flow, entry): (&Flow, _) = match (&opened, existing) {
        (Some(flow), _) => (unsafe { &**flow }, None),
        (None, Some(entry)) => {
            if conntrack::answer_with_reset(unsafe { &*entry }) && pkt.flags & lb_common::TCP_RST == 0 {
                return answered(reset::answer(ctx, &pkt));
            }
            match conntrack::track(ctx, &pkt, &key, entry, &now) {
                conntrack::Tracked::Forward => {}
                conntrack::Tracked::RefusalSwallowed => {
                    stats::count(Counter::RefusalSwallowed);
                    return DROP;
                }
                conntrack::Tracked::Drop(reason) => {
                    stats::count(reason);
                    trace::dropped(ctx, &key, || unsafe { (*entry).service } as u32, pkt.is_syn(), reason);
                    return DROP;
                }
            }
            // Read in place from here on: copying the entry costs more than
            // the fields used.
            (unsafe { &*entry }, Some(entry))
        }
        // Nothing opened, nothing found (a SYN that opens nothing has
        // returned above).
        (None, None) => return PASS,
    };

    // Route, before the rewrite: a packet too big for the route, with DF,
    // is answered about as its sender sent it.
    let route = forward::route(ctx, &pkt, flow, &now);
    if let Some(refusal) = forward::refusal(&pkt, &route) {
        return answered(icmp::answer(ctx, &pkt, refusal, icmp::our_address(&key, flow)));
    }

    // Rewrite.
    nat::rewrite(&pkt, flow);
    stats::count_packet(flow, pkt.len);

    // Send.
    let sent = forward::send(ctx, &pkt, &route, flow);
    if let (true, Some(entry)) = (route.learned, entry) {
        // The flow keeps its next hop for the packets after this one.
        unsafe { (*entry).hop = *route.hop() };
    }
    (sent.action, sent.counter)
}

/// The verdict that goes with `action`, for packets handled aside from the
/// main path (answered with an RST or ICMP, or an ICMP error translated).
#[inline(always)]
fn answered(action: u32) -> (u32, Counter) {
    let verdict = match action {
        XDP_DROP => Counter::VerdictDrop,
        XDP_PASS => Counter::VerdictPass,
        _ => Counter::VerdictRedirect,
    };
    (action, verdict)
}

/// Not attached: the agent runs it through BPF_PROG_TEST_RUN with a batch of
/// idle flows to remove, or of flows to reset, so that the change and the
/// count release are atomic with respect to the packet path.
#[xdp]
pub fn lb_expire(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    if start + core::mem::size_of::<ExpireRequest>() > ctx.data_end() {
        return XDP_ABORTED;
    }
    let request = start as *mut ExpireRequest;
    let now = unsafe { bpf_jiffies64() };
    unsafe {
        (*request).now = now;
        (*request).now_ns = bpf_ktime_get_ns();
    }
    let timeouts = unsafe { (*request).timeouts };
    let count = unsafe { (*request).count } as usize;
    let mode = unsafe { (*request).mode };
    let mut expired = 0u32;
    for i in 0..EXPIRE_BATCH {
        if i >= count {
            break;
        }
        let key = unsafe { (*request).keys[i] };
        let done = if mode == EXPIRE_RESET {
            conntrack::reset(&key)
        } else {
            conntrack::expire(&key, &timeouts, now)
        };
        if done {
            expired += 1;
        }
    }
    unsafe { (*request).expired = expired };
    XDP_PASS
}

/// Attached by `lb decap` on a DSR backend, not by the agent: strips the
/// IPIP tunnel from packets for the backend's VIPs.
#[xdp]
pub fn lb_decap(ctx: XdpContext) -> u32 {
    decap::decapsulate(&ctx)
}

/// Does nothing but pass the packet: the floor that `cargo xtask bench micro`
/// measures the balancer against. Never attached.
#[xdp]
pub fn lb_pass(_ctx: XdpContext) -> u32 {
    XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
