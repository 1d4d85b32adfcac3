//! The pin directory: where the data path's maps and XDP links live on a BPF
//! filesystem, so that it keeps forwarding while no agent runs and a new
//! agent takes it over.
use std::{
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use aya::programs::links::PinnedLink;

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// Bump when a map's key or value layout changes: pinned maps of another
/// layout are then left alone (an upgrade across it starts with an empty
/// connection table) instead of being misread.
const LAYOUT_VERSION: u32 = 8;

#[derive(Debug, Clone)]
pub struct Pins {
    dir: PathBuf,
}

/// Held while an agent runs on a pin directory: an exclusive `flock` on the
/// directory, released when the agent's process ends however it ends.
#[derive(Debug)]
pub struct PinLock {
    _dir: std::fs::File,
}

impl Pins {
    /// The pin directory `dir`, made on a BPF filesystem and locked for this
    /// agent before anything in it is touched: a second agent on the same
    /// data path stops here, having changed nothing.
    pub fn open(dir: &Path) -> Result<(Self, PinLock)> {
        ensure_bpf_filesystem(dir)?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let lock = lock(dir)?;
        let pins = Self { dir: dir.into() };
        for sub in [pins.maps(), dir.join("links")] {
            std::fs::create_dir_all(&sub).with_context(|| format!("creating {}", sub.display()))?;
        }
        Ok((pins, lock))
    }

    pub(super) fn maps(&self) -> PathBuf {
        Self::maps_under(&self.dir)
    }

    /// Where this build pins its maps under the pin directory `dir`.
    pub fn maps_under(dir: &Path) -> PathBuf {
        dir.join(format!("maps-v{LAYOUT_VERSION}"))
    }

    pub(super) fn link(&self, interface: &str) -> PathBuf {
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


fn on_bpf_filesystem(path: &Path) -> bool {
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else { return false };
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    unsafe { libc::statfs(c_path.as_ptr(), &mut fs) == 0 && fs.f_type as i64 == BPF_FS_MAGIC }
}

/// Makes sure `dir` will be on a BPF filesystem. Where its parent is not
/// one, the agent mounts one there if it runs in the host's mount namespace
/// (as Cilium's agent does), so the pins outlive it. Elsewhere — `ip netns
/// exec` gives the command a private /sys — a BPF filesystem mounted here
/// would vanish with the agent and the data path with it, so it stops and
/// says what to run instead.
fn ensure_bpf_filesystem(dir: &Path) -> Result<()> {
    let existing = dir.ancestors().find(|a| a.exists()).unwrap_or(Path::new("/"));
    if on_bpf_filesystem(existing) {
        return Ok(());
    }
    let parent = dir.parent().unwrap_or(Path::new("/"));
    let host_mounts = std::fs::read_link("/proc/self/ns/mnt").ok() == std::fs::read_link("/proc/1/ns/mnt").ok();
    if !host_mounts {
        bail!(
            "{} is not on a BPF filesystem in this mount namespace (`ip netns exec` mounts a private /sys): \
             enter only the network namespace instead, as in `nsenter --net=/run/netns/NAME lb agent --config FILE`, \
             or set agent.pin_dir on a BPF filesystem mounted here",
            dir.display()
        );
    }
    if parent != existing {
        bail!(
            "{} is not on a BPF filesystem: run `mount -t bpf bpf {}` first, or set agent.pin_dir under /sys/fs/bpf",
            dir.display(),
            existing.display()
        );
    }
    let target = std::ffi::CString::new(parent.as_os_str().as_encoded_bytes())?;
    let rc = unsafe {
        libc::mount(c"bpf".as_ptr(), target.as_ptr(), c"bpf".as_ptr(), 0, c"mode=0700".as_ptr() as *const libc::c_void)
    };
    if rc != 0 {
        bail!(
            "{} is not on a BPF filesystem and mounting one there failed ({}): run `mount -t bpf bpf {}`",
            dir.display(),
            std::io::Error::last_os_error(),
            parent.display()
        );
    }
    tracing::info!(path = %parent.display(), "mounted a BPF filesystem for the pinned data path");
    Ok(())
}

/// Takes the pin directory's lock, or says which agent holds it.
fn lock(dir: &Path) -> Result<PinLock> {
    let file = std::fs::File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(PinLock { _dir: file });
    }
    let holder = lock_holder(file.metadata()?.ino()).map_or_else(String::new, |pid| format!(" (pid {pid})"));
    bail!(
        "another lb agent{holder} is running on the data path pinned at {}: it was left as it is. \
         Stop that agent first (its service, or `lb shutdown` to take the data path off), or give this one \
         another agent.pin_dir",
        dir.display()
    )
}

/// The process holding an `flock` on the file with inode `ino`, from
/// /proc/locks ("1: FLOCK  ADVISORY  WRITE 1234 00:2a:5678 0 EOF").
fn lock_holder(ino: u64) -> Option<u32> {
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (pid, file) = (fields.get(4)?, fields.get(5)?);
        (fields.get(1) == Some(&"FLOCK") && file.rsplit(':').next()?.parse::<u64>().ok()? == ino)
            .then(|| pid.parse().ok())
            .flatten()
    })
}
