//! The loaded XDP program and typed handles on its maps. Everything the agent
//! and the tests do to the data path goes through here.
use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::{bail, Context, Result};
use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray, PerCpuValues},
    programs::{xdp::XdpLinkId, TestRun, TestRunOptions, Xdp, XdpMode},
    Ebpf, EbpfLoader,
};
use lb_common::{
    ActiveCounts, BackendSet, BackendStats, Counters, ExpireRequest, Flow, FlowKey, Service,
    ServiceKey, Timeouts, COUNTER_COUNT, EXPIRE_BATCH, EXPIRE_IDLE, EXPIRE_RESET, MAX_BACKENDS,
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
}

impl Datapath {
    /// Loads the program with room for `max_flows` flows (two table entries
    /// each). Nothing is attached yet.
    pub fn load(max_flows: u32) -> Result<Self> {
        raise_memlock_limit();
        let mut ebpf = EbpfLoader::new()
            .map_max_entries("FLOWS", max_flows.checked_mul(2).context("max_flows too large")?)
            .load(OBJECT)
            .context("loading the XDP program into the kernel (are you root?)")?;
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
        Ok(Self {
            services: take("SERVICES")?.try_into()?,
            backends: take("BACKENDS")?.try_into()?,
            active: take("ACTIVE")?.try_into()?,
            flows: take("FLOWS")?.try_into()?,
            counters: take("COUNTERS")?.try_into()?,
            backend_stats: take("BACKEND_STATS")?.try_into()?,
            max_flows,
            ebpf,
        })
    }

    pub fn max_flows(&self) -> u32 {
        self.max_flows
    }

    fn program(&self, name: &str) -> Result<&Xdp> {
        Ok(self.ebpf.program(name).context("program missing")?.try_into()?)
    }

    pub fn attach(&mut self, interface: &str, mode: XdpMode) -> Result<XdpLinkId> {
        let prog: &mut Xdp = self.ebpf.program_mut("lb_xdp").context("program missing")?.try_into()?;
        Ok(prog.attach(interface, mode)?)
    }

    pub fn detach(&mut self, link: XdpLinkId) -> Result<()> {
        let prog: &mut Xdp = self.ebpf.program_mut("lb_xdp").context("program missing")?.try_into()?;
        Ok(prog.detach(link)?)
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
        let mut total = BackendStats::default();
        for v in values.iter() {
            total.fwd_packets += v.fwd_packets;
            total.fwd_bytes += v.fwd_bytes;
            total.reply_packets += v.reply_packets;
            total.reply_bytes += v.reply_bytes;
            total.new_flows += v.new_flows;
            total.refused += v.refused;
            total.unanswered += v.unanswered;
        }
        Ok(total)
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

    /// Every entry of the connection table, both directions.
    pub fn flows(&self) -> Vec<(FlowKey, Flow)> {
        self.flows.iter().filter_map(|entry| entry.ok()).collect()
    }

    pub fn flow(&self, key: &FlowKey) -> Option<Flow> {
        self.flows.get(key, 0).ok()
    }

    pub fn remove_flow_entry(&mut self, key: &FlowKey) {
        let _ = self.flows.remove(key);
    }

    /// Asks the kernel to expire these forward flows if they are still idle
    /// by `timeouts`; returns how many it removed.
    pub fn expire(&self, keys: &[FlowKey], timeouts: &Timeouts) -> Result<u32> {
        self.run_expire(keys, timeouts, EXPIRE_IDLE)
    }

    /// Closes these live forward flows now: their counts are released and
    /// their clients' next packets answered with an RST. Returns how many
    /// were still live.
    pub fn reset_flows(&self, keys: &[FlowKey]) -> Result<u32> {
        self.run_expire(keys, &Timeouts::default(), EXPIRE_RESET)
    }

    fn run_expire(&self, keys: &[FlowKey], timeouts: &Timeouts, mode: u32) -> Result<u32> {
        let prog = self.program("lb_expire")?;
        let mut expired = 0;
        for batch in keys.chunks(EXPIRE_BATCH) {
            let mut request =
                ExpireRequest { timeouts: *timeouts, mode, count: batch.len() as u32, ..Default::default() };
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
            let done: ExpireRequest = bytemuck::pod_read_unaligned(&output[..input.len()]);
            expired += done.expired;
        }
        Ok(expired)
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

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
}
