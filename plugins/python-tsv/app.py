"""A plain `audio<TAB>text` dataset adapter, written in Python (componentize-py): every
*.tsv file in the dataset root is a split named after the file (`train.tsv` -> `train`).
Each line: a path relative to the root, a tab, the transcript (tabs inside the text are
kept). Empty lines and lines starting with `#` are skipped; a line without a tab, with an
absolute path or `..`, or whose audio is missing is a warning with file and line number.
Options (JSON): {"files": {"split": "file.tsv"}, "check_audio": true, "header": false}
(`header`: the first line of each file names the columns and is skipped).

Build: componentize-py -d ../../wit/since_v0.1.0 -w dataset-adapter-plugin componentize app -o python_tsv.wasm
"""

import json
import os

from componentize_py_types import Err
from wit_world import exports
from wit_world.exports import dataset_adapter as da
from wit_world.imports import types as t

DATA = "/data"
_splits = None


def _fail(code, message):
    raise Err(t.PluginError(code=code, message=message))


def _parse(line):
    if "\t" not in line:
        raise ValueError("no tab between audio and text")
    audio, text = line.split("\t", 1)
    audio, text = audio.strip(), text.strip()
    if not audio:
        raise ValueError("empty audio path")
    if audio.startswith("/") or ".." in audio.split("/"):
        raise ValueError(f"audio path {audio!r} leaves the dataset root")
    if not text:
        raise ValueError("empty text")
    return audio, text


class Plugin(exports.Plugin):
    def describe(self):
        return t.PluginInfo(
            name="python-tsv",
            version="0.1.0",
            api_version="0.1.0",
            roles=[t.Role.DATASET_ADAPTER],
            description="audio<TAB>text dataset adapter written in Python (componentize-py)",
        )


class DatasetAdapter(exports.DatasetAdapter):
    def open(self, options):
        global _splits
        try:
            opts = json.loads(options) if options.strip() else {}
        except ValueError as e:
            _fail(t.ErrorCode.INVALID_INPUT, f"options: {e}")
        if not isinstance(opts, dict):
            _fail(t.ErrorCode.INVALID_INPUT, "options: not a JSON object")
        unknown = set(opts) - {"files", "check_audio", "header"}
        if unknown:
            _fail(t.ErrorCode.INVALID_INPUT, f"options: unknown field(s) {sorted(unknown)}")
        files = opts.get("files")
        if files is None:
            files = {n[: -len(".tsv")]: n for n in sorted(os.listdir(DATA)) if n.endswith(".tsv")}
            if not files:
                _fail(t.ErrorCode.NOT_FOUND, "no *.tsv files in the dataset root")
        check = opts.get("check_audio", True)
        header = opts.get("header", False)
        warnings, splits = [], {}
        for split in sorted(files):
            name = files[split]
            try:
                with open(f"{DATA}/{name}", encoding="utf-8") as f:
                    lines = f.read().splitlines()
            except (OSError, UnicodeDecodeError) as e:
                _fail(t.ErrorCode.NOT_FOUND, f"{name}: {e}")
            examples = []
            for n, line in enumerate(lines, 1):
                if (header and n == 1) or not line.strip() or line.startswith("#"):
                    continue
                try:
                    audio, text = _parse(line)
                except ValueError as e:
                    warnings.append(f"{name}:{n}: {e}; skipped")
                    continue
                if check and not os.path.isfile(f"{DATA}/{audio}"):
                    warnings.append(f"{name}:{n}: audio file {audio} not found; skipped")
                    continue
                examples.append(
                    da.Example(
                        id=f"{split}:{n}",
                        audio=da.AudioSource_Path(audio),
                        start_s=None,
                        end_s=None,
                        target=text,
                        references=[],
                        metadata=[t.KeyValue(key="transcript", value=text)],
                    )
                )
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
