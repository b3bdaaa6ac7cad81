#!/usr/bin/env bash
# All set-up, then the whole test suite (release build: candle is too slow in debug).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$root/scripts/setup.sh"
cd "$root"
# --no-fail-fast: a failing test binary does not hide the results of the ones after it.
cargo test --release --workspace --no-fail-fast
