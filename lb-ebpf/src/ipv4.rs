//! A plain IPv4 header (no options) with its checksum, for the headers the
//! balancer writes itself: its ICMP answers and DSR's IPIP outer header.
use crate::csum::{fold, words};

pub const HEADER_LEN: usize = 20;

pub struct Ipv4Header {
    pub tos: u8,
    /// The total length, the header's included.
    pub len: u16,
    pub id: u16,
    /// Flags and fragment offset.
    pub frag: u16,
    pub ttl: u8,
    pub proto: u8,
    /// Addresses as on the wire.
    pub src: [u8; 4],
    pub dst: [u8; 4],
}

impl Ipv4Header {
    /// Writes the header, checksum computed, into the first 20 bytes of
    /// `out`.
    #[inline(always)]
    pub fn write(&self, out: &mut [u8]) {
        if out.len() < HEADER_LEN {
            return;
        }
        out[0] = 0x45;
        out[1] = self.tos;
        out[2..4].copy_from_slice(&self.len.to_be_bytes());
        out[4..6].copy_from_slice(&self.id.to_be_bytes());
        out[6..8].copy_from_slice(&self.frag.to_be_bytes());
        out[8] = self.ttl;
        out[9] = self.proto;
        out[12..16].copy_from_slice(&self.src);
        out[16..20].copy_from_slice(&self.dst);
        let sum = (0x4500 | self.tos as u32)
            + self.len as u32
            + self.id as u32
            + self.frag as u32
            + ((self.ttl as u32) << 8 | self.proto as u32)
            + words(self.src)
            + words(self.dst);
        out[10..12].copy_from_slice(&(!fold(sum)).to_be_bytes());
    }
}
