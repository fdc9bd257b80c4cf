//! `cargo xtask run`: the network-namespace lab demo (placeholder until it is written).
use std::process::ExitCode;

use crate::progress::Progress;
use crate::setup;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Arguments for the lab (none defined yet).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    setup::ensure(&Progress::new())?;
    eprintln!(
        "cargo xtask run: not implemented yet (args: {:?})",
        args.args
    );
    Ok(ExitCode::from(2))
}
