//! Full NAT end to end: backends with no route to the clients, reached
//! through the balancer's own address, two-arm (clients on one interface,
//! backends on the other) and one-arm (both on one interface); weights,
//! drain, a dead backend, least-connection refill, HTTP health and the reset
//! policy as in nat; and short connections that servers close first, the
//! backends' TIME_WAIT, not stalling on the balancer's ports.
use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{SocketAddrV4, TcpStream},
    time::{Duration, Instant},
};

use lb_tests::{
    lab::{backend_addr, Agent, Lab, LB_SERVER_SIDE, VIP},
    serial,
    servers::{connect, echoes_20_mb_byte_exact, request},
};

fn full_nat_config(lab: &Lab, interfaces: &str) -> String {
    weighted_full_nat_config(lab, interfaces, &[1, 1, 1])
}

fn weighted_full_nat_config(lab: &Lab, interfaces: &str, weights: &[u32]) -> String {
    full_nat(lab.config(weights, "")).replace("interfaces = [\"cli\", \"srv\"]", &format!("interfaces = {interfaces}"))
}

/// A lab config (`Lab::config`, `Lab::config_full`) in full NAT.
fn full_nat(config: String) -> String {
    config.replace("mode = \"nat\"", "mode = \"fullnat\"")
}


/// What every test of a mode checks: spread, least connections with held
/// connections, who the backends see, counts back to 0, a 20 MB transfer.
fn balances_as_nat_does(lab: &Lab, agent: &Agent) {
    let mut spread = BTreeMap::new();
    // Each closes before the next, so ties are broken at random: 90 of
    // them leave each backend 10 or more but with a chance of about 1 in
    // 3,000.
    for i in 0..90 {
        *spread.entry(request(&lab.client, VIP).unwrap_or_else(|e| panic!("request {i}: {e}"))).or_insert(0) += 1;
    }
    assert_eq!(spread.len(), 3, "{spread:?}");
    assert!(spread.values().all(|&n| n >= 10), "{spread:?}");

    let held: Vec<_> = (0..6).map(|_| connect(&lab.client, VIP).unwrap()).collect();
    let active: Vec<u64> = agent.active().into_iter().map(|(_, n)| n).collect();
    assert_eq!(active, [2, 2, 2]);
    // Each backend sees the balancer's address, a port of the range each.
    for (i, ns) in lab.backends.iter().enumerate() {
        let out = ns.exec("ss -Htn state established");
        let peers: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().last().map(str::to_string))
            .collect();
        assert_eq!(peers.len(), 2, "backend {}: {peers:?}", i + 1);
        for p in &peers {
            let (addr, port) = p.rsplit_once(':').unwrap();
            assert_eq!(addr, LB_SERVER_SIDE.to_string(), "backend {} sees {p}", i + 1);
            assert!((20000..=29999).contains(&port.parse::<u16>().unwrap()), "{p}");
        }
    }
    let conntrack: serde_json::Value = serde_json::from_str(&agent.cli(&["conntrack", "--json"]).unwrap()).unwrap();
    let flows = conntrack["flows"].as_array().unwrap();
    assert!(flows.iter().filter(|f| f["state"] == "established").all(|f| f["balancer"].as_str().is_some_and(|b| b.starts_with("198.19.0.1:"))));
    for h in &held {
        h.close().unwrap();
    }
    agent.wait_for_counts_back_to_0(0, Duration::from_secs(5));

    echoes_20_mb_byte_exact(&lab.client, VIP, "through full NAT");
}

#[test]
fn two_arm_full_nat_serves_backends_that_have_no_route_to_the_clients() {
    let _serial = serial();
    let lab = Lab::new(3);
    lab.backends_without_routes();
    let _servers = lab.start_servers();
    let config = full_nat_config(&lab, "[\"cli\", \"srv\"]");
    let agent = lab.start_agent(&config);
    balances_as_nat_does(&lab, &agent);

    // Killed and started again: held connections keep their ports and
    // their bytes flow; the counts are taken over exactly.
    let held: Vec<_> = (0..3).map(|_| connect(&lab.client, VIP).unwrap()).collect();
    agent.kill();
    let agent = lab.start_agent(&config);
    for h in &held {
        assert_eq!(h.round_trip(b"still there").unwrap(), b"still there");
    }
    let active: Vec<u64> = agent.active().into_iter().map(|(_, n)| n).collect();
    assert_eq!(active, [1, 1, 1]);
    for h in &held {
        h.close().unwrap();
    }
    request(&lab.client, VIP).expect("new connections after the restart");
    // The source ports are kept from the host's own sockets.
    let reserved = lab.lb.exec("cat /proc/sys/net/ipv4/ip_local_reserved_ports");
    assert!(String::from_utf8_lossy(&reserved.stdout).contains("20000-29999"));
}

#[test]
fn one_arm_full_nat_takes_clients_and_backends_on_one_interface() {
    let _serial = serial();
    let lab = Lab::new(3);
    lab.backends_without_routes();
    lab.one_arm_client();
    let _servers = lab.start_servers();
    let agent = lab.start_agent(&full_nat_config(&lab, "[\"srv\"]"));
    balances_as_nat_does(&lab, &agent);
    let conntrack: serde_json::Value = serde_json::from_str(&agent.cli(&["conntrack", "--json"]).unwrap()).unwrap();
    assert!(conntrack["flows"].as_array().unwrap().iter().all(|f| f["client"].as_str().unwrap().starts_with("198.19.0.2:")));
}

#[test]
fn weights_drain_and_a_dead_backend_work_in_full_nat_as_in_nat() {
    let _serial = serial();
    let lab = Lab::new(3);
    lab.backends_without_routes();
    let mut servers = lab.start_servers();
    let agent = lab.start_agent(&weighted_full_nat_config(&lab, "[\"cli\", \"srv\"]", &[1, 2, 1]));

    crate::weights_and_drain_as_in_nat(&lab, &agent);

    // b3 dies (its port refuses): its refusals come back to the balancer's
    // port, the SYN moves on, no request fails.
    drop(servers.remove(2));
    for i in 0..30 {
        let name = request(&lab.client, VIP).unwrap_or_else(|e| panic!("request {i} after b3 died: {e}"));
        assert_ne!(name, "b3");
    }
    agent.wait_for("b3 down", Duration::from_secs(5), |s| {
        s["services"][0]["backends"][2]["state"] == "down"
    });
}

#[test]
fn least_connections_refill_http_health_and_the_reset_policy_work_in_full_nat() {
    let _serial = serial();
    let lab = Lab::new(3);
    lab.backends_without_routes();
    let _servers = lab.start_processes();
    let config = full_nat(lab.config_full(
        &["weight = 1"; 3],
        "",
        "on_backend_down = \"reset\"\n[service.health]\ntype = \"http\"\nport = 81\npath = \"/health\"\n",
    ));
    let agent = lab.start_agent(&config);

    let held = crate::least_connections_refill(&lab, &agent);

    // b2's health endpoint fails: it goes down, its clients get an RST from
    // the VIP at once, new flows go elsewhere, the others' flows carry on.
    std::fs::write(lab.unhealthy_flag(1), "").unwrap();
    agent.wait_for("b2 down", Duration::from_secs(10), |s| s["services"][0]["backends"][1]["state"] == "down");
    for h in held.iter().filter(|h| h.backend == "b2") {
        let err = h.round_trip(b"anyone?").expect_err("the flow was reset");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
    }
    for h in held.iter().filter(|h| h.backend != "b2") {
        assert_eq!(h.round_trip(b"fine").unwrap(), b"fine");
    }
    for _ in 0..6 {
        assert_ne!(request(&lab.client, VIP).unwrap(), "b2");
    }
    std::fs::remove_file(lab.unhealthy_flag(1)).unwrap();
    agent.wait_for("b2 up", Duration::from_secs(10), |s| s["services"][0]["backends"][1]["state"] == "up");

    for h in held.iter().filter(|h| h.backend != "b2") {
        h.close().unwrap();
    }
    agent.wait_for_counts_back_to_0(0, Duration::from_secs(5));
}

#[test]
fn closed_flows_ports_go_to_new_flows_the_backends_time_wait_accepts_so_short_connections_do_not_stall() {
    let _serial = serial();
    let lab = Lab::new(3);
    lab.backends_without_routes();
    let _servers = lab.start_processes();
    // A second service on the backends' HTTP port (81), whose server closes
    // each connection first, so every backend keeps it in TIME_WAIT; 64
    // ports per backend, fewer than the connections.
    let closing = SocketAddrV4::new(*VIP.ip(), 81);
    let mut config = full_nat_config(&lab, "[\"cli\", \"srv\"]");
    config.push_str(&format!(
        "\n[[service]]\nname = \"closes-first\"\nvip = \"{closing}\"\nmode = \"fullnat\"\nsnat_ports = [30000, 30063]\n"
    ));
    for i in 0..3 {
        config.push_str(&format!("\n[[service.backend]]\naddress = \"{}:81\"\n", backend_addr(i).ip()));
    }
    let agent = lab.start_agent(&config);

    // 600 connections from ports the client does not reuse: most need a
    // port whose last flow the backend still has in TIME_WAIT. Held for the
    // whole TIME_WAIT, the 192 ports would run out after 192 connections,
    // and each SYN after would be dropped and wait a second for its retry.
    let took: Vec<Duration> = lab.client.run(|| {
        std::thread::scope(|s| {
            let workers: Vec<_> = (0..2)
                .map(|_| {
                    s.spawn(|| {
                        (0..300)
                            .map(|i| {
                                let started = Instant::now();
                                let mut c = TcpStream::connect_timeout(&closing.into(), Duration::from_secs(5))
                                    .unwrap_or_else(|e| panic!("connection {i}: {e}"));
                                c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                                c.write_all(b"GET /health HTTP/1.0\r\n\r\n").unwrap();
                                let mut answer = String::new();
                                c.read_to_string(&mut answer).unwrap();
                                assert!(answer.starts_with("HTTP/1.0 200"), "{answer:?}");
                                started.elapsed()
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            workers.into_iter().flat_map(|w| w.join().unwrap()).collect()
        })
    });
    // A port is handed out again only to a SYN its backend's TIME_WAIT
    // takes: about half of them, as timestamps are random per connection.
    // With every port held, a SYN can still find none; it is dropped and
    // counted, and its retry a second later gets through. Without the rule,
    // every connection after the 192nd would wait for that retry.
    let waited = took.iter().filter(|t| **t >= Duration::from_millis(900)).count();
    let status = agent.status();
    let exhausted = status["counters"]["snat_ports_exhausted"].as_u64().unwrap();
    assert!(waited <= 12, "{waited} of 600 connections waited for a SYN retry ({exhausted} SYNs found no port)");
    let second = &status["services"][1];
    assert_eq!(second["name"], "closes-first");
    let opened: u64 =
        second["backends"].as_array().unwrap().iter().map(|b| b["total_connections"].as_u64().unwrap_or(0)).sum();
    assert!(opened >= 600, "{second}");
    agent.wait_for_counts_back_to_0(1, Duration::from_secs(5));
}
