//! Every program in the embedded eBPF object passes this kernel's verifier.
//!
//! Needs root (or CAP_BPF with CAP_NET_ADMIN), as `cargo xtask test` runs in CI.

#[test]
fn every_program_in_the_object_loads_through_the_verifier() {
    let (_ebpf, loaded) = specter::capture::load_all()
        .unwrap_or_else(|error| panic!("loading the eBPF object failed (run as root): {error}"));

    let mut expected: Vec<String> = specter_common::programs::ALL
        .iter()
        .map(|name| name.to_string())
        .collect();
    expected.sort();
    assert_eq!(
        loaded, expected,
        "the object holds other programs than the ones Specter attaches"
    );
}
