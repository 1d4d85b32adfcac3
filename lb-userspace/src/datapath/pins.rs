//! The pin directory: where the data path's maps and XDP links live on a BPF
//! filesystem, so that it keeps forwarding while no agent runs and a new
//! agent takes it over.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use aya::programs::links::PinnedLink;

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// Bump when a map's key or value layout changes: pinned maps of another
/// layout are then left alone (an upgrade across it starts with an empty
/// connection table) instead of being misread.
const LAYOUT_VERSION: u32 = 4;

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

    pub(super) fn maps(&self) -> PathBuf {
        self.dir.join(format!("maps-v{LAYOUT_VERSION}"))
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

