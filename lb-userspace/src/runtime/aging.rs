//! Removing idle flows. The agent scans the table for flows idle past their
//! state's timeout and hands them to the kernel's expire program, which checks
//! again and removes each one together with its connection count, atomically
//! with respect to packets arriving at the same moment.
use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use anyhow::Result;
use lb_common::{
    flow_last_active, flow_timeout, Counter, Flow, FlowKey, Timeouts, DIR_FORWARD, DIR_HOLD, DIR_REPLY, FLOW_RESET,
    MODE_FULLNAT,
};

use crate::{
    datapath::{Datapath, Maps, TableCounts},
    reconcile::Balancer,
};

/// Above this share of the connection table in use while SYNs find no room
/// in it, or while full-NAT SYNs find no free source port, half-open flows
/// are aged after `PRESSURE_SYN_TIMEOUT_NS`.
const PRESSURE: f64 = 0.9;
const PRESSURE_SYN_TIMEOUT_NS: u64 = 2_000_000_000;
/// How long after a full-NAT SYN last found no free port the ports still
/// count as scarce: longer than a client's SYN retries take to give up on
/// a connection's first seconds.
const PORT_PRESSURE_HOLD: Duration = Duration::from_secs(10);
/// Every this many aging scans, also look for leftover reply entries.
const ORPHAN_SCAN_EVERY: u64 = 30;

/// The aging loop's state: when the next scan may run, and the pressure
/// warning's rate limit.
pub struct Aging {
    timeouts: Timeouts,
    next_scan: Instant,
    scans: u64,
    pressure_warned: Option<Instant>,
    /// `table_full` at the last scan.
    table_full: u64,
    /// `snat_ports_exhausted` at the last scan, and when it last rose.
    ports_exhausted: u64,
    ports_scarce_at: Option<Instant>,
}

impl Aging {
    /// `timeouts` in nanoseconds.
    pub fn new(timeouts: Timeouts) -> Self {
        Self {
            timeouts,
            next_scan: Instant::now(),
            scans: 0,
            pressure_warned: None,
            table_full: 0,
            ports_exhausted: 0,
            ports_scarce_at: None,
        }
    }

    /// One aging tick: a scan unless the last one was too recent, then
    /// reclaiming the slots whose flows have gone.
    pub fn tick(&mut self, b: &mut Balancer<Datapath>) {
        if Instant::now() < self.next_scan {
            return;
        }
        let occupancy = b.flows_seen as f64 / b.datapath.max_flows() as f64;
        let counters = b.datapath.counters().ok();
        let counter = |c: Counter| counters.map_or(0, |all| all[c as usize]);
        // A full table makes room itself for each SYN, from the oldest dead
        // flows the CPUs opened. The agent steps in only where that fails
        // (every flow alive, or too young to go): aging a run of the oldest
        // flows at once, where the data path was taking them one by one,
        // leaves it a run of gone entries to pass before its next victim.
        // (A new agent's first scan may see an old rise once: harmless.)
        let full_table = counter(Counter::TableFull);
        let table_short = occupancy > PRESSURE && full_table > self.table_full;
        self.table_full = full_table;
        // Full NAT's source ports run out before the table does: a flood
        // from random sources takes one a flow. Its flows must not hold them
        // for the whole `syn` timeout, or no real client gets one meanwhile.
        // Held for a while after the last SYN that found none: between two
        // scans the only SYNs may be a real client's retries, seconds apart.
        let exhausted = counter(Counter::SnatPortsExhausted);
        if exhausted > self.ports_exhausted {
            self.ports_scarce_at = Some(Instant::now());
        }
        self.ports_exhausted = exhausted;
        let ports_scarce = self.ports_scarce_at.is_some_and(|at| at.elapsed() < PORT_PRESSURE_HOLD);
        let mut t = self.timeouts;
        if table_short || ports_scarce {
            // Half-open flows (a SYN flood, say) go first, so that
            // established ones never have to make room.
            t.syn = t.syn.min(PRESSURE_SYN_TIMEOUT_NS);
            if self.pressure_warned.is_none_or(|at| at.elapsed() > Duration::from_secs(60)) {
                tracing::warn!(
                    occupancy = format!("{:.0}%", occupancy * 100.0),
                    ports_scarce,
                    "connection table or full-NAT source ports under pressure: half-open flows now expire \
                     after 2 s; new flows are dropped (and counted as table_full or snat_ports_exhausted) \
                     when none is left"
                );
                self.pressure_warned = Some(Instant::now());
            }
        }
        self.scans += 1;
        let started = thread_cpu_time();
        match age(&mut b.datapath, &t, self.scans.is_multiple_of(ORPHAN_SCAN_EVERY)) {
            Ok(r) => {
                b.expired_total += r.expired as u64;
                b.flows_seen = r.flows;
                b.snat_ports_seen = r.snat_ports;
                if r.expired > 0 || r.orphans_removed > 0 || r.holds_released > 0 {
                    tracing::debug!(
                        expired = r.expired,
                        orphans = r.orphans_removed,
                        holds = r.holds_released,
                        "aged flows"
                    );
                }
            }
            Err(e) => tracing::warn!("aging the connection table failed: {e:#}"),
        }
        // A big table takes a while to read: keep aging to about a tenth of
        // a CPU. The CPU time the scan took, not the wall-clock time: a flood
        // that starves the agent of CPU must not space its scans out, when
        // aging the flood's flows is what lets real clients back in.
        self.next_scan = Instant::now() + thread_cpu_time().saturating_sub(started) * 9;
        if let Err(e) = b.reclaim() {
            tracing::warn!("reclaiming backend slots failed: {e:#}");
        }
    }
}

/// The CPU time this thread has used, in the kernel too (reading the table
/// is mostly system calls).
fn thread_cpu_time() -> Duration {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // Cannot fail: the clock exists on every Linux and the pointer is valid.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct AgingReport {
    /// Flows in the table when it was read.
    pub flows: u64,
    /// Full-NAT source ports each (service, slot) held when it was read.
    pub snat_ports: HashMap<(u32, u32), u64>,
    pub expired: u32,
    pub orphans_removed: u32,
    /// Full-NAT ports held for a backend's TIME_WAIT, let go.
    pub holds_released: u32,
}

/// One aging scan. `look_for_orphans` also removes reply entries whose
/// forward entry is gone (a safety net that costs a set of every flow, so
/// the agent does it now and then).
/// `timeouts` are in nanoseconds.
pub fn age(datapath: &mut Datapath, timeouts: &Timeouts, look_for_orphans: bool) -> Result<AgingReport> {
    let now = datapath.now_ticks()?;
    let ticks = datapath.clock().timeouts(timeouts);
    let entries = datapath.flows();
    let counted = TableCounts::of(&entries);
    let mut report = AgingReport { flows: counted.flows, snat_ports: counted.snat_ports, ..Default::default() };

    // A reply entry can only make a flow busier, so a flow whose own last
    // packet is recent enough is not idle whatever its reply says.
    let mut candidates: HashMap<FlowKey, (FlowKey, &Flow, u64)> = HashMap::new();
    for (key, flow) in entries.iter().filter(|(_, f)| f.direction == DIR_FORWARD) {
        let idle = now.saturating_sub(flow.last_seen);
        if idle >= flow_timeout(&ticks, flow.state, flow.mode) {
            candidates.insert(key.reply(flow), (*key, flow, 0));
        }
    }
    if !candidates.is_empty() {
        for (key, flow) in entries.iter().filter(|(_, f)| f.direction == DIR_REPLY) {
            // Only its own reply: a full-NAT port may have gone to a new flow.
            if let Some(candidate) = candidates.get_mut(key).filter(|c| c.0 == key.forward(flow)) {
                candidate.2 = flow.last_seen;
            }
        }
        let idle: Vec<FlowKey> = candidates
            .values()
            .filter(|(_, flow, replied_at)| {
                let last = flow_last_active(flow.state, flow.last_seen, *replied_at);
                now.saturating_sub(last) >= flow_timeout(&ticks, flow.state, flow.mode)
            })
            .map(|(key, _, _)| *key)
            .collect();
        if !idle.is_empty() {
            report.expired = datapath.expire(&idle, timeouts)?;
        }
    }

    // A held port goes when a closed full-NAT flow's would have, through the
    // kernel too: a SYN may be taking it over at that moment.
    let hold = flow_timeout(&ticks, FLOW_RESET, MODE_FULLNAT);
    let held_out: Vec<FlowKey> = entries
        .iter()
        .filter(|(_, f)| f.direction == DIR_HOLD && now.saturating_sub(f.last_seen) >= hold)
        .map(|(key, _)| *key)
        .collect();
    if !held_out.is_empty() {
        report.holds_released = datapath.expire(&held_out, timeouts)?;
    }

    if look_for_orphans {
        let forwards: HashSet<FlowKey> =
            entries.iter().filter(|(_, f)| f.direction == DIR_FORWARD).map(|(k, _)| *k).collect();
        for (key, flow) in entries.iter().filter(|(_, f)| f.direction == DIR_REPLY) {
            let forward = key.forward(flow);
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
