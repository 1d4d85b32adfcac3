//! `lb agent`: loads and attaches the data path, applies the config, then
//! runs the event loop — control requests, health results, the control
//! tick, aging — until SIGINT/SIGTERM.
pub mod aging;
pub mod checkers;
pub mod control;
pub mod metrics;
mod notify;
pub mod state;

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result};
use aya::programs::XdpMode;
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::mpsc,
};

use self::{aging::Aging, checkers::Checkers, control::LoopRequest, state::Persist};
use crate::{
    api::Response,
    config::{Config, XdpModeSetting},
    datapath::{Datapath, Maps, Pins},
    reconcile::Balancer,
};

/// How often passive health, slow starts and drains are looked at.
const CONTROL_TICK: Duration = Duration::from_millis(100);

/// How the agent was started.
pub struct Options {
    pub config_path: PathBuf,
    /// Take the data path off when the agent stops; otherwise it keeps
    /// forwarding and the next agent takes it over.
    pub detach_on_exit: bool,
}

pub fn run(config: Config, options: Options) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(serve(config, options))
}

async fn serve(config: Config, options: Options) -> Result<()> {
    // Locked for as long as this agent runs; a second agent stops here.
    let (pins, _lock) = Pins::open(&config.agent.pin_dir)?;
    let (datapath, reused) = match Datapath::load_pinned(config.agent.max_flows, config.agent.max_services, &pins) {
        Ok(loaded) => loaded,
        Err(e) => {
            let _ = pins.remove_if_empty();
            return Err(e);
        }
    };
    let config_digest = state::digest(&std::fs::read(&options.config_path).unwrap_or_default());
    let persist = Persist::new(&config.agent.socket, config_digest);
    let result = match start(&config, &pins, datapath, reused, &persist) {
        Ok(balancer) => event_loop(config, options, &pins, balancer, persist).await,
        Err(e) => Err(e),
    };
    if result.is_err() && !reused {
        // Nothing was running before this agent: leave nothing behind.
        let _ = pins.remove_all();
    }
    result
}

/// Takes over what a previous agent left running, applies the config (with
/// the operator's changes kept from before, see `state`) and attaches to
/// the configured interfaces (and only those).
fn start(config: &Config, pins: &Pins, mut datapath: Datapath, reused: bool, persist: &Persist) -> Result<Balancer> {
    if reused && datapath.max_flows() != config.agent.max_flows {
        tracing::warn!(
            running = datapath.max_flows(),
            configured = config.agent.max_flows,
            "the running connection table keeps its size; `lb shutdown` and start again to resize it"
        );
    }
    if reused && datapath.max_services() != config.agent.max_services {
        tracing::warn!(
            running = datapath.max_services(),
            configured = config.agent.max_services,
            "the running data path keeps its room for services; `lb shutdown` and start again to change it"
        );
    }
    datapath.set_timeouts(&config.agent.timeouts.to_wire())?;
    reserve_snat_ports(&config.services);
    advise_dsr_health_checks(&config.services);
    let mut balancer = Balancer::new(datapath);
    let adopted = if reused { balancer.adopt() } else { 0 };
    let saved = state::load(&state::path_for(&config.agent.socket)).unwrap_or_default();
    for service in saved.services_for(config, &persist.config_digest()) {
        balancer.add_service(service).with_context(|| format!("configuring service {}", service.name))?;
    }
    balancer.finish_adoption()?;
    saved.take_back(&mut balancer);
    persist.save(&balancer.model);
    for interface in &config.agent.interfaces {
        attach(&mut balancer.datapath, interface, config.agent.xdp_mode, pins)?;
    }
    for interface in pins.linked_interfaces() {
        if !config.agent.interfaces.contains(&interface) {
            tracing::info!(interface, "detaching from an interface no longer in the config");
            pins.detach(&interface)?;
        }
    }
    if reused {
        let flows = balancer.datapath.flow_count();
        tracing::info!(services = adopted, flows, "took over the running data path: established flows kept");
        match balancer.verify_counts() {
            Ok((checked, differing)) if differing.is_empty() => {
                tracing::info!(backends = checked, "connection counts match the live flows in the table")
            }
            Ok((_, differing)) => tracing::warn!(
                "connection counts differ from the table (flows opening or closing meanwhile?): {}",
                differing.join("; ")
            ),
            Err(e) => tracing::warn!("checking the connection counts failed: {e:#}"),
        }
    }
    balancer.flows_seen = balancer.datapath.flow_count() as u64;
    balancer.count_flows_by_aging();
    Ok(balancer)
}

async fn event_loop(config: Config, options: Options, pins: &Pins, balancer: Balancer, persist: Persist) -> Result<()> {
    let balancer = Arc::new(Mutex::new(balancer));
    let persist = Arc::new(persist);
    if let Some(address) = config.agent.metrics {
        metrics::serve(address, balancer.clone()).await?;
    }
    let listener = control::bind(&config.agent.socket)?;
    tracing::info!(
        version = crate::VERSION,
        interfaces = ?config.agent.interfaces,
        services = config.services.len(),
        socket = %config.agent.socket.display(),
        "load balancer running"
    );

    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut hangup = signal(SignalKind::hangup())?;
    let (loop_tx, mut loop_rx) = mpsc::channel::<LoopRequest>(4);
    let mut aging_tick = tokio::time::interval(Duration::from_millis(config.agent.aging_interval_ms));
    let mut control_tick = tokio::time::interval(CONTROL_TICK);
    let mut aging = Aging::new(config.agent.timeouts.to_wire());
    let (check_results, mut checked) = mpsc::channel(1024);
    let mut checkers = Checkers::default();
    let mut notifier = notify::Notifier::from_env();
    notifier.ready();
    loop {
        tokio::select! {
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
            _ = hangup.recv() => {
                let response = reload(&balancer, &options.config_path, &persist);
                if !response.ok {
                    tracing::error!("reload refused: {}", response.error.unwrap_or_default());
                }
            }
            Some(request) = loop_rx.recv() => match request {
                LoopRequest::Reload(reply) => {
                    let _ = reply.send(reload(&balancer, &options.config_path, &persist));
                }
                LoopRequest::Shutdown(reply, written) => {
                    checkers.reconcile(Vec::new(), &check_results);
                    tracing::info!("shutdown requested: detaching the XDP program and removing its pinned state");
                    persist.remove();
                    let response = match pins.remove_all() {
                        Ok(()) => Response::ok(serde_json::Value::Null),
                        Err(e) => Response::error(format!("{e:#}")),
                    };
                    let _ = reply.send(response);
                    let _ = tokio::time::timeout(Duration::from_secs(2), written).await;
                    let _ = std::fs::remove_file(&config.agent.socket);
                    return Ok(());
                }
            },
            Some((service, address, result)) = checked.recv() => {
                let mut b = balancer.lock().unwrap();
                if let Err(e) = b.record_check(&service, address, result) {
                    tracing::warn!("applying a health check result failed: {e:#}");
                }
                persist.save(&b.model);
            }
            _ = control_tick.tick() => {
                notifier.alive();
                let mut b = balancer.lock().unwrap();
                if let Err(e) = b.tick() {
                    tracing::warn!("updating backend states failed: {e:#}");
                }
                b.trace_tick();
                persist.save(&b.model);
                checkers.reconcile(b.check_targets(), &check_results);
            }
            _ = aging_tick.tick() => aging.tick(&mut balancer.lock().unwrap()),
            accepted = listener.accept() => {
                if let Ok((stream, _)) = accepted {
                    let balancer = balancer.clone();
                    let loop_tx = loop_tx.clone();
                    let persist = persist.clone();
                    tokio::spawn(async move {
                        if let Err(e) = control::answer(stream, balancer, loop_tx, &persist).await {
                            tracing::debug!("control connection: {e:#}");
                        }
                    });
                }
            }
        }
    }

    notifier.stopping();
    checkers.reconcile(Vec::new(), &check_results);
    let _ = std::fs::remove_file(&config.agent.socket);
    drop(balancer);
    if options.detach_on_exit {
        tracing::info!("detaching the XDP program and removing its pinned state");
        persist.remove();
        pins.remove_all()?;
    } else {
        tracing::info!(
            pin_dir = %config.agent.pin_dir.display(),
            "agent stopping; the data path keeps forwarding (`lb shutdown` takes it off)"
        );
    }
    Ok(())
}

fn reload(balancer: &Mutex<Balancer>, path: &Path, persist: &Persist) -> Response {
    let read = std::fs::read_to_string(path).with_context(|| format!("cannot read the config file {}", path.display()));
    let result = read.and_then(|text| {
        let config = Config::parse(&text, path)?;
        let mut b = balancer.lock().unwrap();
        let changes = b.reload(&config)?;
        reserve_snat_ports(&config.services);
        advise_dsr_health_checks(&config.services);
        persist.reconciled_with(state::digest(text.as_bytes()));
        persist.save(&b.model);
        Ok(changes)
    });
    match result {
        Ok(changes) => {
            if changes.is_empty() {
                tracing::info!("config reloaded: nothing changed");
            }
            for change in &changes {
                tracing::info!("config reloaded: {change}");
            }
            Response::ok(serde_json::json!({ "changes": changes }))
        }
        Err(e) => Response::error(format!("{e:#}; the running config is unchanged")),
    }
}

fn attach(datapath: &mut Datapath, interface: &str, mode: XdpModeSetting, pins: &Pins) -> Result<()> {
    let attached = match mode {
        XdpModeSetting::Native => datapath
            .attach_pinned(interface, XdpMode::Driver, pins)
            .with_context(|| format!("attaching in native mode to {interface}")),
        XdpModeSetting::Generic => datapath
            .attach_pinned(interface, XdpMode::Skb, pins)
            .with_context(|| format!("attaching in generic mode to {interface}")),
        XdpModeSetting::Auto => datapath.attach_pinned(interface, XdpMode::Driver, pins).or_else(|e| {
            tracing::warn!(interface, "native XDP is not available ({e:#}); falling back to generic mode, which is slower");
            datapath
                .attach_pinned(interface, XdpMode::Skb, pins)
                .with_context(|| format!("attaching to {interface} (does the interface exist?)"))
        }),
    }?;
    if attached {
        tracing::info!(interface, "took over the running program's attachment (atomic replace)");
    } else {
        tracing::info!(interface, "attached");
    }
    accept_local(interface);
    Ok(())
}

/// Keeps full-NAT services' source ports from the host's own sockets: adds
/// each range to `net.ipv4.ip_local_reserved_ports` (of the agent's network
/// namespace) unless it is there already. The kernel then never picks them
/// for an outgoing connection, so a reply to one is always a flow's.
/// A DSR backend that dies refuses new connections straight to the
/// clients, where the data path cannot see it: only active health checks
/// take it out (passive ones see SYNs the clients retry, not refusals).
fn advise_dsr_health_checks(services: &[crate::config::ServiceConfig]) {
    for s in services.iter().filter(|s| s.mode == crate::config::Mode::Dsr && s.health.is_none()) {
        tracing::warn!(
            service = %s.name,
            "DSR without [service.health]: a dead backend's refusals go straight to the clients, \
             and only active health checks take it out; add a [service.health] table"
        );
    }
}

fn reserve_snat_ports(services: &[crate::config::ServiceConfig]) {
    const PATH: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";
    let Ok(current) = std::fs::read_to_string(PATH) else { return };
    let mut ranges: Vec<String> = current.trim().split(',').filter(|r| !r.is_empty()).map(str::to_string).collect();
    let reserved = |ranges: &[String], port: u16| {
        ranges.iter().any(|r| {
            let (a, b) = r.split_once('-').unwrap_or((r, r));
            matches!((a.parse::<u16>(), b.parse::<u16>()), (Ok(a), Ok(b)) if a <= port && port <= b)
        })
    };
    let mut changed = false;
    for s in services.iter().filter(|s| s.mode == crate::config::Mode::FullNat) {
        let [first, last] = s.snat_ports;
        if !(reserved(&ranges, first) && reserved(&ranges, last)) {
            ranges.push(format!("{first}-{last}"));
            changed = true;
        }
    }
    if changed {
        match std::fs::write(PATH, ranges.join(",")) {
            Ok(()) => tracing::info!(ranges = %ranges.join(","), "reserved the full-NAT source ports from the host's own sockets"),
            Err(e) => tracing::warn!("reserving the full-NAT source ports in {PATH} failed ({e}): the host's own connections may take them"),
        }
    }
}

/// Lets the kernel forward a rewritten reply whose source, the VIP, is one
/// of this host's own addresses (as where keepalived holds the VIP): the
/// data path hands such a reply to the kernel when the client's MAC is not
/// known yet, and without `accept_local` the kernel drops it as a martian
/// and never resolves the client, which then cannot connect.
fn accept_local(interface: &str) {
    let path = format!("/proc/sys/net/ipv4/conf/{interface}/accept_local");
    if let Err(e) = std::fs::write(&path, "1") {
        tracing::warn!(interface, "setting {path} failed ({e}): with the VIP a local address, a client whose MAC is not known yet may not connect");
    }
}
