#!/usr/bin/env bash
# Short fuzzing runs of both targets. Needs cargo-fuzz (`cargo install cargo-fuzz`); on a stable
# toolchain it sets RUSTC_BOOTSTRAP=1 for the sanitizer flags cargo-fuzz passes.
# Usage: fuzz/run.sh [SECONDS_PER_TARGET]   (default 60)
set -euo pipefail
cd "$(dirname "$0")"
seconds="${1:-60}"
export RUSTC_BOOTSTRAP=1
mkdir -p corpus/csv corpus/worker_message
printf '1,2,3\n4,5\n' > corpus/csv/seed.csv
for target in csv worker_message; do
    echo "== $target for ${seconds}s"
    cargo fuzz run --release "$target" "corpus/$target" -- -max_total_time="$seconds" -max_len=4096 2>&1 \
        | grep -E '^(#[0-9]+ +DONE|Done [0-9]+ runs|==[0-9]+== ERROR|SUMMARY)' || true
done
