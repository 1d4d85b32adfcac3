//! Sending crafted packets from inside a namespace, as a hostile host on
//! that network would: a raw IPv4 socket (`IP_HDRINCL`), so the address,
//! ports and sequence numbers are whatever the test says, and the kernel
//! routes the packet out of the namespace's own interface.
use std::net::SocketAddrV4;

use crate::{netns::Netns, packet::Tcp};

/// Sends each segment from `ns`, as built (checksums included).
pub fn send(ns: &Netns, segments: &[Tcp]) {
    let packets: Vec<(Vec<u8>, SocketAddrV4)> =
        segments.iter().map(|t| (t.frame()[14..].to_vec(), t.dst)).collect();
    ns.run(move || {
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        for (packet, dst) in &packets {
            let to = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: 0,
                sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(dst.ip().octets()) },
                sin_zero: [0; 8],
            };
            let sent = unsafe {
                libc::sendto(
                    fd,
                    packet.as_ptr() as *const libc::c_void,
                    packet.len(),
                    0,
                    &to as *const libc::sockaddr_in as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_in>() as u32,
                )
            };
            assert_eq!(sent, packet.len() as isize, "sendto: {}", std::io::Error::last_os_error());
        }
        unsafe { libc::close(fd) };
    });
}
