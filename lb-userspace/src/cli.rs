//! The `lb` command line: the agent, and the commands that talk to it.
use std::{net::SocketAddrV4, path::PathBuf};

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use crate::{
    balancer::{Admin, FlowStatus, Status},
    config::{BackendConfig, Config, Mode, Scheduler, ServiceConfig},
    control::{call, Request, DEFAULT_SOCKET},
};

#[derive(Parser)]
#[command(name = "lb", version, about = "An XDP least-connection TCP load balancer")]
pub struct Cli {
    /// The running agent's control socket.
    #[arg(long, global = true, default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the load balancer in the foreground. When it stops, the data path
    /// keeps forwarding, and the next agent takes it over.
    Agent {
        #[arg(long, short)]
        config: PathBuf,
        /// Take the data path off when the agent stops.
        #[arg(long)]
        detach_on_exit: bool,
    },
    /// Re-read the agent's config file and apply the difference (as SIGHUP).
    Reload,
    /// Take the data path off and stop the agent.
    Shutdown,
    /// Services, backends, connection counts.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Add or remove services.
    #[command(subcommand)]
    Service(ServiceCommand),
    /// Add, remove or reweight backends.
    #[command(subcommand)]
    Backend(BackendCommand),
    /// The status table, refreshed live.
    Watch {
        /// Seconds between refreshes.
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
        /// Stop after this many refreshes (default: until interrupted).
        #[arg(long)]
        count: Option<u64>,
    },
    /// How new connections spread over the backends during an interval.
    Stats {
        /// Seconds to watch.
        #[arg(long, default_value_t = 5.0)]
        interval: f64,
        #[arg(long)]
        json: bool,
    },
    /// The tracked flows, and the table's occupancy.
    Conntrack {
        #[arg(long)]
        json: bool,
        #[arg(long)]
        service: Option<String>,
        /// Backend address, as in 198.19.0.11:80.
        #[arg(long)]
        backend: Option<String>,
        /// Client address, or address:port.
        #[arg(long)]
        client: Option<String>,
        /// syn_sent, established, closing or closed.
        #[arg(long)]
        state: Option<String>,
    },
}

#[derive(Subcommand)]
enum ServiceCommand {
    /// Add a service with no backends yet.
    Add {
        name: String,
        /// VIP and port, as in 198.18.0.100:80.
        vip: SocketAddrV4,
        /// How new flows choose a backend.
        #[arg(long, value_enum, default_value_t = Scheduler::LeastConn)]
        scheduler: Scheduler,
    },
    /// Remove a service; its established flows finish undisturbed.
    Remove { name: String },
}

#[derive(Subcommand)]
enum BackendCommand {
    Add {
        service: String,
        /// Address and port, as in 198.19.0.11:80.
        address: SocketAddrV4,
        #[arg(long, default_value_t = 1)]
        weight: u32,
        /// Only takes new flows while no primary backend can.
        #[arg(long)]
        backup: bool,
        /// Cap on active connections (0: none).
        #[arg(long, default_value_t = 0)]
        max_conns: u32,
        /// Seconds over which its share of new connections ramps up.
        #[arg(long, default_value_t = 0.0)]
        slow_start: f64,
        /// Failed handshakes within --fail-timeout that mark it down (0: off).
        #[arg(long, default_value_t = 1)]
        max_fails: u32,
        #[arg(long, default_value_t = 10.0)]
        fail_timeout: f64,
    },
    /// No new flows; established ones finish. `--wait` returns when none are left.
    Drain {
        service: String,
        address: SocketAddrV4,
        #[arg(long)]
        wait: bool,
        /// With --wait: give up after this many seconds.
        #[arg(long, default_value_t = 300.0)]
        timeout: f64,
    },
    /// Take new flows again (undoes drain and disable).
    Enable { service: String, address: SocketAddrV4 },
    /// Out at once: no new flows, established ones follow the service's
    /// `on_backend_down` policy.
    Disable { service: String, address: SocketAddrV4 },
    /// Take a backend out of rotation; its established flows finish.
    Remove { service: String, address: SocketAddrV4 },
    /// Change a backend's weight (0 takes no new flows).
    Weight { service: String, address: SocketAddrV4, weight: u32 },
}

pub fn run(cli: Cli) -> Result<()> {
    let socket = &cli.socket;
    match cli.command {
        Command::Agent { config: path, detach_on_exit } => {
            let mut config = Config::load(&path)?;
            if cli.socket.as_os_str() != DEFAULT_SOCKET {
                config.agent.socket = cli.socket.clone();
            }
            crate::agent::run(config, crate::agent::Options { config_path: path, detach_on_exit })
        }
        Command::Reload => {
            let result = call(socket, &Request::Reload)?;
            let changes = result["changes"].as_array().cloned().unwrap_or_default();
            if changes.is_empty() {
                println!("reloaded: nothing changed");
            }
            for change in changes {
                println!("reloaded: {}", change.as_str().unwrap_or_default());
            }
            Ok(())
        }
        Command::Shutdown => {
            call(socket, &Request::Shutdown)?;
            println!("the agent stopped and the data path is off");
            Ok(())
        }
        Command::Status { json } => {
            let value = call(socket, &Request::Status)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                print!("{}", render_status(&serde_json::from_value(value)?));
            }
            Ok(())
        }
        Command::Conntrack { json, service, backend, client, state } => {
            let flows: Vec<FlowStatus> = serde_json::from_value(call(socket, &Request::Conntrack)?)?;
            let status: Status = serde_json::from_value(call(socket, &Request::Status)?)?;
            let client_matches = |f: &FlowStatus, c: &str| {
                if c.contains(':') { f.client == c } else { f.client.split(':').next() == Some(c) }
            };
            let flows: Vec<FlowStatus> = flows
                .into_iter()
                .filter(|f| service.as_ref().is_none_or(|s| &f.service == s))
                .filter(|f| backend.as_ref().is_none_or(|b| &f.backend == b))
                .filter(|f| client.as_ref().is_none_or(|c| client_matches(f, c)))
                .filter(|f| state.as_ref().is_none_or(|s| &f.state == s))
                .collect();
            if json {
                let out = serde_json::json!({ "flows": flows, "table": status.flow_table });
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                print!("{}", render_flows(&flows));
                let t = &status.flow_table;
                println!(
                    "table: {} of {} flows ({:.1}%)",
                    t.flows,
                    t.capacity,
                    100.0 * t.flows as f64 / t.capacity.max(1) as f64
                );
            }
            Ok(())
        }
        Command::Watch { interval, count } => {
            let mut shown = 0u64;
            loop {
                let status: Status = serde_json::from_value(call(socket, &Request::Status)?)?;
                // Clear the screen and go home, like `watch`.
                print!("\x1b[2J\x1b[H");
                println!("lb watch — every {interval}s — {}\n", humantime_now());
                print!("{}", render_status(&status));
                shown += 1;
                if count.is_some_and(|c| shown >= c) {
                    return Ok(());
                }
                std::thread::sleep(Duration::from_secs_f64(interval));
            }
        }
        Command::Stats { interval, json } => {
            let before: Status = serde_json::from_value(call(socket, &Request::Status)?)?;
            std::thread::sleep(Duration::from_secs_f64(interval));
            let after: Status = serde_json::from_value(call(socket, &Request::Status)?)?;
            let spread = spread(&before, &after);
            if json {
                println!("{}", serde_json::to_string_pretty(&spread)?);
            } else {
                print!("{}", render_spread(&spread, interval));
            }
            Ok(())
        }
        Command::Service(ServiceCommand::Add { name, vip, scheduler }) => {
            let service = ServiceConfig {
                name,
                vip,
                scheduler,
                mode: Mode::Nat,
                health: None,
                on_backend_down: Default::default(),
                backends: Vec::new(),
            };
            call(socket, &Request::ServiceAdd { service }).map(drop)
        }
        Command::Service(ServiceCommand::Remove { name }) => {
            call(socket, &Request::ServiceRemove { name }).map(drop)
        }
        Command::Backend(BackendCommand::Add {
            service,
            address,
            weight,
            backup,
            max_conns,
            slow_start,
            max_fails,
            fail_timeout,
        }) => {
            let backend = BackendConfig { backup, max_conns, slow_start, max_fails, fail_timeout, ..BackendConfig::new(address, weight) };
            call(socket, &Request::BackendAdd { service, backend }).map(drop)
        }
        Command::Backend(BackendCommand::Drain { service, address, wait, timeout }) => {
            let request = Request::BackendAdmin { service: service.clone(), address, admin: Admin::Draining };
            let mut active = call(socket, &request)?.as_u64().unwrap_or(0);
            if !wait {
                println!("draining {address}: {active} active connections");
                return Ok(());
            }
            let deadline = Instant::now() + Duration::from_secs_f64(timeout);
            while active > 0 {
                if Instant::now() >= deadline {
                    bail!("timed out after {timeout}s draining {address}: {active} connections remain");
                }
                std::thread::sleep(Duration::from_millis(100));
                active = backend_active(socket, &service, address)?;
            }
            println!("drained {address}: 0 active connections");
            Ok(())
        }
        Command::Backend(BackendCommand::Enable { service, address }) => {
            call(socket, &Request::BackendAdmin { service, address, admin: Admin::Enabled }).map(drop)
        }
        Command::Backend(BackendCommand::Disable { service, address }) => {
            call(socket, &Request::BackendAdmin { service, address, admin: Admin::Disabled }).map(drop)
        }
        Command::Backend(BackendCommand::Remove { service, address }) => {
            call(socket, &Request::BackendRemove { service, address }).map(drop)
        }
        Command::Backend(BackendCommand::Weight { service, address, weight }) => {
            call(socket, &Request::BackendWeight { service, address, weight }).map(drop)
        }
    }
}

fn backend_active(socket: &std::path::Path, service: &str, address: SocketAddrV4) -> Result<u64> {
    let status: Status = serde_json::from_value(call(socket, &Request::Status)?)?;
    status
        .services
        .iter()
        .find(|s| s.name == service)
        .and_then(|s| s.backends.iter().find(|b| b.address == address.to_string()))
        .map(|b| b.active_connections)
        .with_context(|| format!("service {service} has no backend {address} any more"))
}

fn humantime_now() -> String {
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
    use std::fmt::Write;
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
    use std::fmt::Write;
    let mut out = String::new();
    if status.services.is_empty() {
        out.push_str("no services\n");
    }
    for s in &status.services {
        let _ = writeln!(
            out,
            "service {}  {}  {}/{}  active {}  total {}",
            s.name, s.vip, s.scheduler, s.mode, s.active_connections, s.total_connections
        );
        let _ = writeln!(
            out,
            "  {:<22} {:>6} {:<10} {:>8} {:>10} {:>7} {:>10}  WHY",
            "BACKEND", "WEIGHT", "STATE", "ACTIVE", "TOTAL", "CONN/s", "BYTES/s"
        );
        for b in &s.backends {
            let mut state = b.state.clone();
            if b.backup {
                state.push_str("/bk");
            }
            let ago = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64() - b.since);
            let _ = writeln!(
                out,
                "  {:<22} {:>6} {:<10} {:>8} {:>10} {:>7.1} {:>10.0}  {} ({:.0}s ago)",
                b.address,
                b.weight,
                state,
                b.active_connections,
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
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<12} {:<22} {:<22} {:<22} {:<12} {:>8}",
        "SERVICE", "CLIENT", "VIP", "BACKEND", "STATE", "IDLE(s)"
    );
    for f in flows {
        let _ = writeln!(
            out,
            "{:<12} {:<22} {:<22} {:<22} {:<12} {:>8.1}",
            f.service, f.client, f.vip, f.backend, f.state, f.idle_seconds
        );
    }
    let _ = writeln!(out, "{} flows", flows.len());
    out
}
