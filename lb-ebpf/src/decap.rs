//! The backend's half of DSR over IPIP, for backends whose kernel has no
//! `ipip` module: an IPIP packet whose inner destination is one of the VIPs
//! in `DECAP_VIPS` loses its outer header and goes on to the kernel as the
//! client sent it, for the VIP the backend holds on `lo`. Everything else
//! passes untouched. `lb decap attach` loads it on a backend's interface.
use aya_ebpf::{
    bindings::xdp_action::XDP_PASS,
    helpers::bpf_xdp_adjust_head,
    macros::map,
    maps::{HashMap, PerCpuArray},
    programs::XdpContext,
};
use lb_common::{DecapStats, MAX_DECAP_VIPS};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::parse::{ptr_at, ETH_P_IPV4, IP_FRAGMENT_MASK};

/// The VIPs (network byte order) whose tunnelled packets are taken; the
/// value is unused.
#[map]
pub static DECAP_VIPS: HashMap<u32, u32> = HashMap::with_max_entries(MAX_DECAP_VIPS, 0);

#[map]
pub static DECAP_STATS: PerCpuArray<DecapStats> = PerCpuArray::with_max_entries(1, 0);

const PROTO_IPIP: u8 = 4;

#[inline(always)]
pub fn decapsulate(ctx: &XdpContext) -> u32 {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return XDP_PASS;
    };
    if u16::from_be(unsafe { (*eth).ether_type }) != ETH_P_IPV4 {
        return XDP_PASS;
    }
    let Some(outer) = ptr_at::<Ipv4Hdr>(ctx, EthHdr::LEN) else {
        return XDP_PASS;
    };
    if unsafe { (*outer).proto } != PROTO_IPIP {
        return XDP_PASS;
    }
    // The balancer's outer header has no options and is never fragmented
    // (it answers packets too big for the tunnel with ICMP instead).
    let plain = unsafe { (*outer).vihl == 0x45 && u16::from_be_bytes((*outer).frags) & IP_FRAGMENT_MASK == 0 };
    let Some(inner) = ptr_at::<Ipv4Hdr>(ctx, EthHdr::LEN + Ipv4Hdr::LEN) else {
        return passed();
    };
    let inner_dst = u32::from_ne_bytes(unsafe { (*inner).dst_addr });
    if !plain || unsafe { DECAP_VIPS.get(&inner_dst) }.is_none() {
        return passed();
    }
    // The Ethernet header moves up over the outer IP header, which the
    // head adjustment then drops.
    let Some(front) = ptr_at::<[u8; EthHdr::LEN + Ipv4Hdr::LEN]>(ctx, 0) else {
        return XDP_PASS;
    };
    let front = unsafe { &mut *front };
    let mut i = 0;
    while i < EthHdr::LEN {
        front[Ipv4Hdr::LEN + i] = front[i];
        i += 1;
    }
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, Ipv4Hdr::LEN as i32) } != 0 {
        return XDP_PASS;
    }
    if let Some(stats) = DECAP_STATS.get_ptr_mut(0) {
        unsafe { (*stats).decapsulated += 1 };
    }
    XDP_PASS
}

#[inline(always)]
fn passed() -> u32 {
    if let Some(stats) = DECAP_STATS.get_ptr_mut(0) {
        unsafe { (*stats).passed += 1 };
    }
    XDP_PASS
}
