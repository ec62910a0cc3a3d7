#!/usr/bin/env bash
# Build the Ballast managed Docker plugin and register it with the local engine.
#
#   deploy/docker/build-plugin.sh [NAME]        # NAME defaults to ballast/ballast:0.1.0
#
# Environment:
#   BALLAST_BIN         the ballast binary to package; without it, `cargo build --release
#                       -p daemon` runs and target/release/ballast is packaged
#   BALLAST_PLUGIN_DIR  assemble the plugin (config.json + rootfs/) in this directory and keep
#                       it; without it a temporary directory is used and removed afterwards
#   BALLAST_PLUGIN_NAME the plugin's name when NAME is not given
#   BALLAST_PLUGIN_NO_CREATE=1
#                       only assemble the directory, do not call `docker plugin create`
#
# The rootfs holds the binary, the host tools it runs (mount, umount, blkid, mkfs.ext4,
# mkfs.xfs, resize2fs, xfs_growfs), every shared library they load and /etc/mke2fs.conf, all
# copied from this machine. Nothing is downloaded. No shell is included: the plugin starts
# the binary directly.
#
# Running it again is safe, and is how the plugin is upgraded: a disabled plugin of the same
# name is replaced by the new build, which gets the old one's settings (args, env) and data
# directory (pool files, replica and fence state: `docker plugin rm` alone would delete
# them). An enabled plugin is left alone and the script stops (disable it first).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
name=${1:-${BALLAST_PLUGIN_NAME:-ballast/ballast:0.1.0}}

die() {
  echo "build-plugin.sh: $*" >&2
  exit 1
}

# The tools the daemon runs, found on this machine's PATH (plus the sbin directories, which a
# non-root PATH may lack).
tools=(mount umount blkid mkfs.ext4 mkfs.xfs resize2fs xfs_growfs)
tool_path=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# Config files the tools read when present.
configs=(/etc/mke2fs.conf)

command -v ldd >/dev/null 2>&1 || die "ldd is missing (Debian/Ubuntu: apt-get install libc-bin)"
if [ "${BALLAST_PLUGIN_NO_CREATE:-0}" != 1 ]; then
  command -v docker >/dev/null 2>&1 || die "docker is missing"
  docker version --format '{{.Server.Version}}' >/dev/null 2>&1 ||
    die "cannot reach the Docker engine (is dockerd running, may this user use it?)"
  if [ "$(docker plugin inspect --format '{{.Enabled}}' "$name" 2>/dev/null)" = true ]; then
    die "plugin $name exists and is enabled; run 'docker plugin disable -f $name' first"
  fi
fi

# The binary.
if [ -n "${BALLAST_BIN:-}" ]; then
  bin=$BALLAST_BIN
  [ -f "$bin" ] || die "BALLAST_BIN=$bin does not exist"
else
  command -v cargo >/dev/null 2>&1 || die "cargo is missing; install Rust or set BALLAST_BIN"
  echo "build-plugin.sh: cargo build --release -p daemon"
  (cd "$repo" && cargo build --release -p daemon --bin ballast) || die "cargo build failed"
  target=${CARGO_TARGET_DIR:-$repo/target}
  bin=$target/release/ballast
  [ -f "$bin" ] || die "cargo built no $bin"
fi
[ -x "$bin" ] || die "$bin is not executable"

# The plugin directory.
if [ -n "${BALLAST_PLUGIN_DIR:-}" ]; then
  dir=$BALLAST_PLUGIN_DIR
  mkdir -p "$dir"
else
  dir=$(mktemp -d "${TMPDIR:-/tmp}/ballast-plugin.XXXXXX")
  trap 'rm -rf "$dir"' EXIT
fi
rootfs=$dir/rootfs
rm -rf "$rootfs"
mkdir -p "$rootfs"

# Copy `src` to the same absolute path inside the rootfs, following symlinks.
put() {
  local src=$1 dest=$rootfs$2
  mkdir -p "$(dirname "$dest")"
  cp -L "$src" "$dest" || die "cannot copy $src"
}

# Copy every shared library `file` loads (and the dynamic loader) to its path in the rootfs.
put_libs() {
  local file=$1 out lib
  if ! out=$(ldd "$file" 2>&1); then
    case $out in
      *"not a dynamic executable"* | *"statically linked"*) return 0 ;;
      *) die "ldd $file failed: $out" ;;
    esac
  fi
  if grep -q "not found" <<<"$out"; then
    die "$file needs libraries this machine lacks:"$'\n'"$(grep "not found" <<<"$out")"
  fi
  # Lines are "libx.so => /path (addr)", "/lib64/ld-linux-x86-64.so.2 (addr)" or the vdso.
  while read -r lib; do
    [ -e "$rootfs$lib" ] || put "$lib" "$lib"
  done < <(grep -o '/[^ ]*' <<<"$out" | sort -u)
}

put "$bin" /bin/ballast
chmod 0755 "$rootfs/bin/ballast"
put_libs "$bin"

missing=()
for t in "${tools[@]}"; do
  path=$(PATH=$tool_path command -v "$t" || true)
  if [ -z "$path" ]; then
    missing+=("$t")
    continue
  fi
  # Keep the tool's own name (mke2fs decides the filesystem type from it).
  put "$path" "$path"
  put_libs "$path"
done
((${#missing[@]} == 0)) || die "missing tools: ${missing[*]} (Debian/Ubuntu: apt-get install mount util-linux e2fsprogs xfsprogs)"
for c in "${configs[@]}"; do
  if [ -f "$c" ]; then put "$c" "$c"; fi
done

# Mount points Docker fills (the data directory is the propagated mount); /etc/mtab as mount(8)
# knows it.
mkdir -p "$rootfs"/{dev,proc,sys,tmp,etc,run/docker/plugins,var/lib/ballast}
chmod 1777 "$rootfs/tmp"
ln -sfn /proc/self/mounts "$rootfs/etc/mtab"

# Check that every program loads with only the rootfs (chroot needs root). Exit 126/127 is
# "cannot execute" or "missing library"; any other exit means the program ran.
if [ "$(id -u)" -eq 0 ] && command -v chroot >/dev/null 2>&1; then
  for p in /bin/ballast $(for t in "${tools[@]}"; do PATH=$tool_path command -v "$t"; done); do
    rc=0
    out=$(chroot "$rootfs" "$p" -V 2>&1) || rc=$?
    if [ "$rc" -eq 126 ] || [ "$rc" -eq 127 ]; then
      die "$p does not start inside the rootfs: $out"
    fi
  done
fi

cp "$here/config.json" "$dir/config.json"
echo "build-plugin.sh: plugin directory $dir ($(du -sh "$rootfs" | cut -f1) rootfs)"

if [ "${BALLAST_PLUGIN_NO_CREATE:-0}" = 1 ]; then
  exit 0
fi

# Replace a disabled plugin of the same name, keeping its data directory (the propagated
# mount, which `docker plugin rm` would delete with the plugin: pool files, replica state) and
# its settings. Never touch an enabled one.
old_id=
keep=
old_args=
old_env=()
if enabled=$(docker plugin inspect --format '{{.Enabled}}' "$name" 2>/dev/null); then
  if [ "$enabled" = true ]; then
    die "plugin $name exists and is enabled; run 'docker plugin disable -f $name' first"
  fi
  old_id=$(docker plugin inspect --format '{{.Id}}' "$name")
  old_args=$(docker plugin inspect --format '{{join .Settings.Args " "}}' "$name")
  mapfile -t old_env < <(docker plugin inspect --format '{{range .Settings.Env}}{{println .}}{{end}}' "$name" | sed '/^$/d')
  docker_root=$(docker info --format '{{.DockerRootDir}}')
  old_data=$docker_root/plugins/$old_id/propagated-mount
  if [ "$(id -u)" -ne 0 ]; then
    die "plugin $name exists; replacing it while keeping its data directory ($old_data) needs root"
  fi
  if [ -d "$old_data" ] && [ -n "$(ls -A "$old_data")" ]; then
    if grep -q " ${old_data}[/ ]" /proc/self/mountinfo; then
      die "something is still mounted under $old_data; is the plugin really stopped?"
    fi
    keep=$docker_root/ballast-plugin-keep-$old_id
    mkdir -p "$keep"
    find "$old_data" -mindepth 1 -maxdepth 1 -exec mv -t "$keep" {} + ||
      die "cannot move the data directory $old_data to $keep"
  fi
  # -f: the plugin is stopped, but Docker counts the volumes that name it as users. They keep
  # naming it, and work again with the new plugin of the same name.
  if ! docker plugin rm -f "$name" >/dev/null; then
    if [ -n "$keep" ]; then
      find "$keep" -mindepth 1 -maxdepth 1 -exec mv -t "$old_data" {} + && rmdir "$keep"
    fi
    die "cannot remove the old plugin $name"
  fi
fi
docker plugin create "$name" "$dir" >/dev/null ||
  die "docker plugin create $name failed${keep:+ (the old data directory is in $keep)}"

if [ -n "$old_id" ]; then
  # The settings of the old plugin, then its data directory.
  if [ -n "$old_args" ]; then
    docker plugin set "$name" "args=$old_args" >/dev/null ||
      die "cannot set args=\"$old_args\" on the new plugin${keep:+ (the old data directory is in $keep)}"
  fi
  for e in "${old_env[@]}"; do
    docker plugin set "$name" "$e" >/dev/null ||
      echo "build-plugin.sh: warning: the new plugin does not take ${e%%=*}; not carried over" >&2
  done
  if [ -n "$keep" ]; then
    new_id=$(docker plugin inspect --format '{{.Id}}' "$name")
    new_data=$docker_root/plugins/$new_id/propagated-mount
    mkdir -p "$new_data"
    chmod 0755 "$new_data"
    find "$keep" -mindepth 1 -maxdepth 1 -exec mv -t "$new_data" {} + ||
      die "cannot move the data directory from $keep to $new_data"
    rmdir "$keep"
  fi
  echo "build-plugin.sh: replaced plugin $name (disabled), keeping its settings and data directory:"
  echo "  docker plugin enable $name"
  exit 0
fi
echo "build-plugin.sh: created plugin $name (disabled); set it up and enable it:"
echo "  docker plugin set $name args=\"--pool /var/lib/ballast/pool.img:100GiB --http 127.0.0.1:9470\""
echo "  docker plugin enable $name"
