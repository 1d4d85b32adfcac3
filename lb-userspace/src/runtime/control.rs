//! The agent's control socket: one JSON request per line, one JSON answer.
//! Requests that change the model are carried out under the balancer's
//! lock; reload and shutdown go to the agent's loop.
use std::{
    os::unix::fs::PermissionsExt,
    path::Path,
    sync::{Arc, Mutex},
};

use anyhow::{bail, Context, Result};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};

use super::state::Persist;
use crate::{
    api::{Request, Response},
    reconcile::Balancer,
};

/// What a control connection asks of the agent's loop.
pub enum LoopRequest {
    Reload(oneshot::Sender<Response>),
    /// The receiver hears when the answer has been written, so the agent
    /// does not exit before its caller knows.
    Shutdown(oneshot::Sender<Response>, oneshot::Receiver<()>),
}

/// The socket is created by root and usable only by root.
pub fn bind(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        bail!("another agent is already serving {}", path.display());
    }
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Reads one request from `stream` and writes its answer.
pub async fn answer(
    stream: UnixStream,
    balancer: Arc<Mutex<Balancer>>,
    loop_tx: mpsc::Sender<LoopRequest>,
    persist: &Persist,
) -> Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read).read_line(&mut line).await?;
    let mut written = None;
    let response = match serde_json::from_str::<Request>(&line) {
        Ok(Request::Reload) => {
            let (reply, answer) = oneshot::channel();
            loop_tx.send(LoopRequest::Reload(reply)).await?;
            answer.await?
        }
        Ok(Request::Shutdown) => {
            let (reply, answer) = oneshot::channel();
            let (written_tx, written_rx) = oneshot::channel();
            loop_tx.send(LoopRequest::Shutdown(reply, written_rx)).await?;
            written = Some(written_tx);
            answer.await?
        }
        Ok(request) => {
            let changes = request.changes_state();
            let mut b = balancer.lock().unwrap();
            let response = handle(&mut b, request);
            if changes && response.ok {
                persist.save(&b.model);
            }
            response
        }
        Err(e) => Response::error(format!("malformed request: {e}")),
    };
    let mut out = serde_json::to_string(&response)?;
    out.push('\n');
    write.write_all(out.as_bytes()).await?;
    if let Some(written) = written {
        let _ = written.send(());
    }
    Ok(())
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
            Request::BackendAdmin { service, address, admin } => {
                balancer.set_admin(&service, address, admin)?;
                tracing::info!(%service, backend = %address, ?admin, "backend admin state changed");
                serde_json::to_value(balancer.active_of(&service, address))?
            }
            Request::Trace { service, client, per_second, after } => {
                serde_json::to_value(balancer.trace(service.as_deref(), client, per_second, after)?)?
            }
            Request::TraceStop => {
                balancer.stop_trace()?;
                serde_json::Value::Null
            }
            Request::Reload | Request::Shutdown => bail!("only the agent's loop handles this request"),
        })
    })();
    Response::from_result(result)
}
