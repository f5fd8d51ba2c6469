#!/usr/bin/env python3
"""What activation quantization costs in accuracy, simulated in float64 on the default model.

Runs the float64 NumPy forward of `accuracy_f64.py` with every matmul's input rounded the way
an engine quantizes activations, and reports the distance of the first generated token's top-10
logits from the exact float64 ones (the metric of `accuracy_f64.py`, on the 9 prompts of
`fixtures/accuracy/reference_f64.json`). K and V are rounded to f16 (the default cache) in every
mode but `exact`.

Modes:
  exact   no rounding (checks the forward: distances ~1e-14)
  ggml    ggml's pairs: Q8_0 activations (a scale per 32 values, stored as f16) for Q5_0/Q8_0
          weights, Q8_K (one f32 scale per 256 values, signed-max rounding) for Q4_K/Q6_K
  per32   Q8_0 activations for every weight type (what gemma-rs uses for Q4_K and Q6_K)
  add `+lm` to keep the LM head's input exact (e.g. `per32+lm`).

  /root/.venvs/ref/bin/python scripts/activation_quant_sim.py ggml per32
"""
import json
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import accuracy_f64 as acc  # noqa: E402

FIXTURE = os.path.join(acc.ROOT, "fixtures", "accuracy", "reference_f64.json")


def q8_blocks(x, block, f16_scale, signed_max):
    """x with each `block` consecutive values rounded to 8 bits with one scale, as ggml's
    quantize_row_q8_0 (amax / 127, f16 scale) or quantize_row_q8_K (signed max -> -127)."""
    xb = x.reshape(-1, block)
    if signed_max:
        mx = xb[np.arange(len(xb)), np.abs(xb).argmax(-1)]
        safe = np.where(mx == 0, 1.0, mx)
        iscale = np.where(mx != 0, -127.0 / safe, 0.0)
        q = np.clip(np.round(xb * iscale[:, None]), -128, 127)
        d = np.where(iscale != 0, 1.0 / np.where(iscale == 0, 1.0, iscale), 0.0)
    else:
        d = np.abs(xb).max(-1) / 127.0
        q = np.round(xb * np.where(d > 0, 1.0 / np.where(d == 0, 1.0, d), 0.0)[:, None])
        if f16_scale:
            d = d.astype(np.float16).astype(np.float64)
    return (q * d[:, None]).reshape(x.shape)


class Simulated(acc.Gemma3F64):
    def __init__(self, path, mode):
        super().__init__(path)
        import gguf

        self.types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
        self.mode, _, lm = mode.partition("+")
        self.exact_lm = lm == "lm"
        assert self.mode in ("exact", "ggml", "per32") and lm in ("", "lm"), mode

    def quantized(self, x, name):
        if self.mode == "exact" or (self.exact_lm and name == "token_embd.weight"):
            return x
        if self.types[name] in ("Q4_K", "Q6_K") and self.mode == "ggml":
            return q8_blocks(x, 256, False, True)
        return q8_blocks(x, 32, True, False)

    def forward(self, ids, rows):
        # accuracy_f64.Gemma3F64.forward with every matmul input quantized and K, V in f16.
        w = self.w
        n = len(ids)
        mm = lambda h, name: self.quantized(h, name) @ w[name].T
        cache = (lambda a: a) if self.mode == "exact" else (lambda a: a.astype(np.float16).astype(np.float64))
        x = w["token_embd.weight"][np.asarray(ids)] * math.sqrt(self.hidden)
        i, j = np.arange(n)[:, None], np.arange(n)[None, :]
        causal = j <= i
        local = causal & (j > i - self.window)
        hd, group = self.head_dim, self.heads // self.kv_heads
        for l in range(self.layers):
            p = f"blk.{l}."
            h = self.norm(x, w[p + "attn_norm.weight"])
            q = mm(h, p + "attn_q.weight").reshape(n, self.heads, hd)
            k = mm(h, p + "attn_k.weight").reshape(n, self.kv_heads, hd)
            v = mm(h, p + "attn_v.weight").reshape(n, self.kv_heads, hd)
            q = self.norm(q, w[p + "attn_q_norm.weight"])
            k = self.norm(k, w[p + "attn_k_norm.weight"])
            theta = self.rope_global if self.is_global(l) else self.rope_local
            q, k = self.rope(q, theta), cache(self.rope(k, theta))
            v = cache(v)
            mask = causal if self.is_global(l) else local
            out = np.empty((n, self.heads, hd))
            for hh in range(self.heads):
                s = (q[:, hh, :] @ k[:, hh // group, :].T) * self.query_scale
                s = np.where(mask, s, -np.inf)
                s = np.exp(s - s.max(-1, keepdims=True))
                out[:, hh, :] = (s / s.sum(-1, keepdims=True)) @ v[:, hh // group, :]
            a = mm(out.reshape(n, self.heads * hd), p + "attn_output.weight")
            x = x + self.norm(a, w[p + "post_attention_norm.weight"])
            h = self.norm(x, w[p + "ffn_norm.weight"])
            g, u = mm(h, p + "ffn_gate.weight"), mm(h, p + "ffn_up.weight")
            g = 0.5 * g * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (g + 0.044715 * g ** 3)))
            x = x + self.norm(mm(g * u, p + "ffn_down.weight"), w[p + "post_ffw_norm.weight"])
        return mm(self.norm(x[np.asarray(rows)], w["output_norm.weight"]), "token_embd.weight")


def main():
    modes = sys.argv[1:] or ["ggml", "per32"]
    fx = json.load(open(FIXTURE))
    for mode in modes:
        model = Simulated(acc.DEFAULT_MODEL, mode)
        d = []
        for case in fx["cases"]:
            row = model.forward(case["ids"], [len(case["ids"]) - 1])[0]
            d.append(float(np.abs(row[case["top"]] - np.array(case["logits"])).max()))
        llama = [c["llama_cpp_d_logit"]["llama.cpp"] for c in fx["cases"]]
        print(f"{mode:10s} first-token d logit over {len(d)} prompts: mean {np.mean(d):.3f} worst {max(d):.3f}"
              f"   (llama.cpp measured: mean {np.mean(llama):.3f} worst {max(llama):.3f})")


if __name__ == "__main__":
    main()
