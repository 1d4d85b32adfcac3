//! End to end: the data path outlives its agent. A crashed or stopped agent
//! leaves flows forwarding; the next one takes over the pinned program, maps
//! and counts; `lb shutdown` really takes it off.
use std::time::Duration;

use lb_tests::{
    lab::{backend_addr, Agent, Lab, VIP},
    serial,
    servers::{connect, load, request, Held},
};

#[test]
fn kill_9_and_restart_under_load_loses_no_connection() {
    let _serial = serial();
    let lab = Lab::new(3);
    let _servers = lab.start_servers();
    let config = lab.config(&[1, 1, 1], "");
    let agent = lab.start_agent(&config);
    let held: Vec<_> = (0..6).map(|_| connect(&lab.client, VIP).unwrap()).collect();

    let (outcomes, agent) = std::thread::scope(|s| {
        let run = s.spawn(|| load(&lab.client, VIP, 4, Duration::from_secs(4), Duration::from_millis(200)));
        std::thread::sleep(Duration::from_secs(1));
        agent.kill();
        // No agent at all for a moment: the kernel keeps forwarding.
        std::thread::sleep(Duration::from_millis(700));
        let agent = lab.start_agent(&config);
        (run.join().unwrap(), agent)
    });
    let failed: Vec<_> = outcomes.iter().filter(|o| o.error.is_some()).collect();
    assert!(failed.is_empty(), "{} of {} requests failed: {failed:?}", failed.len(), outcomes.len());
    assert!(agent.log().contains("took over the running data path"), "{}", agent.log());

    held_connections_survived(&agent, &held);
}

/// After a take-over: the held connections still carry data, their counts
/// carried over (exactly they are active), and every count comes back to 0
/// when they close.
fn held_connections_survived(agent: &Agent, held: &[Held]) {
    for h in held {
        assert_eq!(h.round_trip(b"still here").unwrap(), b"still here", "held on {}", h.backend);
    }
    let count = held.len();
    agent.wait_for("the held connections' counts", Duration::from_secs(5), |s| {
        s["services"][0]["active_connections"] == count
    });
    for h in held {
        h.close().unwrap();
    }
    agent.wait_for("every count at 0", Duration::from_secs(5), |s| s["services"][0]["active_connections"] == 0);
}

#[test]
fn without_an_agent_flows_keep_going_until_lb_shutdown() {
    let _serial = serial();
    let lab = Lab::new(2);
    let _servers = lab.start_servers();
    let config = lab.config(&[1, 1], "");
    let agent = lab.start_agent(&config);
    let held = connect(&lab.client, VIP).unwrap();
    assert!(agent.stop().success());
    assert!(lab.pin_dir().join("links/cli").exists(), "the attachment is pinned");

    // Stopped agent: new and established connections still work.
    assert!(request(&lab.client, VIP).is_ok());
    assert_eq!(held.round_trip(b"no agent").unwrap(), b"no agent");

    let agent = lab.start_agent(&config);
    assert!(agent.log().contains("connection counts match the live flows"), "{}", agent.log());
    assert_eq!(held.round_trip(b"new agent").unwrap(), b"new agent");
    assert_eq!(agent.status()["services"][0]["active_connections"], 1);
    assert!(agent.cli(&["shutdown"]).unwrap().contains("off"));
    assert!(!lab.pin_dir().exists(), "nothing left pinned");
    let gone = lb_tests::servers::connect(&lab.client, VIP);
    assert!(gone.is_err(), "the balancer is off: the VIP is not served");
}

#[test]
fn what_the_operator_changed_survives_kill_9_and_a_restart() {
    let _serial = serial();
    let lab = Lab::new(3);
    let _servers = lab.start_servers();
    let config = lab.config(&[1, 1], "");
    let agent = lab.start_agent(&config);
    let (b1, b2, b3) = (backend_addr(0).to_string(), backend_addr(1).to_string(), backend_addr(2).to_string());
    agent.cli(&["backend", "disable", "web", &b2]).unwrap();
    agent.cli(&["backend", "weight", "web", &b1, "5"]).unwrap();
    agent.cli(&["backend", "add", "web", &b3]).unwrap();
    agent.kill();

    let agent = lab.start_agent(&config);
    let backends: Vec<(String, u64, String)> = agent
        .backends()
        .iter()
        .map(|b| (b["address"].as_str().unwrap().into(), b["weight"].as_u64().unwrap(), b["state"].as_str().unwrap().into()))
        .collect();
    assert_eq!(
        backends,
        [(b1.clone(), 5, "up".into()), (b2, 1, "disabled".into()), (b3, 1, "up".into())],
        "{}",
        agent.log()
    );
    for _ in 0..12 {
        assert_ne!(request(&lab.client, VIP).unwrap(), "b2", "a disabled backend stays out after a restart");
    }
    // An edited file wins over the CLI's changes, but the disable stays.
    std::fs::write(lab.dir.join("lb.toml"), lab.config(&[2, 1], "")).unwrap();
    agent.cli(&["reload"]).unwrap();
    let states: Vec<(u64, String)> = agent
        .backends()
        .iter()
        .filter(|b| b["state"] != "removing")
        .map(|b| (b["weight"].as_u64().unwrap(), b["state"].as_str().unwrap().into()))
        .collect();
    assert_eq!(states, [(2, "up".into()), (1, "disabled".into())]);
}

#[test]
fn with_the_agent_dead_closed_flows_make_room_and_connections_keep_working() {
    let _serial = serial();
    let lab = Lab::new(2);
    let _servers = lab.start_servers();
    // Room for 256 flows; nothing ages them while the agent is dead.
    let config = lab.config(&[1, 1], "max_flows = 256");
    let agent = lab.start_agent(&config);
    let held = connect(&lab.client, VIP).unwrap();
    agent.kill();
    for i in 0..1000 {
        request(&lab.client, VIP).unwrap_or_else(|e| panic!("connection {i} with no agent: {e}"));
    }
    assert_eq!(held.round_trip(b"kept").unwrap(), b"kept", "an established flow never makes room");
    let agent = lab.start_agent(&config);
    let status = agent.status();
    assert!(status["counters"]["evicted_for_room"].as_u64().unwrap() >= 700, "{}", status["counters"]);
    assert!(status["flow_table"]["flows"].as_u64().unwrap() <= 256);
    assert!(agent.log().contains("connection counts match the live flows"), "{}", agent.log());
    assert_eq!(status["services"][0]["active_connections"], 1, "the held connection, and only it");
}

#[test]
fn another_build_takes_over_the_running_data_path_without_losing_a_connection() {
    let _serial = serial();
    let lab = Lab::new(3);
    let _servers = lab.start_servers();
    let config = lab.config(&[1, 1, 1], "");
    let agent = lab.start_agent(&config);
    let held: Vec<_> = (0..6).map(|_| connect(&lab.client, VIP).unwrap()).collect();
    assert!(!agent.log().contains("+next"));
    agent.kill();

    // The log is shared by both agents: "+next" is the second build's.
    let agent = lab.start_agent_from(&lb_tests::lab::lb_next_binary(), &config);
    assert!(agent.log().contains("+next") && agent.log().contains("took over the running data path"), "{}", agent.log());
    assert!(agent.log().contains("connection counts match the live flows"), "{}", agent.log());
    held_connections_survived(&agent, &held);
}
