//! The agent's configuration file (TOML).
use std::{collections::HashSet, net::SocketAddrV4, path::PathBuf};

use anyhow::{bail, Context, Result};
use lb_common::{Timeouts, MAX_BACKENDS, MAX_SERVICES};
use serde::{Deserialize, Serialize};

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
    /// How often idle flows are looked for, in milliseconds.
    pub aging_interval_ms: u64,
    pub timeouts: TimeoutConfig,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            interfaces: Vec::new(),
            socket: PathBuf::from(crate::control::DEFAULT_SOCKET),
            xdp_mode: XdpModeSetting::Auto,
            max_flows: lb_common::DEFAULT_MAX_FLOWS,
            aging_interval_ms: 1000,
            timeouts: TimeoutConfig::default(),
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
    /// Handshake not answered by the backend yet.
    pub syn: f64,
    pub established: f64,
    /// One side has closed.
    pub fin: f64,
    /// Both sides closed or reset; kept so trailing ACKs still get through.
    pub closed: f64,
}

impl Default for TimeoutConfig {
    fn default() -> Self {
        Self { syn: 30.0, established: 900.0, fin: 120.0, closed: 10.0 }
    }
}

impl TimeoutConfig {
    pub fn to_wire(self) -> Timeouts {
        let ns = |s: f64| (s * 1e9) as u64;
        Timeouts {
            syn: ns(self.syn),
            established: ns(self.established),
            fin: ns(self.fin),
            closed: ns(self.closed),
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Scheduler {
    /// Weighted least connections.
    #[default]
    LeastConn,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Destination NAT to the backend, source NAT back on replies; the
    /// backends route through the balancer.
    #[default]
    Nat,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    pub name: String,
    pub vip: SocketAddrV4,
    #[serde(default)]
    pub scheduler: Scheduler,
    #[serde(default)]
    pub mode: Mode,
    #[serde(default, rename = "backend")]
    pub backends: Vec<BackendConfig>,
}

impl std::fmt::Display for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Scheduler::LeastConn => "least_conn",
        })
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Nat => "nat",
        })
    }
}

pub const MAX_WEIGHT: u32 = 65_535;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    pub address: SocketAddrV4,
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

impl Config {
    pub fn load(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the config file {}", path.display()))?;
        let config: Config = toml::from_str(&text)
            .with_context(|| format!("{} is not a valid config", path.display()))?;
        config.validate().with_context(|| format!("{} is not a valid config", path.display()))?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<()> {
        let a = &self.agent;
        if a.max_flows == 0 || a.max_flows > 64 * 1024 * 1024 {
            bail!("agent.max_flows must be between 1 and 67108864, not {}", a.max_flows);
        }
        if a.aging_interval_ms == 0 {
            bail!("agent.aging_interval_ms must be at least 1");
        }
        let t = &a.timeouts;
        for (name, v) in [("syn", t.syn), ("established", t.established), ("fin", t.fin), ("closed", t.closed)] {
            if !(v > 0.0 && v.is_finite()) {
                bail!("agent.timeouts.{name} must be a positive number of seconds, not {v}");
            }
        }
        if self.services.len() > MAX_SERVICES as usize {
            bail!("at most {MAX_SERVICES} services, not {}", self.services.len());
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
        let mut seen = HashSet::new();
        for b in &self.backends {
            validate_backend(&self.name, b.address, b.weight)?;
            if !seen.insert(b.address) {
                bail!("service {}: backend {} is listed twice", self.name, b.address);
            }
        }
        Ok(())
    }
}

pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if !ok {
        bail!("service name {name:?} must be 1-64 letters, digits, '-', '_' or '.'");
    }
    Ok(())
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
        assert!(err("[[service]]\nname='a'\nvip='1.2.3.4:80'\n[[service.backend]]\naddress='1.1.1.1:80'\nweight=70000")
            .contains("weight"));
        assert!(err("[agent]\nbogus=1").contains("unknown field"));
    }
}
