//! Telling systemd how the agent is doing (sd_notify): `READY=1` once it
//! serves, `WATCHDOG=1` from the event loop while `WatchdogSec` is set (so
//! a loop that hangs gets the agent restarted), `STOPPING=1` on the way out.
//! Without `NOTIFY_SOCKET` (not under systemd) it does nothing.
use std::{
    os::unix::net::{SocketAddr, UnixDatagram},
    time::{Duration, Instant},
};

pub struct Notifier {
    socket: Option<(UnixDatagram, SocketAddr)>,
    /// How often to ping the watchdog (half its timeout), and when it last was.
    watchdog: Option<(Duration, Instant)>,
}

impl Notifier {
    pub fn from_env() -> Self {
        let socket = std::env::var_os("NOTIFY_SOCKET").and_then(|path| {
            let path = path.to_string_lossy().into_owned();
            let address = match path.strip_prefix('@') {
                Some(name) => {
                    use std::os::linux::net::SocketAddrExt;
                    SocketAddr::from_abstract_name(name.as_bytes()).ok()?
                }
                None => SocketAddr::from_pathname(&path).ok()?,
            };
            Some((UnixDatagram::unbound().ok()?, address))
        });
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|usec| usec.parse::<u64>().ok())
            .filter(|usec| *usec > 0)
            .map(|usec| (Duration::from_micros(usec / 2), Instant::now()));
        Self { socket, watchdog }
    }

    fn send(&self, state: &str) {
        if let Some((socket, address)) = &self.socket {
            if let Err(e) = socket.send_to_addr(state.as_bytes(), address) {
                tracing::debug!("sd_notify {state}: {e}");
            }
        }
    }

    pub fn ready(&self) {
        self.send("READY=1");
    }

    pub fn stopping(&self) {
        self.send("STOPPING=1");
    }

    /// Called from the event loop: pings the watchdog when it is due.
    pub fn alive(&mut self) {
        if let Some((every, last)) = &mut self.watchdog {
            if last.elapsed() >= *every {
                *last = Instant::now();
                self.send("WATCHDOG=1");
            }
        }
    }
}
