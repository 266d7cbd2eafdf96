#!/usr/bin/env bash
# Fuzzes each target (all six, or those named) for $RUNS executions, one
# at a time on idle CPU, then minimizes its corpus in place. See README.md.
#
#   fuzz/run.sh                       # all targets, 10M executions each
#   RUNS=100000 fuzz/run.sh sse_usage # a quick look at one
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-10000000}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/fuzz/target}
if [ $# -eq 0 ]; then
    set -- policy_toml policy_json sse_usage request_body identity rate_limit_headers
fi
host=$(rustc +nightly -vV | sed -n 's/^host: //p')
python3 fuzz/seed.py
for t in "$@"; do
    echo "== $t: $RUNS runs, from $(date -u +%FT%TZ)"
    start=$(date +%s)
    # New inputs go to the first directory (the committed corpus); the seeds
    # are read only. No -jobs/-workers: one process.
    nice -n 19 cargo +nightly fuzz run -s none "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
        -runs="$RUNS" -print_final_stats=1
    echo "== $t: fuzzed in $(($(date +%s) - start)) s; minimizing the corpus"
    # libFuzzer -merge=1 over corpus and seeds: the smallest set of files
    # covering every edge of both (`cargo fuzz cmin` would leave out what
    # only a seed covers, and then the replay test would not run it).
    # -use_counters=0 merges on edges, not edge hit counts: a fifth of the
    # files (6 MB of corpora became 1 MB) for the same edges.
    rm -rf "fuzz/corpus/$t.new" && mkdir "fuzz/corpus/$t.new"
    nice -n 19 "$CARGO_TARGET_DIR/$host/release/$t" -merge=1 -use_counters=0 \
        "fuzz/corpus/$t.new" "fuzz/corpus/$t" "fuzz/seeds/$t"
    rm -rf "fuzz/corpus/$t" && mv "fuzz/corpus/$t.new" "fuzz/corpus/$t"
done
