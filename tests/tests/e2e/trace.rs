//! `lb trace`: the data path's own account of new flows (which backend, its
//! load, how many were eligible) and drops (why), filtered and rate-limited,
//! on for as long as `lb trace` runs.
use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

use lb_tests::{
    lab::{backend_addr, lb_binary, start, Running, VIP},
    servers::{connect_with, request},
};

fn start_trace(running: &Running, args: &[&str]) -> Child {
    let turned_on = || running.agent.log().matches("trace on").count();
    let before = turned_on();
    let child = Command::new(lb_binary())
        .arg("--socket")
        .arg(running.lab.socket())
        .arg("trace")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start lb trace");
    // Its first request switches the data path's trace on.
    // (This trace's: an earlier one's line is in the log too.)
    running.agent.wait_for("the trace on", Duration::from_secs(5), |_| turned_on() > before);
    child
}

fn finish(child: Child) -> (String, String) {
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "lb trace failed: {}", String::from_utf8_lossy(&out.stderr));
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn new_flows_and_dropped_syns_are_traced_with_their_backend_and_reason() {
    let running = start(&[1, 1, 1], "");
    let (lab, agent) = (&running.lab, &running.agent);
    let trace = start_trace(&running, &["--service", "web", "--duration", "4"]);
    let answered: Vec<String> = (0..6).map(|_| request(&lab.client, VIP).unwrap()).collect();
    for i in 0..3 {
        agent.cli(&["backend", "disable", "web", &backend_addr(i).to_string()]).unwrap();
    }
    assert!(connect_with(&lab.client, VIP, Duration::from_millis(500)).is_err(), "no backend can take it");
    let (out, err) = finish(trace);

    let opened: Vec<&str> = out.lines().filter(|l| l.starts_with("new flow ")).collect();
    assert_eq!(opened.len(), 6, "one line per new flow:\n{out}");
    for (line, name) in opened.iter().zip(&answered) {
        let i: usize = name.trim_start_matches('b').parse::<usize>().unwrap() - 1;
        assert!(line.contains(&format!("-> {VIP} (service web): ")), "{line}");
        assert!(line.contains(&format!("backend {} (slot ", backend_addr(i))), "{line} was answered by {name}");
        assert!(line.contains("of 3 eligible"), "{line}");
    }
    // Each with the loads it was chosen among.
    let eligible = out.lines().filter(|l| l.starts_with("  eligible 198.19.0.")).count();
    assert_eq!(eligible, 6 * 3, "{out}");
    assert!(out.lines().any(|l| l.starts_with("SYN 198.18.0.2:") && l.ends_with(&format!("-> {VIP} dropped: no_backend"))), "{out}");
    assert!(err.contains("lines left out for the rate limit"), "{err}");

    // Off when lb trace ends: new flows log nothing more.
    agent.wait_for("the trace off", Duration::from_secs(2), |_| agent.log().contains("trace off"));
    agent.cli(&["backend", "enable", "web", &backend_addr(0).to_string()]).unwrap();
    let logged = agent.log().matches("new flow ").count();
    request(&lab.client, VIP).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(agent.log().matches("new flow ").count(), logged, "the data path still traces");
}

#[test]
fn a_trace_keeps_to_its_client_and_its_rate() {
    let running = start(&[1, 1], "");
    let lab = &running.lab;
    // Another client's flows only: ours are not shown.
    let trace = start_trace(&running, &["--client", "198.18.0.99", "--duration", "1.5"]);
    for _ in 0..5 {
        request(&lab.client, VIP).unwrap();
    }
    let (out, _) = finish(trace);
    assert!(!out.contains("new flow"), "{out}");

    // Two lines per CPU and second at most: 30 quick connections show far
    // fewer, and the rest are counted. The trace outlasts the connections
    // (they take longer on a loaded machine); the budget allows two lines
    // per CPU for each second they straddle.
    let trace = start_trace(&running, &["--rate", "2", "--duration", "5"]);
    let began = std::time::Instant::now();
    for _ in 0..30 {
        request(&lab.client, VIP).unwrap();
    }
    let seconds_straddled = began.elapsed().as_secs() as usize + 2;
    assert!(seconds_straddled < 5, "30 connections took {:?}: the trace ended first", began.elapsed());
    let (out, err) = finish(trace);
    eprintln!("{out}{err}");
    let shown = out.lines().filter(|l| l.starts_with("new flow ")).count();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert!(shown >= 1 && shown <= 2 * seconds_straddled * cpus, "{shown} lines shown:\n{out}");
    let left_out: u64 = err
        .lines()
        .find(|l| l.contains("left out for the rate limit"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no count of lines left out: {err}"));
    assert!(left_out >= (30 - shown) as u64, "{err}");
}
