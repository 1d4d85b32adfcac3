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
    time::Duration,
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
        let greeting = format!("{name}\n");
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((conn, _)) => {
                            let greeting = greeting.clone();
                            std::thread::spawn(move || echo(conn, &greeting));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(2)),
                    }
                }
            })
        };
        Self { name: name.to_string(), addr, stop, thread: Some(thread) }
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
    let stream = client.run(|| TcpStream::connect_timeout(&SocketAddr::V4(target), IO_TIMEOUT))?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
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
