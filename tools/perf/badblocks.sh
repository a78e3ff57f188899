#!/usr/bin/env bash
# PERF.md table "unreadable blocks": hot-clone against GNU ddrescue on one
# device with scattered bad blocks, alternated in one run, medians.
#
# usage (root): tools/perf/badblocks.sh [RUNS=3] [SIZE_MIB=2048] [BAD=100]
#   The device: a direct-io loop device over hc-slowdisk (FUSE), backed by
#   SIZE_MIB of random data in ${TMPDIR:-/tmp}, whose reads of BAD scattered
#   4 KiB blocks (seeded, 4 KiB-aligned) fail with EIO.
#   Each run writes its output to a file in the same scratch directory:
#   hot-clone -o FILE (defaults: --read-retries 2; and --read-retries 0),
#   ddrescue -d -f DEV FILE MAPFILE (direct reads, defaults: no retry
#   passes). Bytes recovered / bad come from --stats-json and the mapfile.
#   Needs gddrescue (apt-get install -y gddrescue).
set -euo pipefail
runs=${1:-3}
size_mib=${2:-2048}
bad=${3:-100}
cd "$(dirname "$0")/../.."
cargo build --release -q --bin hot-clone --bin hc-slowdisk
bin=$PWD/target/release
work=$(mktemp -d "${TMPDIR:-/tmp}/hc-perf-badblocks.XXXXXX")
loopdev=""
server=""
cleanup() {
    [ -n "$loopdev" ] && losetup -d "$loopdev" 2>/dev/null || true
    [ -n "$server" ] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null || true
    umount -l "$work/mnt" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

head -c "$((size_mib << 20))" /dev/urandom > "$work/backing"
mkdir "$work/mnt"
mapfile -t eio < <(python3 - "$size_mib" "$bad" <<'PY'
import random, sys
size_mib, bad = int(sys.argv[1]), int(sys.argv[2])
rng = random.Random(1)
blocks = sorted(rng.sample(range((size_mib << 20) // 4096), bad))
for b in blocks:
    print(f"--eio={b * 4096}..{(b + 1) * 4096}")
PY
)
"$bin/hc-slowdisk" "$work/mnt" --backing "$work/backing" --write-delay-ms 0 "${eio[@]}" \
    2> "$work/slowdisk.log" &
server=$!
for _ in $(seq 100); do [ -e "$work/mnt/disk" ] && break; sleep 0.1; done
loopdev=$(losetup -f --show --direct-io=on "$work/mnt/disk")

now() { date +%s.%N; }

hc() { # retries -> "seconds recovered_bytes bad_bytes"
    local t0 t1
    rm -f "$work/out.hc" "$work/stats.json"
    t0=$(now)
    "$bin/hot-clone" image -d "$loopdev" -o "$work/out.hc" --read-retries "$1" \
        --stats-json "$work/stats.json" 2> "$work/hc.log" || [ $? = 6 ]
    t1=$(now)
    python3 - "$work/stats.json" "$t0" "$t1" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
print(float(sys.argv[3]) - float(sys.argv[2]), d["main_pass"]["bytes"], d["unreadable"]["bytes"])
PY
}

dd_rescue() { # -> "seconds recovered_bytes bad_bytes"
    local t0 t1
    rm -f "$work/out.img" "$work/map"
    t0=$(now)
    ddrescue -q -d -f "$loopdev" "$work/out.img" "$work/map" 2> "$work/ddrescue.log"
    t1=$(now)
    python3 - "$work/map" "$t0" "$t1" <<'PY'
import sys
good = bad = 0
lines = [l for l in open(sys.argv[1]) if l.strip() and not l.startswith("#")]
for line in lines[1:]:  # the first is the current position and status
    pos, size, status = line.split()[:3]
    if status == "+":
        good += int(size, 0)
    else:
        bad += int(size, 0)
print(float(sys.argv[3]) - float(sys.argv[2]), good, bad)
PY
}

: > "$work/results"
for run in $(seq "$runs"); do
    echo "hot-clone $(hc 2)" >> "$work/results"
    echo "hot-clone-r0 $(hc 0)" >> "$work/results"
    echo "ddrescue $(dd_rescue)" >> "$work/results"
done

python3 - "$work/results" "$size_mib" "$bad" "$runs" <<'PY'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    name, seconds, good, bad = line.split()
    rows.setdefault(name, []).append((float(seconds), int(good), int(bad)))
print(f"{sys.argv[2]} MiB, {sys.argv[3]} bad 4 KiB blocks, {sys.argv[4]} runs each, alternated; medians")
print("| tool | wall s | MB/s | bytes recovered | bad bytes reported |")
print("|---|---|---|---|---|")
names = {"hot-clone": "hot-clone image (--read-retries 2, default)",
         "hot-clone-r0": "hot-clone image --read-retries 0",
         "ddrescue": "ddrescue -d (defaults)"}
for name, values in rows.items():
    s = statistics.median(v[0] for v in values)
    g = statistics.median(v[1] for v in values)
    b = statistics.median(v[2] for v in values)
    print(f"| {names[name]} | {s:.2f} | {(g + b) / s / 1e6:.0f} | {g} | {b} |")
PY
