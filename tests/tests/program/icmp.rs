//! ICMP as a router on the flow's path owes it, on crafted packets: a
//! packet too big for its next hop with DF set, or with its TTL run out, is
//! answered with the ICMP error quoting it as its sender sent it; ICMP errors
//! others send about a flow's packets are translated (outer and inner
//! addresses, ports and checksums) and sent on to the flow's other side.
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    process::Command,
};

use lb::datapath::{XDP_PASS, XDP_REDIRECT};
use lb_common::Counter;
use lb_tests::{
    packet::{icmp_error, inspect, inspect_icmp, ip_checksum, quoted_tcp_checksum_is_right, Tcp, ACK, CLIENT_MAC, PSH, SYN},
    routed::{active, backend, backend_mac, client, counter, flow_entries, half_open, run, with_balancer, Conn, CLIENT, VIP},
};

const ISN: u32 = 0x1000_0000;
const BACKEND_ISN: u32 = 0x2000_0000;
const DEST_UNREACHABLE: u8 = 3;
const FRAG_NEEDED: u8 = 4;
const TIME_EXCEEDED: u8 = 11;

/// Sets an interface's MTU in the routed namespace the test runs in.
fn set_mtu(dev: &str, mtu: u32) {
    let ok = Command::new("ip").args(["link", "set", dev, "mtu", &mtu.to_string()]).status().unwrap().success();
    assert!(ok, "ip link set {dev} mtu {mtu}");
}

/// What an ICMP error quotes of a frame: its IP header and 8 bytes of TCP.
fn quote_of(frame: &[u8]) -> &[u8] {
    &frame[14..14 + 28]
}

fn without_df(mut frame: Vec<u8>) -> Vec<u8> {
    frame[20] &= !0x40;
    let c = ip_checksum(&frame);
    frame[24..26].copy_from_slice(&c.to_be_bytes());
    frame
}

fn with_ttl(mut segment: Tcp, ttl: u8) -> Vec<u8> {
    segment.ttl = ttl;
    segment.frame()
}

#[test]
fn a_client_segment_too_big_for_the_backend_side_gets_frag_needed_quoting_it_as_sent() {
    with_balancer(&[1], |b| {
        set_mtu("srv", 1400);
        let mut conn = Conn::open(b, 61000, ISN, BACKEND_ISN);
        let sent = conn.client_segment(ACK | PSH, &[7; 1400]).frame();
        let (verdict, out) = run(b, &sent);
        assert_eq!(verdict, XDP_REDIRECT, "answered, back where it came from");
        let icmp = inspect_icmp(&out);
        assert_eq!((icmp.kind, icmp.code, icmp.mtu), (DEST_UNREACHABLE, FRAG_NEEDED, 1400));
        assert_eq!((icmp.src, icmp.dst, icmp.dst_mac), (*VIP.ip(), CLIENT, CLIENT_MAC));
        assert_eq!(icmp.quoted, quote_of(&sent), "the packet as the client sent it: the client's TCP finds it");
        assert_eq!(counter(b, Counter::IcmpFragNeededSent), 1);
        assert_eq!(active(b), vec![1], "the flow lives on");
        // The client sends it again in segments that fit: they go through.
        let (verdict, out) = conn.send_client(b, ACK | PSH, &[7; 1360]);
        assert_eq!((verdict, inspect(&out).dst), (XDP_REDIRECT, conn.backend));
    });
}

#[test]
fn a_backend_segment_too_big_for_the_client_side_gets_frag_needed_from_the_vip() {
    with_balancer(&[1], |b| {
        set_mtu("cli", 1400);
        let mut conn = Conn::open(b, 61001, ISN, BACKEND_ISN);
        let sent = conn.backend_segment(ACK | PSH, &[9; 1400]).frame();
        let (verdict, out) = run(b, &sent);
        assert_eq!(verdict, XDP_REDIRECT);
        let icmp = inspect_icmp(&out);
        assert_eq!((icmp.kind, icmp.code, icmp.mtu), (DEST_UNREACHABLE, FRAG_NEEDED, 1400));
        assert_eq!((icmp.src, icmp.dst), (*VIP.ip(), *conn.backend.ip()));
        assert_eq!(icmp.quoted, quote_of(&sent), "the reply as the backend sent it");
        let (verdict, out) = conn.send_backend(b, ACK | PSH, &[9; 1360]);
        assert_eq!((verdict, inspect(&out).src), (XDP_REDIRECT, VIP));
        assert_eq!(active(b), vec![1]);
    });
}

#[test]
fn too_big_without_df_goes_to_the_kernel_rewritten_to_be_fragmented() {
    with_balancer(&[1], |b| {
        set_mtu("srv", 1400);
        let conn = Conn::open(b, 61002, ISN, BACKEND_ISN);
        let (verdict, out) = run(b, &without_df(conn.client_segment(ACK | PSH, &[3; 1400]).frame()));
        assert_eq!((verdict, inspect(&out).dst), (XDP_PASS, conn.backend));
        assert_eq!(counter(b, Counter::TooBigToKernel), 1);
        assert_eq!(counter(b, Counter::IcmpFragNeededSent), 0);
    });
}

#[test]
fn ttl_run_out_gets_time_exceeded_about_the_packet_as_sent_and_opens_nothing() {
    with_balancer(&[1], |b| {
        let syn = with_ttl(Tcp::new(client(61010), VIP, SYN), 1);
        let (verdict, out) = run(b, &syn);
        assert_eq!(verdict, XDP_REDIRECT);
        let icmp = inspect_icmp(&out);
        assert_eq!((icmp.kind, icmp.code, icmp.src, icmp.dst), (TIME_EXCEEDED, 0, *VIP.ip(), CLIENT));
        assert_eq!(icmp.quoted, quote_of(&syn));
        assert_eq!((flow_entries(b), half_open(b)), (0, vec![0]), "no flow for a SYN that went nowhere");

        // On an established flow, either way; never a forwarded TTL 0.
        let conn = Conn::open(b, 61011, ISN, BACKEND_ISN);
        let from_client = with_ttl(conn.client_segment(ACK | PSH, b"x"), 1);
        let icmp = inspect_icmp(&run(b, &from_client).1);
        assert_eq!((icmp.kind, icmp.dst, icmp.quoted_dst), (TIME_EXCEEDED, CLIENT, VIP));
        let from_backend = with_ttl(conn.backend_segment(ACK | PSH, b"y"), 0);
        let icmp = inspect_icmp(&run(b, &from_backend).1);
        assert_eq!((icmp.kind, icmp.src, icmp.dst), (TIME_EXCEEDED, *VIP.ip(), *conn.backend.ip()));
        assert_eq!(icmp.quoted, quote_of(&from_backend));
        assert_eq!(counter(b, Counter::IcmpTimeExceededSent), 3);
        assert_eq!(active(b), vec![1]);

        // Not for a service: the kernel's to answer.
        let other = with_ttl(Tcp::new(client(61012), SocketAddrV4::new(*VIP.ip(), 81), SYN), 1);
        assert_eq!(run(b, &other), (XDP_PASS, other.clone()));
    });
}

#[test]
fn frag_needed_from_a_router_on_the_backend_side_reaches_the_client_translated() {
    with_balancer(&[1], |b| {
        let mut conn = Conn::open(b, 61020, ISN, BACKEND_ISN);
        // A router past the balancer quotes the client's segment as the
        // balancer forwarded it (client → backend), whole.
        let (_, forwarded) = conn.send_client(b, ACK | PSH, &[5; 1000]);
        let router = Ipv4Addr::new(198, 19, 0, 254);
        let err = icmp_error(router, CLIENT, DEST_UNREACHABLE, FRAG_NEEDED, [0, 0, 0x05, 0x78], &forwarded[14..]);
        let (verdict, out) = run(b, &err);
        assert_eq!(verdict, XDP_REDIRECT);
        let icmp = inspect_icmp(&out);
        assert_eq!((icmp.src, icmp.dst, icmp.dst_mac, icmp.ttl), (router, CLIENT, CLIENT_MAC, 63));
        assert_eq!((icmp.kind, icmp.code, icmp.mtu), (DEST_UNREACHABLE, FRAG_NEEDED, 1400));
        assert_eq!((icmp.quoted_src, icmp.quoted_dst), (client(61020), VIP), "the client's own packet again");
        assert!(quoted_tcp_checksum_is_right(&icmp.quoted), "the quoted TCP checksum follows the rewrite");
        assert_eq!(counter(b, Counter::IcmpTranslated), 1);

        // From the backend itself, quoting only 8 bytes of TCP: it comes
        // from the VIP, as the client knows the other end.
        let err = icmp_error(*conn.backend.ip(), CLIENT, DEST_UNREACHABLE, 3, [0; 4], &forwarded[14..14 + 28]);
        let icmp = inspect_icmp(&run(b, &err).1);
        assert_eq!((icmp.src, icmp.quoted_src, icmp.quoted_dst), (*VIP.ip(), client(61020), VIP));
        assert_eq!(active(b), vec![1], "an ICMP error changes no flow");
    });
}

#[test]
fn an_error_from_the_client_side_about_a_reply_reaches_the_backend_translated() {
    with_balancer(&[1], |b| {
        let mut conn = Conn::open(b, 61021, ISN, BACKEND_ISN);
        let (_, replied) = conn.send_backend(b, ACK | PSH, &[6; 800]);
        let router = Ipv4Addr::new(198, 18, 0, 254);
        let err = icmp_error(router, *VIP.ip(), TIME_EXCEEDED, 0, [0; 4], &replied[14..]);
        let (verdict, out) = run(b, &err);
        assert_eq!(verdict, XDP_REDIRECT);
        let icmp = inspect_icmp(&out);
        assert_eq!((icmp.src, icmp.dst, icmp.dst_mac), (router, *conn.backend.ip(), backend_mac(0)));
        assert_eq!((icmp.quoted_src, icmp.quoted_dst), (conn.backend, client(61021)), "the backend's own packet");
        assert!(quoted_tcp_checksum_is_right(&icmp.quoted));
        assert_eq!(counter(b, Counter::IcmpTranslated), 1);
    });
}

#[test]
fn icmp_errors_about_nothing_of_ours_pass_untouched() {
    with_balancer(&[1], |b| {
        let router = Ipv4Addr::new(198, 19, 0, 254);
        // About a connection the balancer does not track.
        let stray = Tcp::new(client(61030), backend(0), ACK).frame();
        let err = icmp_error(router, CLIENT, DEST_UNREACHABLE, 1, [0; 4], &stray[14..]);
        assert_eq!(run(b, &err), (XDP_PASS, err.clone()));
        // About a tracked flow's packet, but to someone other than its sender.
        let mut conn = Conn::open(b, 61031, ISN, BACKEND_ISN);
        let (_, forwarded) = conn.send_client(b, ACK | PSH, b"data");
        let err = icmp_error(router, Ipv4Addr::new(198, 18, 0, 77), DEST_UNREACHABLE, 1, [0; 4], &forwarded[14..]);
        assert_eq!(run(b, &err), (XDP_PASS, err.clone()));
        assert_eq!(counter(b, Counter::IcmpTranslated), 0);
        assert_eq!(active(b), vec![1]);
    });
}
