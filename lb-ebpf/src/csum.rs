//! Incremental Internet checksum updates (RFC 1624, eqn. 3). One's-complement
//! sums do not depend on byte order, so words are used as loaded from memory.

#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// What replacing 16-bit word `old` with `new` adds to a checksum's sum.
#[inline(always)]
pub fn diff16(old: u16, new: u16) -> u32 {
    (!old) as u32 + new as u32
}

/// The same for a 32-bit field, as two 16-bit words.
#[inline(always)]
pub fn diff32(old: u32, new: u32) -> u32 {
    diff16(old as u16, new as u16) + diff16((old >> 16) as u16, (new >> 16) as u16)
}

/// Applies a folded difference to a checksum field.
#[inline(always)]
pub fn apply(check: u16, diff: u16) -> u16 {
    !fold((!check) as u32 + diff as u32)
}

/// The sum of a 32-bit field's two 16-bit words, as they are on the wire.
#[inline(always)]
pub fn words(bytes: [u8; 4]) -> u32 {
    u16::from_be_bytes([bytes[0], bytes[1]]) as u32 + u16::from_be_bytes([bytes[2], bytes[3]]) as u32
}
