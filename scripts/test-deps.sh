#!/usr/bin/env bash
# Installs and starts what the test suite drives, on Debian, as root. `cargo xtask test` runs it
# first; it is idempotent and quick when everything is already there.
set -euo pipefail

# Tools the capture and dashboard tests drive: bpftool and tc (what is attached), capsh (run
# without eBPF privileges), tmux (a real terminal for the TUI).
need=()
command -v bpftool >/dev/null || need+=(bpftool)
command -v tc >/dev/null || need+=(iproute2)
command -v capsh >/dev/null || need+=(libcap2-bin)
command -v tmux >/dev/null || need+=(tmux)
command -v curl >/dev/null || need+=(curl)
command -v nft >/dev/null || need+=(nftables)
if [ ${#need[@]} -gt 0 ]; then
  echo "test-deps: installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi

# PostgreSQL for the postgres store tests (specter/src/store/tests.rs): installed when missing,
# started, and given the password and database that SPECTER_TEST_POSTGRES_DSN names.
echo "test-deps: postgresql"
command -v pg_ctlcluster >/dev/null || (apt-get update -qq &&
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql)
read -r pg_version pg_cluster _ < <(pg_lsclusters --no-header | head -n 1) || true
if [ -z "${pg_version:-}" ]; then
  pg_version=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
  pg_cluster=main
  pg_createcluster "$pg_version" "$pg_cluster"
fi
pg_ctlcluster "$pg_version" "$pg_cluster" start || true
for _ in $(seq 1 30); do
  pg_isready -q -h 127.0.0.1 && break
  sleep 1
done
runuser -u postgres -- psql -q -c "ALTER USER postgres PASSWORD 'postgres'"
if [ "$(runuser -u postgres -- psql -tAc "SELECT 1 FROM pg_database WHERE datname = 'specter_test'")" != 1 ]; then
  runuser -u postgres -- createdb specter_test
fi

echo "test-deps: ready (PostgreSQL at host=127.0.0.1 user=postgres dbname=specter_test)"
