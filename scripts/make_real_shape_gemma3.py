#!/usr/bin/env python3
"""Write a Gemma 3 text GGUF at a published size's real shape (4B, 12B, 27B), random weights.

For timing what depends on the main model's size (scripts/shield_ttft.py: the safety filter's
cost next to a large main model's prefill): a forward pass costs the same whatever the weights'
values, and the published checkpoints are not reachable here. The shapes are the
`text_config`s of google/gemma-3-{4b,12b,27b}-it (hidden size, layers, heads, head size,
feed-forward size; sliding window 1024 on five layers of six; RoPE base 1e6 with linear factor 8
on the global layers; the 27B's query scaling is hidden/heads = 168, llama.cpp's
`attention.scale` = 168^-0.5).

Types follow llama.cpp's Q4_K_M mixture (see make_real_shape_shield.py, whose block writer and
tokenizer copy this reuses): Q4_K matrices, the tied token embedding in Q6_K, `attn_v` /
`ffn_down` in Q6_K on the `use_more_bits` layers; norms f32. The tokenizer is the default
model's (262144 tokens; the real files have 262208: 0.02 % more embedding rows).

Tensors are written one at a time (a 27B file is 16 GiB; the writer never holds more than the
largest tensor), so this runs in the machine's memory.

Usage (in the dev venv, /root/.venvs/ref, which has `gguf` and numpy):
  python scripts/make_real_shape_gemma3.py --size 27b --out /tmp/gemma3-27b-shape-q4_k_m.gguf
  python scripts/make_real_shape_gemma3.py --size 27b --layers 2 --out /tmp/small.gguf
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

import gguf
from gguf import GGMLQuantizationType as Q

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_real_shape_shield import (  # noqa: E402
    BLOCK,
    copy_tokenizer,
    default_tokenizer_source,
    random_blocks,
    use_more_bits,
)

# hidden, layers, heads, kv heads, head size, feed-forward, query_pre_attn_scalar
SHAPES = {
    "4b": (2560, 34, 8, 4, 256, 10240, 256),
    "12b": (3840, 48, 16, 8, 256, 15360, 256),
    "27b": (5376, 62, 32, 16, 128, 21504, 168),
}
CONTEXT = 131072
SLIDING_WINDOW = 1024


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SHAPES), required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer-from", default=default_tokenizer_source())
    p.add_argument("--layers", type=int, help="fewer than the real count, for a quick check")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    hidden, layers, heads, kv_heads, head_dim, ffn, scalar = SHAPES[args.size]
    n = args.layers or layers
    rng = np.random.default_rng(args.seed)

    w = gguf.GGUFWriter(args.out, "gemma3")
    w.add_name(f"gemma-3-{args.size}-shape-random-q4_k_m")
    w.add_context_length(CONTEXT)
    w.add_embedding_length(hidden)
    w.add_block_count(n)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_sliding_window(SLIDING_WINDOW)
    w.add_rope_freq_base(1_000_000.0)
    w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    w.add_rope_scaling_factor(8.0)
    w.add_attention_scale(float(scalar) ** -0.5)
    w.add_file_type(15)  # llama.cpp's MOSTLY_Q4_K_M
    w.add_quantization_version(2)
    vocab = copy_tokenizer(args.tokenizer_from, w)

    # (name, rows, cols, type or None for an f32 norm of `cols` ones), in file order.
    plan = [("token_embd.weight", vocab, hidden, Q.Q6_K), ("output_norm.weight", 1, hidden, None)]
    for i in range(n):
        more = Q.Q6_K if use_more_bits(i, n) else Q.Q4_K
        blk = f"blk.{i}."
        plan += [
            (blk + "attn_norm.weight", 1, hidden, None),
            (blk + "attn_q.weight", heads * head_dim, hidden, Q.Q4_K),
            (blk + "attn_k.weight", kv_heads * head_dim, hidden, Q.Q4_K),
            (blk + "attn_v.weight", kv_heads * head_dim, hidden, more),
            (blk + "attn_q_norm.weight", 1, head_dim, None),
            (blk + "attn_k_norm.weight", 1, head_dim, None),
            (blk + "attn_output.weight", hidden, heads * head_dim, Q.Q4_K),
            (blk + "post_attention_norm.weight", 1, hidden, None),
            (blk + "ffn_norm.weight", 1, hidden, None),
            (blk + "ffn_gate.weight", ffn, hidden, Q.Q4_K),
            (blk + "ffn_up.weight", ffn, hidden, Q.Q4_K),
            (blk + "ffn_down.weight", hidden, ffn, more),
            (blk + "post_ffw_norm.weight", 1, hidden, None),
        ]
    for name, rows, cols, qtype in plan:
        if qtype is None:
            w.add_tensor_info(name, [cols], np.dtype(np.float32), cols * 4)
        else:
            per, size = BLOCK[qtype]
            nbytes = rows * cols // per * size
            w.add_tensor_info(name, [rows, cols // per * size], np.dtype(np.uint8), nbytes, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, rows, cols, qtype in plan:
        if qtype is None:
            w.write_tensor_data(np.ones(cols, dtype=np.float32))  # llama.cpp stores 1 + w
        else:
            w.write_tensor_data(random_blocks(rng, qtype, rows, cols))
    w.close()
    size = os.path.getsize(args.out)
    print(f"wrote {args.out}: {size / 2**30:.2f} GiB, {args.size} shape, {n} layers, vocab {vocab}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
