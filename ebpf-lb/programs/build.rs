// bpf-linker is an external linker; make cargo rebuild the programs when it is
// replaced (for example by `cargo xtask setup` installing another version).
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
