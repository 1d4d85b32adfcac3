//! The load balancer's agent, CLI and data-path handle, in layers:
//!
//! - `api`: the control protocol (requests, responses, status types);
//!   `client`: typed calls to a running agent.
//! - `config`: the config file.
//! - `model`: services, backends, placement, eligibility, reload plans —
//!   pure, unit-tested without a kernel.
//! - `reconcile`: turns the model into map writes through `datapath::Maps`.
//! - `datapath`: the loaded program and its pinned maps (and a fake).
//! - `runtime`: the agent's event loop, control server, aging, health
//!   checks and metrics.
//! - `cli`: the command line, which speaks only `api`.
/// This build's version, as `lb --version` and the agent's log say it.
#[cfg(not(feature = "next-build"))]
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
#[cfg(feature = "next-build")]
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), "+next");

pub mod api;
pub mod cli;
pub mod client;
pub mod config;
pub mod import;
pub mod datapath;
#[cfg(test)]
mod fixtures;
pub mod model;
pub mod reconcile;
pub mod runtime;
