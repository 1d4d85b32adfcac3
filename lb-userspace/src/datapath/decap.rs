//! The decapsulation program a DSR backend runs for IPIP services (`lb
//! decap`), for kernels without the `ipip` module: loaded from the same
//! object as the balancer's program, attached to the backend's interface
//! through a pinned link, so it stays after the command exits, with its
//! VIPs and counters in pinned maps beside it.
use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use aya::{
    maps::{HashMap, MapData, PerCpuArray},
    programs::{
        links::{FdLink, PinnedLink},
        Xdp, XdpMode,
    },
    Ebpf, EbpfLoader,
};
use lb_common::{DecapStats, MAX_DECAP_VIPS};

use super::{host_addr, kernel::OBJECT, wire_addr};

/// The maps' names, which are also their pins' names in the directory.
const VIPS_MAP: &str = "DECAP_VIPS";
const STATS_MAP: &str = "DECAP_STATS";

/// Where `lb decap` pins its state by default, one directory per interface.
pub const DEFAULT_DECAP_DIR: &str = "/sys/fs/bpf/lb-decap";

/// One interface's decapsulation: its pinned link and maps.
pub struct Decap {
    dir: PathBuf,
}

/// What `Decap::status` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecapStatus {
    pub vips: BTreeSet<Ipv4Addr>,
    pub decapsulated: u64,
    pub passed: u64,
}

impl Decap {
    /// The decapsulation of `interface`, pinned under `base/interface`.
    pub fn new(base: &Path, interface: &str) -> Result<Self> {
        if interface.is_empty() || interface.contains('/') || interface.len() > 15 {
            bail!("{interface:?} is not an interface name");
        }
        Ok(Self { dir: base.join(interface) })
    }

    fn link(&self) -> PathBuf {
        self.dir.join("link")
    }

    fn vips_map(&self) -> PathBuf {
        self.dir.join(VIPS_MAP)
    }

    fn stats_map(&self) -> PathBuf {
        self.dir.join(STATS_MAP)
    }

    /// Attaches the program to `interface` (native mode, else generic)
    /// unless it is already, and makes `vips` the VIPs it takes. Says
    /// whether it attached now.
    pub fn attach(&self, interface: &str, vips: &[Ipv4Addr]) -> Result<bool> {
        if vips.is_empty() {
            bail!("give at least one --vip: the VIPs whose tunnelled packets this backend takes");
        }
        if vips.len() > MAX_DECAP_VIPS as usize {
            bail!("at most {MAX_DECAP_VIPS} VIPs, not {}", vips.len());
        }
        let attached_now = !self.link().exists();
        if attached_now {
            if let Err(e) = self.load_and_attach(interface) {
                // Nothing half-made stays behind.
                let _ = self.detach();
                return Err(e);
            }
        }
        self.set_vips(vips)?;
        Ok(attached_now)
    }

    fn load_and_attach(&self, interface: &str) -> Result<()> {
        std::fs::create_dir_all(&self.dir).with_context(|| format!("creating {}", self.dir.display()))?;
        let mut program = DecapProgram::load(Some(&self.dir))?;
        let prog = program.program()?;
        let id = match prog.attach(interface, XdpMode::Driver) {
            Ok(id) => id,
            Err(native) => prog
                .attach(interface, XdpMode::Skb)
                .with_context(|| format!("attaching to {interface} (native mode failed too: {native})"))?,
        };
        let link = FdLink::try_from(prog.take_link(id)?)
            .context("this kernel attaches XDP without BPF links; they are needed to outlive the command")?;
        link.pin(self.link()).with_context(|| format!("pinning the attachment at {}", self.link().display()))?;
        Ok(())
    }

    fn vips(&self) -> Result<HashMap<MapData, u32, u32>> {
        let map = MapData::from_pin(self.vips_map())
            .with_context(|| format!("no decapsulation at {} (run `lb decap attach` first)", self.dir.display()))?;
        Ok(HashMap::try_from(aya::maps::Map::HashMap(map))?)
    }

    fn set_vips(&self, vips: &[Ipv4Addr]) -> Result<()> {
        set_vips(&mut self.vips()?, vips)
    }

    pub fn status(&self) -> Result<DecapStatus> {
        let vips = self.vips()?.keys().filter_map(|k| k.ok()).map(host_addr).collect();
        let stats = MapData::from_pin(self.stats_map()).context("reading the decapsulation counters")?;
        let stats: PerCpuArray<MapData, DecapStats> = PerCpuArray::try_from(aya::maps::Map::PerCpuArray(stats))?;
        let per_cpu = stats.get(&0, 0)?;
        Ok(DecapStatus {
            vips,
            decapsulated: per_cpu.iter().map(|s| s.decapsulated).sum(),
            passed: per_cpu.iter().map(|s| s.passed).sum(),
        })
    }

    /// Takes the program off and removes its pins. Says whether it was on.
    pub fn detach(&self) -> Result<bool> {
        let was = self.link().exists();
        if was {
            // Unpinned and closed, the link detaches the program.
            drop(PinnedLink::from_pin(self.link())?.unpin()?);
        }
        for pin in [self.link(), self.vips_map(), self.stats_map()] {
            let _ = std::fs::remove_file(pin);
        }
        let _ = std::fs::remove_dir(&self.dir);
        Ok(was)
    }
}

/// Makes `vips` the keys of the VIP map.
fn set_vips<T: std::borrow::BorrowMut<MapData>>(map: &mut HashMap<T, u32, u32>, vips: &[Ipv4Addr]) -> Result<()> {
    let wanted: BTreeSet<u32> = vips.iter().map(|v| wire_addr(*v)).collect();
    let old: Vec<u32> = map.keys().filter_map(|k| k.ok()).filter(|k| !wanted.contains(k)).collect();
    for vip in &wanted {
        map.insert(vip, 1, 0)?;
    }
    for vip in old {
        map.remove(&vip)?;
    }
    Ok(())
}

/// The decapsulation program loaded, with its maps pinned under a
/// directory or (for tests) its own.
pub struct DecapProgram {
    ebpf: Ebpf,
}

impl DecapProgram {
    pub fn load(pin_dir: Option<&Path>) -> Result<Self> {
        super::kernel::raise_memlock_limit();
        let mut loader = EbpfLoader::new();
        // The balancer's maps come with the object; a backend needs none of
        // their room.
        for name in ["FLOWS", "SERVICES", "BACKENDS", "ACTIVE", "BACKEND_STATS", "BACKEND_HOPS", "OPENED"] {
            loader.map_max_entries(name, 1);
        }
        if let Some(dir) = pin_dir {
            loader.map_pin_path(VIPS_MAP, dir.join(VIPS_MAP));
            loader.map_pin_path(STATS_MAP, dir.join(STATS_MAP));
        }
        let mut ebpf = loader.load(OBJECT).context("loading the decapsulation program (are you root?)")?;
        let prog: &mut Xdp =
            ebpf.program_mut("lb_decap").context("program lb_decap missing from the object")?.try_into()?;
        prog.load().context("the kernel verifier rejected lb_decap")?;
        Ok(Self { ebpf })
    }

    fn program(&mut self) -> Result<&mut Xdp> {
        Ok(self.ebpf.program_mut("lb_decap").context("program missing")?.try_into()?)
    }

    pub fn set_vips(&mut self, vips: &[Ipv4Addr]) -> Result<()> {
        let mut map: HashMap<&mut MapData, u32, u32> =
            HashMap::try_from(self.ebpf.map_mut(VIPS_MAP).context("map DECAP_VIPS missing")?)?;
        set_vips(&mut map, vips)
    }

    /// Runs the program once on `frame`; the verdict and the frame it left.
    pub fn run_packet(&mut self, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
        super::kernel::run_once(self.program()?, frame)
    }
}
