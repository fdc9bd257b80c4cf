//! `BPF_MAP_UPDATE_BATCH` through a raw `bpf(2)` call (aya has no batch API), and writing a
//! service set's entries with it, chunk by chunk, in the agent's order.
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use aya::maps::MapData;
use lb_agent::loader::PinLayout;
use lb_common::maps;

use crate::services::Entries;

/// `BPF_MAP_UPDATE_BATCH` command number (`enum bpf_cmd`).
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// The `batch` member of `union bpf_attr`.
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

/// Writes `keys[i] -> values[i]` in one syscall. `K`/`V` must be the map's exact key and
/// value layouts (`#[repr(C)]`, no padding), as the kernel reads them as packed arrays.
pub fn update_batch<K: aya::Pod, V: aya::Pod>(
    fd: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> io::Result<()> {
    if keys.len() != values.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "keys and values differ in length",
        ));
    }
    if keys.is_empty() {
        return Ok(());
    }
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: keys.len() as u32,
        map_fd: fd.as_raw_fd() as u32,
        ..Default::default()
    };
    // SAFETY: `attr` is a valid bpf_attr prefix of the size passed; `keys` and `values`
    // stay alive and are only read by the kernel for `count` elements.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_UPDATE_BATCH,
            &mut attr as *mut BatchAttr,
            std::mem::size_of::<BatchAttr>(),
        )
    };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!(
                "BPF_MAP_UPDATE_BATCH ({} of {} entries written): {e}",
                attr.count,
                keys.len()
            ),
        ));
    }
    Ok(())
}

/// [`update_batch`] in chunks of `chunk` entries.
pub fn update_chunked<K: aya::Pod, V: aya::Pod>(
    fd: BorrowedFd<'_>,
    entries: &[(K, V)],
    chunk: usize,
) -> io::Result<()> {
    for c in entries.chunks(chunk.max(1)) {
        let keys: Vec<K> = c.iter().map(|(k, _)| *k).collect();
        let values: Vec<V> = c.iter().map(|(_, v)| *v).collect();
        update_batch(fd, &keys, &values)?;
    }
    Ok(())
}

/// Opens a pinned map of a datapath by name.
pub fn open(pins: &PinLayout, name: &str) -> anyhow::Result<MapData> {
    MapData::from_pin(pins.map(name)).map_err(|e| anyhow::anyhow!("opening pinned map {name}: {e}"))
}

/// Writes `entries` with batch updates of `chunk` entries, in the agent's order: every
/// backend, then every slot, then every master entry.
pub fn program(pins: &PinLayout, entries: &Entries, chunk: usize) -> anyhow::Result<()> {
    let backends = open(pins, maps::LB4_BACKENDS)?;
    let services = open(pins, maps::LB4_SERVICES)?;
    update_chunked(backends.fd().as_fd(), &entries.backends, chunk)?;
    update_chunked(services.fd().as_fd(), &entries.slots, chunk)?;
    update_chunked(services.fd().as_fd(), &entries.masters, chunk)?;
    Ok(())
}

/// Kernel memory charged to a map (the `memlock:` line of its fdinfo), in bytes.
pub fn memlock_bytes(map: &MapData) -> Option<u64> {
    let fd = map.fd().as_fd().as_raw_fd();
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
}
