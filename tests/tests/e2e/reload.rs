//! End to end: `lb reload` and SIGHUP apply a new config file as a
//! difference, under load, and refuse an invalid one.
use std::time::Duration;

use lb_tests::{
    lab::{backend_addr, Lab, VIP},
    serial,
    servers::{connect, load, request},
};

#[test]
fn reload_changes_weights_and_backends_under_load_without_failures() {
    let _serial = serial();
    let lab = Lab::new(3);
    let _servers = lab.start_servers();
    let agent = lab.start_agent(&lab.config(&[1, 1], ""));
    let held: Vec<_> = (0..4).map(|_| connect(&lab.client, VIP).unwrap()).collect();

    let (outcomes, reloaded) = std::thread::scope(|s| {
        let run = s.spawn(|| load(&lab.client, VIP, 4, Duration::from_secs(3), Duration::from_millis(200)));
        std::thread::sleep(Duration::from_secs(1));
        // b1 weight 3, b2 removed, b3 added.
        let new = format!(
            "{}\n[[service.backend]]\naddress = \"{}\"\nweight = 3\n\n[[service.backend]]\naddress = \"{}\"\n",
            lab.config_full(&[], "", ""),
            backend_addr(0),
            backend_addr(2)
        );
        std::fs::write(lab.dir.join("lb.toml"), new).unwrap();
        let out = agent.cli(&["reload"]).expect("reload");
        (run.join().unwrap(), out)
    });
    assert!(reloaded.contains("removed backend 198.19.0.12:80"), "{reloaded}");
    assert!(reloaded.contains("added backend 198.19.0.13:80"), "{reloaded}");
    assert!(reloaded.contains("changed backend 198.19.0.11:80"), "{reloaded}");
    assert!(outcomes.iter().all(|o| o.error.is_none()), "no request failed");
    for h in &held {
        assert_eq!(h.round_trip(b"kept").unwrap(), b"kept", "established on {} kept", h.backend);
    }
    for _ in 0..12 {
        assert_ne!(request(&lab.client, VIP).unwrap(), "b2", "a removed backend takes no new flows");
    }
    let weights: Vec<(String, u64)> = agent
        .backends()
        .iter()
        .filter(|b| b["state"] != "removing")
        .map(|b| (b["address"].as_str().unwrap().to_string(), b["weight"].as_u64().unwrap()))
        .collect();
    assert_eq!(weights, [(backend_addr(0).to_string(), 3), (backend_addr(2).to_string(), 1)]);
    for h in &held {
        h.close().unwrap();
    }
}

#[test]
fn an_invalid_file_is_refused_and_the_running_config_stays() {
    let _serial = serial();
    let lab = Lab::new(2);
    let _servers = lab.start_servers();
    let config = lab.config(&[1, 1], "");
    let agent = lab.start_agent(&config);
    let before = agent.status()["services"].clone();
    std::fs::write(lab.dir.join("lb.toml"), config.replace("weight = 1", "weight = -5")).unwrap();
    let err = agent.cli(&["reload"]).unwrap_err();
    assert!(err.contains("not a valid config") && err.contains("running config is unchanged"), "{err}");
    assert_eq!(agent.status()["services"], before);
    assert!(request(&lab.client, VIP).is_ok());
}

#[test]
fn sighup_reloads() {
    let _serial = serial();
    let lab = Lab::new(2);
    let _servers = lab.start_servers();
    let agent = lab.start_agent(&lab.config(&[1], ""));
    std::fs::write(lab.dir.join("lb.toml"), lab.config(&[1, 1], "")).unwrap();
    agent.signal(libc::SIGHUP);
    agent.wait_for("the added backend", Duration::from_secs(5), |s| {
        s["services"][0]["backends"].as_array().unwrap().len() == 2
    });
}
