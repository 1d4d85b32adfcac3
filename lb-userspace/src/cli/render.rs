//! How the CLI shows the agent's answers in a terminal.
use std::fmt::Write;

use crate::api::{FlowStatus, Status};

pub fn humantime_now() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    format!("{:02}:{:02}:{:02} UTC", secs / 3600 % 24, secs / 60 % 60, secs % 60)
}

/// New connections per backend between two status snapshots.
#[derive(Debug, serde::Serialize)]
pub struct Spread {
    pub service: String,
    pub backend: String,
    pub new_connections: u64,
    pub share: f64,
}

pub fn spread(before: &Status, after: &Status) -> Vec<Spread> {
    let mut rows = Vec::new();
    for s in &after.services {
        let earlier = before.services.iter().find(|b| b.name == s.name);
        let new: Vec<(String, u64)> = s
            .backends
            .iter()
            .map(|b| {
                let was = earlier
                    .and_then(|e| e.backends.iter().find(|x| x.address == b.address))
                    .map_or(0, |x| x.total_connections);
                (b.address.clone(), b.total_connections.saturating_sub(was))
            })
            .collect();
        let total: u64 = new.iter().map(|(_, n)| n).sum();
        for (backend, n) in new {
            rows.push(Spread {
                service: s.name.clone(),
                backend,
                new_connections: n,
                share: if total == 0 { 0.0 } else { n as f64 / total as f64 },
            });
        }
    }
    rows
}

pub fn render_spread(rows: &[Spread], interval: f64) -> String {
    let mut out = format!("new connections over {interval}s\n");
    for r in rows {
        let _ = writeln!(
            out,
            "  {:<12} {:<22} {:>8} {:>6.1}%  {}",
            r.service,
            r.backend,
            r.new_connections,
            r.share * 100.0,
            "#".repeat((r.share * 40.0).round() as usize)
        );
    }
    out
}

pub fn render_status(status: &Status) -> String {
    let mut out = String::new();
    if status.services.is_empty() {
        out.push_str("no services\n");
    }
    for s in &status.services {
        let _ = writeln!(
            out,
            "service {}  {}  {}/{}{}  active {}  half-open {}  total {}",
            s.name,
            s.vip,
            s.scheduler,
            s.mode,
            if s.tunnel == crate::config::Tunnel::None { String::new() } else { format!(" over {}", s.tunnel) },
            s.active_connections,
            s.half_open_connections,
            s.total_connections
        );
        let _ = writeln!(
            out,
            "  {:<22} {:>6} {:<10} {:>8} {:>9} {:>10} {:>7} {:>10}  WHY",
            "BACKEND", "WEIGHT", "STATE", "ACTIVE", "HALF-OPEN", "TOTAL", "CONN/s", "BYTES/s"
        );
        for b in &s.backends {
            let mut state = b.state.to_string();
            if b.backup {
                state.push_str("/bk");
            }
            let ago = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64() - b.since);
            let _ = writeln!(
                out,
                "  {:<22} {:>6} {:<10} {:>8} {:>9} {:>10} {:>7.1} {:>10.0}  {} ({:.0}s ago)",
                b.address,
                b.weight,
                state,
                b.active_connections,
                b.half_open_connections,
                b.total_connections,
                b.connections_per_second,
                b.bytes_per_second,
                b.reason,
                ago
            );
        }
    }
    let _ = writeln!(out, "flow table: {} of {} flows", status.flow_table.flows, status.flow_table.capacity);
    out
}

pub fn render_flows(flows: &[FlowStatus]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<12} {:<22} {:<22} {:<22} {:<22} {:<12} {:>8}",
        "SERVICE", "CLIENT", "VIP", "BALANCER SIDE", "BACKEND", "STATE", "IDLE(s)"
    );
    for f in flows {
        // The backend sees the client itself unless in full NAT.
        let balancer = f.balancer.as_deref().unwrap_or("-");
        let _ = writeln!(
            out,
            "{:<12} {:<22} {:<22} {:<22} {:<22} {:<12} {:>8.1}",
            f.service, f.client, f.vip, balancer, f.backend, f.state, f.idle_seconds
        );
    }
    let _ = writeln!(out, "{} flows", flows.len());
    out
}
