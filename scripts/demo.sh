#!/usr/bin/env bash
# All set-up, then the main job on the embedded default: for now, the audio front-end on a
# bundled clip (decode a 48 kHz stereo FLAC, resample, Whisper log-mel).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$root/scripts/setup.sh"
cd "$root"
clip=tests/fixtures/audio/speech_48k_stereo.flac
out=${TMPDIR:-/tmp}/earshot-demo-mel.npy
./target/release/earshot audio-info "$clip"
./target/release/earshot mel "$clip" --out "$out"
echo "log-mel features (n_windows, 80, 3000) written to $out"
