#!/usr/bin/env bash
# The build steps of docker/Dockerfile's builder stage, kept in one script so that
# scripts/check-packaging.sh can run exactly the same commands natively in a clean clone.
#
#   build.sh toolchain     the nightly toolchain with rust-src (what the eBPF crate builds with)
#   build.sh build OUT     bpf-linker (via `cargo xtask setup`), then the release binary with
#                          the eBPF object embedded, installed as OUT/specter
#
# Run `build` from the workspace root.
set -euo pipefail

case "${1:-}" in
  toolchain)
    # Installed only when missing: a developer's existing nightly is never moved, since
    # bpf-linker is built against that nightly's LLVM.
    if rustup run nightly rustc --version >/dev/null 2>&1; then
      echo "build.sh: the nightly toolchain is already installed"
    else
      rustup toolchain install nightly --profile minimal --component rust-src
    fi
    ;;
  build)
    out=${2:?usage: build.sh build OUT}
    # The same two commands a developer runs; `cargo xtask setup` builds bpf-linker into
    # .tools/bin against the nightly's own LLVM, and the specter build script finds it there.
    cargo xtask setup
    cargo build --release --locked -p specter
    install -D -m 0755 target/release/specter "$out/specter"
    "$out/specter" --version
    ;;
  *)
    echo "usage: build.sh toolchain | build OUT" >&2
    exit 2
    ;;
esac
