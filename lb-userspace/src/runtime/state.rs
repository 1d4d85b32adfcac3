//! What the operator changed at run time, kept so that a restarted or
//! upgraded agent keeps it: drains and disables, and the services as they
//! ran — backends and services added, removed or reweighted from the CLI —
//! and which backends were down for their health, so that a restart does
//! not put a dead backend back into rotation.
//!
//! It lives in a file next to the control socket (`lb.sock` →
//! `lb.state.json`): the BPF filesystem holds pinned objects only, and the
//! socket's directory (`/run/lb`) is, like the pins, cleared at boot. It
//! is written after every change and read at start:
//! - if the config file is the one the saved services were reconciled with
//!   (same digest), the saved services are applied, the CLI's changes with
//!   them; if it has been edited since, the file wins, as `lb reload` does;
//! - drains and disables are applied either way, to the backends that are
//!   there. `lb reload` keeps them too; `lb backend enable` ends them.
//! `lb shutdown` removes the file with the pins.
use std::{
    net::SocketAddrV4,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::{
    api::Admin,
    config::{Config, ServiceConfig},
    datapath::Maps,
    model::Model,
    reconcile::Balancer,
};

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct OperatorState {
    /// The config file the services below were last reconciled with.
    pub config_digest: String,
    pub services: Vec<ServiceConfig>,
    /// Backends the operator took out of rotation.
    pub admin: Vec<AdminState>,
    /// Backends that were down for their health: a restarted agent keeps
    /// them out until their checks say otherwise.
    #[serde(default)]
    pub down: Vec<HealthState>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HealthState {
    pub service: String,
    pub address: SocketAddrV4,
    /// Down by active checks: it must pass `rise` of them again.
    pub active_down: bool,
    /// Held out by passive failures until then (Unix seconds).
    pub hold_until: Option<u64>,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdminState {
    pub service: String,
    pub address: SocketAddrV4,
    pub admin: Admin,
}

impl OperatorState {
    /// What the model runs with now.
    pub fn of(model: &Model, config_digest: &str) -> Self {
        let running = model.services.iter().filter(|s| !s.adopted);
        let now = std::time::Instant::now();
        let (mut admin, mut down) = (Vec::new(), Vec::new());
        for s in running.clone() {
            for m in s.configured() {
                let (service, address) = (s.name.clone(), m.config.address);
                if m.admin != Admin::Enabled {
                    admin.push(AdminState { service: service.clone(), address, admin: m.admin });
                }
                let (active_down, hold) = m.health.down(now);
                if active_down || hold.is_some() {
                    let hold_until = hold.map(|h| (unix_now() + h.as_secs_f64()).ceil() as u64);
                    down.push(HealthState { service, address, active_down, hold_until, reason: m.reason.clone() });
                }
            }
        }
        Self { config_digest: config_digest.to_string(), services: running.map(|s| s.config()).collect(), admin, down }
    }

    /// The services to start with: the saved ones if `config` is the file
    /// they were reconciled with, else the config's.
    pub fn services_for<'a>(&'a self, config: &'a Config, config_digest: &str) -> &'a [ServiceConfig] {
        if self.config_digest == config_digest {
            &self.services
        } else {
            &config.services
        }
    }

    /// Applies the saved drains, disables and health to the backends that
    /// are there.
    pub fn take_back<M: Maps>(&self, balancer: &mut Balancer<M>) {
        for a in &self.admin {
            if balancer.set_admin(&a.service, a.address, a.admin).is_ok() {
                tracing::info!(service = %a.service, backend = %a.address, admin = ?a.admin, "kept from before the restart");
            }
        }
        let now = std::time::Instant::now();
        for d in &self.down {
            let hold = d
                .hold_until
                .map(|until| until as f64 - unix_now())
                .filter(|left| *left > 0.0)
                .map(std::time::Duration::from_secs_f64);
            if !d.active_down && hold.is_none() {
                continue; // the hold ended while no agent ran
            }
            let resumed = balancer.resume_health(&d.service, d.address, d.active_down, hold, now, &d.reason);
            if resumed.is_ok() {
                tracing::info!(service = %d.service, backend = %d.address, reason = %d.reason, "still down from before the restart");
            }
        }
    }
}

/// The running agent's state file, and the digest of the config file its
/// services were last reconciled with.
pub struct Persist {
    path: PathBuf,
    config_digest: std::sync::Mutex<String>,
    /// What was written last, so that an unchanged state is not written
    /// again (it is offered after every control tick).
    written: std::sync::Mutex<Vec<u8>>,
}

impl Persist {
    pub fn new(socket: &Path, config_digest: String) -> Self {
        Self {
            path: path_for(socket),
            config_digest: std::sync::Mutex::new(config_digest),
            written: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Saves what `model` runs with, if it changed since the last save; a
    /// failure is logged, not fatal: the data path and the running agent
    /// are unaffected.
    pub fn save(&self, model: &Model) {
        let state = OperatorState::of(model, &self.config_digest.lock().unwrap());
        let compared = serde_json::to_vec(&state).unwrap_or_default();
        let mut written = self.written.lock().unwrap();
        if *written == compared {
            return;
        }
        match save(&self.path, &state) {
            Ok(()) => *written = compared,
            Err(e) => tracing::warn!("saving the operator's changes failed (a restart would not keep them): {e:#}"),
        }
    }

    pub fn config_digest(&self) -> String {
        self.config_digest.lock().unwrap().clone()
    }

    /// After a reload: the services now follow this config file.
    pub fn reconciled_with(&self, config_digest: String) {
        *self.config_digest.lock().unwrap() = config_digest;
    }

    pub fn remove(&self) {
        let _ = std::fs::remove_file(&self.path);
        self.written.lock().unwrap().clear();
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// Where the state of the agent serving `socket` is kept.
pub fn path_for(socket: &Path) -> PathBuf {
    socket.with_extension("state.json")
}

/// The saved state, if there is one that can be read.
pub fn load(path: &Path) -> Option<OperatorState> {
    let text = std::fs::read_to_string(path).ok()?;
    match serde_json::from_str(&text) {
        Ok(state) => Some(state),
        Err(e) => {
            tracing::warn!(path = %path.display(), "ignoring the saved operator state: {e}");
            None
        }
    }
}

/// Writes the state whole, through a temporary file, so a crash mid-write
/// leaves the old one.
pub fn save(path: &Path, state: &OperatorState) -> Result<()> {
    let temporary = path.with_extension("state.json.new");
    std::fs::write(&temporary, serde_json::to_vec_pretty(state)?)
        .with_context(|| format!("writing {}", temporary.display()))?;
    std::fs::rename(&temporary, path).with_context(|| format!("replacing {}", path.display()))
}

/// A digest of a config file's bytes (FNV-1a, 64 bits): stable across builds,
/// so an upgraded agent recognises the file too.
pub fn digest(bytes: &[u8]) -> String {
    let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3));
    format!("{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        datapath::FakeMaps,
        fixtures::{addr, service, vip},
    };

    #[test]
    fn drains_disables_and_cli_changes_are_taken_back_after_a_restart() {
        let mut first = Balancer::new(FakeMaps::new(4));
        first.add_service(&service("web", vip(0), &[1, 1])).unwrap();
        first.set_admin("web", addr(2), Admin::Disabled).unwrap();
        first.set_weight("web", addr(1), 7).unwrap();
        first.add_backend("web", &crate::config::BackendConfig::new(addr(3), 1)).unwrap();
        let saved = OperatorState::of(&first.model, "abc");
        let text = serde_json::to_string(&saved).unwrap();
        let saved: OperatorState = serde_json::from_str(&text).unwrap();

        let config = Config { services: vec![service("web", vip(0), &[1, 1])], ..Config::default() };
        let mut second = Balancer::new(FakeMaps::new(4));
        for s in saved.services_for(&config, "abc") {
            second.add_service(s).unwrap();
        }
        saved.take_back(&mut second);
        let backends: Vec<(SocketAddrV4, u32, Admin)> = second.model.services[0]
            .configured()
            .map(|m| (m.config.address, m.config.weight, m.admin))
            .collect();
        assert_eq!(
            backends,
            [(addr(1), 7, Admin::Enabled), (addr(2), 1, Admin::Disabled), (addr(3), 1, Admin::Enabled)]
        );
        // An edited config file wins; the disable is kept.
        let mut third = Balancer::new(FakeMaps::new(4));
        for s in saved.services_for(&config, "edited") {
            third.add_service(s).unwrap();
        }
        saved.take_back(&mut third);
        let backends: Vec<(u32, Admin)> =
            third.model.services[0].configured().map(|m| (m.config.weight, m.admin)).collect();
        assert_eq!(backends, [(1, Admin::Enabled), (1, Admin::Disabled)]);
    }

    #[test]
    fn a_backend_down_for_its_health_stays_down_after_a_restart() {
        let mut first = Balancer::new(FakeMaps::new(4));
        let mut config = service("web", vip(0), &[1, 1]);
        config.health = Some(crate::config::HealthConfig::default());
        first.add_service(&config).unwrap();
        let failed = crate::api::CheckResult { ok: false, latency_ms: 1.0, detail: "refused".into() };
        for _ in 0..3 {
            first.record_check("web", addr(2), failed.clone()).unwrap();
        }
        let saved: OperatorState = serde_json::from_str(&serde_json::to_string(&OperatorState::of(&first.model, "abc")).unwrap()).unwrap();
        assert_eq!(saved.down.len(), 1);

        let mut second = Balancer::new(FakeMaps::new(4));
        second.add_service(&config).unwrap();
        saved.take_back(&mut second);
        let states: Vec<String> = second.status().unwrap().services[0].backends.iter().map(|b| b.state.to_string()).collect();
        assert_eq!(states, ["up", "down"]);
        let passed = crate::api::CheckResult { ok: true, latency_ms: 1.0, detail: "connected".into() };
        for _ in 0..2 {
            second.record_check("web", addr(2), passed.clone()).unwrap();
        }
        assert_eq!(second.status().unwrap().services[0].backends[1].state.to_string(), "up", "rise passes bring it back");
    }

    #[test]
    fn the_digest_is_fixed_by_the_bytes() {
        assert_eq!(digest(b""), "cbf29ce484222325");
        assert_ne!(digest(b"a"), digest(b"b"));
    }
}
