#!/usr/bin/env bash
# Provisions a kernel test VM (see Vagrantfile) and runs the attach-mode checks in it, as root.
#
# Usage: provision.sh SOURCE KERNEL_LINE EXPECTED_MODE
#   SOURCE         the synced checkout (/specter)
#   KERNEL_LINE    the kernel line the box is meant to run, e.g. 6.1; a mismatch fails
#   EXPECTED_MODE  netlink or tcx: how Specter must attach on this kernel
#
# Set SPECTER_FULL_TESTS=1 to run the whole `cargo xtask test` afterwards as well.
set -euo pipefail

source_dir=${1:?usage: provision.sh SOURCE KERNEL_LINE EXPECTED_MODE}
kernel_line=${2:?}
expect_mode=${3:?}

release=$(uname -r)
case "$release" in
  "$kernel_line".*) echo "provision: kernel $release (the $kernel_line line)" ;;
  *)
    echo "provision: this box runs kernel $release, not the $kernel_line line it stands for" >&2
    exit 1
    ;;
esac

# Build tools, and what the tests drive: ip/tc, bpftool, capsh, nft, curl.
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq build-essential curl git pkg-config iproute2 bpftool libcap2-bin \
  nftables kmod

# Rust: the stable the workspace asks for (rust-version), and the nightly with rust-src that
# the eBPF crate builds with. Installed for root, who runs the tests.
export PATH=/root/.cargo/bin:$PATH
if ! command -v rustup >/dev/null; then
  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs |
    sh -s -- -y --profile minimal --default-toolchain 1.95
fi
rustup run nightly rustc --version >/dev/null 2>&1 ||
  rustup toolchain install nightly --profile minimal --component rust-src

# The synced folder is a copy; build in it with the VM's own target directory.
cd "$source_dir"
export CARGO_TARGET_DIR=/var/tmp/specter-target
cargo xtask setup
cargo test --workspace --no-run --test attach_mode --test ebpf_load --message-format=json \
  >/var/tmp/specter-build.json
mapfile -t tests < <(grep '"kind":\["test"\]' /var/tmp/specter-build.json |
  sed -n 's/.*"executable":"\([^"]*\)".*/\1/p')

results=/var/tmp/specter-kernel-checks
bash scripts/kernel-attach-checks.sh --specter "$CARGO_TARGET_DIR/debug/specter" \
  --out "$results" --workdir "$source_dir/specter" --expect-mode "$expect_mode" "${tests[@]}"
echo "provision: attach checks passed on $release; logs in $results"

if [ "${SPECTER_FULL_TESTS:-0}" = 1 ]; then
  cargo xtask test
fi
