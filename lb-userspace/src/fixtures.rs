//! What the unit tests of the model and reconciliation build services from.
use std::net::{Ipv4Addr, SocketAddrV4};

use crate::config::{BackendConfig, DownPolicy, Mode, Scheduler, ServiceConfig};

/// Backend `i`: 198.19.0.(10 + i):80.
pub fn addr(i: u8) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(198, 19, 0, 10 + i), 80)
}

/// VIP `i`: 198.18.1.(100 + i):80.
pub fn vip(i: u8) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(198, 18, 1, 100 + i), 80)
}

/// A least_conn service over backends 1, 2, … with `weights`.
pub fn service(name: &str, vip: SocketAddrV4, weights: &[u32]) -> ServiceConfig {
    ServiceConfig {
        name: name.into(),
        vip,
        scheduler: Scheduler::LeastConn,
        mode: Mode::Nat,
        health: None,
        on_backend_down: DownPolicy::Keep,
        snat_addresses: Vec::new(),
        snat_ports: crate::config::DEFAULT_SNAT_PORTS,
        tunnel: crate::config::Tunnel::None,
        backends: weights.iter().enumerate().map(|(i, w)| BackendConfig::new(addr(i as u8 + 1), *w)).collect(),
    }
}
