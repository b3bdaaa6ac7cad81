#!/usr/bin/env bash
# Load test of `earshot serve` beside sequential `earshot caption` (one process per request,
# as a trained run was used before the server): requests/s, time to first token and p50/p99
# latency at 1, 4 and 16 concurrent clients, each request one clip, greedy.
#
#   bash scripts/bench_serve.sh [--config C] [--checkpoint P] [--requests N]
#
# Default: the English transcription config with its trained best/ (trained first when
# missing, ~5 min on 2 cores) and the first clips of its test split (Asterisk's prompts).
# Prints one table and the ratio of the server's throughput at 16 clients to sequential
# captioning's.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
config=configs/cpu-smollm2-transcribe-en.toml checkpoint="" requests=32
while [ $# -gt 0 ]; do
  case $1 in
    --config) config=$2; shift ;;
    --checkpoint) checkpoint=$2; shift ;;
    --requests) requests=$2; shift ;;
    *) echo "bench_serve.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
"$root/scripts/setup.sh" >&2
# EARSHOT_BIN: another build to measure (e.g. an older commit's), with this checkout's runs.
earshot=${EARSHOT_BIN:-$root/target/release/earshot}
if [ -z "$checkpoint" ]; then
  run=runs/cpu-smollm2-transcribe-en
  [ "$config" = configs/cpu-smollm2-transcribe-en.toml ] || { echo "bench_serve.sh: give --checkpoint with --config" >&2; exit 2; }
  [ -d "$run/best" ] || "$earshot" train "$config" --overwrite >&2
  checkpoint=$run/best
fi
work=$(mktemp -d)
server=""
trap '[ -z "$server" ] || kill "$server" 2>/dev/null || true; rm -rf "$work"' EXIT
# The clips: the first of the config's test split (paths beneath its dataset root).
{ "$earshot" caption --config "$config" --checkpoint "$checkpoint" --split test --max-tokens 1 \
  2>/dev/null || true; } | head -8 | python3 -c '
import json, sys
for line in sys.stdin:
    print(json.loads(line)["audio"])' > "$work/clips.txt"
[ -s "$work/clips.txt" ] || { echo "bench_serve.sh: no clips from the test split" >&2; exit 1; }
"$earshot" serve --config "$config" --checkpoint "$checkpoint" --port 0 --model-id bench \
  > "$work/serve.out" 2> "$work/serve.err" &
server=$!
for _ in $(seq 1 120); do [ -s "$work/serve.out" ] && break; sleep 0.5; done
addr=$(sed -n 's/^listening on //p' "$work/serve.out")
[ -n "$addr" ] || { cat "$work/serve.err" >&2; exit 1; }
echo "commit $(git rev-parse --short HEAD)${EARSHOT_BIN:+ (binary $EARSHOT_BIN)}, $(date -u +%Y-%m-%d), $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) cores; $config, $requests requests per row over $(wc -l < "$work/clips.txt") clips"
python3 - "$addr" "$work/clips.txt" "$requests" "$earshot" "$config" "$checkpoint" <<'PY'
import base64, json, statistics, subprocess, sys, threading, time, urllib.request
addr, clip_list, n, earshot, config, checkpoint = sys.argv[1], sys.argv[2], int(sys.argv[3]), *sys.argv[4:]
clips = [l.strip() for l in open(clip_list) if l.strip()]
bodies = []
for c in clips:
    data = base64.b64encode(open(c, "rb").read()).decode()
    fmt = c.rsplit(".", 1)[-1]
    bodies.append({"model": "bench", "stream": True, "max_tokens": 60, "messages": [{"role": "user",
        "content": [{"type": "input_audio", "input_audio": {"data": data, "format": fmt}}]}]})

def one(body):
    start = time.perf_counter()
    req = urllib.request.Request(addr + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    first = None
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            if line.startswith(b"data: ") and b'"content":"' in line and b'"content":""' not in line and first is None:
                first = time.perf_counter() - start
    end = time.perf_counter() - start
    return end, (first if first is not None else end)

def load(clients):
    results, lock, next_i = [], threading.Lock(), [0]
    def worker():
        while True:
            with lock:
                i = next_i[0]; next_i[0] += 1
            if i >= n:
                return
            r = one(bodies[i % len(bodies)])
            with lock:
                results.append(r)
    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads: t.start()
    for t in threads: t.join()
    wall = time.perf_counter() - start
    lat = sorted(r[0] for r in results); ttft = sorted(r[1] for r in results)
    q = lambda xs, p: xs[min(len(xs) - 1, int(round(p * (len(xs) - 1))))]
    return n / wall, q(ttft, 0.5), q(lat, 0.5), q(lat, 0.99)

one(bodies[0])  # warm: the first request fills caches
print("| clients | requests/s | time to first token p50 (s) | latency p50 (s) | latency p99 (s) |")
print("|---|---|---|---|---|")
rates = {}
for clients in (1, 4, 16):
    rps, ttft, p50, p99 = load(clients)
    rates[clients] = rps
    print(f"| {clients} | {rps:.2f} | {ttft:.2f} | {p50:.2f} | {p99:.2f} |")
# Sequential `earshot caption`, one process per request (model load included), 8 requests.
k = min(8, n)
start = time.perf_counter()
for i in range(k):
    subprocess.run([earshot, "caption", "--config", config, "--checkpoint", checkpoint,
                    "--max-tokens", "60", clips[i % len(clips)]], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
seq = k / (time.perf_counter() - start)
print(f"| sequential `earshot caption` (a process per request) | {seq:.2f} | | {1/seq:.2f} | |")
print(f"\nserver at 16 clients / sequential caption: {rates[16] / seq:.2f}x; at 16 / at 1 client: {rates[16] / rates[1]:.2f}x")
PY
