#!/usr/bin/env bash
# Snapshots of a replicated volume (issue 17), not run in CI. Three daemons on this machine
# (release build, real etcd, mutual TLS), a 3-replica volume attached on node A and fully
# written, then in one run:
#   - the baseline: 4 KiB random writes at QD1, each followed by an fsync (a flush of every
#     replica), through the attached device: their mean latency;
#   - the same writes while snapshots are taken every 2 s, asked of node B (node A, which
#     holds the volume, takes each under its write barrier): the pause each one held the
#     writes (node A logs it), the time the CLI took, and the writes' rate against the
#     baseline's (it includes the first write after each snapshot copying its 1 MiB extent).
# Prints a table with the ratios. Cleans up after itself.
#
#   bench/scripts/cluster-snapshot.sh [--seconds N] [--size 1GiB] [--snapshots 5] [--dir /var/tmp]
set -euo pipefail
seconds=10 size=1GiB snapshots=5 dir=/var/tmp ttl=5
while (($#)); do
  case "$1" in
    --seconds) seconds=$2; shift 2 ;;
    --size) size=$2; shift 2 ;;
    --snapshots) snapshots=$2; shift 2 ;;
    --dir) dir=$2; shift 2 ;;
    *) echo "usage: $0 [--seconds N] [--size SIZE] [--snapshots N] [--dir DIR]" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/../.."
bench_name=snap bench_volumes=(snap) bench_daemon_args=(--replace-after 60)
# shellcheck source=bench/scripts/cluster-lib.sh
. bench/scripts/cluster-lib.sh

cli a volume create snap --size "$size" --replicas 3 >/dev/null
dev=$(cli a volume attach snap)
fio --name=fill --filename="$dev" --direct=1 --ioengine=io_uring --rw=write --bs=1M --iodepth=8 \
  --end_fsync=1 >/dev/null
job=(--name=w --filename="$dev" --direct=1 --ioengine=psync --rw=randwrite --bs=4k --fsync=1
  --randrepeat=0 --norandommap --output-format=json --time_based)
iops() { python3 -c 'import json,sys; t=open(sys.argv[1]).read(); j=json.loads(t[t.index("{"):])["jobs"][0]; print(j["write"]["iops"])' "$1"; }
fio "${job[@]}" --runtime="$seconds" >"$work/base.json"
base=$(iops "$work/base.json")
runtime=$((snapshots * 2 + 4))
fio "${job[@]}" --runtime="$runtime" >"$work/during.json" &
fio_pid=$!
sleep 2
walls=()
for i in $(seq "$snapshots"); do
  t0=$(date +%s.%N)
  cli b snapshot create snap "s$i" >/dev/null
  t1=$(date +%s.%N)
  walls+=("$(python3 -c "print(($t1 - $t0) * 1000)")")
  sleep 2
done
wait "$fio_pid"
during=$(iops "$work/during.json")
pauses=$(grep -o 'writes paused for the snapshot volume=snap snapshot=s[0-9]* pause_us=[0-9]*' "$work/a.log" | sed 's/.*pause_us=//' | tr '\n' ' ')
python3 - "$base" "$during" "$pauses" "${walls[*]}" "$size" "$seconds" <<'PY'
import statistics, sys
base, during = float(sys.argv[1]), float(sys.argv[2])
pauses = [int(p) / 1000 for p in sys.argv[3].split()]
walls = [float(w) for w in sys.argv[4].split()]
lat = 1000 / base  # ms per write + fsync at QD1
med = statistics.median
print("| figure | value | ratio to the baseline |")
print("|---|---:|---:|")
print(f"| baseline: 4 KiB write + fsync, QD1, 3 replicas | {base:,.0f}/s, {lat:.2f} ms each | 1.00 |")
print(f"| snapshot pause, median of {len(pauses)} | {med(pauses):.1f} ms | {med(pauses) / lat:.2f} |")
print(f"| snapshot pause, max | {max(pauses):.1f} ms | {max(pauses) / lat:.2f} |")
print(f"| `snapshot create` asked of another node, median | {med(walls):.0f} ms | {med(walls) / lat:.2f} |")
print(f"| writes while snapshots are taken every 2 s | {during:,.0f}/s | {during / base:.2f} |")
print()
print(f"{sys.argv[5]} volume, fully written; {sys.argv[6]} s baseline; pauses as node A logs them (pause_us).")
PY
