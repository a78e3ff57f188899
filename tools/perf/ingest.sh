#!/usr/bin/env bash
# PERF.md "Build against build": event ingestion under fio random writes on
# zram while a run holds in catch-up. usage (root): tools/perf/ingest.sh BIN|none
# Builds older than the completion tracker have no writes_queued or
# completions_matched in --stats-json: those print as "-".
set -euo pipefail
work=$(mktemp -d "${TMPDIR:-/tmp}/hc-perf-ingest.XXXXXX")
P=""
cleanup() {
    [ -n "$P" ] && kill "$P" 2>/dev/null && wait "$P" 2>/dev/null || true
    echo 1 > /sys/block/zram0/reset || true
    rm -rf "$work"
}
trap cleanup EXIT
echo 2G > /sys/block/zram0/disksize
dd if=/dev/urandom of=/dev/zram0 bs=1M count=2048 oflag=direct status=none
if [ "$1" != none ]; then
  touch "$work/hold"
  "$1" image -d /dev/zram0 -o /dev/null --hold-file "$work/hold" --stats-json "$work/s.json" 2>"$work/err" &
  P=$!
  sleep 2
fi
fio --name=w --filename=/dev/zram0 --rw=randwrite --bs=4k --direct=1 --ioengine=io_uring --iodepth=32 --numjobs=2 --time_based --runtime=5 --group_reporting 2>&1 | grep -oE "IOPS=[0-9.k]+" | head -1
if [ -n "$P" ]; then
  sleep 1; rm "$work/hold"
  rc=0; wait "$P" || rc=$?; P=""
  echo "rc=$rc"
  python3 -c "import json,sys; s=json.load(open(sys.argv[1])); e=s['events']; print('events', e['writes_seen'], 'lost', e['lost'], 'queued', e.get('writes_queued', '-'), 'matched', e.get('completions_matched', '-'), 'cpu', s['cpu_seconds'])" "$work/s.json"
fi
