//! End to end, seven ways in one run: the same lab and load (wrk) through this
//! balancer (nat, full NAT and DSR), nginx stream, HAProxy, nftables DNAT, and
//! plain forwarding.
use std::{
    fmt::Write as _,
    net::SocketAddrV4,
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use lb_tests::{
    lab::{backend_addr, Lab, LB_CLIENT_SIDE, VIP},
    netns::sh,
};

use crate::targets::Check;

const DURATION: &str = "5s";
const CONCURRENCY: [u32; 3] = [16, 64, 256];
const MAIN_CONCURRENCY: u32 = 64;
/// The main measurements run this many times by default (`--rounds`), the
/// ways in turn each round, and are reported as medians: one run of a
/// way on these shared machines moves by 15 % or more.
const ROUNDS: usize = 3;

/// How the lab is laid out on the machine: `lb-bench e2e [--queues N]
/// [--cpus wrk=0-3,balancer=4-7,backends=8-15] [--pin-napi] [--rounds N] [--connections N]
/// [--ways lb,fullnat,dsr,nginx,haproxy,nft,plain]`. Queues give
/// every veth that many queues (a NIC with RSS); the CPU sets pin wrk (one
/// thread per CPU), the proxies on the balancer host (one worker per CPU)
/// and the backends' nginx with `taskset`.
pub struct Setup {
    pub queues: u32,
    pub wrk_cpus: Option<String>,
    pub balancer_cpus: Option<String>,
    pub backend_cpus: Option<String>,
    pub rounds: usize,
    /// wrk's `-c` for the main keep-alive and new-connection runs.
    pub connections: u32,
    /// The ways to run (`--ways lb,fullnat,dsr,nginx,haproxy,nft,plain`, all by
    /// default); ratios to a way left out are blank.
    pub ways: Vec<Way>,
    /// `--pin-napi` (with all three `--cpus`): each host's receive queues
    /// polled by threads on its own CPUs (`Lab::pin_napi`), as NICs with
    /// per-queue interrupts pinned are.
    pub pin_napi: bool,
}

impl Setup {
    pub fn from_args(args: &[String]) -> Result<Self, String> {
        let mut setup = Setup { queues: 1, wrk_cpus: None, balancer_cpus: None, backend_cpus: None, rounds: ROUNDS, connections: MAIN_CONCURRENCY, ways: Way::ALL.to_vec(), pin_napi: false };
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            let mut value = || args.next().cloned().ok_or(format!("{arg} needs a value"));
            match arg.as_str() {
                "--queues" => setup.queues = value()?.parse().map_err(|e| format!("--queues: {e}"))?,
                "--rounds" => setup.rounds = value()?.parse().map_err(|e| format!("--rounds: {e}"))?,
                "--connections" => {
                    setup.connections = value()?.parse().map_err(|e| format!("--connections: {e}"))?
                }
                "--pin-napi" => setup.pin_napi = true,
                "--ways" => {
                    setup.ways = value()?
                        .split(',')
                        .map(|w| Way::ALL.into_iter().find(|way| way.option() == w).ok_or(format!("--ways: {w:?} is not one of lb, fullnat, dsr, nginx, haproxy, nft, plain")))
                        .collect::<Result<_, _>>()?
                }
                "--cpus" => {
                    for part in value()?.split(',') {
                        let (who, cpus) = part.split_once('=').ok_or(format!("--cpus: {part:?} is not WHO=CPUS"))?;
                        cpu_count(cpus)?;
                        let slot = match who {
                            "wrk" => &mut setup.wrk_cpus,
                            "balancer" => &mut setup.balancer_cpus,
                            "backends" => &mut setup.backend_cpus,
                            _ => return Err(format!("--cpus: {who:?} is not wrk, balancer or backends")),
                        };
                        *slot = Some(cpus.to_string());
                    }
                }
                _ => return Err(format!("unknown option {arg:?}")),
            }
        }
        let all_pinned = setup.wrk_cpus.is_some() && setup.balancer_cpus.is_some() && setup.backend_cpus.is_some();
        if setup.pin_napi && !all_pinned {
            return Err("--pin-napi needs --cpus for wrk, balancer and backends".into());
        }
        if setup.queues == 0 || setup.rounds == 0 || setup.connections == 0 {
            return Err("--queues, --rounds and --connections must be at least 1".into());
        }
        Ok(setup)
    }

    /// wrk's threads: one per CPU it is pinned to, else two.
    fn wrk_threads(&self) -> usize {
        self.wrk_cpus.as_deref().map_or(2, |c| cpu_count(c).unwrap_or(2))
    }

    /// The proxies' workers: one per balancer CPU, else two.
    fn balancer_workers(&self) -> usize {
        self.balancer_cpus.as_deref().map_or(2, |c| cpu_count(c).unwrap_or(2))
    }

    pub fn describe(&self) -> String {
        let pin = |who: &str, cpus: &Option<String>| cpus.as_ref().map(|c| format!(", {who} on CPUs {c}")).unwrap_or_default();
        format!(
            "veths with {} queue(s){}{}{}{}, {} round(s)",
            self.queues,
            pin("wrk", &self.wrk_cpus),
            pin("balancer-host proxies", &self.balancer_cpus),
            pin("backends", &self.backend_cpus),
            if self.pin_napi { ", every host's receive queues polled on its own CPUs (threaded NAPI)" } else { "" },
            self.rounds
        )
    }
}

/// How many CPUs a `taskset` list names ("0-3,8" is 5).
fn cpu_count(list: &str) -> Result<usize, String> {
    lb_tests::lab::cpu_list(list).map(|cpus| cpus.len())
}

/// `program` run under `taskset -c cpus` when there are CPUs to pin to.
fn pinned(ns: &lb_tests::netns::Netns, cpus: &Option<String>, program: &str) -> Command {
    match cpus {
        Some(cpus) => {
            let mut c = ns.command("taskset");
            c.args(["-c", cpus, program]);
            c
        }
        None => ns.command(program),
    }
}
/// iperf3's port: a second service, to one backend, for the bulk transfer.
const BULK_PORT: u16 = 5201;

fn bulk(addr: SocketAddrV4) -> SocketAddrV4 {
    SocketAddrV4::new(*addr.ip(), BULK_PORT)
}

/// One TCP stream for 3 s through the balancer, in Gbit/s (iperf3).
fn iperf3(lab: &Lab, target: SocketAddrV4) -> f64 {
    let out = lab
        .client
        .command("iperf3")
        .args(["-c", &target.ip().to_string(), "-p", &target.port().to_string(), "-t", "3", "-J"])
        .output()
        .expect("iperf3 (apt-get install iperf3)");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    report["end"]["sum_received"]["bits_per_second"].as_f64().unwrap_or(f64::NAN) / 1e9
}

#[derive(Clone, Copy, PartialEq)]
pub enum Way {
    Xdp,
    XdpFullNat,
    XdpDsr,
    NginxStream,
    Haproxy,
    NftDnat,
    Plain,
}

impl Way {
    const ALL: [Way; 7] =
        [Way::Xdp, Way::XdpFullNat, Way::XdpDsr, Way::NginxStream, Way::Haproxy, Way::NftDnat, Way::Plain];

    /// The way's name in `--ways`.
    fn option(self) -> &'static str {
        match self {
            Way::Xdp => "lb",
            Way::XdpFullNat => "fullnat",
            Way::XdpDsr => "dsr",
            Way::NginxStream => "nginx",
            Way::Haproxy => "haproxy",
            Way::NftDnat => "nft",
            Way::Plain => "plain",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Way::Xdp => "lb (XDP)",
            Way::XdpFullNat => "lb (XDP), fullnat",
            Way::XdpDsr => "lb (XDP), dsr",
            Way::NginxStream => "nginx stream",
            Way::Haproxy => "HAProxy",
            Way::NftDnat => "nftables dnat",
            Way::Plain => "plain forwarding",
        }
    }
}

struct Wrk {
    requests_per_second: f64,
    requests: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// Socket errors and non-2xx answers, timeouts included.
    errors: u64,
    /// Requests wrk gave up on after its default 2 s.
    timeouts: u64,
    balancer_cpu_seconds: f64,
    /// What the hosts' TCP stacks did during the run.
    stacks: Stacks,
}

/// RSTs sent by each host's TCP stack and segments retransmitted by all of
/// them during a run: a balancer that loses or misroutes segments shows here
/// even when wrk's figures look fine.
#[derive(Clone, Copy, Default)]
struct Stacks {
    client_rsts: u64,
    balancer_rsts: u64,
    backend_rsts: u64,
    retransmitted: u64,
    /// CPU seconds the whole machine spent in softirqs (where XDP and the
    /// kernel's forwarding run), and lb's agent, when it runs.
    softirq_seconds: f64,
    agent_seconds: f64,
    /// Packets the balancer's links and their peers dropped or failed to
    /// send (the veth and XDP counters `ethtool -S` shows).
    link_drops: u64,
}

/// `ethtool -S` of the balancer's two links and their peers, the counters
/// that say a packet was dropped or could not be sent: name → value.
fn link_counters(lab: &Lab) -> std::collections::BTreeMap<String, u64> {
    let mut all = std::collections::BTreeMap::new();
    for (ns, link) in [(&lab.lb, "cli"), (&lab.lb, "srv"), (&lab.client, "eth0"), (&lab.switch, "uplink")] {
        let out = ns.exec(&format!("ethtool -S {link}"));
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Some((name, value)) = line.trim().split_once(':') else { continue };
            if name.contains("drop") || name.contains("err") {
                all.insert(format!("{link}.{name}"), value.trim().parse().unwrap_or(0));
            }
        }
    }
    all
}

/// The running agent's pid while an lb way runs, else 0.
static AGENT_PID: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

impl Stacks {
    /// The counters now, from each namespace's /proc/net/snmp.
    fn read(lab: &Lab) -> Self {
        let tcp = |ns: &lb_tests::netns::Netns, field: &str| -> u64 {
            let out = ns.exec("cat /proc/net/snmp");
            let text = String::from_utf8_lossy(&out.stdout);
            let mut tcp = text.lines().filter(|l| l.starts_with("Tcp:"));
            let (Some(names), Some(values)) = (tcp.next(), tcp.next()) else { return 0 };
            names.split_whitespace().zip(values.split_whitespace()).find(|(n, _)| *n == field).and_then(|(_, v)| v.parse().ok()).unwrap_or(0)
        };
        let hosts = || std::iter::once(&lab.client).chain([&lab.lb]).chain(&lab.backends);
        Stacks {
            client_rsts: tcp(&lab.client, "OutRsts"),
            balancer_rsts: tcp(&lab.lb, "OutRsts"),
            backend_rsts: lab.backends.iter().map(|b| tcp(b, "OutRsts")).sum(),
            retransmitted: hosts().map(|h| tcp(h, "RetransSegs")).sum(),
            softirq_seconds: machine_cpu_seconds(6),
            agent_seconds: match AGENT_PID.load(std::sync::atomic::Ordering::Relaxed) {
                0 => 0.0,
                pid => process_tree_cpu(pid),
            },
            link_drops: 0,
        }
    }

    /// The counters that moved between `before` and these; `sign` -1, or
    /// +1 for the sum of two runs'.
    fn combined(self, other: Stacks, sign: i64) -> Stacks {
        let n = |a: u64, b: u64| (a as i64 + sign * b as i64).max(0) as u64;
        let f = sign as f64;
        Stacks {
            client_rsts: n(self.client_rsts, other.client_rsts),
            balancer_rsts: n(self.balancer_rsts, other.balancer_rsts),
            backend_rsts: n(self.backend_rsts, other.backend_rsts),
            retransmitted: n(self.retransmitted, other.retransmitted),
            softirq_seconds: self.softirq_seconds + f * other.softirq_seconds,
            agent_seconds: self.agent_seconds + f * other.agent_seconds,
            link_drops: n(self.link_drops, other.link_drops),
        }
    }

    fn since(self, before: Stacks) -> Stacks {
        self.combined(before, -1)
    }

    fn plus(self, other: Stacks) -> Stacks {
        self.combined(other, 1)
    }
}

/// The three backends' nginx, serving `GET /` with a short body.
struct Backends {
    children: Vec<Child>,
}

impl Backends {
    fn start(lab: &Lab, setup: &Setup) -> Self {
        let children = (0..lab.backends.len())
            .map(|i| {
                let dir = lab.dir.join(format!("nginx-b{}", i + 1));
                std::fs::create_dir_all(&dir).unwrap();
                let conf = format!(
                    "worker_processes 1; daemon off; pid {dir}/nginx.pid; error_log stderr error;\n\
                     worker_rlimit_nofile 65536;\n\
                     events {{ worker_connections 16384; }}\n\
                     http {{ access_log off; keepalive_requests 1000000;\n\
                       client_body_temp_path {dir}; proxy_temp_path {dir}; fastcgi_temp_path {dir}; uwsgi_temp_path {dir}; scgi_temp_path {dir};\n\
                       server {{ listen {port} backlog=4096; location / {{ return 200 \"b{n}\\n\"; }} }} }}\n",
                    dir = dir.display(),
                    port = backend_addr(i).port(),
                    n = i + 1
                );
                std::fs::write(dir.join("nginx.conf"), conf).unwrap();
                pinned(&lab.backends[i], &setup.backend_cpus, "nginx")
                    .args(["-c", dir.join("nginx.conf").to_str().unwrap(), "-p", dir.to_str().unwrap()])
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("nginx (apt-get install nginx-light)")
            })
            .collect();
        std::thread::sleep(Duration::from_millis(500));
        Self { children }
    }

    /// CPU seconds the backends' nginx processes (masters and workers) used.
    fn cpu_seconds(&self) -> f64 {
        let mut total = 0.0;
        for c in &self.children {
            total += process_tree_cpu(c.id());
        }
        total
    }
}

impl Drop for Backends {
    fn drop(&mut self) {
        for c in &mut self.children {
            unsafe { libc::kill(c.id() as i32, libc::SIGQUIT) };
            let _ = c.wait();
        }
    }
}

fn ticks_per_second() -> f64 {
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}

/// utime + stime of a process and its children processes (threads are
/// counted in the process), in seconds.
fn process_tree_cpu(pid: u32) -> f64 {
    let mut total = 0.0;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    if let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) {
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.len() > 13 {
            total += (f[11].parse::<f64>().unwrap_or(0.0) + f[12].parse::<f64>().unwrap_or(0.0)) / ticks_per_second();
        }
    }
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    for child in children.split_whitespace().filter_map(|c| c.parse().ok()) {
        total += process_tree_cpu(child);
    }
    total
}

/// The machine's CPU seconds so far in one column of /proc/stat's cpu line
/// (0 user, 2 system, 6 softirq, ...).
fn machine_cpu_seconds(column: usize) -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let line = stat.lines().next().unwrap_or_default();
    line.split_whitespace().nth(column + 1).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0) / ticks_per_second()
}

/// Busy CPU seconds of the whole machine so far.
fn machine_busy_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap();
    let cpu: Vec<f64> = stat.lines().next().unwrap().split_whitespace().skip(1).map(|v| v.parse().unwrap_or(0.0)).collect();
    let (idle, iowait) = (cpu[3], cpu[4]);
    (cpu.iter().take(8).sum::<f64>() - idle - iowait) / ticks_per_second()
}

fn children_cpu_seconds() -> f64 {
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(usage.ru_utime) + t(usage.ru_stime)
}

fn parse_ms(value: &str) -> f64 {
    let (number, unit) = value.split_at(value.find(|c: char| c.is_alphabetic()).unwrap_or(value.len()));
    let n: f64 = number.parse().unwrap_or(f64::NAN);
    match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        _ => f64::NAN,
    }
}

/// Where every wrk run's own output goes, to look into a figure that stands out.
fn raw_log() -> std::path::PathBuf {
    let built_here = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target");
    if built_here.exists() { built_here } else { std::path::PathBuf::from(".") }.join("bench-e2e-wrk.log")
}

fn log_raw(text: &str) {
    use std::io::Write as _;
    if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(raw_log()) {
        let _ = writeln!(f, "{text}");
    }
}

/// Gives each run its own client address, as real traffic comes from many
/// clients. From one address every run reused the ports of the runs before
/// it while their TIME_WAIT state was still around, and after some sequences
/// of ways (nginx stream, then a DNAT way: lb or nftables) the next run
/// crawled at a few hundred connections a second with no drop or
/// retransmission anywhere; which way it hit depended on the order.
fn fresh_client_address(lab: &Lab) {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(10);
    let host = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let address = std::net::Ipv4Addr::new(198, 18, 0, (host % 240 + 10) as u8);
    lab.client.exec(&format!(
        "ip addr replace {address}/24 dev eth0 && ip route replace default via {LB_CLIENT_SIDE} src {address}"
    ));
}

/// With `LB_BENCH_CAPTURE=DIR`, the client's view of 60,000 packets in the
/// middle of each new-connection run, every packet's headers, is written to
/// DIR/<way>-client.pcap: what the client sent and got when a figure looks
/// wrong on a machine where nothing else can be looked at.
fn capture_client(lab: &Lab, way: Way) -> Option<std::thread::JoinHandle<()>> {
    let dir = std::env::var_os("LB_BENCH_CAPTURE")?;
    let file = Path::new(&dir).join(format!("{}-client.pcap", way.option()));
    let ns = lab.client.name.clone();
    Some(std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(2));
        let _ = Command::new("ip")
            .args(["netns", "exec", &ns, "timeout", "5", "tcpdump", "-q", "-n", "-Z", "root", "-s", "96", "-c", "60000", "-i", "eth0", "-w"])
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }))
}

/// Runs wrk from the client; `close` asks for a new connection per request.
fn wrk(lab: &Lab, setup: &Setup, backends: &Backends, target: SocketAddrV4, connections: u32, close: bool) -> Wrk {
    fresh_client_address(lab);
    let url = format!("http://{target}/");
    let pin = setup.wrk_cpus.as_ref().map(|c| format!("taskset -c {c} ")).unwrap_or_default();
    let threads = setup.wrk_threads();
    let mut script = format!("ulimit -n 20000; {pin}wrk -t{threads} -c{connections} -d{DURATION} --latency");
    if close {
        script.push_str(" -H 'Connection: close'");
    }
    script.push_str(&format!(" {url}"));
    let stacks = Stacks::read(lab);
    let links = link_counters(lab);
    let (busy, children, backend_cpu) = (machine_busy_seconds(), children_cpu_seconds(), backends.cpu_seconds());
    let out = lab.client.command("sh").args(["-c", &script]).output().expect("wrk (apt-get install wrk)");
    let busy = machine_busy_seconds() - busy;
    let wrk_cpu = children_cpu_seconds() - children;
    let backend_cpu = backends.cpu_seconds() - backend_cpu;
    let mut stacks = Stacks::read(lab).since(stacks);
    let link_drops: Vec<String> = link_counters(lab)
        .into_iter()
        .filter_map(|(name, value)| {
            let delta = value.saturating_sub(links.get(&name).copied().unwrap_or(0));
            stacks.link_drops += delta;
            (delta > 0).then(|| format!("{name} +{delta}"))
        })
        .collect();
    let text = String::from_utf8_lossy(&out.stdout);
    log_raw(&format!(
        "{script}\n{text}TCP stacks: client sent {} RSTs, balancer host {}, backends {}; {} segments retransmitted; \
         softirqs {:.2} CPU s, agent {:.2} CPU s; links dropped: {}\n",
        stacks.client_rsts, stacks.balancer_rsts, stacks.backend_rsts, stacks.retransmitted, stacks.softirq_seconds, stacks.agent_seconds,
        if link_drops.is_empty() { "none".to_string() } else { link_drops.join(", ") }
    ));
    let field = |prefix: &str| -> Option<String> {
        text.lines().find_map(|l| l.trim_start().strip_prefix(prefix).map(|r| r.trim().to_string()))
    };
    let requests: f64 = text
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0.0);
    let errors: u64 = field("Socket errors:")
        .map(|l| l.split(',').filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok()).sum())
        .unwrap_or(0)
        + field("Non-2xx or 3xx responses:").and_then(|n| n.parse().ok()).unwrap_or(0);
    Wrk {
        requests_per_second: field("Requests/sec:").and_then(|v| v.parse().ok()).unwrap_or(0.0),
        requests,
        p50_ms: field("50%").map_or(f64::NAN, |v| parse_ms(&v)),
        p99_ms: field("99%").map_or(f64::NAN, |v| parse_ms(&v)),
        errors,
        timeouts: field("Socket errors:")
            .and_then(|l| l.split(',').find_map(|p| p.trim().strip_prefix("timeout ")?.trim().parse().ok()))
            .unwrap_or(0),
        balancer_cpu_seconds: (busy - wrk_cpu - backend_cpu).max(0.0),
        stacks,
    }
}

/// Sets the balancer host up for `way`; the returned guard undoes it, and
/// for lb says what its data path counted.
fn set_up(lab: &Lab, setup: &Setup, way: Way) -> (SocketAddrV4, Box<dyn FnOnce() -> Option<String>>) {
    let workers = setup.balancer_workers();
    let servers: Vec<String> = (0..lab.backends.len()).map(|i| backend_addr(i).to_string()).collect();
    match way {
        Way::Plain => (backend_addr(0), Box::new(|| None)),
        Way::Xdp | Way::XdpFullNat => {
            let mut config = lab.config(&[1, 1, 1], "");
            if way == Way::XdpFullNat {
                config = config.replace("mode = \"nat\"", "mode = \"fullnat\"");
            }
            let agent = lab.start_agent(&config);
            AGENT_PID.store(agent.pid(), std::sync::atomic::Ordering::Relaxed);
            agent.cli(&["service", "add", "bulk", &bulk(VIP).to_string()]).unwrap();
            agent.cli(&["backend", "add", "bulk", &bulk(backend_addr(0)).to_string()]).unwrap();
            (VIP, Box::new(move || {
                let counted = agent.cli(&["status", "--json"]).ok().map(|json| data_path_counters(&json));
                AGENT_PID.store(0, std::sync::atomic::Ordering::Relaxed);
                let _ = agent.cli(&["shutdown"]);
                counted
            }))
        }
        Way::XdpDsr => {
            let return_path = DsrReturnPath::of(lab, setup.queues);
            return_path.add();
            let config = lab.config(&[1, 1, 1], "").replace("mode = \"nat\"", "mode = \"dsr\"");
            let agent = lab.start_agent(&config);
            AGENT_PID.store(agent.pid(), std::sync::atomic::Ordering::Relaxed);
            agent.cli(&["service", "add", "bulk", &bulk(VIP).to_string(), "--mode", "dsr"]).unwrap();
            agent.cli(&["backend", "add", "bulk", &bulk(backend_addr(0)).to_string()]).unwrap();
            (VIP, Box::new(move || {
                let counted = agent.cli(&["status", "--json"]).ok().map(|json| data_path_counters(&json));
                AGENT_PID.store(0, std::sync::atomic::Ordering::Relaxed);
                let _ = agent.cli(&["shutdown"]);
                return_path.remove();
                counted
            }))
        }
        Way::NftDnat => {
            let map = servers.iter().enumerate().map(|(i, s)| format!("{i} : {}", s.split(':').next().unwrap())).collect::<Vec<_>>().join(", ");
            lab.lb.exec(&format!(
                "nft add table ip lbbench && nft add chain ip lbbench pre {{ type nat hook prerouting priority -100 \\; }} \
                 && nft add rule ip lbbench pre ip daddr {} tcp dport 80 dnat to numgen inc mod {} map {{ {map} }} \
                 && nft add rule ip lbbench pre ip daddr {} tcp dport {BULK_PORT} dnat to {}",
                VIP.ip(),
                servers.len(),
                VIP.ip(),
                backend_addr(0).ip()
            ));
            let ns = lab.lb.name.clone();
            (VIP, Box::new(move || {
                let _ = Command::new("ip").args(["netns", "exec", &ns, "nft", "delete", "table", "ip", "lbbench"]).status();
                None
            }))
        }
        Way::NginxStream | Way::Haproxy => {
            // A proxy needs the VIP as a local address to listen on.
            lab.lb.exec(&format!("ip addr add {}/32 dev lo", VIP.ip()));
            let dir = lab.dir.join("proxy");
            std::fs::create_dir_all(&dir).unwrap();
            let mut child = if way == Way::NginxStream {
                let upstream: String = servers.iter().map(|s| format!("server {s};")).collect();
                let conf = format!(
                    "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n\
                     worker_processes {workers}; daemon off; pid {dir}/nginx.pid; error_log stderr error;\n\
                     worker_rlimit_nofile 65536;\n\
                     events {{ worker_connections 32768; }}\n\
                     stream {{ upstream b {{ least_conn; {upstream} }} server {{ listen {VIP} backlog=4096; proxy_pass b; }}\n\
                       server {{ listen {}; proxy_pass {}; }} }}\n",
                    bulk(VIP),
                    bulk(backend_addr(0)),
                    dir = dir.display()
                );
                std::fs::write(dir.join("nginx.conf"), conf).unwrap();
                pinned(&lab.lb, &setup.balancer_cpus, "nginx")
                    .args(["-c", dir.join("nginx.conf").to_str().unwrap(), "-p", dir.to_str().unwrap()])
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap()
            } else {
                let backend: String = servers.iter().enumerate().map(|(i, s)| format!("  server s{i} {s}\n")).collect();
                let conf = format!(
                    "global\n  nbthread {workers}\n  maxconn 9000\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
                     frontend f\n  bind {VIP}\n  default_backend b\nbackend b\n  balance leastconn\n{backend}\
                     frontend bulk\n  bind {}\n  default_backend bulk\nbackend bulk\n  server s {}\n",
                    bulk(VIP),
                    bulk(backend_addr(0))
                );
                std::fs::write(dir.join("haproxy.cfg"), conf).unwrap();
                pinned(&lab.lb, &setup.balancer_cpus, "haproxy")
                    .args(["-db", "-f", dir.join("haproxy.cfg").to_str().unwrap()])
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap()
            };
            std::thread::sleep(Duration::from_millis(500));
            let ns = lab.lb.name.clone();
            (VIP, Box::new(move || {
                unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
                let _ = child.wait();
                let _ = Command::new("ip").args(["netns", "exec", &ns, "ip", "addr", "del", &format!("{}/32", VIP.ip()), "dev", "lo"]).status();
                None
            }))
        }
    }
}

/// DSR's way back (`on`), or its removal: the backends hold the VIP (set
/// up as README says) and answer the clients through a link of the
/// client's own onto their segment, not through the balancer host, whose
/// CPU is then what the balancer costs. Namespaces by name, so that the
/// removal can outlive the borrow of the lab.
struct DsrReturnPath {
    client: String,
    switch: String,
    backends: Vec<String>,
    /// Queues for its veth, as the lab's have.
    queues: u32,
}

impl DsrReturnPath {
    const CLIENT_ON_BACKENDS: &str = "198.19.0.2";

    fn of(lab: &Lab, queues: u32) -> Self {
        Self {
            client: lab.client.name.clone(),
            switch: lab.switch.name.clone(),
            backends: lab.backends.iter().map(|b| b.name.clone()).collect(),
            queues,
        }
    }

    fn exec(ns: &str, cmd: &str) {
        sh(&format!("ip netns exec {ns} sh -c '{cmd}'"));
    }

    fn add(&self) {
        let (client, switch) = (&self.client, &self.switch);
        let q = format!("numtxqueues {0} numrxqueues {0}", self.queues);
        sh(&format!("ip link add eth1 netns {client} {q} type veth peer dsrback netns {switch} {q}"));
        Self::exec(switch, "ip link set dsrback master br0 && ip link set dsrback up");
        Self::exec(
            client,
            &format!(
                "ip addr add {}/24 dev eth1 && ip link set eth1 up \
                 && ethtool -K eth1 tx off tso off gso off gro on >/dev/null \
                 && sysctl -qw net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.eth1.rp_filter=0 net.ipv4.conf.eth0.rp_filter=0",
                Self::CLIENT_ON_BACKENDS
            ),
        );
        for ns in &self.backends {
            Self::exec(
                ns,
                &format!(
                    "ip addr add {}/32 dev lo && sysctl -qw net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.all.arp_announce=2 \
                     && ip route add 198.18.0.0/24 via {}",
                    VIP.ip(),
                    Self::CLIENT_ON_BACKENDS
                ),
            );
        }
    }

    fn remove(&self) {
        Self::exec(&self.client, "ip link del eth1");
        for ns in &self.backends {
            Self::exec(ns, &format!("ip route del 198.18.0.0/24; ip addr del {}/32 dev lo", VIP.ip()));
        }
    }
}

/// The data path's counters that are not zero, from `lb status --json`.
fn data_path_counters(status_json: &str) -> String {
    let status: serde_json::Value = serde_json::from_str(status_json).unwrap_or_default();
    let counters = status["counters"].as_object().cloned().unwrap_or_default();
    let counted: Vec<String> = counters
        .iter()
        .filter_map(|(name, value)| value.as_u64().filter(|&v| v > 0).map(|v| format!("{name} {v}")))
        .collect();
    counted.join(", ")
}

struct Results {
    way: Way,
    bulk_gbps: f64,
    /// One per round.
    keepalive: Vec<Wrk>,
    close: Vec<Wrk>,
    sweep: Vec<(u32, Wrk)>,
    /// Keep-alive with 10,000 concurrent connections, for the ways the
    /// many-core targets compare.
    concurrent_10k: Option<Wrk>,
}

impl Results {
    fn empty(way: Way) -> Self {
        Results { way, bulk_gbps: f64::NAN, keepalive: Vec::new(), close: Vec::new(), sweep: Vec::new(), concurrent_10k: None }
    }
}

/// The median, or NaN for none (a way left out).
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The median over rounds of `value`.
fn med(runs: &[Wrk], value: impl Fn(&Wrk) -> f64) -> f64 {
    median(runs.iter().map(value).collect())
}

/// The median over rounds of `value(a) / value(b)`, each round's ratio taken
/// within the round.
fn ratio(a: &[Wrk], b: &[Wrk], value: impl Fn(&Wrk) -> f64) -> f64 {
    median(a.iter().zip(b).map(|(a, b)| value(a) / value(b)).collect())
}

/// Runs the ways; returns the report and the checks against the targets.
pub fn run(plot: Option<&Path>, setup: &Setup) -> (String, Vec<Check>) {
    let _ = std::fs::remove_file(raw_log());
    eprintln!("wrk's own output: {}", raw_log().display());
    eprintln!("lab: {}", setup.describe());
    let lab = Lab::with_queues(3, setup.queues);
    if let (true, Some(wrk), Some(balancer), Some(backends)) =
        (setup.pin_napi, &setup.wrk_cpus, &setup.balancer_cpus, &setup.backend_cpus)
    {
        // Each host receives on its own CPUs, as machines with NICs do.
        lab.pin_napi(wrk, balancer, backends);
    }
    let backends = Backends::start(&lab, setup);
    let mut iperf_server = lab.backends[0]
        .command("iperf3")
        .args(["-s", "-p", &BULK_PORT.to_string()])
        .stdout(Stdio::null())
        .spawn()
        .expect("iperf3 (apt-get install iperf3)");
    std::thread::sleep(Duration::from_millis(300));
    let mut results: Vec<Results> = setup.ways.iter().map(|&way| Results::empty(way)).collect();
    let mut lb_counted = Vec::new();
    let rounds = setup.rounds;
    let connections = setup.connections;
    for round in 0..rounds {
        for r in &mut results {
            let way = r.way;
            eprintln!("== round {} of {rounds}: {}", round + 1, way.name());
            log_raw(&format!("== round {} of {rounds}: {}", round + 1, way.name()));
            let (target, tear_down) = set_up(&lab, setup, way);
            r.keepalive.push(wrk(&lab, setup, &backends, target, connections, false));
            let capture = capture_client(&lab, way);
            r.close.push(wrk(&lab, setup, &backends, target, connections, true));
            if let Some(capture) = capture {
                let _ = capture.join();
            }
            if round == 0 {
                r.sweep = CONCURRENCY.iter().map(|&c| (c, wrk(&lab, setup, &backends, target, c, false))).collect();
                r.bulk_gbps = iperf3(&lab, if way == Way::Plain { bulk(backend_addr(0)) } else { bulk(VIP) });
                if matches!(way, Way::Xdp | Way::XdpFullNat | Way::NftDnat | Way::NginxStream) {
                    r.concurrent_10k = Some(wrk(&lab, setup, &backends, target, 10_000, false));
                }
            }
            if let Some(counted) = tear_down() {
                lb_counted.push(format!("{}, round {}: {counted}", way.name(), round + 1));
            }
        }
    }

    let _ = iperf_server.kill();
    let _ = iperf_server.wait();
    let left_out: Vec<Results> = Way::ALL.into_iter().map(Results::empty).collect();
    let by = |w: Way| results.iter().chain(&left_out).find(|r| r.way == w).unwrap();
    let (nginx, nft, plain) = (by(Way::NginxStream), by(Way::NftDnat), by(Way::Plain));
    let cpu_per_request = |w: &Wrk| w.balancer_cpu_seconds / w.requests.max(1.0) * 1e6;
    let rps = |w: &Wrk| w.requests_per_second;
    let p99 = |w: &Wrk| w.p99_ms;
    let mut out = format!(
        "wrk -t{} -c{connections} -d{DURATION}; {}; each round runs the ways in turn; every figure \
         is the median of the rounds, and every ratio the median of the ratios within each round. \
         \"new conn/s\" adds `Connection: close`. Ratios are to nginx stream, to nftables dnat (the kernel's \
         own NAT) and to plain forwarding. Errors are wrk's socket errors and non-2xx answers over both \
         runs, timeouts (no answer within wrk's 2 s) in brackets.\n\n\
         | way | keep-alive req/s | × nginx | × nft | × plain | p50 ms | p99 ms | p99 × plain | new conn/s | × nginx | × nft | × plain | new conn p99 ms | × nft | balancer CPU µs/req (keep-alive) | (new conn) | errors (timeouts) | bulk Gbit/s (iperf3, 1 stream) |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        setup.wrk_threads(),
        setup.describe()
    );
    let errors = |r: &Results| -> (u64, u64) {
        r.keepalive.iter().chain(&r.close).fold((0, 0), |(e, t), w| (e + w.errors, t + w.timeouts))
    };
    for r in &results {
        let (errors, timeouts) = errors(r);
        let _ = writeln!(
            out,
            "| {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.1} | {:.1} | {errors} ({timeouts}) | {:.1} |",
            r.way.name(),
            med(&r.keepalive, rps),
            ratio(&r.keepalive, &nginx.keepalive, rps),
            ratio(&r.keepalive, &nft.keepalive, rps),
            ratio(&r.keepalive, &plain.keepalive, rps),
            med(&r.keepalive, |w| w.p50_ms),
            med(&r.keepalive, p99),
            ratio(&r.keepalive, &plain.keepalive, p99),
            med(&r.close, rps),
            ratio(&r.close, &nginx.close, rps),
            ratio(&r.close, &nft.close, rps),
            ratio(&r.close, &plain.close, rps),
            med(&r.close, p99),
            ratio(&r.close, &nft.close, p99),
            med(&r.keepalive, cpu_per_request),
            med(&r.close, cpu_per_request),
            r.bulk_gbps,
        );
    }
    let xdp = by(Way::Xdp);
    let rounds = |a: &[Wrk], b: &[Wrk], value: fn(&Wrk) -> f64| -> String {
        a.iter().zip(b).map(|(a, b)| format!("{:.2}", value(a) / value(b))).collect::<Vec<_>>().join(", ")
    };
    let _ = write!(
        out,
        "\nlb (XDP) round by round: keep-alive × nginx {}; new conn × nginx {}; new conn × nft {}; new conn × plain {}; \
         keep-alive p99 × plain {}.\n",
        rounds(&xdp.keepalive, &nginx.keepalive, |w| w.requests_per_second),
        rounds(&xdp.close, &nginx.close, |w| w.requests_per_second),
        rounds(&xdp.close, &nft.close, |w| w.requests_per_second),
        rounds(&xdp.close, &plain.close, |w| w.requests_per_second),
        rounds(&xdp.keepalive, &plain.keepalive, |w| w.p99_ms),
    );
    out.push_str(
        "\nWhat the hosts' TCP stacks did during the new-connection runs (all rounds): RSTs each sent, and \
         segments all of them retransmitted. A balancer that hands a segment to the wrong host or loses one \
         shows here first.\n\n\
         Softirq time is the whole machine's (XDP, forwarding and every host's TCP receive run there); the agent's is lb's \
         own process.\n\n\
         | way | client RSTs | balancer host RSTs | backends' RSTs | retransmitted segments | softirq CPU s | agent CPU s | link drops |\n|---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in &results {
        let s = r.close.iter().fold(Stacks::default(), |sum, w| sum.plus(w.stacks));
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {:.2} | {:.2} | {} |",
            r.way.name(),
            s.client_rsts,
            s.balancer_rsts,
            s.backend_rsts,
            s.retransmitted,
            s.softirq_seconds,
            s.agent_seconds,
            s.link_drops
        );
    }
    let _ = writeln!(out, "\nlb (XDP) data path counters, per round (all its runs):\n");
    for line in &lb_counted {
        let _ = writeln!(out, "- {line}");
    }
    out.push_str("\nKeep-alive requests/s and p99 latency against concurrency (wrk -c):\n\n| way |");
    for c in CONCURRENCY {
        let _ = write!(out, " c={c} req/s | c={c} p99 ms |");
    }
    out.push_str("\n|---|");
    out.push_str(&"---:|".repeat(CONCURRENCY.len() * 2));
    out.push('\n');
    for r in &results {
        let _ = write!(out, "| {} |", r.way.name());
        for (_, w) in &r.sweep {
            let _ = write!(out, " {:.0} | {:.2} |", w.requests_per_second, w.p99_ms);
        }
        out.push('\n');
    }
    out.push_str(
        "\n10,000 concurrent keep-alive connections (wrk -c10000, one run):\n\n\
         | way | req/s | × nft | p50 ms | p99 ms | p99 × nft | errors (timeouts) |\n|---|---:|---:|---:|---:|---:|---:|\n",
    );
    let nft_10k = nft.concurrent_10k.as_ref();
    for r in &results {
        let Some(w) = &r.concurrent_10k else { continue };
        let to_nft = |value: fn(&Wrk) -> f64| nft_10k.map_or(f64::NAN, |n| value(w) / value(n));
        let _ = writeln!(
            out,
            "| {} | {:.0} | {:.2} | {:.1} | {:.1} | {:.2} | {} ({}) |",
            r.way.name(),
            w.requests_per_second,
            to_nft(|w| w.requests_per_second),
            w.p50_ms,
            w.p99_ms,
            to_nft(|w| w.p99_ms),
            w.errors,
            w.timeouts
        );
    }

    let cpu = |r: &Results| med(&r.keepalive, cpu_per_request);
    let new_x_nginx = ratio(&xdp.close, &nginx.close, rps);
    let new_x_plain = ratio(&xdp.close, &plain.close, rps);
    let keepalive_x_nginx = ratio(&xdp.keepalive, &nginx.keepalive, rps);
    let p99_x_plain = ratio(&xdp.keepalive, &plain.keepalive, p99);
    let mut checks = vec![
        Check { target: "new connections/s ≥ 2× nginx stream", measured: format!("{new_x_nginx:.2}×"), met: new_x_nginx >= 2.0 },
        Check { target: "new connections/s ≥ 0.9× plain forwarding", measured: format!("{new_x_plain:.2}×"), met: new_x_plain >= 0.9 },
        Check { target: "keep-alive requests/s ≥ 1.5× nginx stream", measured: format!("{keepalive_x_nginx:.2}×"), met: keepalive_x_nginx >= 1.5 },
        Check { target: "keep-alive p99 ≤ plain forwarding's + 10 %", measured: format!("{p99_x_plain:.2}×"), met: p99_x_plain <= 1.1 },
        Check {
            target: "balancer CPU per request ≤ 1/5 of nginx stream's (keep-alive)",
            measured: format!("{:.1} µs against {:.1} µs", cpu(xdp), cpu(nginx)),
            met: cpu(xdp) * 5.0 <= cpu(nginx),
        },
    ];
    // The many-core targets, against the kernel's own NAT, for each of lb's modes.
    for lb in [xdp, by(Way::XdpFullNat)].into_iter().filter(|r| !r.keepalive.is_empty()) {
        let name = lb.way.name();
        let new_x_nft = ratio(&lb.close, &nft.close, rps);
        let new_p99_x_nft = ratio(&lb.close, &nft.close, p99);
        let keepalive_x_nft = ratio(&lb.keepalive, &nft.keepalive, rps);
        let (errors, timeouts) = errors(lb);
        checks.push(Check {
            target: "new connections/s ≥ nftables dnat, p99 ≤ 2× nftables'",
            measured: format!("{name}: {new_x_nft:.2}×, p99 {new_p99_x_nft:.2}×"),
            met: new_x_nft >= 1.0 && new_p99_x_nft <= 2.0,
        });
        checks.push(Check {
            target: "keep-alive requests/s ≥ nftables dnat",
            measured: format!("{name}: {keepalive_x_nft:.2}×"),
            met: keepalive_x_nft >= 1.0,
        });
        checks.push(Check {
            target: "zero wrk timeouts and socket errors",
            measured: format!("{name}: {errors} errors, {timeouts} timeouts"),
            met: errors == 0,
        });
        if let (Some(w), Some(n)) = (&lb.concurrent_10k, nft_10k) {
            let (x, p) = (w.requests_per_second / n.requests_per_second, w.p99_ms / n.p99_ms);
            checks.push(Check {
                target: "10,000 concurrent: requests/s ≥ nftables dnat, p99 ≤ 2× nftables', zero errors",
                measured: format!("{name}: {x:.2}×, p99 {p:.2}×, {} errors", w.errors),
                met: x >= 1.0 && p <= 2.0 && w.errors == 0 && w.requests > 0.0,
            });
        }
    }
    if let Some(path) = plot {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, svg(&results)).unwrap();
        let _ = writeln!(out, "\n![requests/s and p99 against concurrency]({})", path.display());
    }
    (out, checks)
}

/// Two line charts side by side: requests/s and p99 against concurrency.
fn svg(results: &[Results]) -> String {
    let colors = ["#d62728", "#ff7f0e", "#1f77b4", "#2ca02c", "#9467bd", "#7f7f7f"];
    let (w, h, pad) = (420.0, 300.0, 50.0);
    let mut out = format!(r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{}" font-family="sans-serif" font-size="11">"#, 2.0 * w + 160.0, h + 20.0);
    for (panel, (title, value)) in [
        ("keep-alive requests/s", (|w: &Wrk| w.requests_per_second) as fn(&Wrk) -> f64),
        ("p99 latency, ms", |w: &Wrk| w.p99_ms),
    ]
    .into_iter()
    .enumerate()
    {
        let x0 = panel as f64 * w;
        let max = results.iter().flat_map(|r| r.sweep.iter().map(|(_, s)| value(s))).filter(|v| v.is_finite()).fold(0.0, f64::max) * 1.1;
        let x = |i: usize| x0 + pad + i as f64 * (w - 2.0 * pad) / (CONCURRENCY.len() - 1) as f64;
        let y = |v: f64| h - pad + 10.0 - v / max.max(1e-9) * (h - 2.0 * pad);
        let _ = write!(out, r#"<text x="{}" y="20" font-size="13">{title}</text>"#, x0 + pad);
        let _ = write!(out, r#"<line x1="{0}" y1="{1}" x2="{2}" y2="{1}" stroke="black"/><line x1="{0}" y1="{1}" x2="{0}" y2="{3}" stroke="black"/>"#, x0 + pad, y(0.0), x(CONCURRENCY.len() - 1), y(max));
        for (i, c) in CONCURRENCY.iter().enumerate() {
            let _ = write!(out, r#"<text x="{}" y="{}" text-anchor="middle">c={c}</text>"#, x(i), y(0.0) + 15.0);
        }
        for t in 0..=4 {
            let v = max * t as f64 / 4.0;
            let _ = write!(out, r#"<text x="{}" y="{}" text-anchor="end">{:.0}</text>"#, x0 + pad - 4.0, y(v) + 4.0, v);
        }
        for (r, color) in results.iter().zip(colors) {
            let points: Vec<String> = r.sweep.iter().enumerate().map(|(i, (_, s))| format!("{:.1},{:.1}", x(i), y(value(s)))).collect();
            let _ = write!(out, r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#, points.join(" "));
        }
    }
    for (i, (r, color)) in results.iter().zip(colors).enumerate() {
        let yy = 40.0 + i as f64 * 18.0;
        let _ = write!(out, r#"<rect x="{}" y="{}" width="12" height="4" fill="{color}"/><text x="{}" y="{}">{}</text>"#, 2.0 * w + 10.0, yy - 4.0, 2.0 * w + 28.0, yy, r.way.name());
    }
    out.push_str("</svg>\n");
    out
}
