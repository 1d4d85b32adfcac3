//! `cargo xtask demo`: a client, the balancer and three backends in network
//! namespaces; real TCP connections through the XDP program; where they went.
use std::{collections::BTreeMap, time::Duration};

use lb_tests::{
    lab::{Lab, VIP},
    servers::{connect, request, Held},
};

fn main() {
    lb_tests::netns::remove_on_interrupt();
    match std::env::args().nth(1).as_deref() {
        None | Some("balance") => balance(),
        Some("failover") => failover(),
        Some(other) => {
            eprintln!("unknown demo {other:?}: `balance` (the default) or `failover`");
            std::process::exit(2);
        }
    }
}

/// Least connections over three backends, short and held connections, in
/// full NAT: the drop-in case, where the backends need nothing of the
/// balancer (not even a route to the clients).
fn balance() {
    println!("== lab: client 198.18.0.2 -> [lb: XDP on cli, srv] -> backends 198.19.0.11-13, VIP {VIP}, full NAT");
    let lab = Lab::new(3);
    lab.backends_without_routes();
    println!("== the backends have no route to the client: they see the balancer's 198.19.0.1 (mode = \"fullnat\")");
    let _servers = lab.start_servers();
    let agent = lab.start_agent(&lab.config(&[1, 1, 1], "").replace("mode = \"nat\"", "mode = \"fullnat\""));
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
    println!("\n== lb conntrack: client <-> the balancer's port <-> backend");
    print!("{}", agent.cli(&["conntrack", "--state", "established"]).expect("lb conntrack"));
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

/// Load through the balancer while a backend is killed and restarted: when
/// the balancer noticed, where new connections went, what failed.
fn failover() {
    use lb_tests::{
        lab::backend_addr,
        servers::{load, Outcome},
    };
    use std::time::Instant;

    println!("== lab: client -> [lb: XDP] -> b1, b2, b3 (separate processes), TCP health checks every 0.25 s");
    let lab = Lab::new(3);
    let mut servers = lab.start_processes();
    let agent = lab.start_agent(&lab.config_full(&["weight = 1"; 3], "", "[service.health]\ntype = \"tcp\"\n"));
    let t0 = Instant::now();
    let at = |t: Instant| t.duration_since(t0).as_secs_f64();
    let b2 = backend_addr(1).to_string();
    let state = |agent: &lb_tests::lab::Agent| {
        let b = agent.backends().into_iter().find(|b| b["address"] == b2.as_str()).unwrap();
        (b["state"].as_str().unwrap().to_string(), b["reason"].as_str().unwrap().to_string())
    };
    println!("== 6 clients, each: connect, echo, hold 0.2 s, echo, close — for 7 s\n");
    let outcomes: Vec<Outcome> = std::thread::scope(|s| {
        let run = s.spawn(|| load(&lab.client, VIP, 6, Duration::from_secs(7), Duration::from_millis(200)));
        std::thread::sleep(Duration::from_millis(1500));
        let killed = Instant::now();
        servers[1].kill();
        println!("  t={:5.2}s  b2 killed (SIGKILL)", at(killed));
        let mut last = state(&agent);
        let mut restarted = None;
        while !run.is_finished() {
            let now = state(&agent);
            if now != last {
                println!("  t={:5.2}s  b2 is {}: {}", at(Instant::now()), now.0, now.1);
                last = now;
            }
            if restarted.is_none() && t0.elapsed() > Duration::from_millis(4000) {
                servers[1] = lab.start_process(1);
                restarted = Some(Instant::now());
                println!("  t={:5.2}s  b2 restarted", t0.elapsed().as_secs_f64());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        run.join().unwrap()
    });

    println!("\n== where new connections went, by when they started");
    println!("  {:>11}  {:>4} {:>4} {:>4}  {:>6}", "time", "b1", "b2", "b3", "failed");
    for slot in 0..14 {
        let (from, to) = (slot as f64 * 0.5, slot as f64 * 0.5 + 0.5);
        let here: Vec<_> = outcomes.iter().filter(|o| (from..to).contains(&at(o.started))).collect();
        if here.is_empty() {
            continue;
        }
        let n = |b: &str| here.iter().filter(|o| o.error.is_none() && o.backend.as_deref() == Some(b)).count();
        let failed = here.iter().filter(|o| o.error.is_some()).count();
        println!("  {from:4.1}-{to:4.1}s  {:>4} {:>4} {:>4}  {:>6}", n("b1"), n("b2"), n("b3"), failed);
    }
    let failed: Vec<_> = outcomes.iter().filter(|o| o.error.is_some()).collect();
    println!("\n== {} requests, {} failed", outcomes.len(), failed.len());
    for f in &failed {
        println!(
            "  started t={:.2}s on {}: {}",
            at(f.started),
            f.backend.as_deref().unwrap_or("(before the greeting)"),
            f.error.as_deref().unwrap_or("")
        );
    }
    if !failed.is_empty() {
        println!("  (the requests that were in flight on b2 when it died; nothing else failed)");
    }
    println!("\n== lb status");
    print!("{}", agent.cli(&["status"]).expect("lb status"));
    println!("\n== lb conntrack: client <-> the balancer's port <-> backend");
    print!("{}", agent.cli(&["conntrack", "--state", "established"]).expect("lb conntrack"));
    println!("\n== removing the lab");
}
