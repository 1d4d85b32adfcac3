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
use lb_common::{Counter, Flow, PROTO_TCP};

use crate::{
    clock::Now,
    csum::{apply, diff16},
    parse::TcpPacket,
};

const AF_INET: u8 = 2;

pub struct Sent {
    pub action: u32,
    pub counter: Counter,
}

/// Sends the rewritten packet to its next hop. `flow` is the packet's flow
/// (`entry`: its table entry, where a fresh route lookup is cached; `None`
/// for the first packet of a flow).
#[inline(always)]
pub fn send(ctx: &XdpContext, pkt: &TcpPacket, flow: &Flow, entry: Option<*mut Flow>, now: &Now) -> Sent {
    let ip = unsafe { &mut *pkt.ip };
    if ip.ttl <= 1 {
        // The kernel answers with ICMP time exceeded.
        return Sent { action: xdp_action::XDP_PASS, counter: Counter::VerdictPass };
    }
    if flow.hop_ifindex != 0 && now.ticks.wrapping_sub(flow.hop_at) < now.hop_ttl {
        return out(pkt, flow.hop_ifindex, &flow.hop_macs);
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
        return Sent { action: xdp_action::XDP_PASS, counter: Counter::VerdictPass };
    }

    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&fib.dmac);
    macs[6..].copy_from_slice(&fib.smac);
    if let Some(entry) = entry {
        unsafe {
            (*entry).hop_macs = macs;
            (*entry).hop_at = now.ticks;
            (*entry).hop_ifindex = fib.ifindex;
        }
    }
    out(pkt, fib.ifindex, &macs)
}

/// Forwards as a router does (one hop less) out of `ifindex`.
#[inline(always)]
fn out(pkt: &TcpPacket, ifindex: u32, macs: &[u8; 12]) -> Sent {
    let ip = unsafe { &mut *pkt.ip };
    let old_word = u16::from_ne_bytes([ip.ttl, ip.proto]);
    ip.ttl -= 1;
    let new_word = u16::from_ne_bytes([ip.ttl, ip.proto]);
    ip.check = apply(u16::from_ne_bytes(ip.check), crate::csum::fold(diff16(old_word, new_word)))
        .to_ne_bytes();
    unsafe {
        (*pkt.eth).dst_addr.copy_from_slice(&macs[..6]);
        (*pkt.eth).src_addr.copy_from_slice(&macs[6..]);
    }
    // A redirect even back out of the same interface, where XDP_TX would
    // be a little faster on a hardware NIC: a veth flushes XDP_TX frames to
    // its peer only when the peer runs an XDP program, so on veth (containers,
    // namespaces) they would be stuck.
    let action = unsafe { bpf_redirect(ifindex, 0) } as u32;
    Sent { action, counter: Counter::VerdictRedirect }
}
