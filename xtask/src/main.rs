//! `cargo xtask`: set-up, build, tests and the demo lab, so that a fresh
//! machine needs nothing but this repository and Rust.
use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need (quick when already there).
    Setup,
    /// Build `target/release/lb` with the XDP program embedded.
    Build,
    /// Run every test: unit tests, BPF_PROG_TEST_RUN tests, end-to-end tests
    /// in network namespaces.
    Test {
        /// Passed to the test binaries (a test name filter, say).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Build, then balance real connections in a lab of network namespaces:
    /// `balance` (the default) or `failover`.
    Demo {
        #[arg(default_value = "balance")]
        which: String,
    },
    /// Everything the end-to-end comparison needs on a machine with no
    /// internet and none of nginx, wrk or nftables, in one folder (default
    /// `target/many-core`) with `run.sh` to run it there as root.
    Bundle {
        #[arg(default_value = "target/many-core")]
        dir: std::path::PathBuf,
    },
    /// Benchmarks: `micro` (the program's cost per packet), `e2e` (five
    /// ways of balancing the same lab), `flood` (a spoofed SYN flood, in
    /// time), or `all` (all three, written to BENCHMARKS.md and
    /// docs/e2e.svg).
    Bench {
        #[arg(default_value = "all")]
        which: String,
        /// For the end-to-end part: `--queues N`, `--cpus
        /// wrk=0-3,balancer=4-7,backends=8-15`, `--rounds N`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        options: Vec<String>,
    },
}

/// Debian packages the lab and tests use: nginx checks the configurations
/// `lb import nginx` reads, Prometheus scrapes the agent for the dashboard's
/// queries, Chromium loads the status page.
const PACKAGES: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("ethtool", "ethtool"),
    ("ping", "iputils-ping"),
    ("hping3", "hping3"),
    ("bpftool", "bpftool"),
    ("/usr/sbin/nginx", "nginx-light"),
    ("/usr/lib/nginx/modules/ngx_stream_module.so", "libnginx-mod-stream"),
    ("/usr/bin/prometheus", "prometheus"),
    ("/usr/bin/chromium", "chromium"),
];
/// What the end-to-end benchmark compares against, and its load generator
/// (checked by a file each installs).
const BENCH_PACKAGES: &[(&str, &str)] = &[
    ("/usr/sbin/nginx", "nginx-light"),
    ("/usr/lib/nginx/modules/ngx_stream_module.so", "libnginx-mod-stream"),
    ("/usr/sbin/haproxy", "haproxy"),
    ("/usr/bin/wrk", "wrk"),
    ("/usr/sbin/nft", "nftables"),
    ("/usr/bin/iperf3", "iperf3"),
    ("/usr/bin/tcpdump", "tcpdump"),
];
const BPF_LINKER_VERSION: &str = "0.10.4";

fn main() -> Result<()> {
    match Cli::parse().command {
        Task::Setup => setup(),
        Task::Build => {
            setup()?;
            build()
        }
        Task::Test { args } => {
            setup()?;
            build()?;
            test(&args)
        }
        Task::Demo { which } => {
            setup()?;
            build()?;
            run(Command::new("target/release/lb-demo").arg(which))
        }
        Task::Bundle { dir } => {
            setup()?;
            install_missing(BENCH_PACKAGES)?;
            build()?;
            bundle(&dir)
        }
        Task::Bench { which, options } => {
            setup()?;
            if which != "micro" && which != "flood" {
                install_missing(BENCH_PACKAGES)?;
            }
            build()?;
            run(Command::new("target/release/lb-bench").arg(which).args(options))
        }
    }
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("cannot run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn output(cmd: &mut Command) -> String {
    cmd.output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default()
}

fn setup() -> Result<()> {
    if unsafe { libc::geteuid() } != 0 {
        bail!("run as root: loading XDP programs and creating network namespaces need it");
    }
    install_missing(PACKAGES)?;
    // The metrics test parses with the Prometheus project's own parser.
    if !succeeds(Command::new("python3").args(["-c", "import prometheus_client"])) {
        eprintln!("setup: installing the prometheus-client Python package");
        run(Command::new("python3").args(["-m", "pip", "install", "-q", "prometheus-client"]))?;
    }
    if !succeeds(Command::new("rustup").args(["run", "nightly", "rustc", "--version"])) {
        bail!("the nightly Rust toolchain is missing: `rustup toolchain install nightly`");
    }
    let installed = output(Command::new("rustup").args(["component", "list", "--toolchain", "nightly", "--installed"]));
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("setup: adding rust-src to the nightly toolchain");
        run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    }
    // bpf-linker's LLVM must match the nightly's; 0.10.x uses the
    // toolchain's own libLLVM.
    let linker = output(Command::new("bpf-linker").arg("--version"));
    if !linker.contains(BPF_LINKER_VERSION) {
        eprintln!("setup: installing bpf-linker {BPF_LINKER_VERSION} (a few minutes, once)");
        run(Command::new("cargo").args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION, "--locked"]))?;
    }
    if !output(&mut Command::new("mount")).lines().any(|l| l.contains("type bpf")) {
        run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    }
    Ok(())
}

/// Installs the Debian packages whose command (or file) is missing.
fn install_missing(packages: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .filter(|(bin, _)| {
            if bin.starts_with('/') {
                !std::path::Path::new(bin).exists()
            } else {
                !succeeds(Command::new("sh").args(["-c", &format!("command -v {bin}")]))
            }
        })
        .map(|(_, pkg)| *pkg)
        .collect();
    if !missing.is_empty() {
        eprintln!("setup: installing {}", missing.join(" "));
        run(Command::new("apt-get").args(["update", "-q"]))?;
        // The packages' own services (nginx, Prometheus) are not started:
        // the tests start what they need in their namespaces.
        let policy = std::path::Path::new("/usr/sbin/policy-rc.d");
        let own_policy = !policy.exists();
        if own_policy {
            std::fs::write(policy, "#!/bin/sh\n# lb's setup: no service starts while it installs\nexit 101\n")?;
            run(Command::new("chmod").args(["+x", "/usr/sbin/policy-rc.d"]))?;
        }
        let installed = run(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"));
        if own_policy {
            let _ = std::fs::remove_file(policy);
        }
        installed?;
    }
    Ok(())
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn build() -> Result<()> {
    run(cargo().args(["build", "--release", "-p", "lb-userspace", "-p", "lb-tests", "--bins"]))?;
    eprintln!("built target/release/lb");
    // Another build of the same code, calling itself another version: the
    // upgrade test hands a running data path from one build to the other.
    run(cargo().args(["build", "--release", "-p", "lb-userspace", "--bin", "lb", "--features", "next-build"])
        .args(["--target-dir", "target/next"]))?;
    Ok(())
}

fn test(args: &[String]) -> Result<()> {
    // Test binaries run one after another, and the tests in each take a
    // shared lock: they share the kernel's XDP and namespace state.
    let mut child = cargo()
        .args(["test", "--release", "--no-fail-fast", "--workspace", "--exclude", "xtask", "--lib", "--bins", "--tests", "--"])
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot run cargo test")?;
    // Pass the output through and add it up, so the run ends on one line
    // that says how many tests passed and failed over every test binary.
    let (mut passed, mut failed) = (0u64, 0u64);
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line?;
        println!("{line}");
        if let Some(result) = line.strip_prefix("test result: ") {
            passed += count_before(result, " passed");
            failed += count_before(result, " failed");
        }
    }
    let status = child.wait()?;
    println!("tests: {passed} passed, {failed} failed");
    if !status.success() || failed > 0 {
        bail!("the test suite failed");
    }
    if passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

/// The number just before `word` in a cargo test summary line.
fn count_before(line: &str, word: &str) -> u64 {
    line.split(';')
        .find_map(|part| part.trim().trim_start_matches("ok. ").trim_start_matches("FAILED. ").strip_suffix(word.trim()))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// Programs the comparison runs, bundled with the shared libraries they use.
const BUNDLED_TOOLS: &[&str] =
    &["nginx", "haproxy", "wrk", "iperf3", "ip", "nft", "ethtool", "nsenter", "taskset", "sysctl", "tcpdump"];
const STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";
/// glibc's own libraries: the machine's are used, never a copy.
const SYSTEM_LIBRARIES: &[&str] = &["libc.so", "ld-linux", "libm.so", "libpthread.so", "libdl.so", "librt.so", "linux-vdso"];

const RUN_SCRIPT: &str = r#"#!/bin/sh
# The end-to-end comparison (lb in nat and full NAT, nginx stream, HAProxy,
# nftables dnat, plain forwarding) on this machine, from this folder, as root.
# Options go to `lb-bench e2e`; without any: 8 queues per veth, wrk on CPUs
# 0-3, the balancer host's proxies on 4-7, the backends on 8-15, wrk -c128,
# one round. Add --pin-napi to poll each host's queues on its own CPUs, and
# LB_BENCH_CAPTURE=DIR to keep the client's packets of each new-connection run.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
export PATH="$here/bin:$PATH" LD_LIBRARY_PATH="$here/lib" LB_BIN="$here/bin/lb"
mkdir -p /var/lib/nginx /var/log/nginx /usr/lib/nginx/modules /run/netns
cp "$here/modules/ngx_stream_module.so" /usr/lib/nginx/modules/
mount | grep -q "type bpf" || mount -t bpf bpf /sys/fs/bpf
[ $# -gt 0 ] || set -- --queues 8 --cpus wrk=0-3,balancer=4-7,backends=8-15 --rounds 1 --connections 128
cd "$here"
exec lb-bench e2e "$@"
"#;

/// Fills `dir` with what `run.sh` needs on a bare machine.
fn bundle(dir: &std::path::Path) -> Result<()> {
    let (bin, lib, modules) = (dir.join("bin"), dir.join("lib"), dir.join("modules"));
    for d in [&bin, &lib, &modules] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let mut files: Vec<(std::path::PathBuf, std::path::PathBuf)> = vec![
        ("target/release/lb".into(), bin.join("lb")),
        ("target/release/lb-bench".into(), bin.join("lb-bench")),
        (STREAM_MODULE.into(), modules.join("ngx_stream_module.so")),
    ];
    for tool in BUNDLED_TOOLS {
        let path = output(Command::new("sh").args(["-c", &format!("command -v {tool}")]));
        let path = path.trim();
        if path.is_empty() {
            bail!("{tool} is not installed here; `cargo xtask bench e2e` installs what the comparison uses");
        }
        files.push((path.into(), bin.join(tool)));
    }
    let mut libraries = std::collections::BTreeSet::new();
    for (from, _) in &files {
        for line in output(Command::new("ldd").arg(from)).lines() {
            let Some(path) = line.split("=>").nth(1).and_then(|rest| rest.split_whitespace().next()) else { continue };
            if path.starts_with('/') && !SYSTEM_LIBRARIES.iter().any(|s| path.contains(s)) {
                libraries.insert(std::path::PathBuf::from(path));
            }
        }
    }
    for library in libraries {
        let name = library.file_name().context("a library path")?.to_owned();
        files.push((library, lib.join(name)));
    }
    for (from, to) in &files {
        std::fs::copy(from, to).with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    }
    let script = dir.join("run.sh");
    std::fs::write(&script, RUN_SCRIPT)?;
    run(Command::new("chmod").arg("755").arg(&script))?;
    eprintln!("bundled {} files in {}; run `{}` there as root", files.len() + 1, dir.display(), script.display());
    Ok(())
}
