//! End to end: the Prometheus endpoint, scraped over HTTP and parsed with the
//! Prometheus project's own OpenMetrics parser; its numbers agree with the
//! traffic the test sent.
use std::{
    io::{Read, Write},
    net::TcpStream,
    process::{Command, Stdio},
};

use lb_tests::{
    lab::{Lab, VIP},
    serial,
    servers::{connect, request},
};

const METRICS: &str = "127.0.0.1:9100";

fn get(lab: &Lab, path: &str) -> String {
    lab.lb.run(|| {
        let mut conn = TcpStream::connect(METRICS).expect("connect to the metrics endpoint");
        conn.write_all(format!("GET {path} HTTP/1.1\r\nHost: lb\r\n\r\n").as_bytes()).unwrap();
        let mut response = String::new();
        conn.read_to_string(&mut response).unwrap();
        response
    })
}

/// (name, labels, value) of every sample, by prometheus_client's parser.
fn parse(text: &str) -> Vec<(String, serde_json::Value, f64)> {
    let script = "import sys, json\n\
        from prometheus_client.openmetrics.parser import text_string_to_metric_families\n\
        print(json.dumps([[s.name, s.labels, s.value] for f in text_string_to_metric_families(sys.stdin.read()) for s in f.samples]))";
    let mut child = Command::new("python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "the parser rejected the metrics: {}", String::from_utf8_lossy(&out.stderr));
    let samples: Vec<(String, serde_json::Value, f64)> = serde_json::from_slice(&out.stdout).unwrap();
    samples
}

fn sum(samples: &[(String, serde_json::Value, f64)], name: &str, label: Option<(&str, &str)>) -> f64 {
    samples
        .iter()
        .filter(|(n, l, _)| n == name && label.is_none_or(|(k, v)| l[k] == v))
        .map(|(_, _, v)| v)
        .sum()
}

#[test]
fn the_metrics_agree_with_the_traffic_sent() {
    let _serial = serial();
    let lab = Lab::new(3);
    let _servers = lab.start_servers();
    let agent = lab.start_agent(&lab.config(&[1, 1, 1], &format!("metrics = \"{METRICS}\"")));
    for _ in 0..30 {
        request(&lab.client, VIP).unwrap();
    }
    let held: Vec<_> = (0..3).map(|_| connect(&lab.client, VIP).unwrap()).collect();

    let response = get(&lab, "/metrics");
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("application/openmetrics-text"), "{head}");
    let samples = parse(body);

    assert_eq!(sum(&samples, "lb_backend_connections_total", None), 33.0);
    assert_eq!(sum(&samples, "lb_backend_active_connections", None), 3.0);
    assert_eq!(sum(&samples, "lb_backend_up", None), 3.0);
    assert_eq!(sum(&samples, "lb_backend_state", Some(("state", "up"))), 3.0);
    assert_eq!(sum(&samples, "lb_flow_table_capacity", None), 262_144.0);
    assert!(sum(&samples, "lb_flow_table_flows", None) >= 3.0);
    assert!(sum(&samples, "lb_verdicts_total", Some(("verdict", "redirect"))) > 0.0);
    assert_eq!(sum(&samples, "lb_events_total", Some(("event", "new_flows"))), 33.0);
    let status = agent.status();
    for b in status["services"][0]["backends"].as_array().unwrap() {
        let backend = b["address"].as_str().unwrap();
        let of = |name: &str, direction: &str| {
            samples
                .iter()
                .filter(|(n, l, _)| n == name && l["backend"] == backend && l["direction"] == direction)
                .map(|(_, _, v)| *v)
                .sum::<f64>()
        };
        assert_eq!(of("lb_backend_bytes_total", "to_backend"), b["bytes_in"].as_f64().unwrap());
        assert!(of("lb_backend_packets_total", "to_client") > 0.0, "{backend} answered");
    }
    assert!(get(&lab, "/nothing-here").starts_with("HTTP/1.1 404"));
    for h in &held {
        h.close().unwrap();
    }
}

#[test]
fn clients_that_connect_and_say_nothing_cannot_hold_the_endpoint() {
    let _serial = serial();
    let lab = Lab::new(1);
    let _servers = lab.start_servers();
    let _agent = lab.start_agent(&lab.config(&[1], &format!("metrics = \"{METRICS}\"")));
    // A hundred idle connections: more than the endpoint serves at once.
    let idle: Vec<TcpStream> = lab.lb.run(|| (0..100).filter_map(|_| TcpStream::connect(METRICS).ok()).collect());
    assert!(idle.len() >= 64, "connected {}", idle.len());
    // Within the request timeout the endpoint has let them go and answers
    // a real scrape again.
    let began = std::time::Instant::now();
    std::thread::sleep(std::time::Duration::from_secs(6));
    let response = get(&lab, "/metrics");
    assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
    for mut conn in idle {
        conn.set_read_timeout(Some(std::time::Duration::from_secs(2))).unwrap();
        let mut rest = Vec::new();
        assert!(conn.read_to_end(&mut rest).is_ok(), "closed by the server, not left hanging");
    }
    assert!(began.elapsed() < std::time::Duration::from_secs(30));
}
