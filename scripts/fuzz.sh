#!/usr/bin/env bash
# Fuzzes the config, header and block decoders (fuzz/fuzz_targets) for MINUTES (10) each with
# cargo-fuzz (installed if missing; RUSTC_BOOTSTRAP lets the stable toolchain build the
# sanitizer instrumentation). New inputs go to a scratch directory, not the repository's small
# corpus; a crash leaves its input under fuzz/artifacts/ and fails this script.
# Usage: scripts/fuzz.sh [MINUTES] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
minutes=${1:-10}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(config header block)
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
scratch=$(mktemp -d /var/tmp/kmsfs-fuzz.XXXXXX)
for t in "${targets[@]}"; do
    mkdir -p "$scratch/$t"
    echo "fuzzing $t for $minutes min (new inputs in $scratch/$t)" >&2
    status=0
    cargo fuzz run -O "$t" "$scratch/$t" "corpus/$t" -- \
        -max_total_time=$((minutes * 60)) -print_final_stats=1 > "$scratch/$t.log" 2>&1 || status=$?
    grep -E "^(#[0-9]+.*DONE|stat::number_of_executed_units|stat::peak_rss_mb|==.*ERROR|SUMMARY)" \
        "$scratch/$t.log" || true
    [ "$status" -eq 0 ] || { echo "fuzz target $t failed (log: $scratch/$t.log)" >&2; exit 1; }
done
