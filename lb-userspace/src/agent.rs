//! `lb agent`: loads and attaches the data path, applies the config, ages the
//! connection table and serves the control socket until SIGINT/SIGTERM.
use std::{
    os::unix::fs::PermissionsExt,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result};
use aya::programs::XdpMode;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    signal::unix::{signal, SignalKind},
};

use std::{collections::HashMap, path::PathBuf};

use tokio::sync::{mpsc, oneshot};

use crate::{
    aging,
    balancer::{Balancer, CheckTarget},
    health::{self, CheckResult},
    config::{Config, XdpModeSetting},
    control::{self, Request, Response},
    datapath::{Datapath, Pins},
};

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

/// What a control connection asks of the agent's loop.
enum LoopRequest {
    Reload(oneshot::Sender<Response>),
    /// The receiver hears when the answer has been written, so the agent
    /// does not exit before its caller knows.
    Shutdown(oneshot::Sender<Response>, oneshot::Receiver<()>),
}

async fn serve(config: Config, options: Options) -> Result<()> {
    let pins = Pins::new(&config.agent.pin_dir)?;
    let (datapath, reused) = match Datapath::load_pinned(config.agent.max_flows, config.agent.max_services, &pins) {
        Ok(loaded) => loaded,
        Err(e) => {
            let _ = pins.remove_if_empty();
            return Err(e);
        }
    };
    let result = run_loaded(config, options, &pins, datapath, reused).await;
    if result.is_err() && !reused {
        // Nothing was running before this agent: leave nothing behind.
        let _ = pins.remove_all();
    }
    result
}

async fn run_loaded(config: Config, options: Options, pins: &Pins, datapath: Datapath, reused: bool) -> Result<()> {
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
    let mut balancer = Balancer::new(datapath);
    let adopted = if reused { balancer.adopt() } else { 0 };
    for service in &config.services {
        balancer
            .add_service(service)
            .with_context(|| format!("configuring service {}", service.name))?;
    }
    balancer.finish_adoption()?;
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
    let balancer = Arc::new(Mutex::new(balancer));
    if let Some(address) = config.agent.metrics {
        crate::metrics::serve(address, balancer.clone()).await?;
    }

    let listener = bind(&config.agent.socket)?;
    tracing::info!(
        interfaces = ?config.agent.interfaces,
        services = config.services.len(),
        socket = %config.agent.socket.display(),
        "load balancer running"
    );

    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut hangup = signal(SignalKind::hangup())?;
    let (loop_tx, mut loop_rx) = mpsc::channel::<LoopRequest>(4);
    let detach = options.detach_on_exit;
    let mut aging_tick = tokio::time::interval(Duration::from_millis(config.agent.aging_interval_ms));
    let mut control_tick = tokio::time::interval(CONTROL_TICK);
    let timeouts = config.agent.timeouts.to_wire();
    let mut pressure_warned = None;
    let mut next_scan = std::time::Instant::now();
    let mut scans = 0u64;
    let (check_results, mut checked) = mpsc::channel::<(String, std::net::SocketAddrV4, CheckResult)>(1024);
    let mut checkers = Checkers::default();
    loop {
        tokio::select! {
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
            _ = hangup.recv() => {
                let response = reload(&balancer, &options.config_path);
                if !response.ok {
                    tracing::error!("reload refused: {}", response.error.unwrap_or_default());
                }
            }
            Some(request) = loop_rx.recv() => match request {
                LoopRequest::Reload(reply) => {
                    let _ = reply.send(reload(&balancer, &options.config_path));
                }
                LoopRequest::Shutdown(reply, written) => {
                    checkers.reconcile(Vec::new(), &check_results);
                    tracing::info!("shutdown requested: detaching the XDP program and removing its pinned state");
                    let response = match pins.remove_all() {
                        Ok(()) => Response { ok: true, error: None, result: serde_json::Value::Null },
                        Err(e) => Response { ok: false, error: Some(format!("{e:#}")), result: serde_json::Value::Null },
                    };
                    let _ = reply.send(response);
                    let _ = tokio::time::timeout(Duration::from_secs(2), written).await;
                    let _ = std::fs::remove_file(&config.agent.socket);
                    return Ok(());
                }
            },
            Some((service, address, result)) = checked.recv() => {
                if let Err(e) = balancer.lock().unwrap().record_check(&service, address, result) {
                    tracing::warn!("applying a health check result failed: {e:#}");
                }
            }
            _ = control_tick.tick() => {
                let mut b = balancer.lock().unwrap();
                if let Err(e) = b.tick() {
                    tracing::warn!("updating backend states failed: {e:#}");
                }
                checkers.reconcile(b.check_targets(), &check_results);
            }
            _ = aging_tick.tick() => {
                if std::time::Instant::now() < next_scan {
                    continue;
                }
                let mut b = balancer.lock().unwrap();
                let occupancy = b.flows_seen as f64 / b.datapath.max_flows() as f64;
                let mut t = timeouts;
                if occupancy > PRESSURE {
                    // Half-open flows (a SYN flood, say) go first, so that
                    // established ones never have to make room.
                    t.syn = t.syn.min(PRESSURE_SYN_TIMEOUT_NS);
                    if pressure_warned.is_none_or(|at: std::time::Instant| at.elapsed() > Duration::from_secs(60)) {
                        tracing::warn!(
                            occupancy = format!("{:.0}%", occupancy * 100.0),
                            "connection table under pressure: half-open flows now expire after 2 s; \
                             new flows are dropped (and counted as table_full) when it is full"
                        );
                        pressure_warned = Some(std::time::Instant::now());
                    }
                }
                scans += 1;
                let started = std::time::Instant::now();
                match aging::age(&mut b.datapath, &t, scans.is_multiple_of(ORPHAN_SCAN_EVERY)) {
                    Ok(r) => {
                        b.expired_total += r.expired as u64;
                        b.flows_seen = r.flows;
                        if r.expired > 0 || r.orphans_removed > 0 {
                            tracing::debug!(expired = r.expired, orphans = r.orphans_removed, "aged flows");
                        }
                    }
                    Err(e) => tracing::warn!("aging the connection table failed: {e:#}"),
                }
                // A big table takes a while to read: keep aging to about a
                // tenth of a CPU.
                next_scan = std::time::Instant::now() + started.elapsed() * 9;
                if let Err(e) = b.reclaim() {
                    tracing::warn!("reclaiming backend slots failed: {e:#}");
                }
            }
            accepted = listener.accept() => {
                if let Ok((stream, _)) = accepted {
                    let balancer = balancer.clone();
                    let loop_tx = loop_tx.clone();
                    tokio::spawn(async move {
                        if let Err(e) = answer(stream, balancer, loop_tx).await {
                            tracing::debug!("control connection: {e:#}");
                        }
                    });
                }
            }
        }
    }

    checkers.reconcile(Vec::new(), &check_results);
    let _ = std::fs::remove_file(&config.agent.socket);
    drop(balancer);
    if detach {
        tracing::info!("detaching the XDP program and removing its pinned state");
        pins.remove_all()?;
    } else {
        tracing::info!(
            pin_dir = %config.agent.pin_dir.display(),
            "agent stopping; the data path keeps forwarding (`lb shutdown` takes it off)"
        );
    }
    Ok(())
}

fn reload(balancer: &Mutex<Balancer>, path: &std::path::Path) -> Response {
    let result = Config::load(path).and_then(|config| balancer.lock().unwrap().reload(&config));
    match result {
        Ok(changes) => {
            if changes.is_empty() {
                tracing::info!("config reloaded: nothing changed");
            }
            for change in &changes {
                tracing::info!("config reloaded: {change}");
            }
            Response { ok: true, error: None, result: serde_json::json!({ "changes": changes }) }
        }
        Err(e) => Response { ok: false, error: Some(format!("{e:#}; the running config is unchanged")), result: serde_json::Value::Null },
    }
}

/// Above this share of the connection table in use, half-open flows are
/// aged after `PRESSURE_SYN_TIMEOUT_NS`.
const PRESSURE: f64 = 0.9;
const PRESSURE_SYN_TIMEOUT_NS: u64 = 2_000_000_000;
/// Every this many aging scans, also look for leftover reply entries.
const ORPHAN_SCAN_EVERY: u64 = 30;

/// How often passive health, slow starts and drains are looked at.
const CONTROL_TICK: Duration = Duration::from_millis(100);

/// The running health checks, one task per backend.
#[derive(Default)]
struct Checkers {
    running: HashMap<(String, std::net::SocketAddrV4), (CheckTarget, tokio::task::JoinHandle<()>)>,
}

impl Checkers {
    /// Starts the checks that are wanted and not running, stops the others.
    fn reconcile(
        &mut self,
        wanted: Vec<CheckTarget>,
        results: &mpsc::Sender<(String, std::net::SocketAddrV4, CheckResult)>,
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
                    let result = health::check(t.address, &t.config).await;
                    if results.send((t.service.clone(), t.address, result)).await.is_err() {
                        return;
                    }
                }
            });
            self.running.insert(key, (target, task));
        }
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
            tracing::warn!(
                interface,
                "native XDP is not available ({e:#}); falling back to generic mode, which is slower"
            );
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
    Ok(())
}

/// The socket is created by root and usable only by root.
fn bind(path: &std::path::Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        anyhow::bail!("another agent is already serving {}", path.display());
    }
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

async fn answer(stream: UnixStream, balancer: Arc<Mutex<Balancer>>, loop_tx: mpsc::Sender<LoopRequest>) -> Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read).read_line(&mut line).await?;
    let response = match serde_json::from_str::<Request>(&line) {
        Ok(Request::Reload) => {
            let (reply, answer) = oneshot::channel();
            loop_tx.send(LoopRequest::Reload(reply)).await?;
            answer.await?
        }
        Ok(Request::Shutdown) => {
            let (reply, answer) = oneshot::channel();
            let (written_tx, written) = oneshot::channel();
            loop_tx.send(LoopRequest::Shutdown(reply, written)).await?;
            let response = answer.await?;
            let mut out = serde_json::to_string(&response)?;
            out.push('\n');
            write.write_all(out.as_bytes()).await?;
            let _ = written_tx.send(());
            return Ok(());
        }
        Ok(request) => control::handle(&mut balancer.lock().unwrap(), request),
        Err(e) => Response { ok: false, error: Some(format!("malformed request: {e}")), result: serde_json::Value::Null },
    };
    let mut out = serde_json::to_string(&response)?;
    out.push('\n');
    write.write_all(out.as_bytes()).await?;
    Ok(())
}
