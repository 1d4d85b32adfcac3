//! Other balancers' configurations as an `lb.toml`: `lb import nginx`.
pub mod nginx;
