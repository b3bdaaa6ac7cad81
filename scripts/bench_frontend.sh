#!/usr/bin/env bash
# Front-end benchmark, side by side in one run on this machine:
#   - earshot log-mel of a 30 s clip vs faster-whisper's numpy FeatureExtractor, both on one
#     thread, same audio; medians and ratio;
#   - decode + resample throughput (seconds of audio per second) for a 10-minute 44.1 kHz
#     stereo MP3 and FLAC.
# The reference runs in a throwaway venv (target/bench-venv) created here.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
venv=target/bench-venv
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 RAYON_NUM_THREADS=1

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q faster-whisper==1.2.1
fi
cargo build --release --quiet -p earshot --example bench_frontend
bench=target/release/examples/bench_frontend

# Test audio, made with PyAV (bundled with faster-whisper): 30 s of speech-like noise bursts
# at 16 kHz, and 10 min of 44.1 kHz stereo music-like tones as MP3 and FLAC.
"$venv/bin/python" - "$work" <<'PY'
import sys, numpy as np, av
work = sys.argv[1]
rng = np.random.default_rng(0)
def write(path, codec, rate, x):
    with av.open(path, "w") as c:
        s = c.add_stream(codec, rate=rate, layout="stereo" if x.shape[0] == 2 else "mono")
        fmt = "s16p" if codec == "flac" else ("fltp" if codec == "libmp3lame" else "s16")
        if codec == "flac": fmt = "s16"
        for i in range(0, x.shape[1], 4096):
            chunk = x[:, i:i+4096]
            if fmt == "s16":
                data = (np.clip(chunk, -1, 1) * 32767).astype(np.int16).T.reshape(1, -1)
            else:
                data = chunk.astype(np.float32)
            f = av.AudioFrame.from_ndarray(np.ascontiguousarray(data), format=fmt, layout=s.layout.name)
            f.sample_rate = rate
            for p in s.encode(f): c.mux(p)
        for p in s.encode(None): c.mux(p)
t = np.arange(30 * 16000) / 16000
x = 0.3 * np.sin(2 * np.pi * 220 * t) * (np.sin(2 * np.pi * 2 * t) > 0) + 0.05 * rng.standard_normal(t.size)
write(f"{work}/clip30.wav", "pcm_s16le", 16000, x[None, :])
t = np.arange(600 * 44100) / 44100
y = 0.2 * np.sin(2 * np.pi * 440 * t) + 0.1 * np.sin(2 * np.pi * 660 * t + 1) + 0.02 * rng.standard_normal(t.size)
stereo = np.stack([y, np.roll(y, 100)])
write(f"{work}/long.mp3", "libmp3lame", 44100, stereo)
write(f"{work}/long.flac", "flac", 44100, stereo)
PY

ours=$("$bench" mel "$work/clip30.wav" 50)
ref=$("$venv/bin/python" - "$work/clip30.wav" <<'PY'
import sys, time, json, statistics, av, numpy as np
from faster_whisper.feature_extractor import FeatureExtractor
from faster_whisper.audio import decode_audio
audio = decode_audio(sys.argv[1], sampling_rate=16000)
fe = FeatureExtractor(feature_size=80)
fe(audio)  # warm-up
ts = []
for _ in range(20):
    t = time.perf_counter(); fe(audio); ts.append(time.perf_counter() - t)
print(json.dumps({"what": "faster-whisper mel", "samples": len(audio), "median_s": statistics.median(ts)}))
PY
)
echo "$ours"
echo "$ref"
python3 - "$ours" "$ref" <<'PY'
import sys, json
o, r = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"log-mel 30 s, 1 thread: earshot {o['median_s']*1e3:.2f} ms, faster-whisper {r['median_s']*1e3:.2f} ms, speed-up x{r['median_s']/o['median_s']:.1f}")
PY
for f in long.mp3 long.flac; do
  r=$("$bench" decode "$work/$f" 3)
  echo "$r"
  python3 -c "import json,sys; d=json.loads(sys.argv[1]); print(f\"decode+resample {sys.argv[2]} (10 min, 44.1 kHz stereo): {d['audio_s_per_s']:.0f} s of audio per s\")" "$r" "$f"
done
# Resampling alone, 60 s of mono noise to 16 kHz: earshot (libswresample's filter, since
# issue #30), the rubato FFT resampler it replaced, and libswresample itself through PyAV
# (float in and out, as earshot; medians of 5).
for rate in 22050 44100 48000; do
  r=$("$bench" resample "$rate" 5)
  swr=$("$venv/bin/python" - "$rate" <<'PY'
import sys, time, statistics, numpy as np, av
rate = int(sys.argv[1])
x = (np.random.default_rng(0).random(rate * 60, dtype=np.float32) - 0.5) * 0.5
def run():
    r = av.audio.resampler.AudioResampler(format="flt", layout="mono", rate=16000)
    f = av.AudioFrame.from_ndarray(x[None, :], format="flt", layout="mono")
    f.sample_rate = rate
    n = sum(g.samples for g in r.resample(f)) + sum(g.samples for g in r.resample(None))
    return n
run()
ts = []
for _ in range(5):
    t = time.perf_counter(); run(); ts.append(time.perf_counter() - t)
print(statistics.median(ts))
PY
)
  python3 -c "import json,sys; d=json.loads(sys.argv[1]); s=float(sys.argv[2]); print(f\"resample 60 s {d['rate']} Hz -> 16 kHz: earshot {d['earshot_s']*1e3:.1f} ms, before (rubato FFT) {d['rubato_fft_s']*1e3:.1f} ms, libswresample (PyAV) {s*1e3:.1f} ms; earshot/swr x{d['earshot_s']/s:.2f}\")" "$r" "$swr"
done
