//! Sending a rewritten packet on: the kernel's routing table and neighbour
//! cache decide the next hop, as they would for a forwarded packet.
use core::mem;

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, xdp_action, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS,
    },
    helpers::{bpf_fib_lookup, bpf_redirect},
    programs::XdpContext,
};
use lb_common::{backend_index, BackendHop, Counter, Flow, NextHop, DIR_FORWARD, PROTO_TCP};

use crate::{
    clock::Now,
    csum::{apply, diff16},
    maps::BACKEND_HOPS,
    parse::TcpPacket,
};

const AF_INET: u8 = 2;

pub struct Sent {
    pub action: u32,
    pub counter: Counter,
    /// A next hop the flow did not have fresh, for it to keep.
    pub learned: Option<NextHop>,
}

/// Sends the rewritten packet to its next hop, `flow`'s own if fresh. A
/// forward packet without one takes its backend's, so route lookups happen
/// about once a second per backend and per client, not per flow both ways.
#[inline(always)]
pub fn send(ctx: &XdpContext, pkt: &TcpPacket, flow: &Flow, now: &Now) -> Sent {
    let ip = unsafe { &mut *pkt.ip };
    if ip.ttl <= 1 {
        // The kernel answers with ICMP time exceeded.
        return to_kernel(Counter::VerdictPass);
    }
    if fresh(&flow.hop, now) {
        return out(pkt, &flow.hop, None);
    }
    let backend_hop = if flow.direction == DIR_FORWARD { backend_hop(flow) } else { None };
    if let Some(shared) = backend_hop {
        let cached = unsafe { *shared };
        if cached.addr == flow.nat_addr && fresh(&cached.hop, now) {
            return out(pkt, &cached.hop, Some(cached.hop));
        }
    }

    let mut fib: FibParams = unsafe { mem::zeroed() };
    fib.family = AF_INET;
    fib.l4_protocol = PROTO_TCP;
    unsafe {
        fib.sport = u16::from_ne_bytes((*pkt.tcp).source);
        fib.dport = u16::from_ne_bytes((*pkt.tcp).dest);
        fib.__bindgen_anon_1.tot_len = u16::from_be_bytes(ip.tot_len);
        fib.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(ip.src_addr);
        fib.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(ip.dst_addr);
    }
    fib.ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    let rc = unsafe {
        bpf_fib_lookup(ctx.ctx as *mut _, &mut fib, mem::size_of::<FibParams>() as i32, 0)
    } as u32;
    if rc != BPF_FIB_LKUP_RET_SUCCESS {
        // The packet is already rewritten: the kernel forwards it, resolving
        // the neighbour on the way, so the connection still works.
        let counter = if rc == BPF_FIB_LKUP_RET_NO_NEIGH {
            Counter::NoNeighbour
        } else {
            Counter::FibFailed
        };
        crate::stats::count(counter);
        return to_kernel(Counter::VerdictPass);
    }

    let mut hop = NextHop { ifindex: fib.ifindex, macs: [0; 12], at: now.ticks };
    hop.macs[..6].copy_from_slice(&fib.dmac);
    hop.macs[6..].copy_from_slice(&fib.smac);
    if let Some(shared) = backend_hop {
        unsafe { *shared = BackendHop { addr: flow.nat_addr, _pad: 0, hop } };
    }
    out(pkt, &hop, Some(hop))
}

#[inline(always)]
fn to_kernel(counter: Counter) -> Sent {
    Sent { action: xdp_action::XDP_PASS, counter, learned: None }
}

#[inline(always)]
fn fresh(hop: &NextHop, now: &Now) -> bool {
    hop.ifindex != 0 && now.ticks.wrapping_sub(hop.at) < now.hop_ttl
}

#[inline(always)]
fn backend_hop(flow: &Flow) -> Option<*mut BackendHop> {
    BACKEND_HOPS.get_ptr_mut(backend_index(flow.service as u32, flow.slot as u32))
}

/// Forwards as a router does (one hop less) to `hop`.
#[inline(always)]
fn out(pkt: &TcpPacket, hop: &NextHop, learned: Option<NextHop>) -> Sent {
    let ip = unsafe { &mut *pkt.ip };
    let old_word = u16::from_ne_bytes([ip.ttl, ip.proto]);
    ip.ttl -= 1;
    let new_word = u16::from_ne_bytes([ip.ttl, ip.proto]);
    ip.check = apply(u16::from_ne_bytes(ip.check), crate::csum::fold(diff16(old_word, new_word)))
        .to_ne_bytes();
    unsafe {
        (*pkt.eth).dst_addr.copy_from_slice(&hop.macs[..6]);
        (*pkt.eth).src_addr.copy_from_slice(&hop.macs[6..]);
    }
    // A redirect even back out of the same interface, where XDP_TX would
    // be a little faster on a hardware NIC: a veth flushes XDP_TX frames to
    // its peer only when the peer runs an XDP program, so on veth (containers,
    // namespaces) they would be stuck.
    let action = unsafe { bpf_redirect(hop.ifindex, 0) } as u32;
    Sent { action, counter: Counter::VerdictRedirect, learned }
}
