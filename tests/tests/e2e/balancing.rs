//! End to end: real TCP connections from a client namespace, through the
//! XDP balancer, to real servers in backend namespaces — where they go and
//! what the counts say.
use std::{collections::BTreeMap, time::Duration};

use lb_tests::{
    lab::{start, Agent, VIP},
    servers::{connect, request, Held},
};

fn tally<'a>(names: impl IntoIterator<Item = &'a str>) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for n in names {
        *m.entry(n.to_string()).or_default() += 1;
    }
    m
}

/// Active connections per backend, in backend order.
fn active(agent: &Agent) -> Vec<u64> {
    agent.active().into_iter().map(|(_, n)| n).collect()
}

#[test]
fn short_connections_spread_over_every_backend_and_counts_return_to_zero() {
    let running = start(&[1, 1, 1], "");
    let (lab, agent) = (&running.lab, &running.agent);

    let answered: Vec<String> =
        (0..90).map(|i| request(&lab.client, VIP).unwrap_or_else(|e| panic!("request {i}: {e}"))).collect();
    let spread = tally(answered.iter().map(String::as_str));
    assert_eq!(spread.len(), 3, "every backend should answer: {spread:?}");
    assert!(spread.values().all(|&n| n >= 10), "a backend was starved: {spread:?}");

    agent.wait_for_counts_back_to_0(0, Duration::from_secs(5));
    let status = agent.status();
    let totals: Vec<u64> =
        agent.backends().iter().map(|b| b["total_connections"].as_u64().unwrap()).collect();
    assert_eq!(totals.iter().sum::<u64>(), 90);
    for (i, b) in ["b1", "b2", "b3"].iter().enumerate() {
        assert_eq!(totals[i] as usize, spread[*b], "{b}: the balancer's total matches what the client saw");
    }
    assert!(status["counters"]["verdict_redirect"].as_u64().unwrap() > 0, "forwarded by XDP");
    assert!(running.agent.stop().success(), "the agent exits cleanly on SIGTERM");
}

#[test]
fn held_connections_are_balanced_and_new_ones_go_to_the_least_loaded_backend() {
    let running = start(&[1, 1, 1], "");
    let (lab, agent) = (&running.lab, &running.agent);

    let mut held: Vec<Held> = (0..12).map(|_| connect(&lab.client, VIP).unwrap()).collect();
    assert_eq!(tally(held.iter().map(|h| h.backend.as_str())).values().collect::<Vec<_>>(), [&4, &4, &4]);
    assert_eq!(active(agent), [4, 4, 4], "lb status matches the held connections");

    // Close b2's connections: the next four all land there.
    held.retain(|h| h.backend != "b2" || h.close().map(|_| false).unwrap());
    agent.wait_for("b2 at 0", Duration::from_secs(5), |s| {
        s["services"][0]["backends"][1]["active_connections"] == 0
    });
    let next: Vec<Held> = (0..4).map(|_| connect(&lab.client, VIP).unwrap()).collect();
    assert!(next.iter().all(|h| h.backend == "b2"), "went to {:?}", next.iter().map(|h| &h.backend).collect::<Vec<_>>());
    assert_eq!(active(agent), [4, 4, 4]);

    // Close two of b3's: the next two go there, then the spread is even again.
    let mut closed = 0;
    held.retain(|h| {
        if h.backend == "b3" && closed < 2 {
            h.close().unwrap();
            closed += 1;
            return false;
        }
        true
    });
    agent.wait_for("b3 at 2", Duration::from_secs(5), |s| {
        s["services"][0]["backends"][2]["active_connections"] == 2
    });
    let more: Vec<Held> = (0..2).map(|_| connect(&lab.client, VIP).unwrap()).collect();
    assert!(more.iter().all(|h| h.backend == "b3"));

    for h in held.iter().chain(&next).chain(&more) {
        h.close().unwrap();
    }
    agent.wait_for_counts_back_to_0(0, Duration::from_secs(5));
}

#[test]
fn weights_shift_the_spread_as_configured() {
    let running = start(&[3, 2, 1], "");
    let (lab, agent) = (&running.lab, &running.agent);

    let held: Vec<Held> = (0..24).map(|_| connect(&lab.client, VIP).unwrap()).collect();
    let spread = tally(held.iter().map(|h| h.backend.as_str()));
    assert_eq!(spread["b1"], 12, "weight 3 of 6: {spread:?}");
    assert_eq!(spread["b2"], 8, "weight 2 of 6: {spread:?}");
    assert_eq!(spread["b3"], 4, "weight 1 of 6: {spread:?}");
    assert_eq!(active(agent), [12, 8, 4]);
    let weights: Vec<u64> = agent.backends().iter().map(|b| b["weight"].as_u64().unwrap()).collect();
    assert_eq!(weights, [3, 2, 1]);
    for h in &held {
        h.close().unwrap();
    }
    agent.wait_for_counts_back_to_0(0, Duration::from_secs(5));
}

#[test]
fn parallel_clients_on_both_cpus_leave_exact_counts() {
    let running = start(&[1, 1, 1], "");
    let (lab, agent) = (&running.lab, &running.agent);

    const THREADS: usize = 8;
    const PER_THREAD: usize = 60;
    let results: Vec<Vec<String>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..THREADS)
            .map(|_| {
                s.spawn(|| {
                    (0..PER_THREAD)
                        .map(|_| {
                            // Hold a little so connections overlap across CPUs.
                            let h = connect(&lab.client, VIP).expect("connect");
                            h.round_trip(b"ping").expect("echo");
                            h.close().expect("close");
                            h.backend
                        })
                        .collect()
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    let answered: usize = results.iter().map(Vec::len).sum();
    assert_eq!(answered, THREADS * PER_THREAD, "every connection succeeded");
    agent.wait_for_counts_back_to_0(0, Duration::from_secs(5));
    let total: u64 = agent.backends().iter().map(|b| b["total_connections"].as_u64().unwrap()).sum();
    assert_eq!(total as usize, THREADS * PER_THREAD);
    let closed = agent.status()["counters"]["closed_flows"].as_u64().unwrap();
    assert_eq!(closed as usize, THREADS * PER_THREAD, "each flow closed exactly once");
}
