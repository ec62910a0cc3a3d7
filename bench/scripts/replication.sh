#!/usr/bin/env bash
# Replication benchmark (issue 4), not run in CI. Three daemons on this machine with a real
# etcd, in one run:
#   - fio through the attached device with replicas = 1, 2 and 3, against a raw file on the
#     same disk (io_uring, O_DIRECT): 4 KiB random write and read at QD32;
#   - failover: from SIGKILL of the attached node to the first successful O_DIRECT write on
#     another node, once with `attach --force` and once by waiting for the lease to expire;
#   - rebuild: a returning replica's delta (bytes copied against bytes written while it was
#     down) and a replacement replica's full rebuild (bytes copied against allocated), each
#     with its time.
# Prints tables with ratios to the baselines measured in the same run. Cleans up after itself.
#
#   bench/scripts/replication.sh [--seconds N] [--size 1GiB] [--dir /var/tmp] [--ttl 5] [--skip-fio]
set -euo pipefail
seconds=10 size=1GiB dir=/var/tmp ttl=5 skip_fio=0
while (($#)); do
  case "$1" in
    --seconds) seconds=$2; shift 2 ;;
    --size) size=$2; shift 2 ;;
    --dir) dir=$2; shift 2 ;;
    --ttl) ttl=$2; shift 2 ;;
    --skip-fio) skip_fio=1; shift ;;
    *) echo "usage: $0 [--seconds N] [--size SIZE] [--dir DIR] [--ttl SECONDS]" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/../.."
bench_name=repl bench_volumes=(r1 r2 r3 fo rb full) bench_daemon_args=(--replace-after 3 --rebuild-rate 0)
# shellcheck source=bench/scripts/cluster-lib.sh
. bench/scripts/cluster-lib.sh

common=(--direct=1 --group_reporting --output-format=json --randrepeat=0 --norandommap --ioengine=io_uring)
run() { # fio args... -> IOPS
  if ! fio --name=b "${common[@]}" --time_based --runtime="$seconds" "$@" >"$work/fio.json" 2>"$work/fio.err"; then
    echo "fio failed: fio $*" >&2; cat "$work/fio.err" >&2; exit 1
  fi
  python3 -c 'import json,sys; t=open(sys.argv[1]).read(); j=json.loads(t[t.index("{"):])["jobs"][0]; print(j["read"]["iops"]+j["write"]["iops"])' "$work/fio.json"
}
# Ends with a flush, so every replica has committed the data before anything is killed.
fill() { fio --name=fill --direct=1 --ioengine=io_uring --rw=write --bs=1M --iodepth=8 --end_fsync=1 "$@" >/dev/null; }

# --- fio: replicas 1, 2, 3 against a raw file -----------------------------------------------
if ((skip_fio == 0)); then
raw=$work/raw.img
truncate -s "$size" "$raw"
fill --filename="$raw" --size="$size"
declare -A dev=()
for r in 1 2 3; do
  cli a volume create "r$r" --size "$size" --replicas "$r" >/dev/null
  dev[$r]=$(cli a volume attach "r$r")
  fill --filename="${dev[$r]}"
done
printf '| test | raw file | 1 replica | 2 replicas | 3 replicas | 3 replicas / target |\n|---|---:|---:|---:|---:|---:|\n'
for job in "4 KiB random write|--rw=randwrite" "4 KiB random read|--rw=randread"; do
  name=${job%%|*}; args=(${job#*|} --bs=4k --iodepth=32)
  rawi=$(run "${args[@]}" --filename="$raw" --size="$size")
  r1=$(run "${args[@]}" --filename="${dev[1]}")
  r2=$(run "${args[@]}" --filename="${dev[2]}")
  r3=$(run "${args[@]}" --filename="${dev[3]}")
  python3 - "$name" "$rawi" "$r1" "$r2" "$r3" <<'PY'
import sys
name, raw, r1, r2, r3 = sys.argv[1], *map(float, sys.argv[2:])
# Targets: 3-replica random write >= 0.8 x (raw / 3) (three replicas share one disk here);
# random read >= 0.8 x raw.
target = 0.8 * raw / 3 if "write" in name else 0.8 * raw
f = lambda x: f"{x:,.0f} IOPS ({x / raw:.2f})"
print(f"| {name} | {raw:,.0f} IOPS | {f(r1)} | {f(r2)} | {f(r3)} | {r3 / target:.2f} |")
PY
done
for r in 1 2 3; do cli a volume detach "r$r" >/dev/null; cli a volume delete "r$r" >/dev/null; done
rm -f "$raw"
echo
echo "fio, io_uring + O_DIRECT, QD32, ${seconds}s per figure, $size working set, in $dir; (x) = ratio to the raw file;"
echo "the last column is the 3-replica figure over its target (>= 1.00 meets it)."
echo
fi

# --- failover --------------------------------------------------------------------------------
first_write() { # node device -> waits until one O_DIRECT write succeeds
  until dd if=/dev/zero of="$2" bs=4k count=1 oflag=direct conv=fsync status=none 2>/dev/null; do sleep 0.01; done
}
now() { date +%s.%N; }
failover() { # mode (force|lease); sets $took (not run in a subshell: it restarts node A)
  cli a volume create fo --size 256MiB --replicas 3 >/dev/null
  local d; d=$(cli a volume attach fo)
  dd if=/dev/urandom of="$d" bs=1M count=16 oflag=direct conv=fsync status=none
  kill -KILL "${pid[a]}"; wait "${pid[a]}" 2>/dev/null || true
  local t0; t0=$(now)
  local dc
  if [ "$1" = force ]; then
    dc=$(cli c volume attach fo --force)
  else
    until dc=$(cli c volume attach fo 2>/dev/null); do sleep 0.05; done
  fi
  first_write c "$dc"
  local t1; t1=$(now)
  took=$(python3 -c "print(f'{$t1 - $t0:.2f}')")
  cli c volume detach fo --force >/dev/null
  # Bring A back for the next round (its stale loop device and mount go with its data).
  for f in "$work"/a/data/fuse/*; do
    [ -e "$f" ] || continue
    for l in $(losetup -j "$f" | cut -d: -f1); do losetup -d "$l"; done
  done
  umount -l "$work/a/data/fuse" 2>/dev/null || true
  start a
  for _ in $(seq 100); do [ "$(live_nodes c)" = 3 ] && break; sleep 0.1; done
  # A re-attaches what it had attached before it was killed (the volume was released on C).
  cli a volume detach fo --force >/dev/null
  cli c volume delete fo >/dev/null
}
failover force; force_s=$took
failover lease; lease_s=$took
printf '| failover, SIGKILL of the attached node to the first write on another node | seconds | target |\n|---|---:|---:|\n'
printf '| attach --force | %s | <= 1 |\n' "$force_s"
python3 -c "print(f'| lease expiry (TTL $ttl s) | $lease_s | <= {$ttl + 1} |')"
echo

# --- rebuild ---------------------------------------------------------------------------------
inspect_json() { cli "$1" volume inspect "$2" -o json; }
wait_healthy() { # node volume replica-node -> last_rebuild JSON
  for _ in $(seq 1200); do
    if out=$(inspect_json "$1" "$2" | python3 -c '
import json,sys
d=json.load(sys.stdin)
r=[r for r in d["replica_status"] if r["node_id"]==sys.argv[1]]
if r and r[0]["state"]=="healthy" and r[0].get("last_rebuild"):
    b=r[0]["last_rebuild"]; print(b["done_bytes"], b["elapsed_ms"])
else:
    sys.exit(1)' "$3"); then echo "$out"; return; fi
    sleep 0.25
  done
  echo "replica on $3 of $2 did not become healthy" >&2; exit 1
}
# Delta: 3 replicas, 512 MiB written and flushed; B is killed; 64 MiB (sequential) and 500
# random 4 KiB writes within another 64 MiB land while it is down; B returns.
cli a volume create rb --size "$size" --replicas 3 >/dev/null
d=$(cli a volume attach rb)
fill --filename="$d" --size=512M
kill -KILL "${pid[b]}"; wait "${pid[b]}" 2>/dev/null || true
fio --name=seq --direct=1 --ioengine=io_uring --rw=write --bs=1M --iodepth=8 --offset=600M --size=64M --filename="$d" >/dev/null
fio --name=rnd --direct=1 --ioengine=io_uring --rw=randwrite --bs=4k --iodepth=8 --number_ios=500 --offset=700M --size=64M --randseed=7 --filename="$d" --write_iolog="$work/rnd.iolog" >/dev/null
# Bytes written while down, and the same rounded up to the whole 1 MiB extents they touched.
read -r written touched < <(python3 - "$work/rnd.iolog" <<'PY'
import sys
mib = 2**20
# fio's iolog: "[time] file write offset length" per I/O (the time only in version 3).
offs = [int(t[t.index("write") + 1]) for t in map(str.split, open(sys.argv[1])) if "write" in t[1:-2]]
extents = {o // mib for o in offs} | {600 + i for i in range(64)}
print(64 * mib + 4096 * len(offs), len(extents) * mib)
PY
)
start b
read -r delta_bytes delta_ms < <(wait_healthy a rb b)
# Full: 2 replicas on A and B; B is killed for good; after --replace-after (3 s) C gets a new
# replica and a full rebuild of the allocated extents.
cli a volume create full --size "$size" --replicas 2 >/dev/null || true
placed=$(inspect_json a full | python3 -c 'import json,sys; print(" ".join(r["node_id"] for r in json.load(sys.stdin)["replica_status"]))')
df=$(cli a volume attach full)
fill --filename="$df" --size=256M
victim= spare=
for n in $placed; do if [ "$n" != a ]; then victim=$n; fi; done
for n in a b c; do if [[ " $placed " != *" $n "* ]]; then spare=$n; fi; done
kill -KILL "${pid[$victim]}"; wait "${pid[$victim]}" 2>/dev/null || true
unset "pid[$victim]"
alloc=$(inspect_json a full | python3 -c 'import json,sys; print(max(r["allocated_bytes"] for r in json.load(sys.stdin)["replica_status"]))')
read -r full_bytes full_ms < <(wait_healthy a full "$spare")
python3 - "$written" "$touched" "$delta_bytes" "$delta_ms" "$alloc" "$full_bytes" "$full_ms" <<'PY'
import sys
written, touched, delta, delta_ms, alloc, full, full_ms = map(int, sys.argv[1:])
mib = 2**20
rate = lambda b, ms: f"{b / mib / max(ms / 1000, 1e-3):.0f}"
# Target: the delta copies <= 2 x the bytes written during the outage, rounded up to whole
# extents.
print("| rebuild | written while down (whole extents) or allocated | copied | time | copied / (written, in whole extents) | MiB/s |")
print("|---|---:|---:|---:|---:|---:|")
print(f"| delta (returning replica) | {written / mib:.1f} MiB ({touched / mib:.0f} MiB) | {delta / mib:.1f} MiB | {delta_ms / 1000:.2f} s | {delta / touched:.2f} (target <= 2) | {rate(delta, delta_ms)} |")
print(f"| full (replacement replica) | {alloc / mib:.1f} MiB allocated | {full / mib:.1f} MiB | {full_ms / 1000:.2f} s | {full / alloc:.2f} of allocated | {rate(full, full_ms)} |")
PY
echo "Rebuilds unthrottled (--rebuild-rate 0), while the volume stays attached; 1 MiB extents."
