//! End to end: flows that go quiet are aged out of the table by the agent,
//! and their counts come down with them — never twice.
use std::time::Duration;

use lb_tests::{
    lab::{start, VIP},
    servers::{connect, request},
};

const SHORT_TIMEOUTS: &str = "aging_interval_ms = 200\n\
    [agent.timeouts]\nsyn = 1\nestablished = 1.5\nfin = 1\nclosed = 0.5\n";

#[test]
fn idle_flows_are_aged_out_and_their_counts_released() {
    let running = start(&[1, 1], SHORT_TIMEOUTS);
    let (lab, agent) = (&running.lab, &running.agent);

    let idle = connect(&lab.client, VIP).unwrap();
    let busy = connect(&lab.client, VIP).unwrap();
    assert_ne!(idle.backend, busy.backend);
    // Keep one flow busy past the established timeout; let the other sit.
    for _ in 0..8 {
        assert_eq!(busy.round_trip(b"keepalive").unwrap(), b"keepalive");
        std::thread::sleep(Duration::from_millis(300));
    }
    let flows: serde_json::Value =
        serde_json::from_str(&agent.cli(&["conntrack", "--json"]).unwrap()).unwrap();
    let flows = flows["flows"].as_array().unwrap();
    assert_eq!(flows.len(), 1, "only the busy flow is left: {flows:#?}");
    assert_eq!(flows[0]["state"], "established");
    let active: Vec<u64> = agent.active().into_iter().map(|(_, n)| n).collect();
    assert_eq!(active.iter().sum::<u64>(), 1, "the idle flow's count was released: {active:?}");

    // The busy flow closes normally, then its closed entry is aged too; the
    // count does not go down a second time.
    busy.close().unwrap();
    agent.wait_for("an empty table", Duration::from_secs(5), |s| s["flow_table"]["flows"] == 0);
    let status = agent.status();
    for b in status["services"][0]["backends"].as_array().unwrap() {
        assert_eq!(b["active_connections"], 0);
    }
    // Nothing is left that could break a new connection.
    assert!(request(&lab.client, VIP).is_ok());
    drop(idle);
}

#[test]
fn churn_with_aging_running_leaves_every_count_at_zero() {
    let running = start(&[1, 1, 1], SHORT_TIMEOUTS);
    let (lab, agent) = (&running.lab, &running.agent);
    // Many short connections while the agent ages closed flows under them,
    // with port reuse from the client's side.
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for _ in 0..150 {
                    request(&lab.client, VIP).expect("request");
                }
            });
        }
    });
    agent.wait_for("every count at 0 and an empty table", Duration::from_secs(5), |s| {
        s["flow_table"]["flows"] == 0
            && s["services"][0]["backends"].as_array().unwrap().iter().all(|b| b["active_connections"] == 0)
    });
    let status = agent.status();
    assert_eq!(status["services"][0]["total_connections"], 600);
}
