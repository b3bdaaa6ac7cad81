#!/usr/bin/env bash
# Plugin benchmarks: instantiation cold (compile) and warm (precompiled cache), per-call
# overhead of a trivial call, and listing a 100k-row JSONL dataset through the jsonl adapter
# with `earshot dataset list` (the user's path, output to /dev/null).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
cargo build --release --quiet -p earshot --example bench_plugins
cargo build --release --quiet --target wasm32-wasip2 --manifest-path plugins/Cargo.toml
plugins=plugins/target/wasm32-wasip2/release
./target/release/examples/bench_plugins "$plugins"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 - "$work/train.jsonl" <<'PY'
import json, sys
with open(sys.argv[1], "w") as f:
    for i in range(100_000):
        f.write(json.dumps({"id": f"clip{i}", "audio": f"audio/clip{i}.flac", "text": f"caption number {i}, with some words in it.", "speaker": "s%d" % (i % 7)}) + "\n")
PY
./target/release/earshot dataset list --adapter "$plugins/jsonl.wasm" --root "$work" --options '{"check_audio": false}' > /dev/null # warm the cache
start=$(date +%s.%N)
./target/release/earshot dataset list --adapter "$plugins/jsonl.wasm" --root "$work" --options '{"check_audio": false}' > "$work/out.jsonl"
end=$(date +%s.%N)
echo "{\"jsonl_100k_rows\": $(wc -l < "$work/out.jsonl"), \"jsonl_100k_list_s\": $(echo "$end - $start" | bc)}"
