#!/usr/bin/env bash
# Seeded fault runs of a real cluster (issue 13), not run in CI (CI runs the fixed seeds of
# tests/tests/cluster_chaos.rs). Runs seeds 1..=N (default 200), each with 3 or 4 real daemons
# over a real etcd and K faults (default 6) drawn from the seed: killed, stopped and
# partitioned replica nodes (both ways, requests only, replies only), etcd restarts,
# corrupted blocks, moves, forced takeovers of a stopped node (a zombie writer), a killed
# attached node, disk write errors and hangs (a debug daemon). Prints a line per trial and one table: faults by kind, acknowledged writes
# checked, writes lost and stale reads (both must be 0), application I/O errors, zombie acks.
# Needs root, etcd-server and iptables (scripts/test installs them).
#
#   bench/scripts/cluster-chaos.sh [TRIALS] [STEPS]
#   target/debug/cluster-chaos --seed N --steps K     # replay one seed's schedule
set -euo pipefail
cd "$(dirname "$0")/../.."
trials=${1:-200}
steps=${2:-6}
export BALLAST_TEST_DIR="${BALLAST_TEST_DIR:-/var/tmp}"
cargo build -q -p daemon -p integration-tests --bins
export BALLAST_BIN="${BALLAST_BIN:-$PWD/target/debug/ballast}"
exec target/debug/cluster-chaos --trials "$trials" --steps "$steps"
