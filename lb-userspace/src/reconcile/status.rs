//! What the agent reports: the model joined with the data path's counts,
//! statistics and flows, as the control protocol's status types.
use std::{collections::HashMap, time::Instant};

use anyhow::Result;
use lb_common::{
    established_count, flow_closed, half_open_count, Counter, DIR_FORWARD, FLOW_BACKEND_FIN, FLOW_CLIENT_FIN,
    FLOW_ESTABLISHED,
};

use super::Balancer;
use crate::{
    api::{BackendStatus, FlowState, FlowStatus, FlowTableStatus, ServiceStatus, Status},
    datapath::{host_socket, Maps, TableCounts},
};

/// Tables up to this many flows are counted afresh for each status.
const COUNT_FLOWS_UP_TO: u64 = 100_000;

impl<M: Maps> Balancer<M> {
    pub fn status(&self) -> Result<Status> {
        let now = Instant::now();
        // Reading a big table takes a while (about 0.7 s for a million
        // flows): past this size the status gives the last aging scan's
        // counts.
        let table = if self.counted_by_aging && self.flows_seen > COUNT_FLOWS_UP_TO {
            TableCounts { flows: self.flows_seen, snat_ports: self.snat_ports_seen.clone() }
        } else {
            self.datapath.table_counts()
        };
        let mut services = Vec::new();
        for s in &self.model.services {
            let counts = self.datapath.active_counts(s.id)?;
            let all_stats = self.datapath.service_backend_stats(s.id, s.slots.len())?;
            let mut backends = Vec::new();
            for (i, m) in s.members() {
                let stats = &all_stats[i];
                backends.push(BackendStatus {
                    address: m.config.address.to_string(),
                    weight: m.config.weight,
                    state: m.state(now),
                    reason: m.reason.clone(),
                    since: m.since.duration_since(std::time::SystemTime::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64()),
                    eligible: m.eligible,
                    backup: m.config.backup,
                    max_conns: m.config.max_conns,
                    slow_start_progress: m.ramp(now),
                    active_connections: established_count(counts.active[i]),
                    half_open_connections: half_open_count(counts.active[i]),
                    total_connections: stats.new_flows,
                    connections_per_second: m.connections_per_second,
                    bytes_per_second: m.bytes_per_second,
                    packets_in: stats.fwd_packets,
                    bytes_in: stats.fwd_bytes,
                    packets_out: stats.reply_packets,
                    bytes_out: stats.reply_bytes,
                    refused: stats.refused,
                    unanswered: stats.unanswered,
                    snat_ports_in_use: (s.mode == crate::config::Mode::FullNat)
                        .then(|| table.snat_ports.get(&(s.id, i as u32)).copied().unwrap_or(0)),
                    last_check: m.health.last_check.clone(),
                });
            }
            services.push(ServiceStatus {
                name: s.name.clone(),
                vip: s.vip.to_string(),
                scheduler: s.scheduler,
                mode: s.mode,
                tunnel: s.tunnel,
                on_backend_down: s.on_down,
                health_check: s.health.clone(),
                active_connections: backends.iter().map(|b| b.active_connections).sum(),
                half_open_connections: backends.iter().map(|b| b.half_open_connections).sum(),
                total_connections: backends.iter().map(|b| b.total_connections).sum(),
                backends,
            });
        }
        let counters = self.datapath.counters()?;
        let flows = table.flows;
        Ok(Status {
            services,
            flow_table: FlowTableStatus { flows, capacity: self.datapath.max_flows() as u64 },
            counters: Counter::ALL.iter().zip(counters).map(|(c, v)| (c.name().to_string(), v)).collect(),
        })
    }

    pub fn conntrack(&self) -> Vec<FlowStatus> {
        let clock = self.datapath.clock();
        let now = self.datapath.now_ticks().unwrap_or(0);
        let entries: HashMap<_, _> = self.datapath.flows().into_iter().collect();
        let mut flows = Vec::new();
        for (key, flow) in &entries {
            if flow.direction != DIR_FORWARD {
                continue;
            }
            let replied_at = entries.get(&key.reply(flow)).map_or(0, |r| r.last_seen);
            let service =
                self.model.service_by_id(flow.service as u32).map_or("(removed)".to_string(), |s| s.name.clone());
            flows.push(FlowStatus {
                service,
                client: host_socket(key.saddr, key.sport).to_string(),
                vip: host_socket(key.daddr, key.dport).to_string(),
                balancer: (flow.mode == lb_common::MODE_FULLNAT)
                    .then(|| host_socket(flow.peer_addr, flow.peer_port).to_string()),
                backend: host_socket(flow.nat_addr, flow.nat_port).to_string(),
                state: flow_state(flow.state, replied_at != 0),
                idle_seconds: clock.seconds(now.saturating_sub(flow.last_seen.max(replied_at))),
            });
        }
        flows.sort_by(|a, b| (&a.service, &a.client).cmp(&(&b.service, &b.client)));
        flows
    }
}

fn flow_state(state: u32, replied: bool) -> FlowState {
    if flow_closed(state) {
        FlowState::Closed
    } else if state & (FLOW_CLIENT_FIN | FLOW_BACKEND_FIN) != 0 {
        FlowState::Closing
    } else if state & FLOW_ESTABLISHED != 0 {
        FlowState::Established
    } else if replied {
        FlowState::SynReceived
    } else {
        FlowState::SynSent
    }
}
