//! `lb trace`: while a `lb trace` keeps asking, the data path logs its
//! decisions on new flows and its drops (filtered, with a per-CPU budget),
//! and the agent keeps the latest lines for the callers to read. A trace no
//! one renews within `LEASE` is switched off, so a `lb trace` killed
//! mid-way leaves the data path quiet.
use std::{
    collections::VecDeque,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::{bail, Result};
use lb_common::{TraceConfig, TRACE_ANY_SERVICE};

use super::Balancer;
use crate::{
    api::TraceLines,
    datapath::{wire_addr, Maps},
};

/// How long a trace stays on after its last request.
pub const LEASE: Duration = Duration::from_secs(5);
/// The most lines per second and CPU a trace may ask for.
pub const MAX_PER_SECOND: u32 = 10_000;
/// Lines kept for readers; older ones are gone.
const KEEP: usize = 10_000;
/// Lines one answer carries at most; the reader asks again for the rest.
const PER_ANSWER: usize = 2_000;

#[derive(Default)]
pub struct Tracer {
    /// What the data path was told, and when a reader last renewed it.
    on: Option<(TraceConfig, Instant)>,
    lines: VecDeque<(u64, String)>,
    last_seq: u64,
}

impl<M: Maps> Balancer<M> {
    /// Switches tracing on (or renews it) with these filters; returns the
    /// lines after sequence number `after`.
    pub fn trace(&mut self, service: Option<&str>, client: Option<Ipv4Addr>, per_second: u32, after: u64) -> Result<TraceLines> {
        if per_second == 0 || per_second > MAX_PER_SECOND {
            bail!("--rate must be between 1 and {MAX_PER_SECOND} lines per second and CPU, not {per_second}");
        }
        let service = match service {
            Some(name) => self.model.service(name)?.id,
            None => TRACE_ANY_SERVICE,
        };
        let config = TraceConfig { on: 1, service, client: client.map_or(0, wire_addr), per_second };
        if self.tracer.on.map(|(c, _)| c) != Some(config) {
            self.datapath.set_trace(config)?;
            tracing::info!(?client, service, per_second, "trace on");
        }
        self.tracer.on = Some((config, Instant::now()));
        self.collect_trace();
        let lines = self.tracer.lines.iter().filter(|(seq, _)| *seq > after).take(PER_ANSWER).cloned().collect();
        Ok(TraceLines { lines, suppressed: self.datapath.trace_suppressed() })
    }

    pub fn stop_trace(&mut self) -> Result<()> {
        if self.tracer.on.is_some() {
            self.datapath.set_trace(TraceConfig::default())?;
            self.collect_trace();
            self.tracer.on = None;
            tracing::info!(suppressed = self.datapath.trace_suppressed(), "trace off");
        }
        Ok(())
    }

    /// From the agent's loop: takes the data path's new lines (which also
    /// go to the agent's log), and ends a trace no reader has renewed.
    pub fn trace_tick(&mut self) {
        let Some((_, renewed)) = self.tracer.on else { return };
        self.collect_trace();
        if renewed.elapsed() > LEASE {
            tracing::info!("no `lb trace` has asked for {LEASE:?}: switching the trace off");
            if let Err(e) = self.stop_trace() {
                tracing::warn!("switching the trace off failed: {e:#}");
            }
        }
    }

    fn collect_trace(&mut self) {
        for line in self.datapath.read_trace() {
            let line = self.with_service_name(line);
            tracing::info!(target: "lb::trace", "{line}");
            self.tracer.last_seq += 1;
            self.tracer.lines.push_back((self.tracer.last_seq, line));
            if self.tracer.lines.len() > KEEP {
                self.tracer.lines.pop_front();
            }
        }
    }

    /// The data path knows services by id; the reader, by name.
    fn with_service_name(&self, line: String) -> String {
        let Some((before, rest)) = line.split_once("(service ") else { return line };
        let Some((id, after)) = rest.split_once(')') else { return line };
        match id.parse::<u32>().ok().and_then(|id| self.model.services.iter().find(|s| s.id == id)) {
            Some(service) => format!("{before}(service {}){after}", service.name),
            None => line,
        }
    }

    pub fn tracing(&self) -> bool {
        self.tracer.on.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config::ServiceConfig, datapath::FakeMaps};

    fn balancer() -> Balancer<FakeMaps> {
        let mut b = Balancer::new(FakeMaps::new(8));
        let service: ServiceConfig =
            toml::from_str("name = 'web'\nvip = '198.18.0.100:80'\n[[backend]]\naddress = '198.19.0.11:80'").unwrap();
        b.add_service(&service).unwrap();
        b
    }

    #[test]
    fn a_trace_filters_by_service_and_client_and_hands_out_each_line_once_per_reader() {
        let mut b = balancer();
        let client: Ipv4Addr = "198.18.0.2".parse().unwrap();
        let got = b.trace(Some("web"), Some(client), 50, 0).unwrap();
        assert!(got.lines.is_empty());
        let id = b.model.service("web").unwrap().id;
        assert_eq!(b.datapath.trace, TraceConfig { on: 1, service: id, client: wire_addr(client), per_second: 50 });
        b.datapath.trace_lines = vec!["one".into(), format!("new flow a -> b (service {id}): backend c")];
        let got = b.trace(Some("web"), Some(client), 50, 0).unwrap();
        let two = "new flow a -> b (service web): backend c".to_string();
        assert_eq!(got.lines, [(1, "one".to_string()), (2, two.clone())]);
        // A reader that has line 1 gets line 2; a second reader from 0 gets both.
        assert_eq!(b.trace(Some("web"), Some(client), 50, 1).unwrap().lines, [(2, two)]);
        assert_eq!(b.trace(Some("web"), Some(client), 50, 0).unwrap().lines.len(), 2);
        b.stop_trace().unwrap();
        assert_eq!(b.datapath.trace.on, 0);
        assert!(!b.tracing());
    }

    #[test]
    fn bad_requests_are_refused_and_change_nothing() {
        let mut b = balancer();
        let writes = b.datapath.writes;
        assert!(format!("{:#}", b.trace(Some("nope"), None, 50, 0).unwrap_err()).contains("nope"));
        assert!(format!("{:#}", b.trace(None, None, 0, 0).unwrap_err()).contains("--rate must be between 1 and 10000"));
        assert_eq!(b.datapath.writes, writes);
        assert_eq!(b.datapath.trace.on, 0);
    }

    #[test]
    fn a_trace_no_one_renews_switches_itself_off() {
        let mut b = balancer();
        b.trace(None, None, 50, 0).unwrap();
        assert_eq!(b.datapath.trace.service, TRACE_ANY_SERVICE);
        b.trace_tick();
        assert!(b.tracing());
        b.tracer.on.as_mut().unwrap().1 -= LEASE + Duration::from_millis(1);
        b.trace_tick();
        assert!(!b.tracing());
        assert_eq!(b.datapath.trace.on, 0);
    }
}
