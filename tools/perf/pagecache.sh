#!/usr/bin/env bash
# PERF.md "Page-cache hygiene": two hot-clone builds imaging a scratch
# device to a file, alternated, medians:
#   1. wall time of `image -o FILE` (to the renamed, fsynced file) and the
#      growth of Cached (/proc/meminfo): peak while imaging, and left after;
#   2. the latency of a foreground reader of a hot, cached 512 MiB file
#      (fio, buffered 4 KiB random reads, psync, rate-limited) while the
#      image is written, inside a memory cgroup (v1) of MEM_MIB so that the
#      image's page cache competes with the hot file as on a full machine.
#      No cache is dropped globally: the hot file is dropped (its own pages
#      only, dd iflag=nocache) before it is warmed inside the cgroup, so
#      that its pages are charged there.
#   3. (PARTS="3") the O_DIRECT alternative, by proxy: dd copying the same
#      device to a file with aligned O_DIRECT writes (1 MiB and 8 MiB, the
#      best a synchronous O_DIRECT writer of the image could do), against
#      NEW_BIN imaging it (drop-behind), alternated.
#   4. (PARTS="4") `reassemble` of NEW_BIN's image of the device to a
#      file, OLD_BIN against NEW_BIN, alternated, from a warm image file.
#
# usage (root): tools/perf/pagecache.sh OLD_BIN NEW_BIN [RUNS=5] [SIZE_MIB=2048] [MEM_MIB=1024] [PARTS="1 2"]
# (part 1 always runs: part 2 takes its duration from it)
# The source is a loop device over a file in /dev/shm (reads cost no disk
# and add no page cache); the image and the hot file go to ${TMPDIR:-/tmp}.
set -euo pipefail
old=$1 new=$2 runs=${3:-5} size_mib=${4:-2048} mem_mib=${5:-1024} parts=${6:-1 2}
hot_mib=512
work=$(mktemp -d "${TMPDIR:-/tmp}/hc-perf-pagecache.XXXXXX")
shm=$(mktemp -d /dev/shm/hc-perf-pagecache.XXXXXX)
cg=/sys/fs/cgroup/memory/hc-perf-pagecache-$$
loopdev=""
cleanup() {
    [ -n "$loopdev" ] && flock "${TMPDIR:-/tmp}/hot-clone-tests-losetup.lock" losetup -d "$loopdev" 2>/dev/null || true
    if [ -d "$cg" ]; then
        # Anything left in the cgroup goes back to the parent first.
        while read -r pid; do echo "$pid" > "$(dirname "$cg")/cgroup.procs" || true; done < "$cg/cgroup.procs"
        rmdir "$cg" || true
    fi
    rm -rf "$work" "$shm"
}
trap cleanup EXIT

truncate -s "${size_mib}M" "$shm/disk.img"
loopdev=$(flock "${TMPDIR:-/tmp}/hot-clone-tests-losetup.lock" losetup -f --show "$shm/disk.img")
dd if=/dev/urandom of="$loopdev" bs=1M count="$size_mib" oflag=direct status=none
dd if=/dev/urandom of="$work/hot" bs=1M count="$hot_mib" status=none
sync "$work/hot"

cached_kib() { awk '/^Cached:/ {print $2}' /proc/meminfo; }
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

# bin -> "seconds peak_growth_MiB end_growth_MiB"
image_once() {
    local bin=$1
    rm -f "$work/image.hc"
    sync
    local base peak=0 now
    base=$(cached_kib)
    local start end
    start=$(date +%s.%N)
    "$bin" image -d "$loopdev" -o "$work/image.hc" 2>/dev/null &
    local pid=$!
    while kill -0 "$pid" 2>/dev/null; do
        now=$(cached_kib)
        [ "$now" -gt "$peak" ] && peak=$now
        sleep 0.05
    done
    wait "$pid"
    end=$(date +%s.%N)
    now=$(cached_kib)
    [ "$now" -gt "$peak" ] && peak=$now
    awk -v s="$start" -v e="$end" -v b="$base" -v p="$peak" -v n="$now" \
        'BEGIN {printf "%.2f %d %d\n", e - s, (p - b) / 1024, (n - b) / 1024}'
}

echo "== 1. image to a file: $size_mib MiB loop device over /dev/shm -> $(stat -f -c %T "$work") file, $runs runs each, alternated =="
: > "$work/t.old"; : > "$work/t.new"
for _ in $(seq "$runs"); do
    image_once "$old" >> "$work/t.old"
    image_once "$new" >> "$work/t.new"
done
for b in old new; do
    printf '%s: wall median %.2f s (%s), %.2f GB/s; Cached growth peak median %d MiB (%s), left after median %d MiB\n' "$b" \
        "$(cut -d' ' -f1 "$work/t.$b" | median)" "$(cut -d' ' -f1 "$work/t.$b" | xargs)" \
        "$(awk -v m="$(cut -d' ' -f1 "$work/t.$b" | median)" -v s="$size_mib" 'BEGIN {print s * 1048576 / m / 1e9}')" \
        "$(cut -d' ' -f2 "$work/t.$b" | median)" "$(cut -d' ' -f2 "$work/t.$b" | xargs)" \
        "$(cut -d' ' -f3 "$work/t.$b" | median)"
done
rm -f "$work/image.hc"

if [[ " $parts " == *" 3 "* ]]; then
    dd_once() { # bs -> "seconds peak_growth_MiB"
        rm -f "$work/direct.img"
        sync
        local base start end
        base=$(cached_kib)
        start=$(date +%s.%N)
        dd if="$loopdev" of="$work/direct.img" bs="$1" iflag=direct oflag=direct conv=fsync status=none
        end=$(date +%s.%N)
        awk -v s="$start" -v e="$end" -v b="$base" -v n="$(cached_kib)" 'BEGIN {printf "%.2f %d\n", e - s, (n - b) / 1024}'
    }
    : > "$work/d.1M"; : > "$work/d.8M"; : > "$work/d.hc"
    for _ in $(seq "$runs"); do
        dd_once 1M >> "$work/d.1M"
        dd_once 8M >> "$work/d.8M"
        image_once "$new" | cut -d' ' -f1,3 >> "$work/d.hc"
    done
    rm -f "$work/direct.img" "$work/image.hc"
    echo
    echo "== 3. O_DIRECT by proxy: $size_mib MiB device to a file, $runs runs each, alternated =="
    for b in 1M 8M hc; do
        printf '%s: wall median %.2f s (%s), Cached left after median %d MiB\n' "$b" \
            "$(cut -d' ' -f1 "$work/d.$b" | median)" "$(cut -d' ' -f1 "$work/d.$b" | xargs)" \
            "$(cut -d' ' -f2 "$work/d.$b" | median)"
    done
fi
if [[ " $parts " == *" 4 "* ]]; then
    "$new" image -d "$loopdev" -o "$work/image.hc" 2>/dev/null
    cat "$work/image.hc" > /dev/null
    restore_once() { # bin -> seconds
        rm -f "$work/restored"
        sync
        local start end
        start=$(date +%s.%N)
        "$1" reassemble "$work/image.hc" -o "$work/restored" 2>/dev/null
        end=$(date +%s.%N)
        awk -v s="$start" -v e="$end" 'BEGIN {printf "%.2f\n", e - s}'
    }
    : > "$work/x.old"; : > "$work/x.new"
    for _ in $(seq "$runs"); do
        restore_once "$old" >> "$work/x.old"
        restore_once "$new" >> "$work/x.new"
    done
    rm -f "$work/restored" "$work/image.hc"
    echo
    echo "== 4. reassemble of a $size_mib MiB image to a file, $runs runs each, alternated =="
    for b in old new; do
        printf '%s: wall median %.2f s (%s)\n' "$b" "$(median < "$work/x.$b")" "$(xargs < "$work/x.$b")"
    done
fi
case " $parts " in *" 2 "*) ;; *) exit 0 ;; esac

# 2. The foreground reader.
mkdir "$cg"
echo $((mem_mib << 20)) > "$cg/memory.limit_in_bytes"
in_cg() { (echo "$BASHPID" > "$cg/cgroup.procs" && exec "$@"); }
duration=$(cut -d' ' -f1 "$work/t.old" | median | awk '{printf "%d", $1 + 1.5}')
fio_p() { # json -> "p50 p99 p99.9 (us)"
    python3 -c 'import json,sys; c=json.load(open(sys.argv[1]))["jobs"][0]["read"]["clat_ns"]["percentile"]; print(" ".join("%.0f" % (c[k] / 1000) for k in ("50.000000", "99.000000", "99.900000")))' "$1"
}
reader_once() { # bin|idle -> "p50 p99 p99.9"
    local what=$1
    rm -f "$work/image.hc"
    sync
    # The hot file: out of the cache (its pages only), then read once inside
    # the cgroup, so that it is cached and charged there.
    dd if="$work/hot" iflag=nocache count=0 status=none
    in_cg cat "$work/hot" > /dev/null
    in_cg fio --name=hot --filename="$work/hot" --readwrite=randread --ioengine=psync --bs=4k \
        --direct=0 --invalidate=0 --rate_iops=2000 --time_based --runtime="$duration" \
        --output-format=json --output="$work/fio.json" > /dev/null &
    local fio_pid=$!
    sleep 0.5
    if [ "$what" != idle ]; then
        in_cg "$what" image -d "$loopdev" -o "$work/image.hc" 2>/dev/null
    fi
    wait "$fio_pid"
    fio_p "$work/fio.json"
}
echo
echo "== 2. foreground 4 KiB random reader of a hot $hot_mib MiB file (fio psync, buffered, 2000 IOPS, ${duration} s) in a ${mem_mib} MiB memory cgroup, while imaging; latency in us =="
: > "$work/r.idle"; : > "$work/r.old"; : > "$work/r.new"
for _ in $(seq "$runs"); do
    reader_once idle >> "$work/r.idle"
    reader_once "$old" >> "$work/r.old"
    reader_once "$new" >> "$work/r.new"
done
for b in idle old new; do
    printf '%s: p50 median %d us, p99 median %d us (%s), p99.9 median %d us\n' "$b" \
        "$(cut -d' ' -f1 "$work/r.$b" | median)" "$(cut -d' ' -f2 "$work/r.$b" | median)" \
        "$(cut -d' ' -f2 "$work/r.$b" | xargs)" "$(cut -d' ' -f3 "$work/r.$b" | median)"
done
