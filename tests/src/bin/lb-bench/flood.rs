//! A spoofed SYN flood at the VIP (`cargo xtask bench flood`): what real
//! clients see while it lasts, and how the flow table fills and empties, in
//! time. The lab of the end-to-end tests (four echo backends, the agent in
//! nat mode with its default timeouts and a table of `MAX_FLOWS`), four
//! connections held through it, SYNs from random sources (`hping3
//! --rand-source -S`, paced) from the client's namespace for `FLOOD`, and
//! `REAL_CLIENTS` real clients connecting one connection after another
//! throughout. The agent's status is read every `SAMPLE`.
use std::{
    fmt::Write as _,
    process::{Child, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use lb_tests::{
    lab::{start, VIP},
    servers::{connect, connect_with, Held},
};

const FLOOD: Duration = Duration::from_secs(8);
/// hping3's interval between SYNs (`-i u10`: at most 100,000 a second). Not
/// `--flood`: on two CPUs shared by the flood, the balancer and everything
/// else, an unpaced hping3 starves the balancer's receive queue of CPU, and
/// what the run would show is that, not the balancer.
const FLOOD_INTERVAL: &str = "u10";
/// A table the flood fills in a second or two (the default holds 262,144).
const MAX_FLOWS: u32 = 65_536;
const SAMPLE: Duration = Duration::from_millis(500);
/// How long a real client waits for its connection (and the backend's
/// greeting) before it counts as failed: past a SYN's first retransmission
/// (1 s), so a dropped SYN shows as a slow connection, not a failed one.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Real clients connecting throughout, each one connection after another.
const REAL_CLIENTS: usize = 8;
/// The agent's default `syn` timeout (half-open flows), and how long after
/// it the benchmark keeps watching (aging scans).
const SYN_TIMEOUT: Duration = Duration::from_secs(10);
const AFTER: Duration = Duration::from_secs(8);

struct Sample {
    at: Duration,
    flows: u64,
    half_open: u64,
    established: u64,
    new_flows: u64,
    table_full: u64,
    evicted: u64,
}

/// One real client's attempt: when it began, and how long it took to be
/// greeted by a backend (`None`: it failed).
struct Attempt {
    began: Duration,
    took: Option<Duration>,
}

pub fn run() -> String {
    let running = start(&[1, 1, 1, 1], &format!("aging_interval_ms = 200\nmax_flows = {MAX_FLOWS}\n"));
    let (lab, agent) = (&running.lab, &running.agent);
    let held: Vec<Held> = (0..4).map(|_| connect(&lab.client, VIP).expect("a held connection")).collect();

    let t0 = Instant::now();
    let stop = AtomicBool::new(false);
    let (attempts, samples) = std::thread::scope(|scope| {
        let real_clients: Vec<_> = (0..REAL_CLIENTS).map(|_| {
            let (stop, client) = (&stop, &lab.client);
            scope.spawn(move || {
                let mut attempts = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let began = t0.elapsed();
                    let took = connect_with(client, VIP, CONNECT_TIMEOUT).ok().map(|h| {
                        let took = t0.elapsed() - began;
                        let _ = h.close();
                        took
                    });
                    attempts.push(Attempt { began, took });
                    std::thread::sleep(Duration::from_millis(20));
                }
                attempts
            })
        }).collect();
        let mut flood = spoofed_syn_flood(&lab.client, FLOOD);
        let mut samples = Vec::new();
        let end = FLOOD + SYN_TIMEOUT + AFTER;
        while t0.elapsed() < end {
            let status = agent.status();
            let service = &status["services"][0];
            let count = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
            samples.push(Sample {
                at: t0.elapsed(),
                flows: count(&status["flow_table"]["flows"]),
                half_open: count(&service["half_open_connections"]),
                established: count(&service["active_connections"]),
                new_flows: count(&status["counters"]["new_flows"]),
                table_full: count(&status["counters"]["table_full"]),
                evicted: count(&status["counters"]["evicted_for_room"]),
            });
            // The next sample on the next multiple of SAMPLE.
            std::thread::sleep((SAMPLE * samples.len() as u32).saturating_sub(t0.elapsed()));
        }
        let _ = flood.wait();
        stop.store(true, Ordering::Relaxed);
        let mut attempts: Vec<Attempt> =
            real_clients.into_iter().flat_map(|c| c.join().expect("a real client's thread")).collect();
        attempts.sort_by_key(|a| a.began);
        (attempts, samples)
    });
    let untouched = held.iter().all(|h| h.round_trip(b"untouched").is_ok_and(|r| r == b"untouched"));
    report(&samples, &attempts, untouched, &agent.status())
}

/// SIGKILL: `lb-bench` blocks SIGTERM (to remove its namespaces on
/// Ctrl-C), and hping3 inherits the mask.
fn spoofed_syn_flood(client: &lb_tests::netns::Netns, length: Duration) -> Child {
    client
        .command("timeout")
        .args(["-s", "KILL", &length.as_secs().to_string(), "hping3", "-i", FLOOD_INTERVAL, "--rand-source", "-S", "-p", &VIP.port().to_string(), &VIP.ip().to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("hping3 (Debian package hping3; `cargo xtask setup` installs it)")
}

/// The share that connected and the 99th percentile of their times, of the
/// attempts that began in `from..to`.
fn clients(attempts: &[Attempt], from: Duration, to: Duration) -> (usize, usize, Option<Duration>) {
    let within: Vec<&Attempt> = attempts.iter().filter(|a| a.began >= from && a.began < to).collect();
    let mut times: Vec<Duration> = within.iter().filter_map(|a| a.took).collect();
    times.sort();
    let p99 = (!times.is_empty()).then(|| times[((times.len() - 1) as f64 * 0.99).round() as usize]);
    (times.len(), within.len(), p99)
}

fn ms(d: Option<Duration>) -> String {
    d.map_or("–".into(), |d| format!("{:.1}", d.as_secs_f64() * 1000.0))
}

fn report(samples: &[Sample], attempts: &[Attempt], untouched: bool, last: &serde_json::Value) -> String {
    let mut out = String::new();
    let capacity = last["flow_table"]["capacity"].as_u64().unwrap_or(0);
    let (during_ok, during_all, during_p99) = clients(attempts, Duration::ZERO, FLOOD);
    let (after_ok, after_all, after_p99) = clients(attempts, FLOOD, Duration::MAX);
    let back = samples.iter().find(|s| s.at >= FLOOD && s.half_open == 0).map(|s| s.at - FLOOD);
    let flood_flows = samples.iter().filter(|s| s.at <= FLOOD + SAMPLE).map(|s| s.new_flows).max().unwrap_or(0);
    let _ = writeln!(
        out,
        "`hping3 -i {FLOOD_INTERVAL} --rand-source -S` at the VIP for {} s from the client's namespace (about {:.0} SYNs a second, from the counters); the agent in nat mode \
         with its default timeouts (`syn` {} s), four echo backends, four connections held through the flood, and \
         {REAL_CLIENTS} real clients, each connecting one connection after another (each given {} s), from the \
         start to the end. The table holds {capacity} flows.\n",
        FLOOD.as_secs(),
        flood_flows as f64 / FLOOD.as_secs_f64(),
        SYN_TIMEOUT.as_secs(),
        CONNECT_TIMEOUT.as_secs()
    );
    let _ = writeln!(
        out,
        "- During the flood: real clients {during_ok}/{during_all} connected, p99 {} ms. After it: {after_ok}/{after_all}, p99 {} ms.",
        ms(during_p99),
        ms(after_p99)
    );
    let _ = writeln!(
        out,
        "- The flood opened about {flood_flows} flows; `table_full` {}, `evicted_for_room` {}.",
        last["counters"]["table_full"], last["counters"]["evicted_for_room"]
    );
    let _ = writeln!(
        out,
        "- No half-open flow counted any more {} after the flood ended; the held connections {}.\n",
        back.map_or("within the run".to_string(), |d| format!("{:.1} s", d.as_secs_f64())),
        if untouched { "answered afterwards, untouched" } else { "did NOT all answer afterwards" }
    );
    let _ = writeln!(
        out,
        "| t (s) | flood | table flows (last aging scan) | half-open (counted on backends) | established | new flows since last | table full since last | evicted for room since last | real clients connected | p99 connect ms |"
    );
    let _ = writeln!(out, "|---:|:---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut previous: Option<&Sample> = None;
    for s in samples {
        let (from, to) = (previous.map_or(Duration::ZERO, |p| p.at), s.at);
        let (ok, all, p99) = clients(attempts, from, to);
        let delta = |f: fn(&Sample) -> u64| previous.map_or(f(s), |p| f(s).saturating_sub(f(p)));
        let _ = writeln!(
            out,
            "| {:.1} | {} | {} | {} | {} | {} | {} | {} | {ok}/{all} | {} |",
            s.at.as_secs_f64(),
            if s.at < FLOOD { "on" } else { "" },
            s.flows,
            s.half_open,
            s.established,
            delta(|s| s.new_flows),
            delta(|s| s.table_full),
            delta(|s| s.evicted),
            ms(p99)
        );
        previous = Some(s);
    }
    out
}
