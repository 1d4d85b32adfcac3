//! Answering a client with a TCP reset from the VIP, for flows the agent
//! closed because their backend died (service policy `reset`): the client
//! learns at its next packet instead of waiting out its timeouts.
use aya_ebpf::{
    bindings::xdp_action::XDP_DROP,
    helpers::{bpf_redirect, bpf_xdp_adjust_tail},
    programs::XdpContext,
};

use lb_common::{TCP_ACK, TCP_RST};

use crate::{
    csum::{fold, words},
    parse::TcpPacket,
};

const FRAME_LEN: usize = 14 + 20 + 20;

/// Turns `pkt` into the RST that answers it and sends it back out of the
/// interface it came in on (a redirect, not XDP_TX: see `forward.rs`).
#[inline(always)]
pub fn answer(ctx: &XdpContext, pkt: &TcpPacket) -> u32 {
    let (client_mac, our_mac, client, vip, client_port, vip_port, seq, ack, flags) = unsafe {
        let ip = &*pkt.ip;
        let tcp = &*pkt.tcp;
        if ip.vihl != 0x45 {
            return XDP_DROP; // with IP options: not worth building an answer
        }
        // RFC 9293 3.10.7.1: answer an ACK with its acknowledgment number as
        // our sequence number; otherwise acknowledge what was sent.
        let (seq, ack, flags) = if pkt.flags & TCP_ACK != 0 {
            (u32::from_be_bytes(tcp.ack_seq), 0, TCP_RST)
        } else {
            (0, pkt.seq_end(), TCP_RST | TCP_ACK)
        };
        (
            (*pkt.eth).src_addr,
            (*pkt.eth).dst_addr,
            ip.src_addr,
            ip.dst_addr,
            tcp.source,
            tcp.dest,
            seq,
            ack,
            flags,
        )
    };

    let frame_len = ctx.data_end() - ctx.data();
    if frame_len > FRAME_LEN
        && unsafe { bpf_xdp_adjust_tail(ctx.ctx, -((frame_len - FRAME_LEN) as i32)) } != 0
    {
        return XDP_DROP;
    }
    let data = ctx.data();
    if data + FRAME_LEN > ctx.data_end() {
        return XDP_DROP;
    }
    let frame = unsafe { &mut *(data as *mut [u8; FRAME_LEN]) };
    frame[0..6].copy_from_slice(&client_mac);
    frame[6..12].copy_from_slice(&our_mac);

    let ip = &mut frame[14..34];
    ip.copy_from_slice(&[0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    ip[12..16].copy_from_slice(&vip);
    ip[16..20].copy_from_slice(&client);
    let ip_sum = 0x4500 + 40 + 0x4000 + (64 << 8 | 6) + words(vip) + words(client);
    ip[10..12].copy_from_slice(&(!fold(ip_sum)).to_be_bytes());

    let tcp = &mut frame[34..54];
    tcp[0..2].copy_from_slice(&vip_port);
    tcp[2..4].copy_from_slice(&client_port);
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[8..12].copy_from_slice(&ack.to_be_bytes());
    tcp[12..20].copy_from_slice(&[5 << 4, flags, 0, 0, 0, 0, 0, 0]);
    let tcp_sum = words(vip)
        + words(client)
        + 6
        + 20
        + u16::from_be_bytes(vip_port) as u32
        + u16::from_be_bytes(client_port) as u32
        + words(seq.to_be_bytes())
        + words(ack.to_be_bytes())
        + ((5u32 << 12) | flags as u32);
    tcp[16..18].copy_from_slice(&(!fold(tcp_sum)).to_be_bytes());
    crate::stats::count(lb_common::Counter::ResetSent);
    unsafe { bpf_redirect((*ctx.ctx).ingress_ifindex, 0) as u32 }
}
