#!/usr/bin/env bash
# PERF.md row "restore": `hot-clone reassemble` of a 2 GiB image to a file,
# against `cp --sparse=always` of the equivalent raw file (+ fsync of the
# copy, since reassemble fsyncs what it wrote), paired runs, medians.
#
# usage: tools/perf/restore.sh [RUNS=7] [SIZE_MIB=2048]
# Scratch files go to ${TMPDIR:-/tmp}; all are removed on exit.
set -euo pipefail
runs=${1:-7}
size_mib=${2:-2048}
cd "$(dirname "$0")/../.."
cargo build --release -q --bin hot-clone --bin hc-from-raw
bin=target/release
work=$(mktemp -d "${TMPDIR:-/tmp}/hc-perf-restore.XXXXXX")
trap 'rm -rf "$work"' EXIT

# Two thirds pseudo-random data, one third zero runs, in 1 MiB blocks: an
# image of a part-used disk.
python3 - "$work/raw" "$size_mib" <<'PY'
import os, sys
path, size_mib = sys.argv[1], int(sys.argv[2])
with open(path, "wb") as f:
    f.truncate(size_mib << 20)
    for i in range(size_mib):
        if i % 3 != 2:
            f.seek(i << 20)
            f.write(os.urandom(1 << 20))
PY
"$bin/hc-from-raw" "$work/raw" > "$work/image.hc"
"$bin/hot-clone" verify "$work/image.hc" > /dev/null
cat "$work/raw" "$work/image.hc" > /dev/null   # both warm in the page cache

now() { date +%s.%N; }
declare -a t_cp t_hc
for i in $(seq 1 "$runs"); do
    rm -f "$work/out.raw" "$work/out.img"; sync
    s=$(now); cp --sparse=always "$work/raw" "$work/out.raw"; sync "$work/out.raw"; e=$(now)
    t_cp+=("$(echo "$e - $s" | bc -l)")
    rm -f "$work/out.raw"; sync
    s=$(now); "$bin/hot-clone" reassemble "$work/image.hc" -o "$work/out.img" 2>/dev/null; e=$(now)
    t_hc+=("$(echo "$e - $s" | bc -l)")
    cmp -s "$work/raw" "$work/out.img" || { echo "restored image differs from raw" >&2; exit 1; }
    rm -f "$work/out.img"
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
m_cp=$(median "${t_cp[@]}")
m_hc=$(median "${t_hc[@]}")
echo "runs: $runs, size: $size_mib MiB, fs: $(stat -f -c %T "$work")"
echo "cp --sparse=always + fsync  s: ${t_cp[*]}"
echo "hot-clone reassemble       s: ${t_hc[*]}"
printf 'median cp %.3f s (%.0f MiB/s), reassemble %.3f s (%.0f MiB/s), ratio reassemble/cp %.2f\n' \
    "$m_cp" "$(echo "$size_mib / $m_cp" | bc -l)" "$m_hc" "$(echo "$size_mib / $m_hc" | bc -l)" "$(echo "$m_hc / $m_cp" | bc -l)"
