//! Backend health: active checks run by the agent (TCP connect or HTTP GET)
//! with rise/fall, and passive failures seen by the data path (handshakes
//! refused with RST, SYNs left unanswered) counted nginx-style: `max_fails`
//! within `fail_timeout` marks the backend down for `fail_timeout`.
use std::{
    collections::VecDeque,
    net::SocketAddrV4,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum CheckKind {
    #[default]
    Tcp,
    Http,
}

/// Active checks of one service's backends. The defaults find a dead
/// backend in about a second (3 failures 0.25 s apart, each allowed 0.35 s)
/// and need three failures in a row, so one slow answer does not flap it.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    #[serde(rename = "type")]
    pub kind: CheckKind,
    /// Seconds between the starts of two checks.
    pub interval: f64,
    /// Seconds a check may take.
    pub timeout: f64,
    /// Successes in a row that bring a down backend up.
    pub rise: u32,
    /// Failures in a row that take an up backend down.
    pub fall: u32,
    /// Check this port instead of the backend's own.
    pub port: Option<u16>,
    /// HTTP: the path to GET and the status codes that mean healthy.
    pub path: String,
    pub expect_status: [u16; 2],
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            kind: CheckKind::Tcp,
            interval: 0.25,
            timeout: 0.35,
            rise: 2,
            fall: 3,
            port: None,
            path: "/health".into(),
            expect_status: [200, 399],
        }
    }
}

impl HealthConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        if !(self.interval >= 0.01 && self.timeout >= 0.01 && self.interval.is_finite() && self.timeout.is_finite()) {
            anyhow::bail!("health: interval and timeout must be at least 0.01 seconds");
        }
        if self.rise == 0 || self.fall == 0 {
            anyhow::bail!("health: rise and fall must be at least 1");
        }
        if !self.path.starts_with('/') {
            anyhow::bail!("health: path must start with '/', as in \"/health\"");
        }
        if self.expect_status[0] > self.expect_status[1] {
            anyhow::bail!("health: expect_status is a range [low, high]");
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CheckResult {
    pub ok: bool,
    pub latency_ms: f64,
    /// What went wrong, or what was seen ("connected", "HTTP 200").
    pub detail: String,
}

/// Runs one check against `address`.
pub async fn check(address: SocketAddrV4, config: &HealthConfig) -> CheckResult {
    let target = SocketAddrV4::new(*address.ip(), config.port.unwrap_or(address.port()));
    let started = Instant::now();
    let outcome = tokio::time::timeout(Duration::from_secs_f64(config.timeout), async {
        let mut stream = TcpStream::connect(target).await.map_err(|e| e.to_string())?;
        match config.kind {
            CheckKind::Tcp => Ok("connected".to_string()),
            CheckKind::Http => http_status(&mut stream, target, config).await,
        }
    })
    .await;
    let latency_ms = started.elapsed().as_secs_f64() * 1e3;
    match outcome {
        Ok(Ok(detail)) => CheckResult { ok: true, latency_ms, detail },
        Ok(Err(detail)) => CheckResult { ok: false, latency_ms, detail },
        Err(_) => CheckResult { ok: false, latency_ms, detail: format!("no answer within {}s", config.timeout) },
    }
}

async fn http_status(stream: &mut TcpStream, target: SocketAddrV4, config: &HealthConfig) -> Result<String, String> {
    let request = format!(
        "GET {} HTTP/1.0\r\nHost: {target}\r\nUser-Agent: lb-health\r\nConnection: close\r\n\r\n",
        config.path
    );
    stream.write_all(request.as_bytes()).await.map_err(|e| e.to_string())?;
    let mut head = Vec::new();
    let mut buf = [0u8; 512];
    while !head.contains(&b'\n') && head.len() < 4096 {
        let n = stream.read(&mut buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("not an HTTP answer: {:?}", line.lines().next().unwrap_or("")))?;
    let [low, high] = config.expect_status;
    if (low..=high).contains(&status) {
        Ok(format!("HTTP {status}"))
    } else {
        Err(format!("HTTP {status}, expected {low}-{high}"))
    }
}

/// What the agent knows of one backend's health.
#[derive(Debug, Clone)]
pub struct Health {
    /// By active checks; a backend starts up so traffic flows at once.
    active_up: bool,
    streak: u32,
    pub last_check: Option<CheckResult>,
    /// Passive: failure times within the window, and the hold.
    failures: VecDeque<Instant>,
    down_until: Option<Instant>,
    /// Data-path failure counters as last read, to see new ones.
    counted: u64,
}

impl Default for Health {
    fn default() -> Self {
        Self { active_up: true, streak: 0, last_check: None, failures: VecDeque::new(), down_until: None, counted: 0 }
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

    /// Records an active check; says whether it changed the active state.
    pub fn record_check(&mut self, result: CheckResult, rise: u32, fall: u32) -> Option<Change> {
        let ok = result.ok;
        let detail = result.detail.clone();
        self.last_check = Some(result);
        if ok == self.active_up {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        if ok && self.streak >= rise {
            // Checks that pass again are better evidence than the passive
            // hold, which only waits out `fail_timeout`.
            self.active_up = true;
            self.streak = 0;
            self.down_until = None;
            self.failures.clear();
            return Some(Change::Up(format!("active check passed {rise} times ({detail})")));
        }
        if !ok && self.streak >= fall {
            self.active_up = false;
            self.streak = 0;
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
}
