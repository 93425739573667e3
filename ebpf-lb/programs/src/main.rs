//! Sluice kernel programs. Built for `bpfel-unknown-none` by `ebpf-lb`'s build
//! script; on the host this crate is an empty binary so workspace-wide cargo
//! commands work.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod program;

#[cfg(not(target_arch = "bpf"))]
fn main() {}
