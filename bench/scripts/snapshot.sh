#!/usr/bin/env bash
# Snapshot costs (issue 17), on the engine: the write cost right after a snapshot (the first
# write to each 1 MiB extent copies it) and after (steady state), against the same volume
# before any snapshot, measured in one run (bench/src/snapshot_bench.rs); and the time a
# snapshot holds writes. Three configurations: 4 KiB writes at QD1, at QD8, and at QD1 with a
# flush after each write.
#
#   bench/scripts/snapshot.sh [--mib 1024] [--dir /var/tmp]
set -euo pipefail
mib=1024 dir=/var/tmp
while (($#)); do
  case "$1" in
    --mib) mib=$2; shift 2 ;;
    --dir) dir=$2; shift 2 ;;
    *) echo "usage: $0 [--mib N] [--dir DIR]" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/../.."
cargo build --release -q -p bench --bin snapshot-bench
bin=target/release/snapshot-bench
"$bin" --dir "$dir" --mib "$mib" --qd 1
"$bin" --dir "$dir" --mib "$mib" --qd 8
"$bin" --dir "$dir" --mib "$((mib / 2))" --qd 1 --sync
