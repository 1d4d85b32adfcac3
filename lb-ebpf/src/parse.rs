//! Ethernet → IPv4 → TCP, with every access bounds-checked against the packet
//! end so the verifier accepts it and a short packet never reads past it.
use core::mem::{self, MaybeUninit};

use core::ffi::c_void;

use aya_ebpf::{
    helpers::{bpf_loop, bpf_xdp_load_bytes},
    programs::XdpContext,
};
use lb_common::{Counter, FlowKey, PROTO_TCP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};
use network_types::{eth::EthHdr, ip::Ipv4Hdr, tcp::TcpHdr};

use crate::{maps::OPTIONS_FOUND, zero::zero};

pub const ETH_P_IPV4: u16 = 0x0800;
/// More-fragments flag and fragment offset.
pub const IP_FRAGMENT_MASK: u16 = 0x3fff;

pub struct TcpPacket {
    pub eth: *mut EthHdr,
    pub ip: *mut Ipv4Hdr,
    pub tcp: *mut TcpHdr,
    pub flags: u8,
    /// Where the TCP header starts in the frame, and its length, options
    /// included.
    pub tcp_offset: u32,
    pub header_len: u32,
    /// Sequence space the segment takes: its payload, and one each for SYN
    /// and FIN.
    pub seq_len: u32,
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

    /// A SYN that opens a connection (not the backend's SYN-ACK, nor a
    /// SYN with FIN or RST, which no real stack sends).
    #[inline(always)]
    pub fn is_syn(&self) -> bool {
        self.flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) == TCP_SYN
    }

    #[inline(always)]
    pub fn seq(&self) -> u32 {
        u32::from_be_bytes(unsafe { (*self.tcp).seq })
    }

    #[inline(always)]
    pub fn ack_seq(&self) -> u32 {
        u32::from_be_bytes(unsafe { (*self.tcp).ack_seq })
    }

    /// The advertised window, before scaling.
    #[inline(always)]
    pub fn window(&self) -> u32 {
        u16::from_be_bytes(unsafe { (*self.tcp).window }) as u32
    }

    /// The IP packet's length, as its header says.
    #[inline(always)]
    pub fn ip_len(&self) -> u16 {
        u16::from_be_bytes(unsafe { (*self.ip).tot_len })
    }

    /// The IP header's flags and fragment offset.
    #[inline(always)]
    pub fn frag_flags(&self) -> u16 {
        u16::from_be_bytes(unsafe { (*self.ip).frags })
    }

    #[inline(always)]
    pub fn ttl(&self) -> u8 {
        unsafe { (*self.ip).ttl }
    }

    /// The next sequence number after this segment.
    #[inline(always)]
    pub fn seq_end(&self) -> u32 {
        self.seq().wrapping_add(self.seq_len)
    }
}

/// Bytes of TCP options a header can carry.
const MAX_OPTIONS: usize = 40;
const OPT_END: u8 = 0;
const OPT_NOP: u8 = 1;
const OPT_WINDOW_SCALE: u8 = 3;
const OPT_TIMESTAMPS: u8 = 8;
/// RFC 7323: shifts above 14 are taken as 14.
const MAX_WINDOW_SCALE: u8 = 14;

/// The options of one header, copied out of the packet, and the walk over
/// them.
#[repr(C, align(8))]
struct OptionWalk {
    /// Room past the last option for its length and value bytes.
    bytes: [u8; MAX_OPTIONS + 4],
    len: u32,
    at: u32,
    found: TcpOptions,
}

/// What the balancer reads in a segment's TCP options (RFC 7323): the
/// window scale a SYN or SYN-ACK announces (0 without it) and the
/// timestamp value (`ts_seen` 0 without it).
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct TcpOptions {
    pub scale: u32,
    pub ts_seen: u32,
    pub ts: u32,
}

/// The options of a handshake or closing segment. Linux's layouts are
/// read in place (`common_options`); others are walked (`walk_options`).
#[inline(always)]
pub fn tcp_options(ctx: &XdpContext, pkt: &TcpPacket) -> TcpOptions {
    let Some(found) = OPTIONS_FOUND.get_ptr_mut(0) else {
        return TcpOptions::default();
    };
    // Whichever reads them leaves them in this CPU's `OPTIONS_FOUND`, in
    // map memory, and they are read back from there: the verifier then
    // carries one state on, not one per layout (one each went past its
    // limit of a million instructions).
    if !common_options(ctx, pkt, unsafe { &mut *found }) {
        let walked = walk_options(ctx, pkt);
        unsafe { *found = walked };
    }
    unsafe { core::ptr::read_volatile(found) }
}

/// Bytes of options in `pkt`'s header. Worked out afresh by each reader,
/// and masked, so that neither LLVM nor the verifier ties what one learns
/// of it to the other or to the header's length (another state per layout).
#[inline(always)]
fn options_len(pkt: &TcpPacket) -> usize {
    let header = (unsafe { core::ptr::read_volatile(&pkt.header_len) } & 0xff) as usize;
    header.saturating_sub(TcpHdr::LEN).min(MAX_OPTIONS)
}

/// None, or Linux's SYN and SYN-ACK options (MSS, SACK permitted,
/// timestamps, a NOP, window scale) or the timestamps every stack puts on
/// later segments (two NOPs, timestamps), read where they lie in the
/// packet: most segments that carry options, without a copy and a walk.
/// False, leaving `found` as it was, for any other layout.
#[inline(always)]
fn common_options(ctx: &XdpContext, pkt: &TcpPacket, found: &mut TcpOptions) -> bool {
    // A pointer of its own, from the frame's start: the verifier learns the
    // bounds checked here of it alone, not of the packet's header pointers.
    let start = ctx.data() + (pkt.tcp_offset as usize & 0xff) + TcpHdr::LEN;
    let fits = |bytes: usize| start + bytes <= ctx.data_end();
    let word = |at: usize| unsafe { u32::from_be(core::ptr::read_unaligned((start + at) as *const u32)) };
    let options = match options_len(pkt) {
        0 => TcpOptions::default(),
        20 if fits(20) && word(0) >> 16 == 0x0204 && word(4) == 0x0402_080a && word(16) >> 8 == 0x01_0303 => TcpOptions {
            scale: (word(16) as u8).min(MAX_WINDOW_SCALE) as u32,
            ts_seen: 1,
            ts: word(8),
        },
        12 if fits(12) && word(0) == 0x0101_080a => TcpOptions { scale: 0, ts_seen: 1, ts: word(4) },
        _ => return false,
    };
    *found = options;
    true
}

/// Options of any layout, copied out of the packet and walked under
/// `bpf_loop`, so the verifier checks its step once.
#[inline(always)]
fn walk_options(ctx: &XdpContext, pkt: &TcpPacket) -> TcpOptions {
    // Checked for none as the header's length: LLVM turns a check of the
    // options' own into that anyway, and the verifier then does not know
    // the copy's length is not 0.
    let header = options_len(pkt) + TcpHdr::LEN;
    if header <= TcpHdr::LEN {
        return TcpOptions::default();
    }
    let len = header - TcpHdr::LEN;
    let offset = pkt.tcp_offset as usize + TcpHdr::LEN;
    let mut walk = MaybeUninit::<OptionWalk>::uninit();
    zero(walk.as_mut_ptr());
    let walk = unsafe { walk.assume_init_mut() };
    walk.len = len as u32;
    let copied = unsafe {
        bpf_xdp_load_bytes(ctx.ctx as *mut _, offset as u32, walk.bytes.as_mut_ptr() as *mut c_void, len as u32)
    };
    if copied != 0 {
        return TcpOptions::default();
    }
    unsafe { bpf_loop(MAX_OPTIONS as u32, option_step as *mut c_void, walk as *mut OptionWalk as *mut c_void, 0) };
    walk.found
}

/// One option: returns 1 to stop the walk.
#[inline(never)]
extern "C" fn option_step(_index: u64, ctx: *mut c_void) -> i64 {
    let walk = unsafe { &mut *(ctx as *mut OptionWalk) };
    let at = walk.at as usize;
    if at >= walk.len as usize || at >= MAX_OPTIONS {
        return 1;
    }
    let (Some(&kind), Some(&len), Some(&value)) = (walk.bytes.get(at), walk.bytes.get(at + 1), walk.bytes.get(at + 2))
    else {
        return 1;
    };
    match kind {
        OPT_END => 1,
        OPT_NOP => {
            walk.at += 1;
            0
        }
        OPT_WINDOW_SCALE if len == 3 => {
            walk.found.scale = value.min(MAX_WINDOW_SCALE) as u32;
            walk.at += 3;
            0
        }
        OPT_TIMESTAMPS if len == 10 => {
            let (Some(&b1), Some(&b2), Some(&b3)) = (walk.bytes.get(at + 3), walk.bytes.get(at + 4), walk.bytes.get(at + 5))
            else {
                return 1;
            };
            walk.found.ts = u32::from_be_bytes([value, b1, b2, b3]);
            walk.found.ts_seen = 1;
            walk.at += 10;
            0
        }
        _ if len < 2 => 1,
        _ => {
            walk.at += len as u32;
            0
        }
    }
}

pub const PROTO_ICMP: u8 = 1;
pub const DEST_UNREACHABLE: u8 = 3;
pub const FRAG_NEEDED: u8 = 4;
pub const TIME_EXCEEDED: u8 = 11;

/// The ICMP header: type, code, checksum, and four bytes that depend on the
/// type (for fragmentation needed: unused, then the next hop's MTU).
#[repr(C)]
pub struct IcmpHdr {
    pub kind: u8,
    pub code: u8,
    pub check: [u8; 2],
    pub rest: [u8; 4],
}

/// An ICMP error (destination unreachable, time exceeded) that quotes a TCP
/// packet: the outer headers, and the quoted IP header and the first 8
/// bytes of its TCP header.
pub struct IcmpError {
    pub eth: *mut EthHdr,
    pub ip: *mut Ipv4Hdr,
    pub icmp: *mut IcmpHdr,
    pub inner_ip: *mut Ipv4Hdr,
    /// Ports and sequence number.
    pub inner_ports: *mut [u8; 8],
    /// The quoted TCP checksum, where the quote reaches it.
    pub inner_check: Option<*mut [u8; 2]>,
}

pub enum Parsed {
    Tcp(TcpPacket),
    Icmp(IcmpError),
    /// Not ours to handle: the kernel gets it untouched.
    Pass(Option<Counter>),
    /// Broken beyond what the kernel would accept.
    Drop(Counter),
}

#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
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
    // IHL is at most 15, so the next header starts within 74 bytes.
    let l4_offset = EthHdr::LEN + (header_len & 0x3c);
    match unsafe { (*ip).proto } {
        PROTO_TCP => {}
        PROTO_ICMP => return parse_icmp(ctx, eth, ip, l4_offset),
        _ => return Parsed::Pass(None),
    }
    let tcp_offset = l4_offset;
    let Some(tcp) = ptr_at::<TcpHdr>(ctx, tcp_offset) else {
        return Parsed::Drop(Counter::MalformedTcp);
    };
    let segment_len = total_len - header_len;
    let raw = tcp as *const u8;
    let data_offset = ((unsafe { *raw.add(12) } >> 4) as usize) * 4;
    if segment_len < TcpHdr::LEN || data_offset < TcpHdr::LEN || data_offset > segment_len {
        return Parsed::Drop(Counter::MalformedTcp);
    }
    let flags = unsafe { *raw.add(13) };
    let seq_len = (segment_len - data_offset) as u32 + (flags & TCP_SYN != 0) as u32 + (flags & TCP_FIN != 0) as u32;
    Parsed::Tcp(TcpPacket {
        eth,
        ip,
        tcp,
        flags,
        tcp_offset: tcp_offset as u32,
        header_len: data_offset as u32,
        seq_len,
        len: frame_len as u64,
    })
}

/// An ICMP error quoting a TCP packet with a plain IP header, or the kernel's.
#[inline(always)]
fn parse_icmp(ctx: &XdpContext, eth: *mut EthHdr, ip: *mut Ipv4Hdr, offset: usize) -> Parsed {
    let Some(icmp) = ptr_at::<IcmpHdr>(ctx, offset) else {
        return Parsed::Pass(None);
    };
    let kind = unsafe { (*icmp).kind };
    if kind != DEST_UNREACHABLE && kind != TIME_EXCEEDED {
        return Parsed::Pass(None);
    }
    let inner_offset = offset + mem::size_of::<IcmpHdr>();
    let Some(inner_ip) = ptr_at::<Ipv4Hdr>(ctx, inner_offset) else {
        return Parsed::Pass(None);
    };
    if unsafe { (*inner_ip).vihl } != 0x45 || unsafe { (*inner_ip).proto } != PROTO_TCP {
        return Parsed::Pass(None);
    }
    let ports_offset = inner_offset + Ipv4Hdr::LEN;
    let Some(inner_ports) = ptr_at::<[u8; 8]>(ctx, ports_offset) else {
        return Parsed::Pass(None);
    };
    let inner_check = ptr_at::<[u8; 2]>(ctx, ports_offset + 16);
    Parsed::Icmp(IcmpError { eth, ip, icmp, inner_ip, inner_ports, inner_check })
}
