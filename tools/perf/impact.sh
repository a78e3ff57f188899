#!/usr/bin/env bash
# PERF.md table "impact" (issue 12): foreground p99 inflation against imaging
# throughput, hot-clone's modes side by side with what a user would pick
# instead, for each foreground, in one hc-impact invocation per foreground
# (rounds alternate alone, imager 1, imager 2, ...; medians).
#
# usage (root): tools/perf/impact.sh [RUNS=5] [SECONDS=5] [SIZE=1G]
#   env IMPACT_RUNS, IMPACT_SECONDS, IMPACT_SIZE do the same;
#   IMPACT_FOREGROUNDS (default "mix read write"; add cached for the page
#   cache's view, whose imagers write the image to a file in the temp dir); IMPACT_RATE (foreground requests/s, default 2000);
#   IMPACT_DEVICE_SPEED (e.g. 1G) pins the "full speed" the percentages
#   are of, instead of each invocation measuring it; IMPACT_SCHEDULER
#   (e.g. mq-deadline) sets the scratch device's I/O scheduler (loop
#   devices start with none, under which ionice -c3 changes nothing).
#
# Every invocation makes its own direct-io scratch loop device of SIZE,
# filled with random data, and removes it afterwards. "Full speed" is that
# device's sequential read speed as `dd if=DEV of=/dev/null iflag=direct
# bs=1M` sees it (1 MiB O_DIRECT reads, one at a time, of its first GiB),
# measured by hc-impact first and printed in each table's heading; the
# rates below ({rate:P%}) are P % of it.
#
# The foreground: 2000 requests/s of 4 KiB, random, one at a time, O_DIRECT
# (mix: 70 % reads; read; write). Needs pv (apt install pv) and jq.
set -euo pipefail
runs=${1:-${IMPACT_RUNS:-5}}
seconds=${2:-${IMPACT_SECONDS:-5}}
size=${3:-${IMPACT_SIZE:-1G}}
foregrounds=${IMPACT_FOREGROUNDS:-mix read write}
rate=${IMPACT_RATE:-2000}
for tool in pv jq dd ionice; do
    if ! command -v "$tool" > /dev/null; then
        case $tool in
            pv) echo "impact.sh: needs pv for the dd | pv -qL rows: apt install pv" >&2 ;;
            jq) echo "impact.sh: needs jq for the goals summary: apt install jq" >&2 ;;
            *) echo "impact.sh: needs $tool (coreutils / util-linux)" >&2 ;;
        esac
        exit 1
    fi
done
cd "$(dirname "$0")/../.."
cargo build --release -q --bin hot-clone --bin hc-impact
bin=$PWD/target/release
work=$(mktemp -d "${TMPDIR:-/tmp}/hc-perf-impact.XXXXXX")
trap 'rm -rf "$work"' EXIT

# --full-speed exists in later builds only; its rows are added once it does.
full_speed=0
if "$bin/hot-clone" image --help | grep -q -- '--full-speed'; then
    full_speed=1
fi

# The rows, the image going to $1: /dev/null, or {out} (a file in the temp
# dir, for the cached foreground: an image written through the page cache
# is what can evict the live system's hot pages).
imagers_to() {
    local sink=$1 hc_out="" dd_out="of=/dev/null"
    if [ "$sink" != /dev/null ]; then
        hc_out=" -o $sink"
        dd_out="of=$sink"
    fi
    imagers=(--imager "default=hot-clone$hc_out")
    [ "$full_speed" = 1 ] && imagers+=(--imager "full-speed=hot-clone --full-speed$hc_out")
    for p in 10 25 50; do
        imagers+=(--imager "max-rate-$p%=hot-clone --max-rate {rate:$p%}$hc_out")
    done
    imagers+=(--imager "ionice-c3-dd=ionice -c3 dd if={dev} $dd_out iflag=direct bs=1M status=none")
    for p in 10 25 50; do
        imagers+=(--imager "dd-pv-$p%=dd if={dev} iflag=direct bs=1M status=none | pv -qL {rate:$p%} > $sink")
    done
}
common=(--scratch "$size" --seconds "$seconds" --runs "$runs" --rate "$rate")
[ -n "${IMPACT_DEVICE_SPEED:-}" ] && common+=(--device-speed "$IMPACT_DEVICE_SPEED")
[ -n "${IMPACT_SCHEDULER:-}" ] && common+=(--scheduler "$IMPACT_SCHEDULER")

q() { # the arguments, quoted for a shell where they need it
    local arg
    for arg in "$@"; do
        if [[ $arg =~ ^[A-Za-z0-9_./:=%+-]+$ ]]; then
            printf ' %s' "$arg"
        else
            printf " '%s'" "${arg//\'/\'\\\'\'}"
        fi
    done
}

echo "## Impact, issue 12 ($(date -u +%Y-%m-%d), $(uname -r))"
echo
for fg in $foregrounds; do
    echo "### Foreground $fg"
    echo
    if [ "$fg" = cached ]; then
        imagers_to "{out}"
    else
        imagers_to /dev/null
    fi
    printf '```\nhc-impact --foreground %s' "$fg"
    q "${common[@]}" "${imagers[@]}"
    printf '\n```\n\n'
    "$bin/hc-impact" --foreground "$fg" "${common[@]}" "${imagers[@]}" \
        --json-file "$work/$fg.json" 2> "$work/$fg.log" || {
        cat "$work/$fg.log" >&2
        exit 1
    }
    echo
done

echo "### Idle device: main pass, default against --full-speed"
echo
if [ "$full_speed" = 1 ]; then
    idle=(--foreground idle --scratch "$size" --seconds "$seconds" --runs "$runs"
        ${IMPACT_SCHEDULER:+--scheduler "$IMPACT_SCHEDULER"}
        --imager "default=hot-clone" --imager "full-speed=hot-clone --full-speed")
    printf '```\nhc-impact'
    q "${idle[@]}"
    printf '\n```\n\n'
    "$bin/hc-impact" "${idle[@]}" --json-file "$work/idle.json" 2> "$work/idle.log" || {
        cat "$work/idle.log" >&2
        exit 1
    }
else
    echo "(skipped: this hot-clone has no --full-speed; \`hot-clone image --help\` does not list it)"
fi
echo

# The issue's goals, from the JSON of the runs above.
echo "### Against the goals"
echo
echo "| goal | measured |"
echo "|---|---|"
for fg in $foregrounds; do
    jq -r --arg fg "$fg" '
        def x: if . == null then "-" else (. * 100 | round / 100 | tostring) + "x" end;
        .rows[] | select(.name == "default") |
        "| default, foreground \($fg): p99 inflation <= 1.5x for reads and writes | read \(.read_p99_inflation | x), write \(.write_p99_inflation | x) |"
    ' "$work/$fg.json"
done
if [ "$full_speed" = 1 ]; then
    jq -r '
        (.rows[] | select(.name == "default") | .main_pass_bytes_per_second) as $d |
        (.rows[] | select(.name == "full-speed") | .main_pass_bytes_per_second) as $f |
        if $d == null or $f == null then "| idle: default main pass >= 0.9x --full-speed | no main pass ended in a window |"
        else "| idle: default main pass >= 0.9x --full-speed | \($d / 1e6 | round) MB/s against \($f / 1e6 | round) MB/s: \($d / $f * 100 | round / 100)x |" end
    ' "$work/idle.json"
else
    echo "| idle: default main pass >= 0.9x --full-speed | not measured: no --full-speed yet |"
fi
