//! The load balancer's agent, CLI and data-path handle.
pub mod agent;
pub mod aging;
pub mod balancer;
pub mod cli;
pub mod config;
pub mod control;
pub mod datapath;
pub mod health;
pub mod metrics;
