#!/usr/bin/env bash
# Data-path benchmark (issue 15), not run in CI. In one run, on one disk, the same fio jobs
# against:
#   raw  a file on the same filesystem (io_uring, O_DIRECT);
#   b1   a 1-replica volume through /dev/ballast/NAME (one standalone daemon);
#   b3   a 3-replica volume through /dev/ballast/NAME (three daemons over etcd on loopback,
#        mutual TLS between them as shipped, every pool on this disk);
#   b1u, b3u  the same with FUSE over io_uring (--fuse-transport io-uring) instead of the
#        classic /dev/fuse workers; not in the default targets;
#   rbd  Ceph RBD, size 3, three BlueStore OSDs on this disk, through fio's rbd engine (built
#        by ../shared/peers/ceph/up.sh; included by default when Ceph is installed).
# Jobs: 4 KiB random write and read at QD32 and QD1, 4 KiB random write at QD1 with an
# fdatasync after each write (a flush, fio's --fsync, for rbd), 1 MiB sequential write at QD8.
# Prints IOPS (MiB/s for 1 MiB) with mean latency, each as a ratio to raw, 4 KiB random writes
# per busy core (host CPU time while the job ran), and 3 replicas against Ceph.
#
#   bench/scripts/datapath.sh [--seconds N] [--size 2G] [--targets "raw b1 b3 rbd"] [--dir /var/tmp]
#                             [--jobs "randwrite-4k-qd1 ..."]
set -euo pipefail
peers=${BALLAST_PEERS:-$(cd "$(dirname "$0")/../.." && pwd)/../shared/peers}
targets="raw b1 b3"
command -v ceph-osd >/dev/null && [ -f "$peers/ceph/up.sh" ] && targets="$targets rbd"
seconds=10 size=2G dir=/var/tmp only=""
while (($#)); do
  case "$1" in
    --seconds) seconds=$2; shift 2 ;;
    --size) size=$2; shift 2 ;;
    --targets) targets=$2; shift 2 ;;
    --dir) dir=$2; shift 2 ;;
    --jobs) only=$2; shift 2 ;;
    *) echo "usage: $0 [--seconds N] [--size SIZE] [--targets \"raw b1 b3 rbd\"] [--dir DIR] [--jobs \"NAME ...\"]" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/../.."
for t in fio python3; do
  command -v "$t" >/dev/null || { echo "$t is required (apt-get install fio python3)" >&2; exit 1; }
done
case " $targets " in *" b3 "*) command -v etcd >/dev/null || { echo "b3 needs etcd (apt-get install etcd-server)" >&2; exit 1; } ;; esac
case " $targets " in *" rbd "*)
  command -v ceph-osd >/dev/null && [ -f "$peers/ceph/up.sh" ] || {
    echo "rbd needs Ceph (apt-get install ceph-mon ceph-osd ceph-mgr ceph-common) and $peers/ceph/up.sh (set BALLAST_PEERS)" >&2; exit 1; } ;;
esac
cargo build --release -q -p daemon --bin ballast
bin=$PWD/target/release/ballast

work=$(mktemp -d "$dir/ballast-datapath.XXXXXX")
out=$work/results
mkdir -p "$out"
pids=()
cleanup() {
  set +e
  for n in s a b c; do
    [ -S "$work/$n/api.sock" ] || continue
    for v in v1 v3; do BALLAST_API_SOCKET=$work/$n/api.sock "$bin" volume detach "$v" --force >/dev/null 2>&1; done
  done
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null; done
  awk -v w="$work" 'index($2, w) == 1 {print $2}' /proc/mounts | sort -r | while read -r m; do umount -l "$m"; done
  [ -d "$work/ceph" ] && bash "$peers/ceph/down.sh" "$work/ceph" >/dev/null 2>&1
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
cli() { local n=$1; shift; BALLAST_API_SOCKET=$work/$n/api.sock "$bin" "$@"; }
node() { # NAME [daemon flags...]
  local n=$1; shift
  mkdir -p "$work/$n"
  "$bin" daemon --data-dir "$work/$n/data" --node-id "$n" --api-socket "$work/$n/api.sock" \
    --http 127.0.0.1:0 --pool "$work/$n/pool.img:6GiB" "$@" >"$work/$n.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 300); do cli "$n" status >/dev/null 2>&1 && return; sleep 0.1; done
  echo "node $n did not start:" >&2; tail "$work/$n.log" >&2; exit 1
}
stop_nodes() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  pids=()
}

jobs="randwrite-4k-qd32 randwrite 4k 32 -
randread-4k-qd32 randread 4k 32 -
randwrite-4k-qd1 randwrite 4k 1 -
randread-4k-qd1 randread 4k 1 -
randwrite-4k-qd1-fdatasync randwrite 4k 1 sync
write-1m-qd8 write 1M 8 -"
if [ -n "$only" ]; then
  jobs=$(awk -v only=" $only " 'index(only, " " $1 " ")' <<<"$jobs")
  [ -n "$jobs" ] || { echo "--jobs names none of the jobs" >&2; exit 2; }
fi
cpu_ticks() { awk '/^cpu /{t = 0; for (i = 2; i <= 9; i++) t += $i; print t - $5 - $6, t}' /proc/stat; }
suite() { # TARGET SYNC-FLAG FIO-TARGET-ARGS...
  local t=$1 syncflag=$2
  shift 2
  echo "[$t] prefill $size" >&2
  fio --name=prefill "$@" --size="$size" --rw=write --bs=1M --iodepth=8 --end_fsync=1 \
    --output-format=json >/dev/null
  while read -r name rw bs qd sync; do
    echo "[$t] $name" >&2
    local extra=()
    [ "$sync" = sync ] && extra=("$syncflag")
    read -r busy0 all0 < <(cpu_ticks)
    fio --name="$name" "$@" --size="$size" --rw="$rw" --bs="$bs" --iodepth="$qd" "${extra[@]}" \
      --randrepeat=0 --norandommap --runtime="$seconds" --time_based --output-format=json \
      --output="$out/$t-$name.json"
    read -r busy1 all1 < <(cpu_ticks)
    echo "$((busy1 - busy0)) $((all1 - all0))" >"$out/$t-$name.cpu"
  done <<<"$jobs"
}
file_suite() { # TARGET FILE
  suite "$1" --fdatasync=1 --filename="$2" --ioengine=io_uring --direct=1
}

for t in $targets; do
  case $t in
    raw)
      truncate -s "$size" "$work/raw.img"
      file_suite raw "$work/raw.img"
      rm -f "$work/raw.img" ;;
    b1 | b1u)
      if [ "$t" = b1u ]; then node s --fuse-transport io-uring; else node s; fi
      cli s volume create v1 --size "$size" >/dev/null
      file_suite "$t" "$(cli s volume attach v1)"
      cli s volume detach v1 >/dev/null
      stop_nodes
      rm -rf "$work/s" ;;
    b3 | b3u)
      transport=classic
      [ "$t" = b3u ] && transport=io-uring
      "$bin" ca init --dir "$work/ca" >/dev/null
      cp=$(free_port) pp=$(free_port)
      etcd --data-dir "$work/etcd" --listen-client-urls "http://127.0.0.1:$cp" \
        --advertise-client-urls "http://127.0.0.1:$cp" --listen-peer-urls "http://127.0.0.1:$pp" \
        --initial-advertise-peer-urls "http://127.0.0.1:$pp" \
        --initial-cluster "default=http://127.0.0.1:$pp" >"$work/etcd.log" 2>&1 &
      pids+=($!)
      for n in a b c; do
        "$bin" cert issue --node "$n" --ca-dir "$work/ca" --out-dir "$work/tls" >/dev/null
        node "$n" --fuse-transport "$transport" --etcd "http://127.0.0.1:$cp" --listen "127.0.0.1:$(free_port)" --zone "zone-$n" \
          --tls-ca "$work/ca/ca.pem" --tls-cert "$work/tls/$n.pem" --tls-key "$work/tls/$n-key.pem"
      done
      cli a volume create v3 --size "$size" --replicas 3 >/dev/null
      file_suite "$t" "$(cli a volume attach v3)"
      cli a volume detach v3 >/dev/null
      stop_nodes
      rm -rf "$work/ca" "$work/tls" "$work/etcd" "$work/a" "$work/b" "$work/c" ;;
    rbd)
      IMAGE_SIZE=$size bash "$peers/ceph/up.sh" "$work/ceph" >"$work/ceph-up.log" 2>&1 ||
        { echo "Ceph did not start:" >&2; tail "$work/ceph-up.log" >&2; exit 1; }
      CEPH_CONF=$work/ceph/ceph.conf suite rbd --fsync=1 --ioengine=rbd --clientname=admin \
        --pool=rbd --rbdname=bench
      bash "$peers/ceph/down.sh" "$work/ceph" >/dev/null 2>&1 ;;
    *) echo "unknown target $t (raw, b1, b3, b1u, b3u, rbd)" >&2; exit 2 ;;
  esac
done

python3 - "$out" "$targets" "$jobs" <<'EOF'
import json, os, sys
out, targets, jobs = sys.argv[1], sys.argv[2].split(), [l.split() for l in sys.argv[3].splitlines()]
def figures(t, name):
    p = os.path.join(out, f"{t}-{name}.json")
    if not os.path.exists(p):
        return None
    j = json.load(open(p))["jobs"][0]
    side = j["write"] if j["write"]["io_bytes"] > 0 else j["read"]
    busy, total = map(int, open(os.path.join(out, f"{t}-{name}.cpu")).read().split())
    cores = os.cpu_count() * busy / max(total, 1)
    return {"iops": side["iops"], "mibs": side["bw"] / 1024, "lat_us": side["lat_ns"]["mean"] / 1000,
            "per_core": side["iops"] / cores if cores > 0 else 0.0}
head = "| job | " + " | ".join(targets) + " |"
print(head)
print("|---|" + "---:|" * len(targets))
for name, rw, bs, qd, sync in jobs:
    base = figures("raw", name) if "raw" in targets else None
    cells = []
    for t in targets:
        f = figures(t, name)
        if f is None:
            cells.append("-")
            continue
        if bs == "1M":
            cell = f"{f['mibs']:,.0f} MiB/s"
            if base and t != "raw":
                cell += f" ({f['mibs'] / base['mibs']:.2f}×)"
        else:
            cell = f"{f['iops']:,.0f} ({f['lat_us']:,.0f} µs)"
            if base and t != "raw":
                cell += f" {f['iops'] / base['iops']:.2f}×"
        cells.append(cell)
    print(f"| {name} | " + " | ".join(cells) + " |")
cells = []
for t in targets:
    f = figures(t, "randwrite-4k-qd32")
    cells.append("-" if f is None else f"{f['per_core']:,.0f}")
print("| 4K random writes per busy core (QD32) | " + " | ".join(cells) + " |")
if "b3" in targets and "rbd" in targets:
    print()
    print("| job | 3 replicas ÷ Ceph RBD |")
    print("|---|---:|")
    for name, rw, bs, qd, sync in jobs:
        a, b = figures("b3", name), figures("rbd", name)
        if a and b:
            key = "mibs" if bs == "1M" else "iops"
            print(f"| {name} | {a[key] / b[key]:.1f}× |")
EOF
