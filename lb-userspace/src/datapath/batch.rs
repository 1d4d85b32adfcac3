//! BPF_MAP_LOOKUP_BATCH: reading thousands of map entries per system call
//! (aya 0.14 has no wrapper for it).
use lb_common::{Flow, FlowKey};

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
pub fn lookup_batch(fd: std::os::fd::RawFd) -> std::io::Result<Vec<(FlowKey, Flow)>> {
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
pub fn lookup_batch_call<K: Copy, V: Copy, T: Copy + Default>(
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

