//! The import on the configurations users bring: the seed set-up's (least
//! connections over three servers with passive checks, a backup, keepalive,
//! per-service upstreams, ip_hash) and the mistakes around it.
use std::path::{Path, PathBuf};

use super::*;
use crate::config::{CheckKind, Scheduler};

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lb-nginx-import-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("conf.d")).unwrap();
    dir
}

pub const SEED: &str = r#"user www-data;
worker_processes auto;
pid /run/nginx.pid;
events {
    worker_connections 10000;
}
http {
    log_format main '$remote_addr - $upstream_addr [$time_local] "$request" $status';
    access_log /var/log/nginx/access.log main;
    include conf.d/*.conf;
}
stream {
    upstream db {
        random two least_conn;
        server 198.19.0.31:5432;
        server 198.19.0.32:5432 max_conns=100 slow_start=30s;
    }
    server {
        listen 198.18.0.100:5432;
        proxy_pass db;
        proxy_timeout 10m;
    }
}
"#;

pub const SITE: &str = r#"upstream app {
    least_conn;
    server 198.19.0.11:8080 max_fails=3 fail_timeout=30s weight=1;
    server 198.19.0.12:8080 max_fails=3 fail_timeout=30s weight=1;
    server 198.19.0.13:8080 max_fails=3 fail_timeout=30s weight=1;
    server 198.19.0.14:8080 backup;
    keepalive 32;
}
upstream api {
    ip_hash;
    server 198.19.0.21:9000 weight=2;
    server 198.19.0.22:9000 down;
}
upstream unused {
    server 198.19.0.99:80;
}
server {
    listen 198.18.0.100:80;
    server_name example.com;
    location / {
        proxy_pass http://app;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
    }
    location /health {
        return 200 'ok';
    }
}
server {
    listen 198.18.0.100:8080;
    location / {
        proxy_pass http://api/v1/;
    }
}
server {
    listen 443 ssl;
    ssl_certificate /etc/ssl/site.pem;
    location / {
        proxy_pass http://app;
    }
}
"#;

fn seed(dir: &Path) -> PathBuf {
    std::fs::write(dir.join("conf.d/site.conf"), SITE).unwrap();
    let main = dir.join("nginx.conf");
    std::fs::write(&main, SEED).unwrap();
    main
}

fn vip() -> Options {
    Options { vip: Some("198.18.0.100".parse().unwrap()) }
}

#[test]
fn the_seed_setup_becomes_its_services() {
    let dir = temp_dir("seed");
    let (text, _) = import(&seed(&dir), &vip(), &["eth0".into()]).unwrap();
    let config = Config::parse(&text, Path::new("imported")).unwrap();
    assert_eq!(config.agent.interfaces, ["eth0"]);
    let s: Vec<(&str, String, Scheduler)> =
        config.services.iter().map(|s| (s.name.as_str(), s.vip.to_string(), s.scheduler)).collect();
    assert_eq!(
        s,
        [
            ("app", "198.18.0.100:80".into(), Scheduler::LeastConn),
            ("api", "198.18.0.100:8080".into(), Scheduler::LeastConn),
            ("app-443", "198.18.0.100:443".into(), Scheduler::LeastConn),
            ("db", "198.18.0.100:5432".into(), Scheduler::RandomTwoLeastConn),
        ]
    );
    let app = &config.services[0].backends;
    assert_eq!(app.len(), 4);
    for b in &app[..3] {
        assert_eq!((b.weight, b.max_fails, b.fail_timeout, b.backup), (1, 3, 30.0, false), "{b:?}");
    }
    assert_eq!(app[3].address.to_string(), "198.19.0.14:8080");
    assert!(app[3].backup);
    // nginx's defaults are lb's: one failure in 10 s.
    assert_eq!((app[3].max_fails, app[3].fail_timeout), (1, 10.0));
    let api = &config.services[1].backends;
    assert_eq!((api[0].weight, api[1].weight), (2, 0), "down is weight 0");
    let db = &config.services[3].backends;
    assert_eq!((db[1].max_conns, db[1].slow_start), (100, 30.0));
}

#[test]
fn what_has_no_layer_4_meaning_is_named_with_its_file_and_line() {
    let dir = temp_dir("warnings");
    let main = seed(&dir);
    let (text, warnings) = import(&main, &vip(), &[]).unwrap();
    let site = dir.join("conf.d/site.conf");
    let said = |file: &Path, line: usize, words: &str| {
        let at = format!("{}:{line}", file.display());
        assert!(
            warnings.iter().any(|w| w.at.to_string() == at && w.text.contains(words)),
            "no warning at {at} saying {words:?}; got:\n{}",
            warnings.iter().map(|w| format!("{}: {}", w.at, w.text)).collect::<Vec<_>>().join("\n")
        );
        // The same list heads the file, as comments.
        assert!(text.lines().any(|l| l.starts_with("#   ") && l.contains(&at)), "{at} not in the file's comments");
    };
    said(&main, 1, "user: a setting of nginx's own processes");
    said(&main, 4, "events");
    said(&main, 9, "logging");
    said(&main, 21, "proxy_timeout: a timeout");
    said(&site, 7, "keepalive: nginx's reuse of its own connections");
    said(&site, 10, "ip_hash: lb keeps no client affinity");
    said(&site, 12, "down: imported with weight 0");
    said(&site, 14, "upstream unused: no server proxies to it");
    said(&site, 19, "server_name example.com");
    said(&site, 23, "proxy_set_header: HTTP headers");
    said(&site, 26, "return: HTTP request handling");
    said(&site, 36, "listen 443 ssl: TLS is terminated by nginx");
    said(&site, 37, "ssl_certificate: TLS");
    // An upstream two servers use is converted, and warned about, once.
    assert_eq!(warnings.iter().filter(|w| w.text.contains("keepalive")).count(), 1);
    // Round robin's warning is on the upstream itself.
    assert!(warnings.iter().all(|w| !w.text.contains("round robin")));
    assert!(text.contains("# The interfaces where clients arrive"));
}

#[test]
fn round_robin_hash_and_random_take_the_nearest_scheduler_with_a_warning() {
    let dir = temp_dir("schedulers");
    let main = dir.join("nginx.conf");
    std::fs::write(
        &main,
        "stream {\n upstream rr { server 198.19.0.11:80; }\n upstream h { hash $remote_addr consistent; server 198.19.0.12:80; }\n \
         upstream r { random; server 198.19.0.13:80; }\n \
         server { listen 198.18.0.100:81; proxy_pass rr; }\n server { listen 198.18.0.100:82; proxy_pass h; }\n \
         server { listen 198.18.0.100:83; proxy_pass r; }\n}\n",
    )
    .unwrap();
    let (text, warnings) = import(&main, &Options::default(), &[]).unwrap();
    let config = Config::parse(&text, Path::new("imported")).unwrap();
    let schedulers: Vec<Scheduler> = config.services.iter().map(|s| s.scheduler).collect();
    assert_eq!(schedulers, [Scheduler::LeastConn, Scheduler::LeastConn, Scheduler::RandomTwoLeastConn]);
    let lines: Vec<String> = warnings.iter().map(|w| format!("{}: {}", w.at, w.text)).collect();
    assert!(lines.iter().any(|l| l.contains("nginx.conf:2") && l.contains("round robin")), "{lines:?}");
    assert!(lines.iter().any(|l| l.contains("nginx.conf:3") && l.contains("hash: lb keeps no client affinity")), "{lines:?}");
    assert!(lines.iter().any(|l| l.contains("nginx.conf:4: upstream r: random: imported as random_two_least_conn")), "{lines:?}");
}

#[test]
fn listens_without_an_address_need_the_vip_and_odd_ones_are_refused_by_name() {
    let dir = temp_dir("listens");
    let main = dir.join("nginx.conf");
    std::fs::write(
        &main,
        "stream {\n upstream u { server 198.19.0.11:53; server unix:/run/x.sock; server [2001:db8::1]:53; server 198.19.0.12; }\n \
         server { listen 53 udp; proxy_pass u; }\n server { listen 5353; proxy_pass u; }\n \
         server { listen [::]:54; proxy_pass u; }\n server { listen 198.18.0.100:55; proxy_pass $dynamic; }\n \
         server { listen 198.18.0.100:56; proxy_pass 198.19.0.40:56; }\n}\n",
    )
    .unwrap();
    let (text, warnings) = import(&main, &Options::default(), &[]).unwrap();
    let config = Config::parse(&text, Path::new("imported")).unwrap();
    // Only the literal address is imported: 5353 has no VIP without --vip.
    assert_eq!(config.services.len(), 1);
    assert_eq!(config.services[0].vip.to_string(), "198.18.0.100:56");
    assert_eq!(config.services[0].backends[0].address.to_string(), "198.19.0.40:56");
    let all = warnings.iter().map(|w| format!("{}: {}", w.at, w.text)).collect::<Vec<_>>().join("\n");
    for words in [
        "unix:/run/x.sock: a local socket",
        "[2001:db8::1]:53: IPv6",
        "198.19.0.12: no port",
        "listen 53 udp: lb balances TCP only",
        "listen 5353: every address of the host; give the VIP with --vip",
        "listen [::]:54: lb balances IPv4 TCP only",
        "proxy_pass $dynamic: a variable",
    ] {
        assert!(all.contains(words), "no warning saying {words:?}:\n{all}");
    }
    let (text, _) = import(&main, &vip(), &[]).unwrap();
    let config = Config::parse(&text, Path::new("imported")).unwrap();
    assert!(config.services.iter().any(|s| s.vip.to_string() == "198.18.0.100:5353"));
}

#[test]
fn two_servers_on_one_address_keep_the_first_and_say_so() {
    let dir = temp_dir("vhosts");
    let main = dir.join("nginx.conf");
    std::fs::write(
        &main,
        "http {\n upstream a { least_conn; server 198.19.0.11; }\n upstream b { least_conn; server 198.19.0.12; }\n \
         server { listen 198.18.0.100:80; server_name a.example; location / { proxy_pass http://a; } }\n \
         server { listen 198.18.0.100:80; server_name b.example; location / { proxy_pass http://b; } location /x { proxy_pass http://a; } }\n}\n",
    )
    .unwrap();
    let (text, warnings) = import(&main, &Options::default(), &[]).unwrap();
    let config = Config::parse(&text, Path::new("imported")).unwrap();
    assert_eq!(config.services.len(), 1);
    assert_eq!(config.services[0].backends[0].address.to_string(), "198.19.0.11:80");
    let all = warnings.iter().map(|w| format!("{}: {}", w.at, w.text)).collect::<Vec<_>>().join("\n");
    assert!(all.contains("nginx.conf:5: listen 198.18.0.100:80: already the VIP of service a"), "{all}");
    assert!(all.contains("nginx.conf:5: location /x proxies to http://a: at layer 4 one listen address goes to one pool"), "{all}");
}

#[test]
fn health_check_becomes_active_checks() {
    let dir = temp_dir("health");
    let main = dir.join("nginx.conf");
    std::fs::write(
        &main,
        "http {\n upstream a { least_conn; server 198.19.0.11:8080; }\n \
         server { listen 198.18.0.100:80; location / { proxy_pass http://a; health_check uri=/health interval=2s fails=2 passes=3 jitter=1; } }\n}\n",
    )
    .unwrap();
    let (text, warnings) = import(&main, &Options::default(), &[]).unwrap();
    let config = Config::parse(&text, Path::new("imported")).unwrap();
    let h = config.services[0].health.as_ref().unwrap();
    assert_eq!((h.kind, h.path.as_str(), h.interval, h.fall, h.rise), (CheckKind::Http, "/health", 2.0, 2, 3));
    assert!(warnings.iter().any(|w| w.text.contains("jitter=1: no lb equivalent")));
}

#[test]
fn nginx_times() {
    assert_eq!(nginx_time("30s"), Some(30.0));
    assert_eq!(nginx_time("10"), Some(10.0));
    assert_eq!(nginx_time("1m30s"), Some(90.0));
    assert_eq!(nginx_time("500ms"), Some(0.5));
    assert_eq!(nginx_time("1h"), Some(3600.0));
    assert_eq!(nginx_time("soon"), None);
    assert_eq!(nginx_time("5x"), None);
}
