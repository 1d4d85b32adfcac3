//! A nat flow's reply entry is written at the backend's first answer, not at
//! the client's SYN, where the backend serves one service only: a SYN then
//! writes one table entry, not two. On crafted packets: what that answer
//! does, and everything that may come before it (the client's RST, an ICMP
//! error, another service's SYN to the same backend, a stray of the
//! connection the port had before, a full table, an agent killed).
use std::net::{Ipv4Addr, SocketAddrV4};

use lb::{
    datapath::{Datapath, Pins, XDP_DROP, XDP_PASS, XDP_REDIRECT},
    reconcile::Balancer,
};
use lb_common::Counter;
use lb_tests::{
    packet::{icmp_error, inspect, inspect_icmp, quoted_tcp_checksum_is_right, Tcp, ACK, FIN, PSH, RST, SYN},
    routed::{
        active, another_service, backend, client, counter, flow_entries, half_open, on_cpu, run, with_balancer,
        with_table, Conn, CLIENT, VIP,
    },
};

const ISN: u32 = 0x3000_0000;
const BACKEND_ISN: u32 = 0x4000_0000;

#[test]
fn a_syn_writes_one_entry_and_the_backends_first_answer_writes_the_other() {
    with_balancer(&[1, 1], |b| {
        let (verdict, conn) = Conn::syn(b, 50000, ISN);
        assert_eq!(verdict, XDP_REDIRECT);
        let mut conn = conn.unwrap();
        assert_eq!(flow_entries(b), 1, "the forward entry only");
        // A forged answer (not acknowledging the SYN) is judged as before.
        let forged = Tcp::new(conn.backend, client(50000), SYN | ACK).seq(BACKEND_ISN).ack(ISN + 7);
        assert_eq!(run(b, &forged.frame()).0, XDP_DROP);
        assert_eq!(counter(b, Counter::OutOfState), 1);
        // The real one comes from the VIP, checksums right (`inspect`).
        let syn_ack = Tcp::new(conn.backend, client(50000), SYN | ACK).seq(BACKEND_ISN).ack(ISN + 1);
        let (verdict, out) = run(b, &syn_ack.frame());
        assert_eq!(verdict, XDP_REDIRECT);
        let seen = inspect(&out);
        assert_eq!((seen.src, seen.dst, seen.flags), (VIP, client(50000), SYN | ACK));
        assert_eq!(flow_entries(b), 2, "the answer wrote the reply entry");
        conn.backend_seq = BACKEND_ISN + 1;
        assert_eq!(conn.send_client(b, ACK, b"").0, XDP_REDIRECT, "the handshake completes");
        let (verdict, out) = conn.send_backend(b, ACK | PSH, b"hello");
        assert_eq!((verdict, inspect(&out).src), (XDP_REDIRECT, VIP));
        let mut expected = vec![0; 2];
        expected[(conn.backend != backend(0)) as usize] = 1;
        assert_eq!((active(b), half_open(b)), (expected, vec![0; 2]));
    });
}

#[test]
fn before_the_backend_answers_only_the_clients_exact_rst_closes_the_flow() {
    with_balancer(&[1], |b| {
        let (_, conn) = Conn::syn(b, 50010, ISN);
        let conn = conn.unwrap();
        // Nothing is acknowledged yet: a FIN before the handshake, or an
        // RST not at the SYN's end, proves nothing.
        let fin = Tcp::new(client(50010), VIP, FIN | ACK).seq(ISN + 1).ack(BACKEND_ISN + 1);
        assert_eq!(run(b, &fin.frame()).0, XDP_DROP);
        assert_eq!(counter(b, Counter::OutOfState), 1);
        let near = Tcp::new(client(50010), VIP, RST).seq(ISN + 100);
        assert_eq!(run(b, &near.frame()).0, XDP_DROP);
        assert_eq!(counter(b, Counter::RstOutOfWindow), 1);
        assert_eq!(half_open(b), vec![1]);
        // The client giving up on its connection: exact, and it closes.
        let exact = Tcp::new(client(50010), VIP, RST).seq(ISN + 1);
        let (verdict, out) = run(b, &exact.frame());
        assert_eq!((verdict, inspect(&out).dst), (XDP_REDIRECT, conn.backend));
        assert_eq!((active(b), half_open(b)), (vec![0], vec![0]), "the count comes back to zero");
        // The backend's answer to a closed flow writes nothing.
        let syn_ack = Tcp::new(conn.backend, client(50010), SYN | ACK).seq(BACKEND_ISN).ack(ISN + 1);
        assert_eq!(run(b, &syn_ack.frame()).0, XDP_PASS);
        assert_eq!(flow_entries(b), 1);
    });
}

#[test]
fn an_icmp_error_about_the_syn_from_the_backends_side_reaches_the_client() {
    with_balancer(&[1], |b| {
        let (_, forwarded) = run(b, &Tcp::new(client(50020), VIP, SYN).seq(ISN).frame());
        // The backend's host: port unreachable, quoting the SYN as the
        // balancer forwarded it (client → backend).
        let backend_host = *backend(0).ip();
        let err = icmp_error(backend_host, CLIENT, 3, 3, [0; 4], &forwarded[14..]);
        let (verdict, out) = run(b, &err);
        assert_eq!(verdict, XDP_REDIRECT);
        let icmp = inspect_icmp(&out);
        assert_eq!((icmp.src, icmp.dst), (*VIP.ip(), CLIENT), "from the VIP, as the client knows the other end");
        assert_eq!((icmp.quoted_src, icmp.quoted_dst), (client(50020), VIP), "the client's own SYN");
        assert!(quoted_tcp_checksum_is_right(&icmp.quoted));
        assert_eq!(counter(b, Counter::IcmpTranslated), 1);
        // A router's error about it, and then the backend's answer, work as ever.
        let router = Ipv4Addr::new(198, 19, 0, 254);
        let err = icmp_error(router, CLIENT, 11, 0, [0; 4], &forwarded[14..14 + 28]);
        assert_eq!(inspect_icmp(&run(b, &err).1).src, router);
        let syn_ack = Tcp::new(backend(0), client(50020), SYN | ACK).seq(BACKEND_ISN).ack(ISN + 1);
        assert_eq!(inspect(&run(b, &syn_ack.frame()).1).src, VIP);
    });
}

#[test]
fn another_service_on_the_same_backend_cannot_take_a_client_port_whose_flow_awaits_its_answer() {
    with_balancer(&[1], |b| {
        let vip2 = SocketAddrV4::new(*VIP.ip(), 8080);
        let shared = backend(0);
        b.add_service(&another_service("alt", vip2, &[shared])).unwrap();
        // The first service's flow, its reply entry not written yet.
        assert_eq!(Conn::syn(b, 50030, ISN).0, XDP_REDIRECT);
        assert_eq!(flow_entries(b), 1);
        // The same client port to the other service: the backend would see
        // the same connection twice. Refused.
        let (verdict, _) = run(b, &Tcp::new(client(50030), vip2, SYN).seq(ISN + 5000).frame());
        assert_eq!(verdict, XDP_DROP);
        assert_eq!(counter(b, Counter::TupleInUse), 1);
        // The backend's answer goes to the first service's client, from its VIP.
        let syn_ack = Tcp::new(shared, client(50030), SYN | ACK).seq(BACKEND_ISN).ack(ISN + 1);
        let (verdict, out) = run(b, &syn_ack.frame());
        assert_eq!((verdict, inspect(&out).src), (XDP_REDIRECT, VIP));
        // The backend is shared now: flows to either service write both
        // entries at once, and another client port is fine.
        let before = flow_entries(b);
        assert_eq!(run(b, &Tcp::new(client(50031), vip2, SYN).seq(ISN).frame()).0, XDP_REDIRECT);
        assert_eq!(run(b, &Tcp::new(client(50032), VIP, SYN).seq(ISN).frame()).0, XDP_REDIRECT);
        assert_eq!(flow_entries(b), before + 4);
        let syn_ack = Tcp::new(shared, client(50031), SYN | ACK).seq(BACKEND_ISN).ack(ISN + 1);
        assert_eq!(inspect(&run(b, &syn_ack.frame()).1).src, vip2);
    });
}

#[test]
fn a_reused_client_port_starts_with_no_reply_entry_so_the_old_connections_strays_teach_nothing() {
    with_balancer(&[1], |b| {
        let mut old = Conn::open(b, 50040, ISN, BACKEND_ISN);
        old.send_backend(b, ACK | PSH, b"old data");
        old.close(b);
        // The client's next connection on the same port, to the same backend.
        let new_isn = ISN.wrapping_add(1 << 30);
        assert_eq!(Conn::syn(b, 50040, new_isn).0, XDP_REDIRECT);
        assert_eq!(flow_entries(b), 1, "the old reply entry went with the reuse");
        // A late segment of the old connection from the backend.
        let (verdict, _) = run(b, &old.backend_segment(ACK | PSH, b"late").frame());
        assert_eq!(verdict, XDP_DROP);
        // The new connection's answer acknowledges the new SYN.
        let syn_ack = Tcp::new(backend(0), client(50040), SYN | ACK).seq(BACKEND_ISN + 99).ack(new_isn.wrapping_add(1));
        assert_eq!(run(b, &syn_ack.frame()).0, XDP_REDIRECT);
        let ack = Tcp::new(client(50040), VIP, ACK).seq(new_isn.wrapping_add(1)).ack(BACKEND_ISN + 100);
        assert_eq!(run(b, &ack.frame()).0, XDP_REDIRECT);
        assert_eq!((active(b), half_open(b)), (vec![1], vec![0]));
    });
}

#[test]
fn the_backends_first_answer_makes_room_in_a_full_table_as_a_syn_does() {
    // Two flows: four entries.
    with_table(&[1], 2, |b| {
        on_cpu(0);
        let mut done = Conn::open(b, 50050, ISN, BACKEND_ISN);
        done.close(b);
        let (_, waiting) = Conn::syn(b, 50051, ISN);
        assert_eq!(Conn::syn(b, 50052, ISN).0, XDP_REDIRECT);
        assert_eq!((flow_entries(b), counter(b, Counter::Evicted)), (4, 0), "full, nothing evicted yet");
        // The answer's reply entry takes the closed flow's room.
        waiting.unwrap().answer(b, BACKEND_ISN);
        assert_eq!((counter(b, Counter::Evicted), counter(b, Counter::TableFull)), (1, 0));
        assert_eq!(flow_entries(b), 3);
        let (_, differing) = b.verify_counts().unwrap();
        assert!(differing.is_empty(), "{differing:?}");
    });
}

/// An agent killed while flows wait for their backends' answers: the next
/// agent's program (loaded on the same pinned maps) must still know which
/// service each backend answers for, or those answers would go to the
/// host's stack, which resets them.
#[test]
fn the_next_agents_program_writes_the_reply_entries_of_flows_the_last_one_opened() {
    let _serial = lb_tests::serial();
    let ns = lb_tests::routed::routed_host(4);
    let dir = std::path::PathBuf::from("/sys/fs/bpf").join(&ns.name);
    // Removed however the test ends.
    struct Removed(std::path::PathBuf);
    impl Drop for Removed {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _removed = Removed(dir.clone());
    ns.run(|| {
        let load = || {
            let (pins, lock) = Pins::open(&dir).unwrap();
            let (datapath, reused) = Datapath::load_pinned(1024, 4, &pins).unwrap();
            (Balancer::new(datapath), reused, lock)
        };
        let (mut first, reused, lock) = load();
        assert!(!reused);
        first.add_service(&another_service("web", VIP, &[backend(0)])).unwrap();
        let (verdict, out) = run(&first, &Tcp::new(client(50060), VIP, SYN).seq(ISN).frame());
        assert_eq!((verdict, inspect(&out).dst), (XDP_REDIRECT, backend(0)));
        assert_eq!((active(&first), half_open(&first)), (vec![0], vec![1]));
        // kill -9: the program and its lock go, the pinned maps stay.
        drop((first, lock));

        let (mut next, reused, _lock) = load();
        assert!(reused, "the pinned maps are taken over");
        let syn_ack = Tcp::new(backend(0), client(50060), SYN | ACK).seq(BACKEND_ISN).ack(ISN + 1);
        let (verdict, out) = run(&next, &syn_ack.frame());
        assert_eq!((verdict, inspect(&out).src), (XDP_REDIRECT, VIP), "the answer reaches the client from the VIP");
        let ack = Tcp::new(client(50060), VIP, ACK).seq(ISN + 1).ack(BACKEND_ISN + 1);
        assert_eq!(run(&next, &ack.frame()).0, XDP_REDIRECT, "the handshake completes");
        // The half-open count the killed agent's program kept (on the CPU
        // that opened the flow) came over with the pins, and came off.
        next.add_service(&another_service("web", VIP, &[backend(0)])).unwrap();
        assert_eq!((active(&next), half_open(&next)), (vec![1], vec![0]));
    });
}
