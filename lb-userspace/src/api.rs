//! The control protocol: what the CLI asks the agent over its socket, one
//! JSON request per line and one JSON answer, and the status it reports.
//! Both sides use these types; nothing here knows how the agent works.
use std::{collections::BTreeMap, net::SocketAddrV4};

use serde::{Deserialize, Serialize};

use crate::config::{BackendConfig, DownPolicy, HealthConfig, Mode, Scheduler, ServiceConfig, Tunnel};

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Request {
    Status,
    Conntrack,
    ServiceAdd { service: ServiceConfig },
    ServiceRemove { name: String },
    BackendAdd { service: String, backend: BackendConfig },
    BackendRemove { service: String, address: SocketAddrV4 },
    BackendWeight { service: String, address: SocketAddrV4, weight: u32 },
    BackendAdmin { service: String, address: SocketAddrV4, admin: Admin },
    /// Switches `lb trace` on with these filters (or keeps it on: each
    /// call renews it for `reconcile::trace::LEASE`) and returns the lines
    /// after sequence number `after`.
    Trace {
        #[serde(default)]
        service: Option<String>,
        #[serde(default)]
        client: Option<std::net::Ipv4Addr>,
        per_second: u32,
        after: u64,
    },
    TraceStop,
    /// Re-read the config file and apply the difference.
    Reload,
    /// Take the data path off and stop the agent.
    Shutdown,
}

impl Request {
    /// Whether carrying it out changes what the agent runs (and so what a
    /// restarted agent must take back).
    pub fn changes_state(&self) -> bool {
        !matches!(
            self,
            Request::Status
                | Request::Conntrack
                | Request::Trace { .. }
                | Request::TraceStop
                | Request::Reload
                | Request::Shutdown
        )
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub result: serde_json::Value,
}

impl Response {
    pub fn ok(result: serde_json::Value) -> Self {
        Self { ok: true, error: None, result }
    }

    pub fn error(message: String) -> Self {
        Self { ok: false, error: Some(message), result: serde_json::Value::Null }
    }

    /// An error's whole chain of context goes to the caller.
    pub fn from_result(result: anyhow::Result<serde_json::Value>) -> Self {
        match result {
            Ok(value) => Self::ok(value),
            Err(e) => Self::error(format!("{e:#}")),
        }
    }
}

/// What the operator asked of a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Admin {
    Enabled,
    /// No new flows; established ones finish.
    Draining,
    /// No new flows; established ones follow the service's down policy.
    Disabled,
}

/// A backend's state as `lb status` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendState {
    Up,
    /// Up, its share of new connections still ramping up.
    SlowStart,
    Down,
    Draining,
    Disabled,
    /// Removed; its established flows are finishing.
    Removing,
}

impl std::fmt::Display for BackendState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(match self {
            BackendState::Up => "up",
            BackendState::SlowStart => "slow_start",
            BackendState::Down => "down",
            BackendState::Draining => "draining",
            BackendState::Disabled => "disabled",
            BackendState::Removing => "removing",
        })
    }
}

/// An active health check's outcome.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CheckResult {
    pub ok: bool,
    pub latency_ms: f64,
    /// What went wrong, or what was seen ("connected", "HTTP 200").
    pub detail: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Status {
    pub services: Vec<ServiceStatus>,
    pub flow_table: FlowTableStatus,
    /// The data path's counters by name (`lb_common::Counter::name`).
    pub counters: BTreeMap<String, u64>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub name: String,
    pub vip: String,
    pub scheduler: Scheduler,
    pub mode: Mode,
    /// DSR: how packets reach the backends.
    #[serde(default)]
    pub tunnel: Tunnel,
    pub on_backend_down: DownPolicy,
    pub health_check: Option<HealthConfig>,
    pub active_connections: u64,
    pub half_open_connections: u64,
    pub total_connections: u64,
    pub backends: Vec<BackendStatus>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct BackendStatus {
    pub address: String,
    pub weight: u32,
    pub state: BackendState,
    /// Why it is in that state, and since when (Unix seconds).
    pub reason: String,
    pub since: f64,
    /// May take new flows now (a backup only takes them when no primary can).
    pub eligible: bool,
    pub backup: bool,
    pub max_conns: u32,
    /// Slow start: the share of its full load it may take now, 0 to 1.
    pub slow_start_progress: Option<f64>,
    /// Established connections: what `max_conns`, drains and least
    /// connections count.
    pub active_connections: u64,
    /// Handshakes not completed yet (a SYN flood's are never completed):
    /// weighed lightly by least connections, and aged after `timeouts.syn`.
    pub half_open_connections: u64,
    pub total_connections: u64,
    /// New connections and bytes (both ways) per second, over the last second.
    pub connections_per_second: f64,
    pub bytes_per_second: f64,
    pub packets_in: u64,
    pub bytes_in: u64,
    pub packets_out: u64,
    pub bytes_out: u64,
    /// Passive health: handshakes refused with RST, SYNs left unanswered.
    pub refused: u64,
    pub unanswered: u64,
    /// Full NAT: the balancer's source ports taken towards this backend, by
    /// live flows, closed ones and ports held for its TIME_WAIT; each
    /// source address has `snat_ports`' range of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snat_ports_in_use: Option<u64>,
    pub last_check: Option<CheckResult>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct FlowTableStatus {
    pub flows: u64,
    pub capacity: u64,
}

/// A flow's state as `lb conntrack` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlowState {
    /// The backend has not answered yet.
    SynSent,
    /// The backend answered; the client has not acknowledged it yet.
    SynReceived,
    Established,
    /// One side has closed.
    Closing,
    Closed,
}

impl std::fmt::Display for FlowState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(match self {
            FlowState::SynSent => "syn_sent",
            FlowState::SynReceived => "syn_received",
            FlowState::Established => "established",
            FlowState::Closing => "closing",
            FlowState::Closed => "closed",
        })
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct FlowStatus {
    pub service: String,
    pub client: String,
    pub vip: String,
    /// Full NAT: the balancer's address and port the backend sees the flow
    /// come from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balancer: Option<String>,
    pub backend: String,
    pub state: FlowState,
    pub idle_seconds: f64,
}

/// What `Request::Trace` returns: the data path's trace lines after the
/// caller's last, each with its sequence number.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct TraceLines {
    pub lines: Vec<(u64, String)>,
    /// Lines the data path left out for its budget, since it was loaded.
    pub suppressed: u64,
}
