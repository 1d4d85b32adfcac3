//! Shared helpers for the load balancer's tests: network namespaces that
//! clean up after themselves, crafted packets, and real TCP servers and
//! clients running inside namespaces.
pub mod inject;
pub mod lab;
pub mod netns;
pub mod packet;
pub mod routed;
pub mod servers;

use std::sync::{Mutex, MutexGuard};

/// Tests that attach programs or create namespaces share kernel state; they
/// take this lock so they run one at a time even within one test binary.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}
