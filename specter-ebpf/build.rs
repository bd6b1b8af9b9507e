//! Fails early, with the command that fixes it, when bpf-linker is not on PATH.
fn main() {
    println!("cargo:rerun-if-env-changed=PATH");
    if which::which("bpf-linker").is_err() {
        panic!(
            "bpf-linker was not found on PATH; it links the eBPF programs. \
             Install it project-locally with `cargo xtask setup` (it lands in .tools/bin)."
        );
    }
}
