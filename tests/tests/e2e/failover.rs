//! End to end: backends that die, drop SYNs, drain, come back — under load
//! from real clients, with what a user would count: failed requests, where
//! new connections went, how fast the balancer noticed.
use std::{
    process::Command,
    time::{Duration, Instant},
};

use lb_tests::{
    lab::{backend_addr, lb_binary, Agent, Lab, VIP},
    serial,
    servers::{connect, load, request_held, Outcome},
};

const TCP_CHECKS: &str = "[service.health]\ntype = \"tcp\"\n";

fn wait_state(agent: &Agent, i: usize, state: &str) -> Instant {
    let address = backend_addr(i).to_string();
    agent.wait_for(&format!("{address} {state}"), Duration::from_secs(10), |s| {
        s["services"][0]["backends"]
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["address"] == address.as_str() && b["state"] == state)
    });
    Instant::now()
}

/// Every failed request was in flight when the backend died, on that
/// backend (or before it could say which it was).
fn only_in_flight_failed(outcomes: &[Outcome], died_at: Instant, dead: &str) -> usize {
    let failed: Vec<_> = outcomes.iter().filter(|o| o.error.is_some()).collect();
    for f in &failed {
        assert!(f.started < died_at && f.finished >= died_at, "failed but not in flight at the death: {f:?}");
        assert!(f.backend.is_none() || f.backend.as_deref() == Some(dead), "failed on a live backend: {f:?}");
    }
    failed.len()
}

fn quick(lab: &Lab) -> Outcome {
    request_held(&lab.client, VIP, Duration::ZERO, Duration::from_secs(5))
}

/// `backend` answers some of 40 new connections. Ties are broken at random,
/// so 40 make missing it by chance about a one-in-ten-million event.
fn assert_takes_new_flows(lab: &Lab, backend: &str, why: &str) {
    let answered: Vec<_> = (0..40).map(|_| quick(lab).backend.unwrap()).collect();
    assert!(answered.iter().any(|b| b == backend), "{backend} takes new flows ({why}): {answered:?}");
}

#[test]
fn a_killed_backend_fails_only_its_in_flight_requests() {
    let _serial = serial();
    let lab = Lab::new(3);
    let mut servers = lab.start_processes();
    let agent = lab.start_agent(&lab.config_full(&["weight = 1"; 3], "", TCP_CHECKS));

    let (outcomes, killed_at, detected_at) = std::thread::scope(|s| {
        let run = s.spawn(|| load(&lab.client, VIP, 6, Duration::from_secs(5), Duration::from_millis(300)));
        std::thread::sleep(Duration::from_millis(1500));
        let killed_at = Instant::now();
        servers[1].kill();
        let detected_at = wait_state(&agent, 1, "down");
        (run.join().unwrap(), killed_at, detected_at)
    });
    let failed = only_in_flight_failed(&outcomes, killed_at, "b2");
    assert!(failed <= 6, "at most one in flight per client: {failed}");
    let after: Vec<_> = outcomes.iter().filter(|o| o.started > detected_at).collect();
    assert!(after.len() > 10, "the load went on");
    assert!(after.iter().all(|o| o.error.is_none() && o.backend.as_deref() != Some("b2")));
    let detection = detected_at - killed_at;
    assert!(detection < Duration::from_secs(2), "detected in {detection:?}");
    let b2 = agent.backend(backend_addr(1));
    assert!(b2["reason"].as_str().unwrap().contains("fail"), "{b2}");
    eprintln!(
        "killed b2: detected in {detection:?}; {} requests, {failed} failed (in flight on b2)",
        outcomes.len()
    );
}

#[test]
fn a_backend_whose_interface_goes_down_is_detected_and_comes_back() {
    let _serial = serial();
    let lab = Lab::new(3);
    let _servers = lab.start_processes();
    let agent = lab.start_agent(&lab.config_full(&["weight = 1"; 3], "", TCP_CHECKS));

    let (outcomes, down_at, detected_at) = std::thread::scope(|s| {
        let run = s.spawn(|| load(&lab.client, VIP, 6, Duration::from_secs(6), Duration::from_millis(300)));
        std::thread::sleep(Duration::from_millis(1500));
        let down_at = Instant::now();
        lab.backends[1].exec("ip link set eth0 down");
        let detected_at = wait_state(&agent, 1, "down");
        (run.join().unwrap(), down_at, detected_at)
    });
    let failed = only_in_flight_failed(&outcomes, down_at, "b2");
    assert!(failed <= 6);
    assert!(outcomes.iter().filter(|o| o.started > detected_at).all(|o| o.error.is_none()));
    let detection = detected_at - down_at;
    assert!(detection < Duration::from_secs(2), "detected in {detection:?}");

    // (Taking the link down removed b2's default route too.)
    lab.backends[1].exec("ip link set eth0 up && ip route add default via 198.19.0.1");
    wait_state(&agent, 1, "up");
    // The requests that were in flight on b2 were given up by their clients
    // and still count against b2 (their FINs never reached it) until b2,
    // back, retransmits and the clients answer with RST. Least connections
    // rightly holds new flows back from b2 until then.
    agent.wait_for("b2's abandoned flows to close", Duration::from_secs(20), |s| {
        s["services"][0]["backends"][1]["active_connections"] == 0
    });
    assert_takes_new_flows(&lab, "b2", "back after its interface came up");
}

#[test]
fn a_backend_that_drops_syns_does_not_fail_the_connection() {
    let _serial = serial();
    let lab = Lab::new(2);
    let _servers = lab.start_processes();
    // Passive checks off: this is about the SYN retry alone.
    let agent = lab.start_agent(&lab.config_full(&["max_fails = 0"; 2], "", ""));
    // b2's answers to the client vanish: its SYN-ACKs never arrive.
    lab.backends[1].exec("ip route add blackhole 198.18.0.2/32");

    let first = connect(&lab.client, VIP).expect("the first connection succeeds, retried if need be");
    assert_eq!(first.backend, "b1");
    // b1 holds one, b2 none: least connections sends the next SYN to b2.
    let started = Instant::now();
    let next = quick(&lab);
    assert_eq!(next.error, None);
    assert_eq!(next.backend.as_deref(), Some("b1"), "moved to the backend that answers");
    assert!(started.elapsed() >= Duration::from_millis(900), "after the client's SYN retransmission");
    let status = agent.status();
    assert!(status["counters"]["syn_retried"].as_u64().unwrap() >= 1);
    assert!(agent.backend(backend_addr(1))["unanswered"].as_u64().unwrap() >= 1);
    first.close().unwrap();
}

#[test]
fn a_backend_that_refuses_is_marked_down_passively_before_the_next_active_check() {
    let _serial = serial();
    let lab = Lab::new(2);
    // b2 runs nothing: it answers every SYN with RST.
    let _b1 = lab.start_process(0);
    let agent = lab.start_agent(&lab.config_full(
        &["weight = 1"; 2],
        "",
        "[service.health]\ntype = \"tcp\"\ninterval = 60\nfall = 3\n",
    ));
    let started = Instant::now();
    // One held connection ends on b1 whichever backend its SYN went to
    // first; with it open, least connections must send the next SYN to b2.
    let held = connect(&lab.client, VIP).expect("connect, retried if need be");
    assert_eq!(held.backend, "b1");
    for i in 0..10 {
        let o = quick(&lab);
        assert_eq!(o.error, None, "request {i}: the refusal is retried elsewhere");
        assert_eq!(o.backend.as_deref(), Some("b1"));
    }
    assert!(agent.backend(backend_addr(1))["refused"].as_u64().unwrap() >= 1, "b2 was tried and refused");
    let b2 = agent.backend(backend_addr(1));
    assert_eq!(b2["state"], "down");
    assert!(b2["reason"].as_str().unwrap().starts_with("passive"), "{b2}");
    assert!(started.elapsed() < Duration::from_secs(30), "well before a second active check");
    held.close().unwrap();
}

#[test]
fn draining_under_load_fails_nothing_and_wait_returns_when_the_last_flow_ends() {
    let _serial = serial();
    let lab = Lab::new(3);
    let _servers = lab.start_processes();
    let agent = lab.start_agent(&lab.config(&[1, 1, 1], ""));
    let b2 = backend_addr(1).to_string();

    let (outcomes, drain_started, drained_at) = std::thread::scope(|s| {
        let run = s.spawn(|| load(&lab.client, VIP, 6, Duration::from_secs(4), Duration::from_millis(400)));
        std::thread::sleep(Duration::from_secs(1));
        let drain_started = Instant::now();
        let out = Command::new(lb_binary())
            .args(["--socket", agent.socket.to_str().unwrap(), "backend", "drain", "web", &b2, "--wait", "--timeout", "20"])
            .output()
            .unwrap();
        let drained_at = Instant::now();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stdout).contains("0 active"));
        assert_eq!(agent.backend(backend_addr(1))["active_connections"], 0);
        (run.join().unwrap(), drain_started, drained_at)
    });
    assert!(outcomes.iter().all(|o| o.error.is_none()), "no request failed");
    let on_b2: Vec<_> = outcomes.iter().filter(|o| o.backend.as_deref() == Some("b2")).collect();
    assert!(on_b2.iter().any(|o| o.started < drain_started && o.finished > drain_started), "b2 had flows to drain");
    assert!(on_b2.iter().all(|o| o.started < drain_started), "no new flow went to b2");
    let last = on_b2.iter().map(|o| o.finished).max().unwrap();
    assert!(drained_at >= last, "--wait returned after the last flow ended");
    assert!(drained_at - last < Duration::from_secs(1), "and soon after: {:?}", drained_at - last);
    assert_eq!(agent.backend(backend_addr(1))["state"], "draining");

    agent.cli(&["backend", "enable", "web", &b2]).unwrap();
    assert_takes_new_flows(&lab, "b2", "enabled again");
}

#[test]
fn drain_wait_times_out_and_says_how_many_remain() {
    let _serial = serial();
    let lab = Lab::new(1);
    let _servers = lab.start_processes();
    let agent = lab.start_agent(&lab.config(&[1], ""));
    let held = connect(&lab.client, VIP).unwrap();
    let b1 = backend_addr(0).to_string();
    let err = agent.cli(&["backend", "drain", "web", &b1, "--wait", "--timeout", "0.5"]).unwrap_err();
    assert!(err.contains("timed out") && err.contains("1 connections remain"), "{err}");
    assert_eq!(held.round_trip(b"still served").unwrap(), b"still served");
    held.close().unwrap();
}

#[test]
fn backups_serve_only_while_every_primary_is_down() {
    let _serial = serial();
    let lab = Lab::new(3);
    let mut servers = lab.start_processes();
    let agent = lab.start_agent(&lab.config_full(&["weight = 1", "weight = 1", "backup = true"], "", TCP_CHECKS));
    let answered: Vec<_> = (0..15).map(|_| quick(&lab).backend.unwrap()).collect();
    assert!(!answered.iter().any(|b| b == "b3"), "the backup idles: {answered:?}");

    servers[0].kill();
    servers[1].kill();
    wait_state(&agent, 0, "down");
    wait_state(&agent, 1, "down");
    for _ in 0..6 {
        assert_eq!(quick(&lab).backend.as_deref(), Some("b3"));
    }

    servers[0] = lab.start_process(0);
    wait_state(&agent, 0, "up");
    for _ in 0..6 {
        assert_eq!(quick(&lab).backend.as_deref(), Some("b1"), "new flows go back to the primary");
    }
}

#[test]
fn http_checks_follow_the_health_endpoint() {
    let _serial = serial();
    let lab = Lab::new(2);
    let _servers = lab.start_processes();
    let agent = lab.start_agent(&lab.config_full(
        &["weight = 1"; 2],
        "",
        "[service.health]\ntype = \"http\"\nport = 81\npath = \"/health\"\n",
    ));
    std::fs::write(lab.unhealthy_flag(0), "").unwrap();
    wait_state(&agent, 0, "down");
    let b1 = agent.backend(backend_addr(0));
    assert!(b1["reason"].as_str().unwrap().contains("HTTP 503"), "{b1}");
    assert_eq!(b1["last_check"]["ok"], false);
    for _ in 0..6 {
        assert_eq!(quick(&lab).backend.as_deref(), Some("b2"));
    }
    std::fs::remove_file(lab.unhealthy_flag(0)).unwrap();
    wait_state(&agent, 0, "up");
}

#[test]
fn policy_reset_gives_clients_of_a_dead_backend_an_rst_at_once() {
    let _serial = serial();
    let lab = Lab::new(2);
    let _servers = lab.start_processes();
    let agent = lab.start_agent(&lab.config_full(
        &["weight = 1"; 2],
        "",
        "on_backend_down = \"reset\"\n[service.health]\ntype = \"tcp\"\n",
    ));
    let held: Vec<_> = (0..2).map(|_| connect(&lab.client, VIP).unwrap()).collect();
    let on_b2 = held.iter().find(|h| h.backend == "b2").expect("one connection each");
    let on_b1 = held.iter().find(|h| h.backend == "b1").unwrap();

    // b2 vanishes without a word (no RST of its own).
    lab.backends[1].exec("ip link set eth0 down");
    wait_state(&agent, 1, "down");
    let asked = Instant::now();
    let err = on_b2.round_trip(b"anyone?").expect_err("the flow was reset");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
    assert!(asked.elapsed() < Duration::from_secs(2), "an RST, not a timeout: {:?}", asked.elapsed());
    assert_eq!(on_b1.round_trip(b"fine").unwrap(), b"fine", "other backends' flows are untouched");
    assert_eq!(agent.backend(backend_addr(1))["active_connections"], 0);
    assert!(agent.status()["counters"]["reset_sent"].as_u64().unwrap() >= 1);
}

#[test]
fn max_conns_caps_a_backend() {
    let _serial = serial();
    let lab = Lab::new(2);
    let _servers = lab.start_processes();
    let agent = lab.start_agent(&lab.config_full(&["max_conns = 2", "weight = 1"], "", ""));
    let held: Vec<_> = (0..8).map(|_| connect(&lab.client, VIP).unwrap()).collect();
    let on = |n: &str| held.iter().filter(|h| h.backend == n).count();
    assert_eq!((on("b1"), on("b2")), (2, 6));
    assert_eq!(agent.backend(backend_addr(0))["active_connections"], 2);
}

#[test]
fn slow_start_ramps_a_new_backend_instead_of_flooding_it() {
    let _serial = serial();
    let lab = Lab::new(3);
    let _servers = lab.start_processes();
    let agent = lab.start_agent(&lab.config(&[1, 1], ""));
    let mut held: Vec<_> = (0..20).map(|_| connect(&lab.client, VIP).unwrap()).collect();

    let b3 = backend_addr(2).to_string();
    agent.cli(&["backend", "add", "web", &b3, "--slow-start", "3"]).unwrap();
    let early: Vec<_> = (0..8).map(|_| connect(&lab.client, VIP).unwrap()).collect();
    let to_b3 = early.iter().filter(|h| h.backend == "b3").count();
    assert!((1..=3).contains(&to_b3), "least connections alone would send all 8 to b3; slow start let {to_b3}");
    let status = agent.backend(backend_addr(2));
    assert_eq!(status["state"], "slow_start");
    assert!(status["slow_start_progress"].as_f64().unwrap() < 0.5);

    wait_state(&agent, 2, "up");
    let late: Vec<_> = (0..6).map(|_| connect(&lab.client, VIP).unwrap()).collect();
    assert!(late.iter().all(|h| h.backend == "b3"), "after the ramp it catches up");
    held.extend(early);
    held.extend(late);
    for h in &held {
        h.close().unwrap();
    }
}

/// Kills backend `i`, makes connections until the balancer has seen it
/// refuse one (a passive failure), and starts it again.
fn refuse_once(lab: &Lab, servers: &mut [lb_tests::servers::EchoProcess], agent: &Agent, i: usize) {
    servers[i].kill();
    let refused = |agent: &Agent| agent.backends()[i]["refused"].as_u64().unwrap();
    let before = refused(agent);
    for _ in 0..40 {
        let _ = quick(lab);
        if refused(agent) > before {
            break;
        }
    }
    assert!(refused(agent) > before, "backend {i} refused a connection");
    servers[i] = lab.start_process(i);
}

#[test]
fn a_passing_check_ends_a_passive_hold_at_once() {
    let _serial = serial();
    let lab = Lab::new(2);
    let mut servers = lab.start_processes();
    let http = "[service.health]\ntype = \"http\"\nport = 81\npath = \"/health\"\n";
    let agent = lab.start_agent(&lab.config_full(&["weight = 1"; 2], "", http));
    refuse_once(&lab, &mut servers, &agent, 1);
    let back = Instant::now();
    wait_state(&agent, 1, "up");
    assert!(back.elapsed() < Duration::from_secs(4), "up {:?} after it came back, not after the 10 s hold", back.elapsed());
}

#[test]
fn refusals_from_before_a_restart_are_not_counted_again() {
    let _serial = serial();
    let lab = Lab::new(2);
    let mut servers = lab.start_processes();
    // Passive checks only, holding a backend out for 3 s.
    let config = lab.config_full(&["fail_timeout = 3"; 2], "", "");
    let agent = lab.start_agent(&config);
    for i in 0..2 {
        refuse_once(&lab, &mut servers, &agent, i);
    }
    wait_state(&agent, 0, "up");
    wait_state(&agent, 1, "up");
    agent.kill();
    let agent = lab.start_agent(&config);
    // A few control ticks: a new agent that counted the old refusals
    // again would hold both out now.
    std::thread::sleep(Duration::from_millis(500));
    let states: Vec<String> = agent.backends().iter().map(|b| b["state"].as_str().unwrap().to_string()).collect();
    assert_eq!(states, ["up", "up"], "{}", agent.log());
    assert_takes_new_flows(&lab, "b1", "after the restart");
    assert_takes_new_flows(&lab, "b2", "after the restart");
}

#[test]
fn a_backend_down_before_a_restart_is_still_down_after_it() {
    let _serial = serial();
    let lab = Lab::new(2);
    let mut servers = lab.start_processes();
    let config = lab.config_full(&["weight = 1"; 2], "", TCP_CHECKS);
    let agent = lab.start_agent(&config);
    servers[1].kill();
    wait_state(&agent, 1, "down");
    agent.kill();
    let agent = lab.start_agent(&config);
    assert_eq!(agent.backends()[1]["state"], "down", "{}", agent.log());
    for _ in 0..10 {
        assert_eq!(quick(&lab).backend.as_deref(), Some("b1"), "no new connection tries the dead backend");
    }
}
