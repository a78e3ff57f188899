#!/usr/bin/env bash
# PERF.md table "dirty-map memory": what the dirty map of a real
# `hot-clone image` run takes when a share of a big device is written while
# it is imaged. A sparse file under a direct-io loop device stands in for a
# big disk (its holes read at ~20 GiB/s, so a 1 TiB main pass takes about a
# minute); fio writes the share while hot-clone images the device, held in
# catch-up (--hold-file) until fio is done; the figure is the map's own
# count of its memory (`dirty_map_memory_bytes` in --stats-json: fixed
# tables plus the leaves claimed, which are never given back during a run,
# so the end-of-run figure is the peak), with the process's peak RSS
# (`max_rss_bytes`) beside it for scale (that includes the read buffers,
# the trace and the catch-up's extent lists).
#
# usage (root; needs fio): tools/perf/dirtymap.sh SIZE PERCENT PATTERN [-- IMAGE_ARGS...]
#   SIZE     the device, e.g. 1T (the file needs PERCENT of it in free space)
#   PERCENT  share of the device's 4 KiB blocks written, e.g. 0.1
#   PATTERN  uniform4k: single 4 KiB blocks at uniformly random places, each
#                       block at most once (fio's random map): the worst case
#            mixed:     4 KiB-aligned writes of 4 KiB to 1 MiB at random
#                       places (the model of `cargo bench --bench dirty_map`)
#            ext4:      files of 4 KiB to 8 MiB written into an ext4
#                       filesystem made on the device before imaging
# Prints one line: size, percent, pattern, blocks meant to be written and
# dirty blocks the catch-up took (summed over its rounds: what was really
# written, filesystem metadata included; a block whose completion event
# re-marked it after a round took it on its queue event counts twice), map
# memory, the same per TiB, peak RSS, catch-up bytes re-read, events lost,
# converged.
set -euo pipefail
size=$1
percent=$2
pattern=$3
shift 3
[ "${1:-}" = "--" ] && shift
cd "$(dirname "$0")/../.."
cargo build --release -q --bin hot-clone
bin=$PWD/target/release/hot-clone
work=$(mktemp -d "${TMPDIR:-/tmp}/hc-perf-dirtymap.XXXXXX")
loopdev=""
mnt=""
hc_pid=""
cleanup() {
    [ -n "$hc_pid" ] && kill "$hc_pid" 2>/dev/null || true
    [ -n "$mnt" ] && umount "$mnt" 2>/dev/null || true
    [ -n "$loopdev" ] && losetup -d "$loopdev" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

truncate -s "$size" "$work/disk"
loopdev=$(losetup -f --show --direct-io=on "$work/disk")
device_bytes=$(blockdev --getsize64 "$loopdev")
blocks=$(python3 -c "print(int($device_bytes // 4096 * $percent / 100))")
bytes=$((blocks * 4096))

if [ "$pattern" = ext4 ]; then
    mkfs.ext4 -q -T largefile4 -E lazy_itable_init=0,lazy_journal_init=0 "$loopdev"
    mnt="$work/mnt"
    mkdir "$mnt"
    mount "$loopdev" "$mnt"
    sync
fi

touch "$work/hold"
"$bin" image -d "$loopdev" -o /dev/null \
    --hold-file "$work/hold" --stats-json "$work/stats.json" "$@" 2> "$work/log" &
hc_pid=$!
sleep 1

fio_common=(--name=w --direct=1 --ioengine=io_uring --iodepth=16 --output=/dev/null)
case "$pattern" in
    uniform4k)
        fio "${fio_common[@]}" --filename="$loopdev" --rw=randwrite --bs=4k \
            --number_ios="$blocks" ;;
    mixed)
        fio "${fio_common[@]}" --filename="$loopdev" --rw=randwrite --bsrange=4k-1m \
            --blockalign=4k --io_size="$bytes" --norandommap ;;
    ext4)
        # nrfiles files of 4 KiB..8 MiB (mean ~4 MiB) summing to the share.
        nrfiles=$(( bytes / (4 << 20) + 1 ))
        fio "${fio_common[@]}" --directory="$mnt" --rw=write --bs=1m \
            --nrfiles="$nrfiles" --filesize=4k-8m --file_service_type=sequential \
            --size="$bytes" --create_on_open=1
        sync ;;
    *) echo "unknown pattern $pattern" >&2; exit 2 ;;
esac
sleep 2
rm -f "$work/hold"
set +e
wait "$hc_pid"
status=$?
set -e
hc_pid=""
if [ "$status" != 0 ]; then
    echo "hot-clone exited $status:" >&2
    tail -20 "$work/log" >&2
    exit 1
fi
python3 - "$work/stats.json" "$size" "$percent" "$pattern" "$blocks" <<'EOF'
import json, sys
stats = json.load(open(sys.argv[1]))
rss_kib = stats["max_rss_bytes"] // 1024
size, percent, pattern, blocks = sys.argv[2:6]
mib = 2**20
memory = stats["dirty_map_memory_bytes"]
per_tib = memory * 2**40 / stats["device_bytes"]
taken = sum(r["dirty_bytes"] for r in stats["rounds"]) // 4096
largest = max((r["dirty_bytes"] for r in stats["rounds"]), default=0) // 4096
print(f"{size} {percent}% {pattern}: {int(blocks)} blocks to write, {taken} dirty blocks taken "
      f"({100 * taken * 4096 / stats['device_bytes']:.3f}% of the device), "
      f"{stats['events']['writes_seen']} write events, lost {stats['events']['lost']}; "
      f"dirty map {memory / mib:.2f} MiB = {per_tib / mib:.2f} MiB per TiB "
      f"(bound {stats['dirty_map_memory_max_bytes'] / mib:.2f} MiB, "
      f"{stats['dirty_map_whole_region_marks']} whole-region marks); "
      f"largest take {largest} blocks; peak RSS {rss_kib / 1024:.0f} MiB; catch-up re-read {stats['catch_up']['bytes'] / mib:.0f} MiB; "
      f"main pass {stats['main_pass']['seconds']:.0f} s; converged {stats['converged']}")
EOF
