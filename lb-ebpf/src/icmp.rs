//! ICMP, as a router on the flow's path owes it: a packet that cannot go on
//! (too big for the next hop with DF set, or its TTL run out) is answered
//! with the ICMP error a router would send, quoting the packet as its sender
//! sent it, so the sender's TCP finds its connection; ICMP errors that others
//! send about a flow's packets are translated back (addresses, ports and
//! checksums, outer and inner) and sent on to the flow's other side. In DSR
//! the backend's replies never pass here, but errors about them come to the
//! VIP: they go on to the backend unchanged (`to_dsr_backend`).
use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    helpers::{bpf_redirect, bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{mode_is_dsr, Counter, Flow, FlowKey, DIR_FORWARD, DIR_HOLD, MODE_DSR_IPIP, MODE_FULLNAT};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::{
    csum::{apply, diff16, diff32, fold},
    ipv4::Ipv4Header,
    forward::{self, Refusal},
    parse::{IcmpError, TcpPacket, DEST_UNREACHABLE, FRAG_NEEDED, PROTO_ICMP, TIME_EXCEEDED},
    tunnel,
};

/// What an answer quotes: the offending packet's IP header (without
/// options) and the first 8 bytes of its TCP header — ports and sequence
/// number, what the sender's stack needs to find the connection (RFC 792).
const QUOTED: usize = Ipv4Hdr::LEN + 8;
const ANSWER_IP_LEN: usize = Ipv4Hdr::LEN + 8 + QUOTED;
const ANSWER_LEN: usize = EthHdr::LEN + ANSWER_IP_LEN;

/// Turns `pkt`, as it arrived, into the ICMP error that answers it, from
/// `from` (the address the sender reached the balancer at), and sends it
/// back out of the interface it came in on. Packets with IP options are
/// dropped instead: the quote would not fit this fixed shape, and no TCP
/// stack in practice sends them.
#[inline(always)]
pub fn answer(ctx: &XdpContext, pkt: &TcpPacket, refusal: Refusal, from: u32) -> u32 {
    let ip = unsafe { &*pkt.ip };
    if ip.vihl != 0x45 {
        crate::stats::count(Counter::IcmpNotSent);
        return XDP_DROP;
    }
    let (sender_mac, our_mac, sender) = unsafe { ((*pkt.eth).src_addr, (*pkt.eth).dst_addr, ip.src_addr) };
    let (kind, code, rest, counter) = match refusal {
        Refusal::TooBig(mtu) => {
            let m = mtu.to_be_bytes();
            (DEST_UNREACHABLE, FRAG_NEEDED, [0, 0, m[0], m[1]], Counter::IcmpFragNeededSent)
        }
        Refusal::TtlExpired => (TIME_EXCEEDED, 0, [0; 4], Counter::IcmpTimeExceededSent),
    };

    // Keep the quote, then make room in front of it for the new IP and ICMP
    // headers (the Ethernet header is rewritten in place).
    let frame_len = (ctx.data_end() - ctx.data()) as i32;
    let keep = (EthHdr::LEN + QUOTED) as i32;
    if frame_len < keep
        || unsafe { bpf_xdp_adjust_tail(ctx.ctx, keep - frame_len) } != 0
        || unsafe { bpf_xdp_adjust_head(ctx.ctx, -((ANSWER_LEN as i32) - keep)) } != 0
    {
        crate::stats::count(Counter::IcmpNotSent);
        return XDP_DROP;
    }
    let data = ctx.data();
    if data + ANSWER_LEN > ctx.data_end() {
        return XDP_DROP;
    }
    let frame = unsafe { &mut *(data as *mut [u8; ANSWER_LEN]) };
    frame[0..6].copy_from_slice(&sender_mac);
    frame[6..12].copy_from_slice(&our_mac);
    frame[12..14].copy_from_slice(&0x0800u16.to_be_bytes());

    let header = Ipv4Header {
        tos: 0xc0,
        len: ANSWER_IP_LEN as u16,
        id: 0,
        frag: 0,
        ttl: 64,
        proto: PROTO_ICMP,
        src: from.to_ne_bytes(),
        dst: sender,
    };
    header.write(&mut frame[14..34]);

    let icmp = &mut frame[34..ANSWER_LEN];
    icmp[0] = kind;
    icmp[1] = code;
    icmp[2] = 0;
    icmp[3] = 0;
    icmp[4..8].copy_from_slice(&rest);
    let mut sum = 0u32;
    let mut i = 0;
    while i < ANSWER_LEN - 34 {
        sum += u16::from_be_bytes([icmp[i], icmp[i + 1]]) as u32;
        i += 2;
    }
    icmp[2..4].copy_from_slice(&(!fold(sum)).to_be_bytes());

    crate::stats::count(counter);
    unsafe { bpf_redirect((*ctx.ctx).ingress_ifindex, 0) as u32 }
}

/// The address a packet's sender reached the balancer at, for the answers
/// it gets: the VIP either way (a forward packet's destination, the address
/// a reply is rewritten to come from).
#[inline(always)]
pub fn our_address(key: &FlowKey, flow: &Flow) -> u32 {
    if flow.direction == DIR_FORWARD {
        key.daddr
    } else {
        flow.nat_addr
    }
}

/// An ICMP error about a packet the balancer rewrote. The quoted packet,
/// read backwards, is the key of the flow entry whose direction the error
/// travels in: an error about a forward packet (client → backend) travels
/// as a reply and gets the VIP back in the quote's destination; an error
/// about a reply (VIP → client) travels forward and gets the backend in the
/// quote's source and the outer destination. Errors about anything else go
/// to the kernel untouched. Returns the action; the caller derives the
/// verdict.
#[inline(always)]
pub fn translate(ctx: &XdpContext, err: &IcmpError) -> u32 {
    const PASS: u32 = XDP_PASS;
    let (ip, inner) = unsafe { (&mut *err.ip, &mut *err.inner_ip) };
    let ports = unsafe { &mut *err.inner_ports };
    let quoted = FlowKey {
        saddr: u32::from_ne_bytes(inner.src_addr),
        daddr: u32::from_ne_bytes(inner.dst_addr),
        sport: u16::from_ne_bytes([ports[0], ports[1]]),
        dport: u16::from_ne_bytes([ports[2], ports[3]]),
    };
    // An error goes to the quoted packet's source: anything else is not an
    // error about a packet of ours.
    if u32::from_ne_bytes(ip.dst_addr) != quoted.saddr {
        return PASS;
    }
    let key = FlowKey { saddr: quoted.daddr, daddr: quoted.saddr, sport: quoted.dport, dport: quoted.sport };
    let entry = match crate::conntrack::lookup(&key) {
        Some(entry) => entry,
        // About a nat flow's SYN, before the backend's first answer wrote
        // the flow's reply entry: this error is that answer.
        None => match crate::conntrack::lazy_reply(&key, crate::clock::now().ticks) {
            crate::conntrack::FirstAnswer::Entry(entry) => entry,
            _ => return PASS,
        },
    };
    let flow = unsafe { &*entry };
    if flow.direction == DIR_HOLD {
        // A held port's: the connection it concerns is gone.
        return PASS;
    }
    if ip.ttl <= 1 {
        crate::stats::count(Counter::IcmpNotSent);
        return XDP_DROP;
    }
    if mode_is_dsr(flow.mode) {
        return to_dsr_backend(ctx, err, flow);
    }

    // The quote: both ends as the flow's rewrite sets them, and the quoted
    // checksums, which change by what the rewrite of a packet of this
    // entry's direction changes. The outer header goes where the quote's
    // source now is.
    let old_inner_check = u16::from_ne_bytes(inner.check);
    let new_inner_check = apply(old_inner_check, flow.ip_csum_diff);
    inner.check = new_inner_check.to_ne_bytes();
    let mut icmp_sum = diff16(old_inner_check, new_inner_check);
    // A forward entry rewrites the quote (a reply, as the client got it)
    // back to the backend's own packet; a reply entry, the quote (a
    // forward packet, as the backend got it) back to the client's.
    let forward = flow.direction == DIR_FORWARD;
    let (nat, peer) = ((flow.nat_addr, flow.nat_port), (flow.peer_addr, flow.peer_port));
    let (src, dst) = if forward { (nat, peer) } else { (peer, nat) };
    icmp_sum += diff32(quoted.saddr, src.0) + diff16(quoted.sport, src.1);
    icmp_sum += diff32(quoted.daddr, dst.0) + diff16(quoted.dport, dst.1);
    inner.src_addr = src.0.to_ne_bytes();
    ports[0..2].copy_from_slice(&src.1.to_ne_bytes());
    inner.dst_addr = dst.0.to_ne_bytes();
    ports[2..4].copy_from_slice(&dst.1.to_ne_bytes());
    let (outer_src, outer_dst) = (u32::from_ne_bytes(ip.src_addr), u32::from_ne_bytes(ip.dst_addr));
    let (new_src, new_dst) = if forward {
        // To the backend: from the balancer in full NAT, the only address
        // the backend knows.
        (if flow.mode == MODE_FULLNAT { flow.peer_addr } else { outer_src }, flow.nat_addr)
    } else {
        // To the client: from the VIP where the backend itself sent it.
        (if outer_src == quoted.daddr { flow.nat_addr } else { outer_src }, flow.peer_addr)
    };
    ip.src_addr = new_src.to_ne_bytes();
    ip.dst_addr = new_dst.to_ne_bytes();
    if let Some(check) = err.inner_check {
        let check = unsafe { &mut *check };
        let old = u16::from_ne_bytes(*check);
        let new = apply(old, flow.l4_csum_diff);
        *check = new.to_ne_bytes();
        icmp_sum += diff16(old, new);
    }
    let icmp = unsafe { &mut *err.icmp };
    icmp.check = apply(u16::from_ne_bytes(icmp.check), fold(icmp_sum)).to_ne_bytes();
    let old_ttl = u16::from_ne_bytes([ip.ttl, ip.proto]);
    ip.ttl -= 1;
    let ip_sum = diff32(outer_src, new_src)
        + diff32(outer_dst, new_dst)
        + diff16(old_ttl, u16::from_ne_bytes([ip.ttl, ip.proto]));
    ip.check = apply(u16::from_ne_bytes(ip.check), fold(ip_sum)).to_ne_bytes();
    crate::stats::count(Counter::IcmpTranslated);

    let src = u32::from_ne_bytes(ip.src_addr);
    let dst = u32::from_ne_bytes(ip.dst_addr);
    let route = forward::lookup(ctx, src, dst, 0);
    if route.to_kernel() {
        return PASS;
    }
    forward::redirect(err.eth, route.hop())
}

/// An ICMP error about a DSR backend's reply (VIP → client), which came
/// to the VIP here: the backend sent the reply, so only it can act on the
/// error (a smaller path MTU above all). It gets the error as it is, one
/// hop on, the way its flow's packets go (through the tunnel, if any).
#[inline(always)]
fn to_dsr_backend(ctx: &XdpContext, err: &IcmpError, flow: &Flow) -> u32 {
    let ip = unsafe { &mut *err.ip };
    forward::decrement_ttl(ip);
    let src = if flow.mode == MODE_DSR_IPIP { flow.peer_addr } else { u32::from_ne_bytes(ip.src_addr) };
    let route = forward::lookup(ctx, src, flow.nat_addr, 0);
    if route.to_kernel() {
        crate::stats::count(Counter::DsrUnroutable);
        return XDP_DROP;
    }
    let eth = if flow.mode == MODE_DSR_IPIP {
        match tunnel::encapsulate(ctx, flow) {
            Some(eth) => eth,
            None => return XDP_DROP,
        }
    } else {
        err.eth
    };
    crate::stats::count(Counter::IcmpTranslated);
    forward::redirect(eth, route.hop())
}
