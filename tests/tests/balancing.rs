//! End to end: real TCP connections from a client namespace, through the
//! XDP balancer, to real servers in backend namespaces.
use std::{collections::BTreeMap, time::Duration};

use lb_tests::{
    lab::{Lab, VIP},
    serial,
    servers::{connect, request},
};

fn spread(counts: &[String]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for c in counts {
        *m.entry(c.clone()).or_default() += 1;
    }
    m
}

#[test]
fn short_connections_spread_over_every_backend_and_counts_return_to_zero() {
    let _serial = serial();
    let lab = Lab::new(3);
    let _servers = lab.start_servers();
    let agent = lab.start_agent(&lab.config(&[1, 1, 1], ""));

    let answered: Vec<String> =
        (0..60).map(|i| request(&lab.client, VIP).unwrap_or_else(|e| panic!("request {i}: {e}"))).collect();
    let spread = spread(&answered);
    assert_eq!(spread.len(), 3, "every backend should answer: {spread:?}");
    assert!(spread.values().all(|&n| n >= 5), "a backend was starved: {spread:?}");

    agent.wait_for("all counts back to 0", Duration::from_secs(5), |s| {
        s["services"][0]["backends"].as_array().unwrap().iter().all(|b| b["active_connections"] == 0)
    });
    let total: u64 = agent.backends().iter().map(|b| b["total_connections"].as_u64().unwrap()).sum();
    assert_eq!(total, 60);
    let held = connect(&lab.client, VIP).unwrap();
    held.close().unwrap();
    assert!(agent.stop().success());
}
