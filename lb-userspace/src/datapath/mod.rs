//! The data path as the agent sees it: `Maps`, the small interface that
//! reconciliation writes through, implemented by the loaded program
//! (`Datapath`) and, for tests without a kernel, in memory (`FakeMaps`).
mod batch;
pub mod decap;
mod neighbours;
pub mod fake;
mod kernel;
mod pins;

use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::Result;
use lb_common::{
    ActiveCounts, BackendSet, BackendStats, Clock, Flow, FlowKey, Service, ServiceKey, TraceConfig, COUNTER_COUNT,
    DIR_FORWARD, DIR_HOLD, DIR_REPLY, MODE_FULLNAT, PROTO_TCP,
};

pub use self::{fake::FakeMaps, kernel::Datapath, pins::Pins};

pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

/// The maps the agent reads and writes. Per-service rows are indexed by the
/// service's id; backend rows by its slot.
pub trait Maps {
    /// Flows the connection table has room for.
    fn max_flows(&self) -> u32;
    /// Services the maps have room for (ids `0..max_services`).
    fn max_services(&self) -> u32;

    fn set_service(&mut self, vip: SocketAddrV4, service: &Service) -> Result<()>;
    fn remove_service(&mut self, vip: SocketAddrV4) -> Result<()>;
    fn set_backends(&mut self, service: u32, set: &BackendSet) -> Result<()>;
    /// The services and backend sets in the maps (VIP, id, set), as a
    /// previous agent left them.
    fn pinned_services(&self) -> Vec<(SocketAddrV4, u32, BackendSet)>;

    /// Active connections per slot, kept by the data path.
    fn active_counts(&self, service: u32) -> Result<ActiveCounts>;
    /// Slots `0..slots` of a service, summed over CPUs.
    fn service_backend_stats(&self, service: u32, slots: usize) -> Result<Vec<BackendStats>>;
    /// A slot that gets a new backend starts its statistics from zero.
    fn clear_backend_stats(&mut self, service: u32, slot: u32) -> Result<()>;
    /// The program-wide counters, summed over CPUs, by `Counter` index.
    fn counters(&self) -> Result<[u64; COUNTER_COUNT]>;

    /// Every entry of the connection table, both directions.
    fn flows(&self) -> Vec<(FlowKey, Flow)>;
    /// Closes these live forward flows now: their counts are released and
    /// their clients' next packets answered with an RST. Returns how many
    /// were still live.
    fn reset_flows(&self, keys: &[FlowKey]) -> Result<u32>;
    /// The data path's clock, and its time now in ticks.
    fn clock(&self) -> Clock;
    fn now_ticks(&self) -> Result<u64>;

    /// The address this host sends from to reach `to` (its route's source),
    /// if it has a route.
    fn source_address(&self, to: Ipv4Addr) -> Option<Ipv4Addr>;
    /// Keeps the MAC address of `backend` (a DSR backend) resolved, if it
    /// is on one of this host's links; says whether it is.
    fn keep_neighbour_resolved(&mut self, backend: Ipv4Addr) -> Result<bool>;

    /// Tells the data path what `lb trace` wants logged (`on` 0: nothing).
    fn set_trace(&mut self, config: TraceConfig) -> Result<()>;
    /// The trace lines the data path has written since the last call.
    fn read_trace(&mut self) -> Vec<String>;
    /// Trace lines left out for the per-CPU budget, summed over CPUs.
    fn trace_suppressed(&self) -> u64;

    /// Forward entries in the table: the number of flows.
    fn flow_count(&self) -> usize {
        self.flows().iter().filter(|(_, f)| f.direction == DIR_FORWARD).count()
    }

    /// The flows, and the full-NAT source ports each backend slot holds.
    fn table_counts(&self) -> TableCounts {
        TableCounts::of(&self.flows())
    }

    /// One slot's statistics, summed over CPUs.
    fn backend_stats(&self, service: u32, slot: u32) -> Result<BackendStats> {
        let all = self.service_backend_stats(service, slot as usize + 1)?;
        Ok(all[slot as usize])
    }
}

/// What the connection table holds, counted in one pass.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TableCounts {
    /// Forward entries: the flows.
    pub flows: u64,
    /// Full-NAT source ports taken towards each (service, slot): by a
    /// flow's reply entry, live or closed, or held for the backend's
    /// TIME_WAIT (`DIR_HOLD`).
    pub snat_ports: std::collections::HashMap<(u32, u32), u64>,
}

impl TableCounts {
    pub fn of(entries: &[(FlowKey, Flow)]) -> Self {
        let mut counts = Self::default();
        for (_, f) in entries {
            match f.direction {
                DIR_FORWARD => counts.flows += 1,
                DIR_REPLY if f.mode == MODE_FULLNAT => *counts.snat_ports.entry((f.service as u32, f.slot as u32)).or_default() += 1,
                DIR_HOLD => *counts.snat_ports.entry((f.service as u32, f.slot as u32)).or_default() += 1,
                _ => {}
            }
        }
        counts
    }
}

/// The route's source address towards `to`, as the kernel picks it: a UDP
/// socket connected there (no packet is sent).
pub fn route_source(to: Ipv4Addr) -> Option<Ipv4Addr> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.connect((to, 9)).ok()?;
    match socket.local_addr().ok()? {
        std::net::SocketAddr::V4(a) if !a.ip().is_unspecified() => Some(*a.ip()),
        _ => None,
    }
}

pub fn service_key(vip: SocketAddrV4) -> ServiceKey {
    ServiceKey { addr: wire_addr(*vip.ip()), port: vip.port().to_be(), proto: PROTO_TCP, _pad: 0 }
}

/// An address as the data path stores it: in network byte order.
pub fn wire_addr(addr: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(addr.octets())
}

pub fn host_addr(wire: u32) -> Ipv4Addr {
    Ipv4Addr::from(wire.to_ne_bytes())
}

pub fn host_socket(wire_addr: u32, wire_port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(host_addr(wire_addr), u16::from_be(wire_port))
}
