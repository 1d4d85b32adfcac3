//! `lb import nginx` on the seed set-up's configuration, as nginx itself
//! takes it (`nginx -t`), then run: the imported service balances real
//! connections as nginx's least_conn with a backup does.
use std::{collections::BTreeMap, process::Command, time::Duration};

use lb_tests::{
    lab::{backend_addr, lb_binary, Lab, VIP},
    netns::Netns,
    servers::{connect, Held},
};

/// The seed set-up's main file: nginx's own settings, logging, and the
/// site included from conf.d.
fn seed_config(lab: &Lab) -> String {
    format!(
        "worker_processes auto;\npid {dir}/nginx.pid;\nevents {{\n    worker_connections 10000;\n}}\n\
         http {{\n    access_log {dir}/access.log;\n    include conf.d/*.conf;\n}}\n",
        dir = lab.dir.display()
    )
}

/// Its site: least_conn over three servers with passive checks and a
/// backup, keepalive, a second upstream with ip_hash, headers.
fn site_config() -> String {
    let server = |i: usize, params: &str| format!("    server {} {params};\n", backend_addr(i));
    format!(
        "upstream web {{\n    least_conn;\n{}{}{}{}    keepalive 32;\n}}\n\
         upstream api {{\n    ip_hash;\n{}}}\n\
         server {{\n    listen {VIP};\n    server_name example.com;\n    location / {{\n        proxy_pass http://web;\n\
         \x20       proxy_http_version 1.1;\n        proxy_set_header Connection \"\";\n    }}\n}}\n\
         server {{\n    listen {}:8080;\n    location / {{\n        proxy_pass http://api;\n    }}\n}}\n",
        server(0, "max_fails=3 fail_timeout=30s weight=1"),
        server(1, "max_fails=3 fail_timeout=30s weight=1"),
        server(2, "max_fails=3 fail_timeout=30s weight=1"),
        server(3, "backup"),
        server(0, "weight=2"),
        VIP.ip(),
    )
}

#[test]
fn the_seed_nginx_setup_imports_and_balances_as_nginx_would() {
    let _serial = lb_tests::serial();
    let lab = Lab::new(4);
    let _servers = lab.start_servers();
    std::fs::create_dir_all(lab.dir.join("conf.d")).unwrap();
    std::fs::write(lab.dir.join("conf.d/site.conf"), site_config()).unwrap();
    let main = lab.dir.join("nginx.conf");
    std::fs::write(&main, seed_config(&lab)).unwrap();

    // A configuration nginx itself takes (`-t` binds the listens: it runs
    // where the VIP is a local address).
    let nginx_host = Netns::new("nginx");
    nginx_host.exec(&format!("ip addr add {}/32 dev lo", VIP.ip()));
    let checked = nginx_host
        .command("nginx")
        .arg("-t")
        .arg("-p")
        .arg(&lab.dir)
        .arg("-e")
        .arg(lab.dir.join("error.log"))
        .arg("-c")
        .arg(&main)
        .output()
        .expect("run nginx -t");
    assert!(checked.status.success(), "nginx -t refused the seed configuration:\n{}", String::from_utf8_lossy(&checked.stderr));

    let out = Command::new(lb_binary())
        .args(["import", "nginx"])
        .arg(&main)
        .args(["--interface", "cli", "--interface", "srv"])
        .output()
        .unwrap();
    let (toml, warnings) = (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
    assert!(out.status.success(), "lb import nginx failed:\n{warnings}");
    for said in ["keepalive", "ip_hash", "proxy_set_header", "server_name example.com", "access_log"] {
        assert!(warnings.contains(said), "no warning about {said}:\n{warnings}");
    }
    let site = lab.dir.join("conf.d/site.conf");
    assert!(warnings.contains(&format!("warning: {}:7: upstream web: keepalive", site.display())), "{warnings}");

    // Run it: the lab's socket and pins, the rest as imported.
    let config = toml.replacen(
        "[agent]\n",
        &format!("[agent]\nsocket = \"{}\"\npin_dir = \"{}\"\n", lab.socket().display(), lab.pin_dir().display()),
        1,
    );
    let agent = lab.start_agent(&config);
    let status = agent.status();
    let web = status["services"].as_array().unwrap().iter().find(|s| s["name"] == "web").expect("service web").clone();
    assert_eq!(web["vip"], VIP.to_string());
    assert_eq!(web["backends"].as_array().unwrap().len(), 4);

    // Least connections over the three primaries; the backup takes none
    // while they can.
    let held: Vec<Held> = (0..9).map(|i| connect(&lab.client, VIP).unwrap_or_else(|e| panic!("connection {i}: {e}"))).collect();
    let mut spread = BTreeMap::new();
    for h in &held {
        *spread.entry(h.backend.clone()).or_insert(0) += 1;
    }
    assert_eq!(spread, BTreeMap::from([("b1".to_string(), 3), ("b2".to_string(), 3), ("b3".to_string(), 3)]));
    for h in &held {
        h.close().unwrap();
    }
    agent.wait_for("every count back to 0", Duration::from_secs(5), |s| {
        s["services"].as_array().unwrap().iter().all(|svc| {
            svc["backends"].as_array().unwrap().iter().all(|b| b["active_connections"] == 0)
        })
    });
}
