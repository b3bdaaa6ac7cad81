#!/usr/bin/env bash
# What idle connections cost `earshot serve`: the server's resident memory (VmRSS, from
# /proc) after some requests, then with N connections opened and left idle (held open until
# the header timeout; the server's /metrics earshot_open_connections must reach N), and
# whether a request made while they are open is still answered.
#
#   bash scripts/bench_idle_connections.sh [--connections N] [--requests R]
#
# Default: 1,000 idle connections after 20 requests, on the tones config with a projector
# trained for one step (its answers are gibberish, which does not change what a connection
# costs).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
connections=1000 requests=20
while [ $# -gt 0 ]; do
  case $1 in
    --connections) connections=$2; shift ;;
    --requests) requests=$2; shift ;;
    *) echo "bench_idle_connections.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
"$root/scripts/setup.sh" >&2
earshot=$root/target/release/earshot
config=configs/cpu-smollm2-tones.toml
work=$(mktemp -d)
server=""
trap '[ -z "$server" ] || kill "$server" 2>/dev/null || true; rm -rf "$work"' EXIT
# Room for the server's connections and the client's sockets.
ulimit -n $((connections + 1024))
"$earshot" train "$config" --set "train.run-dir=\"$work/run\"" --max-steps 1 >/dev/null 2>&1
"$earshot" serve --config "$config" --checkpoint "$work/run" --port 0 --model-id bench --header-timeout-s 30 \
  --max-connections $((connections + 24)) > "$work/serve.out" 2> "$work/serve.err" &
server=$!
for _ in $(seq 1 120); do [ -s "$work/serve.out" ] && break; sleep 0.5; done
addr=$(sed -n 's/^listening on //p' "$work/serve.out")
[ -n "$addr" ] || { cat "$work/serve.err" >&2; exit 1; }
echo "commit $(git rev-parse --short HEAD), $(date -u +%Y-%m-%d), $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) cores"
python3 - "$addr" "$server" "$connections" "$requests" configs/data/tones/clips/one.wav <<'PY'
import base64, json, socket, sys, time, urllib.parse, urllib.request
addr, pid, n, requests, clip = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
host, port = urllib.parse.urlparse(addr).hostname, urllib.parse.urlparse(addr).port
body = json.dumps({"model": "bench", "max_tokens": 8, "messages": [{"role": "user", "content": [
    {"type": "input_audio", "input_audio": {"data": base64.b64encode(open(clip, "rb").read()).decode(),
     "format": "wav"}}]}]}).encode()
def ask():
    req = urllib.request.Request(addr + "/v1/chat/completions", body, {"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(req, timeout=120))["choices"][0]["message"]["content"]
def kib(field):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field):
            return int(line.split()[1])
def metric(name):
    for line in urllib.request.urlopen(addr + "/metrics", timeout=30).read().decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0
for _ in range(requests):
    first = ask()
before = kib("VmRSS:")
idle = [socket.create_connection((host, port)) for _ in range(n)]
started = time.time()
while metric("earshot_open_connections") < n:
    if time.time() - started > 20:
        sys.exit(f"the server never held {n} idle connections open")
    time.sleep(0.05)
held, peak = kib("VmRSS:"), kib("VmHWM:")
answered = ask() == first
for s in idle:
    s.close()
print(f"after {requests} requests: {before / 1024:.1f} MiB resident; with {n} idle connections "
      f"open: {held / 1024:.1f} MiB (+{(held - before) / 1024:.1f} MiB, "
      f"{(held - before) * 1024 / n:.0f} bytes each); peak {peak / 1024:.1f} MiB; a request "
      f"meanwhile {'answered as before' if answered else 'ANSWERED DIFFERENTLY'}")
if not answered:
    sys.exit(1)
PY
