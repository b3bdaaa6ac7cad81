#!/usr/bin/env bash
# All set-up, then the main job on the embedded default. Until training and captioning exist
# (issues #5, #6) this is the longest end-to-end path there is: a bundled 48 kHz stereo FLAC
# through decoding, resampling, Whisper log-mel and the frozen Whisper encoder, then a
# ChatML prompt (the original write-up's) through the frozen LLM.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$root/scripts/setup.sh"
cd "$root"
models=${EARSHOT_HOME:-$HOME/.cache/earshot}/models
clip=tests/fixtures/audio/speech_48k_stereo.flac
out=${TMPDIR:-/tmp}
./target/release/earshot audio-info "$clip"
./target/release/earshot mel "$clip" --out "$out/earshot-demo-mel.npy"
echo "log-mel features (1, 80, 3000): $out/earshot-demo-mel.npy"
./target/release/earshot encode "$clip" --whisper "$models/whisper-tiny.en" --out "$out/earshot-demo-enc.npy"
echo "Whisper encoder output (1, 1500, 384): $out/earshot-demo-enc.npy"
echo "LLM continuation of the write-up's ChatML prompt:"
./target/release/earshot generate \
  --llm "$models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf" --max-tokens 40 \
  --prompt $'<|im_start|>system\nYou are a helpful AI who follows instruction carefully<|im_end|>\n<|im_start|>user\nDescribe the sound of the given file<|im_end|>\n<|im_start|>assistant\n'
