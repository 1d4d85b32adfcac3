//! The agent's model of services and backends, and how it is written into the
//! data path's maps.
//!
//! A backend owns a slot of its service, and its flows hold that slot's
//! connection count. A removed backend keeps its slot, ineligible for new
//! flows, until its last flow has gone, so that a count is never inherited by
//! another backend. Removed services keep their id the same way.
//!
//! Whether a backend may take new flows is decided here, from the operator
//! (enabled, draining, disabled), active and passive health, and slow start;
//! the data path adds the tiers (backups) and the `max_conns` caps.
use std::{
    collections::HashMap,
    net::SocketAddrV4,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{bail, Context, Result};
use lb_common::{
    flow_closed, Backend, BackendSet, FlowKey, BACKEND_ELIGIBLE, DIR_FORWARD, MAX_BACKENDS,
    MAX_SERVICES,
};
use serde::{Deserialize, Serialize};

use crate::{
    config::{BackendConfig, DownPolicy, Mode, Scheduler, ServiceConfig},
    datapath::{host_socket, wire_addr, Datapath},
    health::{Change, CheckResult, Health, HealthConfig},
};

/// Tables up to this many flows are counted afresh for each status.
const COUNT_FLOWS_UP_TO: u64 = 100_000;

/// How often connection and byte rates are sampled.
const RATE_INTERVAL: Duration = Duration::from_secs(1);

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

#[derive(Debug)]
struct Member {
    config: BackendConfig,
    removed: bool,
    admin: Admin,
    health: Health,
    /// May take new flows, as last decided.
    eligible: bool,
    /// When slow start began, while it lasts.
    ramp_from: Option<Instant>,
    since: SystemTime,
    reason: String,
    /// Totals at the last rate sample, and the rates since.
    sampled: Option<(Instant, u64, u64)>,
    connections_per_second: f64,
    bytes_per_second: f64,
}

impl Member {
    fn new(config: BackendConfig) -> Self {
        let ramp_from = (config.slow_start > 0.0).then(Instant::now);
        Self {
            config,
            removed: false,
            admin: Admin::Enabled,
            health: Health::default(),
            eligible: true,
            ramp_from,
            since: SystemTime::now(),
            reason: "added".into(),
            sampled: None,
            connections_per_second: 0.0,
            bytes_per_second: 0.0,
        }
    }

    fn wants_new_flows(&self, now: Instant) -> bool {
        !self.removed && self.admin == Admin::Enabled && self.health.is_up(now)
    }

    fn state(&self, now: Instant) -> &'static str {
        if self.removed {
            "removing"
        } else if self.admin == Admin::Disabled {
            "disabled"
        } else if self.admin == Admin::Draining {
            "draining"
        } else if !self.health.is_up(now) {
            "down"
        } else if self.ramp_from.is_some() {
            "slow_start"
        } else {
            "up"
        }
    }

    /// The slow-start share reached, 0 to 1.
    fn ramp(&self, now: Instant) -> Option<f64> {
        let from = self.ramp_from?;
        Some((now.duration_since(from).as_secs_f64() / self.config.slow_start).min(1.0))
    }
}

#[derive(Debug)]
enum Slot {
    Free,
    Used(Box<Member>),
}

#[derive(Debug)]
struct ServiceState {
    name: String,
    vip: SocketAddrV4,
    scheduler: Scheduler,
    mode: Mode,
    health: Option<HealthConfig>,
    on_down: DownPolicy,
    id: u32,
    slots: Vec<Slot>,
    /// What was last written to the data path.
    written: Option<Box<BackendSet>>,
    /// Found in the pinned maps, not yet claimed by the config.
    adopted: bool,
}

impl ServiceState {
    fn members(&self) -> impl Iterator<Item = (usize, &Member)> {
        self.slots.iter().enumerate().filter_map(|(i, s)| match s {
            Slot::Used(m) => Some((i, &**m)),
            Slot::Free => None,
        })
    }

    fn member_mut(&mut self, address: SocketAddrV4) -> Result<&mut Member> {
        let name = self.name.clone();
        self.slots
            .iter_mut()
            .find_map(|s| match s {
                Slot::Used(m) if m.config.address == address && !m.removed => Some(&mut **m),
                _ => None,
            })
            .with_context(|| format!("service {name} has no backend {address}"))
    }
}

/// A removed service whose flows may still hold counts under its id.
#[derive(Debug)]
struct RetiredService {
    id: u32,
}

/// A health check the agent should be running.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckTarget {
    pub service: String,
    pub address: SocketAddrV4,
    pub config: HealthConfig,
}

pub struct Balancer {
    pub datapath: Datapath,
    services: Vec<ServiceState>,
    retired: Vec<RetiredService>,
    /// Idle flows the agent has removed, for the metrics.
    pub expired_total: u64,
    /// Flows in the table at the last aging scan.
    pub flows_seen: u64,
    counted_by_aging: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Status {
    pub services: Vec<ServiceStatus>,
    pub flow_table: FlowTableStatus,
    pub counters: std::collections::BTreeMap<String, u64>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub name: String,
    pub vip: String,
    pub scheduler: Scheduler,
    pub mode: Mode,
    pub on_backend_down: DownPolicy,
    pub health_check: Option<HealthConfig>,
    pub active_connections: u64,
    pub total_connections: u64,
    pub backends: Vec<BackendStatus>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct BackendStatus {
    pub address: String,
    pub weight: u32,
    /// `up`, `slow_start`, `down`, `draining`, `disabled`, or `removing`
    /// while a removed backend's flows finish.
    pub state: String,
    /// Why it is in that state, and since when (Unix seconds).
    pub reason: String,
    pub since: f64,
    /// May take new flows now (a backup only takes them when no primary can).
    pub eligible: bool,
    pub backup: bool,
    pub max_conns: u32,
    /// Slow start: the share of its full load it may take now, 0 to 1.
    pub slow_start_progress: Option<f64>,
    pub active_connections: u64,
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
    pub last_check: Option<CheckResult>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct FlowTableStatus {
    pub flows: u64,
    pub capacity: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct FlowStatus {
    pub service: String,
    pub client: String,
    pub vip: String,
    pub backend: String,
    /// `syn_sent`, `established`, `closing` or `closed`.
    pub state: String,
    pub idle_seconds: f64,
}

impl Balancer {
    pub fn new(datapath: Datapath) -> Self {
        Self { datapath, services: Vec::new(), retired: Vec::new(), expired_total: 0, flows_seen: 0, counted_by_aging: false }
    }

    /// From now on the status takes its flow count from the aging scans
    /// (`flows_seen`) when the table is big, instead of reading it each time.
    pub fn count_flows_by_aging(&mut self) {
        self.counted_by_aging = true;
    }

    fn service_mut(&mut self, name: &str) -> Result<&mut ServiceState> {
        self.services
            .iter_mut()
            .find(|s| s.name == name)
            .with_context(|| format!("no service named {name:?} (see `lb status`)"))
    }

    pub fn add_service(&mut self, config: &ServiceConfig) -> Result<()> {
        config.validate()?;
        if self.services.iter().any(|s| s.name == config.name) {
            bail!("a service named {:?} already exists", config.name);
        }
        if let Some(s) = self.services.iter().find(|s| s.vip == config.vip && !s.adopted) {
            bail!("VIP {} is already used by service {:?}", config.vip, s.name);
        }
        let index = match self.services.iter().position(|s| s.vip == config.vip) {
            // What a previous agent left running: its flows keep their slots.
            Some(adopted) => adopted,
            None => {
                let max_services = self.datapath.max_services();
                let id = (0..max_services)
                    .find(|id| {
                        !self.services.iter().any(|s| s.id == *id) && !self.retired.iter().any(|r| r.id == *id)
                    })
                    .with_context(|| {
                        format!("all {max_services} service slots are in use (agent.max_services, at most {MAX_SERVICES})")
                    })?;
                self.services.push(ServiceState {
                    name: String::new(),
                    vip: config.vip,
                    scheduler: config.scheduler,
                    mode: config.mode,
                    health: None,
                    on_down: config.on_backend_down,
                    id,
                    slots: Vec::new(),
                    written: None,
                    adopted: false,
                });
                self.services.len() - 1
            }
        };
        let counts = self.datapath.active_counts(self.services[index].id)?;
        let service = &mut self.services[index];
        service.name = config.name.clone();
        service.scheduler = config.scheduler;
        service.mode = config.mode;
        service.health = config.health.clone();
        service.on_down = config.on_backend_down;
        service.adopted = false;
        let mut fresh = Vec::new();
        for b in &config.backends {
            let (slot, new) = place(service, &counts.active, b)?;
            if new {
                fresh.push(slot);
            }
        }
        let id = service.id;
        for slot in fresh {
            self.datapath.clear_backend_stats(id, slot as u32)?;
        }
        // Backends first, so the service never appears without them.
        let service = &mut self.services[index];
        write_backends(&mut self.datapath, service, Instant::now())?;
        self.datapath.set_service(service.vip, id)?;
        Ok(())
    }

    /// Takes in the services a previous agent left in the pinned maps: their
    /// backends keep their slots (and so their flows' counts) but take no new
    /// flows until the config claims them. Returns how many it found.
    pub fn adopt(&mut self) -> usize {
        let pinned = self.datapath.pinned_services();
        for (key, service, set) in &pinned {
            let vip = host_socket(key.addr, key.port);
            let slots = set.slots[..set.len.min(MAX_BACKENDS) as usize]
                .iter()
                .map(|b| {
                    if b.addr == 0 {
                        return Slot::Free;
                    }
                    let mut m = Member::new(BackendConfig::new(host_socket(b.addr, b.port), b.weight));
                    m.removed = true;
                    m.eligible = b.flags & BACKEND_ELIGIBLE != 0;
                    m.reason = "found running, not in the config".into();
                    Slot::Used(Box::new(m))
                })
                .collect();
            self.services.push(ServiceState {
                name: format!("(adopted {vip})"),
                vip,
                scheduler: Scheduler::from_wire(set.scheduler),
                mode: Mode::Nat,
                health: None,
                on_down: DownPolicy::Keep,
                id: service.id,
                slots,
                written: Some(Box::new(*set)),
                adopted: true,
            });
        }
        pinned.len()
    }

    /// Compares each backend's active count with the live flows the table
    /// holds for it. The kernel keeps the counts exactly, so they agree
    /// unless flows open or close during the read; a difference that
    /// persists is a bug worth a report. Returns (slots checked, differing).
    pub fn verify_counts(&self) -> Result<(usize, Vec<String>)> {
        let mut live: HashMap<(u32, u16), u64> = HashMap::new();
        for (_, f) in self.datapath.flows() {
            if f.direction == DIR_FORWARD && !flow_closed(f.state) {
                *live.entry((f.service as u32, f.slot)).or_default() += 1;
            }
        }
        let (mut checked, mut differing) = (0, Vec::new());
        for s in &self.services {
            let counts = self.datapath.active_counts(s.id)?;
            for (i, m) in s.members() {
                checked += 1;
                let flows = live.get(&(s.id, i as u16)).copied().unwrap_or(0);
                if counts.active[i] != flows {
                    differing.push(format!("{} {}: count {} but {} live flows", s.name, m.config.address, counts.active[i], flows));
                }
            }
        }
        Ok((checked, differing))
    }

    /// Removes the adopted services the config did not claim; their flows
    /// finish.
    pub fn finish_adoption(&mut self) -> Result<()> {
        let unclaimed: Vec<String> = self.services.iter().filter(|s| s.adopted).map(|s| s.name.clone()).collect();
        for name in unclaimed {
            tracing::info!(service = %name, "removing a running service that is not in the config");
            self.remove_service(&name)?;
        }
        Ok(())
    }

    /// Applies a new config as a difference: services and backends added,
    /// removed or changed; unchanged backends and all established flows are
    /// left alone, and drains stay. The config is validated first, so an
    /// invalid one changes nothing. Returns what it changed.
    pub fn reload(&mut self, config: &crate::config::Config) -> Result<Vec<String>> {
        config.validate()?;
        let mut changes = Vec::new();
        let wanted: Vec<&str> = config.services.iter().map(|s| s.name.as_str()).collect();
        let gone: Vec<String> =
            self.services.iter().filter(|s| !wanted.contains(&s.name.as_str())).map(|s| s.name.clone()).collect();
        for name in gone {
            self.remove_service(&name)?;
            changes.push(format!("removed service {name}"));
        }
        // A VIP moving to another service: remove first, add below.
        for new in &config.services {
            let moved = self.services.iter().any(|s| s.name == new.name && s.vip != new.vip);
            if moved {
                self.remove_service(&new.name)?;
                changes.push(format!("removed service {} (VIP changed)", new.name));
            }
        }
        for new in &config.services {
            if !self.services.iter().any(|s| s.name == new.name) {
                self.add_service(new)?;
                changes.push(format!("added service {}", new.name));
                continue;
            }
            let s = self.service_mut(&new.name)?;
            if s.health != new.health || s.on_down != new.on_backend_down {
                s.health = new.health.clone();
                s.on_down = new.on_backend_down;
                changes.push(format!("{}: health checks or down policy changed", new.name));
            }
            let current: Vec<BackendConfig> = s.members().filter(|(_, m)| !m.removed).map(|(_, m)| m.config.clone()).collect();
            for old in &current {
                if !new.backends.iter().any(|b| b.address == old.address) {
                    self.remove_backend(&new.name, old.address)?;
                    changes.push(format!("{}: removed backend {}", new.name, old.address));
                }
            }
            for b in &new.backends {
                match current.iter().find(|old| old.address == b.address) {
                    None => {
                        self.add_backend(&new.name, b)?;
                        changes.push(format!("{}: added backend {}", new.name, b.address));
                    }
                    Some(old) if old != b => {
                        let s = self.service_mut(&new.name)?;
                        s.member_mut(b.address)?.config = b.clone();
                        changes.push(format!("{}: changed backend {}", new.name, b.address));
                    }
                    Some(_) => {}
                }
            }
        }
        self.refresh()?;
        Ok(changes)
    }

    pub fn remove_service(&mut self, name: &str) -> Result<()> {
        let index = self
            .services
            .iter()
            .position(|s| s.name == name)
            .with_context(|| format!("no service named {name:?} (see `lb status`)"))?;
        let service = self.services.remove(index);
        self.datapath.remove_service(service.vip)?;
        // Established flows keep their rewrite; the id waits for their counts.
        self.datapath.set_backends(service.id, &BackendSet::default())?;
        self.retired.push(RetiredService { id: service.id });
        Ok(())
    }

    pub fn add_backend(&mut self, service: &str, backend: &BackendConfig) -> Result<()> {
        backend.validate(service)?;
        let id = self.service_mut(service)?.id;
        let counts = self.datapath.active_counts(id)?;
        let (slot, fresh) = place(self.service_mut(service)?, &counts.active, backend)?;
        if fresh {
            self.datapath.clear_backend_stats(id, slot as u32)?;
        }
        let stats = self.datapath.backend_stats(id, slot as u32)?;
        let s = self.service_mut(service)?;
        if let Slot::Used(m) = &mut s.slots[slot] {
            m.health.reset_passive(stats.refused + stats.unanswered);
        }
        let s = self.services.iter_mut().find(|s| s.name == service).unwrap();
        write_backends(&mut self.datapath, s, Instant::now())
    }

    pub fn remove_backend(&mut self, service: &str, address: SocketAddrV4) -> Result<()> {
        self.update_member(service, address, |m| {
            m.removed = true;
            "removed by operator".into()
        })
    }

    pub fn set_weight(&mut self, service: &str, address: SocketAddrV4, weight: u32) -> Result<()> {
        crate::config::validate_backend(service, address, weight)?;
        self.update_member(service, address, |m| {
            m.config.weight = weight;
            format!("weight set to {weight}")
        })
    }

    pub fn set_admin(&mut self, service: &str, address: SocketAddrV4, admin: Admin) -> Result<()> {
        self.update_member(service, address, |m| {
            m.admin = admin;
            match admin {
                Admin::Enabled => "enabled by operator",
                Admin::Draining => "drained by operator",
                Admin::Disabled => "disabled by operator",
            }
            .into()
        })
    }

    fn update_member(
        &mut self,
        service: &str,
        address: SocketAddrV4,
        change: impl FnOnce(&mut Member) -> String,
    ) -> Result<()> {
        let s = self.service_mut(service)?;
        let m = s.member_mut(address)?;
        let reason = change(m);
        m.reason = reason;
        m.since = SystemTime::now();
        self.refresh()
    }

    /// The health checks that should be running.
    pub fn check_targets(&self) -> Vec<CheckTarget> {
        let mut targets = Vec::new();
        for s in &self.services {
            let Some(config) = &s.health else { continue };
            for (_, m) in s.members().filter(|(_, m)| !m.removed) {
                targets.push(CheckTarget {
                    service: s.name.clone(),
                    address: m.config.address,
                    config: config.clone(),
                });
            }
        }
        targets
    }

    /// An active check's result.
    pub fn record_check(&mut self, service: &str, address: SocketAddrV4, result: CheckResult) -> Result<()> {
        let Ok(s) = self.service_mut(service) else { return Ok(()) };
        let Some(health) = s.health.clone() else { return Ok(()) };
        let Ok(m) = s.member_mut(address) else { return Ok(()) };
        if let Some(change) = m.health.record_check(result, health.rise, health.fall) {
            note_change(m, change, service);
            self.refresh()?;
        }
        Ok(())
    }

    /// Reads the data path's passive failure counters, advances slow starts,
    /// and writes whatever changed. Called every control tick.
    pub fn tick(&mut self) -> Result<()> {
        let now = Instant::now();
        for s in &mut self.services {
            let all_stats = self.datapath.service_backend_stats(s.id, s.slots.len())?;
            for (slot, stats) in s.slots.iter_mut().zip(&all_stats) {
                let Slot::Used(m) = slot else { continue };
                let bytes = stats.fwd_bytes + stats.reply_bytes;
                match m.sampled {
                    Some((at, connections, sampled_bytes)) if now.duration_since(at) >= RATE_INTERVAL => {
                        let dt = now.duration_since(at).as_secs_f64();
                        m.connections_per_second = stats.new_flows.saturating_sub(connections) as f64 / dt;
                        m.bytes_per_second = bytes.saturating_sub(sampled_bytes) as f64 / dt;
                        m.sampled = Some((now, stats.new_flows, bytes));
                    }
                    Some(_) => {}
                    None => m.sampled = Some((now, stats.new_flows, bytes)),
                }
                let window = Duration::from_secs_f64(m.config.fail_timeout);
                let total = stats.refused + stats.unanswered;
                if let Some(change) = m.health.record_passive(total, now, m.config.max_fails, window) {
                    note_change(m, change, &s.name);
                }
            }
        }
        self.refresh()
    }

    /// Decides every backend's eligibility, resets the flows of backends that
    /// went down in services with policy `reset`, and writes what changed.
    fn refresh(&mut self) -> Result<()> {
        let now = Instant::now();
        for s in &mut self.services {
            let mut to_reset = Vec::new();
            for (i, slot) in s.slots.iter_mut().enumerate() {
                let Slot::Used(m) = slot else { continue };
                let wanted = m.wants_new_flows(now);
                if wanted && !m.eligible && m.config.slow_start > 0.0 {
                    m.ramp_from = Some(now);
                }
                if m.ramp(now).is_some_and(|r| r >= 1.0) || !wanted {
                    m.ramp_from = None;
                }
                let dead = !m.removed && (m.admin == Admin::Disabled || !m.health.is_up(now));
                if m.eligible && !wanted && dead && s.on_down == DownPolicy::Reset {
                    to_reset.push(i as u16);
                }
                m.eligible = wanted;
            }
            write_backends(&mut self.datapath, s, now)?;
            if !to_reset.is_empty() {
                let keys: Vec<FlowKey> = self
                    .datapath
                    .flows()
                    .into_iter()
                    .filter(|(_, f)| {
                        f.direction == DIR_FORWARD
                            && f.service as u32 == s.id
                            && to_reset.contains(&f.slot)
                            && !flow_closed(f.state)
                    })
                    .map(|(k, _)| k)
                    .collect();
                let reset = self.datapath.reset_flows(&keys)?;
                if reset > 0 {
                    tracing::warn!(service = %s.name, flows = reset, "reset the established flows of a dead backend");
                }
            }
        }
        Ok(())
    }

    /// Frees the slots and ids whose flows have all gone.
    pub fn reclaim(&mut self) -> Result<()> {
        for s in &mut self.services {
            let counts = self.datapath.active_counts(s.id)?;
            for (i, slot) in s.slots.iter_mut().enumerate() {
                if matches!(slot, Slot::Used(m) if m.removed) && counts.active[i] == 0 {
                    *slot = Slot::Free;
                }
            }
            while matches!(s.slots.last(), Some(Slot::Free)) {
                s.slots.pop();
            }
            write_backends(&mut self.datapath, s, Instant::now())?;
        }
        let datapath = &self.datapath;
        self.retired.retain(|r| match datapath.active_counts(r.id) {
            Ok(counts) => counts.active.iter().any(|&n| n != 0),
            Err(_) => true,
        });
        Ok(())
    }

    /// Active connections of one backend, for `lb backend drain --wait`.
    pub fn active_of(&self, service: &str, address: SocketAddrV4) -> Option<u64> {
        let s = self.services.iter().find(|s| s.name == service)?;
        let (i, _) = s.members().find(|(_, m)| m.config.address == address)?;
        self.datapath.active_counts(s.id).ok().map(|c| c.active[i])
    }

    pub fn status(&self) -> Result<Status> {
        let now = Instant::now();
        let mut services = Vec::new();
        for s in &self.services {
            let counts = self.datapath.active_counts(s.id)?;
            let all_stats = self.datapath.service_backend_stats(s.id, s.slots.len())?;
            let mut backends = Vec::new();
            for (i, m) in s.members() {
                let stats = &all_stats[i];
                backends.push(BackendStatus {
                    address: m.config.address.to_string(),
                    weight: m.config.weight,
                    state: m.state(now).to_string(),
                    reason: m.reason.clone(),
                    since: m.since.duration_since(SystemTime::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64()),
                    eligible: m.eligible,
                    backup: m.config.backup,
                    max_conns: m.config.max_conns,
                    slow_start_progress: m.ramp(now),
                    active_connections: counts.active[i],
                    total_connections: stats.new_flows,
                    connections_per_second: m.connections_per_second,
                    bytes_per_second: m.bytes_per_second,
                    packets_in: stats.fwd_packets,
                    bytes_in: stats.fwd_bytes,
                    packets_out: stats.reply_packets,
                    bytes_out: stats.reply_bytes,
                    refused: stats.refused,
                    unanswered: stats.unanswered,
                    last_check: m.health.last_check.clone(),
                });
            }
            services.push(ServiceStatus {
                name: s.name.clone(),
                vip: s.vip.to_string(),
                scheduler: s.scheduler,
                mode: s.mode,
                on_backend_down: s.on_down,
                health_check: s.health.clone(),
                active_connections: backends.iter().map(|b| b.active_connections).sum(),
                total_connections: backends.iter().map(|b| b.total_connections).sum(),
                backends,
            });
        }
        let counters = self.datapath.counters()?;
        // Reading a big table takes a while (about 0.7 s for a million
        // flows): past this size the status gives the last aging scan's count.
        let flows = if self.counted_by_aging && self.flows_seen > COUNT_FLOWS_UP_TO {
            self.flows_seen as usize
        } else {
            self.datapath.flow_count()
        };
        Ok(Status {
            services,
            flow_table: FlowTableStatus {
                flows: flows as u64,
                capacity: self.datapath.max_flows() as u64,
            },
            counters: lb_common::COUNTER_NAMES
                .iter()
                .zip(counters)
                .map(|(name, v)| (name.to_string(), v))
                .collect(),
        })
    }

    pub fn conntrack(&self) -> Vec<FlowStatus> {
        let clock = self.datapath.clock();
        let now = self.datapath.now_ticks().unwrap_or(0);
        let entries: std::collections::HashMap<_, _> = self.datapath.flows().into_iter().collect();
        let mut flows = Vec::new();
        for (key, flow) in &entries {
            if flow.direction != DIR_FORWARD {
                continue;
            }
            let replied_at = entries.get(&crate::aging::reply_key(key, flow)).map_or(0, |r| r.last_seen);
            let service = self
                .services
                .iter()
                .find(|s| s.id == flow.service as u32)
                .map_or("(removed)".to_string(), |s| s.name.clone());
            flows.push(FlowStatus {
                service,
                client: host_socket(key.saddr, key.sport).to_string(),
                vip: host_socket(key.daddr, key.dport).to_string(),
                backend: host_socket(flow.nat_addr, flow.nat_port).to_string(),
                state: flow_state_name(flow.state, replied_at != 0).to_string(),
                idle_seconds: clock.seconds(now.saturating_sub(flow.last_seen.max(replied_at))),
            });
        }
        flows.sort_by(|a, b| (&a.service, &a.client).cmp(&(&b.service, &b.client)));
        flows
    }
}

/// Gives `backend` a slot of `service`: the one it had if it is coming back
/// before its old flows finished, else a free one or a removed backend's
/// whose flows have all gone, else a new one. Says whether the slot is new to
/// it (its statistics start from zero).
fn place(service: &mut ServiceState, active: &[u64], backend: &BackendConfig) -> Result<(usize, bool)> {
    let name = &service.name;
    let existing = service.slots.iter().position(
        |slot| matches!(slot, Slot::Used(m) if m.config.address == backend.address),
    );
    let (slot, fresh) = match existing {
        Some(i) => match &service.slots[i] {
            Slot::Used(m) if m.removed => (i, false),
            _ => bail!("service {name} already has backend {}", backend.address),
        },
        None => {
            let reusable = service.slots.iter().enumerate().position(|(i, slot)| match slot {
                Slot::Free => true,
                Slot::Used(m) => m.removed && active[i] == 0,
            });
            match reusable {
                Some(i) => (i, true),
                None if service.slots.len() < MAX_BACKENDS as usize => {
                    service.slots.push(Slot::Free);
                    (service.slots.len() - 1, true)
                }
                None => bail!("service {name} already has {MAX_BACKENDS} backends"),
            }
        }
    };
    service.slots[slot] = Slot::Used(Box::new(Member::new(backend.clone())));
    Ok((slot, fresh))
}

fn note_change(m: &mut Member, change: Change, service: &str) {
    let address = m.config.address;
    match &change {
        Change::Down(reason) => tracing::warn!(%service, backend = %address, %reason, "backend down"),
        Change::Up(reason) => tracing::info!(%service, backend = %address, %reason, "backend up"),
    }
    let (Change::Down(reason) | Change::Up(reason)) = change;
    m.reason = reason;
    m.since = SystemTime::now();
}

fn flow_state_name(state: u32, replied: bool) -> &'static str {
    use lb_common::{FLOW_BACKEND_FIN, FLOW_CLIENT_FIN};
    if flow_closed(state) {
        "closed"
    } else if state & (FLOW_CLIENT_FIN | FLOW_BACKEND_FIN) != 0 {
        "closing"
    } else if replied {
        "established"
    } else {
        "syn_sent"
    }
}

/// Writes the service's backend slots if they differ from what the data path
/// has.
fn write_backends(datapath: &mut Datapath, service: &mut ServiceState, now: Instant) -> Result<()> {
    let counts = datapath.active_counts(service.id)?;
    let set = backend_set(service, &counts.active, now);
    if service
        .written
        .as_deref()
        .is_some_and(|w| w.len == set.len && w.scheduler == set.scheduler && w.slots == set.slots)
    {
        return Ok(());
    }
    datapath.set_backends(service.id, &set)?;
    service.written = Some(Box::new(set));
    Ok(())
}

fn backend_set(service: &ServiceState, active: &[u64], now: Instant) -> BackendSet {
    // Slow start caps a ramping backend at its share of the connections its
    // tier holds: a weight alone would not hold least connections back from
    // a backend with none.
    let tier_load = |backup: bool| -> (u64, u64) {
        service
            .members()
            .filter(|(_, m)| m.eligible && m.config.backup == backup)
            .fold((0, 0), |(a, w), (i, m)| (a + active[i], w + m.config.weight as u64))
    };
    let mut set =
        BackendSet { len: service.slots.len() as u32, scheduler: service.scheduler.wire(), ..Default::default() };
    for (i, m) in service.members() {
        let mut max_conns = m.config.max_conns;
        if let Some(ramp) = m.ramp(now).filter(|r| *r < 1.0) {
            let (load, weight) = tier_load(m.config.backup);
            let fair = load as f64 * m.config.weight as f64 / weight.max(1) as f64;
            let cap = ((fair * ramp).ceil() as u32).max(1);
            max_conns = if max_conns == 0 { cap } else { max_conns.min(cap) };
        }
        set.slots[i] = Backend {
            addr: wire_addr(*m.config.address.ip()),
            port: m.config.address.port().to_be(),
            flags: if m.eligible { BACKEND_ELIGIBLE } else { 0 },
            tier: m.config.backup as u8,
            weight: m.config.weight,
            max_conns,
        };
    }
    set.index_candidates();
    set
}
