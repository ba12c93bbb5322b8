#!/usr/bin/env bash
# Runs the whole kmsfs test suite on a fresh Debian machine: formatting, lints, unit,
# property, vector, attack and CLI tests, then the README's demo as a smoke test.
# Installs what it needs; under CI=true a missing component is a failure, never a skip.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n== %s\n' "$*"; }

if ! command -v cargo >/dev/null 2>&1; then
    echo "scripts/test.sh: cargo not found; install a Rust toolchain (rustup) first" >&2
    exit 1
fi
for component in rustfmt clippy; do
    if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
        rustup component add "$component"
    fi
done

# man(1) renders man/kmsfs.1 in the man-page test.
if ! command -v man >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && apt-get install -y -qq man-db groff-base >/dev/null
    elif [ "${CI:-}" = true ]; then
        echo "scripts/test.sh: man(1) is missing and cannot be installed" >&2
        exit 1
    fi
fi

# FUSE: the mount tests mount real filesystems (as root here).
if ! command -v fusermount3 >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        say "installing fuse3"
        apt-get update -qq && apt-get install -y -qq fuse3 >/dev/null
    elif [ "${CI:-}" = true ]; then
        echo "scripts/test.sh: fusermount3 is missing and cannot be installed" >&2
        exit 1
    fi
fi
if [ ! -e /dev/fuse ] && [ "${CI:-}" = true ]; then
    echo "scripts/test.sh: /dev/fuse is missing under CI=true" >&2
    exit 1
fi

# Real programs the mount tests run on the mount (restic: the backup tests).
missing=()
for tool in git tar rsync sqlite3 diff restic; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        say "installing ${missing[*]}"
        apt-get update -qq && apt-get install -y -qq git tar rsync sqlite3 diffutils restic >/dev/null
    elif [ "${CI:-}" = true ]; then
        echo "scripts/test.sh: ${missing[*]} missing and cannot be installed" >&2
        exit 1
    fi
fi

# GlusterFS: the shared-storage tests run a second time on a real distributed filesystem, a
# GlusterFS volume on loopback with one client mount per kmsfs mount (scripts/gluster.sh).
if ! command -v glusterd >/dev/null 2>&1 || ! command -v mount.glusterfs >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        say "installing glusterfs-server glusterfs-client"
        apt-get update -qq && apt-get install -y -qq glusterfs-server glusterfs-client >/dev/null
    elif [ "${CI:-}" = true ]; then
        echo "scripts/test.sh: GlusterFS (glusterd, mount.glusterfs) is missing and cannot be installed" >&2
        exit 1
    fi
fi

# moto's KMS-compatible server, which the AWS KMS tests start on loopback ports.
if ! command -v moto_server >/dev/null 2>&1; then
    say "installing moto[server] from PyPI"
    python3 -m pip install --quiet "moto[server]" ||
        python3 -m pip install --quiet --break-system-packages "moto[server]" || {
        echo "scripts/test.sh: cannot install moto[server] (pip install 'moto[server]')" >&2
        exit 1
    }
    hash -r
    command -v moto_server >/dev/null 2>&1 || {
        echo "scripts/test.sh: moto_server is not on PATH after installing moto[server]" >&2
        exit 1
    }
fi

say "cargo fmt --check"
cargo fmt --all --check

say "cargo clippy"
cargo clippy --all-targets --locked -- -D warnings

# A test that hangs fails the run here, its name in the log ("running for over 60 seconds"),
# rather than at CI's time limit.
bounded() {
    timeout --kill-after=30s "$@"
}

say "cargo test"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
bounded 40m cargo test --all-targets --locked 2>&1 | tee "$log"
# Volumes encrypt names by default; the attack, model, crash and name tests run again on
# volumes with plaintext names (init --plaintext-names), the other mode users may choose.
say "cargo test, plaintext names"
KMSFS_TEST_NAMES=plaintext bounded 20m cargo test --locked --test attacks --test mount_attacks \
    --test mount_model --test mount_dirs --test mount_rename --test mount_crash --test rebind \
    --test export --test fsck --test secrets --test shared_storage 2>&1 | tee -a "$log"
# Several mounts of one store, each on its own GlusterFS client (hosts sharing the store).
if [ "$(id -u)" = 0 ] && command -v glusterd >/dev/null 2>&1; then
    say "cargo test, shared storage on GlusterFS"
    gluster_state=$(mktemp -d)
    trap 'rm -f "$log"; scripts/gluster.sh down "$gluster_state"' EXIT
    roots=$(scripts/gluster.sh up "$gluster_state" 3)
    KMSFS_TEST_SHARED=gluster KMSFS_TEST_SHARED_ROOTS="$roots" \
        bounded 15m cargo test --locked --test shared_storage 2>&1 | tee -a "$log"
    scripts/gluster.sh down "$gluster_state"
elif [ "${CI:-}" = true ]; then
    echo "scripts/test.sh: the GlusterFS shared-storage tests need root and glusterd" >&2
    exit 1
else
    say "skipping the GlusterFS shared-storage tests (they need root and glusterd)"
fi
passed=$(grep -oE 'test result: [a-zA-Z]+\. [0-9]+ passed' "$log" | awk '{s += $4} END {print s + 0}')
failed=$(grep -oE '[0-9]+ failed;' "$log" | awk '{s += $1} END {print s + 0}')

say "README demo (scripts/demo.sh)"
KMSFS_DEMO_QUIET=1 scripts/demo.sh

say "all tests passed"
echo "cargo tests: $passed passed, $failed failed"
