#!/usr/bin/env bash
# Side-by-side benchmark: a plain directory, gocryptfs, securefs and kmsfs (local key provider, and the
# same with KMS_LATENCY_MS of injected latency per key call, the same with plaintext names:
# "kmsfs-plainnames", and mounted --no-xattrs: "kmsfs-noxattrs", as securefs has none) on the
# same disk, in one run; and two kmsfs mounts of one store untarring
# at once against one after the other ("kmsfs-shared").
# Workloads (the project's benchmark set): streaming write and read of 512 MiB in 128 KiB blocks (caches dropped
# between; then once more with only the backing store's cache warm), untar of a generated
# ~15k-file source-like tree, ls -lR, reading every file,
# rm -rf, fio random 4 KiB read and write, a directory of 100,000 files listed (ls -f, ls -l)
# with the daemon's peak memory; and the size of the untarred tree on the backing store
# (allocated and apparent), against plain. Prints a table with seconds (or IOPS), the ratios
# kmsfs/gocryptfs and kmsfs/best peer (the faster of gocryptfs and securefs on that workload),
# and the key-service calls kmsfs made per workload.
#
# Every workload runs ROUNDS times on every filesystem, the filesystems interleaved (one
# round runs each of them once, starting with a different one each round), and the table
# shows medians: on a shared machine a single run of a workload can be off by 2x.
#
# Usage: scripts/bench.sh [WORKDIR]    (default: a new directory under /var/tmp)
# Environment: ROUNDS (3), STREAM_MIB (512), FILES (15000), FIO_SECONDS (10), BIGDIR_FILES
# (100000; 0 skips the big directory),
# KMS_LATENCY_MS (5), KMSFS_BASELINE (the path of another kmsfs binary, e.g. a release build
# of an earlier commit: run beside the others as "kmsfs-base", for an A/B in the same run),
# FILESYSTEMS (which of "plain gocryptfs securefs kmsfs kmsfs-latency kmsfs-plainnames
# kmsfs-noxattrs kmsfs-shared" to run; all)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
STREAM_MIB=${STREAM_MIB:-512}
FILES=${FILES:-15000}
FIO_SECONDS=${FIO_SECONDS:-10}
BIGDIR_FILES=${BIGDIR_FILES:-100000}
KMS_LATENCY_MS=${KMS_LATENCY_MS:-5}

need=()
for tool in gocryptfs securefs fio fusermount3 tar python3 bc; do
    command -v "$tool" >/dev/null 2>&1 || need+=("$tool")
done
if [ ${#need[@]} -gt 0 ]; then
    pkgs=${need[*]}
    pkgs=${pkgs//fusermount3/fuse3}
    echo "installing $pkgs" >&2
    apt-get update -qq && apt-get install -y -qq $pkgs >/dev/null
fi
cargo build --release --quiet --bin kmsfs
KMSFS=$PWD/target/release/kmsfs

work=${1:-$(mktemp -d /var/tmp/kmsfs-bench.XXXXXX)}
mkdir -p "$work"
# Trust records of the volumes it makes stay with them, not in /var/lib/kmsfs.
export KMSFS_STATE_DIR=$work/state
results=$work/results.tsv
: > "$results"
cleanup() {
    for m in "$work"/*/mnt; do
        if mountpoint -q "$m" 2>/dev/null; then
            fusermount3 -u "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
        fi
    done
    return 0
}
trap cleanup EXIT

drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true; }

# The source-like tree, generated deterministically once: ~100 files per directory, sizes
# drawn from a long-tailed distribution like a real source tree (median ~4 KB, some large).
tarball=$work/tree.tar
if [ ! -f "$tarball" ]; then
    python3 - "$work/tree" "$FILES" <<'PY'
import os, random, sys
root, n = sys.argv[1], int(sys.argv[2])
rng = random.Random(2026)
words = [b"fn ", b"let ", b"struct ", b"impl ", b"return ", b"match ", b"if ", b"else ",
         b"self", b"value", b"error", b"result", b"buffer", b"index", b"(", b")", b"{", b"}",
         b";\n", b"    ", b"// ", b"\n"]
for i in range(n):
    d = os.path.join(root, f"crate{i // 1000:02d}", f"module{(i // 100) % 10}")
    os.makedirs(d, exist_ok=True)
    size = min(int(rng.lognormvariate(8.3, 1.1)), 400_000)
    out = bytearray()
    while len(out) < size:
        out += rng.choice(words)
    with open(os.path.join(d, f"file{i}.rs"), "wb") as f:
        f.write(out[:size])
PY
    tar -C "$work/tree" -cf "$tarball" .
    rm -rf "$work/tree"
fi

now() { date +%s.%N; }
round=0
record() { printf '%s\t%s\t%s\t%s\t%s\n' "$round" "$1" "$2" "$3" "$4" >> "$results"; } # fs workload value calls

# The kmsfs binary a variant runs.
kmsfs_bin() { if [ "$1" = kmsfs-base ]; then echo "$KMSFS_BASELINE"; else echo "$KMSFS"; fi; }

# Key-service calls so far (sum over kinds), for kmsfs mounts.
kms_calls() {
    if [[ $1 == kmsfs* ]]; then
        "$(kmsfs_bin "$1")" status --json "$2" | python3 -c '
import json, sys
calls = json.load(sys.stdin)["kms_calls"]
print(" ".join("%s=%d" % (k, v["requests"]) for k, v in sorted(calls.items()) if v["requests"]))'
    else
        echo "-"
    fi
}

# Calls made between two snapshots, as "Op=n" pairs.
delta() {
    python3 - "$1" "$2" <<'PY'
import sys
def parse(s):
    return {} if s in ("-", "") else {k: int(v) for k, v in (p.split("=") for p in s.split())}
a, b = parse(sys.argv[1]), parse(sys.argv[2])
print(" ".join(f"{k}={b[k]-a.get(k,0)}" for k in sorted(b) if b[k] - a.get(k, 0)) or ("-" if not b else "0"))
PY
}

timed() { # fs dir workload command...
    local fs=$1 dir=$2 name=$3; shift 3
    local before after t0 t1
    before=$(kms_calls "$fs" "$dir")
    t0=$(now)
    "$@"
    t1=$(now)
    after=$(kms_calls "$fs" "$dir")
    record "$fs" "$name" "$(echo "$t1 - $t0" | bc)" "$(delta "$before" "$after")"
}

fio_iops() { # file rw
    fio --name=bench --filename="$1" --size=256M --bs=4k --rw="$2" --ioengine=psync \
        --runtime="$FIO_SECONDS" --time_based --output-format=terse --terse-version=3 \
        2>/dev/null | awk -F';' -v rw="$2" '{ print (rw == "randread") ? $8 : $49 }'
}

run_workloads() { # fs dir
    local fs=$1 dir=$2
    drop_caches
    timed "$fs" "$dir" "write ${STREAM_MIB} MiB" \
        dd if=/dev/zero of="$dir/stream" bs=128k count=$((STREAM_MIB * 8)) conv=fsync status=none
    drop_caches
    timed "$fs" "$dir" "read ${STREAM_MIB} MiB" dd if="$dir/stream" of=/dev/null bs=128k status=none
    # The same read with the backing file in the page cache (a remount empties only the
    # mount's own cache): the filesystem's own cost, without the shared disk's noise.
    remount_$fs
    timed "$fs" "$dir" "read again, backing cached" dd if="$dir/stream" of=/dev/null bs=128k status=none
    rm -f "$dir/stream"
    mkdir -p "$dir/src"
    timed "$fs" "$dir" "untar ${FILES} files" tar -C "$dir/src" -xf "$tarball"
    sync
    # What the untarred tree takes on the backing store (against plain: the format's overhead).
    local store
    store=$(backing_of "$fs")
    record "$fs" "tree stored, allocated MiB" "$(du -sk "$store" | awk '{printf "%.2f", $1 / 1024}')" "-"
    record "$fs" "tree stored, apparent MiB" \
        "$(du -sk --apparent-size "$store" | awk '{printf "%.2f", $1 / 1024}')" "-"
    # A fresh mount for the walks: cold kernel caches and, for kmsfs, a cold key cache (every
    # file read costs a Decrypt, as for a backup job or after a reboot).
    remount_$fs
    drop_caches
    timed "$fs" "$dir" "ls -lR" sh -c "ls -lR '$dir/src' > /dev/null"
    drop_caches
    timed "$fs" "$dir" "read all files" sh -c "find '$dir/src' -type f -exec cat {} + > /dev/null"
    timed "$fs" "$dir" "rm -rf" rm -rf "$dir/src"
    record "$fs" "fio randwrite 4k (IOPS)" "$(fio_iops "$dir/fio" randwrite)" "-"
    drop_caches
    record "$fs" "fio randread 4k (IOPS)" "$(fio_iops "$dir/fio" randread)" "-"
    rm -f "$dir/fio"
    [ "$BIGDIR_FILES" -gt 0 ] || return 0
    # One directory of BIGDIR_FILES empty files: listed without and with a stat of each entry
    # (fresh mounts, caches dropped), and the daemon's peak memory after both.
    mkdir "$dir/big"
    timed "$fs" "$dir" "big dir: create" sh -c "cd '$dir/big' && seq $BIGDIR_FILES | sed s/^/file/ | xargs touch"
    remount_$fs
    drop_caches
    timed "$fs" "$dir" "big dir: ls -f" sh -c "ls -f '$dir/big' > /dev/null"
    remount_$fs
    drop_caches
    timed "$fs" "$dir" "big dir: ls -l" sh -c "ls -l '$dir/big' > /dev/null"
    local pid
    pid=$(daemon_of "$fs")
    if [ -n "$pid" ]; then
        record "$fs" "big dir: daemon peak MiB" "$(awk '/VmHWM/ { printf "%.1f", $2 / 1024 }' "/proc/$pid/status")" "-"
    fi
    rm -rf "$dir/big"
}

# The pid of the process serving a filesystem's mount (none for plain).
daemon_of() {
    case $1 in
    plain) ;;
    gocryptfs | securefs) pgrep -f "$1.*$work/$1/cipher" | head -1 ;;
    *) pgrep -f "kmsfs mount.* $work/$1/backing" | head -1 ;;
    esac
    return 0
}

# Where a filesystem keeps what its mount shows.
backing_of() {
    case $1 in
    plain) echo "$work/plain/mnt" ;;
    gocryptfs | securefs) echo "$work/$1/cipher" ;;
    *) echo "$work/$1/backing" ;;
    esac
}
remount_plain() { :; }
# securefs with its default format and a fixed password (as gocryptfs: a local secret).
mount_securefs() {
    securefs mount -b --pass bench "$work/securefs/cipher" "$work/securefs/mnt" >/dev/null 2>&1
    for _ in $(seq 100); do mountpoint -q "$work/securefs/mnt" && return 0; sleep 0.05; done
    echo "scripts/bench.sh: securefs did not mount" >&2
    return 1
}
remount_securefs() { fusermount3 -u "$work/securefs/mnt"; mount_securefs; }
remount_gocryptfs() {
    fusermount3 -u "$work/gocryptfs/mnt"
    gocryptfs -q -passfile "$work/gocryptfs/pass" "$work/gocryptfs/cipher" "$work/gocryptfs/mnt" 2>/dev/null
}
mount_kmsfs() { # variant
    local base=$work/$1
    if [ "$1" = kmsfs-noxattrs ]; then
        XDG_CONFIG_HOME=$base/config "$KMSFS" mount --no-xattrs "$base/backing" "$base/mnt"
    elif [ "$1" = kmsfs-latency ]; then
        XDG_CONFIG_HOME=$base/config KMSFS_INJECT_KMS_LATENCY_MS=$KMS_LATENCY_MS \
            "$KMSFS" mount "$base/backing" "$base/mnt"
    else
        XDG_CONFIG_HOME=$base/config "$(kmsfs_bin "$1")" mount "$base/backing" "$base/mnt"
    fi
}
remount_kmsfs() { "$KMSFS" umount "$work/kmsfs/mnt"; mount_kmsfs kmsfs; }
remount_kmsfs-latency() { "$KMSFS" umount "$work/kmsfs-latency/mnt"; mount_kmsfs kmsfs-latency; }
remount_kmsfs-base() { "$KMSFS_BASELINE" umount "$work/kmsfs-base/mnt"; mount_kmsfs kmsfs-base; }
remount_kmsfs-noxattrs() { "$KMSFS" umount "$work/kmsfs-noxattrs/mnt"; mount_kmsfs kmsfs-noxattrs; }
remount_kmsfs-plainnames() { "$KMSFS" umount "$work/kmsfs-plainnames/mnt"; mount_kmsfs kmsfs-plainnames; }

bench_plain() {
    rm -rf "$work/plain"
    mkdir -p "$work/plain/mnt"
    run_workloads plain "$work/plain/mnt"
}
bench_gocryptfs() {
    mkdir -p "$work/gocryptfs/cipher" "$work/gocryptfs/mnt"
    echo bench > "$work/gocryptfs/pass"
    [ -f "$work/gocryptfs/cipher/gocryptfs.conf" ] ||
        gocryptfs -init -q -passfile "$work/gocryptfs/pass" "$work/gocryptfs/cipher" >/dev/null
    gocryptfs -q -passfile "$work/gocryptfs/pass" "$work/gocryptfs/cipher" "$work/gocryptfs/mnt" 2>/dev/null
    run_workloads gocryptfs "$work/gocryptfs/mnt"
    fusermount3 -u "$work/gocryptfs/mnt"
}
bench_securefs() {
    mkdir -p "$work/securefs/cipher" "$work/securefs/mnt"
    [ -f "$work/securefs/cipher/.securefs.json" ] ||
        securefs create --pass bench "$work/securefs/cipher" >/dev/null 2>&1
    mount_securefs
    run_workloads securefs "$work/securefs/mnt"
    fusermount3 -u "$work/securefs/mnt"
}
bench_kmsfs() { # variant: kmsfs (local provider) or kmsfs-latency (the same, slowed down)
    local base=$work/$1
    rm -rf "$base"
    mkdir -p "$base/backing" "$base/mnt"
    local names=()
    if [ "$1" = kmsfs-plainnames ]; then names=(--plaintext-names); fi
    XDG_CONFIG_HOME=$base/config "$(kmsfs_bin "$1")" init "$base/backing" "${names[@]}" >/dev/null
    mount_kmsfs "$1"
    run_workloads "$1" "$base/mnt"
    "$(kmsfs_bin "$1")" umount "$base/mnt"
}

# Two mounts of one store (as two hosts sharing it would have): the tree untarred into two
# directories, one mount each, one after the other and then both at once (the order swapped
# every round). Together must not be slower than one after the other.
bench_kmsfs-shared() {
    local base=$work/kmsfs-shared
    rm -rf "$base"
    mkdir -p "$base/backing" "$base/mnt" "$base/mnt2"
    XDG_CONFIG_HOME=$base/config "$KMSFS" init "$base/backing" >/dev/null
    XDG_CONFIG_HOME=$base/config "$KMSFS" mount "$base/backing" "$base/mnt"
    XDG_CONFIG_HOME=$base/config "$KMSFS" mount "$base/backing" "$base/mnt2"
    local serial=(sh -c "mkdir '$base/mnt/s1' && tar -C '$base/mnt/s1' -xf '$tarball' && mkdir '$base/mnt2/s2' && tar -C '$base/mnt2/s2' -xf '$tarball'")
    local parallel=(sh -c "mkdir '$base/mnt/p1' '$base/mnt2/p2' && { tar -C '$base/mnt/p1' -xf '$tarball' & tar -C '$base/mnt2/p2' -xf '$tarball'; wait; }")
    sync
    if [ $((round % 2)) = 1 ]; then
        timed kmsfs-shared "$base/mnt" "untar x2, one after the other" "${serial[@]}"
        sync
        timed kmsfs-shared "$base/mnt" "untar x2, both at once" "${parallel[@]}"
    else
        timed kmsfs-shared "$base/mnt" "untar x2, both at once" "${parallel[@]}"
        sync
        timed kmsfs-shared "$base/mnt" "untar x2, one after the other" "${serial[@]}"
    fi
    "$KMSFS" umount "$base/mnt2"
    "$KMSFS" umount "$base/mnt"
}

read -r -a filesystems <<< "${FILESYSTEMS:-plain gocryptfs securefs kmsfs kmsfs-latency kmsfs-plainnames kmsfs-noxattrs kmsfs-shared}"
if [ -n "${KMSFS_BASELINE:-}" ]; then
    filesystems+=(kmsfs-base)
fi
for round in $(seq 1 "$ROUNDS"); do
    n=${#filesystems[@]}
    for i in $(seq 0 $((n - 1))); do
        fs=${filesystems[$(((i + round - 1) % n))]}
        echo "round $round/$ROUNDS: $fs" >&2
        case $fs in
        plain) bench_plain ;;
        gocryptfs) bench_gocryptfs ;;
        securefs) bench_securefs ;;
        kmsfs-shared) bench_kmsfs-shared ;;
        *) bench_kmsfs "$fs" ;;
        esac
    done
done

python3 - "$results" "$KMS_LATENCY_MS" "$ROUNDS" <<'PY'
import statistics, sys
rows, lat, rounds = sys.argv[1], sys.argv[2], sys.argv[3]
data, calls, order = {}, {}, []
for line in open(rows):
    r, fs, w, v, c = line.rstrip("\n").split("\t")
    data.setdefault((fs, w), {})[int(r)] = float(v) if v else float("nan")
    if fs.startswith("kmsfs") and (fs, w) not in calls:
        calls[(fs, w)] = c
    if w not in order:
        order.append(w)
def median(fs, w):
    vals = list(data.get((fs, w), {}).values())
    return statistics.median(vals) if vals else None
def ratio_of(w, k, g):
    # For IOPS higher is better: report speedup the same way (kmsfs time / gocryptfs time).
    return (g / k) if "IOPS" in w else (k / g)
def ratio(w, fs):
    k, g = median(fs, w), median("gocryptfs", w)
    return f"{ratio_of(w, k, g):.2f}" if k and g else "-"
def per_round(w, fs):
    k, g = data.get((fs, w), {}), data.get(("gocryptfs", w), {})
    return " ".join(f"{ratio_of(w, k[r], g[r]):.2f}" for r in sorted(k) if r in g and k[r] and g[r])
def best_peer(w):
    # The faster of gocryptfs and securefs on the workload (the one kmsfs must beat).
    peers = [(median(p, w), p) for p in ("gocryptfs", "securefs") if median(p, w)]
    if not peers:
        return None
    return (max if "IOPS" in w else min)(peers)[1]
def ratio_best(w, fs):
    b, k = best_peer(w), median(fs, w)
    return f"{ratio_of(w, k, median(b, w)):.2f}" if b and k else "-"
def per_round_best(w, fs):
    b = best_peer(w)
    if not b:
        return ""
    k, g = data.get((fs, w), {}), data.get((b, w), {})
    return " ".join(f"{ratio_of(w, k[r], g[r]):.2f}" for r in sorted(k) if r in g and k[r] and g[r])
print(f"medians of {rounds} rounds")
print(f"{'workload':<24} {'plain':>9} {'gocryptfs':>10} {'securefs':>9} {'kmsfs':>9} {'k/g':>6} {'k/best':>6} {'kmsfs+'+lat+'ms':>11} {'k/g':>6}  k/best each round  k/g each round (kmsfs | +latency)  key calls (kmsfs | +latency)")
for w in order:
    vals = [median(fs, w) for fs in ("plain", "gocryptfs", "securefs", "kmsfs", "kmsfs-latency")]
    fmt = lambda v: "-" if v is None else (f"{v:.0f}" if "IOPS" in w else f"{v:.2f}")
    print(f"{w:<24} {fmt(vals[0]):>9} {fmt(vals[1]):>10} {fmt(vals[2]):>9} {fmt(vals[3]):>9} {ratio(w,'kmsfs'):>6} {ratio_best(w,'kmsfs'):>6} {fmt(vals[4]):>11} {ratio(w,'kmsfs-latency'):>6}  {per_round_best(w,'kmsfs')} ({best_peer(w) or '-'})  {per_round(w,'kmsfs')} | {per_round(w,'kmsfs-latency')}  {calls.get(('kmsfs',w),'-')} | {calls.get(('kmsfs-latency',w),'-')}")
print("times in seconds (lower is better) except IOPS; k/g = kmsfs time / gocryptfs time, k/best = kmsfs time / the best peer's (gocryptfs or securefs, named after each round's ratios); for IOPS the peer's IOPS / kmsfs IOPS; so below 1 means kmsfs is faster; ratios are of the medians")
if any(fs == "kmsfs-plainnames" for fs, _ in data):
    def en(w):
        k, p = data.get(("kmsfs", w), {}), data.get(("kmsfs-plainnames", w), {})
        return [ratio_of(w, k[x], p[x]) for x in sorted(k) if x in p and k[x] and p[x]]
    print()
    print(f"Encrypted names against plaintext names (kmsfs / kmsfs-plainnames; above 1: encrypted names cost):")
    print(f"{'workload':<24} {'encrypted':>9} {'plaintext':>9} {'e/p':>6}  e/p each round")
    for w in order:
        k, p = median("kmsfs", w), median("kmsfs-plainnames", w)
        fmt = lambda v: "-" if v is None else (f"{v:.0f}" if "IOPS" in w else f"{v:.2f}")
        rat = f"{ratio_of(w, k, p):.2f}" if k and p else "-"
        print(f"{w:<24} {fmt(k):>9} {fmt(p):>9} {rat:>6}  {' '.join(f'{x:.2f}' for x in en(w))}")
if any(fs == "kmsfs-noxattrs" for fs, _ in data):
    print()
    print("Mounted --no-xattrs (no extended attributes, as securefs), against the best peer:")
    print(f"{'workload':<24} {'kmsfs':>9} {'noxattrs':>9} {'best':>9} {'n/best':>6}  n/best each round")
    for w in order:
        k, n, b = median("kmsfs", w), median("kmsfs-noxattrs", w), best_peer(w)
        fmt = lambda v: "-" if v is None else (f"{v:.0f}" if "IOPS" in w else f"{v:.2f}")
        bv = median(b, w) if b else None
        rat = f"{ratio_of(w, n, bv):.2f}" if n and bv else "-"
        nn, bb = data.get(("kmsfs-noxattrs", w), {}), data.get((b, w), {}) if b else {}
        each = " ".join(f"{ratio_of(w, nn[r], bb[r]):.2f}" for r in sorted(nn) if r in bb and nn[r] and bb[r])
        print(f"{w:<24} {fmt(k):>9} {fmt(n):>9} {fmt(bv):>9} {rat:>6}  {each} ({b or '-'})")
if any(fs == "kmsfs-shared" for fs, _ in data):
    sh = data.get(("kmsfs-shared", "untar x2, both at once"), {}), data.get(("kmsfs-shared", "untar x2, one after the other"), {})
    rs = [r for r in sorted(sh[0]) if r in sh[1]]
    print()
    print("Two mounts of one store, untarring into two directories (both at once / one after the other; below 1: together is faster):")
    both, serial = median("kmsfs-shared", "untar x2, both at once"), median("kmsfs-shared", "untar x2, one after the other")
    if both and serial:
        print(f"  both at once {both:.2f} s, one after the other {serial:.2f} s, ratio {both / serial:.2f}; each round: {' '.join(f'{sh[0][r] / sh[1][r]:.2f}' for r in rs)}")
if any(fs == "kmsfs-base" for fs, _ in data):
    def ab(w, r=None):
        k, b = data.get(("kmsfs", w), {}), data.get(("kmsfs-base", w), {})
        rs = [r] if r is not None else sorted(k)
        return [ratio_of(w, k[x], b[x]) for x in rs if x in b and k[x] and b[x]]
    print()
    print(f"A/B against KMSFS_BASELINE: {'workload':<24} {'kmsfs':>9} {'base':>9} {'k/base':>7}  k/base each round")
    for w in order:
        k, b = median("kmsfs", w), median("kmsfs-base", w)
        fmt = lambda v: "-" if v is None else (f"{v:.0f}" if "IOPS" in w else f"{v:.2f}")
        each = " ".join(f"{x:.2f}" for x in ab(w))
        rat = f"{ratio_of(w, k, b):.2f}" if k and b else "-"
        print(f"{'':<27}{w:<24} {fmt(k):>9} {fmt(b):>9} {rat:>7}  {each}")
PY
