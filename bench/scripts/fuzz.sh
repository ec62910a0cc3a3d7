#!/usr/bin/env bash
# Coverage-guided fuzzing of the decoders that take outside input (issue 14), not run in CI
# in full (scripts/test runs each target briefly). For each target in fuzz/fuzz_targets: RUNS
# executions (default 10^7) with libFuzzer, from and into the committed corpus in
# fuzz/corpus/TARGET; prints one table: target, executions, crashes (a crash leaves its input
# in fuzz/artifacts/TARGET and fails the script).
#
#   bench/scripts/fuzz.sh [RUNS] [TARGET...]
#
# Needs cargo-fuzz (`cargo install cargo-fuzz --locked`). With a nightly toolchain the
# targets run under AddressSanitizer; without one (or with FUZZ_STABLE=1), on stable with no
# sanitizer (the decoders are safe Rust: a panic is what is looked for).
set -euo pipefail
cd "$(dirname "$0")/../../fuzz"
runs=${1:-10000000}
shift || true
if [ "${FUZZ_STABLE:-}" != 1 ] && cargo +nightly --version >/dev/null 2>&1; then
  fuzz=(cargo +nightly fuzz)
  how=()
else
  fuzz=(cargo fuzz)
  how=(-s none)
fi
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <("${fuzz[@]}" list)
fi
"${fuzz[@]}" build "${how[@]}" -O
failed=0
rows=()
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  log=$(mktemp)
  if "${fuzz[@]}" run "${how[@]}" -O "$t" "corpus/$t" -- -runs="$runs" -print_final_stats=1 >"$log" 2>&1; then
    crashes=0
  else
    crashes=1
    failed=1
    tail -30 "$log" >&2
  fi
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  secs=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log" | tail -1)
  rows+=("| $t | ${execs:-?} | ${secs:-?} | $crashes |")
  rm -f "$log"
done
echo "| target | executions | seconds | crashes |"
echo "|---|---:|---:|---:|"
printf '%s\n' "${rows[@]}"
exit $failed
