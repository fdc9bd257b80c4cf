//! `cargo xtask run`: set-up, build, then the network-namespace lab (`lb-lab`, in the `lb-testkit`
//! crate). xtask itself does not link the lab: it must build on a fresh machine before
//! set-up has installed what the eBPF build needs.
use std::process::ExitCode;

use anyhow::Context as _;

use crate::{
    progress::{Done, Progress},
    setup,
    util::{self, Cmd, Echo},
};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Run the checks once, print the table and tear everything down.
    #[arg(long)]
    pub once: bool,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let p = Progress::new();
    setup::ensure(&p.nested())?;
    p.section(1);
    p.step("build lb-agent and the lab (lb-lab, lb-podserver)", || {
        Cmd::new("cargo")
            .args(["build", "-p", "lb-agent", "-p", "lb-testkit"])
            .args([
                "--bin",
                "lb-agent",
                "--bin",
                "lb-podserver",
                "--bin",
                "lb-lab",
            ])
            .stream(&p, Echo::Indented)?;
        Ok(Done::Ran(None))
    })?;
    // Ctrl-C reaches lb-lab too (same process group); it tears the lab down and exits, and we
    // wait for it instead of dying first.
    ctrlc::set_handler(|| {}).context("installing the Ctrl-C handler")?;
    let bin = util::target_dir().join("debug").join("lb-lab");
    let mut cmd = std::process::Command::new(&bin);
    if args.once {
        cmd.arg("--once");
    }
    let status = cmd
        .status()
        .with_context(|| format!("running {}", bin.display()))?;
    Ok(if status.success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
