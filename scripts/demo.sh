#!/usr/bin/env bash
# The main job on the embedded default (the local key provider): build kmsfs, create a volume,
# mount it, write through the mount, show that the backing store holds only ciphertext,
# unmount, read the file back offline, and show that a file moved on the backing store no
# longer decrypts. Everything lives in one directory (default: a new /tmp/kmsfs-demo.*), key
# file included.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
    echo "scripts/demo.sh: cargo not found; install a Rust toolchain (rustup) first" >&2
    exit 1
fi
if ! command -v fusermount3 >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && apt-get install -y -qq fuse3 >/dev/null
fi
if [ ! -e /dev/fuse ]; then
    echo "scripts/demo.sh: /dev/fuse is missing: this machine cannot mount FUSE filesystems" >&2
    exit 1
fi
cargo build --release --locked --quiet
kmsfs="$PWD/target/release/kmsfs"

demo=${KMSFS_DEMO_DIR:-$(mktemp -d /tmp/kmsfs-demo.XXXXXX)}
mnt="$demo/mnt"
if grep -q " $mnt " /proc/self/mountinfo 2>/dev/null; then "$kmsfs" umount "$mnt"; fi
rm -rf "$demo/backing" "$demo/config" "$demo/state" "$mnt"
mkdir -p "$demo/backing" "$mnt"
# Keep the demo's key file and this host's trust record beside it rather than in
# ~/.config/kmsfs and /var/lib/kmsfs (or ~/.local/state/kmsfs).
export XDG_CONFIG_HOME="$demo/config" KMSFS_STATE_DIR="$demo/state"
quiet=${KMSFS_DEMO_QUIET:-}
say() { [ -n "$quiet" ] || printf '%s\n' "$*"; }
step() { [ -n "$quiet" ] || printf '\n$ %s\n' "$*"; "$@"; }
cleanup() { grep -q " $mnt " /proc/self/mountinfo 2>/dev/null && "$kmsfs" umount "$mnt" || true; }
trap cleanup EXIT

step "$kmsfs" init "$demo/backing" --context tenant_id=demo
step "$kmsfs" mount "$demo/backing" "$mnt"
secret="patient 4711: blood type AB negative"
say "" && say "\$ echo \"$secret\" > $mnt/notes.txt; mkdir $mnt/scans; cp scan.bin $mnt/scans/"
echo "$secret" > "$mnt/notes.txt"
mkdir "$mnt/scans"
head -c 1000000 /dev/urandom > "$demo/scan.bin"
cp "$demo/scan.bin" "$mnt/scans/scan.bin"
cmp "$demo/scan.bin" "$mnt/scans/scan.bin"
[ "$(cat "$mnt/notes.txt")" = "$secret" ] || { echo "demo: read-back through the mount failed" >&2; exit 1; }
say "(read back through the mount: ok)"
if grep -rq "AB negative" "$demo/backing" || find "$demo/backing" | grep -q "notes\|scans"; then
    echo "demo: plaintext (content or a name) found on the backing store" >&2
    exit 1
fi
# Names are encrypted on the store too: where notes.txt is stored.
notes=$("$kmsfs" decode "$demo/backing" --reverse notes.txt)
say "(the backing store $demo/backing holds no plaintext, names included:)"
[ -n "$quiet" ] || ls "$demo/backing"
[ -n "$quiet" ] || head -c 96 "$demo/backing$notes" | od -A d -t x1 | head -4
step "$kmsfs" umount "$mnt"

step "$kmsfs" info "$demo/backing" notes.txt
[ "$("$kmsfs" cat "$demo/backing" notes.txt)" = "$secret" ] || { echo "demo: offline cat failed" >&2; exit 1; }
stolen=$("$kmsfs" decode "$demo/backing" --reverse stolen.txt)
mv "$demo/backing$notes" "$demo/backing$stolen"
say "" && say "\$ mv backing$notes backing$stolen   # notes.txt, stored as stolen.txt would be"
say "\$ kmsfs cat backing stolen.txt"
if "$kmsfs" cat "$demo/backing" stolen.txt; then
    echo "demo: a moved file decrypted" >&2
    exit 1
fi
echo "demo ok: volume in $demo/backing, key file under $demo/config/kmsfs/keys"
