//! Removing idle flows. The agent scans the table for flows idle past their
//! state's timeout and hands them to the kernel's expire program, which checks
//! again and removes each one together with its connection count, atomically
//! with respect to packets arriving at the same moment.
use std::collections::HashMap;

use anyhow::Result;
use lb_common::{flow_timeout, Flow, FlowKey, Timeouts, DIR_FORWARD, DIR_REPLY};

use crate::datapath::Datapath;

/// The clock `bpf_ktime_get_coarse_ns` reads.
pub fn monotonic_coarse_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The key of a forward flow's reply entry.
pub fn reply_key(forward_key: &FlowKey, forward: &Flow) -> FlowKey {
    FlowKey {
        saddr: forward.nat_addr,
        daddr: forward_key.saddr,
        sport: forward.nat_port,
        dport: forward_key.sport,
    }
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct AgingReport {
    pub expired: u32,
    pub orphans_removed: u32,
}

pub fn age(datapath: &mut Datapath, timeouts: &Timeouts) -> Result<AgingReport> {
    let now = monotonic_coarse_ns();
    let entries: HashMap<FlowKey, Flow> = datapath.flows().into_iter().collect();
    let mut idle = Vec::new();
    let mut orphans = Vec::new();
    for (key, flow) in &entries {
        match flow.direction {
            DIR_FORWARD => {
                let replied_at = entries
                    .get(&reply_key(key, flow))
                    .filter(|r| r.direction == DIR_REPLY)
                    .map_or(0, |r| r.last_seen);
                let last = flow.last_seen.max(replied_at);
                if now.saturating_sub(last) >= flow_timeout(timeouts, flow.state, replied_at != 0) {
                    idle.push(*key);
                }
            }
            _ => {
                // Reply entries are created after their forward entry and
                // removed before it, so one without it is left over.
                let forward_key = FlowKey {
                    saddr: key.daddr,
                    daddr: flow.nat_addr,
                    sport: key.dport,
                    dport: flow.nat_port,
                };
                if !entries.contains_key(&forward_key) {
                    orphans.push((*key, forward_key));
                }
            }
        }
    }
    let mut report = AgingReport::default();
    if !idle.is_empty() {
        report.expired = datapath.expire(&idle, timeouts)?;
    }
    for (key, forward_key) in orphans {
        // Look again: the scan is not a snapshot.
        if datapath.flow(&forward_key).is_none() {
            datapath.remove_flow_entry(&key);
            report.orphans_removed += 1;
        }
    }
    Ok(report)
}
