#!/usr/bin/env bash
# Regenerates tests/fixtures/librispeech/: a LibriSpeech-layout fixture of real speech, five
# English Tux Paint stamp descriptions (tuxpaint-stamps-default, GPL-2, fetched by
# scripts/setup.sh) converted to 16 kHz mono FLAC with libsndfile (the `soundfile` wheel),
# their texts upper-cased as LibriSpeech writes them. The outputs are committed; this script
# documents how they were made. One transcript line names a clip that is not there (the
# adapter's warning).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
stamps=${EARSHOT_HOME:-$HOME/.cache/earshot}/data/tuxpaint-stamps-default/stamps
out=$root/tests/fixtures/librispeech
venv=$(mktemp -d)
trap 'rm -rf "$venv"' EXIT
python3 -m venv "$venv" && "$venv/bin/pip" install --quiet soundfile==0.14.0 numpy
rm -rf "$out"
"$venv/bin/python" - "$stamps" "$out" <<'PY'
import os, sys
import numpy as np
import soundfile as sf

stamps, out = sys.argv[1], sys.argv[2]
layout = {
    ("dev-clean", "1001", "2002"): ["animals/amphibians/frog", "animals/birds/crow", "animals/birds/duck"],
    ("train-clean-5", "1003", "2004"): ["animals/birds/hen", "animals/birds/lark"],
}
for (split, speaker, chapter), clips in layout.items():
    folder = os.path.join(out, split, speaker, chapter)
    os.makedirs(folder)
    lines = []
    for n, stamp in enumerate(clips):
        uid = f"{speaker}-{chapter}-{n:04d}"
        data, rate = sf.read(os.path.join(stamps, stamp + "_desc.ogg"), always_2d=True)
        mono = data.mean(axis=1)
        # 16 kHz by linear interpolation: a fixture, not a resampler under test.
        t = np.arange(0, len(mono) / rate, 1 / 16000)
        sf.write(os.path.join(folder, uid + ".flac"), np.interp(t * rate, np.arange(len(mono)), mono), 16000, subtype="PCM_16")
        text = open(os.path.join(stamps, stamp + ".txt"), encoding="utf-8").readline().strip()
        lines.append(f"{uid} {text.upper().rstrip('.')}")
    if split == "dev-clean":
        lines.append(f"{speaker}-{chapter}-0099 A CLIP THAT IS NOT THERE")
    with open(os.path.join(folder, f"{speaker}-{chapter}.trans.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
PY
find "$out" -type f | sort
