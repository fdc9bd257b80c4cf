//! The bpf(2) commands aya 0.14 does not expose: for pinned cgroup links, opening a pin
//! (`BPF_OBJ_GET`), swapping a link's program in place (`BPF_LINK_UPDATE`) and reading the
//! cgroup a link is attached to (`BPF_OBJ_GET_INFO_BY_FD`); for maps, batch lookups and
//! deletes (`BPF_MAP_LOOKUP_BATCH`, `BPF_MAP_DELETE_BATCH`).
use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    path::Path,
};

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_UPDATE: libc::c_long = 29;
/// `BPF_LINK_TYPE_CGROUP` of `enum bpf_link_type`.
const BPF_LINK_TYPE_CGROUP: u32 = 3;

#[repr(C)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

#[repr(C)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, initialised `#[repr(C)]` bpf_attr prefix of the given size;
    // the kernel reads (and for info, writes through the pointer it holds) only that much.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Open the bpf object pinned at `path`.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    let mut attr = ObjGetAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        path_fd: 0,
        _pad: 0,
    };
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    let fd = i32::try_from(fd).map_err(io::Error::other)?;
    // SAFETY: BPF_OBJ_GET returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Replace the program of `link` with `prog`, atomically: the hook never runs without one.
pub fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    bpf(BPF_LINK_UPDATE, &mut attr).map(|_| ())
}

/// The cgroup id `link` is attached to, or `None` when it is not a cgroup link (or its
/// cgroup is gone).
pub fn link_cgroup_id(link: BorrowedFd<'_>) -> io::Result<Option<u64>> {
    // struct bpf_link_info: type, id, prog_id (u32 each), then a union aligned to 8 whose
    // cgroup member starts with `__u64 cgroup_id` (offset 16).
    let mut info = [0u64; 32];
    let mut attr = InfoAttr {
        bpf_fd: link.as_raw_fd() as u32,
        info_len: std::mem::size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    let b = info[0].to_ne_bytes();
    let link_type = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
    Ok((link_type == BPF_LINK_TYPE_CGROUP && info[2] != 0).then_some(info[2]))
}

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// The `map_elem` member of `union bpf_attr`.
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// The prefix of `struct bpf_map_info` up to `map_flags`.
#[repr(C)]
#[derive(Default)]
struct MapInfoPrefix {
    map_type: u32,
    id: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

/// Check that `map`'s keys and values are exactly `K` and `V` in size: the kernel copies
/// its own sizes into the buffers it is given, so a mismatch would write past them.
fn ensure_layout<K, V>(map: BorrowedFd<'_>) -> io::Result<()> {
    let mut info = MapInfoPrefix::default();
    let mut attr = InfoAttr {
        bpf_fd: map.as_raw_fd() as u32,
        info_len: std::mem::size_of::<MapInfoPrefix>() as u32,
        info: std::ptr::from_mut(&mut info) as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    let want = (std::mem::size_of::<K>(), std::mem::size_of::<V>());
    if (info.key_size as usize, info.value_size as usize) != want {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "map {} has {}-byte keys and {}-byte values, not {} and {} (another layout?)",
                info.id, info.key_size, info.value_size, want.0, want.1
            ),
        ));
    }
    Ok(())
}

/// The value of `key` in the map `map`, `None` when it has none.
pub fn map_lookup<K: bytemuck::Pod, V: bytemuck::Pod>(
    map: BorrowedFd<'_>,
    key: &K,
) -> io::Result<Option<V>> {
    ensure_layout::<K, V>(map)?;
    let mut value = V::zeroed();
    let mut attr = ElemAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: std::ptr::from_ref(key) as u64,
        value: std::ptr::from_mut(&mut value) as u64,
        flags: 0,
    };
    match bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
        Ok(_) => Ok(Some(value)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
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

/// Every entry of the hash map `map`, read `chunk` at a time with `BPF_MAP_LOOKUP_BATCH`.
/// `K`/`V` must be the map's exact key and value layouts (`#[repr(C)]` Pod types).
pub fn map_lookup_batch<K: bytemuck::Pod, V: bytemuck::Pod>(
    map: BorrowedFd<'_>,
    chunk: usize,
) -> io::Result<Vec<(K, V)>> {
    ensure_layout::<K, V>(map)?;
    let mut chunk = chunk.max(1);
    let mut out = Vec::new();
    let mut keys = vec![K::zeroed(); chunk];
    let mut values = vec![V::zeroed(); chunk];
    // The hash maps' batch token is a bucket index (u32); a u64 leaves room.
    let (mut in_tok, mut out_tok) = (0u64, 0u64);
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                std::ptr::from_mut(&mut in_tok) as u64
            },
            out_batch: std::ptr::from_mut(&mut out_tok) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: map.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        let r = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let n = (attr.count as usize).min(chunk);
        out.extend(keys[..n].iter().copied().zip(values[..n].iter().copied()));
        match r {
            Ok(_) => {}
            // ENOENT: the walk is complete (the last entries, if any, came with it).
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
            // One bucket holds more entries than `chunk`: ask for more at once.
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && n == 0 => {
                chunk *= 2;
                keys.resize(chunk, K::zeroed());
                values.resize(chunk, V::zeroed());
                continue;
            }
            Err(e) => return Err(e),
        }
        in_tok = out_tok;
        first = false;
    }
}

/// Delete `keys` from the hash map `map` with `BPF_MAP_DELETE_BATCH`, `chunk` at a time.
/// Keys already gone (the datapath or the LRU removed them meanwhile) are skipped. Returns
/// how many were deleted.
pub fn map_delete_batch<K: bytemuck::Pod>(
    map: BorrowedFd<'_>,
    keys: &[K],
    chunk: usize,
) -> io::Result<usize> {
    let chunk = chunk.max(1);
    let mut deleted = 0;
    let mut rest = keys;
    while !rest.is_empty() {
        let part = &rest[..rest.len().min(chunk)];
        let mut attr = BatchAttr {
            keys: part.as_ptr() as u64,
            count: part.len() as u32,
            map_fd: map.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        let r = bpf(BPF_MAP_DELETE_BATCH, &mut attr);
        let n = (attr.count as usize).min(part.len());
        deleted += n;
        match r {
            Ok(_) => rest = &rest[part.len()..],
            // The key at `n` is gone already: skip it and go on after it.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => rest = &rest[n + 1..],
            Err(e) => return Err(e),
        }
    }
    Ok(deleted)
}
/// Entries per `BPF_MAP_UPDATE_BATCH` call (the kernel copies and applies them one by one,
/// so this only bounds the size of one call).
pub const BATCH_CHUNK: usize = 8192;

/// `BPF_MAP_UPDATE_BATCH` of `count` entries: `keys` and `values` are the packed arrays the
/// kernel reads (`count` keys of the map's key size, `count` values of its value size, a
/// per-CPU value being one per possible CPU). Entries are applied in order; returns how many
/// were written, and the error that stopped the rest.
///
/// # Safety
/// `keys` and `values` must hold `count` keys and values of exactly the map's sizes.
pub unsafe fn map_update_batch(
    map: BorrowedFd<'_>,
    keys: &[u8],
    values: &[u8],
    count: usize,
) -> (usize, io::Result<()>) {
    if count == 0 {
        return (0, Ok(()));
    }
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: count as u32,
        map_fd: map.as_raw_fd() as u32,
        ..Default::default()
    };
    match bpf(BPF_MAP_UPDATE_BATCH, &mut attr) {
        Ok(_) => (count, Ok(())),
        // On failure the kernel reports in `count` how many entries it applied.
        Err(e) => ((attr.count as usize).min(count), Err(e)),
    }
}

/// [`map_update_batch`] of typed entries, [`BATCH_CHUNK`] at a time; returns how many were
/// written (all of them, or those before the first failure) and that failure.
pub fn update_batch<K: bytemuck::Pod, V: bytemuck::Pod>(
    map: BorrowedFd<'_>,
    entries: &[(K, V)],
) -> (usize, io::Result<()>) {
    if entries.is_empty() {
        return (0, Ok(()));
    }
    if let Err(e) = ensure_layout::<K, V>(map) {
        return (0, Err(e));
    }
    let mut done = 0;
    for chunk in entries.chunks(BATCH_CHUNK) {
        let keys: Vec<K> = chunk.iter().map(|(k, _)| *k).collect();
        let values: Vec<V> = chunk.iter().map(|(_, v)| *v).collect();
        // SAFETY: the maps' key and value types are these `#[repr(C)]` Pod types, and the
        // two slices hold `chunk.len()` of each.
        let (n, r) = unsafe {
            map_update_batch(
                map,
                bytemuck::cast_slice(&keys),
                bytemuck::cast_slice(&values),
                chunk.len(),
            )
        };
        done += n;
        if r.is_err() {
            return (done, r);
        }
    }
    (done, Ok(()))
}

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_OBJ_PIN: libc::c_long = 6;
/// `BPF_MAP_TYPE_LRU_HASH` of `enum bpf_map_type`.
const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
/// `BPF_F_NO_COMMON_LRU`: one LRU list per CPU instead of one shared list.
pub const BPF_F_NO_COMMON_LRU: u32 = 1 << 1;

/// The `BPF_MAP_CREATE` prefix of `union bpf_attr` up to `map_name`.
#[repr(C)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    numa_node: u32,
    map_name: [u8; 16],
}

/// Create an LRU hash map of `K` to `V` named `name` (at most 15 bytes kept) with `flags`,
/// and pin it at `path`.
pub fn create_lru_hash_pinned<K: bytemuck::Pod, V: bytemuck::Pod>(
    path: &Path,
    name: &str,
    max_entries: u32,
    flags: u32,
) -> io::Result<()> {
    let mut map_name = [0u8; 16];
    for (d, s) in map_name.iter_mut().zip(name.bytes().take(15)) {
        *d = s;
    }
    let mut attr = MapCreateAttr {
        map_type: BPF_MAP_TYPE_LRU_HASH,
        key_size: std::mem::size_of::<K>() as u32,
        value_size: std::mem::size_of::<V>() as u32,
        max_entries,
        map_flags: flags,
        inner_map_fd: 0,
        numa_node: 0,
        map_name,
    };
    let fd = bpf(BPF_MAP_CREATE, &mut attr)?;
    let fd = i32::try_from(fd).map_err(io::Error::other)?;
    // SAFETY: BPF_MAP_CREATE returned a new descriptor that nothing else owns.
    let map = unsafe { OwnedFd::from_raw_fd(fd) };
    let c = CString::new(path.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    let mut pin = ObjGetAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: map.as_raw_fd() as u32,
        file_flags: 0,
        path_fd: 0,
        _pad: 0,
    };
    bpf(BPF_OBJ_PIN, &mut pin).map(|_| ())
}
