//! `cargo xtask demo`: a client, the balancer and three backends in network
//! namespaces; real TCP connections through the XDP program; where they went.
use std::{collections::BTreeMap, time::Duration};

use lb_tests::{
    lab::{Lab, VIP},
    servers::{connect, request, Held},
};

fn main() {
    println!("== lab: client 198.18.0.2 -> [lb: XDP on cli, srv] -> backends 198.19.0.11-13, VIP {VIP}");
    let lab = Lab::new(3);
    let _servers = lab.start_servers();
    let agent = lab.start_agent(&lab.config(&[1, 1, 1], ""));
    println!("== agent running in namespace {}", lab.lb.name);

    println!("\n== 300 short connections (connect, read the backend's name, close)");
    let mut spread = BTreeMap::<String, u32>::new();
    let mut failed = 0;
    for _ in 0..300 {
        match request(&lab.client, VIP) {
            Ok(name) => *spread.entry(name).or_default() += 1,
            Err(_) => failed += 1,
        }
    }
    for (name, n) in &spread {
        println!("  {name}: {n:>3} {}", "#".repeat(*n as usize / 4));
    }
    println!("  failed: {failed}");

    println!("\n== least connections: hold 12 connections open");
    let mut held: Vec<Held> = (0..12).map(|_| connect(&lab.client, VIP).expect("connect")).collect();
    print_active(&agent);
    println!("== close b1's connections, then open 4 more: least connections sends them all to b1");
    held.retain(|h| {
        if h.backend == "b1" {
            h.close().unwrap();
            false
        } else {
            true
        }
    });
    std::thread::sleep(Duration::from_millis(100));
    let more: Vec<Held> = (0..4).map(|_| connect(&lab.client, VIP).expect("connect")).collect();
    println!("  new connections went to: {:?}", more.iter().map(|h| h.backend.as_str()).collect::<Vec<_>>());
    print_active(&agent);

    println!("\n== lb status");
    print!("{}", agent.cli(&["status"]).expect("lb status"));
    for h in held.iter().chain(&more) {
        h.close().unwrap();
    }
    std::thread::sleep(Duration::from_millis(200));
    println!("\n== after closing everything");
    print_active(&agent);
    println!("\n== removing the lab");
}

fn print_active(agent: &lb_tests::lab::Agent) {
    for (address, active) in agent.active() {
        println!("  {address}: {active} active");
    }
}
