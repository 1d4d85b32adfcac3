//! End to end: what crosses the balancer arrives intact, and what is not for
//! a service is left to the kernel.
use std::{
    io::{Read, Write},
    net::{SocketAddrV4, TcpListener, TcpStream},
    time::Duration,
};

use lb_tests::{
    lab::{start, LB_CLIENT_SIDE, VIP},
    servers::{echoes_20_mb_byte_exact, request, IO_TIMEOUT},
};

#[test]
fn a_20_mb_transfer_arrives_byte_exact_both_ways() {
    let running = start(&[1, 1, 1], "");
    let (lab, agent) = (&running.lab, &running.agent);

    let sent = echoes_20_mb_byte_exact(&lab.client, VIP, "through the balancer");

    let backend = agent
        .backends()
        .into_iter()
        .find(|b| b["total_connections"] == 1)
        .expect("one backend took the transfer");
    assert!(backend["bytes_in"].as_u64().unwrap() > sent as u64);
    assert!(backend["bytes_out"].as_u64().unwrap() > sent as u64);
}

#[test]
fn traffic_for_the_balancer_host_itself_is_untouched() {
    let running = start(&[1], "");
    let (lab, agent) = (&running.lab, &running.agent);

    // A TCP service of the host itself (think SSH) on the balancer's address.
    let own = SocketAddrV4::new(LB_CLIENT_SIDE, 2222);
    let listener = lab.lb.run(|| TcpListener::bind(own).unwrap());
    let server = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        conn.write_all(b"host\n").unwrap();
    });
    let mut conn = lab.client.run(|| TcpStream::connect_timeout(&own.into(), IO_TIMEOUT)).unwrap();
    conn.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).unwrap();
    assert_eq!(answer, "host\n");
    server.join().unwrap();

    // ICMP to the host, and ARP on the way.
    lab.client.exec(&format!("ping -c 2 -W 2 {LB_CLIENT_SIDE} >/dev/null"));
    // The VIP on a port with no service is not forwarded to a backend.
    let other = SocketAddrV4::new(*VIP.ip(), 81);
    let refused = lab.client.run(|| TcpStream::connect_timeout(&other.into(), Duration::from_secs(2)));
    assert!(refused.is_err(), "nothing serves {other}");

    assert_eq!(request(&lab.client, VIP).unwrap(), "b1", "the service still works");
    let status = agent.status();
    assert_eq!(status["services"][0]["total_connections"], 1, "only the VIP connection was balanced");
}

#[test]
fn connections_work_before_the_neighbours_are_resolved() {
    let running = start(&[1, 1, 1], "");
    let (lab, agent) = (&running.lab, &running.agent);
    for round in 0..3 {
        // The balancer forgets every MAC address: the first packets of each
        // flow go through the kernel, which resolves them.
        lab.lb.exec("ip neigh flush all");
        for i in 0..6 {
            request(&lab.client, VIP).unwrap_or_else(|e| panic!("round {round}, request {i}: {e}"));
        }
    }
    let status = agent.status();
    assert!(status["counters"]["no_neighbour"].as_u64().unwrap() > 0, "the unresolved path was taken");
    assert_eq!(status["services"][0]["total_connections"], 18);
}

#[test]
fn a_client_the_balancer_has_never_seen_connects_at_once_with_the_vip_local() {
    let running = start(&[1, 1], "");
    let (lab, agent) = (&running.lab, &running.agent);
    // The VIP as a local address of the balancer host, as keepalived sets it.
    lab.lb.exec(&format!("ip addr add {}/32 dev lo", VIP.ip()));
    for (i, host) in [77u8, 78, 79].into_iter().enumerate() {
        // A new client address, and no neighbour entry for it anywhere: it
        // sends its SYN without an ARP request the balancer could learn from.
        let address = std::net::Ipv4Addr::new(198, 18, 0, host);
        lab.client.exec(&format!(
            "ip addr add {address}/24 dev eth0 && ip route replace default via {LB_CLIENT_SIDE} src {address}"
        ));
        lab.lb.exec("ip neigh flush all");
        let began = std::time::Instant::now();
        let held = lb_tests::servers::connect_with(&lab.client, VIP, Duration::from_secs(3))
            .unwrap_or_else(|e| panic!("client {address}: {e}; {}", agent.status()["counters"]));
        assert!(
            began.elapsed() < Duration::from_millis(900),
            "client {i} ({address}) needed a SYN retransmission: {:?}",
            began.elapsed()
        );
        held.close().unwrap();
    }
}
