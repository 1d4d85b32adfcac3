//! DSR on crafted packets: on the balancer's segment only the destination
//! MAC changes; through IPIP the packet goes as it came inside a header from
//! the balancer to the backend, packets too big for the tunnel are answered
//! with the tunnel's MTU; flows open, establish and close on the client's
//! segments alone, which must show they belong; ICMP errors about a
//! backend's replies reach that backend; and the backend's decapsulation
//! program takes its VIPs' packets off the tunnel and nothing else.
use std::net::Ipv4Addr;

use lb::{
    config::Tunnel,
    datapath::{decap::DecapProgram, XDP_DROP, XDP_PASS, XDP_REDIRECT},
};
use lb_common::Counter;
use lb_tests::{
    packet::{
        icmp_error, inspect, inspect_icmp, inspect_tunnelled, ipip, Tcp, ACK, BACKEND_ISN, CLIENT_ISN, FIN, RST, SYN,
    },
    routed::{active, backend, backend_mac, balancer_dsr, client, counter, routed_host, run, BALANCER, VIP},
    serial,
};

fn with_dsr<T: Send>(tunnel: Tunnel, test: impl FnOnce(&mut lb::reconcile::Balancer) -> T + Send) -> T {
    let _serial = serial();
    let ns = routed_host(4);
    ns.run(move || test(&mut balancer_dsr(&[1, 1, 1], tunnel)))
}

/// Which backend a frame the balancer let out goes to, by its MAC.
fn backend_of(frame: &[u8]) -> usize {
    (0..3).find(|&i| frame[0..6] == backend_mac(i)).unwrap_or_else(|| panic!("to no backend: {:02x?}", &frame[0..6]))
}

fn from_client(port: u16, flags: u8, seq: u32) -> Tcp {
    Tcp::new(client(port), VIP, flags).seq(seq).ack(BACKEND_ISN + 1)
}

/// A flow from the client's `port` through its handshake, as DSR sees it
/// (the SYN, then the ACK); its backend.
fn established(b: &lb::reconcile::Balancer, port: u16) -> usize {
    let (verdict, out) = run(b, &Tcp::new(client(port), VIP, SYN).seq(CLIENT_ISN).frame());
    assert_eq!(verdict, XDP_REDIRECT);
    let to = backend_of(&out);
    let (verdict, out) = run(b, &from_client(port, ACK, CLIENT_ISN + 1).frame());
    assert_eq!((verdict, backend_of(&out)), (XDP_REDIRECT, to));
    to
}

#[test]
fn on_the_balancers_segment_only_the_destination_mac_changes() {
    with_dsr(Tunnel::None, |b| {
        let syn = Tcp::new(client(40000), VIP, SYN).seq(CLIENT_ISN);
        let (verdict, out) = run(b, &syn.frame());
        assert_eq!(verdict, XDP_REDIRECT);
        let to = backend_of(&out);
        let seen = inspect(&out);
        assert_eq!(
            (seen.src, seen.dst, seen.flags, seen.ttl),
            (client(40000), VIP, SYN, 63),
            "the packet as sent, a hop on"
        );
        assert_eq!(b.status().unwrap().services[0].backends[to].half_open_connections, 1);

        // The client's ACK completes the handshake: the backend's SYN-ACK
        // went straight to the client.
        let ack = from_client(40000, ACK, CLIENT_ISN + 1).payload(b"hello");
        let (verdict, out) = run(b, &ack.frame());
        assert_eq!((verdict, backend_of(&out)), (XDP_REDIRECT, to));
        let seen = inspect(&out);
        assert_eq!((seen.src, seen.dst, seen.payload.as_slice()), (client(40000), VIP, &b"hello"[..]));
        let mut expected = vec![0; 3];
        expected[to] = 1;
        assert_eq!(active(b), expected);
        let flows = b.conntrack();
        assert_eq!(flows[0].state, lb::api::FlowState::Established);
        assert_eq!(flows[0].backend, format!("{}:80", backend(to).ip()));

        // The backend's answers never come here; one that does is not the
        // balancer's to rewrite.
        let answer = Tcp::new(VIP, client(40000), ACK).seq(BACKEND_ISN + 1).ack(CLIENT_ISN + 6);
        assert_eq!(run(b, &answer.frame()).0, XDP_PASS);

        // The client's FIN ends the flow's count; its last ACK still goes.
        assert_eq!(run(b, &from_client(40000, FIN | ACK, CLIENT_ISN + 6).frame()).0, XDP_REDIRECT);
        assert_eq!(active(b), [0, 0, 0]);
        assert_eq!(run(b, &from_client(40000, ACK, CLIENT_ISN + 7).ack(BACKEND_ISN + 2).frame()).0, XDP_REDIRECT);
        assert_eq!(b.status().unwrap().services[0].backends[to].half_open_connections, 0);
    });
}

#[test]
fn through_ipip_the_packet_goes_as_it_came_inside_a_header_from_the_balancer_to_the_backend() {
    with_dsr(Tunnel::Ipip, |b| {
        let syn = Tcp::new(client(40001), VIP, SYN).seq(CLIENT_ISN);
        let (verdict, out) = run(b, &syn.frame());
        assert_eq!(verdict, XDP_REDIRECT);
        let to = backend_of(&out);
        let outer = inspect_tunnelled(&out);
        assert_eq!((outer.src, outer.dst, outer.ttl), (BALANCER, *backend(to).ip(), 64));
        assert_eq!(outer.frags, 0x4000, "DF, as the inner packet has it");
        let inner = inspect(&outer.inner);
        assert_eq!((inner.src, inner.dst, inner.flags, inner.ttl), (client(40001), VIP, SYN, 63));
        // The inner packet is the client's, byte for byte, but for its TTL.
        let mut sent = syn.frame();
        sent[22] -= 1;
        let check = u16::from_be_bytes([sent[24], sent[25]]) + 0x100;
        sent[24..26].copy_from_slice(&check.to_be_bytes());
        assert_eq!(outer.inner[14..], sent[14..]);

        // Data too big for the tunnel, with DF: the client is told the
        // tunnel's MTU, 20 below the link's.
        let full = from_client(40001, ACK, CLIENT_ISN + 1).payload(&[7; 1460]);
        let (verdict, out) = run(b, &full.frame());
        assert_eq!(verdict, XDP_REDIRECT, "answered");
        let icmp = inspect_icmp(&out);
        assert_eq!((icmp.kind, icmp.code, icmp.mtu, icmp.dst), (3, 4, 1480, *client(40001).ip()));
        assert_eq!(icmp.quoted_dst, VIP);
        assert_eq!(counter(b, Counter::IcmpFragNeededSent), 1);
        // What fits goes.
        let fits = from_client(40001, ACK, CLIENT_ISN + 1).payload(&[7; 1440]);
        let (verdict, out) = run(b, &fits.frame());
        assert_eq!((verdict, backend_of(&out)), (XDP_REDIRECT, to));
        assert_eq!(inspect(&inspect_tunnelled(&out).inner).payload.len(), 1440);
    });
}

#[test]
fn the_clients_rsts_and_fins_must_show_they_belong_to_the_flow() {
    with_dsr(Tunnel::None, |b| {
        // Before the handshake completes: an ACK that does not follow the
        // SYN is a stray.
        assert_eq!(run(b, &Tcp::new(client(40002), VIP, SYN).seq(CLIENT_ISN).frame()).0, XDP_REDIRECT);
        assert_eq!(run(b, &from_client(40002, ACK, CLIENT_ISN + 5000).frame()).0, XDP_DROP);
        assert_eq!(counter(b, Counter::OutOfState), 1);
        assert_eq!(active(b).iter().sum::<u64>(), 0, "not established by a stray");
        assert_eq!(run(b, &from_client(40002, ACK, CLIENT_ISN + 1).frame()).0, XDP_REDIRECT);
        assert_eq!(active(b).iter().sum::<u64>(), 1);

        // Far from what the client sent: dropped, the flow untouched.
        assert_eq!(run(b, &from_client(40002, RST, CLIENT_ISN + 0x0100_0000).frame()).0, XDP_DROP);
        assert_eq!(counter(b, Counter::RstOutOfWindow), 1);
        assert_eq!(run(b, &from_client(40002, FIN | ACK, CLIENT_ISN.wrapping_sub(0x0100_0000)).frame()).0, XDP_DROP);
        assert_eq!(counter(b, Counter::FinOutOfWindow), 1);
        // Near but not exact: the backend judges it (a challenge ACK).
        assert_eq!(run(b, &from_client(40002, RST, CLIENT_ISN + 100).frame()).0, XDP_REDIRECT);
        assert_eq!(counter(b, Counter::RstInWindow), 1);
        assert_eq!(active(b).iter().sum::<u64>(), 1, "still counted");
        // Exact: the flow ends.
        assert_eq!(run(b, &from_client(40002, RST, CLIENT_ISN + 1).frame()).0, XDP_REDIRECT);
        assert_eq!(active(b).iter().sum::<u64>(), 0);
        assert_eq!(b.status().unwrap().services[0].backends.iter().map(|s| s.half_open_connections).sum::<u64>(), 0);
    });
}

#[test]
fn icmp_errors_about_a_backends_replies_go_to_that_backend() {
    for tunnel in [Tunnel::None, Tunnel::Ipip] {
        with_dsr(tunnel, |b| {
            let to = established(b, 40003);
            // A router on the client's path cannot take the backend's
            // reply, which came from the VIP: the error comes to the VIP.
            let reply = Tcp::new(VIP, client(40003), ACK).seq(BACKEND_ISN + 1).ack(CLIENT_ISN + 1).payload(&[1; 64]);
            let router = Ipv4Addr::new(198, 18, 0, 254);
            let err = icmp_error(router, *VIP.ip(), 3, 4, [0, 0, 0x05, 0x00], &reply.frame()[14..42]);
            let (verdict, out) = run(b, &err);
            assert_eq!((verdict, backend_of(&out)), (XDP_REDIRECT, to), "{tunnel}");
            let icmp = if tunnel == Tunnel::Ipip {
                let outer = inspect_tunnelled(&out);
                assert_eq!((outer.src, outer.dst), (BALANCER, *backend(to).ip()));
                inspect_icmp(&outer.inner)
            } else {
                inspect_icmp(&out)
            };
            assert_eq!((icmp.src, icmp.dst, icmp.ttl, icmp.mtu), (router, *VIP.ip(), 63, 1280), "as sent, a hop on");
            assert_eq!((icmp.quoted_src, icmp.quoted_dst), (VIP, client(40003)));
            assert_eq!(counter(b, Counter::IcmpTranslated), 1);
        });
    }
}

#[test]
fn the_backends_decapsulation_takes_its_vips_packets_off_the_tunnel_and_nothing_else() {
    let _serial = serial();
    let mut decap = DecapProgram::load(None).expect("load lb_decap");
    decap.set_vips(&[*VIP.ip()]).unwrap();
    let packet = Tcp::new(client(40004), VIP, SYN).seq(CLIENT_ISN).frame();
    let tunnelled = ipip(BALANCER, *backend(0).ip(), &packet);
    let (verdict, out) = decap.run_packet(&tunnelled).unwrap();
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(out, packet, "the client's frame, as it was before the tunnel");

    // Another address's tunnel, and plain packets, pass as they are.
    let other = Tcp::new(client(40004), "198.18.1.101:80".parse().unwrap(), SYN).frame();
    let tunnelled_other = ipip(BALANCER, *backend(0).ip(), &other);
    assert_eq!(decap.run_packet(&tunnelled_other).unwrap(), (XDP_PASS, tunnelled_other));
    assert_eq!(decap.run_packet(&packet).unwrap(), (XDP_PASS, packet.clone()));

    // The VIP set is replaced, not added to.
    decap.set_vips(&["198.18.1.101".parse().unwrap()]).unwrap();
    assert_eq!(decap.run_packet(&tunnelled).unwrap(), (XDP_PASS, tunnelled.clone()));
}

#[test]
fn the_balancers_tunnel_and_the_backends_decapsulation_fit_together() {
    let inner_sent = with_dsr(Tunnel::Ipip, |b| {
        let (verdict, out) = run(b, &Tcp::new(client(40005), VIP, SYN).seq(CLIENT_ISN).frame());
        assert_eq!(verdict, XDP_REDIRECT);
        out
    });
    let _serial = serial();
    let mut decap = DecapProgram::load(None).expect("load lb_decap");
    decap.set_vips(&[*VIP.ip()]).unwrap();
    let (verdict, out) = decap.run_packet(&inner_sent).unwrap();
    assert_eq!(verdict, XDP_PASS);
    let seen = inspect(&out);
    assert_eq!((seen.src, seen.dst, seen.flags), (client(40005), VIP, SYN));
    assert_eq!(out[0..6], inner_sent[0..6], "the frame's own Ethernet header");
}
