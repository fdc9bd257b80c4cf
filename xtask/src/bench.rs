//! `cargo xtask bench`: the benchmarks (placeholder until they are written).
use std::process::ExitCode;

use crate::progress::Progress;
use crate::setup;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Arguments for the benchmarks (none defined yet; e.g. `--quick --only per-packet`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    setup::ensure(&Progress::new())?;
    eprintln!(
        "cargo xtask bench: not implemented yet (args: {:?})",
        args.args
    );
    Ok(ExitCode::from(2))
}
