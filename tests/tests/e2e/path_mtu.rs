//! End to end: transfers across a link with a smaller MTU than the sender
//! believes its path has, as with a tunnel in the way. The balancer answers
//! a packet too big for its next hop with ICMP fragmentation needed quoting
//! the packet as sent, so the sender's path MTU discovery works through it as
//! through a router, in both directions.
use std::time::Duration;

use lb_tests::{
    lab::{Agent, Lab, LB_CLIENT_SIDE, LB_SERVER_SIDE, VIP},
    serial,
    servers::{connect, pseudo_random},
};

fn counter(agent: &Agent, name: &str) -> u64 {
    agent.status()["counters"][name].as_u64().unwrap()
}


/// The balancer's link on one side takes 1400-byte packets, while the host
/// on the other side is told (by the MSS its peer announces, 1460) that
/// 1500 fit: its full-sized segments must be answered with ICMP, or the
/// transfer stalls until it times out.
fn eight_mb_both_ways_with_a_narrow_link(narrow: Side) {
    let _serial = serial();
    let lab = Lab::new(1);
    match narrow {
        // Sending to the backends: the client's uploads are too big.
        Side::Backends => {
            lab.lb.exec("ip link set srv mtu 1400");
            lab.backends[0].exec(&format!(
                "ip link set eth0 mtu 1400 && ip route replace default via {LB_SERVER_SIDE} advmss 1460"
            ));
        }
        // Sending to the client: the backend's downloads are too big.
        Side::Client => {
            lab.lb.exec("ip link set cli mtu 1400");
            lab.client.exec(&format!(
                "ip link set eth0 mtu 1400 && ip route replace default via {LB_CLIENT_SIDE} advmss 1460"
            ));
        }
    }
    let _servers = lab.start_servers();
    let agent = lab.start_agent(&lab.config(&[1], ""));

    let data = pseudo_random(8 << 20);
    let held = connect(&lab.client, VIP).expect("connect through the balancer");
    let echoed = held.round_trip(&data).expect("8 MB through a narrow link and back, within the I/O timeout");
    assert!(echoed == data, "the echoed 8 MB differ from what was sent");
    held.close().unwrap();
    assert!(counter(&agent, "icmp_frag_needed_sent") >= 1, "the sender was told: {}", agent.status()["counters"]);
    agent.wait_for("counts back to zero", Duration::from_secs(5), |s| s["services"][0]["active_connections"] == 0);
}

enum Side {
    Backends,
    Client,
}

#[test]
fn an_upload_crosses_a_narrower_link_to_the_backends() {
    eight_mb_both_ways_with_a_narrow_link(Side::Backends);
}

#[test]
fn a_download_crosses_a_narrower_link_to_the_client() {
    eight_mb_both_ways_with_a_narrow_link(Side::Client);
}
