//! Reconciliation: turns the config, the operator's requests and what a
//! previous agent left running into the model, and the model into map
//! writes.
//!
//! Every change is made to a copy of the model first; only when all of it
//! succeeded does the copy replace the model and get written, so a refused
//! request or reload leaves the running state exactly as it was. Writes are
//! differences: a service's backend set is written only when it changed.
mod status;
pub mod trace;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::SocketAddrV4,
    time::{Duration, Instant},
};

use anyhow::Result;
use lb_common::{established_count, flow_closed, half_open_count, BackendSet, FlowKey, DIR_FORWARD, FLOW_ESTABLISHED};

use crate::{
    api::{Admin, CheckResult},
    config::{BackendConfig, Config, ServiceConfig},
    datapath::{Datapath, Maps},
    model::{plan::plan, CheckTarget, Model, Placed},
};

/// How often connection and byte rates are sampled.
const RATE_INTERVAL: Duration = Duration::from_secs(1);

pub struct Balancer<M: Maps = Datapath> {
    pub datapath: M,
    pub model: Model,
    /// The backend sets last written, by service id.
    written: HashMap<u32, Box<BackendSet>>,
    /// The services last written: VIP → id.
    written_vips: BTreeMap<SocketAddrV4, lb_common::Service>,
    /// DSR backends whose neighbour entries were asked to be kept resolved.
    neighbours_kept: HashSet<std::net::Ipv4Addr>,
    /// Idle flows the agent has removed, for the metrics.
    pub expired_total: u64,
    /// Flows in the table at the last aging scan.
    pub flows_seen: u64,
    /// The full-NAT ports each backend slot held at the last aging scan.
    pub snat_ports_seen: std::collections::HashMap<(u32, u32), u64>,
    counted_by_aging: bool,
    tracer: trace::Tracer,
}

impl<M: Maps> Balancer<M> {
    pub fn new(datapath: M) -> Self {
        Self {
            datapath,
            model: Model::default(),
            written: HashMap::new(),
            written_vips: BTreeMap::new(),
            neighbours_kept: Default::default(),
            expired_total: 0,
            flows_seen: 0,
            snat_ports_seen: Default::default(),
            counted_by_aging: false,
            tracer: trace::Tracer::default(),
        }
    }

    /// From now on the status takes its flow count from the aging scans
    /// (`flows_seen`) when the table is big, instead of reading it each time.
    pub fn count_flows_by_aging(&mut self) {
        self.counted_by_aging = true;
    }

    fn counts(&self, id: u32) -> Result<Vec<u64>> {
        Ok(self.datapath.active_counts(id)?.active.to_vec())
    }

    /// Takes in the services a previous agent left in the pinned maps: their
    /// backends keep their slots (and so their flows' counts) but take no new
    /// flows until the config claims them. Returns how many it found.
    pub fn adopt(&mut self) -> usize {
        let pinned = self.datapath.pinned_services();
        self.model.adopt(&pinned, Instant::now());
        for (vip, id, set) in &pinned {
            self.written.insert(*id, Box::new(*set));
            self.written_vips.insert(*vip, lb_common::Service { id: *id, ..Default::default() });
        }
        pinned.len()
    }

    /// Removes the adopted services the config did not claim; their flows
    /// finish.
    pub fn finish_adoption(&mut self) -> Result<()> {
        for name in self.model.unclaimed() {
            tracing::info!(service = %name, "removing a running service that is not in the config");
            self.remove_service(&name)?;
        }
        Ok(())
    }

    pub fn add_service(&mut self, config: &ServiceConfig) -> Result<()> {
        let mut model = self.model.clone();
        let placed = model.add_service(config, self.datapath.max_services(), &|id| self.counts(id), Instant::now())?;
        self.commit(model, &placed)
    }

    pub fn remove_service(&mut self, name: &str) -> Result<()> {
        let mut model = self.model.clone();
        model.remove_service(name)?;
        self.commit(model, &[])
    }

    pub fn add_backend(&mut self, service: &str, backend: &BackendConfig) -> Result<()> {
        let mut model = self.model.clone();
        let placed = model.add_backend(service, backend, &|id| self.counts(id), Instant::now())?;
        self.commit(model, &[placed])
    }

    pub fn remove_backend(&mut self, service: &str, address: SocketAddrV4) -> Result<()> {
        self.model.update_member(service, address, |m| {
            m.removed = true;
            "removed by operator".into()
        })?;
        self.refresh()
    }

    pub fn set_weight(&mut self, service: &str, address: SocketAddrV4, weight: u32) -> Result<()> {
        crate::config::validate_backend(service, address, weight)?;
        self.model.update_member(service, address, |m| {
            m.config.weight = weight;
            format!("weight set to {weight}")
        })?;
        self.refresh()
    }

    pub fn set_admin(&mut self, service: &str, address: SocketAddrV4, admin: Admin) -> Result<()> {
        self.model.update_member(service, address, |m| {
            m.admin = admin;
            admin.reason().into()
        })?;
        self.refresh()
    }

    /// Takes back what a previous agent knew of a backend's health.
    pub fn resume_health(
        &mut self,
        service: &str,
        address: SocketAddrV4,
        active_down: bool,
        hold: Option<Duration>,
        now: Instant,
        reason: &str,
    ) -> Result<()> {
        self.model.update_member(service, address, |m| {
            m.health.resume(active_down, hold, now);
            format!("{reason} (before the restart)")
        })?;
        self.refresh()
    }

    /// Applies a new config as one plan of differences: services and
    /// backends added, removed or changed (scheduler and health checks
    /// too); unchanged backends and all established flows are left alone,
    /// and drains stay. If any step fails, nothing changes. Returns what it
    /// changed.
    pub fn reload(&mut self, config: &Config) -> Result<Vec<String>> {
        config.validate()?;
        let steps = plan(&self.model, config);
        let mut model = self.model.clone();
        let mut placed = Vec::new();
        let now = Instant::now();
        for step in &steps {
            placed.extend(model.apply(step, self.datapath.max_services(), &|id| self.counts(id), now)?);
        }
        self.commit(model, &placed)?;
        Ok(steps.iter().map(|s| s.to_string()).collect())
    }

    /// Makes `model` the running one and writes it: the backends just
    /// placed start their statistics (fresh slots) and passive-failure
    /// counting from what the data path has now, so that no failure is
    /// counted twice across a restart or a reused slot.
    fn commit(&mut self, model: Model, placed: &[Placed]) -> Result<()> {
        self.model = model;
        for p in placed {
            if p.fresh {
                self.datapath.clear_backend_stats(p.service, p.slot as u32)?;
            }
            let stats = self.datapath.backend_stats(p.service, p.slot as u32)?;
            let service = self.model.services.iter_mut().find(|s| s.id == p.service);
            if let Some((_, m)) = service.and_then(|s| s.members_mut().find(|(i, _)| *i == p.slot)) {
                m.health.reset_passive(stats.refused + stats.unanswered);
            }
        }
        self.refresh()
    }

    /// An active check's result.
    pub fn record_check(&mut self, service: &str, address: SocketAddrV4, result: CheckResult) -> Result<()> {
        let Ok(s) = self.model.service_mut(service) else {
            return Ok(());
        };
        let Some(health) = s.health.clone() else {
            return Ok(());
        };
        let Ok(m) = s.member_mut(address) else {
            return Ok(());
        };
        if let Some(change) = m.health.record_check(result, health.rise, health.fall) {
            m.note_health(change, service);
            self.refresh()?;
        }
        Ok(())
    }

    /// Reads the data path's passive failure counters and rates, advances
    /// slow starts, and writes whatever changed. Called every control tick.
    pub fn tick(&mut self) -> Result<()> {
        let now = Instant::now();
        for s in &mut self.model.services {
            let all_stats = self.datapath.service_backend_stats(s.id, s.slots.len())?;
            let name = s.name.clone();
            for (i, m) in s.members_mut() {
                let stats = &all_stats[i];
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
                    m.note_health(change, &name);
                }
            }
        }
        self.refresh()
    }

    /// Decides every backend's eligibility, writes what changed, and resets
    /// the flows of backends that went down in services with policy `reset`.
    fn refresh(&mut self) -> Result<()> {
        let now = Instant::now();
        let to_reset: Vec<(u32, String, Vec<u16>)> = self
            .model
            .services
            .iter_mut()
            .map(|s| (s.id, s.name.clone(), s.decide(now)))
            .filter(|(_, _, slots)| !slots.is_empty())
            .collect();
        self.write(now)?;
        if to_reset.is_empty() {
            return Ok(());
        }
        let flows = self.datapath.flows();
        for (id, name, slots) in to_reset {
            let keys: Vec<FlowKey> = flows
                .iter()
                .filter(|(_, f)| {
                    f.direction == DIR_FORWARD
                        && f.service as u32 == id
                        && slots.contains(&f.slot)
                        && !flow_closed(f.state)
                })
                .map(|(k, _)| *k)
                .collect();
            let reset = self.datapath.reset_flows(&keys)?;
            if reset > 0 {
                tracing::warn!(service = %name, flows = reset, "reset the established flows of a dead backend");
            }
        }
        Ok(())
    }

    /// What the data path is told of a service: its mode, and in full NAT
    /// its source addresses (none configured: each backend has its own, see
    /// `fill_source_addresses`) and ports.
    fn service_value(&self, s: &crate::model::Service) -> lb_common::Service {
        use crate::config::{Mode, Tunnel};
        let mut value = lb_common::Service { id: s.id, ..Default::default() };
        match (s.mode, s.tunnel) {
            (Mode::Nat, _) => return value,
            (Mode::Dsr, Tunnel::None) => return lb_common::Service { flags: lb_common::SERVICE_DSR, ..value },
            (Mode::Dsr, Tunnel::Ipip) => {
                return lb_common::Service { flags: lb_common::SERVICE_DSR | lb_common::SERVICE_IPIP, ..value }
            }
            (Mode::FullNat, _) => {}
        }
        value.flags = lb_common::SERVICE_FULLNAT;
        for (i, a) in s.snat_addresses.iter().take(lb_common::MAX_SNAT_ADDRS).enumerate() {
            value.snat_addrs[i] = crate::datapath::wire_addr(*a);
            value.snat_count = i as u32 + 1;
        }
        [value.port_first, value.port_last] = s.snat_ports;
        value
    }

    /// Full NAT without configured source addresses, and DSR's IPIP tunnel
    /// (its outer source): each backend is
    /// reached from the address of the interface that reaches it, as the
    /// kernel's route says when the backend is first written (kept after,
    /// so that the route is not asked at every write).
    fn fill_source_addresses(&self, service: u32, set: &mut BackendSet) {
        let written = self.written.get(&service);
        for (i, slot) in set.slots[..set.len.min(lb_common::MAX_BACKENDS) as usize].iter_mut().enumerate() {
            if slot.addr == 0 {
                continue;
            }
            let known = written.map(|w| w.slots[i]).filter(|w| w.addr == slot.addr && w.snat_addr != 0);
            slot.snat_addr = match known {
                Some(w) => w.snat_addr,
                None => self
                    .datapath
                    .source_address(crate::datapath::host_addr(slot.addr))
                    .map_or(0, crate::datapath::wire_addr),
            };
        }
    }

    /// Writes the model's services into the maps where they differ from what
    /// was last written: backends before the service that uses them, and a
    /// removed service's VIP before its backends are emptied.
    fn write(&mut self, now: Instant) -> Result<()> {
        for s in &self.model.services {
            let active = self.datapath.active_counts(s.id)?;
            let mut set = s.backend_set(&active.active, now);
            if s.needs_source_addresses() {
                self.fill_source_addresses(s.id, &mut set);
            }
            let same = self
                .written
                .get(&s.id)
                .is_some_and(|w| w.len == set.len && w.scheduler == set.scheduler && w.slots == set.slots);
            if !same {
                if s.mode == crate::config::Mode::Dsr {
                    keep_neighbours_resolved(&mut self.datapath, &mut self.neighbours_kept, &set);
                }
                self.datapath.set_backends(s.id, &set)?;
                self.written.insert(s.id, Box::new(set));
            }
            let value = self.service_value(s);
            if self.written_vips.get(&s.vip) != Some(&value) {
                self.datapath.set_service(s.vip, &value)?;
                self.written_vips.insert(s.vip, value);
            }
        }
        let model = &self.model;
        let gone_vips: Vec<SocketAddrV4> =
            self.written_vips.keys().filter(|vip| !model.services.iter().any(|s| s.vip == **vip)).copied().collect();
        for vip in gone_vips {
            self.datapath.remove_service(vip)?;
            self.written_vips.remove(&vip);
        }
        // Established flows of a removed service keep their rewrite; its id
        // waits for their counts.
        let gone_ids: Vec<u32> =
            self.written.keys().filter(|id| model.service_by_id(**id).is_none()).copied().collect();
        for id in gone_ids {
            self.datapath.set_backends(id, &BackendSet::default())?;
            self.written.remove(&id);
        }
        Ok(())
    }

    /// Frees the slots and ids whose flows have all gone.
    pub fn reclaim(&mut self) -> Result<()> {
        for i in 0..self.model.services.len() {
            let active = self.counts(self.model.services[i].id)?;
            self.model.services[i].reclaim(&active);
        }
        self.write(Instant::now())?;
        let datapath = &self.datapath;
        self.model.retired.retain(|id| match datapath.active_counts(*id) {
            Ok(counts) => counts.active.iter().any(|&n| n != 0),
            Err(_) => true,
        });
        Ok(())
    }

    /// The health checks that should be running.
    pub fn check_targets(&self) -> Vec<CheckTarget> {
        self.model.check_targets()
    }

    /// Established connections of one backend, for `lb backend drain --wait`.
    pub fn active_of(&self, service: &str, address: SocketAddrV4) -> Option<u64> {
        let s = self.model.service(service).ok()?;
        let (i, _) = s.members().find(|(_, m)| m.config.address == address)?;
        self.datapath.active_counts(s.id).ok().map(|c| established_count(c.active[i]))
    }

    /// Compares each backend's counts, established and half-open, with the
    /// live flows the table holds for it. The kernel keeps the counts
    /// exactly, so they agree unless flows open or close during the read; a
    /// difference that persists is a bug worth a report. Returns (slots
    /// checked, differing).
    pub fn verify_counts(&self) -> Result<(usize, Vec<String>)> {
        let mut live: HashMap<(u32, u16), (u64, u64)> = HashMap::new();
        for (_, f) in self.datapath.flows() {
            if f.direction == DIR_FORWARD && !flow_closed(f.state) {
                let (established, half_open) = live.entry((f.service as u32, f.slot)).or_default();
                *if f.state & FLOW_ESTABLISHED != 0 { established } else { half_open } += 1;
            }
        }
        let (mut checked, mut differing) = (0, Vec::new());
        for s in &self.model.services {
            let counts = self.datapath.active_counts(s.id)?;
            for (i, m) in s.members() {
                checked += 1;
                let count = counts.active[i];
                let counted = (established_count(count), half_open_count(count));
                let flows = live.get(&(s.id, i as u16)).copied().unwrap_or((0, 0));
                if counted != flows {
                    differing.push(format!(
                        "{} {}: counts {} established and {} half-open but the table has {} and {}",
                        s.name, m.config.address, counted.0, counted.1, flows.0, flows.1
                    ));
                }
            }
        }
        Ok((checked, differing))
    }
}

/// DSR packets go to a backend's MAC address, which the data path takes from
/// the kernel's neighbour table: the on-link backends of `set` are kept
/// resolved there (`Maps::keep_neighbour_resolved`), once each.
fn keep_neighbours_resolved<M: Maps>(datapath: &mut M, kept: &mut HashSet<std::net::Ipv4Addr>, set: &BackendSet) {
    for slot in &set.slots[..set.len.min(lb_common::MAX_BACKENDS) as usize] {
        let addr = crate::datapath::host_addr(slot.addr);
        if slot.addr == 0 || !kept.insert(addr) {
            continue;
        }
        if let Err(e) = datapath.keep_neighbour_resolved(addr) {
            tracing::warn!(
                backend = %addr,
                "{e:#}; DSR packets to it are dropped until the host resolves its MAC address otherwise \
                 (health checks do)"
            );
        }
    }
}

#[cfg(test)]
mod tests;
