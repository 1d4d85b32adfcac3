//! What a hostile or careless sender can do to a flow with the right ports
//! and the wrong sequence numbers, on crafted packets: RSTs and FINs are
//! judged against each side's window (RFC 5961), half-open flows are not
//! established, handshakes must acknowledge each other, and two services
//! sharing a backend never mix their flows' replies.
use std::net::SocketAddrV4;

use lb::datapath::{Maps, XDP_DROP, XDP_PASS, XDP_REDIRECT};
use lb_common::{Counter, FlowKey, Timeouts, DIR_FORWARD};
use lb_tests::{
    packet::{inspect, linux_syn_options, Tcp, ACK, FIN, PSH, RST, SYN},
    routed::{active, another_service, backend, client, counter, half_open, on_cpu, run, with_balancer, with_table, Conn, VIP},
};

/// Initial sequence numbers chosen to sit near the wrap of the sequence
/// space, where a comparison that forgets to wrap goes wrong.
const ISN: u32 = 0xffff_ff00;
const BACKEND_ISN: u32 = 0x7fff_fff0;

fn established(b: &lb::reconcile::Balancer, port: u16) -> Conn {
    let mut conn = Conn::open(b, port, ISN, BACKEND_ISN);
    // Some data both ways, so the windows have moved on from the handshake.
    assert_eq!(conn.send_client(b, ACK | PSH, &[b'q'; 300]).0, XDP_REDIRECT);
    assert_eq!(conn.send_backend(b, ACK | PSH, &[b'r'; 700]).0, XDP_REDIRECT);
    assert_eq!(conn.send_client(b, ACK, b"").0, XDP_REDIRECT);
    conn
}

#[test]
fn spoofed_client_rsts_outside_the_window_are_dropped_and_the_flow_lives_on() {
    with_balancer(&[1], |b| {
        let mut conn = established(b, 60000);
        for offset in [1u32 << 20, 1 << 31, 0u32.wrapping_sub(70_000)] {
            let forged = conn.client_segment(RST, b"").seq(conn.client_seq.wrapping_add(offset));
            assert_eq!(run(b, &forged.frame()).0, XDP_DROP, "RST at +{offset:#x}");
        }
        assert_eq!(counter(b, Counter::RstOutOfWindow), 3);
        assert_eq!(active(b), vec![1], "still established");
        // The connection still carries data both ways.
        assert_eq!(conn.send_client(b, ACK | PSH, b"more").0, XDP_REDIRECT);
        let (verdict, out) = conn.send_backend(b, ACK | PSH, b"reply");
        assert_eq!((verdict, inspect(&out).src), (XDP_REDIRECT, VIP));
    });
}

#[test]
fn an_rst_in_the_window_but_not_exact_reaches_the_endpoint_and_changes_nothing() {
    with_balancer(&[1], |b| {
        let conn = established(b, 60001);
        let near = conn.client_segment(RST, b"").seq(conn.client_seq.wrapping_add(1000));
        let (verdict, out) = run(b, &near.frame());
        assert_eq!(verdict, XDP_REDIRECT, "the backend answers it with a challenge ACK (RFC 5961)");
        assert_eq!(inspect(&out).dst, conn.backend);
        assert_eq!(counter(b, Counter::RstInWindow), 1);
        assert_eq!(active(b), vec![1], "not closed on a guess");
        // From the backend's side, likewise.
        let near = conn.backend_segment(RST | ACK, b"").seq(conn.backend_seq.wrapping_add(5));
        assert_eq!(run(b, &near.frame()).0, XDP_REDIRECT);
        assert_eq!(active(b), vec![1]);
        // The same guess again is no more exact than the first time: an RST
        // teaches the flow nothing.
        let near = conn.client_segment(RST, b"").seq(conn.client_seq.wrapping_add(1000));
        assert_eq!(run(b, &near.frame()).0, XDP_REDIRECT);
        let near = conn.backend_segment(RST | ACK, b"").seq(conn.backend_seq.wrapping_add(5));
        assert_eq!(run(b, &near.frame()).0, XDP_REDIRECT);
        assert_eq!(active(b), vec![1], "two guesses alike close nothing");
        assert_eq!(counter(b, Counter::RstInWindow), 4);
    });
}

#[test]
fn an_exact_rst_from_either_side_closes_the_flow() {
    with_balancer(&[1, 1], |b| {
        let from_client = established(b, 60002);
        let from_backend = established(b, 60003);
        assert_eq!(run(b, &from_client.client_segment(RST, b"").frame()).0, XDP_REDIRECT);
        let (verdict, out) = run(b, &from_backend.backend_segment(RST | ACK, b"").frame());
        assert_eq!((verdict, inspect(&out).src), (XDP_REDIRECT, VIP));
        assert_eq!(active(b), vec![0, 0]);
        assert_eq!(counter(b, Counter::ClosedFlows), 2);
        // An RST at what the receiver last acknowledged is exact too: the
        // sender may have sent more that is not acknowledged yet.
        let mut conn = established(b, 60004);
        let acknowledged = conn.backend_seq;
        conn.send_backend(b, ACK | PSH, &[b'u'; 100]);
        let rst = conn.backend_segment(RST, b"").seq(acknowledged);
        assert_eq!(run(b, &rst.frame()).0, XDP_REDIRECT);
        assert_eq!(active(b).iter().sum::<u64>(), 0);
    });
}

#[test]
fn spoofed_backend_rsts_and_fins_outside_the_window_are_dropped() {
    with_balancer(&[1], |b| {
        let conn = established(b, 60005);
        let forged_rst = conn.backend_segment(RST | ACK, b"").seq(conn.backend_seq.wrapping_add(1 << 24));
        assert_eq!(run(b, &forged_rst.frame()).0, XDP_DROP);
        let forged_fin = conn.backend_segment(FIN | ACK, b"").seq(conn.backend_seq.wrapping_add(1 << 24));
        assert_eq!(run(b, &forged_fin.frame()).0, XDP_DROP);
        let forged_fin = conn.client_segment(FIN | ACK, b"").seq(conn.client_seq.wrapping_sub(1 << 24));
        assert_eq!(run(b, &forged_fin.frame()).0, XDP_DROP);
        assert_eq!(counter(b, Counter::RstOutOfWindow), 1);
        assert_eq!(counter(b, Counter::FinOutOfWindow), 2);
        // Neither side is marked as closing: a real close still takes both FINs.
        let mut conn = conn;
        assert_eq!(conn.send_client(b, FIN | ACK, b"").0, XDP_REDIRECT);
        assert_eq!(active(b), vec![1], "half-closed is still open");
        conn.send_backend(b, FIN | ACK, b"");
        assert_eq!(active(b), vec![0]);
    });
}

#[test]
fn the_window_scale_of_the_handshake_widens_the_window() {
    window_scale_widens_the_window(&[2, 4, 5, 0xb4, 1, 3, 3, 7], &[1, 1, 1, 3, 3, 7]);
}

/// The same with the options laid out as Linux sends them, which the
/// balancer reads in place rather than walking them.
#[test]
fn a_window_scale_in_linuxs_layout_of_the_options_widens_the_window_too() {
    window_scale_widens_the_window(&linux_syn_options(1), &linux_syn_options(2));
}

/// Client and backend both announce a window scale of 7, in options
/// `syn_options` and `syn_ack_options`.
fn window_scale_widens_the_window(syn_options: &[u8], syn_ack_options: &[u8]) {
    with_balancer(&[1], |b| {
        let syn = Tcp::new(client(60006), VIP, SYN).seq(ISN).tcp_options(syn_options);
        let (verdict, out) = run(b, &syn.frame());
        assert_eq!(verdict, XDP_REDIRECT);
        let backend = inspect(&out).dst;
        let syn_ack = Tcp::new(backend, client(60006), SYN | ACK)
            .seq(BACKEND_ISN)
            .ack(ISN.wrapping_add(1))
            .tcp_options(syn_ack_options);
        assert_eq!(run(b, &syn_ack.frame()).0, XDP_REDIRECT);
        // The backend offers 1,000 × 2^7 bytes.
        let ack = Tcp::new(client(60006), VIP, ACK).seq(ISN.wrapping_add(1)).ack(BACKEND_ISN.wrapping_add(1));
        assert_eq!(run(b, &ack.frame()).0, XDP_REDIRECT);
        let backend_ack = Tcp::new(backend, client(60006), ACK)
            .seq(BACKEND_ISN.wrapping_add(1))
            .ack(ISN.wrapping_add(1))
            .window(1000);
        assert_eq!(run(b, &backend_ack.frame()).0, XDP_REDIRECT);
        let rst_at = |offset: u32| Tcp::new(client(60006), VIP, RST).seq(ISN.wrapping_add(1).wrapping_add(offset));
        assert_eq!(run(b, &rst_at(100_000).frame()).0, XDP_REDIRECT, "within 128,000");
        assert_eq!(run(b, &rst_at(200_000).frame()).0, XDP_DROP, "past 128,000");
        assert_eq!(active(b), vec![1]);
    });
}

#[test]
fn a_half_open_flow_is_not_established_and_stray_segments_cannot_make_it_so() {
    with_balancer(&[1], |b| {
        let (_, conn) = Conn::syn(b, 60010, ISN);
        let mut conn = conn.unwrap();
        assert_eq!((active(b), half_open(b)), (vec![0], vec![1]));
        // Before the backend answers: no client segment but an RST, nothing
        // from the backend but its SYN-ACK or refusal acknowledging the SYN.
        let stray_ack = Tcp::new(client(60010), VIP, ACK).seq(ISN.wrapping_add(1)).ack(12345);
        assert_eq!(run(b, &stray_ack.frame()).0, XDP_DROP);
        // Nor one acknowledging 0: what the flow holds as the number to
        // acknowledge until the backend answers.
        let zero_ack = Tcp::new(client(60010), VIP, ACK).seq(ISN.wrapping_add(1)).ack(0);
        assert_eq!(run(b, &zero_ack.frame()).0, XDP_DROP);
        let stray_reply =
            Tcp::new(conn.backend, client(60010), ACK | PSH).seq(5).ack(ISN.wrapping_add(1)).payload(b"x");
        assert_eq!(run(b, &stray_reply.frame()).0, XDP_DROP);
        let forged_answer = Tcp::new(conn.backend, client(60010), SYN | ACK).seq(5).ack(ISN.wrapping_add(99));
        assert_eq!(run(b, &forged_answer.frame()).0, XDP_DROP);
        let forged_refusal = Tcp::new(conn.backend, client(60010), RST | ACK).ack(77);
        assert_eq!(run(b, &forged_refusal.frame()).0, XDP_DROP);
        assert_eq!(b.status().unwrap().services[0].backends[0].refused, 0, "no passive failure from a forgery");
        // After the SYN-ACK, the client's ACK must acknowledge it.
        conn.answer(b, BACKEND_ISN);
        let wrong_ack = Tcp::new(client(60010), VIP, ACK).seq(ISN.wrapping_add(1)).ack(BACKEND_ISN.wrapping_add(9));
        assert_eq!(run(b, &wrong_ack.frame()).0, XDP_DROP);
        assert_eq!((counter(b, Counter::OutOfState), counter(b, Counter::RstOutOfWindow)), (5, 1));
        assert_eq!((active(b), half_open(b)), (vec![0], vec![1]));
        assert_eq!(conn.send_client(b, ACK, b"").0, XDP_REDIRECT);
        assert_eq!((active(b), half_open(b)), (vec![1], vec![0]));
    });
}

#[test]
fn duplicate_and_malformed_syns_mark_no_backend_down_and_open_nothing() {
    with_balancer(&[1, 1], |b| {
        let (_, conn) = Conn::syn(b, 60020, ISN);
        let first = conn.unwrap().backend;
        // The same SYN again at once: a duplicate, not a retry of an
        // unanswered one.
        for _ in 0..3 {
            let (verdict, out) = run(b, &Tcp::new(client(60020), VIP, SYN).seq(ISN).frame());
            assert_eq!((verdict, inspect(&out).dst), (XDP_REDIRECT, first), "stays with its backend");
        }
        let status = b.status().unwrap();
        assert!(status.services[0].backends.iter().all(|s| s.unanswered == 0 && s.state.to_string() == "up"));
        assert_eq!(counter(b, Counter::SynRetried), 0);
        // SYN+FIN and SYN+RST are no opening SYN: no flow, no backend.
        for flags in [SYN | FIN, SYN | RST] {
            let (verdict, _) = run(b, &Tcp::new(client(60021), VIP, flags).seq(ISN).frame());
            assert_eq!(verdict, XDP_PASS, "{flags:#x}: the kernel's to refuse");
            let (verdict, _) = run(b, &Tcp::new(client(60020), VIP, flags).seq(ISN).frame());
            assert_eq!(verdict, XDP_DROP, "{flags:#x} on a flow");
        }
        assert_eq!(half_open(b).iter().sum::<u64>(), 1);
        assert_eq!(counter(b, Counter::NewFlows), 1);
    });
}

#[test]
fn stray_segments_far_from_the_connections_numbers_are_dropped_and_teach_nothing() {
    with_balancer(&[1], |b| {
        let mut conn = established(b, 60025);
        // An earlier connection's segment on these ports: its numbers are
        // nowhere near this one's.
        let stray =
            conn.client_segment(ACK, b"").seq(conn.client_seq ^ 0x8000_0000).ack(conn.backend_seq ^ 0x4000_0000);
        assert_eq!(run(b, &stray.frame()).0, XDP_DROP);
        let stray = conn.backend_segment(ACK | PSH, b"old").ack(conn.client_seq.wrapping_add(0x2000_0000));
        assert_eq!(run(b, &stray.frame()).0, XDP_DROP);
        assert_eq!(counter(b, Counter::OutOfState), 2);
        // The connection's own close is judged against its own numbers.
        conn.close(b);
        assert_eq!(active(b), vec![0]);
    });
}

#[test]
fn only_flows_the_agent_reset_are_answered_with_an_rst_from_the_balancer() {
    with_balancer(&[1], |b| {
        let conn = established(b, 60030);
        assert_eq!(run(b, &conn.client_segment(RST, b"").frame()).0, XDP_REDIRECT);
        // The client's trailing segments go on to the backend, which answers
        // for itself; the balancer does not forge RSTs for endpoints.
        let (verdict, out) = run(b, &conn.client_segment(ACK | PSH, b"late").frame());
        assert_eq!(verdict, XDP_REDIRECT);
        assert_eq!((inspect(&out).dst, inspect(&out).flags), (conn.backend, ACK | PSH));
        assert_eq!(counter(b, Counter::ResetSent), 0);
    });
}

#[test]
fn two_services_sharing_a_backend_never_mix_their_flows_replies() {
    with_balancer(&[1], |b| {
        let vip2 = SocketAddrV4::new(*VIP.ip(), 8080);
        let shared = backend(0);
        b.add_service(&another_service("alt", vip2, &[shared])).unwrap();
        let conn = established(b, 60040);
        assert_eq!(conn.backend, shared);
        // The same client port to the other service: the backend would see
        // the same connection twice. Refused, not mixed.
        let (verdict, _) = run(b, &Tcp::new(client(60040), vip2, SYN).seq(ISN).frame());
        assert_eq!(verdict, XDP_DROP);
        assert_eq!(counter(b, Counter::TupleInUse), 1);
        let (verdict, out) = run(b, &conn.backend_segment(ACK | PSH, b"for web").frame());
        assert_eq!((verdict, inspect(&out).src), (XDP_REDIRECT, VIP), "replies still come from the first VIP");
        // Another port is fine, and once the first flow is closed so is this one.
        let (verdict, out) = run(b, &Tcp::new(client(60041), vip2, SYN).seq(ISN).frame());
        assert_eq!((verdict, inspect(&out).dst), (XDP_REDIRECT, shared));
        let mut conn = conn;
        conn.close(b);
        let (verdict, _) = run(b, &Tcp::new(client(60040), vip2, SYN).seq(ISN).frame());
        assert_eq!(verdict, XDP_REDIRECT);
    });
}

#[test]
fn a_full_table_makes_room_from_dead_flows_and_never_from_live_ones() {
    with_table(&[1], 4, |b| {
        on_cpu(0);
        let mut conns: Vec<Conn> = (0..4).map(|i| Conn::open(b, 62000 + i, ISN, BACKEND_ISN)).collect();
        // Four established flows fill it: nothing may go.
        assert_eq!(Conn::syn(b, 62010, ISN).0, XDP_DROP);
        assert_eq!(counter(b, Counter::TableFull), 1);
        // A closed flow is dead at once.
        conns[0].close(b);
        let (verdict, half_open_flow) = Conn::syn(b, 62011, ISN);
        assert_eq!(verdict, XDP_REDIRECT);
        assert_eq!(counter(b, Counter::Evicted), 1);
        // Its backend's answer takes the last entry (the flow's reply one).
        half_open_flow.unwrap().answer(b, BACKEND_ISN);
        // A half-open flow (a flood's, say) makes room once idle for a
        // second: longer than a handshake takes, shorter than a client's
        // first retransmission.
        assert_eq!(Conn::syn(b, 62012, ISN).0, XDP_DROP, "62011 is still young");
        std::thread::sleep(std::time::Duration::from_millis(1100));
        assert_eq!(Conn::syn(b, 62012, ISN).0, XDP_REDIRECT);
        assert_eq!(counter(b, Counter::Evicted), 2);
        assert_eq!((active(b), half_open(b)), (vec![3], vec![1]), "counts follow what was evicted");
        let (_, differing) = b.verify_counts().unwrap();
        assert!(differing.is_empty(), "{differing:?}");
        // The established ones still work.
        for conn in &mut conns[1..] {
            assert_eq!(conn.send_client(b, ACK | PSH, b"still here").0, XDP_REDIRECT);
        }
    });
}

#[test]
fn a_full_table_still_makes_room_after_the_agent_aged_a_run_of_its_oldest_flows() {
    with_table(&[1], 40, |b| {
        on_cpu(0);
        // A flood's SYNs fill the table, answered by the backend (two
        // entries each) and never acknowledged, past the time a full table
        // may evict half-open flows.
        let flood = |ports: std::ops::Range<u16>| {
            for port in ports {
                let (verdict, flow) = Conn::syn(b, port, ISN);
                assert_eq!(verdict, XDP_REDIRECT, "SYN from port {port}");
                flow.unwrap().answer(b, BACKEND_ISN);
            }
        };
        flood(63000..63040);
        std::thread::sleep(std::time::Duration::from_millis(1100));
        // The agent, aging under pressure, removes the 30 oldest: the first
        // 30 entries of this CPU's ring of openings now name no flow.
        let oldest: Vec<FlowKey> = b
            .datapath
            .flows()
            .into_iter()
            .filter(|(key, flow)| flow.direction == DIR_FORWARD && u16::from_be(key.sport) < 63030)
            .map(|(key, _)| key)
            .collect();
        let at_once = Timeouts { syn: 0, ..Timeouts::default() };
        assert_eq!(b.datapath.expire(&oldest, &at_once).unwrap(), 30);
        // The flood takes the room at once.
        flood(63040..63070);
        assert_eq!(counter(b, Counter::TableFull), 0);
        // A real client's SYN finds the table full: a flood flow idle past
        // a second (63030) must go for it, however many gone ones come first.
        let (verdict, _) = Conn::syn(b, 64000, ISN);
        assert_eq!(verdict, XDP_REDIRECT, "the real client's SYN");
        assert_eq!((counter(b, Counter::TableFull), counter(b, Counter::Evicted)), (0, 1));
        let (_, differing) = b.verify_counts().unwrap();
        assert!(differing.is_empty(), "{differing:?}");
    });
}

#[test]
fn a_cpu_whose_own_flows_are_all_alive_makes_room_from_another_cpus() {
    with_table(&[1], 8, |b| {
        // The flood arrives on CPU 1 and fills the table; the flows CPU 0
        // opened are established and in use.
        on_cpu(0);
        let mut real = Conn::open(b, 62000, ISN, BACKEND_ISN);
        on_cpu(1);
        for port in 63000..63007 {
            let (verdict, flow) = Conn::syn(b, port, ISN);
            assert_eq!(verdict, XDP_REDIRECT, "SYN from port {port}");
            // The backend answers: the flow's reply entry.
            flow.unwrap().answer(b, BACKEND_ISN);
        }
        on_cpu(0);
        assert_eq!(Conn::syn(b, 64000, ISN).0, XDP_DROP, "the flood's flows are young");
        std::thread::sleep(std::time::Duration::from_millis(1100));
        // A real client's SYN on CPU 0: nothing of CPU 0's may go, so one
        // of CPU 1's idle half-open flows does.
        assert_eq!(Conn::syn(b, 64001, ISN).0, XDP_REDIRECT, "the real client's SYN");
        assert_eq!((counter(b, Counter::TableFull), counter(b, Counter::Evicted)), (1, 1));
        assert_eq!(real.send_client(b, ACK | PSH, b"still here").0, XDP_REDIRECT);
        assert_eq!((active(b), half_open(b)), (vec![1], vec![7]), "counts follow what was evicted");
        let (_, differing) = b.verify_counts().unwrap();
        assert!(differing.is_empty(), "{differing:?}");
    });
}
