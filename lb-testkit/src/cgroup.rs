//! Lab cgroups: `<cgroup v2 mount>/lbt-<pid>-<n>-<what>`, created for one test or lab node,
//! emptied (`cgroup.kill`) and removed on drop, with a sweep of cgroups left by test
//! processes that no longer exist. Socket programs are attached only to these, never to the
//! machine's root cgroup, which would change every process on the machine.
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

const PREFIX: &str = "lbt-";
static NEXT: AtomicU32 = AtomicU32::new(0);
/// How long a drop waits for killed members to leave before removing the directory.
const EMPTY_TIMEOUT: Duration = Duration::from_secs(5);

/// The cgroup v2 mount point from `/proc/mounts` (on a hybrid host, the unified mount, e.g.
/// `/sys/fs/cgroup/unified`).
pub fn cgroup2_mount() -> io::Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    parse_cgroup2_mount(&mounts).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "no cgroup2 filesystem in /proc/mounts (mount one: mount -t cgroup2 none /sys/fs/cgroup)",
        )
    })
}

/// The mount point of the first `cgroup2` line of a `/proc/mounts` text.
pub fn parse_cgroup2_mount(mounts: &str) -> Option<PathBuf> {
    lb_agent::loader::cgroup2_mount(mounts)
}

/// A cgroup this process created; removed (after killing its members) on drop.
#[derive(Debug)]
pub struct LabCgroup {
    path: PathBuf,
}

impl LabCgroup {
    /// Creates `<mount>/lbt-<pid>-<n>-<what>` after sweeping stale ones. Panics with the
    /// reason when there is no cgroup v2 mount or the directory cannot be made.
    pub fn new(what: &str) -> Self {
        let root = cgroup2_mount().unwrap_or_else(|e| panic!("lab cgroup {what}: {e}"));
        sweep_in(&root);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = root.join(format!("{PREFIX}{}-{n}-{what}", std::process::id()));
        if let Err(e) = std::fs::create_dir(&path) {
            panic!("creating lab cgroup {}: {e}", path.display());
        }
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Moves process `pid` (and, for a new child, everything it forks later) into this cgroup.
    pub fn add(&self, pid: u32) -> io::Result<()> {
        std::fs::write(self.path.join("cgroup.procs"), pid.to_string())
    }

    /// The pids in this cgroup now.
    pub fn pids(&self) -> Vec<u32> {
        std::fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }
}

impl Drop for LabCgroup {
    fn drop(&mut self) {
        if let Err(e) = remove(&self.path) {
            eprintln!(
                "warning: could not remove lab cgroup {}: {e}",
                self.path.display()
            );
        }
    }
}

/// Kills every member of the cgroup at `path`, waits (bounded) until it is empty, and
/// removes it.
fn remove(path: &Path) -> io::Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let populated = || {
        std::fs::read_to_string(path.join("cgroup.events"))
            .map(|t| t.lines().any(|l| l.trim() == "populated 1"))
            .unwrap_or(false)
    };
    if populated() {
        std::fs::write(path.join("cgroup.kill"), "1")?;
        let deadline = Instant::now() + EMPTY_TIMEOUT;
        while populated() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    std::fs::remove_dir(path)
}

/// Removes every `lbt-<pid>-...` cgroup under the cgroup v2 mount whose pid is not a live
/// process. Returns the paths removed.
pub fn sweep() -> Vec<PathBuf> {
    cgroup2_mount()
        .map(|root| sweep_in(&root))
        .unwrap_or_default()
}

fn sweep_in(root: &Path) -> Vec<PathBuf> {
    let mut swept = Vec::new();
    let Ok(entries) = std::fs::read_dir(root) else {
        return swept;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = crate::lab::owner_pid(&name) else {
            continue;
        };
        if crate::lab::pid_alive(pid) {
            continue;
        }
        let path = entry.path();
        match remove(&path) {
            Ok(()) => swept.push(path),
            Err(e) => eprintln!(
                "warning: could not sweep stale cgroup {}: {e}",
                path.display()
            ),
        }
    }
    swept
}
