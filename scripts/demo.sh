#!/usr/bin/env bash
# The main job on the embedded default (the local key provider): build kmsfs, create a volume,
# encrypt a file into it, show what the backing store holds, read the file back, and show that
# a file moved on the backing store no longer decrypts.
# Everything lives in one directory (default: a new /tmp/kmsfs-demo.*), key file included.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
    echo "scripts/demo.sh: cargo not found; install a Rust toolchain (rustup) first" >&2
    exit 1
fi
cargo build --release --locked --quiet
kmsfs="$PWD/target/release/kmsfs"

demo=${KMSFS_DEMO_DIR:-$(mktemp -d /tmp/kmsfs-demo.XXXXXX)}
rm -rf "$demo/backing" "$demo/config"
mkdir -p "$demo/backing"
# Keep the demo's key file beside it rather than in ~/.config/kmsfs.
export XDG_CONFIG_HOME="$demo/config"
quiet=${KMSFS_DEMO_QUIET:-}
step() { [ -n "$quiet" ] || printf '\n$ %s\n' "$*"; "$@"; }

step "$kmsfs" init "$demo/backing" --context tenant_id=demo
secret="patient 4711: blood type AB negative"
[ -n "$quiet" ] || printf '\n$ echo "%s" | kmsfs import %s notes.txt\n' "$secret" "$demo/backing"
echo "$secret" | "$kmsfs" import "$demo/backing" notes.txt
step "$kmsfs" info "$demo/backing"
step "$kmsfs" info "$demo/backing" notes.txt
step "$kmsfs" cat "$demo/backing" notes.txt > "$demo/roundtrip.txt"
[ "$(cat "$demo/roundtrip.txt")" = "$secret" ] || { echo "demo: round trip failed" >&2; exit 1; }
[ -n "$quiet" ] || echo "$secret"

if grep -q "AB negative" "$demo/backing/notes.txt"; then
    echo "demo: plaintext found on the backing store" >&2
    exit 1
fi
[ -n "$quiet" ] || echo "(the backing file $demo/backing/notes.txt holds no plaintext)"

mv "$demo/backing/notes.txt" "$demo/backing/stolen.txt"
[ -n "$quiet" ] || printf '\n$ mv backing/notes.txt backing/stolen.txt; kmsfs cat backing stolen.txt\n'
if "$kmsfs" cat "$demo/backing" stolen.txt; then
    echo "demo: a moved file decrypted" >&2
    exit 1
fi
echo "demo ok: volume in $demo/backing, key file under $demo/config/kmsfs/keys"
