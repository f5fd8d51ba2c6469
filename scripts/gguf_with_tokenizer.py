#!/usr/bin/env python3
"""Copies a GGUF file and adds a Gemma tokenizer to it, padded to the model's vocabulary, so that
llama.cpp (which needs a vocabulary to load a text model) can run a synthetic file made without
one (`crates/models/examples/gemma3n_synth.rs`'s real-shape Gemma 3n, for instance).

    /root/.venvs/ref/bin/python scripts/gguf_with_tokenizer.py IN.gguf OUT.gguf [--tokenizer-from G.gguf]

Every `tokenizer.*` key comes from --tokenizer-from (default: the default model, Gemma 3 270M,
in gemma-rs's cache). When the model's `token_embd.weight` has more rows than the tokenizer has
tokens (Gemma 3n: 262400 against Gemma 3's 262144), the token list is padded with
`<unused_pad_N>` entries of type UNUSED and score 0, as the rows beyond the text vocabulary
(Gemma 3n's image and audio ids) are never produced by the tokenizer; a shorter
`per_layer_token_embd.weight` is padded with zero rows to the same size. Dev venv (`gguf`).
"""
import argparse
import os
import sys

import gguf
import numpy as np
from gguf import GGUFValueType as V

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_real_shape_shield import default_tokenizer_source  # noqa: E402

UNUSED = 5  # llama.cpp's LLAMA_TOKEN_TYPE_UNUSED


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--tokenizer-from", default=default_tokenizer_source())
    args = p.parse_args()

    src = gguf.GGUFReader(args.src)
    arch = src.fields["general.architecture"].contents()
    embd = next(t for t in src.tensors if t.name == "token_embd.weight")
    n_vocab = int(embd.shape[-1])
    w = gguf.GGUFWriter(args.out, arch)
    for name, field in src.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or name.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        w.add_key_value(name, field.contents(), vtype, field.types[-1] if vtype == V.ARRAY else None)

    tok = gguf.GGUFReader(args.tokenizer_from)
    extra = None
    for name, field in tok.fields.items():
        if not name.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        value = field.contents()
        if name in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
            extra = n_vocab - len(value)
            if extra < 0:
                raise SystemExit(f"the tokenizer has {len(value)} tokens, the model only {n_vocab} rows")
            pad = {"tokenizer.ggml.tokens": [f"<unused_pad_{i}>" for i in range(extra)],
                   "tokenizer.ggml.scores": [0.0] * extra,
                   "tokenizer.ggml.token_type": [UNUSED] * extra}[name]
            value = list(value) + pad
        w.add_key_value(name, value, vtype, field.types[-1] if vtype == V.ARRAY else None)

    for t in src.tensors:
        data = t.data  # byte rows (quantized) or values, outermost dimension first
        if t.name == "per_layer_token_embd.weight" and data.shape[0] < n_vocab:
            # llama.cpp wants the per-layer table over the whole vocabulary, as its converter
            # writes it; the rows past the text vocabulary are never looked up (zero blocks).
            pad = np.zeros((n_vocab - data.shape[0],) + data.shape[1:], dtype=data.dtype)
            data = np.concatenate([data, pad])
        w.add_tensor(t.name, data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"{args.out}: {len(src.tensors)} tensors, tokenizer padded by {extra} to {n_vocab}", file=sys.stderr)


if __name__ == "__main__":
    main()
