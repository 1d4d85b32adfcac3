//! Keeping DSR backends' MAC addresses resolved. The data path finds a
//! backend's MAC through the kernel's neighbour table, which only fills as
//! the host itself sends to the backend; nat gets that from the kernel
//! forwarding the first packet, but a DSR packet handed to the kernel would
//! be delivered to the VIP here. So each on-link DSR backend gets a
//! *managed* neighbour entry (Linux 5.16+): the kernel resolves it and keeps
//! it reachable with no traffic of its own — the mechanism was added for
//! XDP balancers that use `bpf_fib_lookup`.
use std::{ffi::CStr, net::Ipv4Addr};

use anyhow::{bail, Context, Result};
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::{
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourExtFlags, NeighbourMessage, NeighbourState},
    AddressFamily, RouteNetlinkMessage,
};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// The interface whose own subnet holds `addr` (its index), if any: the
/// backend is on that link, not behind a router.
pub fn on_link_interface(addr: Ipv4Addr) -> Option<u32> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return None;
    }
    let mut found = None;
    let mut entry = list;
    while !entry.is_null() {
        let e = unsafe { &*entry };
        entry = e.ifa_next;
        if e.ifa_addr.is_null() || e.ifa_netmask.is_null() || unsafe { (*e.ifa_addr).sa_family } as i32 != libc::AF_INET {
            continue;
        }
        let ipv4 = |sa: *mut libc::sockaddr| u32::from_be(unsafe { (*(sa as *const libc::sockaddr_in)).sin_addr.s_addr });
        let (own, mask) = (ipv4(e.ifa_addr), ipv4(e.ifa_netmask));
        let target = u32::from(addr);
        if mask != u32::MAX && mask != 0 && own & mask == target & mask && own != target {
            let index = unsafe { libc::if_nametoindex(CStr::from_ptr(e.ifa_name).as_ptr()) };
            if index != 0 {
                found = Some(index);
                break;
            }
        }
    }
    unsafe { libc::freeifaddrs(list) };
    found
}

/// Asks the kernel to keep `addr`'s neighbour entry on interface `ifindex`
/// resolved: makes it a managed entry, keeping the MAC address and state it
/// has if it is resolved already (so no packet finds it missing meanwhile).
/// A static entry (permanent, or a link without ARP) is left as it is:
/// there is nothing to resolve.
pub fn keep_resolved(addr: Ipv4Addr, ifindex: u32) -> Result<()> {
    let mut socket = Socket::new(NETLINK_ROUTE).context("opening a netlink socket")?;
    socket.bind_auto().context("binding the netlink socket")?;
    socket.connect(&SocketAddr::new(0, 0)).context("connecting the netlink socket")?;
    let mut message = NeighbourMessage::default();
    message.header.family = AddressFamily::Inet;
    message.header.ifindex = ifindex;
    message.attributes.push(NeighbourAttribute::Destination(NeighbourAddress::Inet(addr)));

    let current = request(&mut socket, RouteNetlinkMessage::GetNeighbour(message.clone()), NLM_F_REQUEST);
    if let Ok(Some(found)) = &current {
        match found.header.state {
            NeighbourState::Permanent | NeighbourState::Noarp => return Ok(()),
            NeighbourState::Reachable | NeighbourState::Stale | NeighbourState::Delay | NeighbourState::Probe => {
                if let Some(mac) = found.attributes.iter().find_map(|a| match a {
                    NeighbourAttribute::LinkLayerAddress(mac) => Some(mac.clone()),
                    _ => None,
                }) {
                    message.header.state = found.header.state;
                    message.attributes.push(NeighbourAttribute::LinkLayerAddress(mac));
                }
            }
            _ => {}
        }
    }
    message.attributes.push(NeighbourAttribute::ExtFlags(NeighbourExtFlags::Managed));
    let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE;
    request(&mut socket, RouteNetlinkMessage::NewNeighbour(message), flags).map_err(|e| {
        anyhow::anyhow!("the kernel refused a managed neighbour entry for {addr} (Linux 5.16 or later has them): {e}")
    })?;
    Ok(())
}

/// Sends one request and reads its answer: the neighbour it carries, if any.
fn request(socket: &mut Socket, payload: RouteNetlinkMessage, flags: u16) -> Result<Option<NeighbourMessage>> {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    let mut request = NetlinkMessage::new(header, NetlinkPayload::from(payload));
    request.finalize();
    let mut buf = vec![0; request.header.length as usize];
    request.serialize(&mut buf[..]);
    socket.send(&buf, 0).context("sending a netlink request")?;
    let mut answer = vec![0; 4096];
    let size = socket.recv(&mut &mut answer[..], 0).context("reading the kernel's answer")?;
    let reply: NetlinkMessage<RouteNetlinkMessage> =
        NetlinkMessage::deserialize(&answer[..size]).context("reading the kernel's answer")?;
    match reply.payload {
        NetlinkPayload::Error(e) if e.code.is_some() => bail!("{}", e.to_io()),
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNeighbour(found)) => Ok(Some(found)),
        _ => Ok(None),
    }
}
