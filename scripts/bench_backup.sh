#!/usr/bin/env bash
# Times restic backing up a generated tree of FILES files (default 15000) from a read-only
# kmsfs mount and from the same tree in a plain directory, in one run, side by side.
# Usage: scripts/bench_backup.sh [FILES]   (needs restic, fuse3; builds kmsfs in release)
set -euo pipefail
files=${1:-15000}
cd "$(dirname "$0")/.."
cargo build --release --quiet --bin kmsfs
kmsfs=$PWD/target/release/kmsfs
work=$(mktemp -d /tmp/kmsfs-bench-backup.XXXXXX)
export KMSFS_STATE_DIR=$work/state
mnt=$work/mnt
cleanup() {
    "$kmsfs" umount "$mnt" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
export XDG_CONFIG_HOME=$work/config RESTIC_PASSWORD=bench RESTIC_CACHE_DIR=$work/restic-cache
mkdir -p "$work/plain" "$work/backing" "$mnt"
# A source-like tree: 100 files per directory, 1-12 KB each, deterministic.
python3 - "$work/plain" "$files" <<'PY'
import os, random, sys
root, n = sys.argv[1], int(sys.argv[2])
rng = random.Random(7)
for i in range(n):
    d = os.path.join(root, f"pkg{i // 100:03d}", f"mod{(i // 20) % 5}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"file{i}.src"), "wb") as f:
        f.write(rng.randbytes(rng.randint(1024, 12 * 1024)))
PY
"$kmsfs" init "$work/backing" >/dev/null
"$kmsfs" mount "$work/backing" "$mnt"
cp -a "$work/plain/." "$mnt/"
"$kmsfs" umount "$mnt"
"$kmsfs" mount "$work/backing" "$mnt" --read-only
size=$(du -sh "$work/plain" | cut -f1)
sync
time_backup() { # repo source
    restic init -q -r "$1"
    local t0=$(date +%s.%N)
    restic backup -q -r "$1" "$2" >/dev/null
    echo "$(date +%s.%N) - $t0" | bc
}
plain=$(time_backup "$work/repo-plain" "$work/plain")
mounted=$(time_backup "$work/repo-mount" "$mnt")
printf 'restic backup of %s files (%s): plain directory %.2f s, read-only kmsfs mount %.2f s (%.2fx)\n' \
    "$files" "$size" "$plain" "$mounted" "$(echo "$mounted / $plain" | bc -l)"
