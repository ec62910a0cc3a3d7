#!/usr/bin/env bash
# Restart under load (issue 16), the long run; not part of CI (the short version is
# tests/tests/restart_under_load.rs). One standalone daemon with a 1 GiB volume attached; a
# 256 MiB area written once and flushed; then, per cycle, fio writes 4 KiB blocks at QD8 with
# --verify=crc32c and --verify_backlog for a few seconds while the daemon is SIGKILLed,
# SIGTERMed, or SIGTERMed and replaced by a copy of the binary at another path (a binary
# swap), and started again at once, or replaced by `ballast daemon --upgrade` from the other
# copy (the new daemon asks the running one to hand over). Prints, per kind of restart, the cycles, fio's errors
# (I/O errors and verify failures: a failed fio run counts as one), and the pause: each
# cycle's longest I/O, write or verifying read (p50 and max over the cycles).
#
#   bench/scripts/restart.sh [--kills 20] [--stops 10] [--swaps 2] [--upgrades 4] [--dir /var/tmp]
set -euo pipefail
kills=20 stops=10 swaps=2 upgrades=4 dir=/var/tmp
while (($#)); do
  case "$1" in
    --kills) kills=$2; shift 2 ;;
    --stops) stops=$2; shift 2 ;;
    --swaps) swaps=$2; shift 2 ;;
    --upgrades) upgrades=$2; shift 2 ;;
    --dir) dir=$2; shift 2 ;;
    *) echo "usage: $0 [--kills N] [--stops N] [--swaps N] [--upgrades N] [--dir DIR]" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/../.."
for t in fio python3; do
  command -v "$t" >/dev/null || { echo "$t is required (apt-get install fio python3)" >&2; exit 1; }
done
cargo build --release -q -p daemon --bin ballast
work=$(mktemp -d "$dir/ballast-restart.XXXXXX")
bin=$work/ballast-a
other=$work/ballast-b
cp target/release/ballast "$bin"
cp target/release/ballast "$other"
pid=
cleanup() {
  set +e
  [ -n "$pid" ] && BALLAST_API_SOCKET=$work/api.sock "$bin" volume detach v --force >/dev/null 2>&1
  [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  awk -v w="$work" 'index($2, w) == 1 {print $2}' /proc/mounts | sort -r | while read -r m; do umount -l "$m"; done
  rm -rf "$work"
}
trap cleanup EXIT INT TERM
cli() { BALLAST_API_SOCKET=$work/api.sock "$bin" "$@"; }
launch() { # BINARY [FLAGS...]
  local binary=$1
  shift
  "$binary" daemon --data-dir "$work/data" --node-id restart --api-socket "$work/api.sock" \
    --http 127.0.0.1:0 --pool "$work/pool.img:4GiB" "$@" >>"$work/daemon.log" 2>&1 &
  pid=$!
}
ready() {
  for _ in $(seq 300); do cli status >/dev/null 2>&1 && return; sleep 0.02; done
  echo "the daemon did not start:" >&2; tail "$work/daemon.log" >&2; exit 1
}
start() { # BINARY
  launch "$1"
  ready
}
start "$bin"
cli volume create v --size 1GiB >/dev/null
dev=$(cli volume attach v)
dd if=/dev/urandom of="$dev" bs=1M count=256 oflag=direct conv=fsync,notrunc status=none
: >"$work/cycles"
cycle() { # KIND SIGNAL BINARY
  local kind=$1 sig=$2 next=$3 n=$4
  fio --name=restart --filename="$dev" --direct=1 --ioengine=io_uring --rw=randwrite --bs=4k \
    --iodepth=8 --size=256m --verify=crc32c --verify_backlog=256 --verify_fatal=1 \
    --verify_state_save=0 --time_based --runtime=4 --output-format=json \
    --output="$work/fio-$n.json" 2>"$work/fio-$n.err" &
  local fio=$!
  sleep 1.5
  if [ "$sig" = UPGRADE ]; then
    local old=$pid
    launch "$next" --upgrade
    wait "$old" 2>/dev/null || true
    ready
  else
    kill -"$sig" "$pid"
    wait "$pid" 2>/dev/null || true
    start "$next"
  fi
  local rc=0
  wait "$fio" || rc=$?
  echo "$kind $rc $work/fio-$n.json" >>"$work/cycles"
  echo "[$kind] cycle $n: fio exit $rc" >&2
}
n=0
for _ in $(seq "$kills"); do n=$((n + 1)); cycle SIGKILL KILL "$bin" $n; done
for _ in $(seq "$stops"); do n=$((n + 1)); cycle SIGTERM TERM "$bin" $n; done
for i in $(seq "$swaps"); do
  n=$((n + 1))
  # Alternate between two copies of the binary, so each swap starts another executable.
  if ((i % 2)); then cycle "binary swap" TERM "$other" $n; else cycle "binary swap" TERM "$bin" $n; fi
done
for i in $(seq "$upgrades"); do
  n=$((n + 1))
  if ((i % 2)); then cycle "--upgrade" UPGRADE "$other" $n; else cycle "--upgrade" UPGRADE "$bin" $n; fi
done
python3 - "$work/cycles" <<'EOF'
import json, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    kind, rest = line.rsplit(" ", 2)[0], line.rsplit(" ", 2)[1:]
    rc, path = int(rest[0]), rest[1].strip()
    errors, pause = (1 if rc else 0), None
    try:
        job = json.load(open(path))["jobs"][0]
        errors = max(errors, 1 if job["error"] else 0)
        # fio reads back what it wrote as it goes (verify_backlog): the pause may hit a read.
        pause = max(job[d]["clat_ns"]["max"] for d in ("write", "read")) / 1e6
    except (OSError, ValueError, KeyError, IndexError):
        errors = max(errors, 1)
    rows.setdefault(kind, []).append((errors, pause))
print("| restart | cycles | fio errors | pause p50 | pause max |")
print("|---|---:|---:|---:|---:|")
for kind, r in rows.items():
    pauses = [p for _, p in r if p is not None]
    p50 = f"{statistics.median(pauses):,.0f} ms" if pauses else "-"
    pmax = f"{max(pauses):,.0f} ms" if pauses else "-"
    print(f"| {kind} | {len(r)} | {sum(e for e, _ in r)} | {p50} | {pmax} |")
EOF
