//! The `lb` command line: the agent, and the commands that talk to it.
use std::{net::SocketAddrV4, path::PathBuf};

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::{
    balancer::{FlowStatus, Status},
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
    /// Run the load balancer in the foreground.
    Agent {
        #[arg(long, short)]
        config: PathBuf,
    },
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
    },
    /// Take a backend out of rotation; its established flows finish.
    Remove { service: String, address: SocketAddrV4 },
    /// Change a backend's weight (0 takes no new flows).
    Weight { service: String, address: SocketAddrV4, weight: u32 },
}

pub fn run(cli: Cli) -> Result<()> {
    let socket = &cli.socket;
    match cli.command {
        Command::Agent { config } => {
            let mut config = Config::load(&config)?;
            if cli.socket.as_os_str() != DEFAULT_SOCKET {
                config.agent.socket = cli.socket.clone();
            }
            crate::agent::run(config)
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
                backends: Vec::new(),
            };
            call(socket, &Request::ServiceAdd { service }).map(drop)
        }
        Command::Service(ServiceCommand::Remove { name }) => {
            call(socket, &Request::ServiceRemove { name }).map(drop)
        }
        Command::Backend(BackendCommand::Add { service, address, weight }) => {
            call(socket, &Request::BackendAdd { service, backend: BackendConfig { address, weight } })
                .map(drop)
        }
        Command::Backend(BackendCommand::Remove { service, address }) => {
            call(socket, &Request::BackendRemove { service, address }).map(drop)
        }
        Command::Backend(BackendCommand::Weight { service, address, weight }) => {
            call(socket, &Request::BackendWeight { service, address, weight }).map(drop)
        }
    }
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
            "  {:<22} {:>6} {:<9} {:>8} {:>10} {:>12} {:>12}",
            "BACKEND", "WEIGHT", "STATE", "ACTIVE", "TOTAL", "BYTES IN", "BYTES OUT"
        );
        for b in &s.backends {
            let _ = writeln!(
                out,
                "  {:<22} {:>6} {:<9} {:>8} {:>10} {:>12} {:>12}",
                b.address, b.weight, b.state, b.active_connections, b.total_connections, b.bytes_in, b.bytes_out
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
