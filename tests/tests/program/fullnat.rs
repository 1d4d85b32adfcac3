//! Full NAT on crafted packets: both ends rewritten both ways with
//! checksums recomputed from scratch, a port of the balancer's per flow,
//! taken per backend, never one a live or recently closed flow holds, and
//! exhaustion dropped and counted.
use std::{
    collections::HashSet,
    net::{Ipv4Addr, SocketAddrV4},
};

use lb::datapath::{Maps, XDP_DROP, XDP_REDIRECT};
use lb_common::{Counter, Timeouts};
use lb_tests::{
    packet::{icmp_error, inspect, inspect_icmp, quoted_tcp_checksum_is_right, Tcp, ACK, BACKEND_ISN, CLIENT_ISN, FIN, PSH, SYN},
    routed::{backend, balancer_full_nat, client, counter, routed_host, run, BALANCER, CLIENT, VIP},
    serial,
};

fn with_full_nat<T: Send>(weights: &[u32], ports: [u16; 2], test: impl FnOnce(&mut lb::reconcile::Balancer) -> T + Send) -> T {
    let _serial = serial();
    let ns = routed_host(4);
    let weights = weights.to_vec();
    ns.run(move || test(&mut balancer_full_nat(&weights, 1024, ports)))
}

/// The client's SYN from `port`: where it went, as (balancer side, backend).
fn syn(b: &lb::reconcile::Balancer, port: u16) -> Option<(SocketAddrV4, SocketAddrV4)> {
    let (verdict, out) = run(b, &Tcp::new(client(port), VIP, SYN).seq(CLIENT_ISN).frame());
    (verdict == XDP_REDIRECT).then(|| {
        let seen = inspect(&out);
        (seen.src, seen.dst)
    })
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
        let (ours, _) = syn(b, 42000).unwrap();
        let back = |flags, seq, ack| Tcp::new(backend(0), ours, flags).seq(seq).ack(ack).frame();
        let from_client = |flags, seq, ack| Tcp::new(client(42000), VIP, flags).seq(seq).ack(ack).frame();
        assert_eq!(run(b, &back(SYN | ACK, BACKEND_ISN, CLIENT_ISN + 1)).0, XDP_REDIRECT);
        assert_eq!(run(b, &from_client(ACK, CLIENT_ISN + 1, BACKEND_ISN + 1)).0, XDP_REDIRECT);
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
