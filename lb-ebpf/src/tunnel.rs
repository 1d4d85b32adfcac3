//! DSR through an IPIP tunnel (RFC 2003): the client's packet goes to the
//! backend as it came, inside an outer IPv4 header from the balancer to the
//! backend, so a backend in another subnet can take it; the backend strips
//! the outer header (`lb decap`) and answers the client from the VIP.
use aya_ebpf::{helpers::bpf_xdp_adjust_head, programs::XdpContext};
use lb_common::{Flow, MODE_DSR_IPIP};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::ipv4::Ipv4Header;

/// What the outer header adds to a packet.
pub const IPIP_OVERHEAD: u16 = Ipv4Hdr::LEN as u16;
const PROTO_IPIP: u8 = 4;
/// IPv4's don't-fragment flag.
const IP_DF: u16 = 0x4000;
const OUTER_TTL: u8 = 64;
const FRONT: usize = EthHdr::LEN + Ipv4Hdr::LEN;

/// The bytes `flow`'s packets grow by on their way to the backend.
#[inline(always)]
pub fn overhead(flow: &Flow) -> u16 {
    if flow.mode == MODE_DSR_IPIP {
        IPIP_OVERHEAD
    } else {
        0
    }
}

/// Puts the frame's IPv4 packet inside an outer header from
/// `flow.peer_addr` (the balancer) to `flow.nat_addr` (the backend). The
/// outer header takes the inner one's TOS, identification and DF, as RFC
/// 2003 says. Returns the new front of the frame (its MAC addresses still
/// to be set), or `None` where the frame could not grow. Every earlier
/// pointer into the packet is stale after this.
#[inline(always)]
pub fn encapsulate(ctx: &XdpContext, flow: &Flow) -> Option<*mut EthHdr> {
    let data = ctx.data();
    if data + FRONT > ctx.data_end() {
        return None;
    }
    let inner = unsafe { &*((data + EthHdr::LEN) as *const [u8; Ipv4Hdr::LEN]) };
    let tos = inner[1];
    let inner_len = u16::from_be_bytes([inner[2], inner[3]]);
    let id = u16::from_be_bytes([inner[4], inner[5]]);
    let df = u16::from_be_bytes([inner[6], inner[7]]) & IP_DF;
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(IPIP_OVERHEAD as i32)) } != 0 {
        return None;
    }
    let data = ctx.data();
    if data + FRONT > ctx.data_end() {
        return None;
    }
    let front = unsafe { &mut *(data as *mut [u8; FRONT]) };
    front[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let outer = Ipv4Header {
        tos,
        len: inner_len.wrapping_add(IPIP_OVERHEAD),
        id,
        frag: df,
        ttl: OUTER_TTL,
        proto: PROTO_IPIP,
        src: flow.peer_addr.to_ne_bytes(),
        dst: flow.nat_addr.to_ne_bytes(),
    };
    outer.write(&mut front[EthHdr::LEN..]);
    Some(data as *mut EthHdr)
}
