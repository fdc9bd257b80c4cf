//! Integration tests of the lab cgroup guard (need root and a cgroup v2 mount): created under
//! the cgroup v2 mount, never the root cgroup itself; members killed and the directory
//! removed on drop; stale cgroups of dead pids swept.
use std::path::PathBuf;
use std::process::Command;

use lb_testkit::cgroup::{cgroup2_mount, parse_cgroup2_mount, sweep, LabCgroup};
use lb_testkit::lab::pid_alive;

#[test]
fn cgroup2_mount_is_found_on_pure_and_hybrid_hosts() {
    let pure = "sysfs /sys sysfs rw 0 0\ncgroup2 /sys/fs/cgroup cgroup2 rw,nosuid 0 0\n";
    assert_eq!(
        parse_cgroup2_mount(pure),
        Some(PathBuf::from("/sys/fs/cgroup"))
    );
    let hybrid = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n\
                  cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n\
                  cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
    assert_eq!(
        parse_cgroup2_mount(hybrid),
        Some(PathBuf::from("/sys/fs/cgroup/unified"))
    );
    assert_eq!(
        parse_cgroup2_mount("cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\n"),
        None
    );
}

#[test]
fn lab_cgroup_holds_processes_and_is_removed_with_them() {
    let root = cgroup2_mount().expect("cgroup v2 mount");
    let cg = LabCgroup::new("guard");
    let path = cg.path().to_owned();
    assert_eq!(path.parent(), Some(root.as_path()));
    assert_ne!(path, root, "never the root cgroup");
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    assert!(
        name.starts_with(&format!("lbt-{}-", std::process::id())),
        "{name}"
    );
    assert!(
        path.join("cgroup.procs").is_file(),
        "{} is not a cgroup",
        path.display()
    );

    let mut child = Command::new("sleep")
        .arg("60")
        .spawn()
        .expect("spawn sleep");
    cg.add(child.id()).expect("move sleep into the lab cgroup");
    assert_eq!(cg.pids(), vec![child.id()]);
    let own = std::fs::read_to_string(format!("/proc/{}/cgroup", child.id())).expect("cgroup");
    assert!(own.contains(&format!("0::/{name}")), "{own}");

    drop(cg);
    assert!(!path.exists(), "{} left behind", path.display());
    let status = child.wait().expect("wait sleep");
    assert!(
        !status.success(),
        "the member was killed, not left running: {status:?}"
    );
}

#[test]
fn sweep_removes_cgroups_of_dead_pids_only() {
    let root = cgroup2_mount().expect("cgroup v2 mount");
    let dead = (900_000..1_000_000)
        .rev()
        .find(|&p| !pid_alive(p))
        .expect("a free pid");
    let stale = root.join(format!("lbt-{dead}-0-stale"));
    std::fs::create_dir(&stale).expect("create a stale cgroup");
    let live = LabCgroup::new("live");
    // LabCgroup::new sweeps (as may a parallel test); either way it must be gone now.
    assert!(!stale.exists(), "{} survived", stale.display());
    assert!(!sweep().contains(&stale));
    assert!(live.path().exists(), "a live process's cgroup was swept");
}
