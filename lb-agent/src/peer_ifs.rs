//! `--attach tc`: keeps `LB_PEER_IFS` equal to the veth devices of the agent's network
//! namespace, the devices TC ingress may hand a local pod's packets to with
//! `bpf_redirect_peer`. Any other device (a bridge, a device that came up since the last
//! refresh) still works: the datapath sends to it with `bpf_redirect` instead.
use std::collections::BTreeSet;
use std::io;

use aya::maps::{HashMap, MapData};
use lb_common::maps;

use crate::pins::{open_pinned_map, LoadError, PinLayout};

/// The kernel's `struct ethtool_drvinfo` (only `driver` is read).
#[repr(C)]
struct DrvInfo {
    cmd: u32,
    driver: [u8; 32],
    version: [u8; 32],
    fw_version: [u8; 32],
    bus_info: [u8; 32],
    erom_version: [u8; 32],
    reserved2: [u8; 12],
    n_priv_flags: u32,
    n_stats: u32,
    testinfo_len: u32,
    eedump_len: u32,
    regdump_len: u32,
}

const ETHTOOL_GDRVINFO: u32 = 0x3;
const SIOCETHTOOL: libc::c_ulong = 0x8946;

/// The names of the devices of the calling thread's network namespace (`/proc/self/net/dev`
/// follows the namespace, where `/sys/class/net` may show another one's).
fn device_names() -> io::Result<Vec<String>> {
    let text = std::fs::read_to_string("/proc/self/net/dev")?;
    Ok(text
        .lines()
        .skip(2)
        .filter_map(|l| l.split_once(':').map(|(name, _)| name.trim().to_string()))
        .collect())
}

/// The driver of device `name` (`ETHTOOL_GDRVINFO` on a socket of the calling thread's
/// namespace).
fn driver(sock: &std::net::UdpSocket, name: &str) -> io::Result<String> {
    use std::os::fd::AsRawFd as _;
    let mut info = DrvInfo {
        cmd: ETHTOOL_GDRVINFO,
        driver: [0; 32],
        version: [0; 32],
        fw_version: [0; 32],
        bus_info: [0; 32],
        erom_version: [0; 32],
        reserved2: [0; 12],
        n_priv_flags: 0,
        n_stats: 0,
        testinfo_len: 0,
        eedump_len: 0,
        regdump_len: 0,
    };
    // SAFETY: an all-zero ifreq is valid (a name and a union of plain values and pointers).
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= ifr.ifr_name.len() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "name too long"));
    }
    for (d, s) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    ifr.ifr_ifru.ifru_data = std::ptr::from_mut(&mut info).cast();
    // SAFETY: SIOCETHTOOL with an ifreq whose data points at a drvinfo that outlives the call.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), SIOCETHTOOL, &mut ifr) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let end = info.driver.iter().position(|&b| b == 0).unwrap_or(32);
    Ok(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

/// The ifindexes of the veth devices of the calling thread's network namespace.
pub fn veth_ifindexes() -> io::Result<BTreeSet<u32>> {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0")
        .or_else(|_| std::net::UdpSocket::bind("0.0.0.0:0"))?;
    let mut out = BTreeSet::new();
    for name in device_names()? {
        // A device that vanished, or has no ethtool driver info: not a veth.
        if driver(&sock, &name).is_ok_and(|d| d == "veth") {
            let Ok(c) = std::ffi::CString::new(name) else {
                continue;
            };
            // SAFETY: a valid NUL-terminated name.
            let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
            if idx != 0 {
                out.insert(idx);
            }
        }
    }
    Ok(out)
}

/// Make `LB_PEER_IFS` hold exactly the veths of the calling thread's namespace. Returns
/// (entries added, entries removed).
pub fn refresh(pins: &PinLayout) -> Result<(usize, usize), LoadError> {
    let want = veth_ifindexes().map_err(|source| LoadError::Io {
        what: "listing the veth devices".into(),
        source,
    })?;
    let data = open_pinned_map(pins, maps::LB_PEER_IFS)?;
    let mut map: HashMap<MapData, u32, u32> = HashMap::try_from(aya::maps::Map::HashMap(data))
        .map_err(|source| LoadError::Map {
            name: maps::LB_PEER_IFS,
            source,
        })?;
    let have: BTreeSet<u32> = map.keys().filter_map(Result::ok).collect();
    let map_err = |source| LoadError::Map {
        name: maps::LB_PEER_IFS,
        source,
    };
    let mut added = 0;
    for idx in want.difference(&have) {
        map.insert(idx, 1, 0).map_err(map_err)?;
        added += 1;
    }
    let mut removed = 0;
    for idx in have.difference(&want) {
        map.remove(idx).map_err(map_err)?;
        removed += 1;
    }
    Ok((added, removed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_devices_of_this_namespace() {
        let names = device_names().expect("/proc/self/net/dev");
        assert!(names.iter().any(|n| n == "lo"), "{names:?}");
        // Loopback has no ethtool driver info, and is never a veth.
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("socket");
        assert_ne!(driver(&sock, "lo").ok().as_deref(), Some("veth"));
        assert!(driver(&sock, "no-such-dev0").is_err());
    }
}
