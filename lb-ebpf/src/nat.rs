//! Address and port rewriting with checksums kept valid.
use lb_common::{Flow, DIR_FORWARD};

use crate::{
    csum::{apply, diff16, diff32, fold},
    parse::TcpPacket,
};

/// The checksum differences of rewriting `old` to `new` (address, port):
/// the IPv4 header covers the address, TCP covers both through its
/// pseudo-header.
#[inline(always)]
pub fn csum_diffs(old_addr: u32, old_port: u16, new_addr: u32, new_port: u16) -> (u16, u16) {
    let addr = diff32(old_addr, new_addr);
    (fold(addr), fold(addr + diff16(old_port, new_port)))
}

/// Forward packets get the backend as destination; replies get the VIP as
/// source.
#[inline(always)]
pub fn rewrite(pkt: &TcpPacket, flow: &Flow) {
    unsafe {
        let ip = &mut *pkt.ip;
        let tcp = &mut *pkt.tcp;
        if flow.direction == DIR_FORWARD {
            ip.dst_addr = flow.nat_addr.to_ne_bytes();
            tcp.dest = flow.nat_port.to_ne_bytes();
        } else {
            ip.src_addr = flow.nat_addr.to_ne_bytes();
            tcp.source = flow.nat_port.to_ne_bytes();
        }
        ip.check = apply(u16::from_ne_bytes(ip.check), flow.ip_csum_diff).to_ne_bytes();
        tcp.check = apply(u16::from_ne_bytes(tcp.check), flow.l4_csum_diff).to_ne_bytes();
    }
}
