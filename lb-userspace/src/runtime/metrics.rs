//! The metrics address: Prometheus metrics at `GET /metrics`, in the
//! OpenMetrics text format, read from the data path's counters at each
//! scrape (they are the kernel's; nothing is kept here); the live status
//! page at `GET /`, and the status it shows at `GET /status.json`.
use std::{
    net::SocketAddr,
    sync::{atomic::AtomicU64, Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result};
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};

use lb_common::Counter as DataPathCounter;

use crate::{api::Status, reconcile::Balancer};

type Labels = Vec<(&'static str, String)>;

/// Connections served at once; more are closed at once, so that clients
/// that connect and say nothing cannot pile up.
const MAX_CONNECTIONS: usize = 64;
/// How long one connection may take to send its request and take the answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Starts serving; returns once the address is bound.
pub async fn serve(address: SocketAddr, balancer: Arc<Mutex<Balancer>>) -> Result<()> {
    let listener = TcpListener::bind(address)
        .await
        .with_context(|| format!("binding the metrics address {address}"))?;
    tracing::info!(%address, "serving Prometheus metrics at /metrics");
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let Ok((conn, _)) = listener.accept().await else { continue };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                drop(conn);
                continue;
            };
            let balancer = balancer.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(REQUEST_TIMEOUT, answer(conn, &balancer)).await;
                drop(slot);
            });
        }
    });
    Ok(())
}

/// Reads one request and writes its answer.
async fn answer(mut conn: TcpStream, balancer: &Mutex<Balancer>) {
    // The request line, and the headers read to their end so the
    // client is not cut off mid-request (8 KiB at most).
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 8192 {
        match conn.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    }
    let first = String::from_utf8_lossy(&request);
    let path = first.split_whitespace().nth(1).unwrap_or("");
    let response = match path {
        "/metrics" => {
            let body = {
                let b = balancer.lock().unwrap();
                b.status().map(|s| render(&s, b.expired_total))
            };
            body.map(|body| ok("application/openmetrics-text; version=1.0.0; charset=utf-8", &body))
        }
        "/status.json" => {
            let body = balancer.lock().unwrap().status().and_then(|s| Ok(serde_json::to_string(&s)?));
            body.map(|body| ok("application/json", &body))
        }
        "/" => Ok(ok("text/html; charset=utf-8", STATUS_PAGE)),
        _ => Ok("HTTP/1.1 404 Not Found\r\nContent-Length: 49\r\nConnection: close\r\n\r\nthe status page is at /, the metrics at /metrics\n".into()),
    };
    let response = response
        .unwrap_or_else(|e| format!("HTTP/1.1 500 Internal Server Error\r\nConnection: close\r\n\r\n{e:#}\n"));
    let _ = conn.write_all(response.as_bytes()).await;
}

/// The live status page (`GET /`): self-contained, it reads `/status.json`.
const STATUS_PAGE: &str = include_str!("status.html");

fn ok(content_type: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

fn counter_family(registry: &mut Registry, name: &str, help: &str) -> Family<Labels, Counter> {
    let family = Family::<Labels, Counter>::default();
    registry.register(name, help, family.clone());
    family
}

fn gauge_family(registry: &mut Registry, name: &str, help: &str) -> Family<Labels, Gauge> {
    let family = Family::<Labels, Gauge>::default();
    registry.register(name, help, family.clone());
    family
}

/// The metrics for one scrape.
pub fn render(status: &Status, expired_total: u64) -> String {
    let mut r = Registry::default();
    let active = gauge_family(&mut r, "lb_backend_active_connections", "Established connections the backend holds now");
    let half_open =
        gauge_family(&mut r, "lb_backend_half_open_connections", "Connections whose handshake is not complete");
    let connections = counter_family(&mut r, "lb_backend_connections", "Connections assigned to the backend");
    let packets = counter_family(&mut r, "lb_backend_packets", "Packets forwarded, by direction");
    let bytes = counter_family(&mut r, "lb_backend_bytes", "Bytes forwarded (Ethernet frames), by direction");
    let up = gauge_family(&mut r, "lb_backend_up", "1 if the backend may take new connections");
    let state = gauge_family(&mut r, "lb_backend_state", "1 for the backend's current state");
    let failures = counter_family(&mut r, "lb_backend_passive_failures", "Handshakes refused or left unanswered");
    let latency = Family::<Labels, Gauge<f64, AtomicU64>>::default();
    r.register("lb_backend_check_latency_seconds", "Duration of the last active health check", latency.clone());
    let check_ok = gauge_family(&mut r, "lb_backend_check_success", "1 if the last active health check passed");
    let snat_ports = gauge_family(
        &mut r,
        "lb_backend_snat_ports_in_use",
        "Full NAT: the balancer's source ports taken towards the backend (live, closed and held flows)",
    );

    for s in &status.services {
        for b in &s.backends {
            let labels = || vec![("service", s.name.clone()), ("backend", b.address.clone())];
            let with = |k: &'static str, v: &str| {
                let mut l = labels();
                l.push((k, v.to_string()));
                l
            };
            active.get_or_create(&labels()).set(b.active_connections as i64);
            half_open.get_or_create(&labels()).set(b.half_open_connections as i64);
            connections.get_or_create(&labels()).inc_by(b.total_connections);
            packets.get_or_create(&with("direction", "to_backend")).inc_by(b.packets_in);
            packets.get_or_create(&with("direction", "to_client")).inc_by(b.packets_out);
            bytes.get_or_create(&with("direction", "to_backend")).inc_by(b.bytes_in);
            bytes.get_or_create(&with("direction", "to_client")).inc_by(b.bytes_out);
            up.get_or_create(&labels()).set(b.eligible as i64);
            state.get_or_create(&with("state", &b.state.to_string())).set(1);
            failures.get_or_create(&with("kind", "refused")).inc_by(b.refused);
            failures.get_or_create(&with("kind", "unanswered")).inc_by(b.unanswered);
            if let Some(ports) = b.snat_ports_in_use {
                snat_ports.get_or_create(&labels()).set(ports as i64);
            }
            if let Some(check) = &b.last_check {
                latency.get_or_create(&labels()).set(check.latency_ms / 1e3);
                check_ok.get_or_create(&labels()).set(check.ok as i64);
            }
        }
    }

    let table = gauge_family(&mut r, "lb_flow_table_flows", "Flows in the connection table");
    table.get_or_create(&vec![]).set(status.flow_table.flows as i64);
    let capacity = gauge_family(&mut r, "lb_flow_table_capacity", "Flows the connection table can hold");
    capacity.get_or_create(&vec![]).set(status.flow_table.capacity as i64);
    let expired = counter_family(&mut r, "lb_flows_expired", "Idle flows removed by the agent");
    expired.get_or_create(&vec![]).inc_by(expired_total);

    let c = |counter: DataPathCounter| status.counters.get(counter.name()).copied().unwrap_or(0);
    let runs = counter_family(&mut r, "lb_packets", "Packets the XDP program ran on");
    runs.get_or_create(&vec![]).inc_by(c(DataPathCounter::Packets));
    let verdicts = counter_family(&mut r, "lb_verdicts", "XDP verdicts");
    for (verdict, counter) in
        [("pass", DataPathCounter::VerdictPass), ("drop", DataPathCounter::VerdictDrop), ("redirect", DataPathCounter::VerdictRedirect)]
    {
        verdicts.get_or_create(&vec![("verdict", verdict.to_string())]).inc_by(c(counter));
    }
    let drops = counter_family(&mut r, "lb_drops", "Packets dropped, by reason");
    for reason in DataPathCounter::DROPS {
        drops.get_or_create(&vec![("reason", reason.name().to_string())]).inc_by(c(reason));
    }
    let events = counter_family(&mut r, "lb_events", "Other data-path events");
    for event in DataPathCounter::EVENTS {
        events.get_or_create(&vec![("event", event.name().to_string())]).inc_by(c(event));
    }

    let mut out = String::new();
    encode(&mut out, &r).expect("writing to a String");
    out
}
