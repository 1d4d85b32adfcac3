//! The `lb` command line: the agent, and the commands that talk to it
//! through `Client`. It speaks only the control protocol.
mod render;

use std::{
    net::SocketAddrV4,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};

pub use self::render::{render_flows, render_spread, render_status, spread, Spread};
use crate::{
    api::{Admin, FlowStatus},
    client::Client,
    config::{seconds, BackendConfig, Config, Mode, Scheduler, ServiceConfig, Tunnel, DEFAULT_SOCKET, MAX_TIMEOUT},
};

#[derive(Parser)]
#[command(name = "lb", version = crate::VERSION, about = "An XDP least-connection TCP load balancer")]
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
    /// A live log of the data path's decisions on new flows (the backend
    /// chosen, its load, how many were eligible) and of its drops (with the
    /// reason), for as long as it runs. Rate-limited in the data path; the
    /// agent's log gets the same lines. Off again when it stops.
    Trace {
        /// Only this service's flows.
        #[arg(long)]
        service: Option<String>,
        /// Only this client's flows (an address).
        #[arg(long)]
        client: Option<std::net::Ipv4Addr>,
        /// Lines each CPU may log per second; more are counted, not shown.
        #[arg(long, default_value_t = 100)]
        rate: u32,
        /// Stop after this many seconds (default: until interrupted).
        #[arg(long)]
        duration: Option<f64>,
    },
    /// Print another balancer's configuration as an lb.toml.
    #[command(subcommand)]
    Import(ImportCommand),
    /// On a DSR backend of a `tunnel = "ipip"` service: take the
    /// balancer's IPIP packets off their tunnel in XDP (for kernels without
    /// the ipip module). Runs on the backend, not the balancer.
    #[command(subcommand)]
    Decap(DecapCommand),
}

#[derive(Subcommand)]
enum DecapCommand {
    /// Attach to an interface (or, attached already, set its VIPs). It stays
    /// attached after this command exits.
    Attach {
        interface: String,
        /// A VIP the backend holds on `lo` (repeat for several).
        #[arg(long = "vip", required = true)]
        vips: Vec<std::net::Ipv4Addr>,
        /// Where its link and maps are pinned, a directory per interface.
        #[arg(long, default_value = crate::datapath::decap::DEFAULT_DECAP_DIR)]
        pin_dir: PathBuf,
    },
    /// Take it off an interface.
    Detach {
        interface: String,
        #[arg(long, default_value = crate::datapath::decap::DEFAULT_DECAP_DIR)]
        pin_dir: PathBuf,
    },
    /// Its VIPs and what it has done.
    Status {
        interface: String,
        #[arg(long, default_value = crate::datapath::decap::DEFAULT_DECAP_DIR)]
        pin_dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ImportCommand {
    /// An nginx configuration (its includes followed): each upstream that a
    /// stream or http server proxies to becomes a service on that server's
    /// listen address. What has no layer-4 equivalent is listed, with its
    /// file and line, on stderr and at the head of the output.
    Nginx {
        /// The main configuration file, as in /etc/nginx/nginx.conf.
        path: PathBuf,
        /// The VIP for listens that give only a port (or `*`).
        #[arg(long)]
        vip: Option<std::net::Ipv4Addr>,
        /// An interface for `agent.interfaces` (repeat for several).
        #[arg(long = "interface")]
        interfaces: Vec<String>,
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
        /// nat (the backends route through the balancer), fullnat (they
        /// need nothing: they see the balancer's address) or dsr (they hold
        /// the VIP and answer the clients directly).
        #[arg(long, value_enum, default_value_t = Mode::Nat)]
        mode: Mode,
        /// DSR: none (backends on this host's segment) or ipip (backends
        /// anywhere, decapsulating with `lb decap attach`).
        #[arg(long, value_enum, default_value_t = Tunnel::None)]
        tunnel: Tunnel,
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
    let client = Client::new(&cli.socket);
    match cli.command {
        Command::Agent { config: path, detach_on_exit } => {
            let mut config = Config::load(&path)?;
            if cli.socket.as_os_str() != DEFAULT_SOCKET {
                config.agent.socket = cli.socket.clone();
            }
            crate::runtime::run(config, crate::runtime::Options { config_path: path, detach_on_exit })
        }
        Command::Reload => {
            let changes = client.reload()?;
            if changes.is_empty() {
                println!("reloaded: nothing changed");
            }
            for change in changes {
                println!("reloaded: {change}");
            }
            Ok(())
        }
        Command::Shutdown => {
            client.shutdown()?;
            println!("the agent stopped and the data path is off");
            Ok(())
        }
        Command::Status { json } => {
            if json {
                let value = client.call(&crate::api::Request::Status)?;
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                print!("{}", render_status(&client.status()?));
            }
            Ok(())
        }
        Command::Conntrack { json, service, backend, client: from, state } => {
            conntrack(&client, json, service, backend, from, state)
        }
        Command::Watch { interval, count } => {
            seconds("--interval", interval, 0.01, 86_400.0)?;
            watch(&client, interval, count)
        }
        Command::Stats { interval, json } => {
            seconds("--interval", interval, 0.01, 86_400.0)?;
            let before = client.status()?;
            std::thread::sleep(Duration::from_secs_f64(interval));
            let after = client.status()?;
            let spread = spread(&before, &after);
            if json {
                println!("{}", serde_json::to_string_pretty(&spread)?);
            } else {
                print!("{}", render_spread(&spread, interval));
            }
            Ok(())
        }
        Command::Trace { service, client: from, rate, duration } => {
            if let Some(d) = duration {
                seconds("--duration", d, 0.0, MAX_TIMEOUT)?;
            }
            trace(&client, service, from, rate, duration)
        }
        Command::Decap(command) => decap(command),
        Command::Import(ImportCommand::Nginx { path, vip, interfaces }) => {
            let options = crate::import::nginx::Options { vip };
            let (text, warnings) = crate::import::nginx::import(&path, &options, &interfaces)?;
            for w in &warnings {
                eprintln!("warning: {}: {}", w.at, w.text);
            }
            if interfaces.is_empty() {
                eprintln!("note: set agent.interfaces (or give --interface) before running the agent");
            }
            print!("{text}");
            Ok(())
        }
        Command::Service(ServiceCommand::Add { name, vip, scheduler, mode, tunnel }) => {
            client.add_service(ServiceConfig {
                name,
                vip,
                scheduler,
                mode,
                snat_addresses: Vec::new(),
                snat_ports: crate::config::DEFAULT_SNAT_PORTS,
                tunnel,
                health: None,
                on_backend_down: Default::default(),
                backends: Vec::new(),
            })
        }
        Command::Service(ServiceCommand::Remove { name }) => client.remove_service(name),
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
            let backend = BackendConfig {
                backup,
                max_conns,
                slow_start,
                max_fails,
                fail_timeout,
                ..BackendConfig::new(address, weight)
            };
            client.add_backend(service, backend)
        }
        Command::Backend(BackendCommand::Drain { service, address, wait, timeout }) => {
            seconds("--timeout", timeout, 0.0, MAX_TIMEOUT)?;
            drain(&client, service, address, wait, timeout)
        }
        Command::Backend(BackendCommand::Enable { service, address }) => {
            client.set_admin(service, address, Admin::Enabled).map(drop)
        }
        Command::Backend(BackendCommand::Disable { service, address }) => {
            client.set_admin(service, address, Admin::Disabled).map(drop)
        }
        Command::Backend(BackendCommand::Remove { service, address }) => client.remove_backend(service, address),
        Command::Backend(BackendCommand::Weight { service, address, weight }) => {
            client.set_weight(service, address, weight)
        }
    }
}

fn conntrack(
    client: &Client,
    json: bool,
    service: Option<String>,
    backend: Option<String>,
    from: Option<String>,
    state: Option<String>,
) -> Result<()> {
    let flows = client.conntrack()?;
    let status = client.status()?;
    let client_matches = |f: &FlowStatus, c: &str| {
        if c.contains(':') {
            f.client == c
        } else {
            f.client.split(':').next() == Some(c)
        }
    };
    let flows: Vec<FlowStatus> = flows
        .into_iter()
        .filter(|f| service.as_ref().is_none_or(|s| &f.service == s))
        .filter(|f| backend.as_ref().is_none_or(|b| &f.backend == b))
        .filter(|f| from.as_ref().is_none_or(|c| client_matches(f, c)))
        .filter(|f| state.as_ref().is_none_or(|s| f.state.to_string() == *s))
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

/// Set by SIGINT and SIGTERM: `lb trace` stops and switches the trace off.
static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn interrupted(_: libc::c_int) {
    INTERRUPTED.store(true, std::sync::atomic::Ordering::Relaxed);
}

fn trace(
    client: &Client,
    service: Option<String>,
    from: Option<std::net::Ipv4Addr>,
    rate: u32,
    duration: Option<f64>,
) -> Result<()> {
    unsafe {
        libc::signal(libc::SIGINT, interrupted as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, interrupted as *const () as libc::sighandler_t);
    }
    let end = duration.map(|d| Instant::now() + Duration::from_secs_f64(d));
    let mut after = 0;
    let mut first = true;
    let result = loop {
        let got = match client.trace(service.clone(), from, rate, after) {
            Ok(got) => got,
            Err(e) => break Err(e),
        };
        if first {
            eprintln!("tracing new flows and drops ({rate} lines per second and CPU at most); Ctrl-C stops");
            first = false;
        }
        for (seq, line) in got.lines {
            println!("{line}");
            after = seq;
        }
        if INTERRUPTED.load(std::sync::atomic::Ordering::Relaxed) || end.is_some_and(|e| Instant::now() >= e) {
            eprintln!("{} lines left out for the rate limit since the program was loaded", got.suppressed);
            break Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    // Off again now rather than when the lease runs out.
    let stopped = client.stop_trace();
    result.and(stopped)
}

fn watch(client: &Client, interval: f64, count: Option<u64>) -> Result<()> {
    let mut shown = 0u64;
    loop {
        let status = client.status()?;
        // Clear the screen and go home, like `watch`.
        print!("\x1b[2J\x1b[H");
        println!("lb watch — every {interval}s — {}\n", render::humantime_now());
        print!("{}", render_status(&status));
        shown += 1;
        if count.is_some_and(|c| shown >= c) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_secs_f64(interval));
    }
}

fn drain(client: &Client, service: String, address: SocketAddrV4, wait: bool, timeout: f64) -> Result<()> {
    let mut active = client.set_admin(service.clone(), address, Admin::Draining)?;
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
        active = client.active_connections(&service, address)?;
    }
    println!("drained {address}: 0 active connections");
    Ok(())
}

fn decap(command: DecapCommand) -> Result<()> {
    use crate::datapath::decap::Decap;
    match command {
        DecapCommand::Attach { interface, vips, pin_dir } => {
            let attached_now = Decap::new(&pin_dir, &interface)?.attach(&interface, &vips)?;
            let vips: Vec<String> = vips.iter().map(|v| v.to_string()).collect();
            let what = if attached_now { "attached to" } else { "already on" };
            println!("decapsulation {what} {interface}, for VIPs {}", vips.join(", "));
        }
        DecapCommand::Detach { interface, pin_dir } => {
            if Decap::new(&pin_dir, &interface)?.detach()? {
                println!("decapsulation taken off {interface}");
            } else {
                println!("no decapsulation on {interface}");
            }
        }
        DecapCommand::Status { interface, pin_dir, json } => {
            let status = Decap::new(&pin_dir, &interface)?.status()?;
            let vips: Vec<String> = status.vips.iter().map(|v| v.to_string()).collect();
            if json {
                let value = serde_json::json!({
                    "interface": interface,
                    "vips": vips,
                    "decapsulated": status.decapsulated,
                    "passed": status.passed,
                });
                println!("{value}");
            } else {
                println!("{interface}: VIPs {}", vips.join(", "));
                println!("decapsulated {}  passed {}", status.decapsulated, status.passed);
            }
        }
    }
    Ok(())
}
