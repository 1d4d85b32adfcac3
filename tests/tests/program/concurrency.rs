//! Packets of the same flows on two CPUs at once, as a NIC with several
//! queues delivers them: two threads, each pinned to a CPU, drive the
//! program with BPF_PROG_TEST_RUN in step, flow by flow, each a little
//! earlier or later than the other, so that their runs overlap at every
//! point. Whatever the order, every flow ends one way a client can live
//! with, and every count comes back to what the table holds.
use std::{
    net::SocketAddrV4,
    sync::atomic::{AtomicU32, Ordering},
};

use lb::datapath::{Maps, XDP_REDIRECT};
use lb_common::{FlowKey, Timeouts, DIR_FORWARD, FLOW_ANSWERED, FLOW_ESTABLISHED, FLOW_EXPIRED};
use lb_tests::{
    packet::{inspect, Tcp, ACK, BACKEND_ISN, CLIENT_ISN, FIN, PSH, RST, SYN},
    routed::{active, backend, client, half_open, on_cpu, run, syn, with_full_nat, with_table, Conn, BALANCER, VIP},
};

/// Flows raced in one test: enough that the two runs' offsets sweep every
/// point of each other's path many times over.
const FLOWS: u16 = 600;
const FIRST_PORT: u16 = 20000;

/// Two threads, `first` on CPU 0 and `second` on CPU 1, each called once
/// per flow `i`, meeting at a barrier before each flow; one of them waits a
/// little first, by an amount that sweeps with `i`. Returns what each gave.
fn in_step<A: Send, B: Send>(
    flows: usize,
    first: impl Fn(usize) -> A + Sync,
    second: impl Fn(usize) -> B + Sync,
) -> (Vec<A>, Vec<B>) {
    let arrived = AtomicU32::new(0);
    let meet = |i: usize| {
        arrived.fetch_add(1, Ordering::AcqRel);
        let since = std::time::Instant::now();
        while arrived.load(Ordering::Acquire) < 2 * (i as u32 + 1) {
            std::hint::spin_loop();
            // The other thread failed an assertion: fail too, not hang.
            assert!(since.elapsed().as_secs() < 10, "the other CPU's thread stopped before flow {i}");
        }
    };
    std::thread::scope(|s| {
        let a = s.spawn(|| one_side(0, flows, &meet, &first));
        let b = s.spawn(|| one_side(1, flows, &meet, &second));
        (a.join().unwrap(), b.join().unwrap())
    })
}

/// One thread of `in_step`, on `cpu`: before each flow it meets the other,
/// and on every other flow (its CPU's parity) it waits a little first.
fn one_side<T>(cpu: usize, flows: usize, meet: &(impl Fn(usize) + Sync), step: impl Fn(usize) -> T) -> Vec<T> {
    on_cpu(cpu);
    (0..flows)
        .map(|i| {
            meet(i);
            if i % 2 == cpu {
                // A few microseconds at most: about the length of one run.
                for _ in 0..(i * 7) % 64 {
                    std::hint::spin_loop();
                }
            }
            step(i)
        })
        .collect()
}

/// The key of the forward entry of the flow from the client's `port`.
fn forward_key(port: u16) -> FlowKey {
    FlowKey {
        saddr: u32::from(*client(port).ip()).to_be(),
        daddr: u32::from(*VIP.ip()).to_be(),
        sport: port.to_be(),
        dport: VIP.port().to_be(),
    }
}

/// The forward entry of the flow from the client's `port`.
fn forward_entry(b: &lb::reconcile::Balancer, port: u16) -> lb_common::Flow {
    let key = forward_key(port);
    let flows = b.datapath.flows();
    let (_, flow) = flows.iter().find(|(k, f)| *k == key && f.direction == DIR_FORWARD).expect("the flow's entry");
    *flow
}

#[test]
fn a_late_answer_and_the_retry_that_moves_its_flow_never_both_reach_the_client() {
    with_table(&[1, 1, 1], 8192, |b| {
        // Every flow's SYN goes to a backend that does not answer in time:
        // the client retries, and its retry may move the flow elsewhere.
        on_cpu(0);
        let ports: Vec<u16> = (FIRST_PORT..FIRST_PORT + FLOWS).collect();
        let first: Vec<SocketAddrV4> = ports.iter().map(|&port| syn(b, port)).collect();
        std::thread::sleep(std::time::Duration::from_millis(600));
        let late_isn = BACKEND_ISN ^ 0x0f0f_0000;
        let retries: Vec<Vec<u8>> = ports.iter().map(|&port| Tcp::new(client(port), VIP, SYN).frame()).collect();
        let answers: Vec<Vec<u8>> = (0..ports.len())
            .map(|i| Tcp::new(first[i], client(ports[i]), SYN | ACK).seq(late_isn).ack(CLIENT_ISN + 1).frame())
            .collect();
        // CPU 0 sees the client's retry while CPU 1 sees the first backend's
        // answer, at last.
        let (retried, answered) = in_step(ports.len(), |i| run(b, &retries[i]), |i| run(b, &answers[i]).0);

        let mut moved_count = 0;
        for (i, &port) in ports.iter().enumerate() {
            let (retry_verdict, retry_out) = &retried[i];
            let moved = *retry_verdict == XDP_REDIRECT && inspect(retry_out).dst != first[i];
            let answer_reached_client = answered[i] == XDP_REDIRECT;
            moved_count += moved as usize;
            // The client takes the first SYN-ACK it gets: if that is the
            // first backend's, the flow must stay there; if the flow moved,
            // the first backend's answer must not reach it.
            assert!(
                moved != answer_reached_client,
                "port {port}: retry {retry_verdict} (moved: {moved}), the first backend's answer {}",
                answered[i]
            );
            let flow = forward_entry(b, port);
            if answer_reached_client {
                assert_eq!(flow.state & FLOW_ANSWERED, FLOW_ANSWERED, "port {port}: answered");
                let ack = Tcp::new(client(port), VIP, ACK).seq(CLIENT_ISN + 1).ack(late_isn + 1);
                let (verdict, out) = run(b, &ack.frame());
                assert_eq!(verdict, XDP_REDIRECT, "port {port}: the client's ACK of the answer it got");
                assert_eq!(inspect(&out).dst, first[i], "port {port}");
            } else {
                let to = inspect(retry_out).dst;
                let answer = Tcp::new(to, client(port), SYN | ACK).seq(BACKEND_ISN).ack(CLIENT_ISN + 1);
                assert_eq!(run(b, &answer.frame()).0, XDP_REDIRECT, "port {port}: the new backend's answer");
                let ack = Tcp::new(client(port), VIP, ACK).seq(CLIENT_ISN + 1).ack(BACKEND_ISN + 1);
                let (verdict, out) = run(b, &ack.frame());
                assert_eq!(verdict, XDP_REDIRECT, "port {port}: the client's ACK");
                assert_eq!(inspect(&out).dst, to, "port {port}");
            }
        }
        // Both ways happened: the race was run, not one side always first.
        assert!(moved_count > 0 && moved_count < ports.len(), "{moved_count} of {} moved", ports.len());
        assert_eq!(active(b).iter().sum::<u64>(), u64::from(FLOWS));
        assert_eq!(half_open(b).iter().sum::<u64>(), 0);
        let (_, differing) = b.verify_counts().unwrap();
        assert!(differing.is_empty(), "{differing:?}");
    });
}

/// Every verdict in `verdicts` is `expected`; the message names the first
/// flow that got another.
fn all_are(verdicts: &[u32], expected: u32, what: &str) {
    if let Some(i) = verdicts.iter().position(|&v| v != expected) {
        panic!("{what} of port {}: verdict {} (expected {expected})", FIRST_PORT + i as u16, verdicts[i]);
    }
}

#[test]
fn closes_crossing_and_a_new_connection_on_the_same_ports_follow_each_flow_on_two_cpus() {
    with_table(&[1, 1, 1], 8192, |b| {
        on_cpu(0);
        let n = usize::from(FLOWS);
        let conns: Vec<Conn> = (0..FLOWS).map(|i| Conn::open(b, FIRST_PORT + i, CLIENT_ISN, BACKEND_ISN)).collect();
        let (c, s) = (CLIENT_ISN + 1, BACKEND_ISN + 1);
        let from_client = |i: usize, flags: u8, seq: u32, ack: u32| {
            Tcp::new(client(conns[i].port), VIP, flags).seq(seq).ack(ack).frame()
        };
        let from_backend = |i: usize, to: SocketAddrV4, flags: u8, seq: u32, ack: u32| {
            Tcp::new(to, client(conns[i].port), flags).seq(seq).ack(ack).frame()
        };

        // Both ends close at once, each FIN seen on its own CPU, then each
        // acknowledges the other's.
        let (fins, answering_fins) = in_step(
            n,
            |i| run(b, &from_client(i, FIN | ACK, c, s)).0,
            |i| run(b, &from_backend(i, conns[i].backend, FIN | ACK, s, c)).0,
        );
        all_are(&fins, XDP_REDIRECT, "the client's FIN");
        all_are(&answering_fins, XDP_REDIRECT, "the backend's FIN");
        let (last_acks, backend_acks) = in_step(
            n,
            |i| run(b, &from_client(i, ACK, c + 1, s + 1)).0,
            |i| run(b, &from_backend(i, conns[i].backend, ACK, s + 1, c + 1)).0,
        );
        all_are(&last_acks, XDP_REDIRECT, "the client's last ACK");
        all_are(&backend_acks, XDP_REDIRECT, "the backend's last ACK");
        assert_eq!((active(b).iter().sum::<u64>(), half_open(b).iter().sum::<u64>()), (0, 0), "all closed");

        // The client's next connection on the same ports (its TIME_WAIT
        // reused) while the old backend, not having seen the last ACK,
        // sends its FIN again: the new flow opens whatever that FIN meets.
        let isn = CLIENT_ISN.wrapping_add(1 << 20);
        let (syns, _) = in_step(
            n,
            |i| run(b, &Tcp::new(client(conns[i].port), VIP, SYN).seq(isn).frame()),
            |i| run(b, &from_backend(i, conns[i].backend, FIN | ACK, s, c + 1)).0,
        );
        all_are(&syns.iter().map(|(v, _)| *v).collect::<Vec<_>>(), XDP_REDIRECT, "the new SYN");
        let new_backend: Vec<SocketAddrV4> = syns.iter().map(|(_, out)| inspect(out).dst).collect();
        for i in 0..n {
            let answer = from_backend(i, new_backend[i], SYN | ACK, BACKEND_ISN, isn + 1);
            assert_eq!(run(b, &answer).0, XDP_REDIRECT, "the new SYN-ACK of port {}", conns[i].port);
        }
        assert_eq!(half_open(b).iter().sum::<u64>(), u64::from(FLOWS));

        // The client's ACK completing the handshake crosses the backend's
        // first data (a server that speaks first).
        let (acks, greetings) = in_step(
            n,
            |i| run(b, &from_client(i, ACK, isn + 1, s)),
            |i| run(b, &Tcp::new(new_backend[i], client(conns[i].port), ACK | PSH).seq(s).ack(isn + 1).payload(b"220 hello").frame()).0,
        );
        for i in 0..n {
            assert_eq!(acks[i].0, XDP_REDIRECT, "the new handshake's ACK of port {}", conns[i].port);
            assert_eq!(inspect(&acks[i].1).dst, new_backend[i], "port {}", conns[i].port);
        }
        all_are(&greetings, XDP_REDIRECT, "the backend's greeting");
        assert_eq!((active(b).iter().sum::<u64>(), half_open(b).iter().sum::<u64>()), (u64::from(FLOWS), 0));

        // The client resets each connection exactly while its backend sends:
        // every flow closes once, whichever comes first.
        let (resets, _) = in_step(
            n,
            |i| run(b, &Tcp::new(client(conns[i].port), VIP, RST).seq(isn + 1).frame()).0,
            |i| run(b, &Tcp::new(new_backend[i], client(conns[i].port), ACK | PSH).seq(s + 9).ack(isn + 1).payload(b"more").frame()).0,
        );
        all_are(&resets, XDP_REDIRECT, "the client's RST");
        assert_eq!((active(b).iter().sum::<u64>(), half_open(b).iter().sum::<u64>()), (0, 0));
        let (checked, differing) = b.verify_counts().unwrap();
        assert!(differing.is_empty(), "{differing:?} of {checked}");
    });
}

#[test]
fn the_old_connections_last_segments_never_touch_the_new_one_on_the_same_ports() {
    // One backend: the new connection goes where the old one went, on the
    // same ports, the case where an old segment could pass for a new one.
    with_table(&[1], 8192, |b| {
        on_cpu(0);
        let n = usize::from(FLOWS);
        let mut conns: Vec<Conn> = (0..FLOWS).map(|i| Conn::open(b, FIRST_PORT + i, CLIENT_ISN, BACKEND_ISN)).collect();
        for conn in &mut conns {
            conn.close(b);
        }
        let old = conns[0].clone();
        // The client's next connection on each port, while the backend
        // sends the old one's last segments: an RST exactly where the old
        // connection ended, or its FIN again.
        let isn = CLIENT_ISN.wrapping_add(1 << 20);
        let old_segment = |i: usize| {
            let flags = if i % 4 < 3 { RST } else { FIN | ACK };
            Tcp::new(old.backend, client(FIRST_PORT + i as u16), flags).seq(old.backend_seq - 1 + (flags & RST != 0) as u32).ack(old.client_seq).frame()
        };
        let (syns, _) = in_step(
            n,
            |i| run(b, &Tcp::new(client(FIRST_PORT + i as u16), VIP, SYN).seq(isn).frame()).0,
            |i| run(b, &old_segment(i)).0,
        );
        all_are(&syns, XDP_REDIRECT, "the new SYN");
        for i in 0..n {
            let port = FIRST_PORT + i as u16;
            let answer = Tcp::new(old.backend, client(port), SYN | ACK).seq(BACKEND_ISN).ack(isn + 1);
            assert_eq!(run(b, &answer.frame()).0, XDP_REDIRECT, "the new SYN-ACK of port {port}");
            let ack = Tcp::new(client(port), VIP, ACK).seq(isn + 1).ack(BACKEND_ISN + 1);
            assert_eq!(run(b, &ack.frame()).0, XDP_REDIRECT, "the new handshake's ACK of port {port}");
        }
        assert_eq!(active(b), vec![u64::from(FLOWS)], "every new connection established and counted");
        let (checked, differing) = b.verify_counts().unwrap();
        assert!(differing.is_empty(), "{differing:?} of {checked}");
    });
}

#[test]
fn in_full_nat_a_port_taken_over_while_the_backend_still_sends_on_it_serves_only_the_new_connection() {
    // One port of the balancer's: each connection takes it over from the
    // last, closed one, while the backend sends that one's last segments
    // on it (an RST exactly where it ended, or its FIN again).
    with_full_nat(&[1], [30000, 30000], |b| {
        let ours = SocketAddrV4::new(BALANCER, 30000);
        let backend = backend(0);
        // Connection k: from the client's port FIRST_PORT + k, each ISN
        // after the last, as TIME_WAIT wants of a new SYN on the same ports.
        let port = |k: usize| FIRST_PORT + k as u16;
        let isn = |k: usize| CLIENT_ISN + (k as u32) * 4096;
        // Opens connection k on the balancer's one port, checks every step,
        // and closes it again (the client's FIN first).
        let connect_and_close = |k: usize, syn_verdict: (u32, Vec<u8>)| {
            let (p, c) = (port(k), isn(k));
            assert_eq!(syn_verdict.0, XDP_REDIRECT, "the SYN of connection {k}");
            assert_eq!(inspect(&syn_verdict.1).src, ours, "connection {k} takes the port over");
            let (verdict, out) = run(b, &Tcp::new(backend, ours, SYN | ACK).seq(BACKEND_ISN).ack(c + 1).frame());
            assert_eq!(verdict, XDP_REDIRECT, "the SYN-ACK of connection {k}");
            assert_eq!(inspect(&out).dst, client(p), "the SYN-ACK of connection {k} goes to its client");
            for (frame, what) in [
                (Tcp::new(client(p), VIP, ACK).seq(c + 1).ack(BACKEND_ISN + 1).frame(), "ACK"),
                (Tcp::new(client(p), VIP, FIN | ACK).seq(c + 1).ack(BACKEND_ISN + 1).frame(), "client's FIN"),
                (Tcp::new(backend, ours, FIN | ACK).seq(BACKEND_ISN + 1).ack(c + 2).frame(), "backend's FIN"),
                (Tcp::new(client(p), VIP, ACK).seq(c + 2).ack(BACKEND_ISN + 2).frame(), "last ACK"),
            ] {
                assert_eq!(run(b, &frame).0, XDP_REDIRECT, "the {what} of connection {k}");
            }
        };
        on_cpu(0);
        connect_and_close(0, run(b, &Tcp::new(client(port(0)), VIP, SYN).seq(isn(0)).frame()));
        let last_segment = |k: usize| {
            if k % 4 < 3 {
                Tcp::new(backend, ours, RST).seq(BACKEND_ISN + 2).frame()
            } else {
                Tcp::new(backend, ours, FIN | ACK).seq(BACKEND_ISN + 1).ack(isn(k) + 2).frame()
            }
        };
        in_step(
            usize::from(FLOWS),
            |k| connect_and_close(k + 1, run(b, &Tcp::new(client(port(k + 1)), VIP, SYN).seq(isn(k + 1)).frame())),
            |k| run(b, &last_segment(k)).0,
        );
        assert_eq!((active(b), half_open(b)), (vec![0], vec![0]));
        let (checked, differing) = b.verify_counts().unwrap();
        assert!(differing.is_empty(), "{differing:?} of {checked}");
    });
}

#[test]
fn a_flow_aged_out_exactly_as_its_next_segment_goes_through_is_kept_or_that_segment_stopped() {
    // The agent's aging finds a flow idle and removes it, while the flow's
    // first segment in a while goes through on another CPU. Either the
    // segment counts (the flow is kept), or the flow goes and the segment
    // with it; never the segment through and the flow gone under it, so
    // that the connection's next segment finds nothing and the endpoint
    // answers it with an RST. The segment is the client's data, the
    // backend's, or the client's ACK completing a handshake (a flow aged
    // as half-open).
    with_table(&[1, 1, 1], 8192, |b| {
        on_cpu(0);
        let n = usize::from(FLOWS);
        let completes = |i: usize| i % 3 == 2;
        let conns: Vec<Conn> = (0..FLOWS)
            .map(|i| {
                let port = FIRST_PORT + i;
                if completes(usize::from(i)) {
                    let (_, conn) = Conn::syn(b, port, CLIENT_ISN);
                    let mut conn = conn.expect("the SYN opens a flow");
                    conn.answer(b, BACKEND_ISN);
                    conn
                } else {
                    Conn::open(b, port, CLIENT_ISN, BACKEND_ISN)
                }
            })
            .collect();
        // Idle past this (the program notes a flow's time at most every
        // quarter of a second, so a flow idle for it is always noted again).
        let idle_after = Timeouts { syn: 400_000_000, established: 400_000_000, ..Timeouts::default() };
        std::thread::sleep(std::time::Duration::from_millis(500));
        let segment = |i: usize| match i % 3 {
            0 => conns[i].client_segment(ACK | PSH, b"ping"),
            1 => conns[i].backend_segment(ACK | PSH, b"pong"),
            _ => conns[i].client_segment(ACK, b""),
        };
        let segments: Vec<Vec<u8>> = (0..n).map(|i| segment(i).frame()).collect();
        let keys: Vec<FlowKey> = conns.iter().map(|c| forward_key(c.port)).collect();
        let (sent, aged) = in_step(
            n,
            |i| run(b, &segments[i]).0,
            |i| b.datapath.expire(&keys[i..i + 1], &idle_after).unwrap(),
        );

        let mut kept = 0u64;
        for (i, conn) in conns.iter().enumerate() {
            let present = b.datapath.flow(&keys[i]).is_some();
            let port = conn.port;
            assert_eq!(present, aged[i] == 0, "port {port}: aged {}, entry there: {present}", aged[i]);
            let through = sent[i] == XDP_REDIRECT;
            if through {
                assert!(present, "port {port}: its segment went through and its flow was aged out under it");
            }
            if !present {
                continue;
            }
            kept += 1;
            let state = forward_entry(b, port).state;
            assert_eq!(state & FLOW_EXPIRED, 0, "port {port}: kept, and not left claimed");
            if completes(i) && through {
                // Established when its ACK went through. One stopped may
                // have established it first, or not: then the client's
                // next segment completes it.
                assert_eq!(state & FLOW_ESTABLISHED, FLOW_ESTABLISHED, "port {port}: its ACK went through");
            }
            // The next segments, both ways, still find it.
            let mut conn = conn.clone();
            if through {
                // What went through moved its sender's numbers on.
                match i % 3 {
                    0 => conn.client_seq += 4,
                    1 => conn.backend_seq += 4,
                    _ => {}
                }
            }
            assert_eq!(conn.send_client(b, ACK | PSH, b"again").0, XDP_REDIRECT, "port {port}");
            assert_eq!(conn.send_backend(b, ACK | PSH, b"again").0, XDP_REDIRECT, "port {port}");
        }
        let stopped = sent.iter().filter(|&&v| v != XDP_REDIRECT).count();
        eprintln!("{kept} of {FLOWS} flows kept, {stopped} segments stopped");
        // Both outcomes happened: the two CPUs' runs did overlap.
        assert!(kept > 0 && kept < u64::from(FLOWS), "{kept} of {FLOWS} flows kept");
        assert_eq!((active(b).iter().sum::<u64>(), half_open(b).iter().sum::<u64>()), (kept, 0), "the kept flows, and only they, counted");
        let (checked, differing) = b.verify_counts().unwrap();
        assert!(differing.is_empty(), "{differing:?} of {checked}");
    });
}
