//! A per-test bpffs pin directory (`/sys/fs/bpf/lbt-<pid>-<n>-<what>`), removed on drop, with
//! a sweep of directories left by test processes that no longer exist.
use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

const ROOT: &str = "/sys/fs/bpf";
const PREFIX: &str = "lbt-";
static NEXT: AtomicU32 = AtomicU32::new(0);

/// A unique pin directory for one test; everything under it is removed on drop (which also
/// detaches programs whose only reference was a pinned link there).
pub struct PinDir {
    path: PathBuf,
}

impl PinDir {
    pub fn new(what: &str) -> Self {
        sweep();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = Path::new(ROOT).join(format!("{PREFIX}{}-{n}-{what}", std::process::id()));
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Remove `lbt-<pid>-*` pin directories whose test process is gone.
pub fn sweep() {
    let Ok(entries) = std::fs::read_dir(ROOT) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(PREFIX)) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}
