//! The agent's configuration file (TOML).
use std::{collections::HashSet, net::SocketAddrV4, path::PathBuf};

use anyhow::{bail, Context, Result};
use lb_common::{Timeouts, MAX_BACKENDS, MAX_SERVICES};
use serde::{Deserialize, Serialize};

/// Where the agent serves its control socket unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/lb/lb.sock";

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub agent: AgentConfig,
    #[serde(default, rename = "service")]
    pub services: Vec<ServiceConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Interfaces the XDP program is attached to: where clients arrive and
    /// where backends answer.
    pub interfaces: Vec<String>,
    pub socket: PathBuf,
    pub xdp_mode: XdpModeSetting,
    /// Connection-table capacity in flows.
    pub max_flows: u32,
    /// Services the data path has room for (at most 256). Its per-backend
    /// statistics are per CPU: about 15 KiB per service per CPU, 3.8 MiB
    /// per CPU at 256.
    pub max_services: u32,
    /// How often idle flows are looked for, in milliseconds.
    pub aging_interval_ms: u64,
    pub timeouts: TimeoutConfig,
    /// Where maps and attachments are pinned (on a BPF filesystem), so the
    /// data path outlives the agent and a new agent takes it over.
    pub pin_dir: PathBuf,
    /// Prometheus metrics on this address (`GET /metrics`); off when unset.
    /// Loopback unless you give another address.
    pub metrics: Option<std::net::SocketAddr>,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            interfaces: Vec::new(),
            socket: PathBuf::from(DEFAULT_SOCKET),
            xdp_mode: XdpModeSetting::Auto,
            max_flows: lb_common::DEFAULT_MAX_FLOWS,
            max_services: MAX_SERVICES,
            aging_interval_ms: 1000,
            timeouts: TimeoutConfig::default(),
            pin_dir: PathBuf::from("/sys/fs/bpf/lb"),
            metrics: None,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum XdpModeSetting {
    /// Native (driver) mode, falling back to generic with a warning.
    Auto,
    Native,
    Generic,
}

/// Idle timeouts in seconds by TCP state (IPVS uses 60/900/120/120).
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimeoutConfig {
    /// Half-open: the handshake is not complete (a SYN flood's flows are
    /// never completed, so this is how long they hold the table).
    pub syn: f64,
    pub established: f64,
    /// One side has closed.
    pub fin: f64,
    /// Both sides closed or reset; kept so trailing ACKs still get through.
    pub closed: f64,
}

impl Default for TimeoutConfig {
    fn default() -> Self {
        Self { syn: 10.0, established: 900.0, fin: 120.0, closed: 10.0 }
    }
}

impl TimeoutConfig {
    pub fn to_wire(self) -> Timeouts {
        let ns = |s: f64| (s * 1e9) as u64;
        Timeouts { syn: ns(self.syn), established: ns(self.established), fin: ns(self.fin), closed: ns(self.closed) }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum Scheduler {
    /// Weighted least connections over every backend (nginx `least_conn`,
    /// IPVS `wlc`).
    #[default]
    LeastConn,
    /// Weighted least connections between two backends picked at random in
    /// proportion to their weights (nginx `random two least_conn`): a new
    /// connection costs the same whatever the pool's size; for pools of
    /// many dozens of backends.
    RandomTwoLeastConn,
}

impl Scheduler {
    /// The data path's `SCHEDULER_*` value.
    pub fn wire(self) -> u32 {
        match self {
            Scheduler::LeastConn => lb_common::SCHEDULER_LEAST_CONN,
            Scheduler::RandomTwoLeastConn => lb_common::SCHEDULER_RANDOM_TWO,
        }
    }

    pub fn from_wire(value: u32) -> Self {
        match value {
            lb_common::SCHEDULER_RANDOM_TWO => Scheduler::RandomTwoLeastConn,
            _ => Scheduler::LeastConn,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Destination NAT to the backend, source NAT back on replies; the
    /// backends route through the balancer.
    #[default]
    Nat,
    /// Both ends rewritten: the backend sees the balancer's address and a
    /// port of its own per flow, so it needs no route to the clients (a
    /// drop-in for a proxy such as nginx).
    #[serde(rename = "fullnat")]
    #[value(name = "fullnat")]
    FullNat,
    /// Direct server return: the balancer sees and forwards only the
    /// clients' packets; each backend holds the VIP and answers the clients
    /// itself (`tunnel` says how packets reach it).
    Dsr,
}

/// How DSR packets reach a backend.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Tunnel {
    /// On the balancer's own segment: the frame goes to the backend's MAC
    /// address, the packet unchanged (IPVS DR).
    #[default]
    None,
    /// Inside an IPIP header from the balancer to the backend, for backends
    /// in other subnets; the backend decapsulates (`lb decap attach`).
    Ipip,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    pub name: String,
    pub vip: SocketAddrV4,
    #[serde(default)]
    pub scheduler: Scheduler,
    #[serde(default)]
    pub mode: Mode,
    /// DSR: how packets reach the backends.
    #[serde(default, skip_serializing_if = "is_default_tunnel")]
    pub tunnel: Tunnel,
    /// Active health checks; without them backends count as up unless the
    /// data path sees them fail (passive checks).
    #[serde(default)]
    pub health: Option<HealthConfig>,
    /// What happens to established flows when their backend goes down.
    #[serde(default)]
    pub on_backend_down: DownPolicy,
    /// Full NAT: the balancer's addresses backends see the flows come from
    /// (at most 4); by default each backend's: the address of the interface
    /// that reaches it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snat_addresses: Vec<std::net::Ipv4Addr>,
    /// Full NAT: the source ports, first and last. The agent reserves them
    /// from the host's own sockets (`net.ipv4.ip_local_reserved_ports`).
    #[serde(default = "default_snat_ports", skip_serializing_if = "is_default_snat_ports")]
    pub snat_ports: [u16; 2],
    #[serde(default, rename = "backend")]
    pub backends: Vec<BackendConfig>,
}

/// Below the kernel's ephemeral range (32768–60999), so the host's own
/// outgoing connections never take them; 10,000 flows per address and
/// backend.
pub const DEFAULT_SNAT_PORTS: [u16; 2] = [20000, 29999];

fn default_snat_ports() -> [u16; 2] {
    DEFAULT_SNAT_PORTS
}

fn is_default_snat_ports(ports: &[u16; 2]) -> bool {
    *ports == DEFAULT_SNAT_PORTS
}

fn is_default_tunnel(tunnel: &Tunnel) -> bool {
    *tunnel == Tunnel::None
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum DownPolicy {
    /// Established flows stay on the backend (it may only be unreachable
    /// for the checks).
    #[default]
    Keep,
    /// Established flows are closed: each client gets an RST at its next
    /// packet instead of hanging until its own timeout.
    Reset,
}

impl std::fmt::Display for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Scheduler::LeastConn => "least_conn",
            Scheduler::RandomTwoLeastConn => "random_two_least_conn",
        })
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Nat => "nat",
            Mode::FullNat => "fullnat",
            Mode::Dsr => "dsr",
        })
    }
}

impl std::fmt::Display for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Tunnel::None => "none",
            Tunnel::Ipip => "ipip",
        })
    }
}

pub const MAX_WEIGHT: u32 = 65_535;
/// The longest idle timeout, hold or ramp: 30 days. Anything longer is a
/// mistake, and durations past what a clock can add would panic.
pub const MAX_TIMEOUT: f64 = 30.0 * 86_400.0;
/// The longest health check interval or timeout: an hour.
pub const MAX_CHECK_INTERVAL: f64 = 3_600.0;

/// Checks that `value` (seconds, for the setting `what`) is a number within
/// `min..=max`, and says so if not.
pub fn seconds(what: &str, value: f64, min: f64, max: f64) -> Result<()> {
    if !(value >= min && value <= max) {
        bail!("{what} must be between {min} and {max} seconds, not {value}");
    }
    Ok(())
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    pub address: SocketAddrV4,
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Takes new flows only while no primary backend can.
    #[serde(default)]
    pub backup: bool,
    /// Cap on active connections (0: none), like nginx's `max_conns`.
    #[serde(default)]
    pub max_conns: u32,
    /// Passive checks, like nginx: this many failed handshakes within
    /// `fail_timeout` seconds mark the backend down for `fail_timeout`.
    /// 0 turns passive checks off.
    #[serde(default = "default_max_fails")]
    pub max_fails: u32,
    #[serde(default = "default_fail_timeout")]
    pub fail_timeout: f64,
    /// Seconds over which a recovered or added backend's share of new
    /// connections ramps up, so least connections does not flood it.
    #[serde(default)]
    pub slow_start: f64,
}

impl BackendConfig {
    pub fn new(address: SocketAddrV4, weight: u32) -> Self {
        Self {
            address,
            weight,
            backup: false,
            max_conns: 0,
            max_fails: default_max_fails(),
            fail_timeout: default_fail_timeout(),
            slow_start: 0.0,
        }
    }
}

fn default_weight() -> u32 {
    1
}

fn default_max_fails() -> u32 {
    1
}

fn default_fail_timeout() -> f64 {
    10.0
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum CheckKind {
    #[default]
    Tcp,
    Http,
}

/// Active checks of one service's backends. The defaults find a dead
/// backend in about a second (3 failures 0.25 s apart, each allowed 0.35 s)
/// and need three failures in a row, so one slow answer does not flap it.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    #[serde(rename = "type")]
    pub kind: CheckKind,
    /// Seconds between the starts of two checks.
    pub interval: f64,
    /// Seconds a check may take.
    pub timeout: f64,
    /// Successes in a row that bring a down backend up.
    pub rise: u32,
    /// Failures in a row that take an up backend down.
    pub fall: u32,
    /// Check this port instead of the backend's own.
    pub port: Option<u16>,
    /// HTTP: the path to GET and the status codes that mean healthy.
    pub path: String,
    pub expect_status: [u16; 2],
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            kind: CheckKind::Tcp,
            interval: 0.25,
            timeout: 0.35,
            rise: 2,
            fall: 3,
            port: None,
            path: "/health".into(),
            expect_status: [200, 399],
        }
    }
}

impl HealthConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        seconds("health: interval", self.interval, 0.01, MAX_CHECK_INTERVAL)?;
        seconds("health: timeout", self.timeout, 0.01, MAX_CHECK_INTERVAL)?;
        if self.rise == 0 || self.fall == 0 {
            anyhow::bail!("health: rise and fall must be at least 1");
        }
        if !self.path.starts_with('/') {
            anyhow::bail!("health: path must start with '/', as in \"/health\"");
        }
        if self.expect_status[0] > self.expect_status[1] {
            anyhow::bail!("health: expect_status is a range [low, high]");
        }
        Ok(())
    }
}

impl Config {
    pub fn load(path: &std::path::Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read the config file {}", path.display()))?;
        Self::parse(&text, path)
    }

    /// A config file's text, read from `path`.
    pub fn parse(text: &str, path: &std::path::Path) -> Result<Self> {
        refuse_proxy_protocol(text).with_context(|| format!("{} is not a valid config", path.display()))?;
        let config: Config =
            toml::from_str(text).with_context(|| format!("{} is not a valid config", path.display()))?;
        config.validate().with_context(|| format!("{} is not a valid config", path.display()))?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<()> {
        let a = &self.agent;
        if a.max_flows == 0 || a.max_flows > 64 * 1024 * 1024 {
            bail!("agent.max_flows must be between 1 and 67108864, not {}", a.max_flows);
        }
        if a.max_services == 0 || a.max_services > MAX_SERVICES {
            bail!("agent.max_services must be between 1 and {MAX_SERVICES}, not {}", a.max_services);
        }
        if a.aging_interval_ms == 0 || a.aging_interval_ms > 3_600_000 {
            bail!("agent.aging_interval_ms must be between 1 and 3600000 (an hour), not {}", a.aging_interval_ms);
        }
        let t = &a.timeouts;
        for (name, v) in [("syn", t.syn), ("established", t.established), ("fin", t.fin), ("closed", t.closed)] {
            seconds(&format!("agent.timeouts.{name}"), v, 0.001, MAX_TIMEOUT)?;
        }
        if self.services.len() > a.max_services as usize {
            bail!(
                "{} services, but agent.max_services is {}: raise it (up to {MAX_SERVICES})",
                self.services.len(),
                a.max_services
            );
        }
        let mut names = HashSet::new();
        let mut vips = HashSet::new();
        for s in &self.services {
            s.validate()?;
            if !names.insert(&s.name) {
                bail!("service name {:?} is used twice", s.name);
            }
            if !vips.insert(s.vip) {
                bail!("VIP {} is used by two services", s.vip);
            }
        }
        Ok(())
    }
}

impl ServiceConfig {
    pub fn validate(&self) -> Result<()> {
        validate_name(&self.name)?;
        if self.vip.port() == 0 {
            bail!("service {}: the VIP needs a port, as in 198.18.0.100:80", self.name);
        }
        if self.backends.len() > MAX_BACKENDS as usize {
            bail!("service {}: at most {MAX_BACKENDS} backends, not {}", self.name, self.backends.len());
        }
        if let Some(h) = &self.health {
            h.validate().with_context(|| format!("service {}", self.name))?;
        }
        if self.mode != Mode::FullNat && (!self.snat_addresses.is_empty() || self.snat_ports != DEFAULT_SNAT_PORTS) {
            bail!("service {}: snat_addresses and snat_ports are for mode = \"fullnat\"", self.name);
        }
        if self.snat_addresses.len() > lb_common::MAX_SNAT_ADDRS {
            bail!(
                "service {}: at most {} snat_addresses, not {}",
                self.name,
                lb_common::MAX_SNAT_ADDRS,
                self.snat_addresses.len()
            );
        }
        if let Some(bad) =
            self.snat_addresses.iter().find(|a| a.is_unspecified() || a.is_multicast() || a.is_broadcast())
        {
            bail!("service {}: snat_addresses: {bad} is not an address of this host", self.name);
        }
        let [first, last] = self.snat_ports;
        if first < 1024 || first > last {
            bail!("service {}: snat_ports must be [first, last] with 1024 <= first <= last <= 65535, not [{first}, {last}]", self.name);
        }
        if self.mode != Mode::Dsr && self.tunnel != Tunnel::None {
            bail!("service {}: tunnel = \"{}\" is for mode = \"dsr\"", self.name, self.tunnel);
        }
        let mut seen = HashSet::new();
        for b in &self.backends {
            b.validate(&self.name)?;
            self.check_backend_port(b)?;
            if !seen.insert(b.address) {
                bail!("service {}: backend {} is listed twice", self.name, b.address);
            }
        }
        Ok(())
    }
}

impl ServiceConfig {
    /// In DSR the packet reaches the backend with the VIP's port, and the
    /// backend answers from it: a backend on another port cannot serve.
    pub fn check_backend_port(&self, b: &BackendConfig) -> Result<()> {
        if self.mode == Mode::Dsr && b.address.port() != self.vip.port() {
            bail!(
                "service {}: in DSR a backend gets the client's packets as sent, to the VIP's port {}, so it \
                 listens on that port, not {}: give backend {} port {}",
                self.name,
                self.vip.port(),
                b.address.port(),
                b.address.ip(),
                self.vip.port()
            );
        }
        Ok(())
    }
}

/// PROXY protocol is not done yet: a config that asks for it is told so,
/// and how to keep the client's address another way, rather than only that
/// the key is unknown.
fn refuse_proxy_protocol(text: &str) -> Result<()> {
    let Ok(value) = toml::from_str::<toml::Value>(text) else {
        return Ok(()); // the full parse says what is wrong
    };
    let services = value.get("service").and_then(|s| s.as_array()).cloned().unwrap_or_default();
    for s in &services {
        if s.get("proxy_protocol").is_some() {
            let name = s.get("name").and_then(|n| n.as_str()).unwrap_or("?");
            bail!(
                "service {name}: proxy_protocol is not supported yet. Backends that need the client's address get \
                 it with mode = \"nat\" or \"dsr\" (they see the client itself); in full NAT `lb conntrack` \
                 shows which client each of the balancer's ports carries"
            );
        }
    }
    Ok(())
}

pub fn validate_name(name: &str) -> Result<()> {
    let ok =
        !name.is_empty() && name.len() <= 64 && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if !ok {
        bail!("service name {name:?} must be 1-64 letters, digits, '-', '_' or '.'");
    }
    Ok(())
}

impl BackendConfig {
    pub fn validate(&self, service: &str) -> Result<()> {
        validate_backend(service, self.address, self.weight)?;
        for (name, v) in [("fail_timeout", self.fail_timeout), ("slow_start", self.slow_start)] {
            seconds(&format!("service {service}: backend {}: {name}", self.address), v, 0.0, MAX_TIMEOUT)?;
        }
        Ok(())
    }
}

pub fn validate_backend(service: &str, address: SocketAddrV4, weight: u32) -> Result<()> {
    if address.port() == 0 || address.ip().is_unspecified() {
        bail!("service {service}: backend {address} needs an address and a port, as in 198.19.0.11:80");
    }
    if weight > MAX_WEIGHT {
        bail!("service {service}: backend {address}: weight must be 0-{MAX_WEIGHT}, not {weight}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_example_parses() {
        let c: Config = toml::from_str(
            r#"
            [agent]
            interfaces = ["cli", "srv"]
            socket = "/run/lb/lb.sock"

            [[service]]
            name = "web"
            vip = "198.18.0.100:80"
            scheduler = "least_conn"
            mode = "nat"

            [[service.backend]]
            address = "198.19.0.11:80"
            weight = 1
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.services[0].backends[0].address.to_string(), "198.19.0.11:80");
        assert_eq!(c.agent.timeouts.established, 900.0);
    }

    #[test]
    fn proxy_protocol_is_refused_with_what_to_do_instead() {
        let text = "[[service]]\nname = 'web'\nvip = '198.18.0.100:80'\nmode = 'fullnat'\nproxy_protocol = true\n";
        let err = format!("{:#}", Config::parse(text, std::path::Path::new("lb.toml")).unwrap_err());
        assert!(err.contains("service web: proxy_protocol is not supported yet"), "{err}");
        assert!(err.contains("mode = \"nat\" or \"dsr\""), "{err}");
    }

    #[test]
    fn mistakes_are_named() {
        let err = |text: &str| {
            let c: Result<Config, _> = toml::from_str(text);
            match c {
                Err(e) => e.to_string(),
                Ok(c) => format!("{:#}", c.validate().unwrap_err()),
            }
        };
        assert!(err("[[service]]\nname='a'\nvip='1.2.3.4'").contains("socket address"));
        assert!(err("[[service]]\nname='a'\nvip='1.2.3.4:80'\nscheduler='rr'").contains("least_conn"));
        assert!(err("[[service]]\nname='a'\nvip='1.2.3.4:80'\n[[service]]\nname='a'\nvip='1.2.3.5:80'")
            .contains("used twice"));
        assert!(err("[[service]]\nname='a'\nvip='1.2.3.4:80'\ntunnel='ipip'").contains("is for mode = \"dsr\""));
        assert!(err("[[service]]\nname='a'\nvip='1.2.3.4:80'\nmode='dsr'\ntunnel='gre'").contains("ipip"));
        let dsr_port =
            err("[[service]]\nname='a'\nvip='1.2.3.4:80'\nmode='dsr'\n[[service.backend]]\naddress='1.2.3.5:8080'");
        assert!(dsr_port.contains("give backend 1.2.3.5 port 80"), "{dsr_port}");
        assert!(err(
            "[[service]]\nname='a'\nvip='1.2.3.4:80'\n[[service.backend]]\naddress='1.1.1.1:80'\nweight=70000"
        )
        .contains("weight"));
        assert!(err("[agent]\nbogus=1").contains("unknown field"));
        let backend = "[[service]]\nname='a'\nvip='1.2.3.4:80'\n[[service.backend]]\naddress='1.1.1.1:80'\n";
        for (extra, said) in [
            (
                "fail_timeout = 1e30",
                "fail_timeout must be between 0 and 2592000 seconds, not 1000000000000000000000000000000",
            ),
            ("fail_timeout = -1", "fail_timeout must be between 0"),
            ("fail_timeout = nan", "fail_timeout must be between 0"),
            ("slow_start = inf", "slow_start must be between 0"),
        ] {
            let e = err(&format!("{backend}{extra}"));
            assert!(e.contains(said), "{extra}: {e}");
        }
        let health = "[[service]]\nname='a'\nvip='1.2.3.4:80'\n[service.health]\n";
        assert!(err(&format!("{health}interval = 1e30")).contains("health: interval must be between 0.01 and 3600"));
        assert!(err(&format!("{health}timeout = 0")).contains("health: timeout must be between 0.01"));
        assert!(err("[agent.timeouts]\nestablished = 1e30").contains("agent.timeouts.established must be between"));
        assert!(err("[agent]\naging_interval_ms = 86400000000").contains("aging_interval_ms must be between 1"));
        assert!(err("[agent]\nmax_services=0").contains("agent.max_services must be between 1 and 256"));
        assert!(err(
            "[agent]\nmax_services=1\n[[service]]\nname='a'\nvip='1.2.3.4:80'\n[[service]]\nname='b'\nvip='1.2.3.5:80'"
        )
        .contains("2 services, but agent.max_services is 1"));
    }
}
