//! The XDP program on crafted packets through BPF_PROG_TEST_RUN: verdicts,
//! output bytes, checksums recomputed from scratch, flow table and counts.
//!
//! Each test runs in a namespace where the balancer's routes and neighbours
//! exist (see `lb_tests::routed`), so the
//! route lookup succeeds and rewritten packets are redirected as on a host.
use std::net::{Ipv4Addr, SocketAddrV4};

use lb::datapath::{Maps, XDP_DROP, XDP_PASS, XDP_REDIRECT};
use lb_common::{Counter, Timeouts};
use lb_tests::{
    packet::{inspect, Tcp, ACK, BACKEND_ISN, CLIENT_ISN, CLIENT_MAC, FIN, PSH, RST, SYN},
    routed::{
        active, backend, backend_index, backend_mac, client, complete, counter, flow_entries, from_backend,
        from_client, half_open, open, run, syn, with_balancer, VIP,
    },
};

#[test]
fn syn_to_a_service_is_rewritten_to_a_backend_and_counted() {
    with_balancer(&[1, 1, 1], |b| {
        let syn = Tcp::new(client(40000), VIP, SYN);
        let (verdict, out) = run(b, &syn.frame());
        assert_eq!(verdict, XDP_REDIRECT);
        let seen = inspect(&out); // checksums verified from scratch
        let chosen = backend_index(seen.dst);
        assert!(chosen < 3 && seen.dst == backend(chosen), "went to {}", seen.dst);
        assert_eq!(seen.src, client(40000), "the client's address is kept");
        assert_eq!(seen.flags, SYN);
        assert_eq!(seen.ttl, 63, "forwarded like a router");
        assert_eq!(seen.dst_mac, backend_mac(chosen), "next hop from the neighbour table");
        let mut expected = vec![0; 3];
        expected[chosen] = 1;
        assert_eq!(active(b), vec![0; 3], "half-open until the handshake completes");
        assert_eq!(half_open(b), expected);
        assert_eq!(counter(b, Counter::NewFlows), 1);
        assert_eq!(flow_entries(b), 1, "the forward entry; the reply entry comes with the backend's first answer");
        // Per backend, as status reports it (read in one batch).
        let status = b.status().unwrap();
        let per_backend: Vec<(u64, u64, u64)> =
            status.services[0].backends.iter().map(|s| (s.total_connections, s.packets_in, s.bytes_in)).collect();
        let mut expected = vec![(0, 0, 0); 3];
        expected[chosen] = (1, 1, syn.frame().len() as u64);
        assert_eq!(per_backend, expected);
        complete(b, 40000, seen.dst);
        assert_eq!(flow_entries(b), 2, "one forward and one reply entry");
        let mut established = vec![0; 3];
        established[chosen] = 1;
        assert_eq!((active(b), half_open(b)), (established, vec![0; 3]));
        assert_eq!(counter(b, Counter::Established), 1);
    });
}

#[test]
fn established_and_reply_packets_keep_their_backend_and_get_the_vip_back() {
    with_balancer(&[1, 1, 1], |b| {
        let chosen = syn(b, 40001);
        // The backend's SYN-ACK: the client must see it come from the VIP.
        let syn_ack = Tcp::new(chosen, client(40001), SYN | ACK).seq(BACKEND_ISN).ack(CLIENT_ISN + 1);
        let (verdict, out) = run(b, &syn_ack.frame());
        assert_eq!(verdict, XDP_REDIRECT);
        let seen = inspect(&out);
        assert_eq!((seen.src, seen.dst), (VIP, client(40001)));
        assert_eq!(seen.dst_mac, CLIENT_MAC);
        complete(b, 40001, chosen);
        // Data both ways, with odd-length payloads for the checksum.
        for i in 0..5 {
            let payload = vec![b'x' + i as u8; 1 + 2 * i];
            let (verdict, out) =
                run(b, &from_client(40001, ACK | PSH).payload(&payload).frame());
            assert_eq!(verdict, XDP_REDIRECT);
            let seen = inspect(&out);
            assert_eq!(seen.dst, chosen, "a flow keeps its backend");
            assert_eq!(seen.payload, payload);
            let (_, out) = run(b, &from_backend(chosen, 40001, ACK).payload(&payload).frame());
            assert_eq!(inspect(&out).src, VIP);
        }
        assert_eq!(active(b).iter().sum::<u64>(), 1);
        assert_eq!(counter(b, Counter::NewFlows), 1);
    });
}

#[test]
fn ip_options_are_skipped_and_checksums_stay_valid() {
    with_balancer(&[1], |b| {
        let syn = Tcp::new(client(40002), VIP, SYN).ip_options(&[1, 1, 1, 0, 0x94, 4, 0, 0]);
        let (verdict, out) = run(b, &syn.frame());
        assert_eq!(verdict, XDP_REDIRECT);
        let seen = inspect(&out);
        assert_eq!(seen.dst, backend(0));
        assert_eq!(out[14] & 0x0f, 7, "the options are kept");
    });
}

#[test]
fn fin_both_ways_closes_the_flow_exactly_once() {
    with_balancer(&[1], |b| {
        let be = open(b, 40003);
        run(b, &from_client(40003, FIN | ACK).frame());
        assert_eq!(active(b), vec![1], "half-closed is still active");
        let (verdict, out) = run(b, &from_backend(be, 40003, FIN | ACK).ack(CLIENT_ISN + 2).frame());
        assert_eq!(verdict, XDP_REDIRECT);
        assert_eq!(inspect(&out).src, VIP);
        assert_eq!(active(b), vec![0]);
        // Retransmitted FINs and the last ACK are still rewritten, and do not
        // count the flow down again.
        for _ in 0..3 {
            let (verdict, out) = run(b, &from_client(40003, FIN | ACK).frame());
            assert_eq!(verdict, XDP_REDIRECT);
            assert_eq!(inspect(&out).dst, be);
            run(b, &from_backend(be, 40003, FIN | ACK).ack(CLIENT_ISN + 2).frame());
        }
        run(b, &from_client(40003, ACK).seq(CLIENT_ISN + 2).ack(BACKEND_ISN + 2).frame());
        assert_eq!(active(b), vec![0]);
        assert_eq!(counter(b, Counter::ClosedFlows), 1);
    });
}

#[test]
fn reset_from_either_side_closes_the_flow_once() {
    with_balancer(&[1, 1], |b| {
        let first = open(b, 40004);
        let second = open(b, 40005);
        assert_ne!(first, second, "least connections spreads two flows");
        // Each RST carries the sequence number its receiver expects.
        run(b, &from_client(40004, RST).frame());
        run(b, &from_client(40004, RST).frame());
        // (A backend's RST before any answer is a refused handshake: see
        // failover.rs.)
        run(b, &from_backend(second, 40005, RST | ACK).frame());
        run(b, &from_backend(second, 40005, RST | ACK).frame());
        assert_eq!(active(b), vec![0, 0]);
        assert_eq!(counter(b, Counter::ClosedFlows), 2);
    });
}

#[test]
fn a_syn_reusing_a_closed_flows_ports_is_a_new_flow() {
    with_balancer(&[1, 1], |b| {
        let first = open(b, 40006);
        let other = open(b, 40007);
        assert_ne!(first, other);
        // Now `first` has no flow and `other` one: least connections must
        // pick `first` for the new flow.
        run(b, &from_client(40006, RST).frame());
        let again = open(b, 40006);
        assert_eq!(again, first, "the new flow went to the least loaded backend");
        assert_eq!(active(b), vec![1, 1]);
        assert_eq!(counter(b, Counter::NewFlows), 3);
        // A retransmitted SYN (and SYN-ACK) of the live flow is not another
        // flow.
        assert_eq!(open(b, 40006), again);
        assert_eq!(counter(b, Counter::NewFlows), 3);
        assert_eq!(flow_entries(b), 4);
    });
}

#[test]
fn new_flows_go_to_the_backend_with_fewest_connections_relative_to_weight() {
    with_balancer(&[1, 1, 1], |b| {
        let mut per_backend = [0; 3];
        for port in 0..9 {
            per_backend[backend_index(open(b, 41000 + port))] += 1;
        }
        assert_eq!(per_backend, [3, 3, 3]);
        // Close two flows of one backend: the next two flows go there.
        let flows = b.conntrack();
        let victim = &flows[0].backend;
        let mut closed = 0;
        for f in flows.iter().filter(|f| &f.backend == victim).take(2) {
            let c: SocketAddrV4 = f.client.parse().unwrap();
            run(b, &from_client(c.port(), RST).frame());
            closed += 1;
        }
        assert_eq!(closed, 2);
        for port in 0..2 {
            assert_eq!(open(b, 42000 + port).to_string(), *victim);
        }
    });
    with_balancer(&[3, 1], |b| {
        let mut per_backend = [0; 2];
        for port in 0..8 {
            per_backend[backend_index(open(b, 43000 + port))] += 1;
        }
        assert_eq!(per_backend, [6, 2], "weights 3:1");
    });
}

#[test]
fn ties_are_broken_at_random_not_always_the_first_backend() {
    with_balancer(&[1, 1, 1, 1], |b| {
        let mut chosen = [0; 4];
        for port in 0..200 {
            // Every flow closes before the next opens: all backends tie at 0.
            chosen[backend_index(open(b, 44000 + port))] += 1;
            run(b, &from_client(44000 + port, RST).frame());
        }
        assert!(chosen.iter().all(|&n| n >= 20), "ties should spread: {chosen:?}");
        assert_eq!(active(b), vec![0; 4]);
    });
}

#[test]
fn weight_zero_and_removed_backends_take_no_new_flows() {
    with_balancer(&[1, 1], |b| {
        b.set_weight("web", backend(0), 0).unwrap();
        for port in 0..10 {
            assert_eq!(open(b, 45000 + port), backend(1));
        }
        b.remove_backend("web", backend(1)).unwrap();
        let (verdict, _) = run(b, &Tcp::new(client(45100), VIP, SYN).frame());
        assert_eq!(verdict, XDP_DROP, "no backend can take it: the client retries");
        assert_eq!(counter(b, Counter::NoBackend), 1);
        // The removed backend's established flows still work.
        let (verdict, out) = run(b, &from_client(45000, ACK).frame());
        assert_eq!(verdict, XDP_REDIRECT);
        assert_eq!(inspect(&out).dst, backend(1));
    });
}

#[test]
fn traffic_not_for_a_service_passes_untouched() {
    with_balancer(&[1], |b| {
        let others = [
            // The host's own TCP (SSH to the balancer's address).
            Tcp::new(client(40010), SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 1), 22), SYN).frame(),
            // The VIP on another port.
            Tcp::new(client(40011), SocketAddrV4::new(*VIP.ip(), 443), SYN).frame(),
            // A non-SYN to the VIP with no flow: the kernel answers it.
            Tcp::new(client(40012), VIP, ACK).frame(),
        ];
        let mut arp = vec![0xff; 6];
        arp.extend_from_slice(&CLIENT_MAC);
        arp.extend_from_slice(&[0x08, 0x06]);
        arp.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
        arp.resize(60, 0);
        let mut udp_to_vip = Tcp::new(client(40013), VIP, 0).frame();
        udp_to_vip[23] = 17;
        let mut icmp = Tcp::new(client(0), VIP, 0).frame();
        icmp[23] = 1;
        for frame in others.iter().chain([&arp, &udp_to_vip, &icmp]) {
            let (verdict, out) = run(b, frame);
            assert_eq!(verdict, XDP_PASS);
            assert_eq!(&out, frame, "passed untouched");
        }
        assert_eq!(flow_entries(b), 0);
        assert_eq!(active(b), vec![0]);
    });
}

#[test]
fn malformed_packets_get_a_defined_verdict_and_touch_nothing() {
    with_balancer(&[1], |b| {
        let syn = Tcp::new(client(40020), VIP, SYN).frame();
        let with = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut frame = syn.clone();
            f(&mut frame);
            frame
        };
        let cases: Vec<(&str, Vec<u8>, u32, Option<Counter>)> = vec![
            // (Frames shorter than an Ethernet header never reach XDP: the
            // kernel refuses them even in BPF_PROG_TEST_RUN.)
            ("truncated IPv4 header", syn[..30].to_vec(), XDP_DROP, Some(Counter::MalformedIp)),
            ("IHL below 5", with(&|f| f[14] = 0x44), XDP_DROP, Some(Counter::MalformedIp)),
            ("IHL past the total length", with(&|f| f[14] = 0x4f), XDP_DROP, Some(Counter::MalformedIp)),
            ("IP version 6 in an IPv4 frame", with(&|f| f[14] = 0x65), XDP_DROP, Some(Counter::MalformedIp)),
            ("total length past the frame", with(&|f| f[16..18].copy_from_slice(&200u16.to_be_bytes())), XDP_DROP, Some(Counter::MalformedIp)),
            ("total length below the header", with(&|f| f[16..18].copy_from_slice(&10u16.to_be_bytes())), XDP_DROP, Some(Counter::MalformedIp)),
            ("truncated TCP header", syn[..14 + 20 + 10].to_vec(), XDP_DROP, Some(Counter::MalformedIp)),
            ("TCP header cut by the IP length", with(&|f| { f[16..18].copy_from_slice(&30u16.to_be_bytes()); }), XDP_DROP, Some(Counter::MalformedTcp)),
            ("TCP data offset below 5", with(&|f| f[46] = 0x40), XDP_DROP, Some(Counter::MalformedTcp)),
            ("TCP data offset past the segment", with(&|f| f[46] = 0xf0), XDP_DROP, Some(Counter::MalformedTcp)),
            ("first fragment", with(&|f| f[20] = 0x20), XDP_PASS, Some(Counter::Fragment)),
            ("later fragment", with(&|f| { f[20] = 0; f[21] = 0x10; }), XDP_PASS, Some(Counter::Fragment)),
        ];
        for (what, frame, verdict, reason) in cases {
            let before = reason.map(|r| counter(b, r));
            let (got, out) = run(b, &frame);
            assert_eq!(got, verdict, "{what}");
            if got == XDP_PASS {
                assert_eq!(out, frame, "{what}: passed untouched");
            }
            if let (Some(r), Some(before)) = (reason, before) {
                assert_eq!(counter(b, r), before + 1, "{what}: counted as {r:?}");
            }
            assert_eq!(flow_entries(b), 0, "{what}: no flow");
            assert_eq!(active(b), vec![0], "{what}: no count");
        }
    });
}

#[test]
fn idle_flows_expire_with_their_counts_and_busy_ones_stay() {
    with_balancer(&[1, 1], |b| {
        let idle = open(b, 40030);
        let busy = open(b, 40031);
        run(b, &Tcp::new(idle, client(40030), SYN | ACK).frame());
        let long = Timeouts { syn: 3_600_000_000_000, established: 3_600_000_000_000, fin: 1, closed: 1 };
        let report = lb::runtime::aging::age(&mut b.datapath, &long, true).unwrap();
        assert_eq!(report.expired, 0, "nothing is idle for an hour");
        assert_eq!(active(b), vec![1, 1]);

        // 1 ns timeouts: both are idle now; they go, and their counts with them.
        let short = Timeouts { syn: 1, established: 1, fin: 1, closed: 1 };
        std::thread::sleep(std::time::Duration::from_millis(20));
        let report = lb::runtime::aging::age(&mut b.datapath, &short, true).unwrap();
        assert_eq!(report.expired, 2);
        assert_eq!(active(b), vec![0, 0]);
        assert_eq!(flow_entries(b), 0);
        // A closed flow that expires does not count down a second time.
        let again = open(b, 40031);
        run(b, &from_client(40031, RST).frame());
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(lb::runtime::aging::age(&mut b.datapath, &short, true).unwrap().expired, 1);
        assert_eq!(active(b), vec![0, 0]);
        let _ = (busy, again);
    });
}

#[test]
fn the_next_hop_is_cached_per_flow_and_follows_a_neighbour_change_within_a_second() {
    with_balancer(&[1], |b| {
        let be = open(b, 40040); // the first packet looks the route up
        let ack = from_client(40040, ACK).frame();
        let reply = from_backend(be, 40040, ACK).frame();
        assert_eq!(inspect(&run(b, &ack).1).dst_mac, backend_mac(0));
        assert_eq!(inspect(&run(b, &reply).1).dst_mac, CLIENT_MAC);
        // Both MACs change (replaced machines keeping their addresses).
        // This runs inside the test's namespace: the thread entered it.
        for (host, dev, mac) in [(be.ip().to_string(), "srv", "02:00:00:00:09:09"), (client(0).ip().to_string(), "cli", "02:00:00:00:09:08")] {
            let status = std::process::Command::new("ip")
                .args(["neigh", "replace", &host, "lladdr", mac, "dev", dev, "nud", "permanent"])
                .status()
                .unwrap();
            assert!(status.success());
        }
        assert_eq!(inspect(&run(b, &ack).1).dst_mac, backend_mac(0), "within the TTL: the cached hop");
        assert_eq!(inspect(&run(b, &reply).1).dst_mac, CLIENT_MAC, "within the TTL: the reply's cached hop");
        std::thread::sleep(std::time::Duration::from_millis(1100));
        assert_eq!(inspect(&run(b, &ack).1).dst_mac, [2, 0, 0, 0, 9, 9], "after it: looked up again");
        assert_eq!(inspect(&run(b, &reply).1).dst_mac, [2, 0, 0, 0, 9, 8], "after it: looked up again");
        // New flows share the backend's hop, and it too is the new one.
        let (_, out) = run(b, &Tcp::new(client(40041), VIP, SYN).frame());
        assert_eq!(inspect(&out).dst_mac, [2, 0, 0, 0, 9, 9]);
    });
}

#[test]
fn a_slot_given_to_another_backend_never_reuses_the_old_backends_hop() {
    with_balancer(&[1], |b| {
        open(b, 40050); // caches backend 0's hop for its slot
        run(b, &from_client(40050, FIN | ACK).frame());
        run(b, &from_backend(backend(0), 40050, FIN | ACK).ack(CLIENT_ISN + 2).frame());
        assert_eq!(active(b), vec![0]);
        b.remove_backend("web", backend(0)).unwrap();
        b.add_backend("web", &lb::config::BackendConfig::new(backend(1), 1)).unwrap();
        // Backend 1 takes the freed slot, within the hop's lifetime.
        let (verdict, out) = run(b, &Tcp::new(client(40051), VIP, SYN).frame());
        assert_eq!(verdict, XDP_REDIRECT);
        assert_eq!((inspect(&out).dst, inspect(&out).dst_mac), (backend(1), backend_mac(1)));
        // The old flow's trailing packets still go to backend 0.
        let (_, out) = run(b, &from_client(40050, ACK).seq(CLIENT_ISN + 2).ack(BACKEND_ISN + 2).frame());
        assert_eq!((inspect(&out).dst, inspect(&out).dst_mac), (backend(0), backend_mac(0)));
    });
}

#[test]
fn a_data_path_sized_for_two_services_refuses_a_third_and_says_why() {
    let _serial = lb_tests::serial();
    let ns = lb_tests::routed::routed_host(1);
    ns.run(|| {
        let mut b = lb::reconcile::Balancer::new(lb::datapath::Datapath::load_sized(1024, 2).unwrap());
        let service = |i: u8| {
            let vip = SocketAddrV4::new(Ipv4Addr::new(198, 18, 1, i), 80);
            lb_tests::routed::another_service(&format!("s{i}"), vip, &[backend(0)])
        };
        b.add_service(&service(1)).unwrap();
        b.add_service(&service(2)).unwrap();
        let err = format!("{:#}", b.add_service(&service(3)).unwrap_err());
        assert!(err.contains("all 2 service slots are in use (agent.max_services"), "{err}");
        assert_eq!(b.status().unwrap().services.len(), 2, "the running services are untouched");
        // Sized as asked: two services' worth of per-backend statistics.
        assert_eq!(b.datapath.max_services(), 2);
    });
}
