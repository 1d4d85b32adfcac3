//! `Maps` in memory, for testing the model and reconciliation without a
//! kernel (as Katran tests through its BPF adapter and Cilium with fake
//! maps). Tests set active counts and flows by hand to stand for traffic.
use std::{
    cell::RefCell,
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
};

use anyhow::{bail, Result};
use lb_common::{
    flow_closed, ActiveCounts, BackendSet, BackendStats, Clock, Flow, FlowKey, Service, Timeouts, TraceConfig, COUNTER_COUNT,
    DIR_FORWARD, MAX_BACKENDS,
};

#[derive(Debug, Clone)]
pub struct FakeMaps {
    pub max_services: u32,
    pub max_flows: u32,
    pub services: BTreeMap<SocketAddrV4, u32>,
    pub backends: BTreeMap<u32, Box<BackendSet>>,
    pub active: BTreeMap<u32, Box<ActiveCounts>>,
    pub stats: BTreeMap<(u32, u32), BackendStats>,
    pub flows: Vec<(FlowKey, Flow)>,
    pub counters: [u64; COUNTER_COUNT],
    /// The flows the agent asked to reset.
    pub resets: RefCell<Vec<FlowKey>>,
    /// How many map writes were made: a test can check that a refused
    /// request wrote nothing.
    pub writes: u64,
    /// Writes fail from this count on (`None`: never).
    pub fail_after_writes: Option<u64>,
    /// What `lb trace` asked for, and lines a test has the data path write.
    pub trace: TraceConfig,
    pub trace_lines: Vec<String>,
    /// What the data path knows of each service, as last written.
    pub service_values: BTreeMap<SocketAddrV4, Service>,
    /// What `source_address` answers.
    pub route_source: Option<Ipv4Addr>,
    /// The backends whose neighbour entries the agent asked to keep
    /// resolved.
    pub neighbours_kept: Vec<Ipv4Addr>,
}

impl FakeMaps {
    pub fn new(max_services: u32) -> Self {
        Self {
            max_services,
            max_flows: 1024,
            services: BTreeMap::new(),
            backends: BTreeMap::new(),
            active: BTreeMap::new(),
            stats: BTreeMap::new(),
            flows: Vec::new(),
            counters: [0; COUNTER_COUNT],
            resets: RefCell::new(Vec::new()),
            writes: 0,
            fail_after_writes: None,
            trace: TraceConfig::default(),
            trace_lines: Vec::new(),
            service_values: BTreeMap::new(),
            route_source: Some(Ipv4Addr::new(198, 19, 0, 1)),
            neighbours_kept: Vec::new(),
        }
    }

    /// Sets a slot's active count, as flows opening and closing would.
    pub fn set_active(&mut self, service: u32, slot: usize, count: u64) {
        self.active.entry(service).or_default().active[slot] = count;
    }

    pub fn backend_set(&self, service: u32) -> Option<&BackendSet> {
        self.backends.get(&service).map(|b| &**b)
    }

    fn write(&mut self) -> Result<()> {
        if self.fail_after_writes.is_some_and(|n| self.writes >= n) {
            bail!("map write refused (test)");
        }
        self.writes += 1;
        Ok(())
    }
}

impl super::Maps for FakeMaps {
    fn max_flows(&self) -> u32 {
        self.max_flows
    }

    fn max_services(&self) -> u32 {
        self.max_services
    }

    fn set_service(&mut self, vip: SocketAddrV4, service: &Service) -> Result<()> {
        self.write()?;
        self.services.insert(vip, service.id);
        self.service_values.insert(vip, *service);
        Ok(())
    }

    fn source_address(&self, _to: Ipv4Addr) -> Option<Ipv4Addr> {
        self.route_source
    }

    fn keep_neighbour_resolved(&mut self, backend: Ipv4Addr) -> Result<bool> {
        self.neighbours_kept.push(backend);
        Ok(true)
    }

    fn remove_service(&mut self, vip: SocketAddrV4) -> Result<()> {
        self.write()?;
        self.services.remove(&vip);
        Ok(())
    }

    fn set_backends(&mut self, service: u32, set: &BackendSet) -> Result<()> {
        self.write()?;
        self.backends.insert(service, Box::new(*set));
        Ok(())
    }

    fn pinned_services(&self) -> Vec<(SocketAddrV4, u32, BackendSet)> {
        self.services
            .iter()
            .filter_map(|(vip, id)| Some((*vip, *id, **self.backends.get(id)?)))
            .collect()
    }

    fn active_counts(&self, service: u32) -> Result<ActiveCounts> {
        Ok(self.active.get(&service).map(|a| **a).unwrap_or_default())
    }

    fn service_backend_stats(&self, service: u32, slots: usize) -> Result<Vec<BackendStats>> {
        Ok((0..slots.min(MAX_BACKENDS as usize) as u32)
            .map(|slot| self.stats.get(&(service, slot)).copied().unwrap_or_default())
            .collect())
    }

    fn clear_backend_stats(&mut self, service: u32, slot: u32) -> Result<()> {
        self.write()?;
        self.stats.remove(&(service, slot));
        Ok(())
    }

    fn counters(&self) -> Result<[u64; COUNTER_COUNT]> {
        Ok(self.counters)
    }

    fn flows(&self) -> Vec<(FlowKey, Flow)> {
        self.flows.clone()
    }

    /// Records the request; counts the live forward flows among `keys`.
    fn reset_flows(&self, keys: &[FlowKey]) -> Result<u32> {
        self.resets.borrow_mut().extend_from_slice(keys);
        let live = self
            .flows
            .iter()
            .filter(|(k, f)| keys.contains(k) && f.direction == DIR_FORWARD && !flow_closed(f.state))
            .count();
        Ok(live as u32)
    }

    fn clock(&self) -> Clock {
        Clock::new(1000, &Timeouts::default())
    }

    fn now_ticks(&self) -> Result<u64> {
        Ok(0)
    }

    fn set_trace(&mut self, config: TraceConfig) -> Result<()> {
        self.write()?;
        self.trace = config;
        Ok(())
    }

    fn read_trace(&mut self) -> Vec<String> {
        std::mem::take(&mut self.trace_lines)
    }

    fn trace_suppressed(&self) -> u64 {
        0
    }
}
