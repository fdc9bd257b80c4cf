//! Re-run the eBPF build when bpf-linker changes (aya-template), so a rebuilt linker takes effect.
use which::which;

fn main() {
    if let Ok(bpf_linker) = which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", bpf_linker.display());
    }
}
