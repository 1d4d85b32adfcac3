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
    /// The tracked flows.
    Conntrack {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ServiceCommand {
    /// Add a service with no backends yet.
    Add {
        name: String,
        /// VIP and port, as in 198.18.0.100:80.
        vip: SocketAddrV4,
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
        Command::Conntrack { json } => {
            let value = call(socket, &Request::Conntrack)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                print!("{}", render_flows(&serde_json::from_value::<Vec<FlowStatus>>(value)?));
            }
            Ok(())
        }
        Command::Service(ServiceCommand::Add { name, vip }) => {
            let service = ServiceConfig {
                name,
                vip,
                scheduler: Scheduler::LeastConn,
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
            "  {:<22} {:>6} {:<10} {:>8} {:>10} {:>12} {:>12}  {}",
            "BACKEND", "WEIGHT", "STATE", "ACTIVE", "TOTAL", "BYTES IN", "BYTES OUT", "WHY"
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
                "  {:<22} {:>6} {:<10} {:>8} {:>10} {:>12} {:>12}  {} ({:.0}s ago)",
                b.address,
                b.weight,
                state,
                b.active_connections,
                b.total_connections,
                b.bytes_in,
                b.bytes_out,
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
