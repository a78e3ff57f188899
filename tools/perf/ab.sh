#!/usr/bin/env bash
# Two hot-clone builds side by side: the main pass of each on the same
# device, alternated, medians (PERF.md, "Main pass, build against build").
#
# usage (root): tools/perf/ab.sh OLD_BIN NEW_BIN [RUNS=7] [SIZE_MIB=2048] [DEVICES="zram loop"]
set -euo pipefail
old=$1 new=$2 runs=${3:-7} size_mib=${4:-2048} devices=${5:-zram loop}
work=$(mktemp -d "${TMPDIR:-/tmp}/hc-perf-ab.XXXXXX")
loopdev="" zram_used=0
cleanup() {
    [ -n "$loopdev" ] && losetup -d "$loopdev" 2>/dev/null || true
    [ "$zram_used" = 1 ] && echo 1 > /sys/block/zram0/reset || true
    rm -rf "$work"
}
trap cleanup EXIT
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
one() { # bin dev -> "GB/s cpu_s_per_GiB"
    "$1" image -d "$2" -o /dev/null --stats-json "$work/s.json" 2>/dev/null
    python3 -c "import json,sys; s=json.load(open('$work/s.json')); print(s['main_pass']['bytes_per_second']/1e9, s['cpu_seconds']/(s['device_bytes']/2**30))"
}
for kind in $devices; do
    if [ "$kind" = zram ]; then
        [ "$(cat /sys/block/zram0/disksize)" = 0 ] || { echo "zram0 in use" >&2; exit 1; }
        zram_used=1; echo "${size_mib}M" > /sys/block/zram0/disksize; dev=/dev/zram0
    else
        truncate -s "${size_mib}M" "$work/loop.img"; loopdev=$(losetup -f --show --direct-io=on "$work/loop.img"); dev=$loopdev
    fi
    dd if=/dev/urandom of="$dev" bs=1M count="$size_mib" oflag=direct status=none
    : > "$work/old"; : > "$work/new"
    for _ in $(seq "$runs"); do one "$old" "$dev" >> "$work/old"; one "$new" "$dev" >> "$work/new"; done
    for b in old new; do
        printf '%s %s: main pass median %.2f GB/s (runs: %s), CPU s/GiB median %.3f\n' "$kind" "$b" \
            "$(cut -d' ' -f1 "$work/$b" | median)" "$(cut -d' ' -f1 "$work/$b" | xargs printf '%.2f ')" \
            "$(cut -d' ' -f2 "$work/$b" | median)"
    done
    if [ "$kind" = zram ]; then echo 1 > /sys/block/zram0/reset; zram_used=0; else losetup -d "$loopdev"; loopdev=""; fi
done
