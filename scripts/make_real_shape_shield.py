#!/usr/bin/env python3
"""Write a text ShieldGemma GGUF at the real ShieldGemma 2B shape (Gemma 2 2B), random weights.

For timing the safety filter (scripts/shield_ttft.py): the time of a check does not depend on the
weights' values, and the published checkpoint (google/shieldgemma-2b) is gated and not reachable
here. The shape is Gemma 2 2B's config.json: hidden 2304, 26 layers, 8 query heads and 4
key/value heads of 256, feed-forward 9216 (gelu_tanh), sliding window 4096 on every other layer,
context 8192, attention soft-cap 50, final soft-cap 30, query_pre_attn_scalar 256 (llama.cpp's
`attention.scale` = 256^-0.5), RMSNorm eps 1e-6, RoPE base 10000, tied embeddings.

The tokenizer (every `tokenizer.*` key: vocabulary, scores, types, special ids, chat template) is
copied from a Gemma GGUF given with --tokenizer-from, by default the default model (Gemma 3 270M,
fetched by the tests into the cache directory). Its vocabulary (262144 tokens) is Gemma 3's, not
Gemma 2's 256000: the embedding table and LM head are 2.4 % larger than the real 2B's, so timings
are if anything pessimistic. "Yes" and "No" are single tokens of it (checked here), so the engine
takes the file as a classifier. Gemma 3's `<start_of_turn>`/`<end_of_turn>` ids differ from
Gemma 2's; ShieldGemma's prompts are plain text, so nothing here depends on them.

Types (--type):
  q4_k_m  llama.cpp's Q4_K_M mixture (llama-quant.cpp `llama_tensor_get_type`): Q4_K matrices,
          except the tied token embedding (the output) in Q6_K and `attn_v` / `ffn_down` in Q6_K
          on the `use_more_bits` layers (i < n/8, i >= 7n/8, (i - n/8) % 3 == 2); norms f32.
  q8_0    every matrix Q8_0, norms f32.
The quantized blocks are random bytes with small scales (|w| about 0.03), valid for any reader:
gguf-py cannot quantize K-quants, and random blocks cost no quantization time.

Usage (in the dev venv, /root/.venvs/ref, which has `gguf` and numpy):
  python scripts/make_real_shape_shield.py --out /tmp/shieldgemma-2b-shape-q4_k_m.gguf
  python scripts/make_real_shape_shield.py --out /tmp/small.gguf --layers 2   # quick check
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

import gguf
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V

HIDDEN = 2304
LAYERS = 26
HEADS = 8
KV_HEADS = 4
HEAD_DIM = 256
FFN = 9216
CONTEXT = 8192
SLIDING_WINDOW = 4096

# Bytes per block of 256 (K-quants) or 32 (Q8_0) values.
BLOCK = {Q.Q4_K: (256, 144), Q.Q6_K: (256, 210), Q.Q8_0: (32, 34)}


def default_tokenizer_source():
    cache = os.environ.get("GEMMA_CACHE_DIR")
    if not cache:
        xdg = os.environ.get("XDG_CACHE_HOME")
        cache = os.path.join(xdg, "gemma-rs") if xdg else os.path.expanduser("~/.cache/gemma-rs")
    return os.path.join(cache, "models", "gemma-3-270m-q4_k_m.gguf")


def f16_bytes(rng, n, lo, hi):
    return rng.uniform(lo, hi, n).astype(np.float16).view(np.uint8).reshape(n, 2)


def random_blocks(rng, qtype, rows, cols):
    """Random but valid blocks for a [rows, cols] matrix, as uint8 [rows, bytes per row]."""
    per, size = BLOCK[qtype]
    assert cols % per == 0, (qtype, cols)
    n = rows * cols // per
    b = rng.integers(0, 256, (n, size), dtype=np.uint8)
    if qtype == Q.Q4_K:
        # d, dmin (f16), 12 bytes of 6-bit scales and mins, 128 bytes of 4-bit quants:
        # w = d * sc * q - dmin * m, about zero-mean with dmin = 7.5 d.
        d = rng.uniform(0.5e-4, 1.0e-4, n)
        b[:, 0:2] = d.astype(np.float16).view(np.uint8).reshape(n, 2)
        b[:, 2:4] = (d * 7.5).astype(np.float16).view(np.uint8).reshape(n, 2)
    elif qtype == Q.Q6_K:
        # 128 + 64 bytes of quants, 16 int8 scales, then d (f16): w = d * scale * (q - 32).
        b[:, 208:210] = f16_bytes(rng, n, 2e-6, 8e-6)
    elif qtype == Q.Q8_0:
        # d (f16), then 32 int8: w = d * q.
        b[:, 0:2] = f16_bytes(rng, n, 1e-4, 3e-4)
    return b.reshape(rows, cols // per * size)


def use_more_bits(i, n):
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def copy_tokenizer(src, w):
    reader = gguf.GGUFReader(src)
    n_vocab = None
    tokens = None
    for name, field in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == V.ARRAY else None
        value = field.contents()
        w.add_key_value(name, value, vtype, sub)
        if name == "tokenizer.ggml.tokens":
            tokens = value
            n_vocab = len(value)
    if not tokens:
        raise SystemExit(f"{src} has no tokenizer.ggml.tokens")
    for word in ("Yes", "No"):
        if word not in tokens:
            raise SystemExit(f"{src}: no single {word!r} token: not usable for a classifier")
    return n_vocab


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer-from", default=default_tokenizer_source())
    p.add_argument("--type", choices=["q4_k_m", "q8_0"], default="q4_k_m")
    p.add_argument("--layers", type=int, default=LAYERS, help="fewer for a quick check")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = np.random.default_rng(args.seed)
    n = args.layers

    w = gguf.GGUFWriter(args.out, "gemma2")
    w.add_name(f"shieldgemma-2b-shape-random-{args.type}")
    w.add_context_length(CONTEXT)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(n)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_key_length(HEAD_DIM)
    w.add_value_length(HEAD_DIM)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_attn_logit_softcapping(50.0)
    w.add_final_logit_softcapping(30.0)
    w.add_sliding_window(SLIDING_WINDOW)
    w.add_rope_freq_base(10000.0)
    w.add_attention_scale(256.0 ** -0.5)
    w.add_file_type(15 if args.type == "q4_k_m" else 7)  # llama.cpp's MOSTLY_Q4_K_M / Q8_0
    w.add_quantization_version(2)
    vocab = copy_tokenizer(args.tokenizer_from, w)

    def matrix(name, rows, cols, qtype):
        if args.type == "q8_0":
            qtype = Q.Q8_0
        # Given as bytes [rows, bytes per row]: the writer derives the [rows, cols] shape.
        w.add_tensor(name, random_blocks(rng, qtype, rows, cols), raw_dtype=qtype)

    def norm(name, size):
        w.add_tensor(name, np.ones(size, dtype=np.float32))  # llama.cpp stores 1 + w

    matrix("token_embd.weight", vocab, HIDDEN, Q.Q6_K)
    norm("output_norm.weight", HIDDEN)
    for i in range(n):
        more = Q.Q6_K if use_more_bits(i, n) else Q.Q4_K
        blk = f"blk.{i}."
        norm(blk + "attn_norm.weight", HIDDEN)
        matrix(blk + "attn_q.weight", HEADS * HEAD_DIM, HIDDEN, Q.Q4_K)
        matrix(blk + "attn_k.weight", KV_HEADS * HEAD_DIM, HIDDEN, Q.Q4_K)
        matrix(blk + "attn_v.weight", KV_HEADS * HEAD_DIM, HIDDEN, more)
        matrix(blk + "attn_output.weight", HIDDEN, HEADS * HEAD_DIM, Q.Q4_K)
        norm(blk + "post_attention_norm.weight", HIDDEN)
        norm(blk + "ffn_norm.weight", HIDDEN)
        matrix(blk + "ffn_gate.weight", FFN, HIDDEN, Q.Q4_K)
        matrix(blk + "ffn_up.weight", FFN, HIDDEN, Q.Q4_K)
        matrix(blk + "ffn_down.weight", HIDDEN, FFN, more)
        norm(blk + "post_ffw_norm.weight", HIDDEN)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    size = os.path.getsize(args.out)
    print(f"wrote {args.out}: {size / 2**30:.2f} GiB, {n} layers, vocab {vocab}, {args.type}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
