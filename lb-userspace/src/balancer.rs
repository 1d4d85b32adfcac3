//! The agent's model of services and backends, and how it is written into the
//! data path's maps.
//!
//! A backend owns a slot of its service, and its flows hold that slot's
//! connection count. A removed backend keeps its slot, ineligible for new
//! flows, until its last flow has gone, so that a count is never inherited by
//! another backend. Removed services keep their id the same way.
use std::net::SocketAddrV4;

use anyhow::{bail, Context, Result};
use lb_common::{
    Backend, BackendSet, FlowKey, BACKEND_ELIGIBLE, DIR_FORWARD, MAX_BACKENDS, MAX_SERVICES,
};
use serde::{Deserialize, Serialize};

use crate::{
    config::{validate_backend, BackendConfig, Mode, Scheduler, ServiceConfig},
    datapath::{host_socket, wire_addr, Datapath},
};

#[derive(Debug, Clone)]
enum Slot {
    Free,
    Used { address: SocketAddrV4, weight: u32, removed: bool },
}

#[derive(Debug)]
struct ServiceState {
    name: String,
    vip: SocketAddrV4,
    scheduler: Scheduler,
    mode: Mode,
    id: u32,
    slots: Vec<Slot>,
}

/// A removed service whose flows may still hold counts under its id.
#[derive(Debug)]
struct RetiredService {
    id: u32,
}

pub struct Balancer {
    pub datapath: Datapath,
    services: Vec<ServiceState>,
    retired: Vec<RetiredService>,
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
    pub active_connections: u64,
    pub total_connections: u64,
    pub backends: Vec<BackendStatus>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct BackendStatus {
    pub address: String,
    pub weight: u32,
    /// `up`, or `removing` while a removed backend's flows finish.
    pub state: String,
    pub active_connections: u64,
    pub total_connections: u64,
    pub packets_in: u64,
    pub bytes_in: u64,
    pub packets_out: u64,
    pub bytes_out: u64,
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
        Self { datapath, services: Vec::new(), retired: Vec::new() }
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
        if let Some(s) = self.services.iter().find(|s| s.vip == config.vip) {
            bail!("VIP {} is already used by service {:?}", config.vip, s.name);
        }
        let id = (0..MAX_SERVICES)
            .find(|id| {
                !self.services.iter().any(|s| s.id == *id) && !self.retired.iter().any(|r| r.id == *id)
            })
            .with_context(|| format!("all {MAX_SERVICES} service slots are in use"))?;
        let mut service = ServiceState {
            name: config.name.clone(),
            vip: config.vip,
            scheduler: config.scheduler,
            mode: config.mode,
            id,
            slots: Vec::new(),
        };
        for (slot, b) in config.backends.iter().enumerate() {
            self.datapath.clear_backend_stats(id, slot as u32)?;
            service.slots.push(Slot::Used { address: b.address, weight: b.weight, removed: false });
        }
        // Backends first, so the service never appears without them.
        self.datapath.set_backends(id, &backend_set(&service))?;
        self.datapath.set_service(service.vip, id)?;
        self.services.push(service);
        Ok(())
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
        validate_backend(service, backend.address, backend.weight)?;
        let counts = {
            let id = self.service_mut(service)?.id;
            self.datapath.active_counts(id)?
        };
        let s = self.service_mut(service)?;
        let existing = s.slots.iter().position(
            |slot| matches!(slot, Slot::Used { address, .. } if *address == backend.address),
        );
        let (slot, fresh) = match existing {
            Some(i) => match &s.slots[i] {
                Slot::Used { removed: true, .. } => (i, false),
                _ => bail!("service {service} already has backend {}", backend.address),
            },
            None => {
                let reusable = s.slots.iter().enumerate().position(|(i, slot)| match slot {
                    Slot::Free => true,
                    Slot::Used { removed, .. } => *removed && counts.active[i] == 0,
                });
                match reusable {
                    Some(i) => (i, true),
                    None if s.slots.len() < MAX_BACKENDS as usize => {
                        s.slots.push(Slot::Free);
                        (s.slots.len() - 1, true)
                    }
                    None => bail!("service {service} already has {MAX_BACKENDS} backends"),
                }
            }
        };
        s.slots[slot] = Slot::Used { address: backend.address, weight: backend.weight, removed: false };
        let (id, set) = (s.id, backend_set(s));
        if fresh {
            self.datapath.clear_backend_stats(id, slot as u32)?;
        }
        self.datapath.set_backends(id, &set)
    }

    fn backend_slot(&mut self, service: &str, address: SocketAddrV4) -> Result<(&mut ServiceState, usize)> {
        let s = self.service_mut(service)?;
        let slot = s
            .slots
            .iter()
            .position(|slot| matches!(slot, Slot::Used { address: a, removed: false, .. } if *a == address))
            .with_context(|| format!("service {service} has no backend {address}"))?;
        Ok((s, slot))
    }

    pub fn remove_backend(&mut self, service: &str, address: SocketAddrV4) -> Result<()> {
        let (s, slot) = self.backend_slot(service, address)?;
        if let Slot::Used { removed, .. } = &mut s.slots[slot] {
            *removed = true;
        }
        let (id, set) = (s.id, backend_set(s));
        self.datapath.set_backends(id, &set)
    }

    pub fn set_weight(&mut self, service: &str, address: SocketAddrV4, new_weight: u32) -> Result<()> {
        validate_backend(service, address, new_weight)?;
        let (s, slot) = self.backend_slot(service, address)?;
        if let Slot::Used { weight, .. } = &mut s.slots[slot] {
            *weight = new_weight;
        }
        let (id, set) = (s.id, backend_set(s));
        self.datapath.set_backends(id, &set)
    }

    /// Frees the slots and ids whose flows have all gone.
    pub fn reclaim(&mut self) -> Result<()> {
        for s in &mut self.services {
            let counts = self.datapath.active_counts(s.id)?;
            for (i, slot) in s.slots.iter_mut().enumerate() {
                if matches!(slot, Slot::Used { removed: true, .. }) && counts.active[i] == 0 {
                    *slot = Slot::Free;
                }
            }
            while matches!(s.slots.last(), Some(Slot::Free)) {
                s.slots.pop();
            }
        }
        let datapath = &self.datapath;
        self.retired.retain(|r| match datapath.active_counts(r.id) {
            Ok(counts) => counts.active.iter().any(|&n| n != 0),
            Err(_) => true,
        });
        Ok(())
    }

    pub fn status(&self) -> Result<Status> {
        let mut services = Vec::new();
        for s in &self.services {
            let counts = self.datapath.active_counts(s.id)?;
            let mut backends = Vec::new();
            for (i, slot) in s.slots.iter().enumerate() {
                let Slot::Used { address, weight, removed } = slot else { continue };
                let stats = self.datapath.backend_stats(s.id, i as u32)?;
                backends.push(BackendStatus {
                    address: address.to_string(),
                    weight: *weight,
                    state: if *removed { "removing" } else { "up" }.to_string(),
                    active_connections: counts.active[i],
                    total_connections: stats.new_flows,
                    packets_in: stats.fwd_packets,
                    bytes_in: stats.fwd_bytes,
                    packets_out: stats.reply_packets,
                    bytes_out: stats.reply_bytes,
                });
            }
            services.push(ServiceStatus {
                name: s.name.clone(),
                vip: s.vip.to_string(),
                scheduler: s.scheduler,
                mode: s.mode,
                active_connections: backends.iter().map(|b| b.active_connections).sum(),
                total_connections: backends.iter().map(|b| b.total_connections).sum(),
                backends,
            });
        }
        let counters = self.datapath.counters()?;
        let flows = self.datapath.flows().iter().filter(|(_, f)| f.direction == DIR_FORWARD).count();
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
        let now = crate::aging::monotonic_coarse_ns();
        let entries = self.datapath.flows();
        let mut flows = Vec::new();
        for (key, flow) in &entries {
            if flow.direction != DIR_FORWARD {
                continue;
            }
            let reply = entries.iter().find(|(k, _)| *k == crate::aging::reply_key(key, flow));
            let replied_at = reply.map_or(0, |(_, r)| r.last_seen);
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
                idle_seconds: now.saturating_sub(flow.last_seen.max(replied_at)) as f64 / 1e9,
            });
        }
        flows.sort_by(|a, b| (&a.service, &a.client).cmp(&(&b.service, &b.client)));
        flows
    }

    /// Looks up a flow's backend as a test or the CLI would: by client and VIP.
    pub fn flow_backend(&self, client: SocketAddrV4, vip: SocketAddrV4) -> Option<SocketAddrV4> {
        let key = FlowKey {
            saddr: wire_addr(*client.ip()),
            daddr: wire_addr(*vip.ip()),
            sport: client.port().to_be(),
            dport: vip.port().to_be(),
        };
        self.datapath.flow(&key).map(|f| host_socket(f.nat_addr, f.nat_port))
    }
}

fn flow_state_name(state: u32, replied: bool) -> &'static str {
    use lb_common::{flow_closed, FLOW_BACKEND_FIN, FLOW_CLIENT_FIN};
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

fn backend_set(service: &ServiceState) -> BackendSet {
    let mut set = BackendSet { len: service.slots.len() as u32, ..Default::default() };
    for (i, slot) in service.slots.iter().enumerate() {
        if let Slot::Used { address, weight, removed } = slot {
            set.slots[i] = Backend {
                addr: wire_addr(*address.ip()),
                port: address.port().to_be(),
                flags: if *removed { 0 } else { BACKEND_ELIGIBLE },
                tier: 0,
                weight: *weight,
                max_conns: 0,
            };
        }
    }
    set
}
