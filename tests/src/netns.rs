//! Network namespaces that are removed when dropped, even when a test fails,
//! and ways to run code and commands inside them.
use std::{
    fs::File,
    os::fd::AsRawFd,
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

/// Every namespace of this run starts with `lbt-<pid>-`, so leftovers of a
/// killed run can be told apart and swept.
const PREFIX: &str = "lbt-";

pub struct Netns {
    pub name: String,
}

/// Runs a shell command in the root namespace (only to create links that are
/// born inside test namespaces); panics with its output if it fails.
pub fn sh(cmd: &str) -> Output {
    let out = Command::new("sh").arg("-c").arg(cmd).output().expect("run sh");
    if !out.status.success() {
        panic!(
            "command failed: {cmd}\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

impl Netns {
    pub fn new(role: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        sweep_leftovers();
        let name = format!(
            "{PREFIX}{}-{}-{role}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        sh(&format!("ip netns add {name}"));
        let ns = Self { name };
        ns.exec("ip link set lo up");
        ns
    }

    /// A shell command inside the namespace; panics if it fails.
    pub fn exec(&self, cmd: &str) -> Output {
        sh(&format!("ip netns exec {} sh -c '{}'", self.name, cmd.replace('\'', "'\\''")))
    }

    /// A command inside the namespace, not started yet.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Runs `f` on a thread that has entered the namespace: sockets it opens
    /// live there, and may be used from any thread afterwards.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                enter(&path);
                f()
            })
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
        })
    }

    /// Like `run`, on a thread that keeps running.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            enter(&path);
            f()
        })
    }
}

fn enter(path: &str) {
    let file = File::open(path).unwrap_or_else(|e| panic!("open {path}: {e}"));
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        panic!("setns {path}: {}", std::io::Error::last_os_error());
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        remove(&self.name);
    }
}

fn remove(name: &str) {
    // Processes left inside would keep nothing alive, but kill them anyway so
    // nothing of the test outlives it.
    let _ = Command::new("sh")
        .arg("-c")
        .arg(format!("ip netns pids {name} 2>/dev/null | xargs -r kill -9; ip netns del {name}"))
        .output();
}

/// For programs (the demo, the benchmarks): on Ctrl-C or SIGTERM, removes
/// this run's namespaces and pins, then exits, where the guards' drops would
/// not run. Call first thing in `main`, before any thread starts: it blocks
/// the two signals in every thread and waits for them in one of its own.
/// (Children started with `Command` get the default signal mask back.)
pub fn remove_on_interrupt() {
    unsafe {
        let mut signals: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut signals);
        libc::sigaddset(&mut signals, libc::SIGINT);
        libc::sigaddset(&mut signals, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &signals, std::ptr::null_mut());
        std::thread::spawn(move || {
            let mut signal = 0;
            libc::sigwait(&signals, &mut signal);
            eprintln!("interrupted: removing this run's namespaces");
            // Threads still at work in them fail now; that is expected.
            std::panic::set_hook(Box::new(|_| {}));
            remove_this_runs();
            std::process::exit(128 + signal);
        });
    }
}

fn remove_this_runs() {
    let own = format!("{PREFIX}{}-", std::process::id());
    remove_where(|name| name.starts_with(&own));
}

/// Removes namespaces, the data paths their labs pinned in bpffs and their
/// working directories, left by earlier runs whose process is gone.
fn sweep_leftovers() {
    remove_where(|name| {
        let pid = name.strip_prefix(PREFIX).and_then(|rest| rest.split('-').next()).unwrap_or("");
        !pid.is_empty() && !std::path::Path::new(&format!("/proc/{pid}")).exists()
    });
}

/// Removes the namespaces, bpffs pins and labs' working directories whose
/// name `matches`.
fn remove_where(matches: impl Fn(&str) -> bool) {
    for dir in [std::path::PathBuf::from("/sys/fs/bpf"), std::env::temp_dir()] {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if matches(&entry.file_name().to_string_lossy()) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else { return };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        if matches(name) {
            remove(name);
        }
    }
}
