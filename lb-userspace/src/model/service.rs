//! A service and its backend slots.
//!
//! A backend owns a slot of its service, and its flows hold that slot's
//! connection count. A removed backend keeps its slot, ineligible for new
//! flows, until its last flow has gone, so that a count is never inherited by
//! another backend.
use std::{net::SocketAddrV4, time::Instant};

use anyhow::{bail, Context, Result};
use lb_common::{established_count, Backend, BackendSet, BACKEND_ELIGIBLE, MAX_BACKENDS};

use crate::{
    config::{BackendConfig, DownPolicy, HealthConfig, Mode, Scheduler, ServiceConfig, Tunnel},
    datapath::wire_addr,
    model::member::Member,
};

#[derive(Debug, Clone)]
pub enum Slot {
    Free,
    Used(Box<Member>),
}

#[derive(Debug, Clone)]
pub struct Service {
    pub name: String,
    pub vip: SocketAddrV4,
    pub scheduler: Scheduler,
    pub mode: Mode,
    /// DSR: how packets reach the backends.
    pub tunnel: Tunnel,
    /// Full NAT: the configured source addresses (none: the agent's
    /// default) and ports.
    pub snat_addresses: Vec<std::net::Ipv4Addr>,
    pub snat_ports: [u16; 2],
    pub health: Option<HealthConfig>,
    pub on_down: DownPolicy,
    /// Its row in the data path's per-service maps.
    pub id: u32,
    pub slots: Vec<Slot>,
    /// Found in the pinned maps, not yet claimed by the config.
    pub adopted: bool,
}

impl Service {
    /// A service with no backends yet, under `id`.
    pub fn new(config: &ServiceConfig, id: u32) -> Self {
        Self {
            name: config.name.clone(),
            vip: config.vip,
            scheduler: config.scheduler,
            mode: config.mode,
            tunnel: config.tunnel,
            snat_addresses: config.snat_addresses.clone(),
            snat_ports: config.snat_ports,
            health: config.health.clone(),
            on_down: config.on_backend_down,
            id,
            slots: Vec::new(),
            adopted: false,
        }
    }

    /// Takes the options of `config` (not its backends).
    pub fn configure(&mut self, config: &ServiceConfig) {
        self.name = config.name.clone();
        self.scheduler = config.scheduler;
        self.mode = config.mode;
        self.tunnel = config.tunnel;
        self.snat_addresses = config.snat_addresses.clone();
        self.snat_ports = config.snat_ports;
        self.health = config.health.clone();
        self.on_down = config.on_backend_down;
        self.adopted = false;
    }

    /// The service as a config: what it runs with now, the operator's
    /// changes included (not its removed backends finishing their flows).
    pub fn config(&self) -> ServiceConfig {
        ServiceConfig {
            name: self.name.clone(),
            vip: self.vip,
            scheduler: self.scheduler,
            mode: self.mode,
            tunnel: self.tunnel,
            snat_addresses: self.snat_addresses.clone(),
            snat_ports: self.snat_ports,
            health: self.health.clone(),
            on_backend_down: self.on_down,
            backends: self.configured().map(|m| m.config.clone()).collect(),
        }
    }

    /// Whether each backend's slot carries the address this host reaches it
    /// from: full NAT's source without configured ones, DSR's tunnel source.
    pub fn needs_source_addresses(&self) -> bool {
        (self.mode == Mode::FullNat && self.snat_addresses.is_empty())
            || (self.mode == Mode::Dsr && self.tunnel == Tunnel::Ipip)
    }

    pub fn members(&self) -> impl Iterator<Item = (usize, &Member)> {
        self.slots.iter().enumerate().filter_map(|(i, s)| match s {
            Slot::Used(m) => Some((i, &**m)),
            Slot::Free => None,
        })
    }

    pub fn members_mut(&mut self) -> impl Iterator<Item = (usize, &mut Member)> {
        self.slots.iter_mut().enumerate().filter_map(|(i, s)| match s {
            Slot::Used(m) => Some((i, &mut **m)),
            Slot::Free => None,
        })
    }

    /// The backends in the config (not removed ones finishing their flows).
    pub fn configured(&self) -> impl Iterator<Item = &Member> {
        self.members().map(|(_, m)| m).filter(|m| !m.removed)
    }

    /// The slot of a backend that is not removed.
    pub fn slot_of(&self, address: SocketAddrV4) -> Option<usize> {
        self.members().find(|(_, m)| m.config.address == address && !m.removed).map(|(i, _)| i)
    }

    pub fn member_mut(&mut self, address: SocketAddrV4) -> Result<&mut Member> {
        let name = self.name.clone();
        self.members_mut()
            .map(|(_, m)| m)
            .find(|m| m.config.address == address && !m.removed)
            .with_context(|| format!("service {name} has no backend {address}"))
    }

    /// Where `backend` would go: the slot it had if it is coming back before
    /// its old flows finished, else a free one or a removed backend's whose
    /// flows have all gone (`active` is each slot's count), else a new one.
    /// Says whether the slot is new to it (its statistics start from zero).
    pub fn slot_for(&self, active: &[u64], backend: &BackendConfig) -> Result<(usize, bool)> {
        let name = &self.name;
        let existing =
            self.slots.iter().position(|slot| matches!(slot, Slot::Used(m) if m.config.address == backend.address));
        if let Some(i) = existing {
            return match &self.slots[i] {
                Slot::Used(m) if m.removed => Ok((i, false)),
                _ => bail!("service {name} already has backend {}", backend.address),
            };
        }
        let reusable = self.slots.iter().enumerate().position(|(i, slot)| match slot {
            Slot::Free => true,
            Slot::Used(m) => m.removed && active.get(i).copied().unwrap_or(0) == 0,
        });
        match reusable {
            Some(i) => Ok((i, true)),
            None if self.slots.len() < MAX_BACKENDS as usize => Ok((self.slots.len(), true)),
            None => bail!("service {name} already has {MAX_BACKENDS} backends"),
        }
    }

    /// Gives `backend` the slot `slot_for` chooses; returns it and whether
    /// it is new to it.
    pub fn place(&mut self, active: &[u64], backend: &BackendConfig, now: Instant) -> Result<(usize, bool)> {
        let (slot, fresh) = self.slot_for(active, backend)?;
        if slot == self.slots.len() {
            self.slots.push(Slot::Free);
        }
        self.slots[slot] = Slot::Used(Box::new(Member::new(backend.clone(), now)));
        Ok((slot, fresh))
    }

    /// Decides every backend's eligibility; returns the slots whose flows
    /// must be reset now (policy `reset`, backend just went dead).
    pub fn decide(&mut self, now: Instant) -> Vec<u16> {
        let reset = self.on_down == DownPolicy::Reset;
        self.members_mut().filter_map(|(i, m)| (m.decide(now) && reset).then_some(i as u16)).collect()
    }

    /// Frees the slots of removed backends whose flows have all gone.
    pub fn reclaim(&mut self, active: &[u64]) {
        for (i, slot) in self.slots.iter_mut().enumerate() {
            if matches!(slot, Slot::Used(m) if m.removed) && active.get(i).copied().unwrap_or(0) == 0 {
                *slot = Slot::Free;
            }
        }
        while matches!(self.slots.last(), Some(Slot::Free)) {
            self.slots.pop();
        }
    }

    /// What the data path should have for this service, given each slot's
    /// count (established and half-open connections in one word).
    pub fn backend_set(&self, active: &[u64], now: Instant) -> BackendSet {
        let count = |i: usize| established_count(active.get(i).copied().unwrap_or(0));
        // Slow start caps a ramping backend at its share of the connections
        // its tier holds: a weight alone would not hold least connections
        // back from a backend with none.
        let tier_load = |backup: bool| -> (u64, u64) {
            self.members()
                .filter(|(_, m)| m.eligible && m.config.backup == backup)
                .fold((0, 0), |(a, w), (i, m)| (a + count(i), w + m.config.weight as u64))
        };
        let mut set =
            BackendSet { len: self.slots.len() as u32, scheduler: self.scheduler.wire(), ..Default::default() };
        for (i, m) in self.members() {
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
                // Filled in by reconciliation, which can ask the kernel.
                snat_addr: 0,
            };
        }
        set.index_candidates();
        set
    }
}
