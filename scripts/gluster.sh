#!/usr/bin/env bash
# A single-node GlusterFS volume on loopback, mounted by N clients, standing for a store that
# several hosts share (the shared-storage tests run one kmsfs mount on each client mount).
#
#   scripts/gluster.sh up STATE_DIR [CLIENTS]   start glusterd, create and start a volume with
#                                               its brick in STATE_DIR, mount it CLIENTS (3)
#                                               times; print the client mounts, ':'-separated
#   scripts/gluster.sh down STATE_DIR           unmount, stop and delete the volume, kill what
#                                               was started (by pid), remove STATE_DIR
#
# The volume gets the settings docs/OPERATIONS.md gives for kmsfs on GlusterFS. Root only.
set -euo pipefail

usage() { echo "usage: scripts/gluster.sh up|down STATE_DIR [CLIENTS]" >&2; exit 2; }
[ $# -ge 2 ] || usage
cmd=$1 state=$2 clients=${3:-3}
vol=kmsfs$$
[ -f "$state/volume" ] && vol=$(cat "$state/volume")

# Every process that serves or mounts the volume: glusterd, the brick, the clients.
pids_of_volume() {
    local p
    for p in /proc/[0-9]*; do
        tr '\0' ' ' 2>/dev/null <"$p/cmdline" | grep -q -- "$vol" && echo "${p#/proc/}"
    done
    return 0
}

case $cmd in
up)
    mkdir -p "$state/brick" "$state/run"
    echo "$vol" >"$state/volume"
    if ! gluster --mode=script volume list >/dev/null 2>&1; then
        glusterd -p "$state/run/glusterd.pid" --log-file="$state/glusterd.log"
        for _ in $(seq 100); do gluster --mode=script volume list >/dev/null 2>&1 && break; sleep 0.1; done
    fi
    gluster --mode=script volume create "$vol" "$(hostname):$state/brick" force >/dev/null
    # Settings for kmsfs (docs/OPERATIONS.md): writes reach the server before the lock
    # that ordered them is released, no client serves a stale length or block, and no
    # stale record of a hard link's old name makes a later link to it fail.
    for opt in performance.write-behind=off performance.flush-behind=off \
        performance.stat-prefetch=off performance.quick-read=off performance.io-cache=off \
        performance.read-ahead=off performance.open-behind=off performance.readdir-ahead=off \
        storage.gfid2path=off; do
        gluster --mode=script volume set "$vol" "${opt%%=*}" "${opt#*=}" >/dev/null
    done
    gluster --mode=script volume start "$vol" >/dev/null
    roots=()
    for i in $(seq "$clients"); do
        mkdir -p "$state/client$i"
        for _ in $(seq 50); do
            mount -t glusterfs -o attribute-timeout=0,entry-timeout=0,negative-timeout=0,direct-io-mode=enable \
                "$(hostname):/$vol" "$state/client$i" 2>/dev/null && break
            sleep 0.2
        done
        mountpoint -q "$state/client$i" || { echo "scripts/gluster.sh: cannot mount client $i of $vol" >&2; exit 1; }
        roots+=("$state/client$i")
    done
    (IFS=:; echo "${roots[*]}")
    ;;
down)
    [ -d "$state" ] || exit 0
    # By the mount table: a client whose process died is still mounted, but not a mountpoint
    # to mountpoint(1) (ENOTCONN).
    for m in "$state"/client*; do
        if grep -qF " $m " /proc/mounts; then umount -l "$m" || true; fi
    done
    if gluster --mode=script volume info "$vol" >/dev/null 2>&1; then
        gluster --mode=script volume stop "$vol" force >/dev/null 2>&1 || true
        gluster --mode=script volume delete "$vol" >/dev/null 2>&1 || true
    fi
    pids=$(pids_of_volume)
    [ -f "$state/run/glusterd.pid" ] && pids="$pids $(cat "$state/run/glusterd.pid")"
    for pid in $pids; do kill "$pid" 2>/dev/null || true; done
    sleep 0.5
    for pid in $pids; do kill -9 "$pid" 2>/dev/null || true; done
    rm -rf "$state"
    ;;
*) usage ;;
esac
