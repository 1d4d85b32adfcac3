//! Typed calls to a running agent over its control socket: what the CLI
//! (and scripts in Rust) use instead of building requests by hand.
use std::{
    io::{BufRead, BufReader, Write},
    net::SocketAddrV4,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};

use crate::{
    api::{Admin, FlowStatus, Request, Response, Status, TraceLines},
    config::{BackendConfig, ServiceConfig},
};

pub struct Client {
    socket: PathBuf,
}

impl Client {
    pub fn new(socket: &Path) -> Self {
        Self { socket: socket.to_path_buf() }
    }

    /// Sends one request and returns its result.
    pub fn call(&self, request: &Request) -> Result<serde_json::Value> {
        let mut stream = UnixStream::connect(&self.socket).with_context(|| {
            format!(
                "cannot reach the agent at {} (is `lb agent` running? is --socket right? are you root?)",
                self.socket.display()
            )
        })?;
        let mut line = serde_json::to_string(request)?;
        line.push('\n');
        stream.write_all(line.as_bytes())?;
        let mut answer = String::new();
        BufReader::new(stream).read_line(&mut answer).context("the agent closed the connection")?;
        let response: Response = serde_json::from_str(&answer).context("the agent's answer is not valid")?;
        if !response.ok {
            bail!("{}", response.error.unwrap_or_else(|| "the agent refused the request".into()));
        }
        Ok(response.result)
    }

    /// Switches the trace on (or renews it) and reads its lines after `after`.
    pub fn trace(&self, service: Option<String>, client: Option<std::net::Ipv4Addr>, per_second: u32, after: u64) -> Result<TraceLines> {
        Ok(serde_json::from_value(self.call(&Request::Trace { service, client, per_second, after })?)?)
    }

    pub fn stop_trace(&self) -> Result<()> {
        self.call(&Request::TraceStop).map(drop)
    }

    pub fn status(&self) -> Result<Status> {
        Ok(serde_json::from_value(self.call(&Request::Status)?)?)
    }

    pub fn conntrack(&self) -> Result<Vec<FlowStatus>> {
        Ok(serde_json::from_value(self.call(&Request::Conntrack)?)?)
    }

    /// What the reload changed, one line each.
    pub fn reload(&self) -> Result<Vec<String>> {
        let result = self.call(&Request::Reload)?;
        Ok(serde_json::from_value(result["changes"].clone()).unwrap_or_default())
    }

    pub fn shutdown(&self) -> Result<()> {
        self.call(&Request::Shutdown).map(drop)
    }

    pub fn add_service(&self, service: ServiceConfig) -> Result<()> {
        self.call(&Request::ServiceAdd { service }).map(drop)
    }

    pub fn remove_service(&self, name: String) -> Result<()> {
        self.call(&Request::ServiceRemove { name }).map(drop)
    }

    pub fn add_backend(&self, service: String, backend: BackendConfig) -> Result<()> {
        self.call(&Request::BackendAdd { service, backend }).map(drop)
    }

    pub fn remove_backend(&self, service: String, address: SocketAddrV4) -> Result<()> {
        self.call(&Request::BackendRemove { service, address }).map(drop)
    }

    pub fn set_weight(&self, service: String, address: SocketAddrV4, weight: u32) -> Result<()> {
        self.call(&Request::BackendWeight { service, address, weight }).map(drop)
    }

    /// Returns the backend's active connections after the change.
    pub fn set_admin(&self, service: String, address: SocketAddrV4, admin: Admin) -> Result<u64> {
        Ok(self.call(&Request::BackendAdmin { service, address, admin })?.as_u64().unwrap_or(0))
    }

    /// One backend's active connections now.
    pub fn active_connections(&self, service: &str, address: SocketAddrV4) -> Result<u64> {
        self.status()?
            .services
            .iter()
            .find(|s| s.name == service)
            .and_then(|s| s.backends.iter().find(|b| b.address == address.to_string()))
            .map(|b| b.active_connections)
            .with_context(|| format!("service {service} has no backend {address} any more"))
    }
}
