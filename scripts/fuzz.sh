#!/usr/bin/env bash
# Fuzzes earshot's input parsers with cargo-fuzz (libFuzzer) on the stable toolchain
# (`--sanitizer none`: no sanitizer reports, but panics, aborts, timeouts and memory
# blow-ups are found): audio decoding, the log-mel front-end, `.npy` reading and run-config
# parsing, each for a bounded time.
#   bash scripts/fuzz.sh [SECONDS_PER_TARGET (default 60)] [TARGET...]
# Seeds: the audio fixtures, the bundled configs, a mel .npy. A crash is written to
# host/fuzz/artifacts/<target>/ and the script exits 1 naming it; every crash found becomes
# a test in tests/ (see tests/cli_bad_input.rs).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
secs=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(audio_decode mel npy config)

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "[fuzz] installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked >&2
fi

fuzz=$root/host/fuzz
seed() {
  local target=$1; shift
  mkdir -p "$fuzz/corpus/$target"
  for f in "$@"; do [ -f "$f" ] && cp -n "$f" "$fuzz/corpus/$target/" || true; done
}
seed audio_decode "$root"/tests/fixtures/audio/*
seed config "$root"/configs/*.toml
seed npy "$root"/tests/fixtures/mel_filters_128_openai_whisper.npy
mkdir -p "$fuzz/corpus/mel"

failed=()
for t in "${targets[@]}"; do
  echo "[fuzz] $t for ${secs}s" >&2
  # cargo-fuzz's default build: optimised, with debug assertions and overflow checks (a
  # dev build of earshot has them for dependencies too). -rss_limit_mb: a memory blow-up
  # is a finding; -timeout: so is one input taking > 20 s. -fork with -ignore_crashes: a
  # crash is saved and the run goes on, so one run collects every finding.
  findings() { { find "$fuzz/artifacts/$t" -type f 2>/dev/null || true; } | wc -l; }
  before=$(findings)
  (cd "$root/host" && cargo fuzz run --sanitizer none "$t" -- \
      -max_total_time="$secs" -rss_limit_mb=3072 -timeout=20 -max_len=1048576 \
      -fork=1 -ignore_crashes=1 -ignore_timeouts=1 -ignore_ooms=1 >&2) || true
  after=$(findings)
  if [ "$after" -gt "$before" ]; then
    failed+=("$t")
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "[fuzz] crashes in: ${failed[*]} (inputs in host/fuzz/artifacts/)" >&2
  exit 1
fi
echo "[fuzz] no crash in ${targets[*]} (${secs}s each)" >&2
