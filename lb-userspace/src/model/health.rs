//! What the agent knows of one backend's health: active checks with rise
//! and fall, and passive failures seen by the data path (handshakes refused
//! with RST, SYNs left unanswered) counted nginx-style: `max_fails` within
//! `fail_timeout` marks the backend down for `fail_timeout`. Pure: the
//! checks themselves run in `runtime::checkers`.
use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use crate::api::CheckResult;

/// What the agent knows of one backend's health.
#[derive(Debug, Clone)]
pub struct Health {
    /// By active checks; a backend starts up so traffic flows at once.
    active_up: bool,
    /// Active checks passed, and failed, in a row.
    passes: u32,
    fails: u32,
    pub last_check: Option<CheckResult>,
    /// Passive: failure times within the window, and the hold.
    failures: VecDeque<Instant>,
    down_until: Option<Instant>,
    /// Data-path failure counters as last read, to see new ones.
    counted: u64,
}

impl Default for Health {
    fn default() -> Self {
        Self { active_up: true, passes: 0, fails: 0, last_check: None, failures: VecDeque::new(), down_until: None, counted: 0 }
    }
}

/// Why a backend's health changed.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Down(String),
    Up(String),
}

impl Health {
    pub fn is_up(&self, now: Instant) -> bool {
        self.active_up && self.down_until.is_none_or(|until| now >= until)
    }

    /// Records an active check; says whether it changed the backend's
    /// health. A check that passes ends a passive hold at once: it is better
    /// evidence than the hold, which only waits out `fail_timeout`.
    pub fn record_check(&mut self, result: CheckResult, rise: u32, fall: u32) -> Option<Change> {
        let ok = result.ok;
        let detail = result.detail.clone();
        self.last_check = Some(result);
        if ok {
            self.fails = 0;
            self.passes += 1;
        } else {
            self.passes = 0;
            self.fails += 1;
        }
        if ok && self.active_up && self.down_until.take().is_some() {
            self.failures.clear();
            return Some(Change::Up(format!("active check passed ({detail}): passive hold ended")));
        }
        if ok && !self.active_up && self.passes >= rise {
            self.active_up = true;
            self.passes = 0;
            self.down_until = None;
            self.failures.clear();
            return Some(Change::Up(format!("active check passed {rise} times ({detail})")));
        }
        if !ok && self.active_up && self.fails >= fall {
            self.active_up = false;
            self.fails = 0;
            return Some(Change::Down(format!("active check failed {fall} times: {detail}")));
        }
        None
    }

    /// Takes the data path's running total of passive failures for this
    /// backend; `max_fails` of them within `fail_timeout` take it down for
    /// `fail_timeout`. `max_fails` 0 turns passive checks off.
    pub fn record_passive(&mut self, total: u64, now: Instant, max_fails: u32, fail_timeout: Duration) -> Option<Change> {
        let new = total.saturating_sub(self.counted);
        self.counted = total;
        if let Some(until) = self.down_until {
            if now >= until {
                self.down_until = None;
                self.failures.clear();
                if self.active_up {
                    return Some(Change::Up(format!("passive hold of {}s over", fail_timeout.as_secs_f64())));
                }
            }
            return None;
        }
        if max_fails == 0 || new == 0 {
            return None;
        }
        for _ in 0..new.min(max_fails as u64) {
            self.failures.push_back(now);
        }
        while self.failures.front().is_some_and(|t| now.duration_since(*t) > fail_timeout) {
            self.failures.pop_front();
        }
        if self.failures.len() >= max_fails as usize {
            self.down_until = Some(now + fail_timeout);
            self.failures.clear();
            return Some(Change::Down(format!(
                "passive: {max_fails} failed handshake(s) within {}s (refused or unanswered)",
                fail_timeout.as_secs_f64()
            )));
        }
        None
    }

    /// What a previous agent knew: the backend was down by active checks
    /// (it must pass `rise` of them again) or held out by passive failures
    /// (for another `hold`).
    pub fn resume(&mut self, active_down: bool, hold: Option<Duration>, now: Instant) {
        if active_down {
            self.active_up = false;
            self.passes = 0;
        }
        if let Some(hold) = hold {
            self.down_until = Some(now + hold);
        }
    }

    /// Whether active checks hold it down, and how much longer a passive
    /// hold lasts: what a restarted agent needs to resume.
    pub fn down(&self, now: Instant) -> (bool, Option<Duration>) {
        (!self.active_up, self.down_until.filter(|until| *until > now).map(|until| until - now))
    }

    /// Starts passive counting from `total`, for a slot that was just
    /// (re)assigned.
    pub fn reset_passive(&mut self, total: u64) {
        self.counted = total;
        self.failures.clear();
        self.down_until = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(ok: bool) -> CheckResult {
        CheckResult { ok, latency_ms: 1.0, detail: if ok { "connected" } else { "refused" }.into() }
    }

    #[test]
    fn fall_and_rise_need_streaks() {
        let now = Instant::now();
        let mut h = Health::default();
        assert!(h.is_up(now));
        assert_eq!(h.record_check(result(false), 2, 3), None);
        assert_eq!(h.record_check(result(true), 2, 3), None, "one failure does not count against later ones");
        assert_eq!(h.record_check(result(false), 2, 3), None);
        assert_eq!(h.record_check(result(false), 2, 3), None);
        assert!(matches!(h.record_check(result(false), 2, 3), Some(Change::Down(_))));
        assert!(!h.is_up(now));
        assert_eq!(h.record_check(result(true), 2, 3), None);
        assert!(matches!(h.record_check(result(true), 2, 3), Some(Change::Up(_))));
        assert!(h.is_up(now));
    }

    #[test]
    fn recovery_seen_by_active_checks_ends_a_passive_hold() {
        let t0 = Instant::now();
        let mut h = Health::default();
        assert!(matches!(h.record_passive(1, t0, 1, Duration::from_secs(10)), Some(Change::Down(_))));
        for _ in 0..3 {
            h.record_check(result(false), 2, 3);
        }
        assert_eq!(h.record_check(result(true), 2, 3), None);
        assert!(matches!(h.record_check(result(true), 2, 3), Some(Change::Up(_))));
        assert!(h.is_up(t0 + Duration::from_secs(1)), "up well before the 10 s hold ends");
    }

    #[test]
    fn passive_failures_within_the_window_hold_it_down() {
        let t0 = Instant::now();
        let window = Duration::from_secs(10);
        let mut h = Health::default();
        assert_eq!(h.record_passive(1, t0, 3, window), None);
        assert_eq!(h.record_passive(2, t0 + Duration::from_secs(11), 3, window), None, "the first one aged out");
        assert_eq!(h.record_passive(3, t0 + Duration::from_secs(12), 3, window), None);
        assert!(matches!(h.record_passive(4, t0 + Duration::from_secs(13), 3, window), Some(Change::Down(_))));
        assert!(!h.is_up(t0 + Duration::from_secs(14)));
        assert!(matches!(h.record_passive(4, t0 + Duration::from_secs(24), 3, window), Some(Change::Up(_))));
        assert!(h.is_up(t0 + Duration::from_secs(24)));
        // max_fails 0: off.
        assert_eq!(h.record_passive(100, t0 + Duration::from_secs(30), 0, window), None);
    }

    #[test]
    fn one_passing_check_ends_a_passive_hold_while_active_checks_say_up() {
        let t0 = Instant::now();
        let mut h = Health::default();
        assert!(matches!(h.record_passive(1, t0, 1, Duration::from_secs(10)), Some(Change::Down(_))));
        assert!(!h.is_up(t0 + Duration::from_secs(1)));
        assert!(matches!(h.record_check(result(true), 2, 3), Some(Change::Up(_))));
        assert!(h.is_up(t0 + Duration::from_secs(1)), "up at once, not after the 10 s hold");
        assert_eq!(h.record_passive(1, t0 + Duration::from_secs(2), 1, Duration::from_secs(10)), None, "the same failure is not counted again");
    }
}
