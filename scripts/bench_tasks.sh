#!/usr/bin/env bash
# Trains and evaluates the tasks from clean run folders, one run per seed, and prints a table
# per task: each score's mean and spread (min-max) over the seeds, beside the baselines of
# the last seed's listening check (silence, shuffled, training majority, uniform / most
# common target). Everything comes from `earshot eval --json`; the per-run summaries
# (`earshot eval --brief` output) are kept in runs/bench/<task>-s<seed>/summary.txt.
#
#   bash scripts/bench_tasks.sh [main|traits|transcribe|transcribe-en|multitask|multitask3|all] [--seeds N] [--eval-only] [--final]
#        [--set KEY=VALUE]... [--tag NAME] [--split valid] [--skip-trained] [--only-seed N]
#   (default: all, 3 seeds; --eval-only scores the runs already in runs/bench again; --final
#   scores each run's final projector instead of best/: a comparison, never the figure;
#   --set overrides a config value in training and scoring, --tag names the runs
#   runs/bench/<task>-<tag>-s<seed> so variants sit side by side; --split valid scores the
#   validation split, without the listening check: what a choice between variants reads,
#   so that the test split stays unseen until the choice is made; --skip-trained trains only
#   the seeds whose run folder has no final projector and best/ yet; --only-seed N runs that
#   seed alone, so that seeds can run side by side in several processes)
#
# main = configs/cpu-smollm2-soundfont.toml (instrument family and register),
# traits = configs/cpu-smollm2-speaker-traits.toml (language/voice),
# transcribe = configs/cpu-smollm2-transcribe-fr.toml (French CER/WER),
# transcribe-en = configs/cpu-smollm2-transcribe-en.toml (English CER/WER, Asterisk's prompts),
# multitask = configs/cpu-smollm2-multitask.toml (instrument + speaker traits in one model;
# not part of `all`): a table per task, then each task beside its single-task runs
# (runs/bench/main-timgm-s*, traits-s* and transcribe-en-s*, when they exist),
# multitask3 = configs/cpu-smollm2-three-tasks.toml (the same with English transcription).
# The scores are on each config's test split (data.test-split), which nothing reads before
# this: each run's figure is its best/ checkpoint, the one with the lowest eval loss on
# data.valid-split among the evaluations every train.eval-every steps and at the end.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
which=all seeds=3 eval_only=0 checkpoint=best tag="" split="" skip_trained=0 only_seed=""
sets=()
while [ $# -gt 0 ]; do
  case $1 in
    main|traits|transcribe|transcribe-en|multitask|multitask3|all) which=$1 ;;
    --seeds) seeds=$2; shift ;;
    --set) sets+=(--set "$2"); shift ;;
    --tag) tag="-$2"; shift ;;
    --split) split=$2; shift ;;
    --skip-trained) skip_trained=1 ;;
    --only-seed) only_seed=$2; shift ;;
    --eval-only) eval_only=1 ;;
    --final) checkpoint=projector.safetensors ;;
    *) echo "bench_tasks.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
"$root/scripts/setup.sh" >&2
earshot=./target/release/earshot
declare -A configs=(
  [main]=configs/cpu-smollm2-soundfont.toml
  [traits]=configs/cpu-smollm2-speaker-traits.toml
  [transcribe]=configs/cpu-smollm2-transcribe-fr.toml
  [transcribe-en]=configs/cpu-smollm2-transcribe-en.toml
  [multitask]=configs/cpu-smollm2-multitask.toml
  [multitask3]=configs/cpu-smollm2-three-tasks.toml
)
tasks=(main traits transcribe transcribe-en)
[ "$which" = all ] || tasks=("$which")
echo "commit $(git rev-parse --short HEAD), $(date -u +%Y-%m-%d), $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) cores"
for task in "${tasks[@]}"; do
  config=${configs[$task]}
  jsons=()
  for ((seed = 0; seed < seeds; seed++)); do
    [ -z "$only_seed" ] || [ "$seed" = "$only_seed" ] || continue
    run=runs/bench/$task$tag-s$seed
    start=$(date +%s)
    if [ "$skip_trained" = 1 ] && [ -f "$run/projector.safetensors" ] && [ -d "$run/best" ]; then
      echo "[$task seed $seed: trained already ($run), scoring it]" >&2
    elif [ "$eval_only" = 0 ]; then
      rm -rf "$run"
      "$earshot" train "$config" "${sets[@]}" --set "train.seed=$seed" \
        --set "train.run-dir=\"$run\"" --overwrite >&2
    elif [ ! -d "$run/best" ]; then
      echo "bench_tasks.sh: $run/best missing: train it first (without --eval-only)" >&2
      exit 1
    fi
    if [ -z "$split" ]; then
      "$earshot" eval --config "$config" "${sets[@]}" --set "train.run-dir=\"$run\"" \
        --checkpoint "$run/$checkpoint" --brief > "$run/summary.txt"
      # A multi-task run writes eval-NAME.json per task beside its report pages.
      if [[ $task == multitask* ]]; then jsons+=("$run"); else jsons+=("$run/eval.json"); fi
    else
      "$earshot" eval --config "$config" "${sets[@]}" --set "train.run-dir=\"$run\"" \
        --checkpoint "$run/$checkpoint" --split "$split" --no-listening-check \
        --report "$run/report-$split.html" --json > "$run/eval-$split.json"
      python3 - "$run/eval-$split.json" > "$run/summary-$split.txt" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
parts = [f"{k} {v['accuracy']:.3f}" for k, v in r.get("attributes", {}).items()]
reports = r["tasks"] if "tasks" in r else {"": r}
for name, r in reports.items():
    parts = [f"{k} {v['accuracy']:.3f}" for k, v in r.get("attributes", {}).items()]
    print((name + ": " if name else "") + (", ".join(parts) or str(r["scores"])))
PY
      jsons+=("$run/eval-$split.json")
    fi
    echo "[$task seed $seed: $(( $(date +%s) - start )) s]" >&2
    cat "$run/summary${split:+-$split}.txt" >&2
  done
  python3 - "$task" "$config" "$checkpoint" "${split:-test}" "${sets[*]:-}" "${jsons[@]}" <<'PY'
import glob, json, os, sys
task, config, checkpoint, split, sets, paths = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6:]
def reports(path):
    """name -> report: one for a single-task run, one per task of a multi-task run."""
    if os.path.isdir(path):
        return {os.path.basename(f)[5:-5]: json.load(open(f))
                for f in sorted(glob.glob(os.path.join(path, "eval-*.json")))
                if not os.path.basename(f).startswith("eval-valid")}
    r = json.load(open(path))
    return r["tasks"] if "tasks" in r else {task: r}
by_run = [reports(p) for p in paths]
def spread(values):
    m = sum(values) / len(values)
    return f"{m:.3f} ({min(values):.3f}-{max(values):.3f})" if len(values) > 1 else f"{m:.3f}"
for task_name in by_run[0]:
    runs = [r[task_name] for r in by_run]
    task_label = task if task_name == task else f"{task}/{task_name}"
    if split != "test":
        # Choosing between variants: the real-audio scores on this split, nothing else.
        print(f"\n{task_label}: {config} {sets}, {len(runs)} seed(s), {runs[0]['examples']} {split} examples, "
              + ("best/ checkpoints" if checkpoint == "best" else "final projectors"))
        for name in runs[0].get("attributes", {}):
            print(f"{name} accuracy: {spread([r['attributes'][name]['accuracy'] for r in runs])}")
        for key in ("cider_d", "wer", "cer"):
            print(f"{key}: {spread([r['scores'][key] for r in runs])}")
        continue
    last = runs[-1]["listening_check"]
    print(f"\n{task_label}: {config}, {len(runs)} seed(s), {runs[0]['examples']} test examples, " + ("best/ checkpoints (lowest valid loss)" if checkpoint == "best" else "final projectors (not the figure: a comparison)"))
    print("| score | real audio: mean (min-max) | silence | shuffled | training majority | uniform |")
    print("|---|---|---|---|---|---|")
    for name in runs[0].get("attributes", {}):
        real = [r["attributes"][name]["accuracy"] for r in runs]
        maj = last["baselines"]["majority"].get(name, {}).get("accuracy")
        uni = last["baselines"]["uniform"].get(name)
        fmt = lambda v: "-" if v is None else f"{v:.3f}"
        print(f"| {name} accuracy | **{spread(real)}** | {last['silence']['attributes'][name]['accuracy']:.3f}"
              f" | {last['shuffled']['attributes'][name]['accuracy']:.3f} | {fmt(maj)} | {fmt(uni)} |")
    const = last["baselines"].get("constant") or {}
    for key, name in (("cider_d", "CIDEr-D"), ("wer", "WER"), ("cer", "CER")):
        real = [r["scores"][key] for r in runs]
        c = const.get(key)
        print(f"| {name} | **{spread(real)}** | {last['silence']['scores'][key]:.3f} | {last['shuffled']['scores'][key]:.3f}"
              f" | {'-' if c is None else f'{c:.3f}'} (most common target) | |")
    loss = [r["eval_loss"] for r in runs]
    print(f"| eval loss | {spread(loss)} | {last['silence_loss']:.3f} | {last['shuffled_loss']:.3f} | | |")

# A multi-task run's tasks beside their single-task runs (same samples per task).
singles = {"instrument": "main-timgm", "traits": "traits", "transcription": "transcribe-en"}
if task.startswith("multitask") and split == "test":
    print("\n| task: score | multi-task: mean (min-max) | single-task run: mean (min-max) |")
    print("|---|---|---|")
    for name in by_run[0]:
        seeds = [p.rsplit("-s", 1)[1] for p in paths]
        single = [f"runs/bench/{singles.get(name, name)}-s{s}/eval.json" for s in seeds]
        single = [json.load(open(f)) for f in single if os.path.exists(f)]
        for attr in by_run[0][name].get("attributes", {}):
            multi = [r[name]["attributes"][attr]["accuracy"] for r in by_run]
            one = [r["attributes"][attr]["accuracy"] for r in single]
            print(f"| {name}: {attr} accuracy | {spread(multi)} | {spread(one) if one else '-'} ({len(one)} run(s)) |")
        if not by_run[0][name].get("attributes"):
            for key in ("cer", "wer"):
                multi = [r[name]["scores"][key] for r in by_run]
                one = [r["scores"][key] for r in single]
                print(f"| {name}: {key.upper()} | {spread(multi)} | {spread(one) if one else '-'} ({len(one)} run(s)) |")
PY
done
