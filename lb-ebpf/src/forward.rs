//! Sending a rewritten packet on: the kernel's routing table and neighbour
//! cache decide the next hop, as they would for a forwarded packet. The
//! route is found before the rewrite, so that a packet that cannot take it
//! (too big for its MTU) is answered about as its sender sent it.
use core::mem;

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, xdp_action, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS,
    },
    helpers::{bpf_fib_lookup, bpf_redirect},
    programs::XdpContext,
};
use lb_common::{backend_index, mode_is_dsr, BackendHop, Counter, Flow, NextHop, DIR_FORWARD, MODE_DSR_IPIP, PROTO_TCP};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::{
    clock::Now,
    csum::{apply, diff16},
    maps::{BACKEND_HOPS, ROUTE_SCRATCH},
    parse::TcpPacket,
    tunnel,
};

const AF_INET: u8 = 2;
/// IPv4's don't-fragment flag.
const IP_DF: u16 = 0x4000;

/// Where a packet goes: out of the interface of a next hop in map memory
/// (the flow's own, its backend's, or this CPU's fresh lookup), or, where
/// `hop` is null, to the kernel (the lookup has counted why). It points at
/// the hop rather than holding a copy, and has every byte set, because the
/// packet path's stack is nearly full and the verifier refuses spills of
/// unset bytes.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Route {
    hop: *const NextHop,
    /// The route's MTU where the packet is bigger, else 0.
    pub too_big_for: u16,
    /// The hop is not the flow's own yet: it keeps it.
    pub learned: bool,
    _pad: [u8; 5],
}

impl Route {
    #[inline(always)]
    fn via(hop: *const NextHop, learned: bool) -> Self {
        Route { hop, too_big_for: 0, learned, _pad: [0; 5] }
    }

    #[inline(always)]
    fn kernel(reason: Counter) -> Self {
        crate::stats::count(reason);
        Route { hop: core::ptr::null(), too_big_for: 0, learned: false, _pad: [0; 5] }
    }

    #[inline(always)]
    pub fn to_kernel(&self) -> bool {
        self.hop.is_null()
    }

    /// The next hop; only where not `to_kernel`.
    #[inline(always)]
    pub fn hop(&self) -> &NextHop {
        unsafe { &*self.hop }
    }
}

/// Why a packet of a flow is answered instead of forwarded.
#[derive(Clone, Copy)]
pub enum Refusal {
    /// Bigger than the next hop's MTU, with DF set.
    TooBig(u16),
    /// TTL 1 or 0: forwarding would leave it at 0.
    TtlExpired,
}

pub struct Sent {
    pub action: u32,
    pub counter: Counter,
}

/// The route of a packet of `flow`, `flow`'s own next hop
/// if fresh. A forward packet without one takes its backend's, so route
/// lookups happen about once a second per backend and per client, not per
/// flow both ways.
#[inline(always)]
pub fn route(ctx: &XdpContext, pkt: &TcpPacket, flow: &Flow, now: &Now) -> Route {
    let (len, overhead) = (pkt.ip_len(), tunnel::overhead(flow));
    if fresh(&flow.hop, now) {
        return fits(Route::via(&flow.hop, false), len, overhead);
    }
    // The backend's slot keeps its address until its last flow is gone, so
    // a live flow's backend hop is never another backend's.
    let backend_hop = if flow.direction == DIR_FORWARD { backend_hop(flow) } else { None };
    if let Some(shared) = backend_hop {
        let cached = unsafe { &*shared };
        if cached.addr == flow.nat_addr && fresh(&cached.hop, now) {
            return fits(Route::via(&cached.hop, true), len, overhead);
        }
    }
    // Where the packet goes once rewritten.
    let (src, dst) = if flow.direction == DIR_FORWARD { (flow.peer_addr, flow.nat_addr) } else { (flow.nat_addr, flow.peer_addr) };
    let route = lookup(ctx, src, dst, now.ticks);
    if let (false, Some(shared)) = (route.to_kernel(), backend_hop) {
        unsafe { *shared = BackendHop { addr: flow.nat_addr, _pad: 0, hop: *route.hop() } };
    }
    fits(route, len, overhead)
}

/// A route lookup from `src` to `dst`, as the kernel would forward.
#[inline(always)]
pub fn lookup(ctx: &XdpContext, src: u32, dst: u32, now_ticks: u64) -> Route {
    let Some(scratch) = ROUTE_SCRATCH.get_ptr_mut(0) else {
        return Route::kernel(Counter::FibFailed);
    };
    let scratch = unsafe { &mut *scratch };
    let fib = &mut scratch.fib;
    unsafe { core::ptr::write_bytes(fib as *mut FibParams, 0, 1) };
    fib.family = AF_INET;
    fib.l4_protocol = PROTO_TCP;
    fib.__bindgen_anon_3.ipv4_src = src;
    fib.__bindgen_anon_4.ipv4_dst = dst;
    fib.ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    // `tot_len` stays 0, so the lookup never fails for size and returns the
    // route's MTU in its place; packets are measured against it here.
    let rc = unsafe { bpf_fib_lookup(ctx.ctx as *mut _, fib, mem::size_of::<FibParams>() as i32, 0) } as u32;
    let mtu = unsafe { fib.__bindgen_anon_1.mtu_result };
    match rc {
        BPF_FIB_LKUP_RET_SUCCESS => {}
        // The kernel forwards it, resolving the neighbour on the way, so the
        // connection still works.
        BPF_FIB_LKUP_RET_NO_NEIGH => return Route::kernel(Counter::NoNeighbour),
        _ => return Route::kernel(Counter::FibFailed),
    }
    // A kernel that does not report the MTU: the largest IPv4 packet.
    let mtu = if mtu == 0 { u16::MAX } else { mtu };
    let hop = &mut scratch.hop;
    hop.ifindex = fib.ifindex;
    hop.macs[..6].copy_from_slice(&fib.dmac);
    hop.macs[6..].copy_from_slice(&fib.smac);
    hop.at = now_ticks as u32;
    hop.mtu = mtu;
    hop._pad = 0;
    Route::via(hop, true)
}

/// `route`, for a packet of `len` bytes that a tunnel grows by `overhead`:
/// too big for it or not, and if so the MTU its sender must keep to.
#[inline(always)]
fn fits(mut route: Route, len: u16, overhead: u16) -> Route {
    if !route.to_kernel() && len as u32 + overhead as u32 > route.hop().mtu as u32 {
        route.too_big_for = route.hop().mtu.saturating_sub(overhead);
    }
    route
}

/// Why `pkt` cannot go on by `route`, if it cannot: too big with DF set.
/// (Too big without DF, the kernel fragments it after the rewrite.)
#[inline(always)]
pub fn refusal(pkt: &TcpPacket, route: &Route) -> Option<Refusal> {
    (route.too_big_for != 0 && pkt.frag_flags() & IP_DF != 0).then_some(Refusal::TooBig(route.too_big_for))
}

/// Sends the rewritten packet of `flow` by `route`, through its tunnel if
/// it has one.
#[inline(always)]
pub fn send(ctx: &XdpContext, pkt: &TcpPacket, route: &Route, flow: &Flow) -> Sent {
    if route.to_kernel() || route.too_big_for != 0 {
        if mode_is_dsr(flow.mode) {
            // The kernel would take it for the VIP, delivered here.
            crate::stats::count(Counter::DsrUnroutable);
            return Sent { action: xdp_action::XDP_DROP, counter: Counter::VerdictDrop };
        }
        if route.too_big_for != 0 {
            crate::stats::count(Counter::TooBigToKernel);
        }
        return Sent { action: xdp_action::XDP_PASS, counter: Counter::VerdictPass };
    }
    decrement_ttl(unsafe { &mut *pkt.ip });
    let eth = if flow.mode == MODE_DSR_IPIP {
        match tunnel::encapsulate(ctx, flow) {
            Some(eth) => eth,
            None => return Sent { action: xdp_action::XDP_DROP, counter: Counter::VerdictDrop },
        }
    } else {
        pkt.eth
    };
    Sent { action: redirect(eth, route.hop()), counter: Counter::VerdictRedirect }
}

#[inline(always)]
fn fresh(hop: &NextHop, now: &Now) -> bool {
    hop.ifindex != 0 && (now.ticks as u32).wrapping_sub(hop.at) < now.hop_ttl as u32
}

#[inline(always)]
fn backend_hop(flow: &Flow) -> Option<*mut BackendHop> {
    BACKEND_HOPS.get_ptr_mut(backend_index(flow.service as u32, flow.slot as u32))
}

/// One hop less, as a router forwards (the caller has made sure TTL > 1).
#[inline(always)]
pub fn decrement_ttl(ip: &mut Ipv4Hdr) {
    let old_word = u16::from_ne_bytes([ip.ttl, ip.proto]);
    ip.ttl -= 1;
    let new_word = u16::from_ne_bytes([ip.ttl, ip.proto]);
    ip.check = apply(u16::from_ne_bytes(ip.check), crate::csum::fold(diff16(old_word, new_word))).to_ne_bytes();
}

/// Sends the frame at `eth` to `hop`.
#[inline(always)]
pub fn redirect(eth: *mut EthHdr, hop: &NextHop) -> u32 {
    unsafe {
        (*eth).dst_addr.copy_from_slice(&hop.macs[..6]);
        (*eth).src_addr.copy_from_slice(&hop.macs[6..]);
    }
    // A redirect even back out of the same interface, where XDP_TX would
    // be a little faster on a hardware NIC: a veth flushes XDP_TX frames to
    // its peer only when the peer runs an XDP program, so on veth (containers,
    // namespaces) they would be stuck.
    unsafe { bpf_redirect(hop.ifindex, 0) as u32 }
}
