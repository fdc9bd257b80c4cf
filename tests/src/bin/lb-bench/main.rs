//! `lb-bench`: the measuring side of `cargo xtask bench`. Runs one part and writes its rows
//! as JSON (the format in `xtask/src/bench/schema.rs`); `cargo xtask bench` builds this,
//! runs each part, then writes the report and the plots.
//!
//! Usage: `lb-bench per-packet|e2e|throughput|control-plane [--quick] --out FILE`, or
//! `lb-bench rules iptables|nftables N [end|middle]` to print the exact kube-proxy rule set
//! the baselines load for N Services (the lab's pod 0 as the target's endpoints).
//!
//! Needs root (BPF, network namespaces). Progress goes to stdout, one line per step, each
//! with the part's elapsed time.
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

#[allow(
    dead_code,
    reason = "shared with `cargo xtask bench`, which reads what this writes; each side uses a part"
)]
#[path = "../../../../xtask/src/bench/schema.rs"]
mod schema;

mod bpf_batch;
mod control_plane;
mod e2e;
mod labkit;
mod per_packet;
mod rules;
mod services;
mod throughput;

/// Progress lines: `[part +12.3s] message`.
pub struct Progress {
    part: String,
    start: Instant,
}

impl Progress {
    pub fn say(&self, msg: &str) {
        println!(
            "[{} +{:.1}s] {msg}",
            self.part,
            self.start.elapsed().as_secs_f64()
        );
        let _ = std::io::stdout().flush();
    }
}

fn usage() -> String {
    format!(
        "usage: lb-bench {} [--quick] --out FILE",
        schema::PARTS.join("|")
    )
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `lb-bench rules iptables|nftables N [end|middle]`: prints a baseline rule set.
fn print_rules(args: &[String]) -> anyhow::Result<()> {
    let (format, n) = match args {
        [f, n, ..] => (f.as_str(), n.parse::<usize>()?),
        _ => anyhow::bail!("usage: lb-bench rules iptables|nftables N [end|middle]"),
    };
    let pos = match args.get(2).map(String::as_str) {
        None | Some("end") => services::Position::End,
        Some("middle") => services::Position::Middle,
        Some(p) => anyhow::bail!("unknown position {p:?}"),
    };
    let pod = std::net::Ipv4Addr::new(10, 244, 0, 10);
    let eps: Vec<std::net::SocketAddrV4> = (0..labkit::SERVER_PORTS)
        .map(|k| std::net::SocketAddrV4::new(pod, labkit::SERVER_PORT + k))
        .collect();
    let set = services::ServiceSet::synthetic(n, pos, true, &eps)?;
    let text = match format {
        "iptables" => rules::iptables_restore(&set.ports, &labkit::node_config()),
        "nftables" => rules::nftables_script(&set.ports, &labkit::node_config()),
        f => anyhow::bail!("unknown format {f:?}"),
    };
    std::io::stdout().write_all(text.as_bytes())?;
    Ok(())
}

fn run() -> anyhow::Result<()> {
    let all: Vec<String> = std::env::args().skip(1).collect();
    if all.first().map(String::as_str) == Some("rules") {
        return print_rules(&all[1..]);
    }
    let mut args = all.into_iter();
    let part = args.next().ok_or_else(|| anyhow::anyhow!(usage()))?;
    let (mut quick, mut out) = (false, None);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => quick = true,
            "--out" => out = args.next().map(PathBuf::from),
            _ => anyhow::bail!("unknown argument {a:?}\n{}", usage()),
        }
    }
    let out = out.ok_or_else(|| anyhow::anyhow!("--out is required\n{}", usage()))?;
    tests::lab::require_root();
    let p = Progress {
        part: part.clone(),
        start: Instant::now(),
    };
    let mut result = match part.as_str() {
        "per-packet" => per_packet::run(quick, &p)?,
        "e2e" => e2e::run(quick, &p)?,
        "throughput" => throughput::run(quick, &p)?,
        "control-plane" => control_plane::run(quick, &p)?,
        _ => anyhow::bail!("unknown part {part:?}\n{}", usage()),
    };
    result.elapsed_s = p.start.elapsed().as_secs_f64();
    let tmp = out.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&result)?)?;
    std::fs::rename(&tmp, &out)?;
    let failed = result.rows.iter().filter(|r| r.error.is_some()).count();
    p.say(&format!(
        "done: {} rows ({failed} failed) written to {}",
        result.rows.len(),
        out.display()
    ));
    Ok(())
}
