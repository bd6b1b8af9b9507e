#!/bin/sh
# Entry point of the Specter image: runs `specter "$@"` as the unprivileged user `specter`.
#
# For `specter attach` it first turns the capabilities the container was granted
# (`--cap-add BPF --cap-add NET_ADMIN --cap-add PERFMON`) into ambient capabilities. Docker
# and Kubernetes give added capabilities to a non-root user only through file capabilities, so
# the image ships a copy of setpriv that holds those three in its permitted set (not its
# effective set, so it still runs in a container that lacks them). Ambient capabilities also
# reach `tc`, which Specter runs to remove its clsact qdisc on kernels before 6.6.
set -eu

specter=${SPECTER_BIN:-/usr/local/bin/specter}
raise_caps=${SPECTER_RAISE_CAPS:-/usr/local/libexec/specter/raise-caps}

if [ "${1:-}" = attach ] && [ "$(id -u)" != 0 ]; then
  bounding=$(sed -n 's/^CapBnd:[[:space:]]*//p' /proc/self/status)
  # Capability bits: CAP_NET_ADMIN 12, CAP_PERFMON 38, CAP_BPF 39.
  if [ $((0x$bounding >> 12 & 1)) = 1 ] && [ $((0x$bounding >> 38 & 1)) = 1 ] &&
    [ $((0x$bounding >> 39 & 1)) = 1 ]; then
    exec "$raise_caps" --inh-caps=+net_admin,+perfmon,+bpf \
      --ambient-caps=+net_admin,+perfmon,+bpf -- "$specter" "$@"
  fi
  # Specter decides what follows: proxy mode, or an error with --no-fallback.
  echo "specter-entrypoint: attach needs CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON; run the" \
    "container with --cap-add BPF --cap-add NET_ADMIN --cap-add PERFMON" >&2
fi
exec "$specter" "$@"
