//! End to end: changing a running balancer from the CLI, and what the CLI
//! says when asked for something wrong.
use std::time::Duration;

use lb_tests::{
    lab::{start, backend_addr, lb_binary, Lab, VIP},
    serial,
    servers::{connect, request},
};

#[test]
fn backends_added_removed_and_reweighted_live_leave_established_flows_alone() {
    let _serial = serial();
    let lab = Lab::new(3);
    let _servers = lab.start_servers();
    // Start with b1 only.
    let agent = lab.start_agent(&lab.config(&[1], ""));
    let on_b1 = connect(&lab.client, VIP).unwrap();
    assert_eq!(on_b1.backend, "b1");

    let b2 = backend_addr(1).to_string();
    let b3 = backend_addr(2).to_string();
    agent.cli(&["backend", "add", "web", &b2, "--weight", "2"]).unwrap();
    agent.cli(&["backend", "add", "web", &b3]).unwrap();
    // b1 has one; the new backends take the next connections. Ties are
    // broken at random, so check what weighted least connections guarantees:
    // when a backend took its last flow it was (one of) the least loaded, so
    // (active - 1) / weight <= every other backend's active / weight.
    let new: Vec<_> = (0..5).map(|_| connect(&lab.client, VIP).unwrap()).collect();
    let on = |name: &str| new.iter().filter(|h| h.backend == name).count();
    assert!(on("b2") >= 2 && on("b3") >= 1, "the added backends took the new flows");
    let loads: Vec<(u64, u64)> = agent
        .backends()
        .iter()
        .map(|b| (b["active_connections"].as_u64().unwrap(), b["weight"].as_u64().unwrap()))
        .collect();
    assert_eq!(loads.iter().map(|l| l.0).sum::<u64>(), 6);
    let took = [on("b1"), on("b2"), on("b3")];
    for (i, &(a, w)) in loads.iter().enumerate().filter(|(i, _)| took[*i] > 0) {
        for &(other_a, other_w) in &loads {
            assert!((a - 1) * other_w <= other_a * w, "backend {i} took a flow it should not have: {loads:?}");
        }
    }

    // Remove b1: its established connection keeps working, no new ones go there.
    agent.cli(&["backend", "remove", "web", &backend_addr(0).to_string()]).unwrap();
    assert_eq!(on_b1.round_trip(b"still here").unwrap(), b"still here");
    for _ in 0..10 {
        assert_ne!(request(&lab.client, VIP).unwrap(), "b1");
    }
    let removing = agent.backends().into_iter().find(|b| b["address"] == backend_addr(0).to_string()).unwrap();
    assert_eq!(removing["state"], "removing");
    assert_eq!(removing["active_connections"], 1 + on("b1") as u64);
    on_b1.close().unwrap();
    for h in new.iter().filter(|h| h.backend == "b1") {
        h.close().unwrap();
    }
    agent.wait_for("b1 gone once its flow ended", Duration::from_secs(5), |s| {
        s["services"][0]["backends"].as_array().unwrap().len() == 2
    });

    // Weight 0: no new flows for b3, its established one continues.
    agent.cli(&["backend", "weight", "web", &b3, "0"]).unwrap();
    for _ in 0..10 {
        assert_eq!(request(&lab.client, VIP).unwrap(), "b2");
    }
    let on_b3 = new.iter().find(|h| h.backend == "b3").unwrap();
    assert_eq!(on_b3.round_trip(b"ok").unwrap(), b"ok");
    for h in new.iter().filter(|h| h.backend != "b1") {
        h.close().unwrap();
    }
}

#[test]
fn services_can_be_added_and_removed_live() {
    let _serial = serial();
    let lab = Lab::new(2);
    let _servers = lab.start_servers();
    let agent = lab.start_agent(&lab.config(&[1], ""));
    let api = "198.18.1.101:80";
    agent.cli(&["service", "add", "api", api]).unwrap();
    agent.cli(&["backend", "add", "api", &backend_addr(1).to_string()]).unwrap();
    let api_vip = api.parse().unwrap();
    assert_eq!(request(&lab.client, api_vip).unwrap(), "b2");
    assert_eq!(request(&lab.client, VIP).unwrap(), "b1");

    let held = connect(&lab.client, api_vip).unwrap();
    agent.cli(&["service", "remove", "api"]).unwrap();
    assert_eq!(held.round_trip(b"established flows finish").unwrap(), b"established flows finish");
    held.close().unwrap();
    assert!(connect(&lab.client, api_vip).is_err(), "no new flows for a removed service");
    let names: Vec<_> = agent.status()["services"].as_array().unwrap().iter().map(|s| s["name"].clone()).collect();
    assert_eq!(names, ["web"]);
}

#[test]
fn wrong_requests_are_refused_with_a_reason_and_change_nothing() {
    let _serial = serial();
    let lab = Lab::new(1);
    let agent = lab.start_agent(&lab.config(&[1], ""));
    let before = agent.status()["services"].clone();
    let b1 = backend_addr(0).to_string();
    let cases: &[(&[&str], &str)] = &[
        (&["backend", "add", "nope", "198.19.0.20:80"], "no service named \"nope\""),
        (&["backend", "add", "web", &b1], "already has backend"),
        (&["backend", "add", "web", "198.19.0.20:80", "--weight", "70000"], "weight must be"),
        (&["backend", "add", "web", "198.19.0.20"], "invalid value '198.19.0.20'"),
        (&["backend", "remove", "web", "198.19.0.99:80"], "has no backend 198.19.0.99:80"),
        (&["backend", "weight", "web", &b1, "-1"], "unexpected argument"),
        (&["service", "add", "web", "198.18.1.102:80"], "already exists"),
        (&["service", "add", "other", &VIP.to_string()], "already used by service"),
        (&["service", "add", "bad name", "198.18.1.103:80"], "must be 1-64 letters"),
        (&["service", "add", "noport", "198.18.1.104:0"], "needs a port"),
        (&["service", "remove", "nope"], "no service named"),
    ];
    for (args, expected) in cases {
        let err = agent.cli(args).expect_err(&format!("lb {args:?} should fail"));
        assert!(err.contains(expected), "lb {args:?}: expected {expected:?} in {err:?}");
    }
    assert_eq!(agent.status()["services"], before, "nothing changed");

    // No agent at all.
    let out = std::process::Command::new(lb_binary())
        .args(["--socket", "/nonexistent/lb.sock", "status"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is `lb agent` running?"));
}

#[test]
fn a_bad_config_file_is_refused_with_a_reason() {
    let _serial = serial();
    let dir = std::env::temp_dir().join(format!("lbt-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cases = [
        ("[[service]]\nname = \"web\"\nvip = \"198.18.0.100\"\n", "socket address"),
        ("[[service]]\nname = \"web\"\nvip = \"198.18.0.100:80\"\nscheduler = \"random\"\n", "least_conn"),
        ("[agent]\ninterfaces = [\"nonexistent0\"]\nsocket = \"SOCK\"\npin_dir = \"PINS\"\n", "nonexistent0"),
        ("[agent]\npin_dir = \"/tmp\"\nsocket = \"SOCK\"\n", "is not on a BPF filesystem"),
    ];
    let pins = std::path::PathBuf::from(format!("/sys/fs/bpf/lbt-config-{}", std::process::id()));
    for (text, expected) in cases {
        let path = dir.join("lb.toml");
        let text = text.replace("SOCK", &dir.join("s.sock").display().to_string());
        std::fs::write(&path, text.replace("PINS", &pins.display().to_string())).unwrap();
        let out = std::process::Command::new(lb_binary()).args(["agent", "--config"]).arg(&path).output().unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expected), "expected {expected:?} in {err}");
    }
    assert!(!pins.exists(), "an agent that failed to start leaves no pinned state");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn stats_watch_and_conntrack_filters_show_what_happened() {
    let running = start(&[1, 1, 1], "");
    let (lab, agent) = (&running.lab, &running.agent);

    // lb stats: the spread of the connections made while it watched.
    let spread: serde_json::Value = std::thread::scope(|s| {
        let stats = s.spawn(|| agent.cli(&["stats", "--interval", "1.5", "--json"]).unwrap());
        std::thread::sleep(Duration::from_millis(300));
        for _ in 0..30 {
            request(&lab.client, VIP).unwrap();
        }
        serde_json::from_str(&stats.join().unwrap()).unwrap()
    });
    let rows = spread.as_array().unwrap();
    assert_eq!(rows.len(), 3);
    assert_eq!(rows.iter().map(|r| r["new_connections"].as_u64().unwrap()).sum::<u64>(), 30);
    assert!(rows.iter().all(|r| r["new_connections"].as_u64().unwrap() > 0), "{spread:#}");

    // lb conntrack with filters.
    let held: Vec<_> = (0..3).map(|_| connect(&lab.client, VIP).unwrap()).collect();
    let b1 = backend_addr(0).to_string();
    let out: serde_json::Value = serde_json::from_str(
        &agent.cli(&["conntrack", "--json", "--backend", &b1, "--state", "established"]).unwrap(),
    )
    .unwrap();
    let flows = out["flows"].as_array().unwrap();
    assert_eq!(flows.len(), 1, "one held connection per backend: {out:#}");
    assert_eq!(flows[0]["backend"], b1.as_str());
    assert_eq!(out["table"]["capacity"], 262_144);
    let table = agent.cli(&["conntrack", "--client", "198.18.0.2", "--state", "established"]).unwrap();
    assert!(table.contains("3 flows") && table.contains("of 262144 flows"), "{table}");

    // lb watch: bounded with --count.
    let watch = agent.cli(&["watch", "--interval", "0.2", "--count", "2"]).unwrap();
    assert_eq!(watch.matches("BACKEND").count(), 2);
    for h in &held {
        h.close().unwrap();
    }

    // New commands refuse bad input too.
    for (args, expected) in [
        (&["backend", "drain", "nope", "198.19.0.11:80"][..], "no service named"),
        (&["backend", "enable", "web", "198.19.0.99:80"][..], "has no backend"),
        (&["conntrack", "--bogus"][..], "unexpected argument"),
    ] {
        let err = agent.cli(args).unwrap_err();
        assert!(err.contains(expected), "lb {args:?}: {err}");
    }
}
