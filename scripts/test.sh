#!/usr/bin/env bash
# All set-up, then the whole test suite (release build: candle is too slow in debug).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$root/scripts/setup.sh"
cd "$root"
cargo test --release --workspace
