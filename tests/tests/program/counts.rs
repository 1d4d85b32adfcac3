//! Connection counts: established flows on a count every CPU shares,
//! half-open ones on the count of the CPU that opened them, whichever CPU
//! completes or ends their handshake.
use std::net::SocketAddrV4;

use lb::datapath::XDP_REDIRECT;
use lb_tests::{
    packet::{Tcp, CLIENT_ISN, RST},
    routed::{active, backend, client, complete, half_open, on_cpu, run, syn, with_balancer, VIP},
};

/// The client's RST that ends a half-open flow from `port`.
fn client_rst(b: &lb::reconcile::Balancer, port: u16) {
    assert_eq!(run(b, &Tcp::new(client(port), VIP, RST).seq(CLIENT_ISN + 1).frame()).0, XDP_REDIRECT);
}

#[test]
fn a_handshake_ended_on_another_cpu_comes_off_the_count_of_the_cpu_that_opened_it() {
    with_balancer(&[1, 1], |b| {
        // CPU 0 opens ten flows, half-open: five to each backend.
        on_cpu(0);
        let opened: Vec<(u16, SocketAddrV4)> = (0..10).map(|i| (45000 + i, syn(b, 45000 + i))).collect();
        let first = opened[0].1;
        let to_first: Vec<u16> = opened.iter().filter(|(_, to)| *to == first).map(|(port, _)| *port).collect();
        assert_eq!(to_first.len(), 5, "half-open flows spread: {opened:?}");
        let index = |to: SocketAddrV4| if to == backend(0) { 0 } else { 1 };
        let mut expected = [5, 5];

        // CPU 1 sees their clients' RSTs for the five to `first`.
        on_cpu(1);
        for &port in &to_first {
            client_rst(b, port);
        }
        expected[index(first)] = 0;
        assert_eq!(half_open(b), expected.to_vec());

        // Back on CPU 0, `first` has none half-open and the other five: the
        // next five SYNs all go to `first`. (Had CPU 1 taken them off its
        // own count, CPU 0 would still see five on each and spread them.)
        on_cpu(0);
        for port in 46000..46005 {
            assert_eq!(syn(b, port), first, "the SYN from port {port}");
        }
        expected[index(first)] = 5;
        assert_eq!(half_open(b), expected.to_vec());

        // One completes its handshake on CPU 1: established, on the shared
        // count, and off CPU 0's half-open one.
        on_cpu(1);
        complete(b, 46000, first);
        expected[index(first)] = 4;
        assert_eq!(half_open(b), expected.to_vec());
        let mut established = [0, 0];
        established[index(first)] = 1;
        assert_eq!(active(b), established.to_vec());

        // Everything else ends on CPU 1 too: every count is back to zero.
        let rest = opened.iter().filter(|(_, to)| *to != first).map(|(port, _)| *port).chain(46001..46005);
        for port in rest {
            client_rst(b, port);
        }
        let established_rst = Tcp::new(client(46000), VIP, RST).seq(CLIENT_ISN + 1);
        assert_eq!(run(b, &established_rst.frame()).0, XDP_REDIRECT);
        assert_eq!((active(b), half_open(b)), (vec![0, 0], vec![0, 0]));
        let (_, differing) = b.verify_counts().unwrap();
        assert!(differing.is_empty(), "{differing:?}");
        // And the same RST again, for a flow already closed, takes nothing off.
        run(b, &Tcp::new(client(45000), VIP, RST).seq(CLIENT_ISN + 1).frame());
        assert_eq!(half_open(b), vec![0, 0]);
    });
}
