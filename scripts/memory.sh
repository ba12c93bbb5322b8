#!/usr/bin/env bash
# The daemon's memory while a walk reads many files (docs/PERFORMANCE.md, "Memory"): writes
# FILES small files through a mount, remounts (cold caches), reads every file, lets the kernel
# forget its inodes (drop_caches), reads every file again, and prints the daemon's resident
# memory, the inodes it holds for the kernel and the key cache at each step (from
# `kmsfs status --json`). Needs root (drop_caches) and /dev/fuse.
#
# Usage: scripts/memory.sh [WORKDIR]    Environment: FILES (100000), KEY_CACHE (10000)
set -euo pipefail
cd "$(dirname "$0")/.."
FILES=${FILES:-100000}
KEY_CACHE=${KEY_CACHE:-10000}
command -v fusermount3 >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq fuse3 >/dev/null; }
cargo build --release --quiet --bin kmsfs
KMSFS=$PWD/target/release/kmsfs

work=${1:-$(mktemp -d /var/tmp/kmsfs-memory.XXXXXX)}
mkdir -p "$work/backing" "$work/mnt"
# Trust records of the volumes it makes stay with them, not in /var/lib/kmsfs.
export KMSFS_STATE_DIR=$work/state
export XDG_CONFIG_HOME=$work/config
cleanup() {
    if mountpoint -q "$work/mnt" 2>/dev/null; then
        "$KMSFS" umount "$work/mnt" 2>/dev/null || fusermount3 -u "$work/mnt" 2>/dev/null || true
    fi
}
trap cleanup EXIT
[ -n "$(ls -A "$work/backing")" ] || "$KMSFS" init "$work/backing" >/dev/null
mount() { "$KMSFS" mount --key-cache-entries "$KEY_CACHE" "$work/backing" "$work/mnt"; }

step() { # label: one row from the daemon's status
    "$KMSFS" status --json "$work/mnt" | python3 -c '
import json, sys
v = json.load(sys.stdin)
row = (sys.argv[1], v["memory"]["rss_kib"] / 1024, v["memory"]["peak_rss_kib"] / 1024,
       v["inodes"], v["key_cache"]["entries"], v["key_cache"]["evictions"])
print("%-34s %8.1f %9.1f %8d %10d %10d" % row)' "$1"
}

mount
if [ ! -f "$work/mnt/.written-$FILES" ]; then
    echo "writing $FILES files of 200 bytes through the mount" >&2
    python3 - "$work/mnt" "$FILES" <<'PY'
import os, sys
root, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    d = os.path.join(root, f"d{i // 1000:03d}")
    if i % 1000 == 0:
        os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"f{i}"), "wb") as f:
        f.write(bytes([i % 251]) * 200)
open(os.path.join(root, f".written-{n}"), "w").close()
PY
fi
"$KMSFS" umount "$work/mnt"
sync
echo 3 > /proc/sys/vm/drop_caches
mount
echo "$FILES files, key cache capped at $KEY_CACHE entries"
printf '%-34s %8s %9s %8s %10s %10s\n' step "RSS MiB" "peak MiB" inodes "keys held" "evicted"
step "mounted"
t0=$(date +%s.%N)
find "$work/mnt" -type f -exec cat {} + > /dev/null
t1=$(date +%s.%N)
step "read every file ($(printf '%.1f' "$(echo "$t1 - $t0" | bc)") s)"
echo 2 > /proc/sys/vm/drop_caches
sleep 2
step "kernel forgot its inodes"
find "$work/mnt" -type f -exec cat {} + > /dev/null
step "read every file again"
echo 2 > /proc/sys/vm/drop_caches
sleep 2
find "$work/mnt" -type f -exec cat {} + > /dev/null
step "and a third time"
"$KMSFS" umount "$work/mnt"
