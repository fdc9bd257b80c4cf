//! Loads the embedded eBPF object, pins maps, programs and links under a bpffs directory,
//! re-uses pins left by an earlier run, and attaches to / detaches from interfaces.
//!
//! The pin layout under `<dir>` is [`PinLayout`]; it, [`Capacities`], [`LoadError`] and
//! [`open_pinned_map`] live in [`crate::pins`] and are re-exported here.
//!
//! A pinned bpf_link keeps its program attached after the agent exits; a restarted agent
//! swaps its freshly loaded program into the existing link atomically (`bpf_link_update`),
//! so there is never a window without load balancing, and flows continue over the pinned
//! conntrack map.
use std::{io, path::Path};

use aya::{
    maps::{Array, MapData},
    programs::{
        links::{FdLink, LinkError, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        xdp::XdpLink,
        CgroupAttachMode, CgroupSockAddr, LinkOrder, ProgramError, SchedClassifier, TcAttachType,
        Xdp, XdpMode,
    },
    Ebpf, EbpfLoader,
};
use lb_common::{maps, service::config_flags, LbConfig};

use crate::bpfsys;
use crate::dataplane::BpfDataplane;
use crate::pins::{classify, io_err, map_err};
pub use crate::pins::{open_pinned_map, Capacities, LoadError, PinLayout, DEFAULT_BPFFS_DIR};

/// The eBPF object built by `build.rs` (empty when built with `AYA_BUILD_SKIP=1`).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb"));

/// Slots of the half-open table (`LB4_CT_SYN`) for a conntrack of `ct` entries: a quarter,
/// rounded down to a power of two (a flow's slot is its hash masked), at least 1024.
pub fn ct_syn_size(ct: u32) -> u32 {
    let quarter = (ct / 4).clamp(1024, maps::LB4_CT_SYN_MAX);
    1 << quarter.ilog2()
}

/// The datapath's slot mask (`LbConfig::half_open_mask`) for a half-open table of `slots`:
/// the largest power of two that fits, minus one (0 for an empty table).
pub fn half_open_mask(slots: u32) -> u32 {
    match slots {
        0 => 0,
        n => (1u32 << n.ilog2()) - 1,
    }
}

/// Create the conntrack map `LB4_CT` under `dir` with one LRU list per CPU
/// (`BPF_F_NO_COMMON_LRU`) before [`Datapath::load`], which then re-uses it. A map already
/// pinned there is left as it is. For comparing the two LRU flavours (`lb-bench`). The
/// half-open table is an array, no LRU, and is not affected.
pub fn precreate_per_cpu_conntrack(dir: &Path, caps: &Capacities) -> Result<(), LoadError> {
    let pins = PinLayout::new(dir);
    for d in [pins.dir.clone(), pins.maps()] {
        ensure_bpffs(&d)?;
    }
    for (name, entries) in [(maps::LB4_CT, caps.ct)] {
        let path = pins.map(name);
        if path.exists() {
            continue;
        }
        bpfsys::create_lru_hash_pinned::<lb_common::Ct4Key, lb_common::Ct4Value>(
            &path,
            name,
            entries,
            bpfsys::BPF_F_NO_COMMON_LRU,
        )
        .map_err(io_err(format!("creating {} (per-CPU LRU)", path.display())))?;
    }
    Ok(())
}

/// bpffs magic number (`BPF_FS_MAGIC`).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// How the ingress program ended up attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XdpAttachMode {
    /// Native (driver) mode.
    Native,
    /// Generic (skb) mode: the driver has no native XDP.
    Generic,
    /// An existing pinned link was updated in place with the new program.
    Replaced,
    /// At TC ingress (`--attach tc`), not XDP.
    TcIngress,
}

/// The hook the ingress program (DNAT) runs at: `lb-agent run --attach xdp|tc`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Attach {
    /// XDP on the uplink (native where the driver has it); DNATed packets go on through
    /// the node's stack.
    #[default]
    Xdp,
    /// TC ingress (clsact): no XDP program; packets for local pods go straight into the
    /// pod's namespace (`bpf_redirect_peer`). Veth uplinks (kind nodes) may prefer it: XDP
    /// on a veth runs on a copy of each skb.
    Tc,
}

/// The loaded datapath: programs and pinned maps.
pub struct Datapath {
    ebpf: Ebpf,
    pins: PinLayout,
}

fn ensure_bpffs(dir: &Path) -> Result<(), LoadError> {
    std::fs::create_dir_all(dir).map_err(io_err(format!("create {}", dir.display())))?;
    if fs_magic(dir)? != BPF_FS_MAGIC {
        return Err(LoadError::NotBpffs(dir.to_path_buf()));
    }
    // Root-only: the pins hold the node's load-balancing state.
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io_err(format!("chmod {}", dir.display())))?;
    Ok(())
}

fn not_found(e: &LinkError) -> bool {
    matches!(e, LinkError::SyscallError(s) if s.io_error.kind() == io::ErrorKind::NotFound)
}

impl Datapath {
    /// Load the programs and create or re-use the pinned maps under `dir`.
    pub fn load(dir: &Path, caps: &Capacities) -> Result<Self, LoadError> {
        if EBPF_OBJECT.is_empty() {
            return Err(LoadError::NoObject);
        }
        let pins = PinLayout::new(dir);
        for d in [pins.dir.clone(), pins.maps(), pins.progs(), pins.links()] {
            ensure_bpffs(&d)?;
        }
        let maps_dir = pins.maps();
        let ebpf = EbpfLoader::new()
            .default_map_pin_directory(&maps_dir)
            .map_max_entries(maps::LB4_SERVICES, caps.services)
            .map_max_entries(maps::LB4_BACKENDS, caps.backends)
            .map_max_entries(maps::LB4_CT, caps.ct)
            .map_max_entries(maps::LB4_CT_SYN, ct_syn_size(caps.ct))
            .map_max_entries(maps::LB_SVC_STATS, caps.svc_stats)
            .load(EBPF_OBJECT)
            .map_err(|e| classify("loading the eBPF object", e.into()))?;
        let mut dp = Self { ebpf, pins };
        dp.load_programs()?;
        dp.init_config()?;
        Ok(dp)
    }

    pub fn pins(&self) -> &PinLayout {
        &self.pins
    }

    fn load_programs(&mut self) -> Result<(), LoadError> {
        let progs = self.pins.progs();
        for name in [maps::PROG_XDP_INGRESS, maps::PROG_XDP_INGRESS_TIMED] {
            let xdp = self.xdp_program_named(name)?;
            xdp.load().map_err(|source| {
                classify(
                    format!("loading XDP program {name}"),
                    prog_err(name, source),
                )
            })?;
            repin(&progs.join(name), |p| xdp.pin(p))?;
        }
        // The benchmark's floors (programs that only pass the packet): loaded, not pinned.
        let floor = self.xdp_program_named(maps::PROG_XDP_PASS)?;
        floor.load().map_err(|source| {
            classify(
                format!("loading XDP program {}", maps::PROG_XDP_PASS),
                prog_err(maps::PROG_XDP_PASS, source),
            )
        })?;
        let floor = self.tc_program_named(maps::PROG_TC_PASS)?;
        floor.load().map_err(|source| {
            classify(
                format!("loading TC program {}", maps::PROG_TC_PASS),
                prog_err(maps::PROG_TC_PASS, source),
            )
        })?;
        for name in [
            maps::PROG_TC_EGRESS,
            maps::PROG_TC_EGRESS_TIMED,
            maps::PROG_TC_INGRESS,
            maps::PROG_TC_INGRESS_TIMED,
        ] {
            let tc = self.tc_program_named(name)?;
            tc.load().map_err(|source| {
                classify(format!("loading TC program {name}"), prog_err(name, source))
            })?;
            repin(&progs.join(name), |p| tc.pin(p))?;
        }
        for (name, _) in maps::SOCK_PROGS {
            let prog = self.sock_program(name)?;
            prog.load().map_err(|source| {
                classify(
                    format!("loading socket program {name}"),
                    prog_err(name, source),
                )
            })?;
            repin(&progs.join(name), |p| prog.pin(p))?;
        }
        Ok(())
    }

    /// Remove the pins of maps of earlier layouts ([`maps::LEGACY_MAPS`]). Called once the
    /// new programs are attached: an old program still holds its own maps until replaced.
    pub fn remove_legacy_pins(&self) -> Result<(), LoadError> {
        for name in maps::LEGACY_MAPS {
            remove_pin(&self.pins.map(name))?;
        }
        Ok(())
    }

    /// A program of the object by name, as its type `T`.
    fn program_as<'a, T>(&'a mut self, name: &'static str) -> Result<&'a mut T, LoadError>
    where
        &'a mut aya::programs::Program: TryInto<&'a mut T, Error = ProgramError>,
    {
        let prog = self
            .ebpf
            .program_mut(name)
            .ok_or(LoadError::MissingProgram(name))?;
        prog.try_into().map_err(|source| prog_err(name, source))
    }

    /// A socket hook program (`lb_common::maps::SOCK_PROGS`).
    pub fn sock_program(&mut self, name: &'static str) -> Result<&mut CgroupSockAddr, LoadError> {
        self.program_as(name)
    }

    /// Attach the socket hooks (connect4, sendmsg4, recvmsg4, getpeername4) to the cgroup v2
    /// directory `cgroup` and pin their links. Links already pinned for that cgroup (an
    /// earlier agent) get the new programs in place (`BPF_LINK_UPDATE`), so sockets are
    /// never without translation during a restart; links pinned for another cgroup are
    /// removed first. Returns how many links were updated in place.
    pub fn attach_cgroup(&mut self, cgroup: &Path) -> Result<usize, LoadError> {
        use std::os::{fd::AsFd as _, unix::fs::MetadataExt as _};
        let what = format!("cgroup {}", cgroup.display());
        let dir = std::fs::File::open(cgroup).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => LoadError::NoSuchCgroup(cgroup.to_path_buf()),
            _ => io_err(format!("opening {what}"))(e),
        })?;
        if !is_cgroup2(cgroup)? {
            return Err(LoadError::NotCgroup2(cgroup.to_path_buf()));
        }
        // On cgroup v2 a directory's inode number is its cgroup id.
        let cgroup_id = dir
            .metadata()
            .map_err(io_err(format!("stat {what}")))?
            .ino();
        let mut updated = 0;
        for (name, point) in maps::SOCK_PROGS {
            let pin = self.pins.cgroup_link(point);
            match bpfsys::obj_get(&pin) {
                Ok(link) => {
                    let target = bpfsys::link_cgroup_id(link.as_fd())
                        .map_err(io_err(format!("reading link {}", pin.display())))?;
                    if target == Some(cgroup_id) {
                        let prog = self.sock_program(name)?;
                        let fd = prog.fd().map_err(|source| prog_err(name, source))?;
                        bpfsys::link_update(link.as_fd(), fd.as_fd())
                            .map_err(io_err(format!("updating link {}", pin.display())))?;
                        updated += 1;
                        continue;
                    }
                    // Pinned for another cgroup: unpinning detaches it (no one else holds it).
                    drop(link);
                    remove_pin(&pin)?;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(format!("opening link {}", pin.display()))(e)),
            }
            let prog = self.sock_program(name)?;
            let id = prog
                .attach(&dir, CgroupAttachMode::Single)
                .map_err(|source| {
                    classify(
                        format!("attaching {name} to {what}"),
                        prog_err(name, source),
                    )
                })?;
            let link = prog
                .take_link(id)
                .map_err(|source| prog_err(name, source))?;
            let fd: FdLink = link.try_into().map_err(|source| LoadError::Link {
                path: pin.clone(),
                source,
            })?;
            repin_link(fd, &pin)?;
        }
        Ok(updated)
    }

    /// Seed the flow hash once; a pinned config keeps its seed across restarts so flows
    /// hash the same way. Record the half-open table's size, which the datapath masks its
    /// slot hash with: that of the pinned map, which a restarted agent re-uses.
    fn init_config(&mut self) -> Result<(), LoadError> {
        let half_open_slots = open_pinned_map(&self.pins, maps::LB4_CT_SYN)?
            .info()
            .map_err(|source| map_err(maps::LB4_CT_SYN, source))?
            .max_entries();
        let map = self
            .ebpf
            .map_mut(maps::LB_CONFIG)
            .ok_or(LoadError::MissingMap(maps::LB_CONFIG))?;
        let mut cfg: Array<&mut MapData, LbConfig> =
            Array::try_from(map).map_err(|source| map_err(maps::LB_CONFIG, source))?;
        let cur = cfg
            .get(&0, 0)
            .map_err(|source| map_err(maps::LB_CONFIG, source))?;
        let want = LbConfig {
            hash_seed: if cur.hash_seed == 0 {
                random_u32().max(1)
            } else {
                cur.hash_seed
            },
            half_open_mask: half_open_mask(half_open_slots),
            ..cur
        };
        if want != cur {
            cfg.set(0, want, 0)
                .map_err(|source| map_err(maps::LB_CONFIG, source))?;
        }
        Ok(())
    }

    /// The XDP program (for attaching, and for `test_run` in fixture tests).
    pub fn xdp_program(&mut self) -> Result<&mut Xdp, LoadError> {
        self.xdp_program_named(maps::PROG_XDP_INGRESS)
    }

    /// An XDP program by name: `lb_xdp_ingress` or its timed variant.
    pub fn xdp_program_named(&mut self, name: &'static str) -> Result<&mut Xdp, LoadError> {
        self.program_as(name)
    }

    /// The TC program (for attaching, and for `test_run` in fixture tests).
    pub fn tc_program(&mut self) -> Result<&mut SchedClassifier, LoadError> {
        self.tc_program_named(maps::PROG_TC_EGRESS)
    }

    /// A TC program by name: `lb_tc_egress` or its timed variant.
    pub fn tc_program_named(
        &mut self,
        name: &'static str,
    ) -> Result<&mut SchedClassifier, LoadError> {
        self.program_as(name)
    }

    /// Attach XDP ingress and TC egress to `iface` and pin both links. If links are already
    /// pinned for `iface` (an earlier agent), the new programs replace the old ones inside
    /// those links atomically.
    pub fn attach(&mut self, iface: &str) -> Result<XdpAttachMode, LoadError> {
        self.attach_with(iface, false)
    }

    /// [`Datapath::attach`]; with `timed`, the program variants that record their own run
    /// time in `LB_LATENCY` (`--latency-histogram`).
    pub fn attach_with(&mut self, iface: &str, timed: bool) -> Result<XdpAttachMode, LoadError> {
        self.attach_hook(iface, Attach::Xdp, timed)
    }

    /// Attach the ingress program at `hook` and TC egress to `iface`, pinning the links.
    /// The ingress program's link at the other hook (an earlier agent's `--attach`) is
    /// removed once the new one is in place, so that switching hooks leaves no gap.
    pub fn attach_hook(
        &mut self,
        iface: &str,
        hook: Attach,
        timed: bool,
    ) -> Result<XdpAttachMode, LoadError> {
        if nix_if_nametoindex(iface) == 0 {
            return Err(LoadError::NoSuchInterface(iface.to_string()));
        }
        let egress = if timed {
            maps::PROG_TC_EGRESS_TIMED
        } else {
            maps::PROG_TC_EGRESS
        };
        let xdp_pin = self.pins.xdp_link(iface);
        let ingress_pin = self.pins.tc_ingress_link(iface);
        let mode = match hook {
            Attach::Xdp => {
                let name = if timed {
                    maps::PROG_XDP_INGRESS_TIMED
                } else {
                    maps::PROG_XDP_INGRESS
                };
                let mode = self.attach_xdp(iface, &xdp_pin, name)?;
                remove_pin(&ingress_pin)?;
                mode
            }
            Attach::Tc => {
                let name = if timed {
                    maps::PROG_TC_INGRESS_TIMED
                } else {
                    maps::PROG_TC_INGRESS
                };
                self.attach_tc(iface, &ingress_pin, name, TcAttachType::Ingress)?;
                remove_pin(&xdp_pin)?;
                XdpAttachMode::TcIngress
            }
        };
        let egress_pin = self.pins.tc_link(iface);
        self.attach_tc(iface, &egress_pin, egress, TcAttachType::Egress)?;
        Ok(mode)
    }

    fn attach_xdp(
        &mut self,
        iface: &str,
        pin: &Path,
        name: &'static str,
    ) -> Result<XdpAttachMode, LoadError> {
        let what = format!("attaching XDP to {iface}");
        let xdp = self.xdp_program_named(name)?;
        let (id, mode) = match PinnedLink::from_pin(pin) {
            Ok(old) => {
                let link =
                    XdpLink::try_from(FdLink::from(old)).map_err(|source| LoadError::Link {
                        path: pin.to_path_buf(),
                        source,
                    })?;
                let id = xdp
                    .attach_to_link(link)
                    .map_err(|source| classify(&what, prog_err(name, source)))?;
                (id, XdpAttachMode::Replaced)
            }
            Err(e) if not_found(&e) => match xdp.attach(iface, XdpMode::Driver) {
                Ok(id) => (id, XdpAttachMode::Native),
                Err(native_err) => {
                    log::warn!("native XDP on {iface} failed ({native_err}); using generic mode");
                    let id = xdp
                        .attach(iface, XdpMode::Skb)
                        .map_err(|source| classify(&what, prog_err(name, source)))?;
                    (id, XdpAttachMode::Generic)
                }
            },
            Err(source) => {
                return Err(LoadError::Link {
                    path: pin.to_path_buf(),
                    source,
                })
            }
        };
        let link = xdp.take_link(id).map_err(|source| prog_err(name, source))?;
        let fd: FdLink = link.try_into().map_err(|source| LoadError::Link {
            path: pin.to_path_buf(),
            source,
        })?;
        repin_link(fd, pin)?;
        Ok(mode)
    }

    fn attach_tc(
        &mut self,
        iface: &str,
        pin: &Path,
        name: &'static str,
        at: TcAttachType,
    ) -> Result<(), LoadError> {
        let what = format!("attaching TC {at:?} to {iface}");
        let tc = self.tc_program_named(name)?;
        let id = match PinnedLink::from_pin(pin) {
            Ok(old) => {
                let link = SchedClassifierLink::try_from(FdLink::from(old)).map_err(|source| {
                    LoadError::Link {
                        path: pin.to_path_buf(),
                        source,
                    }
                })?;
                tc.attach_to_link(link)
                    .map_err(|source| classify(&what, prog_err(name, source)))?
            }
            Err(e) if not_found(&e) => tc
                .attach_with_options(iface, at, TcAttachOptions::TcxOrder(LinkOrder::default()))
                .map_err(|source| classify(&what, prog_err(name, source)))?,
            Err(source) => {
                return Err(LoadError::Link {
                    path: pin.to_path_buf(),
                    source,
                })
            }
        };
        let link = tc.take_link(id).map_err(|source| prog_err(name, source))?;
        let fd: FdLink = link.try_into().map_err(|source| LoadError::Link {
            path: pin.to_path_buf(),
            source,
        })?;
        repin_link(fd, pin)
    }

    /// Typed access to the maps of this loaded datapath.
    pub fn dataplane(&mut self) -> Result<BpfDataplane, LoadError> {
        BpfDataplane::open(&self.pins)
    }

    /// The kernel verifier's processed-instruction count per program.
    pub fn verified_insns(&mut self) -> Result<Vec<(&'static str, u32)>, LoadError> {
        let count = |info: Result<aya::programs::ProgramInfo, ProgramError>, name| {
            info.map_err(|source| prog_err(name, source))
                .map(|i| i.verified_instruction_count().unwrap_or(0))
        };
        let xdp = count(self.xdp_program()?.info(), maps::PROG_XDP_INGRESS)?;
        let tc = count(self.tc_program()?.info(), maps::PROG_TC_EGRESS)?;
        let tc_in = count(
            self.tc_program_named(maps::PROG_TC_INGRESS)?.info(),
            maps::PROG_TC_INGRESS,
        )?;
        Ok(vec![
            (maps::PROG_XDP_INGRESS, xdp),
            (maps::PROG_TC_EGRESS, tc),
            (maps::PROG_TC_INGRESS, tc_in),
        ])
    }
}

/// Detach the socket hooks from their cgroup (remove their link pins).
pub fn detach_cgroup(dir: &Path) -> Result<(), LoadError> {
    let pins = PinLayout::new(dir);
    for (_, point) in maps::SOCK_PROGS {
        remove_pin(&pins.cgroup_link(point))?;
    }
    Ok(())
}

/// The cgroup the socket hooks pinned under `dir` are attached to, by id (`None`: none).
pub fn attached_cgroup_id(dir: &Path) -> Option<u64> {
    use std::os::fd::AsFd as _;
    let pins = PinLayout::new(dir);
    let link = bpfsys::obj_get(&pins.cgroup_link(maps::SOCK_PROGS[0].1)).ok()?;
    bpfsys::link_cgroup_id(link.as_fd()).ok().flatten()
}

/// The mount point of the first `cgroup2` line of a `/proc/mounts` text (on a hybrid host,
/// the unified mount).
pub fn cgroup2_mount(mounts: &str) -> Option<std::path::PathBuf> {
    mounts.lines().find_map(|line| {
        let mut f = line.split_whitespace();
        let (_, point, fstype) = (f.next()?, f.next()?, f.next()?);
        (fstype == "cgroup2").then(|| std::path::PathBuf::from(point.replace("\\040", " ")))
    })
}

/// `CGROUP2_SUPER_MAGIC`.
const CGROUP2_MAGIC: i64 = 0x6367_7270;

fn is_cgroup2(dir: &Path) -> Result<bool, LoadError> {
    Ok(fs_magic(dir)? == CGROUP2_MAGIC)
}

/// The filesystem type (`statfs.f_type`) of the mount holding `dir`.
fn fs_magic(dir: &Path) -> Result<i64, LoadError> {
    // SAFETY: statfs on a valid NUL-terminated path into a zeroed struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let cpath = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|e| io_err(format!("path {}", dir.display()))(io::Error::other(e)))?;
    // SAFETY: as above.
    if unsafe { libc::statfs(cpath.as_ptr(), &mut st) } != 0 {
        return Err(io_err(format!("statfs {}", dir.display()))(
            io::Error::last_os_error(),
        ));
    }
    #[allow(
        clippy::unnecessary_cast,
        reason = "f_type is i64 on x86_64 but u32 elsewhere"
    )]
    Ok(st.f_type as i64)
}

/// Detach from `iface`: removing the link pins releases the last reference to the links,
/// which detaches the programs. Missing pins are not an error (already detached).
pub fn detach(dir: &Path, iface: &str) -> Result<(), LoadError> {
    let pins = PinLayout::new(dir);
    for pin in [pins.xdp_link(iface), pins.tc_link(iface)] {
        remove_pin(&pin)?;
    }
    Ok(())
}

/// `lb_xdp_pass` attached to veth peers: the far end of a veth uplink needs an XDP program
/// for the frames the datapath sends with XDP_TX or XDP_REDIRECT to be received promptly
/// (a veth schedules its peer's NAPI for XDP frames only then). Detached when dropped.
pub struct XdpPass {
    _ebpf: Ebpf,
}

impl XdpPass {
    /// Load `lb_xdp_pass` (its object's maps sized to one entry and pinned under
    /// `pin_dir/maps`, never created at the bpffs root) and attach it in native mode to each
    /// of `ifaces` in the calling thread's network namespace.
    pub fn attach(ifaces: &[&str], pin_dir: &Path) -> Result<Self, LoadError> {
        if EBPF_OBJECT.is_empty() {
            return Err(LoadError::NoObject);
        }
        let pins = PinLayout::new(pin_dir);
        for d in [pins.dir.clone(), pins.maps()] {
            ensure_bpffs(&d)?;
        }
        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(pins.maps());
        for name in maps::ALL_MAPS {
            if name != maps::LB_CONFIG {
                loader.map_max_entries(name, 1);
            }
        }
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .map_err(|e| classify("loading the eBPF object", e.into()))?;
        let prog: &mut Xdp = ebpf
            .program_mut(maps::PROG_XDP_PASS)
            .ok_or(LoadError::MissingProgram(maps::PROG_XDP_PASS))?
            .try_into()
            .map_err(|source| prog_err(maps::PROG_XDP_PASS, source))?;
        prog.load().map_err(|source| {
            classify("loading lb_xdp_pass", prog_err(maps::PROG_XDP_PASS, source))
        })?;
        for iface in ifaces {
            prog.attach(iface, XdpMode::Driver).map_err(|source| {
                classify(
                    format!("attaching lb_xdp_pass to {iface}"),
                    prog_err(maps::PROG_XDP_PASS, source),
                )
            })?;
        }
        Ok(Self { _ebpf: ebpf })
    }
}

/// Change the pinned `LB_CONFIG` with `f` (written only when it changed).
pub(crate) fn update_config(
    pins: &PinLayout,
    f: impl FnOnce(&mut LbConfig),
) -> Result<(), LoadError> {
    let data = open_pinned_map(pins, maps::LB_CONFIG)?;
    let map = aya::maps::Map::Array(data);
    let mut cfg: Array<MapData, LbConfig> =
        Array::try_from(map).map_err(|source| map_err(maps::LB_CONFIG, source))?;
    let cur = cfg
        .get(&0, 0)
        .map_err(|source| map_err(maps::LB_CONFIG, source))?;
    let mut new = cur;
    f(&mut new);
    if new != cur {
        cfg.set(0, new, 0)
            .map_err(|source| map_err(maps::LB_CONFIG, source))?;
    }
    Ok(())
}

/// Set the SNAT source address (`None`: the address each client connected to) and port
/// range of flows to remote backends in the pinned `LB_CONFIG`, keeping the hash seed.
pub fn set_snat(
    pins: &PinLayout,
    addr: Option<std::net::Ipv4Addr>,
    ports: &std::ops::RangeInclusive<u16>,
) -> Result<(), LoadError> {
    update_config(pins, |c| {
        c.snat_addr = addr.map_or(0, |a| u32::from(a).to_be());
        c.snat_port_min = *ports.start();
        c.snat_port_max = *ports.end();
    })
}

/// The datapath's conntrack timeouts (seconds; 0 keeps the built-in default) and ICMP
/// reject rate (per second and CPU; 0: never reply, drop), from the agent's flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CtPolicy {
    pub tcp_syn_s: u32,
    pub tcp_s: u32,
    pub tcp_fin_s: u32,
    pub udp_s: u32,
    pub reject_per_s: u32,
}

/// Write `p` into the pinned `LB_CONFIG`; returns the whole config as written (for the GC).
pub fn set_ct_policy(pins: &PinLayout, p: &CtPolicy) -> Result<LbConfig, LoadError> {
    update_config(pins, |c| {
        c.ct_timeout_tcp_syn_s = p.tcp_syn_s;
        c.ct_timeout_tcp_s = p.tcp_s;
        c.ct_timeout_tcp_fin_s = p.tcp_fin_s;
        c.ct_timeout_udp_s = p.udp_s;
        c.reject_per_s = p.reject_per_s;
    })?;
    read_config(pins)
}

/// The pinned `LB_CONFIG`.
pub fn read_config(pins: &PinLayout) -> Result<LbConfig, LoadError> {
    let data = open_pinned_map(pins, maps::LB_CONFIG)?;
    let cfg: Array<MapData, LbConfig> = Array::try_from(aya::maps::Map::Array(data))
        .map_err(|source| map_err(maps::LB_CONFIG, source))?;
    cfg.get(&0, 0)
        .map_err(|source| map_err(maps::LB_CONFIG, source))
}

/// Tell the socket hooks which network namespace is the node's own (the calling thread's:
/// 127.0.0.0/8 is the node's loopback only there) and whether NodePorts answer on it.
pub fn set_socket_policy(pins: &PinLayout, localhost_nodeports: bool) -> Result<(), LoadError> {
    let cookie = own_netns_cookie().map_err(io_err("reading SO_NETNS_COOKIE"))?;
    update_config(pins, |c| {
        c.host_netns_cookie = cookie;
        if localhost_nodeports {
            c.flags |= config_flags::LOCALHOST_NODEPORTS;
        } else {
            c.flags &= !config_flags::LOCALHOST_NODEPORTS;
        }
    })
}

/// The cookie of the calling thread's network namespace (`SO_NETNS_COOKIE`, Linux 5.14).
pub fn own_netns_cookie() -> io::Result<u64> {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    use std::os::fd::AsRawFd as _;
    // SAFETY: getsockopt into a u64 of the stated length on an open socket.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            std::ptr::from_mut(&mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// Detach from every interface and remove every pin (maps included) under `dir`, then `dir`
/// itself. Refuses, removing nothing, when `dir` holds anything but this tool's pin layout
/// ([`PinLayout::owned_entries`]): `--bpffs /sys/fs/bpf` must never remove other programs'
/// pins.
pub fn teardown(dir: &Path) -> Result<(), LoadError> {
    if !dir.exists() {
        return Ok(());
    }
    for entry in PinLayout::new(dir).owned_entries()? {
        if entry.is_dir() {
            std::fs::remove_dir(&entry).map_err(io_err(format!("remove {}", entry.display())))?;
        } else {
            remove_pin(&entry)?;
        }
    }
    std::fs::remove_dir(dir).map_err(io_err(format!("remove {}", dir.display())))
}

/// Interfaces with a pinned ingress link under `dir`, each with its hook (`xdp` or `tc`;
/// both while an agent switches hooks), sorted by interface.
pub fn attached_hooks(dir: &Path) -> Vec<(String, String)> {
    let pins = PinLayout::new(dir);
    let mut out: std::collections::BTreeMap<String, Vec<&str>> = Default::default();
    for e in std::fs::read_dir(pins.links())
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        let hook = if let Some(i) = name.strip_prefix("xdp-") {
            Some((i.to_string(), "xdp"))
        } else {
            name.strip_prefix("tc-ingress-")
                .map(|i| (i.to_string(), "tc"))
        };
        if let Some((iface, hook)) = hook {
            out.entry(iface).or_default().push(hook);
        }
    }
    out.into_iter()
        .map(|(iface, mut hooks)| {
            hooks.sort_unstable();
            (iface, hooks.join("+"))
        })
        .collect()
}

fn remove_pin(pin: &Path) -> Result<(), LoadError> {
    match std::fs::remove_file(pin) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(format!("unpin {}", pin.display()))(e)),
    }
}

fn repin(
    path: &Path,
    pin: impl FnOnce(&Path) -> Result<(), aya::pin::PinError>,
) -> Result<(), LoadError> {
    remove_pin(path)?;
    pin(path).map_err(|e| io_err(format!("pin {}", path.display()))(io::Error::other(e)))
}

fn repin_link(fd: FdLink, pin: &Path) -> Result<(), LoadError> {
    // The old pin (if any) refers to the same link object we just updated; replace it.
    remove_pin(pin)?;
    fd.pin(pin)
        .map(|_| ())
        .map_err(|e| io_err(format!("pin {}", pin.display()))(io::Error::other(e)))
}

fn prog_err(name: &'static str, source: ProgramError) -> LoadError {
    LoadError::Program { name, source }
}

fn nix_if_nametoindex(iface: &str) -> u32 {
    match std::ffi::CString::new(iface) {
        // SAFETY: valid NUL-terminated string.
        Ok(c) => unsafe { libc::if_nametoindex(c.as_ptr()) },
        Err(_) => 0,
    }
}

fn random_u32() -> u32 {
    let mut buf = [0u8; 4];
    // SAFETY: writes at most 4 bytes into buf.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n == 4 {
        u32::from_ne_bytes(buf)
    } else {
        // Fall back to the clock; the seed only needs to differ between nodes.
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.subsec_nanos() ^ d.as_secs() as u32)
    }
}
