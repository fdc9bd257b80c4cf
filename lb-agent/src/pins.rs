//! The pinned-object layer below `dataplane` and `loader`: where the pins live under a bpffs
//! directory ([`PinLayout`]), the map [`Capacities`], the [`LoadError`] both report, and
//! [`open_pinned_map`].
//!
//! Pin layout under `<dir>`: `maps/<MAP>` (names from `lb_common::maps`),
//! `progs/<program>`, `links/xdp-<ifname>` and `links/tc-egress-<ifname>`.
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
    #[error("interface {0:?} does not exist in this network namespace")]
    NoSuchInterface(String),
    #[error("{0} is not on a bpffs mount (mount -t bpf bpf /sys/fs/bpf)")]
    NotBpffs(PathBuf),
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

/// Turn permission failures anywhere in an error chain into [`LoadError::NotPermitted`].
pub(crate) fn classify(what: impl Into<String>, err: LoadError) -> LoadError {
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
}

/// Open a pinned map of `dir` by name (used by `BpfDataplane` and `status`).
pub fn open_pinned_map(pins: &PinLayout, name: &'static str) -> Result<MapData, LoadError> {
    MapData::from_pin(pins.map(name))
        .map_err(|source| classify(format!("opening pinned map {name}"), map_err(name, source)))
}
