//! End to end: an operator's mistakes around a running data path — a second
//! agent on the same pins, the agent started the usual way inside a
//! namespace — leave what runs exactly as it was, and say what to do.
use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use lb_tests::{
    lab::{backend_addr, lb_binary, start, VIP},
    servers::{connect, connect_with},
};

/// Runs `lb agent` with `config` the way `how` says (a command prefix) and
/// waits for it to exit; returns whether it succeeded, and its stderr.
fn run_agent(how: &[&str], config: &std::path::Path) -> (bool, String) {
    let mut child = Command::new(how[0])
        .args(&how[1..])
        .arg(lb_binary())
        .args(["agent", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            return (status.success(), String::from_utf8_lossy(&out.stderr).into_owned());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the agent kept running");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_second_agent_on_the_same_data_path_changes_nothing_and_names_the_first() {
    let running = start(&[1, 1], "");
    let (lab, agent) = (&running.lab, &running.agent);
    let before = agent.status();
    // Another config: another socket, another service on another VIP, and
    // only one of the backends.
    let vip2 = std::net::SocketAddrV4::new(*VIP.ip(), 8080);
    let other = format!(
        "[agent]\ninterfaces = [\"cli\", \"srv\"]\nsocket = \"{}\"\npin_dir = \"{}\"\n\n\
         [[service]]\nname = \"other\"\nvip = \"{vip2}\"\n[[service.backend]]\naddress = \"{}\"\n",
        lab.dir.join("second.sock").display(),
        lab.pin_dir().display(),
        backend_addr(0)
    );
    let path = lab.dir.join("second.toml");
    std::fs::write(&path, other).unwrap();
    let netns = format!("--net=/run/netns/{}", lab.lb.name);
    let (ok, stderr) = run_agent(&["nsenter", &netns], &path);
    assert!(!ok, "the second agent must exit non-zero");
    assert!(stderr.contains(&format!("another lb agent (pid {})", agent.pid())), "{stderr}");
    // The running one is as it was: its service, its backends, its data path.
    assert_eq!(agent.status()["services"], before["services"]);
    assert!(connect_with(&lab.client, vip2, Duration::from_millis(700)).is_err(), "no service on {vip2}");
    // Held connections: least connections puts two on each backend.
    let held: Vec<_> = (0..4).map(|_| connect(&lab.client, VIP).unwrap()).collect();
    let mut on: Vec<&str> = held.iter().map(|h| h.backend.as_str()).collect();
    on.sort();
    assert_eq!(on, ["b1", "b1", "b2", "b2"], "still balanced over both backends");
    assert!(!lab.dir.join("second.sock").exists());
}

#[test]
fn started_with_ip_netns_exec_it_says_what_to_run_instead_and_pins_nothing() {
    let _serial = lb_tests::serial();
    let lab = lb_tests::lab::Lab::new(1);
    std::fs::write(lab.dir.join("lb.toml"), lab.config(&[1], "")).unwrap();
    let (ok, stderr) = run_agent(&["ip", "netns", "exec", &lab.lb.name], &lab.dir.join("lb.toml"));
    assert!(!ok);
    assert!(stderr.contains("nsenter --net=/run/netns/NAME lb agent --config FILE"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    assert!(!lab.pin_dir().exists(), "nothing pinned");
}

#[test]
fn under_systemd_it_says_ready_feeds_the_watchdog_and_says_when_it_stops() {
    let _serial = lb_tests::serial();
    let lab = lb_tests::lab::Lab::new(1);
    std::fs::write(lab.dir.join("lb.toml"), lab.config(&[1], "")).unwrap();
    let notify = lab.dir.join("notify.sock");
    let systemd = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
    systemd.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut agent = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", lab.lb.name))
        .arg(lb_binary())
        .args(["agent", "--config"])
        .arg(lab.dir.join("lb.toml"))
        .env("NOTIFY_SOCKET", &notify)
        .env("WATCHDOG_USEC", "200000")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut heard = Vec::new();
    let next = || {
        let mut buf = [0u8; 256];
        let n = systemd.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    heard.push(next());
    let began = Instant::now();
    for _ in 0..3 {
        heard.push(next());
    }
    assert!(began.elapsed() < Duration::from_secs(2), "three watchdog pings in {:?}", began.elapsed());
    unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
    let stopping = (0..50).map(|_| next()).find(|m| m == "STOPPING=1");
    assert!(agent.wait().unwrap().success());
    assert_eq!(heard, ["READY=1", "WATCHDOG=1", "WATCHDOG=1", "WATCHDOG=1"]);
    assert_eq!(stopping.as_deref(), Some("STOPPING=1"));
}

#[test]
fn pinned_maps_of_another_layout_are_left_alone_and_named() {
    let _serial = lb_tests::serial();
    let lab = lb_tests::lab::Lab::new(1);
    // FLOWS as a build with 56-byte flow entries would have pinned it.
    let maps = lb::datapath::Pins::maps_under(&lab.pin_dir());
    std::fs::create_dir_all(&maps).unwrap();
    let made = Command::new("bpftool")
        .args(["map", "create"])
        .arg(maps.join("FLOWS"))
        .args(["type", "hash", "key", "12", "value", "56", "entries", "64", "name", "FLOWS"])
        .status()
        .unwrap();
    assert!(made.success(), "bpftool map create");
    std::fs::write(lab.dir.join("lb.toml"), lab.config(&[1], "")).unwrap();
    let netns = format!("--net=/run/netns/{}", lab.lb.name);
    let (ok, stderr) = run_agent(&["nsenter", &netns], &lab.dir.join("lb.toml"));
    assert!(!ok);
    let ours = format!("{}-byte values", std::mem::size_of::<lb_common::Flow>());
    assert!(stderr.contains("56-byte values") && stderr.contains(&ours), "{stderr}");
    assert!(stderr.contains("Nothing was taken over or changed"), "{stderr}");
    assert!(maps.join("FLOWS").exists(), "the pinned map is left as it was");
    assert!(!lab.pin_dir().join("links").join("cli").exists(), "nothing attached");
}

#[test]
fn a_data_path_of_another_layout_of_the_same_sizes_is_left_alone() {
    let _serial = lb_tests::serial();
    let lab = lb_tests::lab::Lab::new(1);
    // The fingerprint a build with the same sizes but fields in another
    // order would have pinned.
    let maps = lb::datapath::Pins::maps_under(&lab.pin_dir());
    std::fs::create_dir_all(&maps).unwrap();
    let layout = maps.join("LAYOUT");
    let bpftool = |args: &[&str]| {
        let status = Command::new("bpftool").args(args).status().unwrap();
        assert!(status.success(), "bpftool {args:?}");
    };
    let path = layout.to_str().unwrap();
    bpftool(&["map", "create", path, "type", "array", "key", "4", "value", "8", "entries", "1", "name", "LAYOUT"]);
    bpftool(&["map", "update", "pinned", path, "key", "0", "0", "0", "0", "value", "1", "2", "3", "4", "5", "6", "7", "8"]);
    std::fs::write(lab.dir.join("lb.toml"), lab.config(&[1], "")).unwrap();
    let netns = format!("--net=/run/netns/{}", lab.lb.name);
    let (ok, stderr) = run_agent(&["nsenter", &netns], &lab.dir.join("lb.toml"));
    assert!(!ok);
    assert!(stderr.contains("layout fingerprint 0807060504030201"), "{stderr}");
    assert!(stderr.contains(&format!("this build's {:016x}", lb_common::LAYOUT_HASH)), "{stderr}");
    assert!(!maps.join("FLOWS").exists(), "nothing else was pinned");
}
