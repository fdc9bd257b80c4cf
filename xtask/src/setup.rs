//! `cargo xtask setup`: installs what the build, the tests, the lab and the benchmarks need on a
//! fresh Debian machine, skipping whatever is already there. [`ensure`] is also the first step
//! of `test`, `run` and `bench`.
//!
//! 1. rust-src for the nightly toolchain (aya-build compiles the eBPF crate with
//!    `-Z build-std=core`).
//! 2. bpf-linker 0.13, linked against the nightly toolchain's own libLLVM (so its LLVM is the
//!    one rustc emits bitcode for).
//! 3. Debian packages: iproute2, iptables (nft backend), nftables, ethtool, conntrack, procps,
//!    and bpftool when apt has it.
//! 4. bpffs mounted at /sys/fs/bpf.
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context as _};

use crate::progress::{Done, Progress};
use crate::util::{self, Cmd, Echo};

/// The bpf-linker minor series we install and accept (`cargo install --version ^0.13`).
const BPF_LINKER_SERIES: &str = "0.13";
const BPFFS: &str = "/sys/fs/bpf";

/// A Debian package and the binaries that tell it is installed.
struct Pkg {
    package: &'static str,
    /// Binaries looked up in PATH, or absolute paths of files the package ships.
    bins: &'static [&'static str],
    /// Installed when apt knows the package, silently left out otherwise.
    optional: bool,
}

/// Packages the tests, the lab and the benchmarks use. Add a row to add one.
const PACKAGES: &[Pkg] = &[
    Pkg {
        package: "iproute2",
        bins: &["ip", "tc"],
        optional: false,
    },
    Pkg {
        package: "iptables",
        bins: &["iptables", "iptables-restore"],
        optional: false,
    },
    Pkg {
        package: "nftables",
        bins: &["nft"],
        optional: false,
    },
    Pkg {
        package: "ethtool",
        bins: &["ethtool"],
        optional: false,
    },
    Pkg {
        package: "conntrack",
        bins: &["conntrack"],
        optional: false,
    },
    Pkg {
        package: "procps",
        bins: &["ps", "sysctl"],
        optional: false,
    },
    Pkg {
        package: "util-linux",
        bins: &["nsenter", "setpriv"],
        optional: false,
    },
    Pkg {
        // The benchmark plots' PNG text (plotters reads the TTF at run time).
        package: "fonts-dejavu-core",
        bins: &["/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"],
        optional: false,
    },
    Pkg {
        package: "bpftool",
        bins: &["bpftool"],
        optional: true,
    },
];

/// Installs whatever is missing, printing one numbered step per item on `p`.
pub fn ensure(p: &Progress) -> anyhow::Result<()> {
    p.section(4);
    p.step("rust-src for the nightly toolchain", || rust_src(p))?;
    let mut linker = String::new();
    p.step("bpf-linker 0.13 built against nightly's LLVM", || {
        bpf_linker(p, &mut linker)
    })?;
    p.step(
        "Debian packages (iproute2, iptables, nftables, ethtool, conntrack, procps, util-linux, fonts-dejavu-core, bpftool)",
        || packages(p),
    )?;
    p.step("bpffs mounted at /sys/fs/bpf", bpffs)?;
    p.note(&format!(
        "setup: ready (rust-src ✓, bpf-linker {linker} ✓, packages ✓, bpffs ✓)"
    ));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 1. rust-src

fn rust_src(p: &Progress) -> anyhow::Result<Done> {
    let installed = Cmd::new("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .capture()
        .context("the nightly toolchain is required (it builds the eBPF crate)")?;
    if installed.stdout.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(Done::Skipped("already present".into()));
    }
    Cmd::new("rustup")
        .args(["component", "add", "rust-src", "--toolchain", "nightly"])
        .stream(p, Echo::Indented)?;
    Ok(Done::Ran(None))
}

// ---------------------------------------------------------------------------------------------
// 2. bpf-linker

/// The nightly toolchain's shared libLLVM.
#[derive(Debug)]
struct NightlyLlvm {
    /// `$sysroot/lib`, which rustup puts in `LD_LIBRARY_PATH` for `cargo +nightly`.
    lib_dir: PathBuf,
    /// e.g. `$sysroot/lib/libLLVM.so.22.1-rust-1.97.0-nightly`
    file: PathBuf,
    /// e.g. 22, for bpf-linker's `llvm-22` feature.
    major: u32,
}

fn nightly_llvm() -> anyhow::Result<NightlyLlvm> {
    let sysroot = Cmd::new("rustc")
        .args(["+nightly", "--print", "sysroot"])
        .capture()?
        .stdout
        .trim()
        .to_owned();
    let lib_dir = Path::new(&sysroot).join("lib");
    let names: Vec<String> = fs::read_dir(&lib_dir)
        .with_context(|| format!("reading {}", lib_dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let (name, major) = pick_libllvm(&names).ok_or_else(|| {
        anyhow!(
            "no libLLVM.so.*-rust-* in {} (is the nightly toolchain complete?)",
            lib_dir.display()
        )
    })?;
    Ok(NightlyLlvm {
        file: lib_dir.join(name),
        lib_dir,
        major,
    })
}

/// Picks `libLLVM.so.<major>.<minor>-rust-<version>` (the soname rustc's driver links
/// against) among file names, and derives the LLVM major version from it. Falls back to
/// `libLLVM-<major>-rust-<version>.so`. The highest major wins if there are several.
fn pick_libllvm(names: &[String]) -> Option<(String, u32)> {
    let major_of = |rest: &str| -> Option<u32> {
        let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
        digits.parse().ok()
    };
    let by_soname = names.iter().filter_map(|n| {
        let rest = n.strip_prefix("libLLVM.so.")?;
        n.contains("-rust-")
            .then(|| major_of(rest).map(|m| (n.clone(), m)))?
    });
    let by_plain = names.iter().filter_map(|n| {
        let rest = n.strip_prefix("libLLVM-")?;
        (n.contains("-rust-") && n.ends_with(".so"))
            .then(|| major_of(rest).map(|m| (n.clone(), m)))?
    });
    by_soname
        .max_by_key(|(_, m)| *m)
        .or_else(|| by_plain.max_by_key(|(_, m)| *m))
}

/// Where an installed bpf-linker is: `PATH` first, then `$CARGO_HOME/bin`.
fn find_bpf_linker() -> Option<PathBuf> {
    util::which("bpf-linker").or_else(|| {
        util::cargo_bin_dir()
            .map(|d| d.join("bpf-linker"))
            .filter(|p| util::is_executable(p))
    })
}

/// Runs `bpf-linker --version` the way aya-build will run it: under `cargo +nightly`, rustup
/// puts the nightly's lib directory in `LD_LIBRARY_PATH`, so a linker built against that
/// libLLVM loads (and one built against another LLVM does not, which we want to detect).
fn bpf_linker_version(bin: &Path, llvm: &NightlyLlvm) -> Result<String, String> {
    let mut ld = llvm.lib_dir.clone().into_os_string();
    if let Some(old) = std::env::var_os("LD_LIBRARY_PATH").filter(|v| !v.is_empty()) {
        ld.push(":");
        ld.push(old);
    }
    let out = Cmd::new(bin)
        .arg("--version")
        .env("LD_LIBRARY_PATH", ld)
        .capture_unchecked()
        .map_err(|e| format!("{e:#}"))?;
    if !out.status.success() {
        let why = out.all().lines().next().unwrap_or_default().to_owned();
        return Err(format!("`{} --version` failed: {why}", bin.display()));
    }
    parse_linker_version(&out.stdout).ok_or_else(|| {
        format!(
            "unexpected `bpf-linker --version` output: {:?}",
            out.stdout.trim()
        )
    })
}

/// `bpf-linker 0.13.0` -> `0.13.0`.
fn parse_linker_version(s: &str) -> Option<String> {
    let mut words = s.split_whitespace();
    (words.next()? == "bpf-linker").then_some(())?;
    let v = words.next()?;
    v.chars().next()?.is_ascii_digit().then(|| v.to_owned())
}

fn in_series(version: &str) -> bool {
    version
        .strip_prefix(BPF_LINKER_SERIES)
        .is_some_and(|rest| rest.starts_with('.'))
}

fn bpf_linker(p: &Progress, found_version: &mut String) -> anyhow::Result<Done> {
    let llvm = nightly_llvm()?;
    let llvm_name = llvm
        .file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let llvm_desc = format!("nightly LLVM {} = {llvm_name}", llvm.major);

    let why_install = match find_bpf_linker() {
        None => "not installed".to_owned(),
        Some(bin) => match bpf_linker_version(&bin, &llvm) {
            Ok(v) if in_series(&v) => {
                *found_version = v.clone();
                return Ok(Done::Skipped(format!(
                    "already present: bpf-linker {v} at {}, {llvm_desc}",
                    bin.display()
                )));
            }
            Ok(v) => format!(
                "{} is version {v}, need {BPF_LINKER_SERIES}.x",
                bin.display()
            ),
            Err(e) => e,
        },
    };
    p.line(&format!("installing: {why_install}"));
    p.line(&format!("using {llvm_desc} ({})", llvm.file.display()));

    // bpf-linker's build script links `-lLLVM` from `$LLVM_PREFIX/lib` and sets that directory
    // as the binary's rpath; the binary then asks for libLLVM's soname, so that name is linked
    // there too (rustup's LD_LIBRARY_PATH also finds it under `cargo +nightly`).
    let prefix = util::workspace_root().join("target/xtask/llvm-prefix");
    let lib = prefix.join("lib");
    fs::create_dir_all(&lib).with_context(|| format!("creating {}", lib.display()))?;
    for name in ["libLLVM.so", llvm_name.as_str()] {
        let link = lib.join(name);
        if fs::symlink_metadata(&link).is_ok() {
            fs::remove_file(&link).with_context(|| format!("removing {}", link.display()))?;
        }
        std::os::unix::fs::symlink(&llvm.file, &link)
            .with_context(|| format!("symlinking {} -> {}", link.display(), llvm.file.display()))?;
    }

    let feature = format!("llvm-{}", llvm.major);
    let install = |locked: bool| {
        Cmd::new("cargo")
            .env("LLVM_PREFIX", &prefix)
            .args(["install", "bpf-linker", "--version", "^0.13", "--force"])
            .args(locked.then_some("--locked"))
            .args(["--no-default-features", "--features", feature.as_str()])
            .stream(p, Echo::Indented)
    };
    if let Err(e) = install(true) {
        p.line(&format!("{e:#}; retrying without --locked"));
        install(false)?;
    }

    let bin = find_bpf_linker().ok_or_else(|| {
        anyhow!("cargo install succeeded but bpf-linker is not in PATH nor in $CARGO_HOME/bin")
    })?;
    let v = bpf_linker_version(&bin, &llvm).map_err(|e| anyhow!("after install: {e}"))?;
    if !in_series(&v) {
        bail!(
            "after install, {} reports {v}, not {BPF_LINKER_SERIES}.x",
            bin.display()
        );
    }
    *found_version = v.clone();
    Ok(Done::Ran(Some(format!(
        "bpf-linker {v}, LLVM {}",
        llvm.major
    ))))
}

// ---------------------------------------------------------------------------------------------
// 3. Debian packages

fn missing_bins(pkg: &Pkg) -> Vec<&'static str> {
    pkg.bins
        .iter()
        .copied()
        .filter(|b| {
            if b.starts_with('/') {
                !std::path::Path::new(b).exists()
            } else {
                util::which(b).is_none()
            }
        })
        .collect()
}

fn packages(p: &Progress) -> anyhow::Result<Done> {
    let missing: Vec<&Pkg> = PACKAGES
        .iter()
        .filter(|k| !missing_bins(k).is_empty())
        .collect();
    let mut did = Vec::new();

    if !missing.is_empty() {
        let names: Vec<&str> = missing.iter().map(|k| k.package).collect();
        if !util::is_root() {
            bail!(
                "missing Debian packages: {} (binaries: {}). Install them as root:\n    \
                 apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y \
                 --no-install-recommends {}",
                names.join(" "),
                missing
                    .iter()
                    .flat_map(|k| missing_bins(k))
                    .collect::<Vec<_>>()
                    .join(" "),
                names.join(" ")
            );
        }
        p.line(&format!("missing: {}", names.join(" ")));
        Cmd::new("apt-get")
            .arg("update")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stream(p, Echo::Indented)?;
        let mut install = Vec::new();
        for k in &missing {
            if k.optional && !apt_has(k.package) {
                p.line(&format!(
                    "{} is not in apt's lists; skipping it (optional)",
                    k.package
                ));
                continue;
            }
            install.push(k.package);
        }
        if !install.is_empty() {
            Cmd::new("apt-get")
                .env("DEBIAN_FRONTEND", "noninteractive")
                .args(["install", "-y", "--no-install-recommends"])
                .args(&install)
                .stream(p, Echo::Indented)?;
            did.push(format!("installed {}", install.join(" ")));
        }
        let still: Vec<&str> = missing
            .iter()
            .filter(|k| !k.optional)
            .flat_map(|k| missing_bins(k))
            .collect();
        if !still.is_empty() {
            bail!("still missing after apt-get install: {}", still.join(" "));
        }
    }

    if let Some(fixed) = iptables_nft(p)? {
        did.push(fixed);
    }

    if did.is_empty() {
        let present: Vec<&str> = PACKAGES
            .iter()
            .filter(|k| missing_bins(k).is_empty())
            .map(|k| k.package)
            .collect();
        Ok(Done::Skipped(format!(
            "already present: {}; iptables uses nf_tables",
            present.join(" ")
        )))
    } else {
        Ok(Done::Ran(Some(did.join("; "))))
    }
}

/// Whether apt knows a package (after `apt-get update`).
fn apt_has(package: &str) -> bool {
    Cmd::new("apt-cache")
        .args(["show", "--no-all-versions", package])
        .capture_unchecked()
        .is_ok_and(|o| o.status.success() && o.stdout.contains("Package:"))
}

/// Makes `iptables` the nf_tables flavour (Debian's default, but an image may have switched
/// to legacy) and, as root, checks that it can talk to the kernel. Returns what it changed.
fn iptables_nft(p: &Progress) -> anyhow::Result<Option<String>> {
    let version = Cmd::new("iptables").arg("-V").capture()?.all();
    let mut changed = None;
    if !version.contains("nf_tables") {
        if !util::is_root() {
            bail!(
                "iptables is not the nf_tables flavour ({}); as root run: \
                 update-alternatives --set iptables /usr/sbin/iptables-nft",
                version.trim()
            );
        }
        p.line(&format!("{} -> switching to iptables-nft", version.trim()));
        for (name, target) in [
            ("iptables", "/usr/sbin/iptables-nft"),
            ("ip6tables", "/usr/sbin/ip6tables-nft"),
        ] {
            if Path::new(target).exists() {
                Cmd::new("update-alternatives")
                    .args(["--set", name, target])
                    .capture()?;
            }
        }
        let now = Cmd::new("iptables").arg("-V").capture()?.all();
        if !now.contains("nf_tables") {
            bail!(
                "iptables still is not the nf_tables flavour: {}",
                now.trim()
            );
        }
        changed = Some("iptables switched to nf_tables".to_owned());
    }
    if util::is_root() {
        Cmd::new("iptables")
            .args(["-w", "-t", "nat", "-S"])
            .capture()
            .context("iptables (nf_tables backend) cannot list the nat table")?;
    }
    Ok(changed)
}

// ---------------------------------------------------------------------------------------------
// 4. bpffs

fn bpffs_mounted() -> anyhow::Result<bool> {
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    Ok(mounts.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.get(1) == Some(&BPFFS) && f.get(2) == Some(&"bpf")
    }))
}

fn bpffs() -> anyhow::Result<Done> {
    if bpffs_mounted()? {
        return Ok(Done::Skipped("already mounted".into()));
    }
    if !util::is_root() {
        bail!("bpffs is not mounted at {BPFFS}; as root run: mount -t bpf bpf {BPFFS}");
    }
    fs::create_dir_all(BPFFS).with_context(|| format!("creating {BPFFS}"))?;
    Cmd::new("mount")
        .args(["-t", "bpf", "bpf", BPFFS])
        .capture()?;
    if !bpffs_mounted()? {
        bail!("`mount -t bpf bpf {BPFFS}` succeeded but /proc/mounts does not show it");
    }
    Ok(Done::Ran(Some("mounted".into())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn libllvm_soname_preferred_and_major_derived() {
        let n = names(&[
            "librustc_driver-b5a965480ee51f9a.so",
            "libLLVM-22-rust-1.97.0-nightly.so",
            "libLLVM.so.22.1-rust-1.97.0-nightly",
            "rustlib",
        ]);
        assert_eq!(
            pick_libllvm(&n),
            Some(("libLLVM.so.22.1-rust-1.97.0-nightly".into(), 22))
        );
    }

    #[test]
    fn libllvm_fallback_and_absent() {
        let n = names(&["libLLVM-23-rust-1.99.0-nightly.so"]);
        assert_eq!(
            pick_libllvm(&n),
            Some(("libLLVM-23-rust-1.99.0-nightly.so".into(), 23))
        );
        assert_eq!(pick_libllvm(&names(&["libLLVM.so", "libfoo.so"])), None);
    }

    #[test]
    fn linker_version_parsing() {
        assert_eq!(
            parse_linker_version("bpf-linker 0.13.0\n"),
            Some("0.13.0".into())
        );
        assert_eq!(parse_linker_version("error while loading"), None);
        assert!(in_series("0.13.0"));
        assert!(in_series("0.13.12"));
        assert!(!in_series("0.130.0"));
        assert!(!in_series("0.12.9"));
    }
}
