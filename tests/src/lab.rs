//! The standard lab: a client, the load balancer and N backends, each in its
//! own network namespace, joined by veth links and a bridge:
//!
//! ```text
//! client 198.18.0.2 ── cli [lb] srv ── bridge ─┬─ backend 198.19.0.11
//!                    198.18.0.1   198.19.0.1   ├─ backend 198.19.0.12
//!                                              └─ ...
//! ```
//! The VIP is routed to the balancer; the backends' default route is the
//! balancer, so replies come back through it.
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::{
    netns::{sh, Netns},
    servers::{EchoProcess, EchoServer},
};

pub const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const LB_CLIENT_SIDE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const LB_SERVER_SIDE: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
pub const VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 1, 100), 80);
/// The client's address on the backends' network (`Lab::one_arm_client`).
pub const ONE_ARM_CLIENT: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 2);

pub fn backend_addr(i: usize) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(198, 19, 0, 11 + i as u8), 80)
}

pub struct Lab {
    pub client: Netns,
    pub lb: Netns,
    pub backends: Vec<Netns>,
    pub dir: PathBuf,
    // Dropped last: the bridge the others hang off.
    pub switch: Netns,
}

impl Lab {
    pub fn new(backends: usize) -> Self {
        Self::with_queues(backends, 1)
    }

    /// The same with every veth given `queues` transmit and receive queues,
    /// as a NIC with RSS has: XDP then runs in that many NAPI contexts.
    pub fn with_queues(backends: usize, queues: u32) -> Self {
        let q = if queues > 1 { format!(" numtxqueues {queues} numrxqueues {queues}") } else { String::new() };
        let client = Netns::new("client");
        let lb = Netns::new("lb");
        let switch = Netns::new("switch");
        sh(&format!("ip link add eth0 netns {}{q} type veth peer cli netns {}{q}", client.name, lb.name));
        sh(&format!("ip link add srv netns {}{q} type veth peer uplink netns {}{q}", lb.name, switch.name));
        switch.exec("ip link add br0 type bridge && ip link set br0 up && ip link set uplink master br0 && ip link set uplink up");
        client.exec(&format!(
            "ip addr add {CLIENT}/24 dev eth0 && ip link set eth0 up && ip route add default via {LB_CLIENT_SIDE}"
        ));
        lb.exec(&format!(
            "ip addr add {LB_CLIENT_SIDE}/24 dev cli && ip addr add {LB_SERVER_SIDE}/24 dev srv \
             && ip link set cli up && ip link set srv up \
             && sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0"
        ));
        let mut backend_ns = Vec::new();
        for i in 0..backends {
            let ns = Netns::new(&format!("b{}", i + 1));
            let port = format!("p{}", i + 1);
            sh(&format!("ip link add eth0 netns {}{q} type veth peer {port} netns {}{q}", ns.name, switch.name));
            switch.exec(&format!("ip link set {port} master br0 && ip link set {port} up"));
            ns.exec(&format!(
                "ip addr add {}/24 dev eth0 && ip link set eth0 up && ip route add default via {LB_SERVER_SIDE}",
                backend_addr(i).ip()
            ));
            backend_ns.push(ns);
        }
        // Senders compute full checksums (as packets from a real wire carry);
        // receivers of XDP redirects need GRO on veth to take them.
        for ns in std::iter::once(&client).chain(&backend_ns) {
            ns.exec("ethtool -K eth0 tx off tso off gso off gro on >/dev/null");
        }
        switch.exec("ethtool -K uplink gro on >/dev/null");
        lb.exec("ethtool -K cli gro on >/dev/null && ethtool -K srv gro on >/dev/null");
        let dir = std::env::temp_dir().join(&lb.name);
        std::fs::create_dir_all(&dir).unwrap();
        Self { client, lb, backends: backend_ns, dir, switch }
    }

    /// Polls every queue of each host's links on that host's own CPUs
    /// (taskset lists): the client's on `client`, the balancer's on
    /// `balancer`, the backends' and the switch's on `backends`.
    pub fn pin_napi(&self, client: &str, balancer: &str, backends: &str) {
        pin_napi(&self.client, &["eth0"], client);
        pin_napi(&self.lb, &["cli", "srv"], balancer);
        for b in &self.backends {
            pin_napi(b, &["eth0"], backends);
        }
        pin_napi(&self.switch, &["uplink"], backends);
    }

    /// One-arm: gives the client a second link, onto the backends' network
    /// (198.19.0.2), and routes the VIP through the balancer's address there,
    /// so clients and backends reach the balancer through one interface.
    pub fn one_arm_client(&self) -> Ipv4Addr {
        sh(&format!("ip link add eth1 netns {} type veth peer pc netns {}", self.client.name, self.switch.name));
        self.switch.exec("ip link set pc master br0 && ip link set pc up");
        self.client.exec(&format!(
            "ip addr add {ONE_ARM_CLIENT}/24 dev eth1 && ip link set eth1 up \
             && ethtool -K eth1 tx off tso off gso off gro on >/dev/null \
             && ip route replace {}/32 via {LB_SERVER_SIDE} dev eth1",
            VIP.ip()
        ));
        ONE_ARM_CLIENT
    }

    /// Takes the backends' route to the clients away: only full NAT can
    /// reach them now.
    pub fn backends_without_routes(&self) {
        for ns in &self.backends {
            ns.exec("ip route del default");
        }
    }

    /// DSR backends, set up as README's "Backends for DSR" says: the VIP on
    /// `lo`, ARP for it neither answered nor announced on the network, and
    /// reverse-path filtering loose (a tunnelled packet comes in on an
    /// interface that has no route to its client). With `tunnel`, `lb decap
    /// attach` on each backend's interface, pinned under this lab's pins.
    pub fn dsr_backends(&self, tunnel: bool) {
        for (i, ns) in self.backends.iter().enumerate() {
            ns.exec(&format!(
                "ip addr add {}/32 dev lo \
                 && sysctl -qw net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.all.arp_announce=2 \
                 net.ipv4.conf.all.rp_filter=2 net.ipv4.conf.eth0.rp_filter=2",
                VIP.ip()
            ));
            if tunnel {
                let pins = self.pin_dir().join(format!("decap-b{}", i + 1));
                let out = Command::new("nsenter")
                    .arg(format!("--net=/run/netns/{}", ns.name))
                    .arg(lb_binary())
                    .args(["decap", "attach", "eth0", "--vip", &VIP.ip().to_string(), "--pin-dir"])
                    .arg(&pins)
                    .output()
                    .expect("run lb decap attach");
                assert!(out.status.success(), "lb decap attach: {}", String::from_utf8_lossy(&out.stderr));
            }
        }
    }

    /// Echo servers on port 80 of every address of every backend (the VIP
    /// a DSR backend holds, and its own for health checks), named b1, b2, ...
    pub fn start_servers_on_all_addresses(&self) -> Vec<EchoServer> {
        let any = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, VIP.port());
        self.backends.iter().enumerate().map(|(i, ns)| EchoServer::start(ns, any, &format!("b{}", i + 1))).collect()
    }

    /// The same as processes (`lb-echo`, HTTP health on 81), which a test
    /// can kill.
    pub fn start_processes_on_all_addresses(&self) -> Vec<EchoProcess> {
        let any = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, VIP.port());
        (0..self.backends.len())
            .map(|i| EchoProcess::start(&self.backends[i], any, &format!("b{}", i + 1), &self.unhealthy_flag(i)))
            .collect()
    }

    /// An echo server on port 80 of every backend, named b1, b2, ...
    pub fn start_servers(&self) -> Vec<EchoServer> {
        self.backends
            .iter()
            .enumerate()
            .map(|(i, ns)| EchoServer::start(ns, backend_addr(i), &format!("b{}", i + 1)))
            .collect()
    }

    /// The config for one service "web" on VIP over these backends, with the
    /// given weights and extra `[agent]` lines.
    pub fn config(&self, weights: &[u32], agent_extra: &str) -> String {
        let backends: Vec<String> = weights.iter().map(|w| format!("weight = {w}")).collect();
        let backends: Vec<&str> = backends.iter().map(String::as_str).collect();
        self.config_full(&backends, agent_extra, "")
    }

    /// The same with free TOML: lines for each backend (one per backend, in
    /// order), for `[agent]`, and for the service (after its other keys, so
    /// it may open tables such as `[service.health]`).
    pub fn config_full(&self, backends: &[&str], agent_extra: &str, service_extra: &str) -> String {
        let mut c = format!(
            "[agent]\ninterfaces = [\"cli\", \"srv\"]\nsocket = \"{}\"\npin_dir = \"{}\"\n{agent_extra}\n\n\
             [[service]]\nname = \"web\"\nvip = \"{VIP}\"\nscheduler = \"least_conn\"\nmode = \"nat\"\n{service_extra}\n",
            self.socket().display(),
            self.pin_dir().display()
        );
        for (i, extra) in backends.iter().enumerate() {
            c.push_str(&format!("\n[[service.backend]]\naddress = \"{}\"\n{extra}\n", backend_addr(i)));
        }
        c
    }

    /// Backend servers as processes (`lb-echo`), named b1, b2, ...: echo on
    /// port 80, HTTP health on 81.
    pub fn start_processes(&self) -> Vec<EchoProcess> {
        (0..self.backends.len()).map(|i| self.start_process(i)).collect()
    }

    pub fn start_process(&self, i: usize) -> EchoProcess {
        EchoProcess::start(&self.backends[i], backend_addr(i), &format!("b{}", i + 1), &self.unhealthy_flag(i))
    }

    /// While this file exists, backend i's HTTP health endpoint answers 503.
    pub fn unhealthy_flag(&self, i: usize) -> PathBuf {
        self.dir.join(format!("b{}.unhealthy", i + 1))
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("lb.sock")
    }

    /// This lab's pinned data path, on the host's BPF filesystem.
    pub fn pin_dir(&self) -> PathBuf {
        PathBuf::from("/sys/fs/bpf").join(&self.lb.name)
    }

    /// Starts `lb agent` inside the balancer's namespace and waits until it
    /// answers on its socket.
    pub fn start_agent(&self, config: &str) -> Agent {
        self.start_agent_from(&lb_binary(), config)
    }

    /// The same with the `lb` binary at `binary` (another build).
    pub fn start_agent_from(&self, binary: &std::path::Path, config: &str) -> Agent {
        let path = self.dir.join("lb.toml");
        std::fs::write(&path, config).unwrap();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("agent.log")).unwrap();
        // nsenter, not `ip netns exec`: that one remounts /sys, hiding the
        // host's BPF filesystem where the agent pins its state.
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.lb.name))
            .arg(binary)
            .args(["agent", "--config"])
            .arg(&path)
            .env("LB_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start lb agent");
        let agent = Agent { child, socket: self.socket(), log: self.dir.join("agent.log") };
        let deadline = Instant::now() + Duration::from_secs(20);
        while agent.cli(&["status", "--json"]).is_err() {
            if Instant::now() > deadline {
                panic!("the agent did not come up; its log:\n{}", agent.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        agent
    }
}

/// The usual start of an end-to-end test: the serial lock, a lab with one
/// echo server per weight, and an agent balancing over them with `weights`
/// (`agent_extra` goes into `[agent]`). Dropped, it stops the agent, then
/// the servers, then removes the lab, then lets the next test run.
pub struct Running {
    pub agent: Agent,
    pub servers: Vec<EchoServer>,
    pub lab: Lab,
    _serial: std::sync::MutexGuard<'static, ()>,
}

pub fn start(weights: &[u32], agent_extra: &str) -> Running {
    let serial = crate::serial();
    let lab = Lab::new(weights.len());
    let servers = lab.start_servers();
    let agent = lab.start_agent(&lab.config(weights, agent_extra));
    Running { agent, servers, lab, _serial: serial }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_dir_all(self.pin_dir());
    }
}

/// The `lb` binary the tests run: `LB_BIN`, or the release build.
pub fn lb_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("LB_BIN") {
        return bin.into();
    }
    let bin = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/lb");
    assert!(bin.exists(), "{} is missing: run `cargo xtask build` (or `cargo xtask test`)", bin.display());
    bin
}

/// The same code built as another version (`--features next-build`, built
/// by `cargo xtask build`): the upgrade test's second build.
pub fn lb_next_binary() -> PathBuf {
    let bin = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/next/release/lb");
    assert!(bin.exists(), "{} is missing: run `cargo xtask build`", bin.display());
    bin
}

pub struct Agent {
    child: Child,
    pub socket: PathBuf,
    log: PathBuf,
}

impl Agent {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Runs an `lb` CLI command against this agent; Err holds its stderr.
    pub fn cli(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new(lb_binary())
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// Waits (up to `timeout`) until every backend of service `service`
    /// (its index in the status) counts no active connection.
    pub fn wait_for_counts_back_to_0(&self, service: usize, timeout: Duration) {
        self.wait_for("every count back to 0", timeout, |s| {
            s["services"][service]["backends"].as_array().unwrap().iter().all(|b| b["active_connections"] == 0)
        });
    }

    pub fn status(&self) -> serde_json::Value {
        let text = self.cli(&["status", "--json"]).expect("lb status --json");
        serde_json::from_str(&text).expect("status is JSON")
    }

    /// Active connections per backend address of service `web`.
    pub fn active(&self) -> Vec<(String, u64)> {
        self.backends()
            .iter()
            .map(|b| (b["address"].as_str().unwrap().to_string(), b["active_connections"].as_u64().unwrap()))
            .collect()
    }

    pub fn backends(&self) -> Vec<serde_json::Value> {
        self.status()["services"][0]["backends"].as_array().cloned().unwrap_or_default()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// One backend of service `web` by address.
    pub fn backend(&self, address: SocketAddrV4) -> serde_json::Value {
        let address = address.to_string();
        self.backends().into_iter().find(|b| b["address"] == address.as_str()).expect("no such backend")
    }

    /// Waits until `check` holds for the status, or panics with the last one.
    pub fn wait_for(&self, what: &str, timeout: Duration, check: impl Fn(&serde_json::Value) -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.status();
            if check(&status) {
                return;
            }
            if Instant::now() > deadline {
                panic!("timed out waiting for {what}; status:\n{status:#}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn signal(&self, signal: i32) {
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    /// Kills the agent as a crash would (SIGKILL).
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stops the agent as a user would (SIGTERM) and returns its exit status.
    pub fn stop(mut self) -> std::process::ExitStatus {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.child.wait().unwrap()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while let Ok(None) = self.child.try_wait() {
                if Instant::now() > deadline {
                    let _ = self.child.kill();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.wait();
        }
    }
}

/// Gives `links` in `ns` threaded NAPI, each queue's poll thread pinned to
/// the next CPU of `cpus` (a taskset list such as 4-7), as a NIC with RSS
/// has each queue's interrupt on a CPU of its own. Without it a veth queue is
/// polled on whichever CPU its sender ran, and XDP redirects, which pick the
/// peer's queue by the CPU they run on, spread one flow's packets over
/// several queues and reorder them (on 16 CPUs, about one connection in 30).
pub fn pin_napi(ns: &Netns, links: &[&str], cpus: &str) {
    let cpus = cpu_list(cpus).unwrap_or_default();
    if cpus.is_empty() {
        return;
    }
    let mut next = 0;
    for link in links {
        let before = napi_threads();
        ns.exec(&format!("echo 1 > /sys/class/net/{link}/threaded"));
        for pid in napi_threads().difference(&before) {
            sh(&format!("taskset -pc {} {pid} >/dev/null", cpus[next % cpus.len()]));
            next += 1;
        }
    }
}

/// The pids of the kernel's NAPI poll threads.
fn napi_threads() -> std::collections::BTreeSet<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.starts_with("napi/")))
        .collect()
}

/// The CPUs a taskset list names: "4-7,9" is [4, 5, 6, 7, 9].
pub fn cpu_list(list: &str) -> Result<Vec<usize>, String> {
    let bad = || format!("{list:?} is not a CPU list such as 0-3,8");
    let mut cpus = Vec::new();
    for part in list.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
                if b < a {
                    return Err(bad());
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(part.parse().map_err(|_| bad())?),
        }
    }
    Ok(cpus)
}
