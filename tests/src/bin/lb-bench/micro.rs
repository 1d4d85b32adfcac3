//! The XDP program's cost per packet (`cargo xtask bench micro`), measured by
//! the kernel through BPF_PROG_TEST_RUN, next to a program that only passes
//! the packet (the floor).
//!
//! Rewriting paths change the packet, and with `repeat` > 1 the kernel would
//! feed each run the previous run's output; so every case is timed one run per
//! call (each call starts from the original frame), and reported as the median
//! over many calls. The floor is timed the same way, so the difference is the
//! program's own cost. Each case checks every run took the path it measures.
use std::net::{Ipv4Addr, SocketAddrV4};

use lb::{
    reconcile::Balancer,
    config::Scheduler,
    datapath::{Maps, XDP_PASS, XDP_REDIRECT},
};
use lb_common::{Counter, TraceConfig, DIR_FORWARD, FLOW_BACKEND_FIN, MAX_BACKENDS, MAX_SERVICES, TRACE_ANY_SERVICE};

use crate::targets::Check;
use lb_tests::{
    packet::{linux_syn_options, timestamp_options, Tcp, ACK, BACKEND_ISN, CLIENT_ISN, FIN, SYN},
    routed::{balancer, balancer_scheduling, from_backend, from_client, on_cpu, routed_host, CLIENT, VIP},
};

const CALLS: usize = 20_000;

struct Row {
    case: String,
    median: f64,
    p10: f64,
    p90: f64,
    /// Of the middle 90 %: the kernel's clock steps by about 10 ns, so the
    /// median moves in those steps while the mean resolves a few ns.
    mean: f64,
    /// The floor's mean, timed call for call alongside.
    floor: f64,
}

/// Times every frame through the balancer, each call next to a call of the
/// floor program, so both see the same moment of a noisy machine.
fn time(b: &Balancer, frames: &[Vec<u8>], verdict: u32) -> Row {
    time_each(frames, verdict, |frame, floor| b.datapath.time_packet(frame, 1, floor).expect("BPF_PROG_TEST_RUN"))
}

/// The same through `run(frame, floor)`: (verdict, ns).
fn time_each(frames: &[Vec<u8>], verdict: u32, mut run: impl FnMut(&[u8], bool) -> (u32, f64)) -> Row {
    let floor_frame = not_for_us();
    let mut samples = Vec::with_capacity(frames.len());
    let mut floor = Vec::with_capacity(frames.len());
    for f in frames {
        floor.push(run(&floor_frame, true).1);
        let (got, ns) = run(f, false);
        assert_eq!(got, verdict, "a run took another path than the one measured");
        samples.push(ns);
    }
    let (floor, _, _) = summary(floor);
    let (mean, median, (p10, p90)) = summary(samples);
    Row { case: String::new(), median, p10, p90, mean, floor }
}

/// Mean of the middle 90 %, median, and p10–p90.
fn summary(mut samples: Vec<f64>) -> (f64, f64, (f64, f64)) {
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
    let middle = &samples[samples.len() / 20..samples.len() - samples.len() / 20];
    (middle.iter().sum::<f64>() / middle.len() as f64, at(0.5), (at(0.1), at(0.9)))
}

/// A packet for no service: the host's own traffic.
fn not_for_us() -> Vec<u8> {
    let host = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 1), 22);
    Tcp::new(SocketAddrV4::new(CLIENT, 40000), host, ACK).frame()
}

/// A distinct client for the i-th new flow.
fn client(i: usize) -> SocketAddrV4 {
    let base = u32::from(Ipv4Addr::new(198, 18, 2, 0));
    SocketAddrV4::new(Ipv4Addr::from(base + (i / 50_000) as u32), 10_000 + (i % 50_000) as u16)
}

/// Opens a flow for each client of `syns(0, CALLS)` (not timed) and returns
/// the backend each went to.
fn open_flows(b: &Balancer) -> Vec<SocketAddrV4> {
    syns(0, CALLS).iter().map(|syn| lb_tests::packet::inspect(&b.datapath.run_packet(syn).unwrap().1).dst).collect()
}

/// The backend's SYN-ACK to client `i`, with Linux's options.
fn syn_ack(backend: SocketAddrV4, i: usize) -> Vec<u8> {
    let answer = Tcp::new(backend, client(i), SYN | ACK).seq(BACKEND_ISN).ack(CLIENT_ISN + 1);
    answer.tcp_options(&linux_syn_options(i as u32)).frame()
}

/// Client `i`'s ACK of its backend's SYN-ACK, with Linux's timestamps.
fn handshake_ack(i: usize) -> Vec<u8> {
    let ack = Tcp::new(client(i), VIP, ACK).seq(CLIENT_ISN + 1).ack(BACKEND_ISN + 1);
    ack.tcp_options(&timestamp_options(i as u32)).frame()
}

/// Runs `frames` through the balancer, not timed.
fn run_all(b: &Balancer, frames: impl IntoIterator<Item = Vec<u8>>) {
    for frame in frames {
        b.datapath.run_packet(&frame).unwrap();
    }
}

/// New flows' SYNs, with the options a Linux client sends, which the
/// balancer reads.
fn syns(from: usize, count: usize) -> Vec<Vec<u8>> {
    (from..from + count).map(|i| Tcp::new(client(i), VIP, SYN).tcp_options(&linux_syn_options(i as u32)).frame()).collect()
}

/// `CALLS` segments of one stream: the i-th made by `segment(i)`.
fn stream(segment: impl Fn(u32) -> Tcp) -> Vec<Vec<u8>> {
    (0..CALLS as u32).map(|i| segment(i).payload(&[0; 6]).frame()).collect()
}

fn new_flows(b: &Balancer) -> u64 {
    b.datapath.counters().unwrap()[Counter::NewFlows as usize]
}

/// Runs the cases; returns the report as a Markdown table, and the checks
/// against the targets.
///
/// `LB_BENCH_ONLY=TEXT` runs only the cases whose name contains TEXT, and
/// `LB_BENCH_ONLY==NAME` only the case named exactly NAME (for profiling one
/// path); the scale figures come only with the full-table cases.
/// `LB_BENCH_TABLE=N` sizes the new-flow cases' table for N flows instead
/// of 1,000,000 (how much of a SYN's cost is the table's size).
pub fn run() -> (String, Vec<Check>) {
    let only = std::env::var("LB_BENCH_ONLY").ok();
    let wanted = |case: &str| match only.as_deref() {
        None => true,
        Some(o) => o.strip_prefix('=').map_or(case.contains(o), |exact| case == exact),
    };
    let ns = routed_host(256);
    let mut scale: Option<(u64, usize, std::time::Duration, std::time::Duration, Option<u64>, Option<u64>)> = None;
    let rows = ns.run(|| {
        let mut rows = Vec::new();
        let mut add = |case: &str, mut row: Row| {
            row.case = case.to_string();
            eprintln!("  {case}: {:.0} ns (mean {:.1}, {:+.1} over the floor)", row.median, row.mean, row.mean - row.floor);
            rows.push(row);
        };
        let b = balancer(&[1, 1, 1], 1_000_000);
        let case = "not for a service (to the kernel)";
        if wanted(case) {
            add(case, time(&b, &vec![not_for_us(); CALLS], XDP_PASS));
        }

        // One connection, then its packets both ways, each a little further
        // on in its sequence space as a real stream's are.
        let (forward_case, reply_case) = ("established client→backend", "reply backend→client");
        let chosen = (wanted(forward_case) || wanted(reply_case)).then(|| lb_tests::routed::open(&b, 40000));
        if wanted(forward_case) {
            add(forward_case, time(&b, &stream(|i| from_client(40000, ACK).seq(CLIENT_ISN + 1 + 6 * i)), XDP_REDIRECT));
        }
        if let (true, Some(chosen)) = (wanted(reply_case), chosen) {
            let reply = stream(|i| from_backend(chosen, 40000, ACK).seq(BACKEND_ISN + 1 + 6 * i).ack(CLIENT_ISN + 1 + 6 * CALLS as u32));
            add(reply_case, time(&b, &reply, XDP_REDIRECT));
        }

        for backends in [3usize, 64, 256] {
            let case = format!("new flow (SYN), {backends} backends");
            if !wanted(&case) {
                continue;
            }
            let b = balancer(&vec![1; backends], std::env::var("LB_BENCH_TABLE").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000));
            let before = new_flows(&b);
            add(&case, time(&b, &syns(0, CALLS), XDP_REDIRECT));
            assert_eq!(new_flows(&b) - before, CALLS as u64, "every SYN opened a flow");
        }
        // Every CPU opening flows of the one service at once, each its own
        // clients' SYNs on a thread of its own: what the CPUs share (the
        // backends' counts, the table) costs here, against the SYN case on
        // one CPU above. Each thread is timed as that case is; the row has
        // the means of the threads' figures.
        let case = "new flow (SYN), 3 backends, every CPU at once";
        if wanted(case) {
            let b = balancer(&[1, 1, 1], 1_000_000);
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()).min(16);
            let rows: Vec<Row> = std::thread::scope(|s| {
                let threads: Vec<_> = (0..cpus)
                    .map(|cpu| {
                        let b = &b;
                        s.spawn(move || {
                            on_cpu(cpu);
                            time(b, &syns(cpu * CALLS, CALLS), XDP_REDIRECT)
                        })
                    })
                    .collect();
                threads.into_iter().map(|t| t.join().expect("a timing thread")).collect()
            });
            let mean = |field: fn(&Row) -> f64| rows.iter().map(field).sum::<f64>() / rows.len() as f64;
            let row = Row {
                case: String::new(),
                median: mean(|r| r.median),
                p10: mean(|r| r.p10),
                p90: mean(|r| r.p90),
                mean: mean(|r| r.mean),
                floor: mean(|r| r.floor),
            };
            add(case, row);
            assert_eq!(new_flows(&b), (cpus * CALLS) as u64, "every SYN opened a flow");
        }
        // The backends' answers to such SYNs (not timed): a nat flow's reply
        // entry is written here, not at its SYN. These clients have no route
        // in this namespace, so the rewritten SYN-ACKs go to the kernel.
        let case = "backend's first answer (SYN-ACK), 3 backends";
        if wanted(case) {
            let b = balancer(&[1, 1, 1], 1_000_000);
            let answers: Vec<Vec<u8>> = open_flows(&b).into_iter().enumerate().map(|(i, to)| syn_ack(to, i)).collect();
            let entries = b.datapath.flows().len();
            add(case, time(&b, &answers, XDP_PASS));
            assert_eq!(b.datapath.flows().len() - entries, CALLS, "every answer wrote its flow's reply entry");
        }
        // The clients' ACKs that complete those handshakes, with the
        // timestamps Linux puts on them: each flow goes from its opener's
        // half-open count to the shared established count.
        let case = "client's ACK completing the handshake, 3 backends";
        if wanted(case) {
            let b = balancer(&[1, 1, 1], 1_000_000);
            run_all(&b, open_flows(&b).into_iter().enumerate().map(|(i, to)| syn_ack(to, i)));
            let acks: Vec<Vec<u8>> = (0..CALLS).map(handshake_ack).collect();
            add(case, time(&b, &acks, XDP_REDIRECT));
            let counts = b.datapath.active_counts(0).unwrap();
            let established: u64 = counts.active.iter().map(|&c| lb_common::established_count(c)).sum();
            assert_eq!(established, CALLS as u64, "every ACK completed its handshake");
        }
        // The backends close those connections: each FIN is judged against
        // what its client has acknowledged, in the flow's forward entry.
        let case = "backend's FIN on an established flow, 3 backends";
        if wanted(case) {
            let b = balancer(&[1, 1, 1], 1_000_000);
            let backends = open_flows(&b);
            run_all(&b, backends.iter().enumerate().map(|(i, &to)| syn_ack(to, i)));
            run_all(&b, (0..CALLS).map(handshake_ack));
            let fins: Vec<Vec<u8>> = backends
                .iter()
                .enumerate()
                .map(|(i, &from)| {
                    let fin = Tcp::new(from, client(i), FIN | ACK).seq(BACKEND_ISN + 1).ack(CLIENT_ISN + 1);
                    fin.tcp_options(&timestamp_options(i as u32)).frame()
                })
                .collect();
            add(case, time(&b, &fins, XDP_PASS));
            let closing = b.datapath.flows().iter().filter(|(_, f)| f.direction == DIR_FORWARD && f.state & FLOW_BACKEND_FIN != 0).count();
            assert_eq!(closing, CALLS, "every FIN was taken as its flow's");
        }
        // Full NAT: the SYN also takes a port (its reply entry inserted
        // only where free). The widest range, so the 20,000 flows fill a
        // tenth of it and the port's first try mostly succeeds.
        let case = "new flow (SYN), 3 backends, fullnat";
        if wanted(case) {
            let b = lb_tests::routed::balancer_full_nat(&[1, 1, 1], 1_000_000, [1024, 65535]);
            add(case, time(&b, &syns(0, CALLS), XDP_REDIRECT));
        }
        // `lb trace` on, every SYN logged (a line and its three eligible
        // backends' loads), the log read between calls as the agent does.
        let case = "new flow (SYN), 3 backends, lb trace on";
        if wanted(case) {
            let mut b = balancer(&[1, 1, 1], 1_000_000);
            let all = TraceConfig { on: 1, service: TRACE_ANY_SERVICE, client: 0, per_second: 1_000_000 };
            b.datapath.set_trace(all).unwrap();
            let mut lines = 0;
            let row = time_each(&syns(0, CALLS), XDP_REDIRECT, |frame, floor| {
                let timed = b.datapath.time_packet(frame, 1, floor).expect("BPF_PROG_TEST_RUN");
                lines += b.datapath.read_trace().len();
                timed
            });
            assert_eq!(lines, 4 * CALLS, "every SYN logged its line and its three backends");
            add(case, row);
            b.datapath.set_trace(TraceConfig::default()).unwrap();
        }
        let case = "new flow (SYN), 256 backends, random_two_least_conn";
        if wanted(case) {
            let b = balancer_scheduling(&[1; 256], 1_000_000, Scheduler::RandomTwoLeastConn);
            add(case, time(&b, &syns(0, CALLS), XDP_REDIRECT));
        }
        let (full_syn, full_established) = ("new flow (SYN), 256 backends, table 90 % full", "established, table 90 % full");
        if !wanted(full_syn) && !wanted(full_established) {
            return rows;
        }

        // A 1,000,000-flow table, 90 % full.
        let mut b = balancer(&vec![1; 256], 1_000_000);
        let fill = 900_000;
        for chunk in (0..fill).step_by(50_000) {
            for f in syns(chunk, 50_000) {
                b.datapath.run_packet(&f).unwrap();
            }
        }
        assert_eq!(new_flows(&b), fill as u64);
        if wanted(full_syn) {
            add(full_syn, time(&b, &syns(fill, CALLS), XDP_REDIRECT));
        }
        // Complete one of the filling flows' handshakes.
        let (_, out) = b.datapath.run_packet(&Tcp::new(client(7), VIP, SYN).frame()).unwrap();
        let backend = lb_tests::packet::inspect(&out).dst;
        let syn_ack = Tcp::new(backend, client(7), SYN | ACK).seq(BACKEND_ISN).ack(CLIENT_ISN + 1);
        let ack = Tcp::new(client(7), VIP, ACK).seq(CLIENT_ISN + 1).ack(BACKEND_ISN + 1);
        // The filling clients have no route in this namespace: the rewritten
        // SYN-ACK goes to the kernel, but it is taken, not dropped.
        assert_eq!(b.datapath.run_packet(&syn_ack.frame()).unwrap().0, XDP_PASS);
        assert_eq!(b.datapath.run_packet(&ack.frame()).unwrap().0, XDP_REDIRECT);
        let forward = stream(|i| Tcp::new(client(7), VIP, ACK).seq(CLIENT_ISN + 1 + 6 * i).ack(BACKEND_ISN + 1));
        if wanted(full_established) {
            add(full_established, time(&b, &forward, XDP_REDIRECT));
        }

        // The agent's side of a big table: one aging scan (nothing idle
        // enough to go), and what the table costs in kernel memory.
        let hour = 3_600_000_000_000;
        let never = lb_common::Timeouts { syn: hour, established: hour, fin: hour, closed: hour };
        let started = std::time::Instant::now();
        let read = b.datapath.flows().len();
        let read_time = started.elapsed();
        let started = std::time::Instant::now();
        let report = lb::runtime::aging::age(&mut b.datapath, &never, false).unwrap();
        assert_eq!(report.expired, 0);
        let scan = started.elapsed();
        let stats = map_memory("BACKEND_STATS", (MAX_SERVICES * MAX_BACKENDS) as u64);
        scale = Some((report.flows, read, read_time, scan, map_memory("FLOWS", 2 * 1_000_000), stats));
        rows
    });

    let over = |case: &str| rows.iter().find(|r| r.case == case).map_or(f64::NAN, |r| r.mean - r.floor);
    let established = over("established client→backend").max(over("reply backend→client"));
    let mut checks = vec![Check {
        target: "established and reply packets within 60 ns of the floor",
        measured: format!("+{established:.0} ns (the slower of the two)"),
        met: established <= 60.0,
    }];
    let syn = over("new flow (SYN), 3 backends");
    checks.push(Check { target: "SYN with 3 backends within 400 ns of the floor", measured: format!("+{syn:.0} ns"), met: syn <= 400.0 });
    for (case, name) in [
        ("new flow (SYN), 256 backends", "SYN with 256 backends within 300 ns of the floor (least_conn)"),
        ("new flow (SYN), 256 backends, random_two_least_conn", "SYN with 256 backends within 300 ns of the floor (random_two_least_conn)"),
    ] {
        let syn = over(case);
        checks.push(Check { target: name, measured: format!("+{syn:.0} ns"), met: syn <= 300.0 });
    }
    let mut out = format!(
        "BPF_PROG_TEST_RUN, one run per call, {CALLS} calls per case, each next to a call of the floor \
         (a pass-only program); means are of the middle 90 % of calls.\n\n"
    );
    out.push_str("| case | median ns | p10–p90 ns | mean ns | floor mean ns, alongside | over the floor |\n");
    out.push_str("|---|---:|---:|---:|---:|---:|\n");
    for r in &rows {
        out.push_str(&format!(
            "| {} | {:.0} | {:.0}–{:.0} | {:.1} | {:.1} | {:+.1} |\n",
            r.case,
            r.median,
            r.p10,
            r.p90,
            r.mean,
            r.floor,
            r.mean - r.floor
        ));
    }
    if let Some((flows, entries, read, scan, memory, stats)) = scale {
        out.push_str(&format!(
            "\nScale: a 1,000,000-flow table (2,000,000 entries) holding {flows} flows takes {} of kernel memory \
             (`bpftool map show`, bytes_memlock). Reading all {entries} entries (batched) took {:.2} s; one agent aging \
             scan (read, pick the idle, nothing to expire) took {:.2} s. The agent waits 9 times a scan's CPU time \
             before the next, so aging stays near a tenth of a CPU and, at this size, a flow goes about {:.0} s after \
             its timeout at the latest.\n",
            memory.map_or("(unknown)".to_string(), |m| format!("{:.0} MiB", m as f64 / (1 << 20) as f64)),
            read.as_secs_f64(),
            scan.as_secs_f64(),
            scan.as_secs_f64() * 10.0
        ));
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        if let Some(stats) = stats {
            out.push_str(&format!(
                "The per-backend statistics, per CPU, take {:.1} MiB for 256 services on these {cpus} CPUs ({:.1} MiB a \
                 CPU); `agent.max_services` sizes them.\n",
                stats as f64 / (1 << 20) as f64,
                stats as f64 / cpus as f64 / (1 << 20) as f64,
            ));
        }
    }
    (out, checks)
}

/// The kernel memory of a loaded map, found by name and size (bpftool).
fn map_memory(name: &str, entries: u64) -> Option<u64> {
    let out = std::process::Command::new("bpftool").args(["map", "show", "-j"]).output().ok()?;
    let maps: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    maps.as_array()?
        .iter()
        .find(|m| m["name"] == name && m["max_entries"] == entries)
        .and_then(|m| m["bytes_memlock"].as_u64())
}
