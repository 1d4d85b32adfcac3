//! Removing idle flows. The agent scans the table for flows idle past their
//! state's timeout and hands them to the kernel's expire program, which checks
//! again and removes each one together with its connection count, atomically
//! with respect to packets arriving at the same moment.
use std::collections::{HashMap, HashSet};

use anyhow::Result;
use lb_common::{flow_timeout, Flow, FlowKey, Timeouts, DIR_FORWARD, DIR_REPLY};

use crate::datapath::Datapath;

/// The key of a forward flow's reply entry.
pub fn reply_key(forward_key: &FlowKey, forward: &Flow) -> FlowKey {
    FlowKey {
        saddr: forward.nat_addr,
        daddr: forward_key.saddr,
        sport: forward.nat_port,
        dport: forward_key.sport,
    }
}

/// The key of a reply entry's forward entry.
fn forward_key(reply_key: &FlowKey, reply: &Flow) -> FlowKey {
    FlowKey { saddr: reply_key.daddr, daddr: reply.nat_addr, sport: reply_key.dport, dport: reply.nat_port }
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct AgingReport {
    /// Flows in the table when it was read.
    pub flows: u64,
    pub expired: u32,
    pub orphans_removed: u32,
}

/// One aging scan. `look_for_orphans` also removes reply entries whose
/// forward entry is gone (a safety net that costs a set of every flow, so
/// the agent does it now and then).
/// `timeouts` are in nanoseconds.
pub fn age(datapath: &mut Datapath, timeouts: &Timeouts, look_for_orphans: bool) -> Result<AgingReport> {
    let now = datapath.now_ticks()?;
    let ticks = datapath.clock().timeouts(timeouts);
    let entries = datapath.flows();
    let mut report = AgingReport::default();

    // A reply entry can only make a flow busier, so a flow whose own last
    // packet is recent enough is not idle whatever its reply says.
    let mut candidates: HashMap<FlowKey, (FlowKey, &Flow, u64)> = HashMap::new();
    for (key, flow) in entries.iter().filter(|(_, f)| f.direction == DIR_FORWARD) {
        report.flows += 1;
        let idle = now.saturating_sub(flow.last_seen);
        let shortest = flow_timeout(&ticks, flow.state, false).min(flow_timeout(&ticks, flow.state, true));
        if idle >= shortest {
            candidates.insert(reply_key(key, flow), (*key, flow, 0));
        }
    }
    if !candidates.is_empty() {
        for (key, flow) in entries.iter().filter(|(_, f)| f.direction == DIR_REPLY) {
            if let Some(candidate) = candidates.get_mut(key) {
                candidate.2 = flow.last_seen;
            }
        }
        let idle: Vec<FlowKey> = candidates
            .values()
            .filter(|(_, flow, replied_at)| {
                let last = flow.last_seen.max(*replied_at);
                now.saturating_sub(last) >= flow_timeout(&ticks, flow.state, *replied_at != 0)
            })
            .map(|(key, _, _)| *key)
            .collect();
        if !idle.is_empty() {
            report.expired = datapath.expire(&idle, timeouts)?;
        }
    }

    if look_for_orphans {
        let forwards: HashSet<FlowKey> =
            entries.iter().filter(|(_, f)| f.direction == DIR_FORWARD).map(|(k, _)| *k).collect();
        for (key, flow) in entries.iter().filter(|(_, f)| f.direction == DIR_REPLY) {
            let forward = forward_key(key, flow);
            // Reply entries are created after their forward entry and removed
            // before it, so one without it is left over. Look again: the read
            // is not a snapshot.
            if !forwards.contains(&forward) && datapath.flow(&forward).is_none() {
                datapath.remove_flow_entry(key);
                report.orphans_removed += 1;
            }
        }
    }
    Ok(report)
}
