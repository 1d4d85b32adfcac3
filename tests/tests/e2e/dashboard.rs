//! The Grafana dashboard (`dist/grafana/lb-dashboard.json`) against a real
//! Prometheus server (Debian's) scraping an agent under load: every query
//! of every panel, and the service variable's, returns data through
//! Prometheus's HTTP API, so the dashboard and the metrics cannot drift.
use std::{
    io::{Read, Write},
    net::TcpStream,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use lb_tests::{
    lab::{Lab, VIP},
    serial,
    servers::{connect, request},
};

const METRICS: &str = "127.0.0.1:9100";
const PROMETHEUS: &str = "127.0.0.1:9090";

/// Prometheus in the balancer's namespace, stopped when dropped.
struct Prometheus(Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_prometheus(lab: &Lab) -> Prometheus {
    let config = lab.dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: lb\n    static_configs:\n      - targets: [\"{METRICS}\"]\n"),
    )
    .unwrap();
    let log = std::fs::File::create(lab.dir.join("prometheus.log")).unwrap();
    let child = lab
        .lb
        .command("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", lab.dir.join("tsdb").display()))
        .arg(format!("--web.listen-address={PROMETHEUS}"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start prometheus");
    Prometheus(child)
}

/// GET `path` from Prometheus, in the balancer's namespace: (status line, body).
fn get(lab: &Lab, path: &str) -> Option<(String, String)> {
    lab.lb.run(|| {
        let mut conn = TcpStream::connect(PROMETHEUS).ok()?;
        conn.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        conn.write_all(format!("GET {path} HTTP/1.1\r\nHost: prometheus\r\nConnection: close\r\n\r\n").as_bytes()).ok()?;
        let mut response = String::new();
        conn.read_to_string(&mut response).ok()?;
        let (head, body) = response.split_once("\r\n\r\n")?;
        Some((head.lines().next()?.to_string(), body.to_string()))
    })
}

fn encode(query: &str) -> String {
    query
        .bytes()
        .map(|b| if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") })
        .collect()
}

/// The result of an instant query, by Prometheus's HTTP API.
fn query(lab: &Lab, expr: &str) -> Vec<serde_json::Value> {
    let (status, body) = get(lab, &format!("/api/v1/query?query={}", encode(expr))).expect("Prometheus answers");
    let value: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|_| panic!("{status}: {body}"));
    assert_eq!(value["status"], "success", "{expr}: {body}");
    value["data"]["result"].as_array().cloned().unwrap_or_default()
}

/// The dashboard's queries, with Grafana's variables as Grafana would fill
/// them for "All" services.
fn panel_queries() -> Vec<(String, String)> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../dist/grafana/lb-dashboard.json");
    let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "panel {} has no query", panel["title"]);
        for t in targets {
            let expr = t["expr"].as_str().unwrap().replace("$service", ".*").replace("$__rate_interval", "20s");
            assert!(!expr.contains('$'), "a variable the test does not fill: {expr}");
            queries.push((panel["title"].as_str().unwrap().to_string(), expr));
        }
    }
    queries
}

#[test]
fn every_dashboard_query_returns_data_from_a_real_prometheus() {
    let queries = panel_queries();
    assert!(queries.len() >= 5, "connections, new connections/s, health, occupancy and drops at least");

    let _serial = serial();
    let lab = Lab::new(3);
    let _servers = lab.start_servers();
    let agent = lab.start_agent(&lab.config(&[1, 1, 1], &format!("metrics = \"{METRICS}\"")));
    let _prometheus = start_prometheus(&lab);
    let deadline = Instant::now() + Duration::from_secs(20);
    while get(&lab, "/-/ready").is_none_or(|(status, _)| !status.contains("200")) {
        assert!(Instant::now() < deadline, "Prometheus did not come up: {}", std::fs::read_to_string(lab.dir.join("prometheus.log")).unwrap_or_default());
        std::thread::sleep(Duration::from_millis(200));
    }

    // Load: three held connections and a stream of short ones, until
    // Prometheus has scraped enough for rates (its first scrape comes a
    // few seconds after it starts).
    let held: Vec<_> = (0..3).map(|_| connect(&lab.client, VIP).unwrap()).collect();
    let scrapes = || {
        let result = query(&lab, "count_over_time(up{job=\"lb\"}[1m])");
        result.first().map_or(0.0, |s| s["value"][1].as_str().unwrap().parse::<f64>().unwrap())
    };
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut sent = 0;
    while scrapes() < 8.0 {
        assert!(Instant::now() < deadline, "Prometheus scraped {} times in 40 s", scrapes());
        for _ in 0..10 {
            request(&lab.client, VIP).unwrap();
            sent += 1;
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    assert!(sent > 0);
    for (panel, expr) in &queries {
        let result = query(&lab, expr);
        assert!(!result.is_empty(), "panel {panel:?}: no data for {expr}");
    }
    // The service variable's values.
    let (_, body) = get(&lab, &format!("/api/v1/label/service/values?{}", encode_param("match[]", "lb_backend_up"))).unwrap();
    assert!(body.contains("\"web\""), "{body}");
    // And the figures are the agent's: three held connections, once a
    // scrape has come after the last short one (one may be caught open).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let active = query(&lab, "sum(lb_backend_active_connections)");
        if active[0]["value"][1] == "3" {
            break;
        }
        assert!(Instant::now() < deadline, "Prometheus says {active:?}, the agent {:?}", agent.active());
        std::thread::sleep(Duration::from_millis(200));
    }
    let rate = query(&lab, "sum(rate(lb_backend_connections_total[20s]))");
    assert!(rate[0]["value"][1].as_str().unwrap().parse::<f64>().unwrap() > 1.0, "{rate:?}");
    for h in &held {
        h.close().unwrap();
    }
}

fn encode_param(key: &str, value: &str) -> String {
    format!("{}={}", encode(key), encode(value))
}
