//! Full NAT on crafted packets: both ends rewritten both ways with
//! checksums recomputed from scratch, a port of the balancer's per flow,
//! taken per backend, never one a live flow holds nor one whose backend may
//! still keep the old connection in TIME_WAIT and refuse the new SYN (a
//! recently closed flow's, or the one a client's reused 5-tuple left held),
//! and exhaustion dropped and counted.
use std::{
    collections::HashSet,
    net::{Ipv4Addr, SocketAddrV4},
};

use lb::datapath::{Maps, XDP_DROP, XDP_REDIRECT};
use lb_common::{Counter, Timeouts};
use lb_tests::{
    packet::{
        icmp_error, inspect, inspect_icmp, linux_syn_options, quoted_tcp_checksum_is_right, timestamp_options, Tcp, ACK, BACKEND_ISN,
        CLIENT_ISN, FIN, PSH, RST, SYN,
    },
    routed::{backend, client, counter, routed_host, run, with_full_nat, BALANCER, CLIENT, VIP},
    serial,
};

/// The client's SYN from `port`: where it went, as (balancer side, backend).
fn syn(b: &lb::reconcile::Balancer, port: u16) -> Option<(SocketAddrV4, SocketAddrV4)> {
    let (verdict, out) = run(b, &Tcp::new(client(port), VIP, SYN).seq(CLIENT_ISN).frame());
    (verdict == XDP_REDIRECT).then(|| {
        let seen = inspect(&out);
        (seen.src, seen.dst)
    })
}

/// A flow from the client's `port` through its handshake; the balancer's
/// port it took.
fn established(b: &lb::reconcile::Balancer, port: u16) -> SocketAddrV4 {
    let (ours, _) = syn(b, port).expect("a port is free");
    let syn_ack = Tcp::new(backend(0), ours, SYN | ACK).seq(BACKEND_ISN).ack(CLIENT_ISN + 1);
    assert_eq!(run(b, &syn_ack.frame()).0, XDP_REDIRECT);
    let ack = Tcp::new(client(port), VIP, ACK).seq(CLIENT_ISN + 1).ack(BACKEND_ISN + 1);
    assert_eq!(run(b, &ack.frame()).0, XDP_REDIRECT);
    ours
}

#[test]
fn both_ends_are_rewritten_both_ways_and_the_backend_sees_only_the_balancer() {
    with_full_nat(&[1], [20000, 29999], |b| {
        let (ours, to) = syn(b, 40000).expect("the SYN is forwarded");
        assert_eq!(to, backend(0));
        assert_eq!(*ours.ip(), BALANCER, "the source the backend sees");
        assert!((20000..=29999).contains(&ours.port()), "{ours}");

        // The backend answers the balancer; the client gets it from the VIP.
        let syn_ack = Tcp::new(backend(0), ours, SYN | ACK).seq(BACKEND_ISN).ack(CLIENT_ISN + 1);
        let (verdict, out) = run(b, &syn_ack.frame());
        assert_eq!(verdict, XDP_REDIRECT);
        let seen = inspect(&out);
        assert_eq!((seen.src, seen.dst), (VIP, client(40000)));

        let ack = Tcp::new(client(40000), VIP, ACK).seq(CLIENT_ISN + 1).ack(BACKEND_ISN + 1).payload(b"hello");
        let (verdict, out) = run(b, &ack.frame());
        assert_eq!(verdict, XDP_REDIRECT);
        let seen = inspect(&out);
        assert_eq!((seen.src, seen.dst), (ours, backend(0)), "the same port for the whole flow");
        assert_eq!(seen.payload, b"hello");

        let data = Tcp::new(backend(0), ours, ACK).seq(BACKEND_ISN + 1).ack(CLIENT_ISN + 6).payload(b"world!");
        let seen = inspect(&run(b, &data.frame()).1);
        assert_eq!((seen.src, seen.dst, seen.payload.as_slice()), (VIP, client(40000), &b"world!"[..]));

        let status = b.status().unwrap();
        assert_eq!(status.services[0].backends[0].active_connections, 1);
        let flows = b.conntrack();
        assert_eq!(flows[0].balancer.as_deref(), Some(ours.to_string().as_str()), "lb conntrack shows it");
        assert_eq!(flows[0].client, client(40000).to_string());

        // A segment to the balancer's port from anyone but the backend is
        // not this flow's.
        let stray = Tcp::new(SocketAddrV4::new(*backend(1).ip(), 8080), ours, ACK).seq(BACKEND_ISN + 1);
        assert_ne!(run(b, &stray.frame()).0, XDP_REDIRECT);
    });
}

#[test]
fn ports_are_taken_per_backend_and_exhaustion_drops_the_syn_and_is_counted() {
    // Two ports for two backends: four flows fit, two on each.
    with_full_nat(&[1, 1], [30000, 30001], |b| {
        let mut seen = HashSet::new();
        for port in 0..4 {
            let (ours, to) = syn(b, 41000 + port).expect("a port is free");
            assert!(seen.insert((to, ours)), "{ours} handed out twice towards {to}");
            assert!((30000..=30001).contains(&ours.port()));
        }
        let per_backend: Vec<usize> = (0..2).map(|i| seen.iter().filter(|(to, _)| *to == backend(i)).count()).collect();
        assert_eq!(per_backend, [2, 2]);
        let in_use: Vec<Option<u64>> = b.status().unwrap().services[0].backends.iter().map(|b| b.snat_ports_in_use).collect();
        assert_eq!(in_use, [Some(2), Some(2)], "the status shows each backend's ports taken");
        assert_eq!(counter(b, Counter::SnatPortsExhausted), 0);
        let (verdict, _) = run(b, &Tcp::new(client(41010), VIP, SYN).frame());
        assert_eq!(verdict, XDP_DROP, "no port left: the SYN is dropped, the client retries");
        assert_eq!(counter(b, Counter::SnatPortsExhausted), 1);
        assert_eq!(b.status().unwrap().services[0].backends.iter().map(|b| b.half_open_connections).sum::<u64>(), 4);
    });
}

#[test]
fn a_closed_flows_port_stays_taken_while_the_backend_may_hold_time_wait() {
    with_full_nat(&[1], [30000, 30000], |b| {
        let ours = established(b, 42000);
        let back = |flags, seq, ack| Tcp::new(backend(0), ours, flags).seq(seq).ack(ack).frame();
        let from_client = |flags, seq, ack| Tcp::new(client(42000), VIP, flags).seq(seq).ack(ack).frame();
        // Closed both ways.
        assert_eq!(run(b, &from_client(FIN | ACK, CLIENT_ISN + 1, BACKEND_ISN + 1)).0, XDP_REDIRECT);
        assert_eq!(run(b, &back(FIN | ACK, BACKEND_ISN + 1, CLIENT_ISN + 2)).0, XDP_REDIRECT);
        assert_eq!(run(b, &from_client(ACK, CLIENT_ISN + 2, BACKEND_ISN + 2)).0, XDP_REDIRECT);
        assert_eq!(b.status().unwrap().services[0].backends[0].active_connections, 0, "closed");

        // Its only port is not handed out again while the backend may be in
        // TIME_WAIT: the fin timeout, not the closed one.
        assert_eq!(run(b, &Tcp::new(client(42001), VIP, SYN).frame()).0, XDP_DROP);
        let hour = 3_600_000_000_000;
        let closed_over = Timeouts { syn: hour, established: hour, fin: hour, closed: 0 };
        assert_eq!(lb::runtime::aging::age(&mut b.datapath, &closed_over, false).unwrap().expired, 0);
        assert_eq!(run(b, &Tcp::new(client(42001), VIP, SYN).frame()).0, XDP_DROP);
        let time_wait_over = Timeouts { fin: 0, ..closed_over };
        assert_eq!(lb::runtime::aging::age(&mut b.datapath, &time_wait_over, false).unwrap().expired, 1);
        let (again, _) = syn(b, 42001).expect("the port is free again");
        assert_eq!(again, ours);
        assert_eq!(b.datapath.flows().len(), 2, "one flow, both entries");
    });
}

#[test]
fn icmp_errors_about_a_full_nat_flow_are_translated_at_both_ends() {
    with_full_nat(&[1], [20000, 29999], |b| {
        let (ours, _) = syn(b, 43000).unwrap();
        assert_eq!(run(b, &Tcp::new(backend(0), ours, SYN | ACK).seq(BACKEND_ISN).ack(CLIENT_ISN + 1).frame()).0, XDP_REDIRECT);
        let ack = Tcp::new(client(43000), VIP, ACK | PSH).seq(CLIENT_ISN + 1).ack(BACKEND_ISN + 1).payload(&[5; 1000]);
        let (_, forwarded) = run(b, &ack.frame());

        // A router on the backends' side quotes the segment as the balancer
        // sent it (balancer port → backend): the client gets it about its
        // own packet (client → VIP).
        let router = Ipv4Addr::new(198, 19, 0, 254);
        let err = icmp_error(router, *ours.ip(), 3, 4, [0, 0, 0x05, 0x78], &forwarded[14..]);
        let (verdict, out) = run(b, &err);
        assert_eq!(verdict, XDP_REDIRECT);
        let icmp = inspect_icmp(&out);
        assert_eq!((icmp.src, icmp.dst), (router, CLIENT));
        assert_eq!((icmp.quoted_src, icmp.quoted_dst), (client(43000), VIP));
        assert!(quoted_tcp_checksum_is_right(&icmp.quoted), "the quoted TCP checksum follows both rewrites");

        // A router on the clients' side quotes a reply (VIP → client): the
        // backend gets it about its own packet (backend → balancer port),
        // from the balancer, the only address it knows.
        let data = Tcp::new(backend(0), ours, ACK | PSH).seq(BACKEND_ISN + 1).ack(CLIENT_ISN + 1001).payload(&[6; 800]);
        let (_, replied) = run(b, &data.frame());
        let err = icmp_error(Ipv4Addr::new(198, 18, 0, 254), *VIP.ip(), 11, 0, [0; 4], &replied[14..]);
        let (verdict, out) = run(b, &err);
        assert_eq!(verdict, XDP_REDIRECT);
        let icmp = inspect_icmp(&out);
        assert_eq!((icmp.src, icmp.dst), (BALANCER, *backend(0).ip()));
        assert_eq!((icmp.quoted_src, icmp.quoted_dst), (backend(0), ours));
        assert!(quoted_tcp_checksum_is_right(&icmp.quoted));
        assert_eq!(counter(b, Counter::IcmpTranslated), 2);
    });
}

#[test]
fn each_backend_sees_the_address_of_the_interface_that_reaches_it() {
    let _serial = serial();
    let ns = routed_host(1);
    // A second backends' network, on an interface of its own.
    let other = SocketAddrV4::new(Ipv4Addr::new(198, 20, 0, 11), 8080);
    ns.exec(&format!(
        "ip link add srv2 type veth peer srv2-peer && ip link set srv2 up && ip link set srv2-peer up \
         && ip addr add 198.20.0.1/24 dev srv2 && ip neigh add {} lladdr 02:00:00:02:00:01 dev srv2 nud permanent",
        other.ip()
    ));
    ns.run(|| {
        let mut b = lb::reconcile::Balancer::new(lb::datapath::Datapath::load(1024).unwrap());
        let service = lb::config::ServiceConfig {
            name: "web".into(),
            vip: VIP,
            scheduler: Default::default(),
            mode: lb::config::Mode::FullNat,
            health: None,
            on_backend_down: Default::default(),
            snat_addresses: Vec::new(),
            snat_ports: lb::config::DEFAULT_SNAT_PORTS,
            tunnel: lb::config::Tunnel::None,
            backends: vec![lb::config::BackendConfig::new(backend(0), 1), lb::config::BackendConfig::new(other, 1)],
        };
        b.add_service(&service).unwrap();
        let mut sources = HashSet::new();
        for port in 0..6 {
            let (ours, to) = syn(&b, 44000 + port).unwrap();
            let expected = if to == other { Ipv4Addr::new(198, 20, 0, 1) } else { BALANCER };
            assert_eq!(*ours.ip(), expected, "towards {to}");
            sources.insert(*ours.ip());
        }
        assert_eq!(sources.len(), 2, "both backends took flows");
    });
}

/// The TCP timestamps option (RFC 7323) with this TSval.
fn ts(value: u32) -> Vec<u8> {
    [&[8u8, 10][..], &value.to_be_bytes(), &[0; 4]].concat()
}

/// Opens a flow from the client's `port` and closes it as a web server does,
/// the backend first (so the backend keeps it in TIME_WAIT), the client's
/// FIN carrying `fin_options`. Returns the balancer's port.
fn closed_by_the_backend(b: &lb::reconcile::Balancer, port: u16, fin_options: &[u8]) -> SocketAddrV4 {
    let ours = established(b, port);
    let back = |flags, seq, ack| Tcp::new(backend(0), ours, flags).seq(seq).ack(ack).frame();
    assert_eq!(run(b, &back(FIN | ACK, BACKEND_ISN + 1, CLIENT_ISN + 1)).0, XDP_REDIRECT);
    let fin = Tcp::new(client(port), VIP, FIN | ACK).seq(CLIENT_ISN + 1).ack(BACKEND_ISN + 2).tcp_options(fin_options);
    assert_eq!(run(b, &fin.frame()).0, XDP_REDIRECT);
    assert_eq!(run(b, &back(ACK, BACKEND_ISN + 2, CLIENT_ISN + 2)).0, XDP_REDIRECT);
    ours
}

/// A client's SYN from `port` with `options`: the verdict and the
/// balancer's port it went out from, if it went.
fn syn_with(b: &lb::reconcile::Balancer, port: u16, options: &[u8]) -> (u32, Option<SocketAddrV4>) {
    let (verdict, out) = run(b, &Tcp::new(client(port), VIP, SYN).seq(CLIENT_ISN).tcp_options(options).frame());
    (verdict, (verdict == XDP_REDIRECT).then(|| inspect(&out).src))
}

#[test]
fn a_closed_flows_port_goes_to_a_new_flow_only_with_a_syn_the_backends_time_wait_accepts() {
    a_closed_flows_port_goes_by_timestamps(ts, ts);
}

/// The same with the options laid out as Linux sends them, which the
/// balancer reads in place rather than walking them.
#[test]
fn timestamps_are_read_from_linuxs_layout_of_the_options_too() {
    a_closed_flows_port_goes_by_timestamps(|v| timestamp_options(v).to_vec(), |v| linux_syn_options(v).to_vec());
}

/// The balancer's port of a closed flow goes to a new client only with a
/// SYN whose timestamp runs ahead of the old connection's last (the FIN's),
/// with each laid out by `fin_options` and `syn_options`.
fn a_closed_flows_port_goes_by_timestamps(fin_options: fn(u32) -> Vec<u8>, syn_options: fn(u32) -> Vec<u8>) {
    with_full_nat(&[1], [30000, 30000], |b| {
        let old = closed_by_the_backend(b, 42000, &fin_options(5000));
        // Another client whose timestamps run behind: the backend's
        // TIME_WAIT would answer its SYN for the old connection.
        assert_eq!(syn_with(b, 42001, &syn_options(4000)), (XDP_DROP, None));
        assert_eq!(counter(b, Counter::SnatPortsExhausted), 1);
        // One whose timestamps run ahead gets the port (RFC 6191).
        assert_eq!(syn_with(b, 42002, &syn_options(6000)), (XDP_REDIRECT, Some(old)));
        let syn_ack = Tcp::new(backend(0), old, SYN | ACK).seq(BACKEND_ISN).ack(CLIENT_ISN + 1);
        let (verdict, out) = run(b, &syn_ack.frame());
        assert_eq!((verdict, inspect(&out).dst), (XDP_REDIRECT, client(42002)), "the port is the new flow's");

        // The old flow ageing out leaves the new one's entries alone.
        let hour = 3_600_000_000_000;
        let closed_over = Timeouts { syn: hour, established: hour, fin: 0, closed: 0 };
        assert_eq!(lb::runtime::aging::age(&mut b.datapath, &closed_over, false).unwrap().expired, 1);
        let (verdict, out) = run(b, &syn_ack.frame());
        assert_eq!((verdict, inspect(&out).dst), (XDP_REDIRECT, client(42002)));
        assert_eq!(b.conntrack().len(), 1);
        assert_eq!(b.datapath.flows().len(), 2);
    });
}

#[test]
fn without_timestamps_the_sequence_numbers_decide_and_after_an_rst_any_syn_may_take_the_port() {
    with_full_nat(&[1], [30000, 30000], |b| {
        let ours = closed_by_the_backend(b, 42000, &[]);
        let back = |flags, seq, ack| Tcp::new(backend(0), ours, flags).seq(seq).ack(ack).frame();

        let syn_at = |port: u16, seq: u32| run(b, &Tcp::new(client(port), VIP, SYN).seq(seq).frame()).0;
        assert_eq!(syn_at(42001, CLIENT_ISN), XDP_DROP, "not beyond what the old connection sent");
        assert_eq!(syn_at(42002, CLIENT_ISN.wrapping_add(100_000)), XDP_REDIRECT, "beyond it");

        // The new flow ends with an exact RST: no TIME_WAIT, so even a SYN
        // the old rules would refuse gets the port.
        assert_eq!(run(b, &back(SYN | ACK, BACKEND_ISN, CLIENT_ISN.wrapping_add(100_001))).0, XDP_REDIRECT);
        let rst = Tcp::new(client(42002), VIP, RST).seq(CLIENT_ISN.wrapping_add(100_001)).frame();
        assert_eq!(run(b, &rst).0, XDP_REDIRECT);
        assert_eq!(syn_at(42003, 7), XDP_REDIRECT);
    });
}

/// Closes a flow from the client's port 42000 (backend first) and reuses
/// that 5-tuple at once with a SYN the backend's TIME_WAIT would refuse, as
/// a client with `tcp_tw_reuse` does: the new flow gets the other port of
/// two, and the old port is left held. Returns (old port, new port).
fn reuse_leaves_a_hold(b: &lb::reconcile::Balancer) -> (SocketAddrV4, SocketAddrV4) {
    let old = closed_by_the_backend(b, 42000, &ts(5000));
    let (verdict, new) = syn_with(b, 42000, &ts(4000));
    assert_eq!(verdict, XDP_REDIRECT);
    let new = new.unwrap();
    assert_ne!(new, old, "the old port is held for the backend's TIME_WAIT");
    (old, new)
}

#[test]
fn a_client_reusing_its_5_tuple_leaves_the_old_port_held_and_nothing_reaches_anyone_through_it() {
    with_full_nat(&[1], [30000, 30001], |b| {
        let (old, _) = reuse_leaves_a_hold(b);
        // Another client's SYN that TIME_WAIT would refuse finds no port.
        assert_eq!(syn_with(b, 42001, &ts(4500)), (XDP_DROP, None));
        assert_eq!(counter(b, Counter::SnatPortsExhausted), 1);
        // The backend's TIME_WAIT answering on the old port reaches nobody.
        let out_of_state = counter(b, Counter::OutOfState);
        let time_wait_ack = Tcp::new(backend(0), old, ACK).seq(BACKEND_ISN + 2).ack(CLIENT_ISN + 2).frame();
        assert_eq!(run(b, &time_wait_ack).0, XDP_DROP);
        assert_eq!(counter(b, Counter::OutOfState), out_of_state + 1);
        // Nor does an ICMP error about it.
        let quoted = Tcp::new(old, backend(0), ACK).seq(CLIENT_ISN + 2).frame();
        let error = icmp_error(*backend(0).ip(), BALANCER, 3, 3, [0; 4], &quoted[14..]);
        assert_ne!(run(b, &error).0, XDP_REDIRECT);
        assert_eq!(b.conntrack().len(), 1, "lb conntrack shows the new flow only");
        // The status shows both ports taken: one by the new flow, one held.
        assert_eq!(b.status().unwrap().services[0].backends[0].snat_ports_in_use, Some(2));

        // A SYN that TIME_WAIT accepts takes the held port over.
        assert_eq!(syn_with(b, 42002, &ts(9000)), (XDP_REDIRECT, Some(old)));
        let syn_ack = Tcp::new(backend(0), old, SYN | ACK).seq(BACKEND_ISN).ack(CLIENT_ISN + 1).frame();
        let (verdict, out) = run(b, &syn_ack);
        assert_eq!((verdict, inspect(&out).dst), (XDP_REDIRECT, client(42002)));
    });
}

#[test]
fn a_held_port_is_let_go_when_the_backends_time_wait_is_over() {
    with_full_nat(&[1], [30000, 30001], |b| {
        let (old, _) = reuse_leaves_a_hold(b);
        assert_eq!(syn_with(b, 42001, &ts(4500)), (XDP_DROP, None));
        let hour = 3_600_000_000_000;
        let not_yet = Timeouts { syn: hour, established: hour, fin: hour, closed: hour };
        assert_eq!(lb::runtime::aging::age(&mut b.datapath, &not_yet, false).unwrap().holds_released, 0);
        let time_wait_over = Timeouts { fin: 0, closed: 0, ..not_yet };
        let aged = lb::runtime::aging::age(&mut b.datapath, &time_wait_over, false).unwrap();
        assert_eq!((aged.expired, aged.holds_released), (0, 1));
        assert_eq!(aged.snat_ports, [((0, 0), 2)].into(), "the scan counted both ports, the hold among them");
        assert_eq!(b.status().unwrap().services[0].backends[0].snat_ports_in_use, Some(1), "the hold is gone");
        assert_eq!(syn_with(b, 42001, &ts(4500)), (XDP_REDIRECT, Some(old)), "the old port is free again");
    });
}

#[test]
fn spoofed_rsts_on_either_side_of_a_full_nat_flow_are_judged_by_its_windows() {
    with_full_nat(&[1], [30000, 30099], |b| {
        let ours = established(b, 44000);
        let back = |flags, seq, ack| Tcp::new(backend(0), ours, flags).seq(seq).ack(ack).frame();
        let from_client = |flags, seq, ack| Tcp::new(client(44000), VIP, flags).seq(seq).ack(ack).frame();
        let active_now = || b.status().unwrap().services[0].backends[0].active_connections;
        assert_eq!(active_now(), 1);

        // Right ports, made-up numbers: to the VIP as if from the client,
        // and to the balancer's port as if from the backend.
        for far in [0x4000_0000u32, 0x8000_0000, 0xc000_0000] {
            assert_eq!(run(b, &from_client(RST, CLIENT_ISN.wrapping_add(far), 0)).0, XDP_DROP);
            assert_eq!(run(b, &back(RST, BACKEND_ISN.wrapping_add(far), 0)).0, XDP_DROP);
        }
        assert_eq!(counter(b, Counter::RstOutOfWindow), 6);
        assert_eq!(active_now(), 1, "the flow is untouched");
        let data = Tcp::new(client(44000), VIP, ACK | PSH).seq(CLIENT_ISN + 1).ack(BACKEND_ISN + 1).payload(b"still here");
        let (verdict, out) = run(b, &data.frame());
        assert_eq!((verdict, inspect(&out).dst), (XDP_REDIRECT, backend(0)));

        // The backend's exact RST, on the balancer's port, ends it.
        let (verdict, out) = run(b, &back(RST, BACKEND_ISN + 1, 0));
        assert_eq!((verdict, inspect(&out).dst), (XDP_REDIRECT, client(44000)));
        assert_eq!(active_now(), 0);
    });
}
