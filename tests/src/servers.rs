//! Real TCP servers and clients for end-to-end tests. A backend server greets
//! every connection with its name on a line, then echoes what it receives
//! until the client closes: the client learns which backend answered, and any
//! bytes it sends come back for a byte-exact comparison.
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::netns::Netns;

pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

pub struct EchoServer {
    pub name: String,
    pub addr: SocketAddrV4,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EchoServer {
    pub fn start(ns: &Netns, addr: SocketAddrV4, name: &str) -> Self {
        let listener = ns.run(|| TcpListener::bind(addr).expect("bind backend server"));
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            let name = name.to_string();
            std::thread::spawn(move || serve(listener, &name, &stop))
        };
        Self { name: name.to_string(), addr, stop, thread: Some(thread) }
    }
}

/// Accepts on a non-blocking `listener` until `stop`: each connection is
/// greeted with `name` and echoed on its own thread.
pub fn serve(listener: TcpListener, name: &str, stop: &AtomicBool) {
    let greeting = format!("{name}\n");
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((conn, _)) => {
                let greeting = greeting.clone();
                std::thread::spawn(move || echo(conn, &greeting));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}

fn echo(mut conn: TcpStream, greeting: &str) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_secs(120)));
    if conn.write_all(greeting.as_bytes()).is_err() {
        return;
    }
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if conn.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// An open connection through the balancer and the backend that took it.
pub struct Held {
    pub stream: TcpStream,
    pub backend: String,
}

/// Connects from `client` to `target` and reads the backend's name.
pub fn connect(client: &Netns, target: SocketAddrV4) -> std::io::Result<Held> {
    connect_with(client, target, IO_TIMEOUT)
}

/// The same, with `timeout` for connecting and for every read and write.
pub fn connect_with(client: &Netns, target: SocketAddrV4, timeout: Duration) -> std::io::Result<Held> {
    let stream = client.run(|| TcpStream::connect_timeout(&SocketAddr::V4(target), timeout))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    if !line.ends_with('\n') {
        return Err(std::io::Error::other("connection closed before the backend's greeting"));
    }
    Ok(Held { stream, backend: line.trim().to_string() })
}

/// One short connection: connect, learn the backend, close both ways.
pub fn request(client: &Netns, target: SocketAddrV4) -> std::io::Result<String> {
    let held = connect(client, target)?;
    held.close()?;
    Ok(held.backend)
}

impl Held {
    /// Closes our side and waits for the backend to close its side, so the
    /// flow is finished both ways when this returns.
    pub fn close(&self) -> std::io::Result<()> {
        self.stream.shutdown(std::net::Shutdown::Write)?;
        let mut rest = Vec::new();
        (&self.stream).read_to_end(&mut rest)?;
        Ok(())
    }

    /// Sends `data` and reads back exactly as many bytes: the echo.
    pub fn round_trip(&self, data: &[u8]) -> std::io::Result<Vec<u8>> {
        let mut writer = self.stream.try_clone()?;
        let data_owned = data.to_vec();
        let sender = std::thread::spawn(move || writer.write_all(&data_owned));
        let mut back = vec![0u8; data.len()];
        (&self.stream).read_exact(&mut back)?;
        sender.join().expect("sender thread")?;
        Ok(back)
    }
}

/// The outcome of one request of a load run.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub started: Instant,
    pub finished: Instant,
    /// The backend that greeted us, if one did.
    pub backend: Option<String>,
    pub error: Option<String>,
}

/// One request as a load client makes it: connect, learn the backend, send
/// and read back a few bytes, hold the connection `hold`, do it again, close.
/// Every step has `timeout`.
pub fn request_held(client: &Netns, target: SocketAddrV4, hold: Duration, timeout: Duration) -> Outcome {
    let started = Instant::now();
    let mut backend = None;
    let result = (|| -> std::io::Result<()> {
        let held = connect_with(client, target, timeout)?;
        backend = Some(held.backend.clone());
        if held.round_trip(b"ping")? != b"ping" {
            return Err(std::io::Error::other("echo differs"));
        }
        std::thread::sleep(hold);
        if held.round_trip(b"pong")? != b"pong" {
            return Err(std::io::Error::other("echo differs"));
        }
        held.close()
    })();
    Outcome { started, finished: Instant::now(), backend, error: result.err().map(|e| e.to_string()) }
}

/// `threads` clients making `request_held` requests back to back until
/// `duration` is over. Bounded: it stops by itself.
pub fn load(client: &Netns, target: SocketAddrV4, threads: usize, duration: Duration, hold: Duration) -> Vec<Outcome> {
    let end = Instant::now() + duration;
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(move || {
                    let mut outcomes = Vec::new();
                    while Instant::now() < end {
                        outcomes.push(request_held(client, target, hold, Duration::from_secs(3)));
                    }
                    outcomes
                })
            })
            .collect();
        workers.into_iter().flat_map(|w| w.join().unwrap()).collect()
    })
}

/// A backend server as its own process (`lb-echo`), so that a test can kill
/// it as a crash would: every socket closes at once.
pub struct EchoProcess {
    pub name: String,
    child: std::process::Child,
}

impl EchoProcess {
    /// Echo on `addr`; HTTP `GET /health` on the next port, answering 200, or
    /// 503 while `unhealthy_flag` exists.
    pub fn start(ns: &Netns, addr: SocketAddrV4, name: &str, unhealthy_flag: &std::path::Path) -> Self {
        let bin = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/lb-echo");
        let child = ns
            .command(bin.to_str().unwrap())
            .arg(addr.to_string())
            .arg(name)
            .arg(unhealthy_flag)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start lb-echo (built by `cargo xtask build`)");
        // Listening once it answers.
        let deadline = Instant::now() + Duration::from_secs(5);
        while ns.run(|| TcpStream::connect_timeout(&SocketAddr::V4(addr), Duration::from_millis(200))).is_err() {
            assert!(Instant::now() < deadline, "lb-echo did not start on {addr}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { name: name.to_string(), child }
    }

    /// SIGKILL, as a crash.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for EchoProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `len` pseudo-random bytes (xorshift), so that a lost, duplicated or
/// reordered segment shows in what is echoed back.
/// Sends 20 MB of `pseudo_random` bytes on a new connection to `target`
/// and checks that the echo is byte-exact; `through` names the way, for
/// the failure. Returns how many bytes went each way.
pub fn echoes_20_mb_byte_exact(client: &Netns, target: SocketAddrV4, through: &str) -> usize {
    let sent = pseudo_random(20 * 1024 * 1024);
    let held = connect(client, target).unwrap();
    let echoed = held.round_trip(&sent).unwrap_or_else(|e| panic!("a 20 MB transfer {through}: {e}"));
    assert!(echoed == sent, "the echoed 20 MB differ from what was sent {through}");
    held.close().unwrap();
    sent.len()
}

pub fn pseudo_random(len: usize) -> Vec<u8> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}
