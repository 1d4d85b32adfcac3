//! The loaded XDP program and typed handles on its maps: the kernel's side
//! of `Maps`, plus what only a real program can do (attach, run a packet,
//! expire flows).
use std::{
    net::SocketAddrV4,
    os::fd::{AsFd, AsRawFd},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use aya::{
    maps::{Array, HashMap, IterableMap, MapData, MapInfo, MapType, PerCpuArray, PerCpuValues},
    programs::{
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
        TestRun, TestRunOptions, Xdp, XdpMode,
    },
    Ebpf, EbpfLoader,
};
use lb_common::{
    backend_index, ActiveCounts, BackendOwner, BackendSet, BackendStats, Clock, Counters, ExpireRequest, Flow, FlowKey,
    HalfOpenCounts, Service, ServiceKey, Timeouts, TraceBudget, TraceConfig, COUNTER_COUNT, EXPIRE_BATCH, EXPIRE_IDLE,
    EXPIRE_RESET, HALF_OPEN_ONE, LAYOUT_HASH, MAX_BACKENDS, MAX_SERVICES,
};

use super::{
    batch::{lookup_batch, lookup_batch_call},
    host_socket, service_key, Maps, Pins, XDP_PASS,
};

use crate::config::TimeoutConfig;

pub(super) static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf.o"));

pub struct Datapath {
    ebpf: Ebpf,
    services: HashMap<MapData, ServiceKey, Service>,
    backends: Array<MapData, BackendSet>,
    active: Array<MapData, ActiveCounts>,
    half_open: PerCpuArray<MapData, HalfOpenCounts>,
    flows: HashMap<MapData, FlowKey, Flow>,
    counters: PerCpuArray<MapData, Counters>,
    backend_stats: PerCpuArray<MapData, BackendStats>,
    max_flows: u32,
    max_services: u32,
    clock: Clock,
    /// Entries of each CPU's ring of recently opened flows.
    opened_ring: u32,
    /// CPUs the per-CPU maps hold a value for.
    cpus: u32,
    /// The program's `lb trace` records (aya-log), and the lines read from
    /// them.
    trace_log: Option<aya_log::EbpfLogger<TraceSink>>,
    trace_lines: Arc<Mutex<Vec<String>>>,
}

/// The maps that are pinned — the state a new agent takes over — with the
/// type and the key and value sizes this build reads them with. CLOCK
/// (written at every load), BACKEND_HOPS (a cache) and the ring of recent
/// openings start afresh with each program.
fn pinned_layout() -> [(&'static str, MapType, usize, usize); 9] {
    use std::mem::size_of;
    [
        ("SERVICES", MapType::Hash, size_of::<ServiceKey>(), size_of::<Service>()),
        ("BACKENDS", MapType::Array, size_of::<u32>(), size_of::<BackendSet>()),
        ("ACTIVE", MapType::Array, size_of::<u32>(), size_of::<ActiveCounts>()),
        ("HALF_OPEN", MapType::PerCpuArray, size_of::<u32>(), size_of::<HalfOpenCounts>()),
        ("FLOWS", MapType::Hash, size_of::<FlowKey>(), size_of::<Flow>()),
        ("BACKEND_OWNERS", MapType::Hash, size_of::<ServiceKey>(), size_of::<BackendOwner>()),
        ("COUNTERS", MapType::PerCpuArray, size_of::<u32>(), size_of::<Counters>()),
        ("BACKEND_STATS", MapType::PerCpuArray, size_of::<u32>(), size_of::<BackendStats>()),
        ("LAYOUT", MapType::Array, size_of::<u32>(), size_of::<u64>()),
    ]
}

/// The layout fingerprint in a pinned `LAYOUT` map (0: none written).
fn pinned_layout_hash(path: &std::path::Path) -> Result<u64> {
    let map = MapData::from_pin(path).with_context(|| format!("opening {}", path.display()))?;
    let layout: Array<MapData, u64> = Array::try_from(aya::maps::Map::Array(map))?;
    Ok(layout.get(&0, 0).unwrap_or(0))
}

/// Checks that the maps pinned at `paths` are what this build expects. One
/// that is not was made by a build with another layout whose version was
/// not bumped: reading it would misread every entry, so nothing is taken
/// over and the agent says what to do.
fn check_pinned_layout(paths: &[(&str, PathBuf)]) -> Result<()> {
    for ((name, path), (_, map_type, key, value)) in paths.iter().zip(pinned_layout()) {
        if !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(path).with_context(|| format!("reading the pinned map {}", path.display()))?;
        let found = (info.map_type()?, info.key_size() as usize, info.value_size() as usize);
        let pinned_hash = if *name == "LAYOUT" { pinned_layout_hash(path)? } else { LAYOUT_HASH };
        if pinned_hash != LAYOUT_HASH && pinned_hash != 0 {
            bail!(
                "the data path pinned at {} was made by a build whose map layout differs from this one's \
                 (layout fingerprint {pinned_hash:016x}, this build's {LAYOUT_HASH:016x}): reading it would misread it. \
                 Nothing was taken over or changed. Take the running data path off with `lb shutdown` \
                 (its connections are dropped) or give this agent another agent.pin_dir",
                path.parent().unwrap_or(path).display()
            );
        }
        if found != (map_type, key, value) {
            bail!(
                "the pinned map {} is a {:?} of {}-byte keys and {}-byte values, but this build reads {name} as a \
                 {map_type:?} of {key}-byte keys and {value}-byte values: it was made by a build with another \
                 layout. Nothing was taken over or changed. Take the running data path off with `lb shutdown` \
                 (its connections are dropped) or give this agent another agent.pin_dir",
                path.display(),
                found.0,
                found.1,
                found.2
            );
        }
    }
    Ok(())
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK.
pub(super) fn raise_memlock_limit() {
    let unlimited = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
}

/// Runs `prog` once on `frame` through BPF_PROG_TEST_RUN; the verdict and
/// the frame it left (room for 256 bytes more than came in).
pub(super) fn run_once(prog: &Xdp, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
    let mut output = vec![0u8; frame.len() + 256];
    let result = prog.test_run(TestRunOptions { data_in: Some(frame), data_out: Some(&mut output), ..Default::default() })?;
    output.truncate(result.data_size_out as usize);
    Ok((result.return_value, output))
}

impl Datapath {
    /// Loads the program with room for `max_flows` flows (two table entries
    /// each), with maps of its own. Nothing is attached yet.
    pub fn load(max_flows: u32) -> Result<Self> {
        Self::load_sized(max_flows, MAX_SERVICES)
    }

    /// The same with room for `max_services` services.
    pub fn load_sized(max_flows: u32, max_services: u32) -> Result<Self> {
        Ok(Self::open(max_flows, max_services, None)?.0)
    }

    /// The same with the maps pinned under `pins`, reusing pinned maps that
    /// exist: the connection table, counts and services of the agent before.
    /// Says whether it reused them.
    /// `max_services` sizes the per-service maps, whose per-CPU statistics
    /// take about `max_services` × 15 KiB per CPU.
    pub fn load_pinned(max_flows: u32, max_services: u32, pins: &Pins) -> Result<(Self, bool)> {
        Self::open(max_flows, max_services, Some(pins))
    }

    fn open(max_flows: u32, max_services: u32, pins: Option<&Pins>) -> Result<(Self, bool)> {
        raise_memlock_limit();
        let mut loader = EbpfLoader::new();
        loader.map_max_entries("FLOWS", max_flows.checked_mul(2).context("max_flows too large")?);
        let max_services = max_services.clamp(1, MAX_SERVICES);
        for name in ["SERVICES", "BACKENDS", "ACTIVE", "HALF_OPEN"] {
            loader.map_max_entries(name, max_services);
        }
        for name in ["BACKEND_STATS", "BACKEND_HOPS", "BACKEND_OWNERS"] {
            loader.map_max_entries(name, max_services * MAX_BACKENDS);
        }
        // Each CPU remembers about twice its share of the table's openings:
        // under a flood the oldest are a second or more old when it fills.
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)? as u32;
        let opened_ring = (max_flows.saturating_mul(2) / cpus.max(1)).clamp(4096, max_flows.max(4096));
        loader.map_max_entries("OPENED", opened_ring);
        let mut reused = false;
        let paths: Vec<(&str, PathBuf)> = match pins {
            Some(p) => pinned_layout().iter().map(|(name, ..)| (*name, p.maps().join(name))).collect(),
            None => Vec::new(),
        };
        check_pinned_layout(&paths)?;
        for (name, path) in &paths {
            reused |= path.exists();
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(OBJECT).context("loading the XDP program into the kernel (are you root?)")?;
        for name in ["lb_xdp", "lb_expire", "lb_pass"] {
            let prog: &mut Xdp = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing from the object"))?
                .try_into()?;
            prog.load().with_context(|| format!("the kernel verifier rejected {name}"))?;
        }
        let trace_lines = Arc::new(Mutex::new(Vec::new()));
        let trace_log = match aya_log::EbpfLogger::init_with_logger(&mut ebpf, TraceSink(trace_lines.clone())) {
            Ok(logger) => Some(logger),
            Err(e) => {
                tracing::warn!("`lb trace` will show nothing: the program's log is not readable ({e})");
                None
            }
        };
        let mut take = |name: &str| {
            ebpf.take_map(name).with_context(|| format!("map {name} missing from the object"))
        };
        let flows = take("FLOWS")?;
        // Reused maps keep the sizes they were created with.
        let max_flows = match &flows {
            aya::maps::Map::HashMap(data) => data.info()?.max_entries() / 2,
            _ => max_flows,
        };
        let backends = take("BACKENDS")?;
        let max_services = match &backends {
            aya::maps::Map::Array(data) => data.info()?.max_entries(),
            _ => max_services,
        };
        let mut datapath = Self {
            services: take("SERVICES")?.try_into()?,
            backends: backends.try_into()?,
            active: take("ACTIVE")?.try_into()?,
            half_open: take("HALF_OPEN")?.try_into()?,
            flows: flows.try_into()?,
            counters: take("COUNTERS")?.try_into()?,
            backend_stats: take("BACKEND_STATS")?.try_into()?,
            max_flows,
            max_services,
            clock: Clock::default(),
            opened_ring,
            cpus,
            trace_log,
            trace_lines,
            ebpf,
        };
        datapath.set_clock()?;
        let mut layout: Array<&mut MapData, u64> =
            Array::try_from(datapath.ebpf.map_mut("LAYOUT").context("map LAYOUT missing from the object")?)?;
        layout.set(0, LAYOUT_HASH, 0)?;
        Ok((datapath, reused))
    }

    /// Attaches to `interface` through a link pinned under `pins`. Where one
    /// is pinned already (a previous agent's), this program replaces the one
    /// in it atomically: not a packet goes unhandled. Says whether it took
    /// one over.
    pub fn attach_pinned(&mut self, interface: &str, mode: XdpMode, pins: &Pins) -> Result<bool> {
        let path = pins.link(interface);
        let prog: &mut Xdp = self.ebpf.program_mut("lb_xdp").context("program missing")?.try_into()?;
        if path.exists() {
            let taken = PinnedLink::from_pin(&path)
                .map_err(anyhow::Error::from)
                .and_then(|link| Ok(XdpLink::try_from(FdLink::from(link))?))
                .and_then(|link| Ok(prog.attach_to_link(link)?));
            match taken {
                Ok(_) => return Ok(true),
                Err(e) => {
                    // The interface went away and came back: a new link.
                    tracing::warn!(interface, "the pinned attachment is stale ({e:#}); attaching anew");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        let id = prog.attach(interface, mode)?;
        let link = FdLink::try_from(prog.take_link(id)?)
            .context("this kernel attaches XDP without BPF links; they are needed to outlive the agent")?;
        link.pin(&path).with_context(|| format!("pinning the attachment at {}", path.display()))?;
        Ok(false)
    }

    fn program(&self, name: &str) -> Result<&Xdp> {
        Ok(self.ebpf.program(name).context("program missing")?.try_into()?)
    }

    pub fn flow(&self, key: &FlowKey) -> Option<Flow> {
        self.flows.get(key, 0).ok()
    }

    pub fn remove_flow_entry(&mut self, key: &FlowKey) {
        let _ = self.flows.remove(key);
    }

    /// Asks the kernel to expire these forward flows if they are still idle
    /// by `timeouts` (ns); returns how many it removed.
    pub fn expire(&self, keys: &[FlowKey], timeouts: &Timeouts) -> Result<u32> {
        self.run_expire(keys, &self.clock.timeouts(timeouts), EXPIRE_IDLE)
    }

    /// Ticks and CLOCK_MONOTONIC nanoseconds, read together by the kernel.
    fn read_clock(&self) -> Result<(u64, u64)> {
        let done = self.run_expire_batch(&[], &Timeouts::default(), EXPIRE_IDLE)?;
        Ok((done.now, done.now_ns))
    }

    /// Measures how fast the data path's clock ticks (the kernel's HZ) and
    /// tells the program.
    fn set_clock(&mut self) -> Result<()> {
        const SPAN: Duration = Duration::from_millis(60);
        let (ticks_before, ns_before) = self.read_clock()?;
        std::thread::sleep(SPAN);
        let (ticks_after, ns_after) = self.read_clock()?;
        let measured = (ticks_after - ticks_before) as f64 * 1e9 / (ns_after - ns_before).max(1) as f64;
        // Kernels are built with one of these; over 60 ms the reading is
        // within a tick of it.
        let nearest = [100.0, 250.0, 300.0, 1000.0]
            .into_iter()
            .min_by(|a: &f64, b: &f64| (a - measured).abs().total_cmp(&(b - measured).abs()))
            .unwrap();
        let hz = if (nearest - measured).abs() <= 0.15 * nearest { nearest } else { measured.round().max(1.0) };
        tracing::debug!(measured, hz, "data path clock");
        self.write_clock(Clock::new(hz as u64, &TimeoutConfig::default().to_wire()))
    }

    /// Tells the data path the configured idle timeouts (ns): a SYN that
    /// finds the table full makes room by them (`Clock::evict`).
    pub fn set_timeouts(&mut self, timeouts: &Timeouts) -> Result<()> {
        self.write_clock(Clock::new(self.clock.ticks_per_second, timeouts))
    }

    fn write_clock(&mut self, mut clock: Clock) -> Result<()> {
        clock.opened_ring = self.opened_ring;
        clock.cpus = self.cpus;
        let mut map: Array<&mut MapData, Clock> =
            Array::try_from(self.ebpf.map_mut("CLOCK").context("map CLOCK missing from the object")?)?;
        map.set(0, clock, 0)?;
        self.clock = clock;
        Ok(())
    }

    fn run_expire(&self, keys: &[FlowKey], timeouts: &Timeouts, mode: u32) -> Result<u32> {
        let mut expired = 0;
        for batch in keys.chunks(EXPIRE_BATCH) {
            expired += self.run_expire_batch(batch, timeouts, mode)?.expired;
        }
        Ok(expired)
    }

    fn run_expire_batch(&self, batch: &[FlowKey], timeouts: &Timeouts, mode: u32) -> Result<ExpireRequest> {
        let prog = self.program("lb_expire")?;
        let mut request = ExpireRequest { timeouts: *timeouts, mode, count: batch.len() as u32, ..Default::default() };
        request.keys[..batch.len()].copy_from_slice(batch);
        let input = bytemuck::bytes_of(&request).to_vec();
        let mut output = input.clone();
        let result = prog.test_run(TestRunOptions {
            data_in: Some(&input),
            data_out: Some(&mut output),
            ..Default::default()
        })?;
        if result.return_value != XDP_PASS {
            bail!("the expire program refused its input");
        }
        Ok(bytemuck::pod_read_unaligned(&output[..input.len()]))
    }

    /// Runs the packet program once on `frame`, as if it arrived on the
    /// loopback interface; returns the verdict and the frame it left.
    pub fn run_packet(&self, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
        run_once(self.program("lb_xdp")?, frame)
    }

    /// For benchmarks: runs the packet program (`floor`: the pass-only one)
    /// on `frame` `repeat` times; the verdict and the kernel's own timing per
    /// run in ns. With `repeat` > 1 every run after the first sees the
    /// previous run's output, so rewriting paths must be timed one by one.
    pub fn time_packet(&self, frame: &[u8], repeat: u32, floor: bool) -> Result<(u32, f64)> {
        let prog = self.program(if floor { "lb_pass" } else { "lb_xdp" })?;
        let result = prog.test_run(TestRunOptions { data_in: Some(frame), repeat, ..Default::default() })?;
        Ok((result.return_value, result.duration.as_nanos() as f64))
    }
}

impl Maps for Datapath {
    /// The services and backend sets in the maps, as a previous agent left
    /// them.
    fn pinned_services(&self) -> Vec<(SocketAddrV4, u32, BackendSet)> {
        self.services
            .iter()
            .filter_map(|entry| entry.ok())
            .filter_map(|(key, service)| {
                Some((host_socket(key.addr, key.port), service.id, self.backends.get(&service.id, 0).ok()?))
            })
            .collect()
    }

    fn max_flows(&self) -> u32 {
        self.max_flows
    }

    /// How many services the maps have room for (ids `0..max_services`).
    fn max_services(&self) -> u32 {
        self.max_services
    }

    fn set_service(&mut self, vip: SocketAddrV4, service: &Service) -> Result<()> {
        self.services.insert(service_key(vip), service, 0)?;
        Ok(())
    }

    fn source_address(&self, to: std::net::Ipv4Addr) -> Option<std::net::Ipv4Addr> {
        super::route_source(to)
    }

    fn keep_neighbour_resolved(&mut self, backend: std::net::Ipv4Addr) -> Result<bool> {
        let Some(ifindex) = super::neighbours::on_link_interface(backend) else {
            return Ok(false);
        };
        super::neighbours::keep_resolved(backend, ifindex)?;
        Ok(true)
    }

    fn remove_service(&mut self, vip: SocketAddrV4) -> Result<()> {
        self.services.remove(&service_key(vip))?;
        Ok(())
    }

    fn set_backends(&mut self, service: u32, set: &BackendSet) -> Result<()> {
        self.backends.set(service, set, 0)?;
        Ok(())
    }

    /// The established counts, with every CPU's half-open ones added in.
    fn active_counts(&self, service: u32) -> Result<ActiveCounts> {
        let mut counts = self.active.get(&service, 0)?;
        for cpu in self.half_open.get(&service, 0)?.iter() {
            for (count, half_open) in counts.active.iter_mut().zip(cpu.count) {
                *count = count.wrapping_add(HALF_OPEN_ONE * half_open as u64);
            }
        }
        Ok(counts)
    }

    /// Slots `0..slots` of a service, summed over CPUs, read with one
    /// system call (BPF_MAP_LOOKUP_BATCH) rather than one per slot: the
    /// agent reads them every tick.
    fn service_backend_stats(&self, service: u32, slots: usize) -> Result<Vec<BackendStats>> {
        let slots = slots.min(MAX_BACKENDS as usize);
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        let fd = self.backend_stats.map().fd().as_fd().as_raw_fd();
        let mut keys = vec![0u32; slots];
        let mut values = vec![BackendStats::default(); slots * cpus];
        let first = backend_index(service, 0);
        // The token is the key before the first one read.
        let token = first.checked_sub(1);
        let read = match lookup_batch_call(fd, token, &mut keys, &mut values, cpus) {
            Ok((n, _, _)) => n,
            Err(_) => 0,
        };
        if read < slots || keys.first().is_some_and(|k| *k != first) {
            // Kernels before 5.6 have no batch operations.
            return (0..slots as u32)
                .map(|slot| {
                    let values = self.backend_stats.get(&backend_index(service, slot), 0)?;
                    Ok(values.iter().fold(BackendStats::default(), |total, v| total.add(v)))
                })
                .collect();
        }
        Ok(values.chunks(cpus).map(|per_cpu| per_cpu.iter().fold(BackendStats::default(), |t, v| t.add(v))).collect())
    }

    /// A slot that gets a new backend starts its statistics from zero.
    fn clear_backend_stats(&mut self, service: u32, slot: u32) -> Result<()> {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        let zeros = PerCpuValues::try_from(vec![BackendStats::default(); cpus])?;
        self.backend_stats.set(backend_index(service, slot), zeros, 0)?;
        Ok(())
    }

    /// Summed over CPUs.
    fn counters(&self) -> Result<[u64; COUNTER_COUNT]> {
        let mut total = [0u64; COUNTER_COUNT];
        for cpu in self.counters.get(&0, 0)?.iter() {
            for (t, v) in total.iter_mut().zip(cpu.values) {
                *t += v;
            }
        }
        Ok(total)
    }

    /// Every entry of the connection table, both directions. Read in batches
    /// of thousands of entries per system call (BPF_MAP_LOOKUP_BATCH), not
    /// two calls per entry: a million-flow table is read in a fraction of a
    /// second.
    fn flows(&self) -> Vec<(FlowKey, Flow)> {
        match lookup_batch(self.flows.map().fd().as_fd().as_raw_fd()) {
            Ok(entries) => entries,
            // Kernels before 5.6 have no batch operations.
            Err(_) => self.flows.iter().filter_map(|entry| entry.ok()).collect(),
        }
    }

    /// Closes these live forward flows now: their counts are released and
    /// their clients' next packets answered with an RST. Returns how many
    /// were still live.
    fn reset_flows(&self, keys: &[FlowKey]) -> Result<u32> {
        self.run_expire(keys, &Timeouts::default(), EXPIRE_RESET)
    }

    /// The data path's clock (see `Clock`).
    fn clock(&self) -> Clock {
        self.clock
    }

    /// The data path's clock now, in ticks.
    fn now_ticks(&self) -> Result<u64> {
        Ok(self.read_clock()?.0)
    }

    fn set_trace(&mut self, config: TraceConfig) -> Result<()> {
        let mut map: Array<&mut MapData, TraceConfig> =
            Array::try_from(self.ebpf.map_mut("TRACE").context("map TRACE missing from the object")?)?;
        map.set(0, config, 0)?;
        Ok(())
    }

    fn read_trace(&mut self) -> Vec<String> {
        if let Some(logger) = &mut self.trace_log {
            logger.flush();
        }
        std::mem::take(&mut *self.trace_lines.lock().unwrap())
    }

    fn trace_suppressed(&self) -> u64 {
        let Some(map) = self.ebpf.map("TRACE_BUDGET") else { return 0 };
        let Ok(budget) = PerCpuArray::<&MapData, TraceBudget>::try_from(map) else { return 0 };
        budget.get(&0, 0).map_or(0, |per_cpu| per_cpu.iter().map(|b| b.suppressed as u64).sum())
    }
}

/// Where the program's aya-log records go: lines for the agent to log and
/// hand to `lb trace`.
struct TraceSink(Arc<Mutex<Vec<String>>>);

impl log::Log for TraceSink {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }

    fn log(&self, record: &log::Record) {
        let line = record.args().to_string();
        let mut lines = self.0.lock().unwrap();
        // Bounded, should no one read them.
        if lines.len() < 100_000 {
            lines.push(line);
        }
    }

    fn flush(&self) {}
}
