//! `--attach tc`: keeps `LB_PEER_IFS` equal to the veth devices of the agent's network
//! namespace whose peer is in another namespace (a pod's), the devices TC ingress may hand
//! a local pod's packets to with `bpf_redirect_peer`. Any other device (a bridge, a device
//! that came up since the last refresh) still works: the datapath sends to it with
//! `bpf_redirect` instead.
use std::collections::BTreeSet;
use std::io;

use aya::maps::{HashMap, MapData};
use lb_common::maps;

use crate::pins::{open_pinned_map, LoadError, PinLayout};

const RTM_GETLINK: u16 = 18;
const RTM_NEWLINK: u16 = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_LINK_NETNSID: u16 = 37;
const NLA_TYPE_MASK: u16 = 0x3fff;
/// `struct nlmsghdr` and `struct ifinfomsg` sizes.
const NLMSG_HDRLEN: usize = 16;
const IFINFOMSG_LEN: usize = 16;

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(off..off + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

/// The netlink attributes in `b`: (type, payload).
fn attrs(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        let len = usize::from(u16_at(b, 0)?);
        let kind = u16_at(b, 2)? & NLA_TYPE_MASK;
        if len < 4 || len > b.len() {
            return None;
        }
        let payload = &b[4..len];
        b = b.get(align4(len)..).unwrap_or(&[]);
        Some((kind, payload))
    })
}

/// From one `RTM_NEWLINK` payload (`ifinfomsg` and attributes): the ifindex if the device
/// is a veth whose peer lives in another network namespace (`IFLA_LINK_NETNSID` present;
/// `bpf_redirect_peer` drops packets for a peer in the same namespace).
fn cross_ns_veth(payload: &[u8]) -> Option<u32> {
    let index = u32_at(payload, 4)?;
    let mut veth = false;
    let mut other_ns = false;
    for (kind, data) in attrs(payload.get(IFINFOMSG_LEN..)?) {
        match kind {
            IFLA_LINKINFO => {
                veth = attrs(data).any(|(k, v)| k == IFLA_INFO_KIND && v.starts_with(b"veth\0"))
            }
            IFLA_LINK_NETNSID => other_ns = true,
            _ => {}
        }
    }
    (veth && other_ns).then_some(index)
}

/// The ifindexes of the veth devices of the calling thread's network namespace whose peer
/// is in another namespace (an `RTM_GETLINK` dump on a netlink socket of that namespace).
pub fn veth_ifindexes() -> io::Result<BTreeSet<u32>> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    // SAFETY: plain socket(2); the fd is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = [0u8; NLMSG_HDRLEN + IFINFOMSG_LEN];
    req[0..4].copy_from_slice(&((NLMSG_HDRLEN + IFINFOMSG_LEN) as u32).to_ne_bytes());
    req[4..6].copy_from_slice(&RTM_GETLINK.to_ne_bytes());
    req[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    req[8..12].copy_from_slice(&1u32.to_ne_bytes());
    // ifinfomsg: family AF_UNSPEC, everything else 0.
    // SAFETY: sending a buffer of the stated length on an open socket (to the kernel).
    let n = unsafe { libc::send(sock.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = BTreeSet::new();
    let mut buf = vec![0u8; 64 * 1024];
    // Bounded: a dump ends with NLMSG_DONE; a namespace with more devices than this many
    // buffers' worth is not a node this agent runs on.
    for _ in 0..10_000 {
        // SAFETY: receiving into a buffer of the stated length.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut msgs = &buf[..n as usize];
        while msgs.len() >= NLMSG_HDRLEN {
            let len = u32_at(msgs, 0).unwrap_or(0) as usize;
            let kind = u16_at(msgs, 4).unwrap_or(0);
            if len < NLMSG_HDRLEN || len > msgs.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "truncated netlink message",
                ));
            }
            match kind {
                NLMSG_DONE => return Ok(out),
                NLMSG_ERROR => {
                    let errno = u32_at(msgs, NLMSG_HDRLEN).unwrap_or(0) as i32;
                    return Err(io::Error::from_raw_os_error(-errno));
                }
                RTM_NEWLINK => out.extend(cross_ns_veth(&msgs[NLMSG_HDRLEN..len])),
                _ => {}
            }
            msgs = msgs.get(align4(len)..).unwrap_or(&[]);
        }
    }
    Err(io::Error::other("the netlink link dump did not end"))
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

    /// An `RTM_NEWLINK` payload: ifinfomsg with `index`, then `attrs`.
    fn link(index: u32, attrs: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut b = vec![0u8; IFINFOMSG_LEN];
        b[4..8].copy_from_slice(&index.to_ne_bytes());
        for (kind, data) in attrs {
            b.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
            b.extend_from_slice(&kind.to_ne_bytes());
            b.extend_from_slice(data);
            b.resize(align4(b.len()), 0);
        }
        b
    }

    fn linkinfo(kind: &str) -> (u16, Vec<u8>) {
        let mut k = kind.as_bytes().to_vec();
        k.push(0);
        let mut nested = ((4 + k.len()) as u16).to_ne_bytes().to_vec();
        nested.extend_from_slice(&IFLA_INFO_KIND.to_ne_bytes());
        nested.extend_from_slice(&k);
        nested.resize(align4(nested.len()), 0);
        (IFLA_LINKINFO, nested)
    }

    #[test]
    fn only_veths_with_a_peer_in_another_namespace() {
        let netnsid = (IFLA_LINK_NETNSID, 0i32.to_ne_bytes().to_vec());
        assert_eq!(
            cross_ns_veth(&link(7, &[linkinfo("veth"), netnsid.clone()])),
            Some(7)
        );
        // Both ends here: bpf_redirect_peer would drop.
        assert_eq!(cross_ns_veth(&link(8, &[linkinfo("veth")])), None);
        assert_eq!(
            cross_ns_veth(&link(9, &[linkinfo("vethx"), netnsid.clone()])),
            None
        );
        assert_eq!(cross_ns_veth(&link(10, &[linkinfo("bridge")])), None);
        assert_eq!(cross_ns_veth(&link(11, &[])), None);
        // Truncated input is no veth, never a panic.
        assert_eq!(cross_ns_veth(&[0u8; 3]), None);
        let mut cut = link(12, &[linkinfo("veth"), netnsid]);
        cut.truncate(cut.len() - 6);
        assert_eq!(cross_ns_veth(&cut), None);
    }

    #[test]
    fn dumps_this_namespace() {
        // Whatever this namespace holds, the dump ends and loopback is never listed.
        // SAFETY: a valid NUL-terminated name.
        let lo = unsafe { libc::if_nametoindex(c"lo".as_ptr()) };
        let veths = veth_ifindexes().expect("RTM_GETLINK dump");
        assert!(!veths.contains(&lo), "{veths:?}");
    }
}
