#!/usr/bin/env bash
# Regenerates tests/fixtures/resample/: 16 kHz waveforms and log-mel features made by the
# reference pipeline, faster-whisper 1.2.1's decode_audio (PyAV -> libswresample, s16 mono at
# 16 kHz) and its numpy FeatureExtractor, for
#   - six generated s16 WAVs (22.05, 44.1 and 48 kHz, mono and stereo; broadband, so every
#     mel band up to 8 kHz has sound on every frame), written here and committed;
#   - five real Tux Paint stamp sounds from the set-up's tuxpaint-stamps-default (44.1 kHz
#     stereo and mono, 22.05 kHz mono, 48 kHz stereo, 11.025 kHz mono; Vorbis), read from
#     $EARSHOT_HOME/data at test time, so only their references are committed.
# The tests (tests/resample.rs) compare earshot's decode + resample + mel with these.
# Pinned: av 16.0.1 (libswresample 6.1), faster-whisper 1.2.1 (--no-deps: only its audio.py
# and feature_extractor.py are loaded, by path), numpy 2.2.6. Run once; outputs committed.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
export EARSHOT_HOME=${EARSHOT_HOME:-$HOME/.cache/earshot}
out=$root/tests/fixtures/resample
venv=$(mktemp -d)
trap 'rm -rf "$venv"' EXIT
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet av==16.0.1 numpy==2.2.6
"$venv/bin/pip" install --quiet --no-deps faster-whisper==1.2.1
mkdir -p "$out"
"$venv/bin/python" - "$out" "$EARSHOT_HOME/data/tuxpaint-stamps-default" <<'PY'
import importlib.util, pathlib, sys, sysconfig, wave
import numpy as np

out, stamps = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
# Not `import faster_whisper`: its __init__ needs ctranslate2, which these two modules do not.
pkg = pathlib.Path(sysconfig.get_paths()["purelib"]) / "faster_whisper"
def load(name):
    spec = importlib.util.spec_from_file_location(name, pkg / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
decode_audio = load("audio").decode_audio
extractor = load("feature_extractor").FeatureExtractor(feature_size=80)

def broadband(rate, channels, seconds=1.0, seed=0):
    """White noise (every band), a log chirp from 50 Hz to Nyquist, and a 2 Hz tremolo."""
    rng = np.random.default_rng(seed)
    n = int(rate * seconds)
    t = np.arange(n) / rate
    chirp = np.sin(2 * np.pi * 50 * seconds / np.log(rate / 2 / 50)
                   * (np.exp(t / seconds * np.log(rate / 2 / 50)) - 1))
    tremolo = 0.6 + 0.4 * np.sin(2 * np.pi * 2 * t)
    cols = [0.25 * rng.standard_normal(n) * tremolo + 0.2 * chirp for _ in range(channels)]
    return np.clip(np.stack(cols, axis=1), -1, 1)

cases = []
for rate in (22050, 44100, 48000):
    for channels, layout in ((1, "mono"), (2, "stereo")):
        name = f"noise_chirp_{rate}_{layout}"
        path = out / f"{name}.wav"
        pcm = np.round(broadband(rate, channels, seed=rate + channels) * 32767).astype("<i2")
        with wave.open(str(path), "wb") as w:
            w.setnchannels(channels)
            w.setsampwidth(2)
            w.setframerate(rate)
            w.writeframes(pcm.tobytes())
        cases.append((name, path))
for name, rel in (
    ("stamp_washing_machine_44100_stereo", "stamps/household/Washing-machine.ogg"),
    ("stamp_frog_44100_mono", "stamps/animals/amphibians/frog.ogg"),
    ("stamp_heron_22050_mono", "stamps/animals/birds/heron_greatblue_flying.ogg"),
    ("stamp_one_it_48000_stereo", "stamps/symbols/math/1_it.ogg"),
    ("stamp_bathyscape_11025_mono", "stamps/vehicles/ship/cartoon/bathyscape.ogg"),
):
    cases.append((name, stamps / rel))

for name, path in cases:
    samples = decode_audio(str(path))
    mel = extractor(samples).astype("<f4")
    np.save(out / f"{name}_wave16k.npy", samples.astype("<f4"))
    np.save(out / f"{name}_mel_fw.npy", np.ascontiguousarray(mel))
    print(f"{name}: {len(samples)} samples at 16 kHz, mel {mel.shape}")
PY
