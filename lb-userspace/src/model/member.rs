//! One backend of a service as the agent sees it: its config, what the
//! operator asked, its health, and whether it may take new flows.
use std::time::{Instant, SystemTime};

use crate::{
    api::{Admin, BackendState},
    config::BackendConfig,
    model::health::{Change, Health},
};

#[derive(Debug, Clone)]
pub struct Member {
    pub config: BackendConfig,
    /// Removed from the config; keeps its slot until its flows are gone.
    pub removed: bool,
    pub admin: Admin,
    pub health: Health,
    /// May take new flows, as last decided.
    pub eligible: bool,
    /// When slow start began, while it lasts.
    pub ramp_from: Option<Instant>,
    pub since: SystemTime,
    pub reason: String,
    /// Totals at the last rate sample, and the rates since.
    pub sampled: Option<(Instant, u64, u64)>,
    pub connections_per_second: f64,
    pub bytes_per_second: f64,
}

impl Member {
    pub fn new(config: BackendConfig, now: Instant) -> Self {
        let ramp_from = (config.slow_start > 0.0).then_some(now);
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

    /// Neither removed, nor taken out by the operator, nor down.
    pub fn wants_new_flows(&self, now: Instant) -> bool {
        !self.removed && self.admin == Admin::Enabled && self.health.is_up(now)
    }

    /// Out for a reason that the service's `on_backend_down = "reset"`
    /// applies to: disabled or down (not drained, not removed).
    pub fn dead(&self, now: Instant) -> bool {
        !self.removed && (self.admin == Admin::Disabled || !self.health.is_up(now))
    }

    pub fn state(&self, now: Instant) -> BackendState {
        if self.removed {
            BackendState::Removing
        } else if self.admin == Admin::Disabled {
            BackendState::Disabled
        } else if self.admin == Admin::Draining {
            BackendState::Draining
        } else if !self.health.is_up(now) {
            BackendState::Down
        } else if self.ramp_from.is_some() {
            BackendState::SlowStart
        } else {
            BackendState::Up
        }
    }

    /// The slow-start share reached, 0 to 1.
    pub fn ramp(&self, now: Instant) -> Option<f64> {
        let from = self.ramp_from?;
        Some((now.saturating_duration_since(from).as_secs_f64() / self.config.slow_start).min(1.0))
    }

    /// Decides whether it takes new flows now, starting slow start when it
    /// comes (back) into rotation and ending it when it is over. Says
    /// whether it just went from eligible to dead.
    pub fn decide(&mut self, now: Instant) -> bool {
        let wanted = self.wants_new_flows(now);
        if wanted && !self.eligible && self.config.slow_start > 0.0 {
            self.ramp_from = Some(now);
        }
        if self.ramp(now).is_some_and(|r| r >= 1.0) || !wanted {
            self.ramp_from = None;
        }
        let died = self.eligible && !wanted && self.dead(now);
        self.eligible = wanted;
        died
    }

    /// Records why its state changed, and when.
    pub fn note(&mut self, reason: String) {
        self.reason = reason;
        self.since = SystemTime::now();
    }

    /// Logs and records a health change.
    pub fn note_health(&mut self, change: Change, service: &str) {
        let address = self.config.address;
        match &change {
            Change::Down(reason) => tracing::warn!(%service, backend = %address, %reason, "backend down"),
            Change::Up(reason) => tracing::info!(%service, backend = %address, %reason, "backend up"),
        }
        let (Change::Down(reason) | Change::Up(reason)) = change;
        self.note(reason);
    }
}

impl Admin {
    /// The reason `lb status` gives for an operator's change.
    pub fn reason(self) -> &'static str {
        match self {
            Admin::Enabled => "enabled by operator",
            Admin::Draining => "drained by operator",
            Admin::Disabled => "disabled by operator",
        }
    }
}
