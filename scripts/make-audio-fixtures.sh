#!/usr/bin/env bash
# Regenerates tests/fixtures/audio/ from the oracle clips with independent encoders
# (sox, lame, ffmpeg). The outputs are committed; this script documents how they were made.
# Needs: apt-get install sox libsox-fmt-all lame ffmpeg
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
src=${EARSHOT_ORACLE_DIR:-$root/../shared/oracle}/whisper-tiny-en/audio
out=$root/tests/fixtures/audio
mkdir -p "$out"
speech=$src/a_speech_16k.wav
sox -D "$speech" -e unsigned-integer -b 8 "$out/speech_u8.wav"
sox "$speech" -e signed-integer -b 24 "$out/speech_s24.wav"
sox "$speech" -e signed-integer -b 32 "$out/speech_s32.wav"
sox "$speech" -e floating-point -b 32 "$out/speech_f32.wav"
sox "$speech" -e floating-point -b 64 "$out/speech_f64.wav"
# (-D: no dither, so the 8-bit file is the plain rounding of the 16-bit one.)
# 48 kHz stereo FLAC (resampled by sox) to test FLAC at another rate/channel count.
sox "$speech" -r 48000 -c 2 "$out/speech_48k_stereo.flac"
# MP3 with a LAME/Xing header (gapless info: encoder delay and padding).
lame --quiet -b 64 "$speech" "$out/speech.mp3"
ffmpeg -nostdin -loglevel error -y -i "$speech" -c:a libvorbis -q:a 4 "$out/speech.ogg"
ffmpeg -nostdin -loglevel error -y -i "$speech" -c:a aac -b:a 64k "$out/speech.m4a"
# Opus is recognised by symphonia's Ogg reader but has no decoder: the unsupported-codec case.
ffmpeg -nostdin -loglevel error -y -i "$speech" -c:a libopus -b:a 32k "$out/speech.opus"
ls -la "$out"
