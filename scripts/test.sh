#!/usr/bin/env bash
# All set-up, then the whole test suite (release build: candle is too slow in debug).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$root/scripts/setup.sh"
cd "$root"
# The evaluation report is checked in headless Chromium (Debian's package). Installing it
# needs root; without root and without chromium the report test fails and says so.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "[test] installing chromium (apt-get, for the HTML report test)" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >&2
fi
# The features set-up built with (MPI where it is installed), so that the binary the tests
# run is the one set-up built. --no-fail-fast: a failing test binary does not hide the
# results of the ones after it.
# shellcheck source=scripts/features.sh
source "$root/scripts/features.sh"
cargo test --release --workspace --no-fail-fast "${earshot_features[@]}"
