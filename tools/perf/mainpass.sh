#!/usr/bin/env bash
# PERF.md table "main pass": hot-clone's main-pass throughput against fio's
# read strategies on the same device, alternated in one run, medians.
#
# usage (root): tools/perf/mainpass.sh [RUNS=5] [SIZE_MIB=2048] [DEVICES="zram loop"]
#   zram: /dev/zram0 at SIZE_MIB (must be unused: disksize 0; reset after)
#   loop: a direct-io loop device over a file in ${TMPDIR:-/tmp}
# Both are filled with random data first. Prints one table per device.
set -euo pipefail
runs=${1:-5}
size_mib=${2:-2048}
devices=${3:-zram loop}
cd "$(dirname "$0")/../.."
cargo build --release -q --bin hot-clone
bin=$PWD/target/release/hot-clone
work=$(mktemp -d "${TMPDIR:-/tmp}/hc-perf-mainpass.XXXXXX")
loopdev=""
zram_used=0
cleanup() {
    [ -n "$loopdev" ] && losetup -d "$loopdev" 2>/dev/null || true
    [ "$zram_used" = 1 ] && echo 1 > /sys/block/zram0/reset || true
    rm -rf "$work"
}
trap cleanup EXIT

# name|fio arguments (1 MiB reads, O_DIRECT, the whole device per run)
strategies=(
    "psync x1|--ioengine=psync --numjobs=1"
    "psync x2|--ioengine=psync --numjobs=2"
    "io_uring QD1 x1|--ioengine=io_uring --iodepth=1 --numjobs=1"
    "io_uring QD8 x1|--ioengine=io_uring --iodepth=8 --numjobs=1"
    "io_uring QD8 x2|--ioengine=io_uring --iodepth=8 --numjobs=2"
    "io_uring QD64 x1|--ioengine=io_uring --iodepth=64 --numjobs=1"
    "io_uring QD64 x2|--ioengine=io_uring --iodepth=64 --numjobs=2"
    "io_uring QD128 x2 fixedbufs|--ioengine=io_uring --iodepth=128 --numjobs=2 --fixedbufs --registerfiles"
    "libaio QD64 x1|--ioengine=libaio --iodepth=64 --numjobs=1"
    "libaio QD64 x2|--ioengine=libaio --iodepth=64 --numjobs=2"
)

fio_bw() { # device, fio args... -> bytes/s
    local dev=$1; shift
    local jobs=1
    case "$*" in *--numjobs=2*) jobs=2 ;; esac
    local part=$((100 / jobs))
    fio --name=read --filename="$dev" --rw=read --bs=1M --direct=1 \
        --size="${part}%" --offset_increment="${part}%" --group_reporting \
        --output-format=json "$@" 2>/dev/null |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["jobs"][0]["read"]["bw_bytes"])'
}

hc_bw() { # device -> bytes/s of the main pass; CPU s/GiB of the run to $work/cpu
    "$bin" image -d "$1" -o /dev/null --stats-json "$work/stats.json" 2>/dev/null
    python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(int(d["main_pass"]["bytes_per_second"])); open(sys.argv[2],"a").write("%.3f\n" % (d["cpu_seconds"] / (d["device_bytes"] / 2**30)))' "$work/stats.json" "$work/cpu"
}

hc_pipe_bw() { # device -> bytes/s of the main pass, image piped to cat
    "$bin" image -d "$1" --stats-json "$work/stats-pipe.json" 2>/dev/null | cat > /dev/null
    python3 -c 'import json,sys; print(int(json.load(open(sys.argv[1]))["main_pass"]["bytes_per_second"]))' "$work/stats-pipe.json"
}

dd_bw() { # device, dd flags... -> bytes/s (the seed's data path: 1 MiB reads, written to a pipe)
    local dev=$1; shift
    local s e
    s=$(date +%s.%N)
    dd if="$dev" bs=1M "$@" status=none | cat > /dev/null
    e=$(date +%s.%N)
    awk -v b="$(blockdev --getsize64 "$dev")" -v s="$s" -v e="$e" 'BEGIN {printf "%d", b / (e - s)}'
}

median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
gbs() { awk -v b="$1" 'BEGIN {printf "%.2f", b / 1e9}'; }

measure() { # device label
    local dev=$1 label=$2
    declare -A results=()
    local hc=() hc_pipe=() dd_buf=() dd_direct=()
    rm -f "$work/cpu"
    for run in $(seq 1 "$runs"); do
        for s in "${strategies[@]}"; do
            local name=${s%%|*} args=${s#*|}
            # shellcheck disable=SC2086
            results[$name]+="$(fio_bw "$dev" $args) "
        done
        hc+=("$(hc_bw "$dev")")
        sync; echo 1 > /proc/sys/vm/drop_caches
        hc_pipe+=("$(hc_pipe_bw "$dev")")
        dd_buf+=("$(dd_bw "$dev")")
        dd_direct+=("$(dd_bw "$dev" iflag=direct)")
    done
    echo
    echo "== $label: $dev, $size_mib MiB, $runs runs each, alternated =="
    echo "| reader | median GB/s | runs (GB/s) |"
    echo "|---|---|---|"
    local best=0 best_name=""
    for s in "${strategies[@]}"; do
        local name=${s%%|*}
        # shellcheck disable=SC2206
        local values=(${results[$name]})
        local m
        m=$(median "${values[@]}")
        local list=""
        for v in "${values[@]}"; do list+="$(gbs "$v") "; done
        echo "| fio $name | $(gbs "$m") | $list|"
        if awk -v a="$m" -v b="$best" 'BEGIN {exit !(a > b)}'; then best=$m; best_name=$name; fi
    done
    local m_hc list=""
    m_hc=$(median "${hc[@]}")
    for v in "${hc[@]}"; do list+="$(gbs "$v") "; done
    echo "| **hot-clone main pass** | **$(gbs "$m_hc")** | $list|"
    local l0="" l1="" l2=""
    for v in "${hc_pipe[@]}"; do l0+="$(gbs "$v") "; done
    echo "| hot-clone main pass \\| cat | $(gbs "$(median "${hc_pipe[@]}")") | $l0|"
    for v in "${dd_buf[@]}"; do l1+="$(gbs "$v") "; done
    for v in "${dd_direct[@]}"; do l2+="$(gbs "$v") "; done
    echo "| dd bs=1M (buffered, the seed's path) \\| cat | $(gbs "$(median "${dd_buf[@]}")") | $l1|"
    echo "| dd bs=1M iflag=direct \\| cat | $(gbs "$(median "${dd_direct[@]}")") | $l2|"
    # shellcheck disable=SC2046
    echo "hot-clone CPU seconds per GiB imaged (whole run, user+sys), median: $(median $(cat "$work/cpu"))"
    echo
    echo "best fio: $best_name at $(gbs "$best") GB/s; hot-clone / best = $(awk -v a="$m_hc" -v b="$best" 'BEGIN {printf "%.2f", a / b}')"
}

for kind in $devices; do
    case $kind in
    zram)
        if [ "$(cat /sys/block/zram0/disksize)" != 0 ]; then
            echo "zram0 is in use (disksize $(cat /sys/block/zram0/disksize)); skipping zram" >&2
            continue
        fi
        zram_used=1
        echo "${size_mib}M" > /sys/block/zram0/disksize
        dd if=/dev/urandom of=/dev/zram0 bs=1M count="$size_mib" oflag=direct status=none
        measure /dev/zram0 "zram"
        echo 1 > /sys/block/zram0/reset
        zram_used=0
        ;;
    loop)
        dd if=/dev/urandom of="$work/disk.img" bs=1M count="$size_mib" status=none
        sync "$work/disk.img"
        loopdev=$(losetup --find --show --direct-io=on "$work/disk.img")
        measure "$loopdev" "direct-io loop over $(stat -f -c %T "$work")"
        losetup -d "$loopdev"
        loopdev=""
        ;;
    *) echo "unknown device kind $kind" >&2; exit 2 ;;
    esac
done
