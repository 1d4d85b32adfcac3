//! End to end: real connections from client namespaces through the agent
//! and its XDP program to real servers, one module per feature; the lab and
//! its start-up in `lb_tests::lab`.
mod aging;
mod balancing;
mod cli;
mod dashboard;
mod dsr;
mod failover;
mod faults;
mod forwarding;
mod fullnat;
mod hostile;
mod import;
mod metrics;
mod path_mtu;
mod reload;
mod restart;
mod status_page;
mod trace;

use std::time::Duration;

use lb_tests::{
    lab::{backend_addr, Agent, Lab, VIP},
    servers::{connect, request},
};

/// What every forwarding mode must do with service "web" on weights
/// [1, 2, 1]: eight connections spread 2/4/2 (least connections per unit of
/// weight); a drained b1 takes no new flow, and `drain --wait` returns once
/// its clients have closed; enabled again, it takes flows. Leaves no
/// connection open.
fn weights_and_drain_as_in_nat(lab: &Lab, agent: &Agent) {
    let held: Vec<_> = (0..8).map(|_| connect(&lab.client, VIP).unwrap()).collect();
    let active: Vec<u64> = agent.active().into_iter().map(|(_, n)| n).collect();
    assert_eq!(active, [2, 4, 2]);

    let b1 = backend_addr(0).to_string();
    agent.cli(&["backend", "drain", "web", &b1]).unwrap();
    for _ in 0..6 {
        assert_ne!(request(&lab.client, VIP).unwrap(), "b1", "a draining backend takes no new flow");
    }
    for h in held.iter().filter(|h| h.backend == "b1") {
        h.close().unwrap();
    }
    agent.cli(&["backend", "drain", "web", &b1, "--wait", "--timeout", "5"]).expect("drained");
    for h in held.iter().filter(|h| h.backend != "b1") {
        h.close().unwrap();
    }
    agent.cli(&["backend", "enable", "web", &b1]).unwrap();
    agent.wait_for_counts_back_to_0(0, Duration::from_secs(5));
}

/// Least connections refill on three equal backends: of six connections,
/// b1's two end, and the next two go to b1. Returns the six held.
fn least_connections_refill(lab: &Lab, agent: &Agent) -> Vec<lb_tests::servers::Held> {
    let active = || agent.active().into_iter().map(|(_, n)| n).collect::<Vec<u64>>();
    let mut held: Vec<_> = (0..6).map(|_| connect(&lab.client, VIP).unwrap()).collect();
    assert_eq!(active(), [2, 2, 2]);
    for h in held.iter().filter(|h| h.backend == "b1") {
        h.close().unwrap();
    }
    held.retain(|h| h.backend != "b1");
    agent.wait_for("b1's count back to 0", Duration::from_secs(5), |s| {
        s["services"][0]["backends"][0]["active_connections"] == 0
    });
    held.extend((0..2).map(|_| connect(&lab.client, VIP).unwrap()));
    assert_eq!(held.iter().filter(|h| h.backend == "b1").count(), 2, "the two new flows refill b1");
    assert_eq!(active(), [2, 2, 2]);
    held
}
