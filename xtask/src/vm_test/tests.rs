use std::fs;

use super::*;

/// A minimal bzImage: the setup header's magic and a version string where `kernel_version`
/// points.
fn fake_bzimage(version: &str) -> Vec<u8> {
    let mut image = vec![0u8; 0x1000];
    image[0x202..0x206].copy_from_slice(b"HdrS");
    let at = 0x600usize;
    let pointer = (at - 0x200) as u16;
    image[0x20e..0x210].copy_from_slice(&pointer.to_le_bytes());
    image[at..at + version.len()].copy_from_slice(version.as_bytes());
    image
}

#[test]
fn release_is_read_from_the_boot_header() {
    let dir = tempdir();
    let kernel = dir.join("vmlinuz");
    fs::write(
        &kernel,
        fake_bzimage("6.1.0-57-amd64 (debian-kernel@lists.debian.org) #1 SMP"),
    )
    .unwrap();
    assert_eq!(kernel_release(&kernel).unwrap(), "6.1.0-57-amd64");
}

#[test]
fn a_file_that_is_not_a_bzimage_is_named_in_the_error() {
    let dir = tempdir();
    let kernel = dir.join("vmlinux");
    fs::write(&kernel, vec![0u8; 0x1000]).unwrap();
    let error = kernel_release(&kernel).unwrap_err().to_string();
    assert!(
        error.contains("vmlinux") && error.contains("bzImage"),
        "{error}"
    );
}

#[test]
fn modules_are_found_beside_an_extracted_kernel_package() {
    let dir = tempdir();
    let modules = dir.join("lib/modules/6.1.0-57-amd64");
    fs::create_dir_all(modules.join("kernel")).unwrap();
    fs::create_dir_all(dir.join("boot")).unwrap();
    let kernel = dir.join("boot/vmlinuz-6.1.0-57-amd64");
    assert_eq!(modules_beside(&kernel, "6.1.0-57-amd64"), Some(modules));
    assert_eq!(modules_beside(&kernel, "6.12.0-1-amd64"), None);
}

#[test]
fn results_count_tests_and_the_checks_around_them() {
    let tests = "attach_mode: a ... ok\nattach_mode: b ... FAILED\nebpf_load: c ... ok\n";
    let summary = "PASS modules (0 s)\nPASS check-ebpf (1 s)\nFAIL attach_mode (90 s): exit 101\n\
                   PASS ebpf_load (1 s)\nFAIL attach-mode-netlink (60 s): expected netlink\n";
    assert_eq!(count_results(tests, summary), (4, 2));
}

#[test]
fn guest_command_words_are_quoted_only_when_needed() {
    assert_eq!(
        shell_quote("/work/main/target/debug/specter"),
        "/work/main/target/debug/specter"
    );
    assert_eq!(shell_quote("a b"), "'a b'");
    assert_eq!(shell_quote("it's"), r"'it'\''s'");
}

/// A fresh directory under the system temp dir, removed by the OS eventually; xtask has no
/// tempfile dependency and these tests write a few bytes.
fn tempdir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "xtask-vm-test-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}
