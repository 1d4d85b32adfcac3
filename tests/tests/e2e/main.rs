//! End to end: real connections from client namespaces through the agent
//! and its XDP program to real servers, one module per feature; the lab and
//! its start-up in `lb_tests::lab`.
mod aging;
mod balancing;
mod cli;
mod dashboard;
mod dsr;
mod failover;
mod faults;
mod forwarding;
mod fullnat;
mod hostile;
mod import;
mod metrics;
mod path_mtu;
mod reload;
mod restart;
mod status_page;
mod trace;
