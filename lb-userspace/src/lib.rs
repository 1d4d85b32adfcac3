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
pub mod api;
pub mod cli;
pub mod client;
pub mod config;
pub mod datapath;
#[cfg(test)]
mod fixtures;
pub mod model;
pub mod reconcile;
pub mod runtime;
