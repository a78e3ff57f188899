#!/usr/bin/env bash
# PERF.md "Build against build": event ingestion under fio random writes on
# zram while a run holds in catch-up. usage (root): tools/perf/ingest.sh BIN|none
set -e
echo 2G > /sys/block/zram0/disksize
dd if=/dev/urandom of=/dev/zram0 bs=1M count=2048 oflag=direct status=none
P=""
if [ "$1" != none ]; then
  touch /tmp/ing.hold
  $1 image -d /dev/zram0 -o /dev/null --hold-file /tmp/ing.hold --stats-json /tmp/ing.json 2>/tmp/ing.err &
  P=$!
  sleep 2
fi
fio --name=w --filename=/dev/zram0 --rw=randwrite --bs=4k --direct=1 --ioengine=io_uring --iodepth=32 --numjobs=2 --time_based --runtime=5 --group_reporting 2>&1 | grep -oE "IOPS=[0-9.k]+" | head -1
if [ -n "$P" ]; then sleep 1; rm /tmp/ing.hold; wait $P; echo rc=$?; python3 -c "import json; s=json.load(open('/tmp/ing.json')); e=s['events']; print('events', e['writes_seen'], 'lost', e['lost'], 'queued', e['writes_queued'], 'matched', e['completions_matched'], 'cpu', s['cpu_seconds'])"; fi
echo 1 > /sys/block/zram0/reset
