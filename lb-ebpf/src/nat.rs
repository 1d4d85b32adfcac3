//! Address and port rewriting with checksums kept valid.
use lb_common::{mode_is_dsr, Flow, DIR_FORWARD};

use crate::{
    csum::{apply, diff16, diff32, fold},
    parse::TcpPacket,
};

/// The checksum differences of rewriting one end `old` to `new` and the
/// other `old_peer` to `new_peer` (address, port): the IPv4 header covers
/// the addresses, TCP covers them all through its pseudo-header.
#[inline(always)]
pub fn csum_diffs(old: (u32, u16), new: (u32, u16), old_peer: (u32, u16), new_peer: (u32, u16)) -> (u16, u16) {
    let addrs = diff32(old.0, new.0) + diff32(old_peer.0, new_peer.0);
    (fold(addrs), fold(addrs + diff16(old.1, new.1) + diff16(old_peer.1, new_peer.1)))
}

/// Forward packets get the backend as destination and the peer (the
/// client itself, or in full NAT the balancer's address) as source;
/// replies get the VIP as source and the client as destination. DSR
/// leaves addresses and ports as the client sent them: the backend holds
/// the VIP.
#[inline(always)]
pub fn rewrite(pkt: &TcpPacket, flow: &Flow) {
    if mode_is_dsr(flow.mode) {
        return;
    }
    unsafe {
        let ip = &mut *pkt.ip;
        let tcp = &mut *pkt.tcp;
        if flow.direction == DIR_FORWARD {
            ip.dst_addr = flow.nat_addr.to_ne_bytes();
            tcp.dest = flow.nat_port.to_ne_bytes();
            ip.src_addr = flow.peer_addr.to_ne_bytes();
            tcp.source = flow.peer_port.to_ne_bytes();
        } else {
            ip.src_addr = flow.nat_addr.to_ne_bytes();
            tcp.source = flow.nat_port.to_ne_bytes();
            ip.dst_addr = flow.peer_addr.to_ne_bytes();
            tcp.dest = flow.peer_port.to_ne_bytes();
        }
        ip.check = apply(u16::from_ne_bytes(ip.check), flow.ip_csum_diff).to_ne_bytes();
        tcp.check = apply(u16::from_ne_bytes(tcp.check), flow.l4_csum_diff).to_ne_bytes();
    }
}
