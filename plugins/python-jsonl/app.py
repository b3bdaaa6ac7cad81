"""The jsonl dataset adapter, written in Python (componentize-py), to show that plugin
authors are not tied to Rust. Same contract and behaviour as plugins/jsonl:
every *.jsonl file in the dataset root is a split named after the file; each line is
{"id", "audio", "start", "end", "text"|"caption"|"target", "references", ...metadata}.
Options (JSON): {"files": {"split": "file.jsonl"}, "check_audio": true}.

Build: componentize-py -d ../../wit/since_v0.1.0 -w dataset-adapter-plugin componentize app -o python_jsonl.wasm
"""

import json
import os

from componentize_py_types import Err
from wit_world import exports
from wit_world.exports import dataset_adapter as da
from wit_world.imports import types as t

DATA = "/data"
KNOWN = {"id", "audio", "start", "end", "text", "caption", "target", "references"}
_splits = None


def _fail(code, message):
    raise Err(t.PluginError(code=code, message=message))


def _example(obj, split, line):
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    audio = obj.get("audio")
    if not isinstance(audio, str):
        raise ValueError('missing string field "audio"')

    def num(key):
        v = obj.get(key)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f'"{key}" is not a number')
        return float(v)

    target = next((obj[k] for k in ("text", "caption", "target") if isinstance(obj.get(k), str)), None)
    refs = obj.get("references", [])
    if not isinstance(refs, list):
        raise ValueError('"references" is not a list')
    ident = obj.get("id")
    if isinstance(ident, bool) or not isinstance(ident, (str, int, float)):
        ident = f"{split}:{line}"
    meta = [
        t.KeyValue(key=k, value=v if isinstance(v, str) else json.dumps(v))
        for k, v in obj.items()
        if k not in KNOWN
    ]
    return da.Example(
        id=str(ident),
        audio=da.AudioSource_Path(audio),
        start_s=num("start"),
        end_s=num("end"),
        target=target,
        references=[r for r in refs if isinstance(r, str)],
        metadata=meta,
    )


class Plugin(exports.Plugin):
    def describe(self):
        return t.PluginInfo(
            name="python-jsonl",
            version="0.1.0",
            api_version="0.1.0",
            roles=[t.Role.DATASET_ADAPTER],
            description="JSON-lines dataset adapter written in Python (componentize-py)",
        )


class DatasetAdapter(exports.DatasetAdapter):
    def open(self, options):
        global _splits
        try:
            opts = json.loads(options) if options.strip() else {}
        except ValueError as e:
            _fail(t.ErrorCode.INVALID_INPUT, f"options: {e}")
        files = opts.get("files")
        if files is None:
            files = {n[: -len(".jsonl")]: n for n in sorted(os.listdir(DATA)) if n.endswith(".jsonl")}
            if not files:
                _fail(t.ErrorCode.NOT_FOUND, "no *.jsonl files in the dataset root")
        check = opts.get("check_audio", True)
        warnings, splits = [], {}
        for split in sorted(files):
            name = files[split]
            try:
                with open(f"{DATA}/{name}", encoding="utf-8") as f:
                    lines = f.read().splitlines()
            except OSError as e:
                _fail(t.ErrorCode.NOT_FOUND, f"{name}: {e}")
            examples = []
            for n, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    ex = _example(json.loads(line), split, n)
                except ValueError as e:
                    warnings.append(f"{name}:{n}: {e}; skipped")
                    continue
                if check and not os.path.exists(f"{DATA}/{ex.audio.value}"):
                    warnings.append(f"{name}:{n}: audio file {ex.audio.value} not found; skipped")
                    continue
                examples.append(ex)
            splits[split] = examples
        _splits = splits
        return da.DatasetInfo(splits=list(splits), warnings=warnings)

    def read(self, split, start, max):
        if _splits is None:
            _fail(t.ErrorCode.INVALID_INPUT, "read before open")
        if split not in _splits:
            _fail(t.ErrorCode.NOT_FOUND, f"no split {split!r} (have: {list(_splits)})")
        examples = _splits[split]
        lo = min(start, len(examples))
        hi = min(lo + max, len(examples))
        return da.Batch(examples=examples[lo:hi], warnings=[], next=hi if hi < len(examples) else None)
