#!/usr/bin/env bash
# Seeded fault runs of the nexus (issue 13), not run in CI (CI runs the fixed seeds of
# replication/tests/chaos.rs). Runs seeds 1..=N (default 200): three real replicas behind
# fault switches (failures, power cuts of a volatile write cache, corrupt blocks), with
# rebuilds, checked against a model of every acknowledged write. Prints one table: trials,
# operations and faults, writes lost and stale reads (both must be 0), I/O errors.
#
#   bench/scripts/chaos.sh [TRIALS]
#   BALLAST_CHAOS_SEED=N cargo test -p replication --test chaos   # replay one seed
set -euo pipefail
cd "$(dirname "$0")/../.."
trials=${1:-200}
export BALLAST_TEST_DIR="${BALLAST_TEST_DIR:-/var/tmp}"
BALLAST_CHAOS_TRIALS="$trials" cargo test --release -p replication --test chaos -- --nocapture 2>&1 |
  grep -E '^\||^seed|replay|failing seeds|test result'
