#!/usr/bin/env bash
# Attach and NBD benchmark (issue 3), not run in CI. In one run, with fio:
#   - the attached device /dev/ballast/NAME against a raw file on the same filesystem
#     (io_uring, O_DIRECT): 4 KiB random read and write at QD32, 1 MiB sequential write and read;
#   - Ballast's NBD export against qemu-nbd serving a raw file (--cache=none), both through
#     fio's nbd engine, same jobs.
# Prints a table with ratios (ballast / baseline). Cleans up after itself.
#
#   bench/scripts/attach_nbd.sh [--seconds N] [--size 1GiB] [--dir /var/tmp]
set -euo pipefail
seconds=10 size=1GiB dir=/var/tmp
while (($#)); do
  case "$1" in
    --seconds) seconds=$2; shift 2 ;;
    --size) size=$2; shift 2 ;;
    --dir) dir=$2; shift 2 ;;
    *) echo "usage: $0 [--seconds N] [--size SIZE] [--dir DIR]" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/../.."
for t in fio qemu-nbd python3; do
  command -v "$t" >/dev/null || { echo "$t is required (apt-get install fio qemu-utils python3)" >&2; exit 1; }
done
cargo build --release -q -p daemon
bin=$PWD/target/release/ballast

work=$(mktemp -d "$dir/ballast-attach-bench.XXXXXX")
sock=$work/api.sock
daemon_pid= qnbd_pid=
cleanup() {
  set +e
  [ -n "$qnbd_pid" ] && kill "$qnbd_pid" 2>/dev/null && wait "$qnbd_pid" 2>/dev/null
  if [ -n "$daemon_pid" ]; then
    BALLAST_API_SOCKET=$sock "$bin" volume detach bench --force >/dev/null 2>&1
    kill -TERM "$daemon_pid" 2>/dev/null && wait "$daemon_pid" 2>/dev/null
  fi
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

"$bin" daemon --data-dir "$work/data" --api-socket "$sock" --http 127.0.0.1:0 \
  --pool "$work/pool.img:8GiB" >"$work/daemon.log" 2>&1 &
daemon_pid=$!
export BALLAST_API_SOCKET=$sock
for _ in $(seq 100); do "$bin" status >/dev/null 2>&1 && break; sleep 0.1; done
"$bin" volume create bench --size "$size" >/dev/null
dev=$("$bin" volume attach bench)
nbd_sock=$work/data/nbd.sock
raw=$work/raw.img
qsock=$work/qemu-nbd.sock
truncate -s "$size" "$raw"

common=(--direct=1 --group_reporting --output-format=json --randrepeat=0 --norandommap)
prefill() { fio --name=fill "${common[@]}" --rw=write --bs=1M --iodepth=8 "$@" >/dev/null; }
prefill --ioengine=io_uring --filename="$dev"
prefill --ioengine=io_uring --filename="$raw" --size="$size"

qemu-nbd -f raw -x raw --socket="$qsock" --persistent --shared=16 --cache=none --aio=io_uring "$raw" &
qnbd_pid=$!
for _ in $(seq 100); do [ -S "$qsock" ] && break; sleep 0.1; done

jobs=("4 KiB random read|--rw=randread --bs=4k --iodepth=32"
      "4 KiB random write|--rw=randwrite --bs=4k --iodepth=32"
      "1 MiB sequential write|--rw=write --bs=1M --iodepth=8"
      "1 MiB sequential read|--rw=read --bs=1M --iodepth=8")
run() { # fio target args... -> "IOPS MB/s"
  if ! fio --name=b "${common[@]}" --time_based --runtime="$seconds" "$@" >"$work/fio.json" 2>"$work/fio.err"; then
    echo "fio failed: fio $*" >&2; cat "$work/fio.err" "$work/fio.json" >&2; exit 1
  fi
  python3 -c 'import json,sys; t=open(sys.argv[1]).read(); j=json.loads(t[t.index("{"):])["jobs"][0]; r=j["read"]; w=j["write"]; print(r["iops"]+w["iops"], (r["bw_bytes"]+w["bw_bytes"])/1e6)' "$work/fio.json"
}
printf '| test | raw file | attached | ratio | qemu-nbd | ballast NBD | ratio |\n|---|---:|---:|---:|---:|---:|---:|\n'
for job in "${jobs[@]}"; do
  name=${job%%|*}; args=(${job#*|})
  read -r raw_iops raw_mb < <(run "${args[@]}" --ioengine=io_uring --filename="$raw" --size="$size")
  read -r dev_iops dev_mb < <(run "${args[@]}" --ioengine=io_uring --filename="$dev")
  read -r q_iops q_mb < <(run "${args[@]}" --ioengine=nbd --uri="nbd+unix:///raw?socket=$qsock")
  read -r n_iops n_mb < <(run "${args[@]}" --ioengine=nbd --uri="nbd+unix:///bench?socket=$nbd_sock")
  python3 - "$name" "$raw_iops" "$raw_mb" "$dev_iops" "$dev_mb" "$q_iops" "$q_mb" "$n_iops" "$n_mb" <<'PY'
import sys
name, *v = sys.argv[1:]
raw_i, raw_m, dev_i, dev_m, q_i, q_m, n_i, n_m = map(float, v)
if "4 KiB" in name:
    f = lambda x: f"{x:,.0f} IOPS"; a, b, c, d = raw_i, dev_i, q_i, n_i
else:
    f = lambda x: f"{x:,.0f} MB/s"; a, b, c, d = raw_m, dev_m, q_m, n_m
print(f"| {name} | {f(a)} | {f(b)} | {b/a:.2f} | {f(c)} | {f(d)} | {d/c:.2f} |")
PY
done
echo
echo "fio, io_uring + O_DIRECT on the raw file and the attached device; fio's nbd engine for NBD; ${seconds}s per figure, working set $size, in $dir."
