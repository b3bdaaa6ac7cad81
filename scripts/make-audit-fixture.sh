#!/usr/bin/env bash
# Regenerates tests/fixtures/audit/tuxpaint_fr_split_by_stamp.txt without the leak audit's
# code: the French transcription config's examples are listed with the tuxpaint-stamps
# adapter split by stamp alone (the split behind the speech figures published before issue
# #25), then Python finds the held-out clips that share a file's sha256 or a normalised
# transcript (lower-case, Unicode punctuation deleted, spaces collapsed) with a training clip.
# Needs the set-up (models, data, plugins) and a release build.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
export EARSHOT_HOME=${EARSHOT_HOME:-$HOME/.cache/earshot}
stamps=$EARSHOT_HOME/data/tuxpaint-stamps-default/stamps
options='{"languages": ["fr"], "max_eval_per_language": 60, "eval_fraction": 0.2, "valid_fraction": 0.0, "split_by": "stamp"}'
"$root/target/release/earshot" dataset list \
  --adapter "$root/plugins/target/wasm32-wasip2/release/tuxpaint_stamps.wasm" \
  --root "$stamps" --options "$options" 2>/dev/null |
python3 -c '
import hashlib, json, sys, unicodedata
stamps = sys.argv[1]
def norm(t):
    t = "".join(c for c in t.lower() if not unicodedata.category(c).startswith("P"))
    return " ".join(t.split())
def keys(ex):
    with open(stamps + "/" + ex["audio"]["path"], "rb") as f:
        return {("bytes", hashlib.sha256(f.read()).hexdigest()), ("text", norm(ex["target"]))}
rows = [json.loads(l) for l in sys.stdin]
train = set()
for ex in rows:
    if ex["split"] == "train":
        train |= keys(ex)
held = [ex for ex in rows if ex["split"] == "test"]
by = {"bytes": 0, "text": 0}
leaking = []
for ex in held:
    shared = keys(ex) & train
    for kind, _ in shared:
        by[kind] += 1
    if shared:
        leaking.append(ex["id"])
print("# Held-out French clips (tuxpaint-stamps, \"split_by\": \"stamp\") that share a file (sha256)")
print("# or a normalised transcript with a training clip, found by scripts/make-audit-fixture.sh")
print("# (Python, not the audit): %d of %d held out; %d by bytes, %d by text." % (len(leaking), len(held), by["bytes"], by["text"]))
for i in sorted(leaking):
    print(i)
' "$stamps" > "$root/tests/fixtures/audit/tuxpaint_fr_split_by_stamp.txt"
head -3 "$root/tests/fixtures/audit/tuxpaint_fr_split_by_stamp.txt"
