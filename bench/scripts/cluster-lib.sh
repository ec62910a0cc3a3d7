# Shared by the cluster benchmarks (sourced from the repository's root): a real etcd, a CA,
# and three release-build daemons `a`, `b` and `c` with mutual TLS, started and registered;
# everything is cleaned up on exit. Set before sourcing: `dir` (where to work), `ttl` (lease
# seconds), `bench_name`, `bench_volumes` (detached at exit) and `bench_daemon_args`.
# Defines `bin`, `work`, `pid`, `cli NODE ARGS...`, `start NODE` and `live_nodes NODE`.
for t in fio etcd python3 curl; do
  command -v "$t" >/dev/null || { echo "$t is required (apt-get install fio etcd-server python3 curl)" >&2; exit 1; }
done
cargo build --release -q -p daemon
bin=$PWD/target/release/ballast
work=$(mktemp -d "$dir/ballast-$bench_name-bench.XXXXXX")
declare -A pid=()
etcd_pid=
cleanup() {
  set +e
  for n in "${!pid[@]}"; do
    for v in "${bench_volumes[@]}"; do
      BALLAST_API_SOCKET=$work/$n/api.sock "$bin" volume detach "$v" --force >/dev/null 2>&1
    done
    kill -KILL "${pid[$n]}" 2>/dev/null; wait "${pid[$n]}" 2>/dev/null
  done
  # A killed daemon's FUSE mounts and loop devices.
  for n in a b c; do
    for f in "$work/$n"/data/fuse/*; do
      [ -e "$f" ] || continue
      for l in $(losetup -j "$f" | cut -d: -f1); do losetup -d "$l"; done
    done
    umount -l "$work/$n/data/fuse" 2>/dev/null
  done
  [ -n "$etcd_pid" ] && kill "$etcd_pid" 2>/dev/null && wait "$etcd_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
cport=$(port) pport=$(port)
etcd --data-dir "$work/etcd" --listen-client-urls "http://127.0.0.1:$cport" \
  --advertise-client-urls "http://127.0.0.1:$cport" --listen-peer-urls "http://127.0.0.1:$pport" \
  --initial-advertise-peer-urls "http://127.0.0.1:$pport" \
  --initial-cluster "default=http://127.0.0.1:$pport" >"$work/etcd.log" 2>&1 &
etcd_pid=$!
for _ in $(seq 100); do curl -s "http://127.0.0.1:$cport/health" | grep -q true && break; sleep 0.1; done

"$bin" ca init --dir "$work/ca" >/dev/null
start() { # node
  mkdir -p "$work/$1"
  # Mutual TLS between nodes, as in production.
  [ -f "$work/tls/$1.pem" ] || "$bin" cert issue --node "$1" --ca-dir "$work/ca" --out-dir "$work/tls" >/dev/null
  "$bin" daemon --data-dir "$work/$1/data" --node-id "$1" --api-socket "$work/$1/api.sock" \
    --http 127.0.0.1:0 --pool "$work/$1/pool.img:16GiB" --etcd "http://127.0.0.1:$cport" \
    --tls-ca "$work/ca/ca.pem" --tls-cert "$work/tls/$1.pem" --tls-key "$work/tls/$1-key.pem" \
    --listen 127.0.0.1:0 --zone "zone-$1" --lease-ttl "$ttl" "${bench_daemon_args[@]}" \
    >>"$work/$1.log" 2>&1 &
  pid[$1]=$!
  for _ in $(seq 200); do cli "$1" status >/dev/null 2>&1 && return; sleep 0.1; done
  echo "node $1 did not start" >&2; cat "$work/$1.log" >&2; exit 1
}
cli() { local n=$1; shift; BALLAST_API_SOCKET=$work/$n/api.sock "$bin" "$@"; }
live_nodes() { cli "$1" node list -o json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))'; }
start a; start b; start c
for _ in $(seq 100); do [ "$(live_nodes a)" = 3 ] && break; sleep 0.1; done
