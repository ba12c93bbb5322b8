#!/usr/bin/env bash
# Crash soak: ROUNDS (100) rounds of kill -9 of the daemon at a random moment during fsynced
# appends, whole-file writes and renames, directory renames and a concurrent `kmsfs rewrap`;
# after each, every fsynced byte must be there and `kmsfs fsck` clean (tests/crash_soak.rs).
# CI runs the same test with 10 rounds. Usage: scripts/soak.sh [ROUNDS] [SEED]
set -euo pipefail
cd "$(dirname "$0")/.."
export KMSFS_SOAK_ROUNDS=${1:-100}
export KMSFS_SOAK_SEED=${2:-$(date +%s)}
echo "crash soak: $KMSFS_SOAK_ROUNDS rounds, seed $KMSFS_SOAK_SEED" >&2
cargo test --test crash_soak -- --nocapture
