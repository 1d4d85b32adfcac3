//! Active health checks: one task per backend, TCP connect or HTTP GET,
//! whose results go to the agent's loop (`Balancer::record_check`).
use std::{
    collections::HashMap,
    net::SocketAddrV4,
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::mpsc,
};

use crate::{
    api::CheckResult,
    config::{CheckKind, HealthConfig},
    model::CheckTarget,
};

/// Check results on their way to the agent's loop.
pub type Results = mpsc::Sender<(String, SocketAddrV4, CheckResult)>;

/// The running health checks, one task per backend.
#[derive(Default)]
pub struct Checkers {
    running: HashMap<(String, SocketAddrV4), (CheckTarget, tokio::task::JoinHandle<()>)>,
}

impl Checkers {
    /// Starts the checks that are wanted and not running, stops the others.
    pub fn reconcile(
        &mut self,
        wanted: Vec<CheckTarget>,
        results: &Results,
    ) {
        let wanted: HashMap<_, _> = wanted.into_iter().map(|t| ((t.service.clone(), t.address), t)).collect();
        self.running.retain(|key, (target, task)| {
            let keep = wanted.get(key) == Some(target);
            if !keep {
                task.abort();
            }
            keep
        });
        for (key, target) in wanted {
            if self.running.contains_key(&key) {
                continue;
            }
            let results = results.clone();
            let t = target.clone();
            let task = tokio::spawn(async move {
                let mut every = tokio::time::interval(Duration::from_secs_f64(t.config.interval));
                every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    every.tick().await;
                    let result = check(t.address, &t.config).await;
                    if results.send((t.service.clone(), t.address, result)).await.is_err() {
                        return;
                    }
                }
            });
            self.running.insert(key, (target, task));
        }
    }
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

