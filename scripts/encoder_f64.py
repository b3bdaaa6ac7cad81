#!/usr/bin/env python3
"""An independent float64 Whisper encoder in numpy, for checking how exact earshot's f32
encoder is (BENCHMARKS.md, issue #31): the oracle's 1e-3 tolerance is the bar for any correct
f32 encoder, this measures how far inside it earshot and CTranslate2 are.

    target/bench-venv/bin/python scripts/encoder_f64.py WHISPER_DIR MEL.npy OUT.npy \
        [EARSHOT_ENC.npy ...]

WHISPER_DIR is a Hugging Face layout folder (config.json + model.safetensors, f16 or f32);
MEL.npy is (n_mels, 3000). Writes the (1, 1500, d_model) float64 output to OUT.npy, then
prints each further .npy's relative L2 distance to it. numpy only (math.erf for the exact
GELU); ~6 s for tiny.en.
"""
import json
import math
import struct
import sys

import numpy as np


def main():
    folder, mel_path, out_path, *others = sys.argv[1:]
    buf = open(folder + "/model.safetensors", "rb").read()
    n = struct.unpack("<Q", buf[:8])[0]
    header = json.loads(buf[8 : 8 + n])
    base = 8 + n
    dtypes = {"F16": np.float16, "F32": np.float32}

    def w(name):
        h = header[name]
        a, b = h["data_offsets"]
        raw = np.frombuffer(buf[base + a : base + b], dtype=dtypes[h["dtype"]])
        return raw.reshape(h["shape"]).astype(np.float64)

    erf = np.frompyfunc(math.erf, 1, 1)

    def gelu(x):
        return 0.5 * x * (1 + erf(x / math.sqrt(2)).astype(np.float64))

    def conv(x, weight, bias, stride):  # x (C, L), weight (O, C, 3), padding 1
        length = x.shape[1]
        padded = np.pad(x, ((0, 0), (1, 1)))
        out_len = (length - 1) // stride + 1
        taps = np.stack([padded[:, k : k + stride * (out_len - 1) + 1 : stride] for k in range(3)])
        return np.einsum("ock,kcl->ol", weight, taps) + bias[:, None]

    def layer_norm(x, p):
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + 1e-5) * w(p + ".weight") + w(p + ".bias")

    cfg = json.load(open(folder + "/config.json"))
    p0 = "model.encoder"
    mel = np.load(mel_path).astype(np.float64)
    x = gelu(conv(mel, w(p0 + ".conv1.weight"), w(p0 + ".conv1.bias"), 1))
    x = gelu(conv(x, w(p0 + ".conv2.weight"), w(p0 + ".conv2.bias"), 2)).T
    x = x + w(p0 + ".embed_positions.weight")[: x.shape[0]]
    heads = cfg["encoder_attention_heads"]
    hd = x.shape[1] // heads
    for i in range(cfg["encoder_layers"]):
        p = f"{p0}.layers.{i}"
        h = layer_norm(x, p + ".self_attn_layer_norm")
        q = h @ w(p + ".self_attn.q_proj.weight").T + w(p + ".self_attn.q_proj.bias")
        k = h @ w(p + ".self_attn.k_proj.weight").T
        v = h @ w(p + ".self_attn.v_proj.weight").T + w(p + ".self_attn.v_proj.bias")
        attended = np.zeros_like(q)
        for j in range(heads):
            cols = slice(j * hd, (j + 1) * hd)
            s = q[:, cols] @ k[:, cols].T * hd**-0.5
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            attended[:, cols] = s @ v[:, cols]
        x = x + attended @ w(p + ".self_attn.out_proj.weight").T + w(p + ".self_attn.out_proj.bias")
        h = gelu(layer_norm(x, p + ".final_layer_norm") @ w(p + ".fc1.weight").T + w(p + ".fc1.bias"))
        x = x + h @ w(p + ".fc2.weight").T + w(p + ".fc2.bias")
    x = layer_norm(x, p0 + ".layer_norm")[None]
    np.save(out_path, x)
    for other in others:
        y = np.load(other).astype(np.float64).ravel()
        print(f"{other}: relative L2 to float64 {np.linalg.norm(y - x.ravel()) / np.linalg.norm(x):.3g}")


if __name__ == "__main__":
    main()
