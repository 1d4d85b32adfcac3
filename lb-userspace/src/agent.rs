//! `lb agent`: loads and attaches the data path, applies the config, ages the
//! connection table and serves the control socket until SIGINT/SIGTERM.
use std::{
    os::unix::fs::PermissionsExt,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result};
use aya::programs::{xdp::XdpLinkId, XdpMode};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    signal::unix::{signal, SignalKind},
};

use std::collections::HashMap;

use tokio::sync::mpsc;

use crate::{
    aging,
    balancer::{Balancer, CheckTarget},
    health::{self, CheckResult},
    config::{Config, XdpModeSetting},
    control::{self, Request, Response},
    datapath::Datapath,
};

pub fn run(config: Config) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(serve(config))
}

async fn serve(config: Config) -> Result<()> {
    let datapath = Datapath::load(config.agent.max_flows)?;
    let mut balancer = Balancer::new(datapath);
    for service in &config.services {
        balancer
            .add_service(service)
            .with_context(|| format!("configuring service {}", service.name))?;
    }
    let mut links = Vec::new();
    for interface in &config.agent.interfaces {
        let link = attach(&mut balancer.datapath, interface, config.agent.xdp_mode)?;
        links.push(link);
    }
    let balancer = Arc::new(Mutex::new(balancer));

    let listener = bind(&config.agent.socket)?;
    tracing::info!(
        interfaces = ?config.agent.interfaces,
        services = config.services.len(),
        socket = %config.agent.socket.display(),
        "load balancer running"
    );

    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut aging_tick = tokio::time::interval(Duration::from_millis(config.agent.aging_interval_ms));
    let mut control_tick = tokio::time::interval(CONTROL_TICK);
    let timeouts = config.agent.timeouts.to_wire();
    let (check_results, mut checked) = mpsc::channel::<(String, std::net::SocketAddrV4, CheckResult)>(1024);
    let mut checkers = Checkers::default();
    loop {
        tokio::select! {
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
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
                let mut b = balancer.lock().unwrap();
                match aging::age(&mut b.datapath, &timeouts) {
                    Ok(r) if r.expired > 0 || r.orphans_removed > 0 => {
                        tracing::debug!(expired = r.expired, orphans = r.orphans_removed, "aged flows")
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!("aging the connection table failed: {e:#}"),
                }
                if let Err(e) = b.reclaim() {
                    tracing::warn!("reclaiming backend slots failed: {e:#}");
                }
            }
            accepted = listener.accept() => {
                if let Ok((stream, _)) = accepted {
                    let balancer = balancer.clone();
                    tokio::spawn(async move {
                        if let Err(e) = answer(stream, balancer).await {
                            tracing::debug!("control connection: {e:#}");
                        }
                    });
                }
            }
        }
    }

    checkers.reconcile(Vec::new(), &check_results);
    tracing::info!("shutting down: detaching the XDP program");
    let mut b = balancer.lock().unwrap();
    for link in links {
        b.datapath.detach(link)?;
    }
    let _ = std::fs::remove_file(&config.agent.socket);
    Ok(())
}

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

fn attach(datapath: &mut Datapath, interface: &str, mode: XdpModeSetting) -> Result<XdpLinkId> {
    match mode {
        XdpModeSetting::Native => datapath
            .attach(interface, XdpMode::Driver)
            .with_context(|| format!("attaching in native mode to {interface}")),
        XdpModeSetting::Generic => datapath
            .attach(interface, XdpMode::Skb)
            .with_context(|| format!("attaching in generic mode to {interface}")),
        XdpModeSetting::Auto => match datapath.attach(interface, XdpMode::Driver) {
            Ok(link) => {
                tracing::info!(interface, "attached in native (driver) mode");
                Ok(link)
            }
            Err(e) => {
                tracing::warn!(
                    interface,
                    "native XDP is not available ({e:#}); falling back to generic mode, which is slower"
                );
                datapath
                    .attach(interface, XdpMode::Skb)
                    .with_context(|| format!("attaching to {interface} (does the interface exist?)"))
            }
        },
    }
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

async fn answer(stream: UnixStream, balancer: Arc<Mutex<Balancer>>) -> Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read).read_line(&mut line).await?;
    let response = match serde_json::from_str::<Request>(&line) {
        Ok(request) => control::handle(&mut balancer.lock().unwrap(), request),
        Err(e) => Response { ok: false, error: Some(format!("malformed request: {e}")), result: serde_json::Value::Null },
    };
    let mut out = serde_json::to_string(&response)?;
    out.push('\n');
    write.write_all(out.as_bytes()).await?;
    Ok(())
}
