#!/usr/bin/env bash
# All set-up, then the main job: the projector between the frozen Whisper tiny.en encoder and
# the frozen SmolLM2-135M-Instruct LLM is trained (CPU) to say which instrument family plays
# a note and in which register, on real recordings (the FluidR3 General MIDI SoundFont, and
# for training also TimGM6mb's notes, fetched by the set-up; FluidR3's validation presets
# give the eval loss and best/), then FluidR3's test
# presets (never heard in training, not used to choose anything) are captioned and scored:
# attribute accuracy, caption metrics, the listening check (silence, shuffled audio) and an
# HTML report in the run folder. About 8-13 minutes on 2 cores after the build (README.md).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$root/scripts/setup.sh"
cd "$root"
config=configs/cpu-smollm2-soundfont.toml
run_dir=runs/cpu-smollm2-soundfont
./target/release/earshot train "$config" --overwrite
# The summary (scores with 95% intervals beside silence, shuffled audio, the training split's
# majority and chance; the listening verdict); eval.json and report.html go beside the run.
# The checkpoint with the lowest validation loss (best/): chosen without looking at test.
./target/release/earshot eval --config "$config" --checkpoint "$run_dir/best" --brief
