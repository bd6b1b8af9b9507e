#!/usr/bin/env bash
# Specter's attach-mode checks on the kernel this machine is running, as root: the kernel
# modules capture needs, every eBPF program through this kernel's verifier, the integration
# test binaries given as arguments, and one run of `specter attach` that must attach the way
# this kernel calls for: netlink filters on a clsact qdisc before 6.6, TCX links from 6.6 on.
#
# `cargo xtask vm-test` runs it inside a virtme-ng guest booted on another kernel;
# vagrant/provision.sh runs it in each Vagrant VM.
#
# Usage: kernel-attach-checks.sh --specter BIN --out DIR [--workdir DIR] [--test-threads N]
#                                [--expect-mode netlink|tcx] [TEST_BINARY...]
#
# Writes into DIR: `summary` (one "PASS check (N s)" or "FAIL check (N s): why" line per check),
# `tests.txt` (every test's own result line), `<check>.log` per check, and `exit` (this
# script's exit status) last of all, so a reader knows the run finished.
set -uo pipefail

specter=""
out=""
workdir="$PWD"
test_threads=""
expect_mode=""
tests=()
while [ $# -gt 0 ]; do
  case "$1" in
    --specter) specter=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --workdir) workdir=$2; shift 2 ;;
    --test-threads) test_threads=$2; shift 2 ;;
    --expect-mode) expect_mode=$2; shift 2 ;;
    -*) echo "kernel-attach-checks: unknown option $1" >&2; exit 2 ;;
    *) tests+=("$1"); shift ;;
  esac
done
if [ -z "$specter" ] || [ -z "$out" ]; then
  echo "usage: $0 --specter BIN --out DIR [--workdir DIR] [TEST_BINARY...]" >&2
  exit 2
fi
specter=$(realpath "$specter")
if [ "$(id -u)" != 0 ]; then
  echo "kernel-attach-checks: run as root (eBPF, network namespaces)" >&2
  exit 2
fi

mkdir -p "$out"
rm -f "$out/summary" "$out/tests.txt" "$out/exit" "$out"/*.log
failed=0

say() { echo "kernel-attach-checks: $*"; }

# Records one check's outcome; $1 is the check, $2 its start time, $3 empty on success or why.
record() {
  local took=$(($(date +%s) - $2))
  if [ -z "$3" ]; then
    echo "PASS $1 (${took} s)" | tee -a "$out/summary"
  else
    echo "FAIL $1 (${took} s): $3" | tee -a "$out/summary"
    failed=1
  fi
}

# Specter colours its log even into a file; the checks below read it as plain text.
plain() { sed 's/\x1b\[[0-9;]*m//g' "$1"; }

release=$(uname -r)
IFS=. read -r major minor _ <<<"$release"
minor=${minor%%[!0-9]*}
if [ -z "$expect_mode" ]; then
  # The same rule as specter/src/capture.rs: TCX links from 6.6, netlink filters before.
  if [ "$major" -gt 6 ] || { [ "$major" -eq 6 ] && [ "$minor" -ge 6 ]; }; then
    expect_mode=tcx
  else
    expect_mode=netlink
  fi
fi
say "kernel $release; Specter must attach with $expect_mode"
{
  echo "release: $release"
  echo "expected attach mode: $expect_mode"
  echo "btf: $([ -r /sys/kernel/btf/vmlinux ] && echo yes || echo no)"
} >"$out/kernel.txt"

# Step 1: modules. Distribution kernels build veth, the clsact qdisc (sch_ingress) and the BPF
# classifier (cls_bpf) as modules; netem and nftables only make the lossy-link test realistic
# (it falls back from one to the other), so they are optional.
start=$(date +%s)
why=""
moddir=/lib/modules/$release
for module in veth sch_ingress cls_bpf; do
  modprobe "$module" >>"$out/modules.log" 2>&1 && continue
  if [ ! -d "$moddir" ]; then
    echo "no $moddir: assuming $module is built in" >>"$out/modules.log"
  elif ! grep -q "/$module.ko" "$moddir/modules.builtin" 2>/dev/null; then
    why="${why}cannot load $module; "
  fi
done
for module in sch_netem nf_tables nft_numgen; do
  modprobe "$module" >>"$out/modules.log" 2>&1 || say "optional module $module is unavailable"
done
record modules "$start" "${why%; }"

# Step 2: every program through this kernel's verifier; its log names the instruction it
# rejects, which the attach tests would only show as a fallback to proxy mode.
say "loading every eBPF program through the verifier"
start=$(date +%s)
if "$specter" check-ebpf >"$out/check-ebpf.log" 2>&1; then
  record check-ebpf "$start" ""
else
  record check-ebpf "$start" "the verifier rejected a program; see check-ebpf.log"
fi

# Step 3: the integration test binaries Cargo built, from the package directory as
# `cargo test` would run them.
for binary in "${tests[@]}"; do
  binary=$(realpath "$binary")
  name=$(basename "$binary")
  name=${name%-*}
  say "running $name"
  start=$(date +%s)
  args=()
  [ -n "$test_threads" ] && args+=("--test-threads=$test_threads")
  (cd "$workdir" && "$binary" "${args[@]}") >"$out/$name.log" 2>&1
  status=$?
  plain "$out/$name.log" | grep -E '^test .* \.\.\. ' | sed "s/^test /$name: /" >>"$out/tests.txt"
  result=$(plain "$out/$name.log" | grep -E '^test result:' | tail -n 1)
  if [ "$status" = 0 ]; then
    record "$name" "$start" ""
  else
    record "$name" "$start" "exit $status; ${result:-no test result line}"
  fi
done

# Step 4: one `specter attach` between two network namespaces, checked from the outside: the
# mode it reports, what the kernel shows attached, capture of real requests, and that SIGTERM
# leaves nothing behind.
server=sptchk-s
client=sptchk-c
dir="$out/attach-mode"
specter_pid=""
cleanup_attach() {
  [ -n "$specter_pid" ] && kill "$specter_pid" 2>/dev/null
  for pid in $(ip netns pids "$server" 2>/dev/null) $(ip netns pids "$client" 2>/dev/null); do
    kill "$pid" 2>/dev/null
  done
  ip netns del "$server" 2>/dev/null
  ip netns del "$client" 2>/dev/null
}

# Polls the admin API inside the server namespace, for up to $2 seconds, until the stats it
# returns satisfy the shell function named $1 (which reads $stats).
wait_stats() {
  local deadline=$(($(date +%s) + $2))
  while [ "$(date +%s)" -lt "$deadline" ]; do
    stats=$(ip netns exec "$server" curl -sf --max-time 5 http://127.0.0.1:9090/api/stats) &&
      "$1" && return 0
    kill -0 "$specter_pid" 2>/dev/null || return 1
    sleep 0.5
  done
  return 1
}

# The two conditions below are called through wait_stats.
# shellcheck disable=SC2317
has_capture() { grep -q '"attach_mode"' <<<"$stats"; }

# exchanges.seen is the first "seen" in the stats.
# shellcheck disable=SC2317
all_seen() {
  local seen
  seen=$(grep -Eo '"seen": *[0-9]+' <<<"$stats" | head -n 1 | grep -Eo '[0-9]+$')
  [ "${seen:-0}" -ge 100 ]
}

attach_mode_check() {
  mkdir -p "$dir"
  cleanup_attach
  ip netns add "$server" && ip netns add "$client" || return 1
  ip link add sptchk-s0 type veth peer name sptchk-c0 || { echo "cannot create a veth pair"; return 1; }
  ip link set sptchk-s0 netns "$server"
  ip link set sptchk-c0 netns "$client"
  ip -n "$server" addr add 10.202.0.1/30 dev sptchk-s0
  ip -n "$client" addr add 10.202.0.2/30 dev sptchk-c0
  for ns in "$server" "$client"; do
    ip -n "$ns" link set lo up
    ip -n "$ns" link set "sptchk-${ns#sptchk-}0" up
  done

  ip netns exec "$server" "$specter" testserver --port 8080 --mode live --bind 0.0.0.0 \
    >"$dir/live.log" 2>&1 &
  ip netns exec "$server" "$specter" testserver --port 8081 --mode shadow \
    >"$dir/shadow.log" 2>&1 &
  cat >"$dir/specter.yaml" <<EOF
specter:
  listen: 127.0.0.1:18080
  live_target: http://127.0.0.1:8080
  shadow_target: http://127.0.0.1:8081
capture:
  ports: [8080]
store:
  path: $dir/specter.redb
api:
  listen: 127.0.0.1:9090
EOF
  ip netns exec "$server" "$specter" attach --iface sptchk-s0 --config "$dir/specter.yaml" \
    --no-fallback >"$dir/specter.log" 2>&1 &
  specter_pid=$!
  if ! wait_stats has_capture 60; then
    echo "its log:"
    plain "$dir/specter.log" | tail -n 40
    echo "specter attach --no-fallback did not attach; see attach-mode/specter.log"
    return 1
  fi
  mode=$(grep -Eo '"attach_mode": *"[a-z]+"' <<<"$stats" | grep -Eo '[a-z]+"$' | tr -d '"')
  echo "attach_mode reported: $mode"
  [ "$mode" = "$expect_mode" ] || { echo "expected $expect_mode, got $mode"; return 1; }

  qdiscs=$(ip netns exec "$server" tc qdisc show dev sptchk-s0)
  filters=$(ip netns exec "$server" tc filter show dev sptchk-s0 ingress)
  echo "qdiscs while attached: $qdiscs"
  echo "ingress filters while attached: $filters"
  if [ "$expect_mode" = netlink ]; then
    grep -q clsact <<<"$qdiscs" || { echo "no clsact qdisc while attached"; return 1; }
    grep -q specter <<<"$filters" || { echo "no specter filter on ingress"; return 1; }
  elif grep -q clsact <<<"$qdiscs"; then
    echo "a clsact qdisc appeared although this kernel has TCX"
    return 1
  fi

  ip netns exec "$client" "$specter" traffic --target 10.202.0.1:8080 --requests 100 \
    --connections 2 >"$dir/traffic.json" 2>"$dir/traffic.log" ||
    { cat "$dir/traffic.log"; echo "specter traffic failed"; return 1; }
  if ! wait_stats all_seen 60; then
    echo "last stats: $stats"
    echo "the 100 requests were not all seen within 60 s"
    return 1
  fi
  echo "100 requests seen through $mode capture"

  kill -TERM "$specter_pid"
  wait "$specter_pid"
  status=$?
  specter_pid=""
  [ "$status" = 0 ] || { echo "specter attach exited with $status after SIGTERM"; return 1; }
  qdiscs=$(ip netns exec "$server" tc qdisc show dev sptchk-s0)
  if grep -q clsact <<<"$qdiscs"; then
    echo "clsact qdisc left after SIGTERM: $qdiscs"
    return 1
  fi
  local log
  log=$(plain "$dir/specter.log")
  grep -q "Detached capture programs" <<<"$log" || { echo "no detach logged"; return 1; }
  local logged_mode=Netlink
  [ "$expect_mode" = tcx ] && logged_mode=Tcx
  grep -q "mode=$logged_mode" <<<"$log" || { echo "the log does not say mode=$logged_mode"; return 1; }
  echo "detached cleanly; the log says mode=$logged_mode"
}

say "checking that specter attach uses $expect_mode"
start=$(date +%s)
if attach_mode_check >"$out/attach-mode.log" 2>&1; then
  record "attach-mode-$expect_mode" "$start" ""
else
  record "attach-mode-$expect_mode" "$start" "$(tail -n 1 "$out/attach-mode.log")"
fi
cleanup_attach

echo "$failed" >"$out/exit"
exit "$failed"
