//! `cargo xtask`: set-up, tests, the lab demo and the benchmarks of `lb` (see README.md).
mod bench;
mod progress;
mod run;
mod setup;
mod test;
mod util;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "cargo xtask",
    about = "Project tasks for lb; each installs its prerequisites first"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Install what the project needs (rust-src, bpf-linker, Debian packages, bpffs).
    Setup,
    /// Set-up, fmt, clippy, build and all tests; prints a summary.
    Test(test::Args),
    /// The network-namespace lab demo.
    Run(run::Args),
    /// The benchmarks.
    Bench(bench::Args),
}

fn main() -> ExitCode {
    util::normalize_path();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup => setup::ensure(&progress::Progress::new()).map(|()| ExitCode::SUCCESS),
        Command::Test(args) => test::run(args),
        Command::Run(args) => run::run(args),
        Command::Bench(args) => bench::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
