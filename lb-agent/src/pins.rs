//! The pinned-object layer below `dataplane` and `loader`: where the pins live under a bpffs
//! directory ([`PinLayout`]), the map [`Capacities`], the [`LoadError`] both report, and
//! [`open_pinned_map`].
//!
//! Pin layout under `<dir>`: `maps/<MAP>` (names from `lb_common::maps`),
//! `progs/<program>`, `links/xdp-<ifname>`, `links/tc-egress-<ifname>` and
//! `links/cgroup-<attach point>` (the socket hooks).
use std::{io, path::PathBuf};

use aya::{
    maps::{MapData, MapError},
    programs::{links::LinkError, ProgramError},
};
use lb_common::maps;

/// Default pin directory.
pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/lb";

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "lb-agent was built with AYA_BUILD_SKIP=1 and embeds no eBPF object; rebuild without it"
    )]
    NoObject,
    #[error(
        "{what}: operation not permitted. The datapath needs CAP_BPF, CAP_NET_ADMIN and \
         CAP_PERFMON (run as root, or grant those capabilities)"
    )]
    NotPermitted { what: String },
    #[error("{what}: the kernel's verifier rejected the program; the end of its log:\n{log}")]
    Verifier { what: String, log: String },
    #[error("interface {0:?} does not exist in this network namespace")]
    NoSuchInterface(String),
    #[error("cgroup {0} does not exist (give --cgroup a cgroup v2 directory, or off)")]
    NoSuchCgroup(PathBuf),
    #[error("{0} is not a cgroup v2 directory (give --cgroup a directory under the cgroup2 mount, or off)")]
    NotCgroup2(PathBuf),
    #[error("{0} is not on a bpffs mount (mount -t bpf bpf /sys/fs/bpf)")]
    NotBpffs(PathBuf),
    #[error(
        "{dir} does not hold lb-agent's pin layout (maps/, progs/, links/ with its own pin \
         names); refusing to remove it. Unexpected: {}",
        unexpected.join(", ")
    )]
    NotOurPins {
        dir: PathBuf,
        unexpected: Vec<String>,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("loading the eBPF object: {0}")]
    Ebpf(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("pinned link {path}: {source}")]
    Link {
        path: PathBuf,
        #[source]
        source: LinkError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("map {0} is missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("program {0} is missing from the eBPF object")]
    MissingProgram(&'static str),
}

fn is_eperm(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<io::Error>() {
            if matches!(io.raw_os_error(), Some(libc::EPERM) | Some(libc::EACCES)) {
                return true;
            }
        }
        cur = err.source();
    }
    false
}

/// The last lines of the verifier's log, if a program load in `e`'s chain has one (a load
/// refused for lack of privileges is refused before the verifier runs: no log).
fn verifier_log_tail(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    const LINES: usize = 40;
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(ProgramError::LoadError { verifier_log, .. }) = err.downcast_ref() {
            let log = verifier_log.to_string();
            let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
            if !lines.is_empty() {
                return Some(lines[lines.len().saturating_sub(LINES)..].join("\n"));
            }
        }
        cur = err.source();
    }
    None
}

/// Turn permission failures anywhere in an error chain into [`LoadError::NotPermitted`], and
/// a verifier rejection (which the kernel also reports as EACCES) into
/// [`LoadError::Verifier`] with the end of its log.
pub(crate) fn classify(what: impl Into<String>, err: LoadError) -> LoadError {
    if let Some(log) = verifier_log_tail(&err) {
        return LoadError::Verifier {
            what: what.into(),
            log,
        };
    }
    if is_eperm(&err) {
        LoadError::NotPermitted { what: what.into() }
    } else {
        err
    }
}

pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> LoadError {
    let what = what.into();
    move |source| match source.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => LoadError::NotPermitted { what },
        _ => LoadError::Io { what, source },
    }
}

pub(crate) fn map_err(name: &'static str, source: MapError) -> LoadError {
    LoadError::Map { name, source }
}

/// Map capacities; defaults from `lb_common::maps`. Raising them needs a fresh pin dir
/// (a pinned map keeps the size it was created with).
#[derive(Debug, Clone, Copy)]
pub struct Capacities {
    pub services: u32,
    pub backends: u32,
    pub ct: u32,
    pub svc_stats: u32,
}

impl Default for Capacities {
    fn default() -> Self {
        Self {
            services: maps::LB4_SERVICES_MAX,
            backends: maps::LB4_BACKENDS_MAX,
            ct: maps::LB4_CT_MAX,
            svc_stats: maps::LB_SVC_STATS_MAX,
        }
    }
}

/// Paths of the pins under a directory.
#[derive(Debug, Clone)]
pub struct PinLayout {
    pub dir: PathBuf,
}

impl PinLayout {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }
    pub fn maps(&self) -> PathBuf {
        self.dir.join("maps")
    }
    pub fn map(&self, name: &str) -> PathBuf {
        self.maps().join(name)
    }
    pub fn progs(&self) -> PathBuf {
        self.dir.join("progs")
    }
    pub fn links(&self) -> PathBuf {
        self.dir.join("links")
    }
    pub fn xdp_link(&self, iface: &str) -> PathBuf {
        self.links().join(format!("xdp-{iface}"))
    }
    pub fn tc_link(&self, iface: &str) -> PathBuf {
        self.links().join(format!("tc-egress-{iface}"))
    }
    /// The ingress program at TC ingress (`--attach tc`), instead of [`PinLayout::xdp_link`].
    pub fn tc_ingress_link(&self, iface: &str) -> PathBuf {
        self.links().join(format!("tc-ingress-{iface}"))
    }
    /// The link of the socket hook at `point` (`connect4`, ...: `lb_common::maps::SOCK_PROGS`).
    pub fn cgroup_link(&self, point: &str) -> PathBuf {
        self.links().join(format!("cgroup-{point}"))
    }
}

fn is_own_prog(n: &str) -> bool {
    n == maps::PROG_XDP_INGRESS
        || n == maps::PROG_TC_EGRESS
        || n == maps::PROG_XDP_INGRESS_TIMED
        || n == maps::PROG_TC_EGRESS_TIMED
        || n == maps::PROG_TC_INGRESS
        || n == maps::PROG_TC_INGRESS_TIMED
        || maps::SOCK_PROGS.iter().any(|(p, _)| *p == n)
}

fn is_own_link(n: &str) -> bool {
    n.strip_prefix("xdp-")
        .or_else(|| n.strip_prefix("tc-egress-"))
        .or_else(|| n.strip_prefix("tc-ingress-"))
        .is_some_and(|iface| !iface.is_empty())
        || n.strip_prefix("cgroup-")
            .is_some_and(|p| maps::SOCK_PROGS.iter().any(|(_, point)| *point == p))
}

impl PinLayout {
    /// Every pin under the directory, after checking that it holds this tool's layout and
    /// nothing else: at most `maps/`, `progs/` and `links/`, holding only pins named as the
    /// maps (current or [`maps::LEGACY_MAPS`]) and programs of `lb_common::maps`,
    /// `links/xdp-<if>`, `links/tc-ingress-<if>`, `links/tc-egress-<if>` and
    /// `links/cgroup-<point>`.
    /// Anything else (another program's pins, a bpffs root such as `/sys/fs/bpf`) is
    /// [`LoadError::NotOurPins`]. Returns the pins, then the sub-directories, in removal order.
    pub fn owned_entries(&self) -> Result<Vec<PathBuf>, LoadError> {
        let read = |d: &std::path::Path| -> Result<Vec<String>, LoadError> {
            let rd = std::fs::read_dir(d).map_err(|source| LoadError::Io {
                what: format!("reading {}", d.display()),
                source,
            })?;
            let mut names = Vec::new();
            for e in rd {
                let e = e.map_err(|source| LoadError::Io {
                    what: format!("reading {}", d.display()),
                    source,
                })?;
                names.push(e.file_name().to_string_lossy().into_owned());
            }
            names.sort();
            Ok(names)
        };
        let mut unexpected = Vec::new();
        let mut pins = Vec::new();
        let mut dirs = Vec::new();
        for top in read(&self.dir)? {
            let path = self.dir.join(&top);
            let allowed: fn(&str) -> bool = match top.as_str() {
                "maps" => |n| maps::ALL_MAPS.contains(&n) || maps::LEGACY_MAPS.contains(&n),
                "progs" => is_own_prog,
                "links" => is_own_link,
                _ => {
                    unexpected.push(top);
                    continue;
                }
            };
            if !path.is_dir() {
                unexpected.push(top);
                continue;
            }
            for name in read(&path)? {
                if allowed(&name) {
                    pins.push(path.join(&name));
                } else {
                    unexpected.push(format!("{top}/{name}"));
                }
            }
            dirs.push(path);
        }
        if !unexpected.is_empty() {
            return Err(LoadError::NotOurPins {
                dir: self.dir.clone(),
                unexpected,
            });
        }
        pins.extend(dirs);
        Ok(pins)
    }
}

/// Open a pinned map of `dir` by name (used by `BpfDataplane` and `status`).
pub fn open_pinned_map(pins: &PinLayout, name: &'static str) -> Result<MapData, LoadError> {
    MapData::from_pin(pins.map(name))
        .map_err(|source| classify(format!("opening pinned map {name}"), map_err(name, source)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(name: &str, files: &[&str]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("lb-pins-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for f in files {
            let p = dir.join(f);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            if !f.ends_with('/') {
                std::fs::write(&p, b"").expect("write");
            }
        }
        std::fs::create_dir_all(&dir).expect("mkdir");
        dir
    }

    #[test]
    fn own_layout_is_listed_pins_first() {
        let dir = tree(
            "own",
            &[
                "maps/LB4_CT_V1",
                "maps/LB_STATS_V1",
                "progs/lb_xdp_ingress",
                "maps/LB_CONFIG_V1",
                "progs/lb_sock_connect4",
                "links/xdp-eth0",
                "links/tc-egress-eth0",
                "links/cgroup-connect4",
            ],
        );
        let entries = PinLayout::new(&dir).owned_entries().expect("own layout");
        let rel: Vec<String> = entries
            .iter()
            .map(|p| {
                p.strip_prefix(&dir)
                    .expect("under dir")
                    .display()
                    .to_string()
            })
            .collect();
        assert_eq!(
            rel,
            [
                "links/cgroup-connect4",
                "links/tc-egress-eth0",
                "links/xdp-eth0",
                "maps/LB4_CT_V1",
                "maps/LB_CONFIG_V1",
                "maps/LB_STATS_V1",
                "progs/lb_sock_connect4",
                "progs/lb_xdp_ingress",
                "links",
                "maps",
                "progs"
            ]
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_foreign_directory_is_refused_with_what_is_foreign() {
        let dir = tree(
            "foreign",
            &[
                "maps/LB4_CT_V1",
                "maps/cilium_lb4_services_v2",
                "tc/globals/",
                "links/xdp-",
                "links/cgroup-bind4",
                "progs/lb_xdp_ingress",
            ],
        );
        let err = PinLayout::new(&dir)
            .owned_entries()
            .expect_err("foreign pins");
        let msg = err.to_string();
        for foreign in [
            "maps/cilium_lb4_services_v2",
            "tc",
            "links/xdp-",
            "links/cgroup-bind4",
        ] {
            assert!(msg.contains(foreign), "{foreign} not named in: {msg}");
        }
        assert!(!msg.contains("LB4_CT_V1"), "{msg}");
        assert!(msg.contains("refusing to remove it"), "{msg}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
