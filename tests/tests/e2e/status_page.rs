//! The live status page (`GET /` on the metrics address), loaded by a real
//! browser (headless Chromium) against a running lab: what it shows is what
//! the agent knows.
use std::{path::Path, process::Output};

use lb_tests::{
    lab::{backend_addr, Lab, VIP},
    serial,
    servers::connect,
};

const METRICS: &str = "127.0.0.1:9100";

/// Chromium, headless, in the balancer's namespace (where the metrics
/// address is), with the flags that keep it off the network.
fn chromium(lab: &Lab, args: &[&str]) -> Output {
    let profile = lab.dir.join("chromium");
    lab.lb
        .command("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            // Time enough for the page's first fetches and refreshes.
            "--virtual-time-budget=4000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(format!("http://{METRICS}/"))
        .output()
        .expect("run chromium")
}

/// The row of backend `address` in the rendered page.
fn row<'a>(dom: &'a str, address: &str) -> &'a str {
    let start = dom.find(&format!("<tr data-backend=\"{address}\"")).unwrap_or_else(|| panic!("no row for {address}:\n{dom}"));
    let end = dom[start..].find("</tr>").unwrap() + start;
    &dom[start..end]
}

fn cell(row: &str, class: &str) -> String {
    let marker = format!("<td class=\"{class}\"");
    let start = row.find(&marker).unwrap_or_else(|| panic!("no {class} cell in {row}"));
    let open_end = row[start..].find('>').unwrap() + start + 1;
    let close = row[open_end..].find("</td>").unwrap() + open_end;
    // The text, without the tags of badges and notes inside.
    let mut text = String::new();
    let mut in_tag = false;
    for c in row[open_end..close].chars() {
        match c {
            '<' => in_tag = true,
            '>' => in_tag = false,
            c if !in_tag => text.push(c),
            _ => {}
        }
    }
    text
}

#[test]
fn a_browser_shows_every_backend_with_its_state_weight_and_connections() {
    let _serial = serial();
    let lab = Lab::new(3);
    let _servers = lab.start_servers();
    let agent = lab.start_agent(&lab.config(&[1, 2, 1], &format!("metrics = \"{METRICS}\"")));
    // Four held connections: least connections by weight puts two on b2.
    let held: Vec<_> = (0..4).map(|_| connect(&lab.client, VIP).unwrap()).collect();
    let third = backend_addr(2).to_string();
    agent.cli(&["backend", "disable", "web", &third]).unwrap();

    let out = chromium(&lab, &["--dump-dom"]);
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && dom.contains("data-service=\"web\""), "chromium:\n{dom}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(dom.contains(&VIP.to_string()), "the VIP is shown");
    let status = agent.status();
    for b in status["services"][0]["backends"].as_array().unwrap() {
        let address = b["address"].as_str().unwrap();
        let r = row(&dom, address);
        assert_eq!(cell(r, "active"), b["active_connections"].to_string(), "{address}: {r}");
        assert_eq!(cell(r, "weight"), b["weight"].to_string(), "{address}: {r}");
        assert_eq!(cell(r, "total"), b["total_connections"].to_string(), "{address}: {r}");
        assert!(cell(r, "state").starts_with(&b["state"].as_str().unwrap().replace('_', " ")), "{address}: {r}");
    }
    let actives: Vec<String> = (0..3).map(|i| cell(row(&dom, &backend_addr(i).to_string()), "active")).collect();
    assert_eq!(actives, ["1", "2", "1"]);
    let disabled = row(&dom, &third);
    assert!(disabled.contains("data-state=\"disabled\"") && disabled.contains("class=\"reason\""), "{disabled}");
    assert!(cell(row(&dom, &backend_addr(0).to_string()), "state").starts_with("up"));

    // Self-contained: nothing to fetch from anywhere else.
    let page = lab.lb.run(|| {
        use std::io::{Read, Write};
        let mut conn = std::net::TcpStream::connect(METRICS).unwrap();
        conn.write_all(b"GET / HTTP/1.1\r\nHost: lb\r\n\r\n").unwrap();
        let mut page = String::new();
        conn.read_to_string(&mut page).unwrap();
        page
    });
    assert!(page.starts_with("HTTP/1.1 200") && page.contains("text/html"));
    assert!(!page.contains("http://") && !page.contains("https://"), "the page refers to outside assets");

    // A phone's screen, and a desktop's for the README when asked for.
    for (size, name) in [("390,844", "phone.png"), ("1000,420", "desktop.png")] {
        let path = lab.dir.join(name);
        let out = chromium(&lab, &[&format!("--window-size={size}"), &format!("--screenshot={}", path.display())]);
        let png = std::fs::read(&path).unwrap_or_else(|_| panic!("no screenshot: {}", String::from_utf8_lossy(&out.stderr)));
        assert!(png.starts_with(b"\x89PNG") && png.len() > 5_000, "{name} is not a rendered page");
        if let Some(dir) = std::env::var_os("LB_STATUS_SCREENSHOTS") {
            std::fs::copy(&path, Path::new(&dir).join(format!("status-page-{name}"))).unwrap();
        }
    }
    for h in &held {
        h.close().unwrap();
    }
}
