//! A new connection on the ports of one that just closed, while the old
//! one's last segments are still arriving on another CPU: what a client
//! with `tcp_tw_reuse` does under load on a many-core balancer. Two threads
//! drive BPF_PROG_TEST_RUN at once, each on its own CPU.
use std::sync::atomic::{AtomicBool, Ordering};

use lb::datapath::XDP_REDIRECT;
use lb_common::Counter;
use lb_tests::{
    packet::{inspect, ACK, FIN, PSH, RST},
    routed::{active, counter, half_open, run, with_balancer, Conn, VIP},
};

const PORTS: u16 = 150;
const FIRST_PORT: u16 = 61000;
const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n";
const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nb1";

fn client_isn(port: u16, round: u32) -> u32 {
    (port as u32).wrapping_mul(0x9e37_79b9).wrapping_add(round.wrapping_mul(0x4000_0000))
}

fn backend_isn(port: u16, round: u32) -> u32 {
    client_isn(port, round) ^ 0x5a5a_5a5a
}

/// One request and response on `conn`, every segment checked: forwarded,
/// rewritten, never turned into an RST.
fn exchange(b: &lb::reconcile::Balancer, conn: &mut Conn) {
    let (verdict, out) = conn.send_client(b, ACK | PSH, REQUEST);
    assert_eq!(verdict, XDP_REDIRECT, "request on port {}", conn.port);
    let seen = inspect(&out);
    assert_eq!((seen.dst, seen.flags, seen.payload.as_slice()), (conn.backend, ACK | PSH, REQUEST));
    let (verdict, out) = conn.send_backend(b, ACK | PSH, RESPONSE);
    assert_eq!(verdict, XDP_REDIRECT, "response on port {}", conn.port);
    let seen = inspect(&out);
    assert_eq!((seen.src, seen.flags), (VIP, ACK | PSH), "the client gets the response, not an RST");
}

#[test]
fn stray_segments_of_a_closed_connection_never_touch_the_next_one_on_its_ports() {
    with_balancer(&[1, 1, 1], |b| {
        // Round 0: every port's first connection, opened and closed.
        let mut finished = Vec::new();
        for i in 0..PORTS {
            let port = FIRST_PORT + i;
            let mut conn = Conn::open(b, port, client_isn(port, 0), backend_isn(port, 0));
            exchange(b, &mut conn);
            conn.close(b);
            finished.push(conn);
        }
        let done = AtomicBool::new(false);
        std::thread::scope(|s| {
            // The old connections' trailing segments, again and again: the
            // backend's FIN retransmitted, the client's last ACK, and the
            // client's RST exactly at its old sequence number.
            s.spawn(|| {
                while !done.load(Ordering::Relaxed) {
                    for old in &finished {
                        let fin = old.backend_segment(FIN | ACK, b"").seq(old.backend_seq.wrapping_sub(1));
                        run(b, &fin.frame());
                        run(b, &old.client_segment(ACK, b"").frame());
                        run(b, &old.client_segment(RST, b"").frame());
                    }
                }
            });
            // Round 1 on the same ports, meanwhile.
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                for i in 0..PORTS {
                    let port = FIRST_PORT + i;
                    let mut conn = Conn::open(b, port, client_isn(port, 1), backend_isn(port, 1));
                    exchange(b, &mut conn);
                    exchange(b, &mut conn);
                    conn.close(b);
                }
            }));
            done.store(true, Ordering::Relaxed);
            if let Err(panic) = result {
                std::panic::resume_unwind(panic);
            }
        });
        assert_eq!(counter(b, Counter::ResetSent), 0, "the balancer answered nobody with an RST");
        assert_eq!(counter(b, Counter::NewFlows), 2 * PORTS as u64);
        assert_eq!(counter(b, Counter::Established), 2 * PORTS as u64);
        assert_eq!(counter(b, Counter::ClosedFlows), 2 * PORTS as u64, "each flow closed once");
        assert_eq!((active(b), half_open(b)), (vec![0; 3], vec![0; 3]), "counts back to zero");
        assert!(counter(b, Counter::OutOfState) + counter(b, Counter::RstOutOfWindow) > 0, "the strays were seen");
        let (_, differing) = b.verify_counts().unwrap();
        assert!(differing.is_empty(), "{differing:?}");
    });
}
