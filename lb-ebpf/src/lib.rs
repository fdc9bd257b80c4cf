//! Empty library target, so `lb-agent` can name `lb-ebpf` as a build-dependency (aya-template).
#![no_std]
