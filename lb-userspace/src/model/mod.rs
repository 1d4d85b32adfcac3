//! The agent's model of services and backends: pure, with no maps. It
//! decides where backends go (slots), which may take new flows (operator,
//! active and passive health, slow start), what a reload changes, and what
//! a previous agent left running. `reconcile` writes what it decides into
//! the data path; the data path adds the tiers (backups) and caps.
pub mod health;
pub mod member;
pub mod plan;
pub mod service;

use std::{net::SocketAddrV4, time::Instant};

use anyhow::{bail, Context, Result};
use lb_common::{BackendSet, BACKEND_ELIGIBLE, MAX_BACKENDS, MAX_SERVICES};

pub use self::{
    member::Member,
    plan::Step,
    service::{Service, Slot},
};
use crate::{
    config::{BackendConfig, DownPolicy, HealthConfig, Mode, Scheduler, ServiceConfig},
    datapath::host_socket,
};

/// Each slot's active connections, by service id (the data path keeps them).
pub type Counts<'a> = &'a dyn Fn(u32) -> Result<Vec<u64>>;

/// A backend given a slot: the data path's statistics for it start from
/// zero if `fresh`, and its passive-failure baseline is taken from them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placed {
    pub service: u32,
    pub slot: usize,
    pub fresh: bool,
}

/// A health check the agent should be running.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckTarget {
    pub service: String,
    pub address: SocketAddrV4,
    pub config: HealthConfig,
}

#[derive(Debug, Clone, Default)]
pub struct Model {
    pub services: Vec<Service>,
    /// Ids of removed services whose flows may still hold counts.
    pub retired: Vec<u32>,
}

impl Model {
    pub fn service(&self, name: &str) -> Result<&Service> {
        self.services
            .iter()
            .find(|s| s.name == name)
            .with_context(|| format!("no service named {name:?} (see `lb status`)"))
    }

    pub fn service_mut(&mut self, name: &str) -> Result<&mut Service> {
        self.services
            .iter_mut()
            .find(|s| s.name == name)
            .with_context(|| format!("no service named {name:?} (see `lb status`)"))
    }

    pub fn service_by_id(&self, id: u32) -> Option<&Service> {
        self.services.iter().find(|s| s.id == id)
    }

    /// The lowest id neither in use nor retired.
    pub fn free_id(&self, max_services: u32) -> Result<u32> {
        (0..max_services)
            .find(|id| !self.services.iter().any(|s| s.id == *id) && !self.retired.contains(id))
            .with_context(|| {
                format!("all {max_services} service slots are in use (agent.max_services, at most {MAX_SERVICES})")
            })
    }

    /// Adds a service with its backends. A service a previous agent left
    /// running on the same VIP is claimed instead: its backends keep their
    /// slots, and so their flows' counts.
    pub fn add_service(
        &mut self,
        config: &ServiceConfig,
        max_services: u32,
        counts: Counts,
        now: Instant,
    ) -> Result<Vec<Placed>> {
        config.validate()?;
        if self.services.iter().any(|s| s.name == config.name) {
            bail!("a service named {:?} already exists", config.name);
        }
        if let Some(s) = self.services.iter().find(|s| s.vip == config.vip && !s.adopted) {
            bail!("VIP {} is already used by service {:?}", config.vip, s.name);
        }
        let index = match self.services.iter().position(|s| s.vip == config.vip) {
            Some(adopted) => adopted,
            None => {
                let id = self.free_id(max_services)?;
                self.services.push(Service::new(config, id));
                self.services.len() - 1
            }
        };
        let active = counts(self.services[index].id)?;
        let service = &mut self.services[index];
        service.configure(config);
        let mut placed = Vec::new();
        for b in &config.backends {
            let (slot, fresh) = service.place(&active, b, now)?;
            placed.push(Placed { service: service.id, slot, fresh });
        }
        Ok(placed)
    }

    /// Removes a service; its id waits for its flows' counts.
    pub fn remove_service(&mut self, name: &str) -> Result<Service> {
        let index = self
            .services
            .iter()
            .position(|s| s.name == name)
            .with_context(|| format!("no service named {name:?} (see `lb status`)"))?;
        let service = self.services.remove(index);
        self.retired.push(service.id);
        Ok(service)
    }

    pub fn add_backend(&mut self, service: &str, backend: &BackendConfig, counts: Counts, now: Instant) -> Result<Placed> {
        backend.validate(service)?;
        self.service(service)?.config().check_backend_port(backend)?;
        let id = self.service(service)?.id;
        let active = counts(id)?;
        let (slot, fresh) = self.service_mut(service)?.place(&active, backend, now)?;
        Ok(Placed { service: id, slot, fresh })
    }

    /// Changes one backend and records why.
    pub fn update_member(
        &mut self,
        service: &str,
        address: SocketAddrV4,
        change: impl FnOnce(&mut Member) -> String,
    ) -> Result<()> {
        let m = self.service_mut(service)?.member_mut(address)?;
        let reason = change(m);
        m.note(reason);
        Ok(())
    }

    /// Carries out one step of a reload plan.
    pub fn apply(&mut self, step: &Step, max_services: u32, counts: Counts, now: Instant) -> Result<Vec<Placed>> {
        match step {
            Step::RemoveService { name, .. } => self.remove_service(name).map(|_| Vec::new()),
            Step::AddService(config) => self.add_service(config, max_services, counts, now),
            Step::Configure(config) => {
                let s = self.service_mut(&config.name)?;
                s.scheduler = config.scheduler;
                s.mode = config.mode;
                s.tunnel = config.tunnel;
                s.snat_addresses = config.snat_addresses.clone();
                s.snat_ports = config.snat_ports;
                s.health = config.health.clone();
                s.on_down = config.on_backend_down;
                Ok(Vec::new())
            }
            Step::RemoveBackend { service, address } => self
                .update_member(service, *address, |m| {
                    m.removed = true;
                    "removed by operator".into()
                })
                .map(|_| Vec::new()),
            Step::AddBackend { service, backend } => Ok(vec![self.add_backend(service, backend, counts, now)?]),
            Step::ChangeBackend { service, backend } => {
                self.service_mut(service)?.member_mut(backend.address)?.config = backend.clone();
                Ok(Vec::new())
            }
        }
    }

    /// Takes in the services a previous agent left in the pinned maps (VIP,
    /// id, backend set): their backends keep their slots (and so their
    /// flows' counts) but take no new flows until the config claims them.
    pub fn adopt(&mut self, pinned: &[(SocketAddrV4, u32, BackendSet)], now: Instant) {
        for (vip, id, set) in pinned {
            let slots = set.slots[..set.len.min(MAX_BACKENDS) as usize]
                .iter()
                .map(|b| {
                    if b.addr == 0 {
                        return Slot::Free;
                    }
                    let mut m = Member::new(BackendConfig::new(host_socket(b.addr, b.port), b.weight), now);
                    m.removed = true;
                    m.eligible = b.flags & BACKEND_ELIGIBLE != 0;
                    m.reason = "found running, not in the config".into();
                    Slot::Used(Box::new(m))
                })
                .collect();
            self.services.push(Service {
                name: format!("(adopted {vip})"),
                vip: *vip,
                scheduler: Scheduler::from_wire(set.scheduler),
                mode: Mode::Nat,
                snat_addresses: Vec::new(),
                snat_ports: crate::config::DEFAULT_SNAT_PORTS,
                tunnel: crate::config::Tunnel::None,
                health: None,
                on_down: DownPolicy::Keep,
                id: *id,
                slots,
                adopted: true,
            });
        }
    }

    /// Adopted services the config did not claim.
    pub fn unclaimed(&self) -> Vec<String> {
        self.services.iter().filter(|s| s.adopted).map(|s| s.name.clone()).collect()
    }

    /// The health checks that should be running.
    pub fn check_targets(&self) -> Vec<CheckTarget> {
        let mut targets = Vec::new();
        for s in &self.services {
            let Some(config) = &s.health else { continue };
            for m in s.configured() {
                targets.push(CheckTarget { service: s.name.clone(), address: m.config.address, config: config.clone() });
            }
        }
        targets
    }
}

#[cfg(test)]
mod tests;
