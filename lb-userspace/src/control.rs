//! The agent's control socket: one JSON request per line, one JSON answer.
use std::{
    io::{BufRead, BufReader, Write},
    net::SocketAddrV4,
    os::unix::net::UnixStream,
    path::Path,
};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::{
    balancer::{Admin, Balancer},
    config::{BackendConfig, ServiceConfig},
};

pub const DEFAULT_SOCKET: &str = "/run/lb/lb.sock";

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Request {
    Status,
    Conntrack,
    ServiceAdd { service: ServiceConfig },
    ServiceRemove { name: String },
    BackendAdd { service: String, backend: BackendConfig },
    BackendRemove { service: String, address: SocketAddrV4 },
    BackendWeight { service: String, address: SocketAddrV4, weight: u32 },
    BackendAdmin { service: String, address: SocketAddrV4, admin: Admin },
    /// Re-read the config file and apply the difference.
    Reload,
    /// Take the data path off and stop the agent.
    Shutdown,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub result: serde_json::Value,
}

/// Carries out one request. A request that fails changes nothing.
pub fn handle(balancer: &mut Balancer, request: Request) -> Response {
    let result = (|| -> Result<serde_json::Value> {
        Ok(match request {
            Request::Status => serde_json::to_value(balancer.status()?)?,
            Request::Conntrack => serde_json::to_value(balancer.conntrack())?,
            Request::ServiceAdd { service } => {
                balancer.add_service(&service)?;
                tracing::info!(service = %service.name, vip = %service.vip, "service added");
                serde_json::Value::Null
            }
            Request::ServiceRemove { name } => {
                balancer.remove_service(&name)?;
                tracing::info!(service = %name, "service removed");
                serde_json::Value::Null
            }
            Request::BackendAdd { service, backend } => {
                balancer.add_backend(&service, &backend)?;
                tracing::info!(%service, backend = %backend.address, weight = backend.weight, "backend added");
                serde_json::Value::Null
            }
            Request::BackendRemove { service, address } => {
                balancer.remove_backend(&service, address)?;
                tracing::info!(%service, backend = %address, "backend removed");
                serde_json::Value::Null
            }
            Request::BackendWeight { service, address, weight } => {
                balancer.set_weight(&service, address, weight)?;
                tracing::info!(%service, backend = %address, weight, "weight changed");
                serde_json::Value::Null
            }
            Request::Reload | Request::Shutdown => anyhow::bail!("only the agent's loop handles this request"),
            Request::BackendAdmin { service, address, admin } => {
                balancer.set_admin(&service, address, admin)?;
                tracing::info!(%service, backend = %address, ?admin, "backend admin state changed");
                serde_json::to_value(balancer.active_of(&service, address))?
            }
        })
    })();
    match result {
        Ok(result) => Response { ok: true, error: None, result },
        Err(e) => Response { ok: false, error: Some(format!("{e:#}")), result: serde_json::Value::Null },
    }
}

/// Sends one request to a running agent and returns its result.
pub fn call(socket: &Path, request: &Request) -> Result<serde_json::Value> {
    let mut stream = UnixStream::connect(socket).with_context(|| {
        format!(
            "cannot reach the agent at {} (is `lb agent` running? is --socket right? are you root?)",
            socket.display()
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
