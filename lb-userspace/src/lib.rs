//! The load balancer's agent, CLI and data-path handle.
pub mod datapath;
