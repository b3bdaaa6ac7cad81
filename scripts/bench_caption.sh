#!/usr/bin/env bash
# Captioning benchmark, one run on this machine (2 threads): Whisper tiny.en + SmolLM2-135M
# (f32), a random pool-ln-linear projector to 250 positions (the write-up's), 60-token
# captions (EOS ignored).
#   - tokens/s of the KV-cache sampler vs the write-up's no-cache recompute sampler (ratio);
#   - decoding throughput in clips/s at batch 1, 4 and 16 (after the encoder);
#   - time to first token after the encoder, and the encoder's time per 30 s window.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
models=${EARSHOT_HOME:-$HOME/.cache/earshot}/models
export RAYON_NUM_THREADS=2
cargo build --release --quiet -p earshot-tests --example bench_caption
mel=../shared/oracle/whisper-tiny-en/expected/a_speech_mel_pad30s.npy
gguf=$models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
out=$(target/release/examples/bench_caption "$models/whisper-tiny.en" "$gguf" "$mel" 250 60)
python3 - "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in sys.argv[1].splitlines()]
by = {r["what"]: r for r in rows}
s, kv, rc = by["setup"], by["kv-cache"], by["recompute"]
print(f"prompt {s['prompt_tokens']} tokens (250 audio positions), caption {s['caption_tokens']} tokens")
print(f"KV cache : {kv['tokens_per_s']:7.1f} tokens/s ({kv['seconds']:.2f} s per caption)")
print(f"recompute: {rc['tokens_per_s']:7.1f} tokens/s ({rc['seconds']:.2f} s per caption)")
print(f"ratio KV cache / recompute: {kv['tokens_per_s'] / rc['tokens_per_s']:.1f}x (target >= 10x)")
for r in rows:
    if r["what"] == "batch":
        print(f"batch {r['batch']:2}: {r['clips_per_s']:.2f} clips/s, {r['tokens_per_s']:.0f} tokens/s (16 clips, after the encoder)")
print(f"time to first token after the encoder: {kv['first_token_s']*1000:.0f} ms; encoder per 30 s window: {s['encoder_s']*1000:.0f} ms")
PY
