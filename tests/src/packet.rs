//! Crafted Ethernet/IPv4/TCP frames, and checksums recomputed from scratch.
use std::net::{Ipv4Addr, SocketAddrV4};

/// TCP flags, as the data path names them.
pub use lb_common::{TCP_ACK as ACK, TCP_FIN as FIN, TCP_PSH as PSH, TCP_RST as RST, TCP_SYN as SYN};

/// The initial sequence numbers the crafted handshakes use: the client's,
/// and the backend's.
pub const CLIENT_ISN: u32 = 0x0102_0304;
pub const BACKEND_ISN: u32 = 0xf0e0_d0c0;

/// The options of a Linux SYN (or SYN-ACK), in its order: MSS 1460, SACK
/// permitted, timestamps (`tsval`, no echo), a NOP, window scale 7.
pub fn linux_syn_options(tsval: u32) -> [u8; 20] {
    let ts = tsval.to_be_bytes();
    [2, 4, 0x05, 0xb4, 4, 2, 8, 10, ts[0], ts[1], ts[2], ts[3], 0, 0, 0, 0, 1, 3, 3, 7]
}

/// The options of every later segment of a connection with timestamps, as
/// Linux (and most stacks) lay them out: two NOPs, timestamps (`tsval`, no
/// echo).
pub fn timestamp_options(tsval: u32) -> [u8; 12] {
    let ts = tsval.to_be_bytes();
    [1, 1, 8, 10, ts[0], ts[1], ts[2], ts[3], 0, 0, 0, 0]
}

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
pub const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

#[derive(Clone, Debug)]
pub struct Tcp {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub flags: u8,
    pub seq: u32,
    pub ack: u32,
    pub window: u16,
    pub ttl: u8,
    pub ip_options: Vec<u8>,
    pub tcp_options: Vec<u8>,
    pub payload: Vec<u8>,
}

impl Tcp {
    pub fn new(src: SocketAddrV4, dst: SocketAddrV4, flags: u8) -> Self {
        Self {
            src,
            dst,
            flags,
            seq: CLIENT_ISN,
            ack: 0,
            window: 0xfaf0,
            ttl: 64,
            ip_options: Vec::new(),
            tcp_options: Vec::new(),
            payload: Vec::new(),
        }
    }

    pub fn seq(mut self, seq: u32) -> Self {
        self.seq = seq;
        self
    }

    pub fn ack(mut self, ack: u32) -> Self {
        self.ack = ack;
        self
    }

    pub fn window(mut self, window: u16) -> Self {
        self.window = window;
        self
    }

    /// TCP options, padded to whole words.
    pub fn tcp_options(mut self, options: &[u8]) -> Self {
        self.tcp_options = options.to_vec();
        while self.tcp_options.len() % 4 != 0 {
            self.tcp_options.push(1); // NOP
        }
        self
    }

    pub fn payload(mut self, payload: &[u8]) -> Self {
        self.payload = payload.to_vec();
        self
    }

    pub fn ip_options(mut self, options: &[u8]) -> Self {
        assert_eq!(options.len() % 4, 0);
        self.ip_options = options.to_vec();
        self
    }

    /// The frame, with correct IPv4 and TCP checksums.
    pub fn frame(&self) -> Vec<u8> {
        let ihl = 5 + self.ip_options.len() / 4;
        let tcp_header = 20 + self.tcp_options.len();
        let tcp_len = tcp_header + self.payload.len();
        let total = ihl * 4 + tcp_len;
        let mut f = Vec::new();
        f.extend_from_slice(&LB_MAC);
        f.extend_from_slice(&CLIENT_MAC);
        f.extend_from_slice(&0x0800u16.to_be_bytes());
        f.push(0x40 | ihl as u8);
        f.push(0);
        f.extend_from_slice(&(total as u16).to_be_bytes());
        f.extend_from_slice(&[0x12, 0x34, 0x40, 0x00]); // id, DF
        f.push(self.ttl);
        f.push(6);
        f.extend_from_slice(&[0, 0]);
        f.extend_from_slice(&self.src.ip().octets());
        f.extend_from_slice(&self.dst.ip().octets());
        f.extend_from_slice(&self.ip_options);
        f.extend_from_slice(&self.src.port().to_be_bytes());
        f.extend_from_slice(&self.dst.port().to_be_bytes());
        f.extend_from_slice(&self.seq.to_be_bytes());
        f.extend_from_slice(&self.ack.to_be_bytes());
        f.push(((tcp_header / 4) as u8) << 4);
        f.push(self.flags);
        f.extend_from_slice(&self.window.to_be_bytes());
        f.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent
        f.extend_from_slice(&self.tcp_options);
        f.extend_from_slice(&self.payload);
        fix_checksums(&mut f);
        f
    }
}

fn sum16(data: &[u8]) -> u32 {
    data.chunks(2).map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32).sum()
}

fn finish(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn ip_header_len(frame: &[u8]) -> usize {
    ((frame[14] & 0x0f) as usize) * 4
}

/// The IPv4 header checksum computed from scratch.
pub fn ip_checksum(frame: &[u8]) -> u16 {
    let hl = ip_header_len(frame);
    let mut header = frame[14..14 + hl].to_vec();
    header[10] = 0;
    header[11] = 0;
    finish(sum16(&header))
}

/// The TCP checksum computed from scratch, pseudo-header included.
pub fn tcp_checksum(frame: &[u8]) -> u16 {
    let hl = ip_header_len(frame);
    let total = u16::from_be_bytes([frame[16], frame[17]]) as usize;
    let mut segment = frame[14 + hl..14 + total].to_vec();
    segment[16] = 0;
    segment[17] = 0;
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&frame[26..34]);
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&((total - hl) as u16).to_be_bytes());
    finish(sum16(&pseudo) + sum16(&segment))
}

fn fix_checksums(frame: &mut [u8]) {
    let c = ip_checksum(frame);
    frame[24..26].copy_from_slice(&c.to_be_bytes());
    let hl = ip_header_len(frame);
    let c = tcp_checksum(frame);
    frame[14 + hl + 16..14 + hl + 18].copy_from_slice(&c.to_be_bytes());
}

/// What a test checks in a frame the program let out.
#[derive(Debug, PartialEq, Eq)]
pub struct Seen {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub flags: u8,
    pub ttl: u8,
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub payload: Vec<u8>,
}

/// Parses a TCP frame and asserts both checksums equal a full recomputation.
pub fn inspect(frame: &[u8]) -> Seen {
    let hl = ip_header_len(frame);
    let stored_ip = u16::from_be_bytes([frame[24], frame[25]]);
    assert_eq!(stored_ip, ip_checksum(frame), "IPv4 header checksum is wrong");
    let t = 14 + hl;
    let stored_tcp = u16::from_be_bytes([frame[t + 16], frame[t + 17]]);
    assert_eq!(stored_tcp, tcp_checksum(frame), "TCP checksum is wrong");
    let addr = |o: usize| Ipv4Addr::new(frame[o], frame[o + 1], frame[o + 2], frame[o + 3]);
    let port = |o: usize| u16::from_be_bytes([frame[o], frame[o + 1]]);
    let total = u16::from_be_bytes([frame[16], frame[17]]) as usize;
    let doff = ((frame[t + 12] >> 4) as usize) * 4;
    Seen {
        src: SocketAddrV4::new(addr(26), port(t)),
        dst: SocketAddrV4::new(addr(30), port(t + 2)),
        flags: frame[t + 13],
        ttl: frame[22],
        dst_mac: frame[0..6].try_into().unwrap(),
        src_mac: frame[6..12].try_into().unwrap(),
        payload: frame[t + doff..14 + total].to_vec(),
    }
}

/// An ICMP error frame from `src` to `dst` quoting `quoted` (an IP packet:
/// a frame's bytes after its Ethernet header), with correct checksums.
pub fn icmp_error(src: Ipv4Addr, dst: Ipv4Addr, kind: u8, code: u8, rest: [u8; 4], quoted: &[u8]) -> Vec<u8> {
    let total = 20 + 8 + quoted.len();
    let mut f = Vec::new();
    f.extend_from_slice(&LB_MAC);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    f.extend_from_slice(&[0x45, 0xc0]);
    f.extend_from_slice(&(total as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0, 0, 0, 64, 1, 0, 0]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    f.extend_from_slice(&[kind, code, 0, 0]);
    f.extend_from_slice(&rest);
    f.extend_from_slice(quoted);
    let c = ip_checksum(&f);
    f[24..26].copy_from_slice(&c.to_be_bytes());
    let c = finish(sum16(&f[34..]));
    f[36..38].copy_from_slice(&c.to_be_bytes());
    f
}

/// What a test checks in an ICMP error the program let out.
#[derive(Debug, PartialEq, Eq)]
pub struct SeenIcmp {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub ttl: u8,
    pub kind: u8,
    pub code: u8,
    /// For fragmentation needed: the next hop's MTU.
    pub mtu: u16,
    pub dst_mac: [u8; 6],
    /// The quoted packet's addresses and ports.
    pub quoted_src: SocketAddrV4,
    pub quoted_dst: SocketAddrV4,
    pub quoted_seq: u32,
    /// The quoted bytes (IP header on).
    pub quoted: Vec<u8>,
}

/// Parses an ICMP error frame and asserts its IPv4 and ICMP checksums, and
/// the quoted IPv4 header's, equal a full recomputation.
pub fn inspect_icmp(frame: &[u8]) -> SeenIcmp {
    assert!(frame.len() >= 14 + 20 + 8 + 28, "too short for an ICMP error: {} bytes", frame.len());
    assert_eq!(u16::from_be_bytes([frame[12], frame[13]]), 0x0800);
    assert_eq!(frame[23], 1, "not ICMP");
    let hl = ip_header_len(frame);
    let total = u16::from_be_bytes([frame[16], frame[17]]) as usize;
    assert_eq!(14 + total, frame.len(), "the IP length covers the frame");
    assert_eq!(u16::from_be_bytes([frame[24], frame[25]]), ip_checksum(frame), "IPv4 header checksum is wrong");
    let icmp = &frame[14 + hl..];
    assert_eq!(finish(sum16(icmp)), 0, "ICMP checksum is wrong");
    let quoted = &icmp[8..];
    let mut quoted_frame = frame[..14].to_vec();
    quoted_frame.extend_from_slice(quoted);
    assert_eq!(
        u16::from_be_bytes([quoted_frame[24], quoted_frame[25]]),
        ip_checksum(&quoted_frame),
        "the quoted IPv4 header's checksum is wrong"
    );
    let addr = |b: &[u8], o: usize| Ipv4Addr::new(b[o], b[o + 1], b[o + 2], b[o + 3]);
    let port = |b: &[u8], o: usize| u16::from_be_bytes([b[o], b[o + 1]]);
    let qhl = ((quoted[0] & 0x0f) as usize) * 4;
    SeenIcmp {
        src: addr(frame, 26),
        dst: addr(frame, 30),
        ttl: frame[22],
        kind: icmp[0],
        code: icmp[1],
        mtu: port(icmp, 6),
        dst_mac: frame[0..6].try_into().unwrap(),
        quoted_src: SocketAddrV4::new(addr(quoted, 12), port(quoted, qhl)),
        quoted_dst: SocketAddrV4::new(addr(quoted, 16), port(quoted, qhl + 2)),
        quoted_seq: u32::from_be_bytes(quoted[qhl + 4..qhl + 8].try_into().unwrap()),
        quoted: quoted.to_vec(),
    }
}

/// The TCP checksum of a quoted packet that is whole (header and payload),
/// recomputed from scratch and compared with the one it carries.
pub fn quoted_tcp_checksum_is_right(quoted: &[u8]) -> bool {
    let mut frame = vec![0u8; 14];
    frame[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    frame.extend_from_slice(quoted);
    let t = 14 + ip_header_len(&frame);
    u16::from_be_bytes([frame[t + 16], frame[t + 17]]) == tcp_checksum(&frame)
}

/// An IPIP packet's outer header, as a test checks it, and the frame it
/// carries (the outer frame's Ethernet header on the inner packet).
#[derive(Debug)]
pub struct Tunnelled {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub ttl: u8,
    /// The outer header's flags and fragment offset.
    pub frags: u16,
    pub dst_mac: [u8; 6],
    pub inner: Vec<u8>,
}

/// Parses an IPIP frame, asserting that its outer header is plain (no
/// options), its checksum equals a full recomputation, and its length is the
/// inner packet's and its own.
pub fn inspect_tunnelled(frame: &[u8]) -> Tunnelled {
    assert_eq!(u16::from_be_bytes([frame[12], frame[13]]), 0x0800);
    assert_eq!(frame[14], 0x45, "an outer header without options");
    assert_eq!(frame[23], 4, "not IPIP");
    assert_eq!(u16::from_be_bytes([frame[24], frame[25]]), ip_checksum(frame), "outer IPv4 checksum is wrong");
    let total = u16::from_be_bytes([frame[16], frame[17]]) as usize;
    assert_eq!(14 + total, frame.len(), "the outer length covers the frame");
    let inner_total = u16::from_be_bytes([frame[36], frame[37]]) as usize;
    assert_eq!(total, 20 + inner_total, "the outer length is the inner one and 20");
    let addr = |o: usize| Ipv4Addr::new(frame[o], frame[o + 1], frame[o + 2], frame[o + 3]);
    let mut inner = frame[..14].to_vec();
    inner.extend_from_slice(&frame[34..]);
    Tunnelled {
        src: addr(26),
        dst: addr(30),
        ttl: frame[22],
        frags: u16::from_be_bytes([frame[20], frame[21]]),
        dst_mac: frame[0..6].try_into().unwrap(),
        inner,
    }
}

/// `inner` (a frame) inside an IPIP header from `src` to `dst`, with a
/// correct checksum.
pub fn ipip(src: Ipv4Addr, dst: Ipv4Addr, inner: &[u8]) -> Vec<u8> {
    let total = 20 + inner.len() - 14;
    let mut f = inner[..14].to_vec();
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&(total as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0, 0x40, 0, 64, 4, 0, 0]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    f.extend_from_slice(&inner[14..]);
    let c = ip_checksum(&f);
    f[24..26].copy_from_slice(&c.to_be_bytes());
    f
}
