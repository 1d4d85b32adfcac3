//! Failover in the XDP program, on crafted packets: refused and unanswered
//! handshakes, backup tiers, connection caps, and flows reset because their
//! backend died.
use lb::{
    api::Admin,
    config::BackendConfig,
    datapath::{Maps, XDP_DROP, XDP_PASS, XDP_REDIRECT},
};
use lb_common::Counter;
use lb_tests::{
    packet::{inspect, Tcp, ACK, BACKEND_ISN, CLIENT_ISN, PSH, RST, SYN},
    routed::{
        active, backend, backend_index, client, complete, counter, from_client, half_open, open, run, syn,
        with_balancer, VIP,
    },
};

fn passive(b: &lb::reconcile::Balancer, i: usize) -> (u64, u64) {
    let s = &b.status().unwrap().services[0].backends[i];
    (s.refused, s.unanswered)
}

#[test]
fn a_refused_handshake_is_hidden_and_the_retried_syn_goes_elsewhere() {
    with_balancer(&[1, 1], |b| {
        let first = syn(b, 50000);
        let i = backend_index(first);
        let (verdict, _) = run(b, &refusal(first, 50000).frame());
        assert_eq!(verdict, XDP_DROP, "the client does not see the refusal");
        assert_eq!(passive(b, i), (1, 0));
        assert_eq!(counter(b, Counter::RefusalSwallowed), 1);
        // The client's SYN retransmission moves to the other backend.
        let again = retransmit_syn(b, 50000);
        assert_ne!(again, first);
        assert_eq!(counter(b, Counter::SynRetried), 1);
        let mut expected = vec![0, 0];
        expected[backend_index(again)] = 1;
        assert_eq!(half_open(b), expected, "the count moved with the flow");
        // The refusing backend's late packets for it are no flow's any more:
        // the kernel gets them as they are, not rewritten.
        let (verdict, _) = run(b, &refusal(first, 50000).frame());
        assert_eq!(verdict, lb::datapath::XDP_PASS);
        let syn_ack = Tcp::new(again, client(50000), SYN | ACK).seq(BACKEND_ISN).ack(CLIENT_ISN + 1);
        let (_, out) = run(b, &syn_ack.frame());
        assert_eq!(inspect(&out).src, VIP);
    });
}

#[test]
fn a_refusal_reaches_the_client_when_no_other_backend_can_take_it() {
    with_balancer(&[1], |b| {
        let only = syn(b, 50001);
        let (verdict, out) = run(b, &refusal(only, 50001).frame());
        assert_eq!(verdict, XDP_REDIRECT, "fail fast: the client gets the RST");
        assert_eq!(inspect(&out).src, VIP);
        assert_eq!((active(b), half_open(b)), (vec![0], vec![0]));
        assert_eq!(passive(b, 0), (1, 0));
    });
}

#[test]
fn an_unanswered_syn_retransmission_moves_to_another_backend() {
    with_balancer(&[1, 1, 1], |b| {
        let first = syn(b, 50002);
        let second = retransmit_syn(b, 50002);
        assert_ne!(first, second, "moved away from the silent backend");
        assert_eq!(passive(b, backend_index(first)), (0, 1));
        assert_eq!(half_open(b).iter().sum::<u64>(), 1);
        // The silent backend answers after all, late: no flow's answer any
        // more. The client's ACK of it (its kernel would refuse that
        // SYN-ACK, but a forger need not) completes nothing.
        let late_isn = BACKEND_ISN ^ 0x5555_0000;
        let late = Tcp::new(first, client(50002), SYN | ACK).seq(late_isn).ack(CLIENT_ISN + 1);
        assert_eq!(run(b, &late.frame()).0, XDP_PASS, "to the kernel, which refuses it");
        let ack_of_late = from_client(50002, ACK).seq(CLIENT_ISN + 1).ack(late_isn + 1);
        assert_eq!(run(b, &ack_of_late.frame()).0, XDP_DROP);
        assert_eq!(active(b).iter().sum::<u64>(), 0);
        // Once answered, a retransmitted SYN stays.
        complete(b, 50002, second);
        assert_eq!(retransmit_syn(b, 50002), second);
        assert_eq!(counter(b, Counter::NewFlows), 2);
        assert_eq!(active(b).iter().sum::<u64>(), 1);
    });
    with_balancer(&[1], |b| {
        // Nowhere else to go: the SYN is retried on the same backend.
        let only = syn(b, 50003);
        assert_eq!(retransmit_syn(b, 50003), only);
        assert_eq!(half_open(b), vec![1]);
    });
}

#[test]
fn backups_take_new_flows_only_while_no_primary_can() {
    with_balancer(&[1, 1], |b| {
        let backup = BackendConfig { backup: true, ..BackendConfig::new(backend(2), 1) };
        b.add_backend("web", &backup).unwrap();
        for port in 0..10 {
            assert_ne!(open(b, 51000 + port), backend(2));
        }
        b.set_admin("web", backend(0), Admin::Disabled).unwrap();
        b.set_admin("web", backend(1), Admin::Draining).unwrap();
        assert_eq!(open(b, 51100), backend(2), "no primary can: the backup serves");
        b.set_admin("web", backend(1), Admin::Enabled).unwrap();
        assert_eq!(open(b, 51101), backend(1), "a primary is back: new flows go there");
    });
}

#[test]
fn max_conns_caps_a_backend_and_a_full_pool_drops_the_syn() {
    with_balancer(&[], |b| {
        for i in 0..2 {
            b.add_backend("web", &BackendConfig { max_conns: 2, ..BackendConfig::new(backend(i), 1) }).unwrap();
        }
        for port in 0..4 {
            open(b, 52000 + port);
        }
        assert_eq!(active(b), vec![2, 2]);
        let (verdict, _) = run(b, &Tcp::new(client(52100), VIP, SYN).frame());
        assert_eq!(verdict, XDP_DROP, "every backend is at its cap");
        assert_eq!(counter(b, Counter::NoBackend), 1);
        run(b, &from_client(52000, RST).frame());
        let (verdict, _) = run(b, &Tcp::new(client(52100), VIP, SYN).frame());
        assert_eq!(verdict, XDP_REDIRECT, "room again after a flow closed");
    });
}

#[test]
fn a_reset_flow_answers_the_client_with_a_valid_rst() {
    with_balancer(&[1], |b| {
        let be = open(b, 50010);
        let key = b.datapath.flows().into_iter().find(|(_, f)| f.direction == 0).unwrap().0;
        assert_eq!(b.datapath.reset_flows(&[key]).unwrap(), 1);
        assert_eq!(active(b), vec![0], "the count is released at once");
        assert_eq!(b.datapath.reset_flows(&[key]).unwrap(), 0, "and only once");

        let mut data = Tcp::new(client(50010), VIP, ACK | PSH).payload(b"GET / HTTP/1.1\r\n\r\n").frame();
        // The client acknowledges up to 0x11223344: the RST must carry it.
        let t = 14 + 20;
        data[t + 8..t + 12].copy_from_slice(&0x1122_3344u32.to_be_bytes());
        let (verdict, out) = run(b, &fix(data));
        assert_eq!(verdict, XDP_REDIRECT, "sent back where it came from");
        assert_eq!(out.len(), 54, "headers only");
        let rst = inspect(&out); // checksums verified from scratch
        assert_eq!((rst.src, rst.dst), (VIP, client(50010)));
        assert_eq!(rst.flags, RST);
        assert_eq!(u32::from_be_bytes(out[t + 4..t + 8].try_into().unwrap()), 0x1122_3344);
        assert_eq!(counter(b, Counter::ResetSent), 1);
        // The client's own RST is not answered: it goes on to the backend.
        let (_, out) = run(b, &from_client(50010, RST).frame());
        assert_eq!(inspect(&out).dst, be);
        assert_eq!(counter(b, Counter::ResetSent), 1);
    });
}

/// The backend's refusal of the client's SYN from `port`: an RST that
/// acknowledges it.
fn refusal(backend: std::net::SocketAddrV4, port: u16) -> Tcp {
    Tcp::new(backend, client(port), RST | ACK).seq(0).ack(CLIENT_ISN + 1)
}

/// The client retransmits its SYN after TCP's first retransmission timeout
/// (the data path counts a SYN as unanswered only past half a second).
fn retransmit_syn(b: &lb::reconcile::Balancer, port: u16) -> std::net::SocketAddrV4 {
    std::thread::sleep(std::time::Duration::from_millis(600));
    syn(b, port)
}

/// Recomputes the checksums of a frame a test edited.
fn fix(mut frame: Vec<u8>) -> Vec<u8> {
    let t = 14 + 20;
    frame[t + 16..t + 18].copy_from_slice(&[0, 0]);
    let c = lb_tests::packet::tcp_checksum(&frame);
    frame[t + 16..t + 18].copy_from_slice(&c.to_be_bytes());
    frame
}
