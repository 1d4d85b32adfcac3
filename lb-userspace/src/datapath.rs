//! The loaded XDP program and typed handles on its maps. Everything the agent
//! and the tests do to the data path goes through here.
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use aya::{
    maps::{Array, HashMap, IterableMap, MapData, PerCpuArray, PerCpuValues},
    programs::{
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
        TestRun, TestRunOptions, Xdp, XdpMode,
    },
    Ebpf, EbpfLoader,
};
use lb_common::{
    ActiveCounts, BackendSet, BackendStats, Clock, Counters, ExpireRequest, Flow, FlowKey, Service,
    ServiceKey, Timeouts, COUNTER_COUNT, EXPIRE_BATCH, EXPIRE_IDLE, EXPIRE_RESET, MAX_BACKENDS, MAX_SERVICES,
    PROTO_TCP,
};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf.o"));

pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

pub fn service_key(vip: SocketAddrV4) -> ServiceKey {
    ServiceKey { addr: wire_addr(*vip.ip()), port: vip.port().to_be(), proto: PROTO_TCP, _pad: 0 }
}

/// An address as the data path stores it: in network byte order.
pub fn wire_addr(addr: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(addr.octets())
}

pub fn host_addr(wire: u32) -> Ipv4Addr {
    Ipv4Addr::from(wire.to_ne_bytes())
}

pub fn host_socket(wire_addr: u32, wire_port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(host_addr(wire_addr), u16::from_be(wire_port))
}

pub struct Datapath {
    ebpf: Ebpf,
    services: HashMap<MapData, ServiceKey, Service>,
    backends: Array<MapData, BackendSet>,
    active: Array<MapData, ActiveCounts>,
    flows: HashMap<MapData, FlowKey, Flow>,
    counters: PerCpuArray<MapData, Counters>,
    backend_stats: PerCpuArray<MapData, BackendStats>,
    max_flows: u32,
    max_services: u32,
    clock: Clock,
}

/// Bump when a map's key or value layout changes: pinned maps of another
/// layout are then left alone (an upgrade across it starts with an empty
/// connection table) instead of being misread.
const LAYOUT_VERSION: u32 = 3;
/// The maps that are pinned: the state a new agent takes over. CLOCK (written
/// at every load) and BACKEND_HOPS (a cache) start afresh with each program.
const MAP_NAMES: [&str; 6] = ["SERVICES", "BACKENDS", "ACTIVE", "FLOWS", "COUNTERS", "BACKEND_STATS"];
const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// Where the data path's maps and links are pinned, so that it keeps
/// forwarding while no agent runs and a new agent takes it over.
#[derive(Debug, Clone)]
pub struct Pins {
    dir: PathBuf,
}

impl Pins {
    pub fn new(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
        let path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())?;
        if unsafe { libc::statfs(path.as_ptr(), &mut fs) } != 0 || fs.f_type as i64 != BPF_FS_MAGIC {
            bail!(
                "{} is not on a BPF filesystem: mount one (`mount -t bpf bpf /sys/fs/bpf`) or set agent.pin_dir",
                dir.display()
            );
        }
        for sub in [Self { dir: dir.into() }.maps(), dir.join("links")] {
            std::fs::create_dir_all(&sub).with_context(|| format!("creating {}", sub.display()))?;
        }
        Ok(Self { dir: dir.into() })
    }

    fn maps(&self) -> PathBuf {
        self.dir.join(format!("maps-v{LAYOUT_VERSION}"))
    }

    fn link(&self, interface: &str) -> PathBuf {
        self.dir.join("links").join(interface)
    }

    /// Interfaces with a pinned attachment.
    pub fn linked_interfaces(&self) -> Vec<String> {
        std::fs::read_dir(self.dir.join("links"))
            .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default()
    }

    /// Takes the program off `interface`.
    pub fn detach(&self, interface: &str) -> Result<()> {
        let link = PinnedLink::from_pin(self.link(interface))
            .with_context(|| format!("opening the pinned link of {interface}"))?;
        drop(link.unpin()?); // the last reference: the kernel detaches it
        Ok(())
    }

    /// Removes the directories `new` made if nothing was pinned in them.
    pub fn remove_if_empty(&self) -> Result<()> {
        for sub in [self.maps(), self.dir.join("links"), self.dir.clone()] {
            std::fs::remove_dir(&sub)?;
        }
        Ok(())
    }

    /// Detaches everything and removes the pinned state: the data path and
    /// its connection table are gone.
    pub fn remove_all(&self) -> Result<()> {
        for interface in self.linked_interfaces() {
            if let Err(e) = self.detach(&interface) {
                tracing::warn!("{e:#}");
                let _ = std::fs::remove_file(self.link(&interface));
            }
        }
        std::fs::remove_dir_all(&self.dir).with_context(|| format!("removing {}", self.dir.display()))
    }
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
        for name in ["SERVICES", "BACKENDS", "ACTIVE"] {
            loader.map_max_entries(name, max_services);
        }
        for name in ["BACKEND_STATS", "BACKEND_HOPS"] {
            loader.map_max_entries(name, max_services * MAX_BACKENDS);
        }
        let mut reused = false;
        let paths: Vec<(&str, PathBuf)> = match pins {
            Some(p) => MAP_NAMES.iter().map(|name| (*name, p.maps().join(name))).collect(),
            None => Vec::new(),
        };
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
            flows: flows.try_into()?,
            counters: take("COUNTERS")?.try_into()?,
            backend_stats: take("BACKEND_STATS")?.try_into()?,
            max_flows,
            max_services,
            clock: Clock::default(),
            ebpf,
        };
        datapath.set_clock()?;
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

    /// The services and backend sets in the maps, as a previous agent left
    /// them.
    pub fn pinned_services(&self) -> Vec<(ServiceKey, Service, BackendSet)> {
        self.services
            .iter()
            .filter_map(|entry| entry.ok())
            .filter_map(|(key, service)| Some((key, service, self.backends.get(&service.id, 0).ok()?)))
            .collect()
    }

    pub fn max_flows(&self) -> u32 {
        self.max_flows
    }

    /// How many services the maps have room for (ids `0..max_services`).
    pub fn max_services(&self) -> u32 {
        self.max_services
    }

    fn program(&self, name: &str) -> Result<&Xdp> {
        Ok(self.ebpf.program(name).context("program missing")?.try_into()?)
    }

    pub fn set_service(&mut self, vip: SocketAddrV4, id: u32) -> Result<()> {
        self.services.insert(service_key(vip), Service { id, flags: 0 }, 0)?;
        Ok(())
    }

    pub fn remove_service(&mut self, vip: SocketAddrV4) -> Result<()> {
        self.services.remove(&service_key(vip))?;
        Ok(())
    }

    pub fn set_backends(&mut self, service: u32, set: &BackendSet) -> Result<()> {
        self.backends.set(service, set, 0)?;
        Ok(())
    }

    pub fn active_counts(&self, service: u32) -> Result<ActiveCounts> {
        Ok(self.active.get(&service, 0)?)
    }

    /// Summed over CPUs.
    pub fn backend_stats(&self, service: u32, slot: u32) -> Result<BackendStats> {
        let values = self.backend_stats.get(&(service * MAX_BACKENDS + slot), 0)?;
        Ok(values.iter().fold(BackendStats::default(), |total, v| total.add(v)))
    }

    /// Slots `0..slots` of a service, summed over CPUs, read with one
    /// system call (BPF_MAP_LOOKUP_BATCH) rather than one per slot: the
    /// agent reads them every tick.
    pub fn service_backend_stats(&self, service: u32, slots: usize) -> Result<Vec<BackendStats>> {
        let slots = slots.min(MAX_BACKENDS as usize);
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        let fd = self.backend_stats.map().fd().as_fd().as_raw_fd();
        let mut keys = vec![0u32; slots];
        let mut values = vec![BackendStats::default(); slots * cpus];
        let first = service * MAX_BACKENDS;
        // The token is the key before the first one read.
        let token = first.checked_sub(1);
        let read = match lookup_batch_call(fd, token, &mut keys, &mut values, cpus) {
            Ok((n, _, _)) => n,
            Err(_) => 0,
        };
        if read < slots || keys.first().is_some_and(|k| *k != first) {
            // Kernels before 5.6 have no batch operations.
            return (0..slots as u32).map(|slot| self.backend_stats(service, slot)).collect();
        }
        Ok(values.chunks(cpus).map(|per_cpu| per_cpu.iter().fold(BackendStats::default(), |t, v| t.add(v))).collect())
    }

    /// A slot that gets a new backend starts its statistics from zero.
    pub fn clear_backend_stats(&mut self, service: u32, slot: u32) -> Result<()> {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        let zeros = PerCpuValues::try_from(vec![BackendStats::default(); cpus])?;
        self.backend_stats.set(service * MAX_BACKENDS + slot, zeros, 0)?;
        Ok(())
    }

    /// Summed over CPUs.
    pub fn counters(&self) -> Result<[u64; COUNTER_COUNT]> {
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
    pub fn flows(&self) -> Vec<(FlowKey, Flow)> {
        match lookup_batch(self.flows.map().fd().as_fd().as_raw_fd()) {
            Ok(entries) => entries,
            // Kernels before 5.6 have no batch operations.
            Err(_) => self.flows.iter().filter_map(|entry| entry.ok()).collect(),
        }
    }

    /// Forward entries in the table: the number of flows.
    pub fn flow_count(&self) -> usize {
        self.flows().iter().filter(|(_, f)| f.direction == lb_common::DIR_FORWARD).count()
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

    /// Closes these live forward flows now: their counts are released and
    /// their clients' next packets answered with an RST. Returns how many
    /// were still live.
    pub fn reset_flows(&self, keys: &[FlowKey]) -> Result<u32> {
        self.run_expire(keys, &Timeouts::default(), EXPIRE_RESET)
    }

    /// The data path's clock (see `Clock`).
    pub fn clock(&self) -> Clock {
        self.clock
    }

    /// The data path's clock now, in ticks.
    pub fn now_ticks(&self) -> Result<u64> {
        Ok(self.read_clock()?.0)
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
        self.clock = Clock::new(hz as u64);
        let mut map: Array<&mut MapData, Clock> =
            Array::try_from(self.ebpf.map_mut("CLOCK").context("map CLOCK missing from the object")?)?;
        map.set(0, self.clock, 0)?;
        tracing::debug!(measured, hz, "data path clock");
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
        let prog = self.program("lb_xdp")?;
        let mut output = vec![0u8; frame.len() + 256];
        let result = prog.test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut output),
            ..Default::default()
        })?;
        output.truncate(result.data_size_out as usize);
        Ok((result.return_value, output))
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

/// The `batch` member of the kernel's `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BATCH: usize = 8192;

/// All entries of the hash map `fd`, by BPF_MAP_LOOKUP_BATCH.
fn lookup_batch(fd: std::os::fd::RawFd) -> std::io::Result<Vec<(FlowKey, Flow)>> {
    let mut entries = Vec::new();
    let mut keys = vec![FlowKey::default(); BATCH];
    let mut values = vec![Flow::default(); BATCH];
    // The position token is opaque (a bucket index for hash maps).
    let mut token: Option<[u8; 8]> = None;
    loop {
        let (n, next, end) = lookup_batch_call(fd, token, &mut keys, &mut values, 1)?;
        entries.extend(keys[..n].iter().copied().zip(values[..n].iter().copied()));
        if end {
            return Ok(entries);
        }
        token = Some(next);
    }
}

/// One BPF_MAP_LOOKUP_BATCH call: up to `keys.len()` entries from where
/// `token` (from the call before; `None`: the start) left off, with
/// `values_per_key` values each (the CPU count for per-CPU maps). Returns
/// how many it read, the token to go on from, and whether the map ended.
fn lookup_batch_call<K: Copy, V: Copy, T: Copy + Default>(
    fd: std::os::fd::RawFd,
    token: Option<T>,
    keys: &mut [K],
    values: &mut [V],
    values_per_key: usize,
) -> std::io::Result<(usize, T, bool)> {
    assert!(values.len() >= keys.len() * values_per_key);
    let mut token_in = token.unwrap_or_default();
    let mut token_out = T::default();
    let mut attr = BatchAttr {
        in_batch: if token.is_some() { &mut token_in as *mut T as u64 } else { 0 },
        out_batch: &mut token_out as *mut T as u64,
        keys: keys.as_mut_ptr() as u64,
        values: values.as_mut_ptr() as u64,
        count: keys.len() as u32,
        map_fd: fd as u32,
        ..Default::default()
    };
    let rc = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_MAP_LOOKUP_BATCH, &mut attr as *mut BatchAttr, std::mem::size_of::<BatchAttr>())
    };
    let n = attr.count as usize;
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENOENT) {
            return Ok((n, token_out, true));
        }
        return Err(e);
    }
    Ok((n, token_out, false))
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
}
