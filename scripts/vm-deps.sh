#!/usr/bin/env bash
# Installs what `cargo xtask vm-test` needs, on Debian, as root: qemu-system-x86, busybox-static
# and kmod from Debian, virtme-ng from PyPI. Idempotent and quick when all are there.
set -euo pipefail

need=()
for package in qemu-system-x86 busybox-static kmod; do
  dpkg -s "$package" >/dev/null 2>&1 || need+=("$package")
done
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  if apt-get install -s -qq --no-install-recommends "${need[@]}" >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
  else
    # The release's qemu cannot go in beside a newer qemu package already installed from
    # backports (qemu-utils from backports breaks the release's qemu-system-common). Take qemu
    # from the release's backports too, through a source list of this run's own, so the
    # machine's apt sources stay as they are.
    codename=$(sed -n "s/^VERSION_CODENAME=//p" /etc/os-release)
    apt_dir=$(mktemp -d)
    trap 'rm -rf "$apt_dir"' EXIT
    mkdir -p "$apt_dir/parts" "$apt_dir/lists/partial"
    cp /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list "$apt_dir/parts/" \
      2>/dev/null || true
    echo "deb http://deb.debian.org/debian $codename-backports main" >"$apt_dir/parts/backports.list"
    apt_options=(-o "Dir::Etc::sourceparts=$apt_dir/parts" -o "Dir::State::lists=$apt_dir/lists")
    echo "vm-deps: installing ${need[*]} from $codename-backports, beside the installed qemu"
    apt-get "${apt_options[@]}" update -qq
    DEBIAN_FRONTEND=noninteractive apt-get "${apt_options[@]}" install -y -qq \
      --no-install-recommends -t "$codename-backports" "${need[@]}"
  fi
fi
command -v vng >/dev/null || pip install -q virtme-ng
