//! DSR end to end, on the balancer's segment (`tunnel = "none"`) and
//! through IPIP with `lb decap` on the backends: backends set up as README
//! says (the VIP on `lo`), answering the clients directly — they have no
//! route through the balancer, and the balancer sees none of their
//! packets. Spread, least connections and refill, weights, drain, a dead
//! backend, kill -9 restart, a 20 MB transfer byte-exact; and how far the
//! counts, kept from the clients' side alone, drift from the truth.
use std::{collections::BTreeMap, time::Duration};

use lb_tests::{
    lab::{lb_binary, Agent, Lab, ONE_ARM_CLIENT, VIP},
    serial,
    servers::{connect, echoes_20_mb_byte_exact, request},
};

/// Clients and backends on one segment, the backends with no route but
/// that segment's: their answers go straight to the client, or nowhere.
fn dsr_lab(tunnel: bool) -> Lab {
    let lab = Lab::new(3);
    lab.backends_without_routes();
    lab.one_arm_client();
    lab.dsr_backends(tunnel);
    lab
}

/// A lab config (`Lab::config_full`) in DSR through `tunnel`, on the one
/// interface.
fn dsr_config(lab: &Lab, tunnel: &str, backends: &[&str], agent_extra: &str, service_extra: &str) -> String {
    lab.config_full(backends, agent_extra, service_extra)
        .replace("mode = \"nat\"", &format!("mode = \"dsr\"\ntunnel = \"{tunnel}\""))
        .replace("interfaces = [\"cli\", \"srv\"]", "interfaces = [\"srv\"]")
}

fn counts(agent: &Agent) -> Vec<u64> {
    agent.active().into_iter().map(|(_, n)| n).collect()
}

/// Connections each backend holds as established, as its own kernel says:
/// the truth the balancer's counts approximate.
fn truth(lab: &Lab) -> Vec<u64> {
    lab.backends.iter().map(|ns| String::from_utf8_lossy(&ns.exec("ss -Htn state established sport = :80").stdout).lines().count() as u64).collect()
}

fn decap_status(lab: &Lab, i: usize) -> serde_json::Value {
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", lab.backends[i].name))
        .arg(lb_binary())
        .args(["decap", "status", "eth0", "--json", "--pin-dir"])
        .arg(lab.pin_dir().join(format!("decap-b{}", i + 1)))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn balances_with_direct_replies(tunnel: &str) {
    let _serial = serial();
    let lab = dsr_lab(tunnel == "ipip");
    let _servers = lab.start_servers_on_all_addresses();
    let agent = lab.start_agent(&dsr_config(&lab, tunnel, &["weight = 1"; 3], "", ""));

    // Each closes before the next, so ties are broken at random: 90 of
    // them leave each backend 10 or more but with a chance of about 1 in
    // 3,000.
    let mut spread = BTreeMap::new();
    for i in 0..90 {
        *spread.entry(request(&lab.client, VIP).unwrap_or_else(|e| panic!("request {i}: {e}"))).or_insert(0) += 1;
    }
    assert_eq!(spread.len(), 3, "{spread:?}");
    assert!(spread.values().all(|&n| n >= 10), "{spread:?}");

    let shown = agent.cli(&["status"]).unwrap();
    let mode = if tunnel == "ipip" { "least_conn/dsr over ipip " } else { "least_conn/dsr " };
    assert!(shown.contains(mode), "{shown}");

    let held = crate::least_connections_refill(&lab, &agent);
    assert_eq!(truth(&lab), [2, 2, 2]);
    // Each backend holds them on the VIP, with the client's own address.
    for (i, ns) in lab.backends.iter().enumerate() {
        let out = String::from_utf8_lossy(&ns.exec("ss -Htn state established sport = :80").stdout).into_owned();
        for line in out.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(fields[fields.len() - 2], VIP.to_string(), "backend {}: {line}", i + 1);
            assert!(fields[fields.len() - 1].starts_with(&format!("{ONE_ARM_CLIENT}:")), "backend {}: {line}", i + 1);
        }
    }
    for h in &held {
        h.close().unwrap();
    }
    agent.wait_for_counts_back_to_0(0, Duration::from_secs(5));

    echoes_20_mb_byte_exact(&lab.client, VIP, "in DSR");

    // The balancer forwarded the clients' packets and saw none of the
    // backends'.
    let backends = agent.backends();
    assert!(backends.iter().map(|b| b["packets_in"].as_u64().unwrap()).sum::<u64>() > 10_000);
    assert_eq!(backends.iter().map(|b| b["packets_out"].as_u64().unwrap()).sum::<u64>(), 0, "{backends:?}");
    if tunnel == "ipip" {
        // Full-size segments do not fit the tunnel: the client was told its
        // MTU, and the transfer went on in smaller ones.
        assert!(agent.status()["counters"]["icmp_frag_needed_sent"].as_u64().unwrap() >= 1);
        let decapsulated: u64 = (0..3).map(|i| decap_status(&lab, i)["decapsulated"].as_u64().unwrap()).sum();
        assert!(decapsulated > 10_000, "{decapsulated}");
    }
}

#[test]
fn dsr_on_the_balancers_segment_balances_and_the_backends_answer_the_clients_directly() {
    balances_with_direct_replies("none");
}

#[test]
fn dsr_through_ipip_balances_and_the_backends_decapsulate_and_answer_directly() {
    balances_with_direct_replies("ipip");
}

fn weights_drain_failover_and_restart(tunnel: &str) {
    let _serial = serial();
    let lab = dsr_lab(tunnel == "ipip");
    let mut servers = lab.start_servers_on_all_addresses();
    let checks = "[service.health]\ntype = \"tcp\"\ninterval = 0.2\n";
    let config = dsr_config(&lab, tunnel, &["weight = 1", "weight = 2", "weight = 1"], "", checks);
    let agent = lab.start_agent(&config);

    crate::weights_and_drain_as_in_nat(&lab, &agent);

    // Killed and started again: held connections go on, the counts are
    // taken over exactly.
    let held: Vec<_> = (0..4).map(|_| connect(&lab.client, VIP).unwrap()).collect();
    let before = counts(&agent);
    assert_eq!(before.iter().sum::<u64>(), 4);
    agent.kill();
    let agent = lab.start_agent(&config);
    for h in &held {
        assert_eq!(h.round_trip(b"still there").unwrap(), b"still there");
    }
    assert_eq!(counts(&agent), before);
    for h in &held {
        h.close().unwrap();
    }

    // b3 dies. The balancer cannot see it refuse (the refusal goes to the
    // client), so the health checks take it out; after that no request
    // fails or goes to it.
    drop(servers.remove(2));
    agent.wait_for("b3 down", Duration::from_secs(5), |s| s["services"][0]["backends"][2]["state"] == "down");
    for i in 0..30 {
        let name = request(&lab.client, VIP).unwrap_or_else(|e| panic!("request {i} after b3 died: {e}"));
        assert_ne!(name, "b3");
    }
    agent.wait_for_counts_back_to_0(0, Duration::from_secs(5));
}

#[test]
fn weights_drain_a_dead_backend_and_a_restart_work_in_dsr() {
    weights_drain_failover_and_restart("none");
}

#[test]
fn weights_drain_a_dead_backend_and_a_restart_work_in_dsr_through_ipip() {
    weights_drain_failover_and_restart("ipip");
}

/// The balancer counts a DSR flow from the client's SYN and ACK until the
/// client's FIN or RST. What it cannot see is the backend ending a flow:
/// a backend that dies resets its clients directly, and a client that
/// sends nothing more stays counted until the established idle timeout.
#[test]
fn dsr_counts_follow_the_clients_drift_when_a_backend_resets_and_come_back_to_0() {
    let _serial = serial();
    let lab = dsr_lab(false);
    let mut processes = lab.start_processes_on_all_addresses();
    let agent = lab.start_agent(&dsr_config(&lab, "none", &["weight = 1"; 3], "[agent.timeouts]\nestablished = 4\n", ""));

    assert!(agent.log().contains("DSR without [service.health]"), "the agent advises health checks");
    let held: Vec<_> = (0..6).map(|_| connect(&lab.client, VIP).unwrap()).collect();
    assert_eq!(counts(&agent), [2, 2, 2]);
    assert_eq!(truth(&lab), counts(&agent), "no drift while clients and backends both hold on");

    // b1's server is killed: its kernel resets b1's clients as they send,
    // straight to them. The balancer still counts both: a drift of 2.
    processes[0].kill();
    for h in held.iter().filter(|h| h.backend == "b1") {
        assert!(h.round_trip(b"anyone?").is_err(), "reset by the backend");
    }
    assert_eq!(truth(&lab)[0], 0);
    assert_eq!(counts(&agent)[0], 2, "the resets went to the clients, not through the balancer");
    // The others close; b1's flows are gone after the idle timeout (4 s
    // here, 900 by default).
    for h in held.iter().filter(|h| h.backend != "b1") {
        h.close().unwrap();
    }
    agent.wait_for_counts_back_to_0(0, Duration::from_secs(15));
}

#[test]
fn lb_decap_says_what_is_wrong_and_leaves_nothing_behind() {
    let _serial = serial();
    let lab = Lab::new(1);
    let pins = lab.pin_dir().join("decap-bad");
    let decap = |args: &[&str]| {
        std::process::Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", lab.backends[0].name))
            .arg(lb_binary())
            .arg("decap")
            .args(args)
            .arg("--pin-dir")
            .arg(&pins)
            .output()
            .unwrap()
    };
    let out = decap(&["attach", "nosuch0", "--vip", &VIP.ip().to_string()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nosuch0"), "{err}");
    assert!(!pins.join("nosuch0").exists(), "no pins left of a failed attach");
    let out = decap(&["attach", "eth0"]);
    assert!(!out.status.success(), "a VIP is required");
    let out = decap(&["status", "eth0"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("run `lb decap attach` first"));
    // Attached, then detached: nothing stays.
    assert!(decap(&["attach", "eth0", "--vip", &VIP.ip().to_string()]).status.success());
    assert!(lab.backends[0].exec("ip link show eth0").stdout.windows(3).any(|w| w == b"xdp"), "attached");
    let out = decap(&["detach", "eth0"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("taken off eth0"));
    assert!(!lab.backends[0].exec("ip link show eth0").stdout.windows(3).any(|w| w == b"xdp"), "detached");
    assert!(!pins.join("eth0").exists());
}
