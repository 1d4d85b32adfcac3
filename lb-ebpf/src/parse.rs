//! Ethernet → IPv4 → TCP, with every access bounds-checked against the packet
//! end so the verifier accepts it and a short packet never reads past it.
use core::mem;

use aya_ebpf::programs::XdpContext;
use lb_common::{Counter, FlowKey, PROTO_TCP, TCP_ACK, TCP_RST, TCP_SYN};
use network_types::{eth::EthHdr, ip::Ipv4Hdr, tcp::TcpHdr};

const ETH_P_IPV4: u16 = 0x0800;
/// More-fragments flag and fragment offset.
const IP_FRAGMENT_MASK: u16 = 0x3fff;

pub struct TcpPacket {
    pub eth: *mut EthHdr,
    pub ip: *mut Ipv4Hdr,
    pub tcp: *mut TcpHdr,
    pub flags: u8,
    /// Frame length, for byte counters.
    pub len: u64,
}

impl TcpPacket {
    /// The flow as this packet sees it.
    #[inline(always)]
    pub fn key(&self) -> FlowKey {
        unsafe {
            FlowKey {
                saddr: u32::from_ne_bytes((*self.ip).src_addr),
                daddr: u32::from_ne_bytes((*self.ip).dst_addr),
                sport: u16::from_ne_bytes((*self.tcp).source),
                dport: u16::from_ne_bytes((*self.tcp).dest),
            }
        }
    }

    /// A SYN that opens a connection (not the backend's SYN-ACK).
    #[inline(always)]
    pub fn is_syn(&self) -> bool {
        self.flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN
    }
}

pub enum Parsed {
    Tcp(TcpPacket),
    /// Not ours to handle: the kernel gets it untouched.
    Pass(Option<Counter>),
    /// Broken beyond what the kernel would accept.
    Drop(Counter),
}

#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    if start + offset + mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + offset) as *mut T)
}

#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Parsed {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return Parsed::Pass(None);
    };
    if u16::from_be(unsafe { (*eth).ether_type }) != ETH_P_IPV4 {
        return Parsed::Pass(None);
    }
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, EthHdr::LEN) else {
        return Parsed::Drop(Counter::MalformedIp);
    };
    let vihl = unsafe { (*ip).vihl };
    let header_len = ((vihl & 0x0f) as usize) * 4;
    let total_len = u16::from_be_bytes(unsafe { (*ip).tot_len }) as usize;
    let frame_len = ctx.data_end() - ctx.data();
    if vihl >> 4 != 4
        || header_len < Ipv4Hdr::LEN
        || total_len < header_len
        || EthHdr::LEN + total_len > frame_len
    {
        return Parsed::Drop(Counter::MalformedIp);
    }
    if u16::from_be_bytes(unsafe { (*ip).frags }) & IP_FRAGMENT_MASK != 0 {
        return Parsed::Pass(Some(Counter::Fragment));
    }
    if unsafe { (*ip).proto } != PROTO_TCP {
        return Parsed::Pass(None);
    }
    // IHL is at most 15, so the TCP header starts within 74 bytes.
    let Some(tcp) = ptr_at::<TcpHdr>(ctx, EthHdr::LEN + (header_len & 0x3c)) else {
        return Parsed::Drop(Counter::MalformedTcp);
    };
    let segment_len = total_len - header_len;
    let raw = tcp as *const u8;
    let data_offset = ((unsafe { *raw.add(12) } >> 4) as usize) * 4;
    if segment_len < TcpHdr::LEN || data_offset < TcpHdr::LEN || data_offset > segment_len {
        return Parsed::Drop(Counter::MalformedTcp);
    }
    Parsed::Tcp(TcpPacket {
        eth,
        ip,
        tcp,
        flags: unsafe { *raw.add(13) },
        len: frame_len as u64,
    })
}
