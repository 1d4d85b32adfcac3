//! What a reload changes: the difference between the running model and a
//! new config, as steps. Unchanged backends and all established flows are
//! left alone, and drains stay.
use std::net::SocketAddrV4;

use crate::{
    config::{BackendConfig, Config, ServiceConfig},
    model::Model,
};

#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// `vip_changed`: removed to be added again on its new VIP.
    RemoveService { name: String, vip_changed: bool },
    AddService(ServiceConfig),
    /// Scheduler, mode, health checks or down policy changed.
    Configure(ServiceConfig),
    RemoveBackend { service: String, address: SocketAddrV4 },
    AddBackend { service: String, backend: BackendConfig },
    ChangeBackend { service: String, backend: BackendConfig },
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::RemoveService { name, vip_changed: false } => write!(f, "removed service {name}"),
            Step::RemoveService { name, vip_changed: true } => write!(f, "removed service {name} (VIP changed)"),
            Step::AddService(s) => write!(f, "added service {}", s.name),
            Step::Configure(s) => write!(f, "{}: scheduler, mode, health checks or down policy changed", s.name),
            Step::RemoveBackend { service, address } => write!(f, "{service}: removed backend {address}"),
            Step::AddBackend { service, backend } => write!(f, "{service}: added backend {}", backend.address),
            Step::ChangeBackend { service, backend } => write!(f, "{service}: changed backend {}", backend.address),
        }
    }
}

/// The steps that take `model` to `config`, in the order they must run:
/// removals first, so that a VIP or a slot freed by one is there for an
/// addition.
pub fn plan(model: &Model, config: &Config) -> Vec<Step> {
    let mut steps = Vec::new();
    for s in &model.services {
        match config.services.iter().find(|new| new.name == s.name) {
            None => steps.push(Step::RemoveService { name: s.name.clone(), vip_changed: false }),
            Some(new) if new.vip != s.vip => {
                steps.push(Step::RemoveService { name: s.name.clone(), vip_changed: true })
            }
            Some(_) => {}
        }
    }
    for new in &config.services {
        let Some(s) = model.services.iter().find(|s| s.name == new.name && s.vip == new.vip) else {
            steps.push(Step::AddService(new.clone()));
            continue;
        };
        if s.scheduler != new.scheduler || s.mode != new.mode || s.tunnel != new.tunnel || s.health != new.health || s.on_down != new.on_backend_down
        {
            steps.push(Step::Configure(new.clone()));
        }
        for old in s.configured() {
            if !new.backends.iter().any(|b| b.address == old.config.address) {
                steps.push(Step::RemoveBackend { service: new.name.clone(), address: old.config.address });
            }
        }
        for b in &new.backends {
            match s.configured().find(|old| old.config.address == b.address) {
                None => steps.push(Step::AddBackend { service: new.name.clone(), backend: b.clone() }),
                Some(old) if old.config != *b => {
                    steps.push(Step::ChangeBackend { service: new.name.clone(), backend: b.clone() })
                }
                Some(_) => {}
            }
        }
    }
    steps
}
