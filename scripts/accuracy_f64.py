#!/usr/bin/env python3
"""Accuracy of gemma-rs and llama.cpp against a float64 reference, on the real default model.

The reference is Gemma 3 run forward in float64 with NumPy on every tensor of the GGUF file
dequantized by the `gguf` package (so it measures what the engines add to the quantized
weights: activation quantization, f16 KV cache, f32 arithmetic, attention kernels), not the
distance to the unquantized model.

  # once: the NumPy forward against transformers' Gemma3ForCausalLM in float64 (same weights)
  /root/.venvs/ref/bin/python scripts/accuracy_f64.py check [--model M.gguf]
  # everything: tokenize, reference, both engines, metrics, markdown for BENCHMARKS.md
  cargo build --release -p gemma-engine --example accuracy_logits
  /root/.venvs/ref/bin/python scripts/accuracy_f64.py run \\
      --gemma target/release/examples/accuracy_logits \\
      --llama-python /work/llama-build/venv-py/bin/python [--out /tmp/accuracy]
  # (internal) llama.cpp's side, run by `run` in the venv that has llama-cpp-python
  PYTHON scripts/accuracy_f64.py llama MODEL REQUEST.json OUT.json

Prompts: fixtures/accuracy/prompts.json. Token ids come from our tokenizer (the example's
`tokenize`), and llama.cpp's tokenizer must give the same ids. Positions evaluated: the last
min(64, n - 1) positions of each prompt (a position p scores the prediction of token p + 1;
the last one is the next token after the prompt).

Metric, per position: over the reference's 10 highest logits (token set T),
  d_logit   = max_{t in T} |logit_engine(t) - logit_ref(t)|
  d_logprob = the same on log-probabilities (logit - logsumexp of the whole row), which
              ignores a shift common to all logits;
top-1 agreement: the engine's argmax over the whole vocabulary is the reference's.
Each engine runs in two ways:
  prefill: the whole prompt in batches of 512 from position 0, logits of every position asked;
  decode:  the prompt up to the first evaluated position prefilled, then one token per
           forward pass (teacher-forced), as generation feeds sampled tokens.
plus `prefill_last` (only the last row asked, as for the first generated token), reported for
the final position.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
PROMPTS = os.path.join(ROOT, "fixtures", "accuracy", "prompts.json")
DEFAULT_MODEL = os.path.join(
    os.environ.get("GEMMA_CACHE_DIR")
    or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "gemma-rs"),
    "models",
    "gemma-3-270m-q4_k_m.gguf",
)
MODEL_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
EVAL_LAST = 64
TOP = 10
DECISIVE = 0.5  # a reference top-2 gap above this makes a top-1 mismatch a real one


# ---------------------------------------------------------------- float64 reference (NumPy)

class Gemma3F64:
    """Gemma 3 (text) forward in float64 on the GGUF's dequantized tensors."""

    def __init__(self, path):
        import gguf

        reader = gguf.GGUFReader(path)
        field = lambda k: reader.fields[k].contents()
        arch = field("general.architecture")
        assert arch == "gemma3", arch
        self.hidden = int(field("gemma3.embedding_length"))
        self.layers = int(field("gemma3.block_count"))
        self.heads = int(field("gemma3.attention.head_count"))
        self.kv_heads = int(field("gemma3.attention.head_count_kv"))
        self.head_dim = int(field("gemma3.attention.key_length"))
        self.ffn = int(field("gemma3.feed_forward_length"))
        self.eps = float(field("gemma3.attention.layer_norm_rms_epsilon"))
        self.window = int(field("gemma3.attention.sliding_window"))
        self.rope_global = float(field("gemma3.rope.freq_base"))
        # Not in the GGUF: llama.cpp and transformers hard-code these for Gemma 3.
        self.rope_local = 10000.0
        self.pattern = 6  # every 6th layer is global
        self.query_scale = self.head_dim ** -0.5  # query_pre_attn_scalar = 256 for the 270M
        self.w = {}
        for t in reader.tensors:
            data = gguf.quants.dequantize(t.data, t.tensor_type)
            self.w[t.name] = np.ascontiguousarray(data, dtype=np.float64)
        self.vocab = self.w["token_embd.weight"].shape[0]

    def is_global(self, layer):
        return (layer + 1) % self.pattern == 0

    def norm(self, x, w):
        # GGUF (llama.cpp's converter) stores Gemma's norm weights as 1 + w already.
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * w

    def rope(self, x, theta):
        # x: (n, heads, d); NeoX-style half rotation (transformers' rotate_half).
        n, _, d = x.shape
        inv = theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)
        ang = np.arange(n, dtype=np.float64)[:, None] * inv[None, :]
        cos = np.cos(np.concatenate([ang, ang], -1))[:, None, :]
        sin = np.sin(np.concatenate([ang, ang], -1))[:, None, :]
        half = d // 2
        rot = np.concatenate([-x[..., half:], x[..., :half]], -1)
        return x * cos + rot * sin

    def forward(self, ids, rows):
        """Logits (float64) of the positions `rows` after the prompt `ids`."""
        w = self.w
        n = len(ids)
        x = w["token_embd.weight"][np.asarray(ids)] * math.sqrt(self.hidden)
        i = np.arange(n)[:, None]
        j = np.arange(n)[None, :]
        causal = j <= i
        local = causal & (j > i - self.window)
        hd = self.head_dim
        group = self.heads // self.kv_heads
        for l in range(self.layers):
            p = f"blk.{l}."
            h = self.norm(x, w[p + "attn_norm.weight"])
            q = (h @ w[p + "attn_q.weight"].T).reshape(n, self.heads, hd)
            k = (h @ w[p + "attn_k.weight"].T).reshape(n, self.kv_heads, hd)
            v = (h @ w[p + "attn_v.weight"].T).reshape(n, self.kv_heads, hd)
            q = self.norm(q, w[p + "attn_q_norm.weight"])
            k = self.norm(k, w[p + "attn_k_norm.weight"])
            theta = self.rope_global if self.is_global(l) else self.rope_local
            q = self.rope(q, theta)
            k = self.rope(k, theta)
            mask = causal if self.is_global(l) else local
            out = np.empty((n, self.heads, hd))
            for hh in range(self.heads):
                kv = hh // group
                s = (q[:, hh, :] @ k[:, kv, :].T) * self.query_scale
                s = np.where(mask, s, -np.inf)
                s = np.exp(s - s.max(-1, keepdims=True))
                s /= s.sum(-1, keepdims=True)
                out[:, hh, :] = s @ v[:, kv, :]
            a = out.reshape(n, self.heads * hd) @ w[p + "attn_output.weight"].T
            x = x + self.norm(a, w[p + "post_attention_norm.weight"])
            h = self.norm(x, w[p + "ffn_norm.weight"])
            g = h @ w[p + "ffn_gate.weight"].T
            u = h @ w[p + "ffn_up.weight"].T
            g = 0.5 * g * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (g + 0.044715 * g ** 3)))
            d = (g * u) @ w[p + "ffn_down.weight"].T
            x = x + self.norm(d, w[p + "post_ffw_norm.weight"])
        h = self.norm(x[np.asarray(rows)], w["output_norm.weight"])
        return h @ w["token_embd.weight"].T  # tied embeddings, no softcap


def check(args):
    """The NumPy forward against transformers' Gemma3ForCausalLM in float64, same weights."""
    import torch
    import transformers
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    from transformers.models.gemma3 import modeling_gemma3 as mg

    ref = Gemma3F64(args.model)
    cfg = Gemma3TextConfig(
        vocab_size=ref.vocab, hidden_size=ref.hidden, intermediate_size=ref.ffn,
        num_hidden_layers=ref.layers, num_attention_heads=ref.heads,
        num_key_value_heads=ref.kv_heads, head_dim=ref.head_dim, rms_norm_eps=ref.eps,
        sliding_window=ref.window, query_pre_attn_scalar=ref.head_dim,
        max_position_embeddings=32768, tie_word_embeddings=True,
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": ref.rope_global},
            "sliding_attention": {"rope_type": "default", "rope_theta": ref.rope_local},
        },
        attn_implementation="eager",
    )
    print("layer types:", "".join("G" if t == "full_attention" else "l" for t in cfg.layer_types))

    # transformers keeps a few steps in float32 even in a float64 model (norms, softmax,
    # RoPE angles, the embedding scale); make them float64 so the comparison is exact math.
    def norm_forward(self, x):
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)) * (1.0 + self.weight)

    def rope_forward(self, x, position_ids, layer_type):
        theta = self.config.rope_parameters[layer_type]["rope_theta"]
        d = self.config.head_dim
        inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        freqs = position_ids[..., None].to(torch.float64) * inv
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    orig_softmax = torch.nn.functional.softmax

    def softmax64(x, dim=None, dtype=None, **kw):
        return orig_softmax(x, dim=dim, dtype=torch.float64 if dtype is not None else None, **kw)

    mg.Gemma3RMSNorm.forward = norm_forward
    mg.Gemma3RotaryEmbedding.forward = rope_forward
    mg.nn.functional.softmax = softmax64

    torch.set_default_dtype(torch.float64)
    model = Gemma3ForCausalLM(cfg).eval()
    names = {
        "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
        "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
        "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",
        "attn_norm.weight": "input_layernorm.weight", "post_attention_norm.weight": "post_attention_layernorm.weight",
        "ffn_norm.weight": "pre_feedforward_layernorm.weight", "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
        "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
        "ffn_down.weight": "mlp.down_proj.weight",
    }
    state = {}
    for name, t in ref.w.items():
        if name == "token_embd.weight":
            hf = "model.embed_tokens.weight"
        elif name == "output_norm.weight":
            hf = "model.norm.weight"
        else:
            _, l, rest = name.split(".", 2)
            hf = f"model.layers.{l}.{names[rest]}"
        value = torch.from_numpy(ref.w[name])
        state[hf] = value - 1.0 if hf.endswith("norm.weight") else value  # HF stores w, not 1 + w
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.model.embed_tokens.embed_scale = torch.tensor(math.sqrt(ref.hidden), dtype=torch.float64)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    prompts = json.load(open(PROMPTS))["prompts"]
    # A short prompt, and a long one whose last rows see past the sliding window.
    gemma_ids = json.load(open(args.ids))["ids"] if args.ids else None
    # llama.cpp's ids of "The capital of France is" (fixtures/gemma3_270m/ids.json).
    first = json.load(open(os.path.join(ROOT, "fixtures", "gemma3_270m", "ids.json")))["prompts"][0]
    cases = [(repr(first["text"]), first["ids"])]
    if gemma_ids:
        longest = max(range(len(gemma_ids)), key=lambda i: len(gemma_ids[i]))
        cases.append((prompts[longest]["name"] + "[:600]", gemma_ids[longest][:600]))
    worst = 0.0
    for name, ids in cases:
        rows = list(range(max(0, len(ids) - 4), len(ids)))
        t = time.time()
        ours = ref.forward(ids, rows)
        t_np = time.time() - t
        with torch.no_grad():
            theirs = model(torch.tensor([ids]), logits_to_keep=len(rows)).logits[0].numpy()
        diff = float(np.abs(ours - theirs).max())
        worst = max(worst, diff)
        print(f"{name}: {len(ids)} tokens, rows {rows[0]}..{rows[-1]}: max |numpy - transformers| "
              f"= {diff:.3e} (logits up to {np.abs(theirs).max():.1f}; numpy {t_np:.1f} s); "
              f"argmax {ours[-1].argmax()} / {theirs[-1].argmax()}")
    print(f"transformers {transformers.__version__}, torch {torch.__version__}: worst {worst:.3e}")
    if worst > 1e-8:
        sys.exit("the NumPy forward does not match transformers in float64")


# ---------------------------------------------------------------- llama.cpp (its own venv)

def llama(args):
    import llama_cpp

    req = json.load(open(args.request))
    out = {"version": llama_cpp.__version__, "runs": {}}
    for label, fa in (("llama.cpp", True), ("llama.cpp FA off", False)):
        llm = llama_cpp.Llama(model_path=args.model, n_ctx=4096, logits_all=True,
                              flash_attn=fa, verbose=False)
        out["params"] = {"n_batch": llm.n_batch, "n_ubatch": llm.context_params.n_ubatch,
                         "n_threads": llm.n_threads, "n_threads_batch": llm.n_threads_batch,
                         "type_k": int(llm.context_params.type_k), "type_v": int(llm.context_params.type_v)}
        n_vocab = llm.n_vocab()
        if label == "llama.cpp":
            out["ids"] = [llm.tokenize(p["text"].encode("utf-8"), add_bos=True, special=True)
                          for p in req["prompts"]]
            out["system_info"] = llama_cpp.llama_print_system_info().decode()

        def last_row():
            return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,)).copy()

        cases = []
        for case in req["cases"]:
            ids, positions, cands = case["ids"], case["positions"], case["candidates"]
            first = positions[0]
            t = time.time()
            llm.reset()
            llm._logits_all = True
            llm.eval(ids)
            prefill = [row_result(llm.scores[p].astype(np.float64), c) for p, c in zip(positions, cands)]
            llm.reset()
            llm._logits_all = False
            llm.eval(ids)
            prefill_last = row_result(last_row(), cands[-1])
            llm.reset()
            llm.eval(ids[:first])
            decode = []
            for p, c in zip(positions, cands):
                llm.eval([ids[p]])
                decode.append(row_result(last_row(), c))
            cases.append({"prefill": prefill, "prefill_last": prefill_last, "decode": decode,
                          "seconds": time.time() - t})
        out["runs"][label] = {"flash_attn": fa, "cases": cases}
        del llm
    out["request"] = req
    json.dump(out, open(args.out, "w"))


def row_result(row, cands):
    row = np.asarray(row, dtype=np.float64)
    best = int(np.argmax(row))
    m = row[best]
    return {"logits": [float(row[c]) for c in cands], "argmax": best, "argmax_logit": float(m),
            "logsumexp": float(m + np.log(np.exp(row - m).sum()))}


# ---------------------------------------------------------------- the whole run

def category(n):
    return "short (≤ 100)" if n <= 100 else ("medium (101–512)" if n <= 512 else "long (> 512)")


def run(args):
    os.makedirs(args.out, exist_ok=True)
    prompts = json.load(open(PROMPTS))["prompts"]
    assert len(prompts) >= 12

    # 1. Our tokenizer's ids.
    tok = subprocess.run([args.gemma, "tokenize", args.model, PROMPTS], check=True,
                         capture_output=True, text=True).stdout
    ids = json.loads(tok.strip().splitlines()[-1])["ids"]
    json.dump({"ids": ids}, open(os.path.join(args.out, "ids.json"), "w"))

    # 2. The float64 reference: top-10 of the last positions (cached in --out).
    ref_path = os.path.join(args.out, "reference.json")
    ref = json.load(open(ref_path)) if os.path.exists(ref_path) else None
    if ref is None or ref["ids"] != ids:
        model = Gemma3F64(args.model)
        ref = {"ids": ids, "cases": []}
        for p, tokens in zip(prompts, ids):
            n = len(tokens)
            positions = list(range(n - min(EVAL_LAST, n - 1), n))
            t = time.time()
            logits = model.forward(tokens, positions)
            rows = []
            for row in logits:
                top = np.argsort(-row, kind="stable")[:TOP]
                m = row.max()
                rows.append({"top": [int(i) for i in top], "logits": [float(row[i]) for i in top],
                             "logsumexp": float(m + np.log(np.exp(row - m).sum())),
                             "margin": float(row[top[0]] - row[top[1]])})
            ref["cases"].append({"name": p["name"], "positions": positions, "rows": rows})
            print(f"reference {p['name']}: {n} tokens, {time.time() - t:.1f} s", file=sys.stderr)
        json.dump(ref, open(ref_path, "w"))

    request = {"prompts": prompts, "cases": [
        {"ids": tokens, "positions": c["positions"], "candidates": [r["top"] for r in c["rows"]]}
        for tokens, c in zip(ids, ref["cases"])]}
    req_path = os.path.join(args.out, "request.json")
    json.dump(request, open(req_path, "w"))

    # 3. gemma-rs, default load options.
    gemma_out = os.path.join(args.out, "gemma.json")
    if args.reuse_gemma and os.path.exists(gemma_out) and json.load(open(gemma_out))["request"] == request:
        gemma = json.load(open(gemma_out))
    else:
        t = time.time()
        g = subprocess.run([args.gemma, "eval", args.model, req_path], check=True,
                           capture_output=True, text=True).stdout
        gemma = json.loads(g.strip().splitlines()[-1])
        gemma["request"] = request
        json.dump(gemma, open(gemma_out, "w"))
        print(f"gemma-rs: {time.time() - t:.1f} s", file=sys.stderr)

    # 4. llama.cpp, in its own venv (reused from --out when it was run on the same request).
    engines = {"gemma-rs": gemma["cases"]}
    llama_out = os.path.join(args.out, "llama.json")
    lcpp, mismatched = None, []
    if args.llama_python != "none":
        stale = True
        if os.path.exists(llama_out):
            stale = json.load(open(llama_out)).get("request") != request
        if stale:
            t = time.time()
            subprocess.run([args.llama_python, os.path.abspath(__file__), "llama", args.model, req_path,
                            llama_out], check=True)
            print(f"llama.cpp: {time.time() - t:.1f} s", file=sys.stderr)
        lcpp = json.load(open(llama_out))
        mismatched = [p["name"] for p, a, b in zip(prompts, ids, lcpp["ids"]) if a != b]
        for label, r in lcpp["runs"].items():
            engines[label] = r["cases"]

    # 5. Metrics.
    results = {"prompts": [], "engines": {}}
    for name, cases in engines.items():
        for mode in ("prefill", "decode", "prefill_last"):
            per_prompt = []
            for p, tokens, rc, ec in zip(prompts, ids, ref["cases"], cases):
                rows = ec[mode] if mode != "prefill_last" else [ec[mode]]
                refs = rc["rows"] if mode != "prefill_last" else [rc["rows"][-1]]
                dl, dp, agree, decisive_miss = [], [], 0, 0
                for r, e in zip(refs, rows):
                    want = np.array(r["logits"])
                    got = np.array(e["logits"])
                    dl.append(float(np.abs(got - want).max()))
                    dp.append(float(np.abs((got - e["logsumexp"]) - (want - r["logsumexp"])).max()))
                    ok = e["argmax"] == r["top"][0]
                    agree += ok
                    decisive_miss += (not ok) and r["margin"] > DECISIVE
                per_prompt.append({"name": p["name"], "lang": p["lang"], "tokens": len(tokens),
                                   "category": category(len(tokens)), "d_logit": dl, "d_logprob": dp,
                                   "agree": agree, "positions": len(rows), "decisive_miss": decisive_miss})
            results["engines"].setdefault(name, {})[mode] = per_prompt
    for p, tokens in zip(prompts, ids):
        results["prompts"].append({"name": p["name"], "lang": p["lang"], "tokens": len(tokens)})
    results["llama_cpp"] = {k: lcpp[k] for k in ("version", "params", "system_info")} if lcpp else None
    results["tokenization_mismatches"] = mismatched
    json.dump(results, open(os.path.join(args.out, "results.json"), "w"), indent=1)
    if lcpp:
        write_fixture(prompts, ids, ref, engines)
    print(markdown(results, prompts, ids, ref))


FIXTURE = os.path.join(ROOT, "fixtures", "accuracy", "reference_f64.json")
FIXTURE_MAX_TOKENS = 128


def write_fixture(prompts, ids, ref, engines):
    """The float64 top-10 after each prompt of up to FIXTURE_MAX_TOKENS tokens, with llama.cpp's
    distance there (the first token of a generation: `prefill_last`), for the Rust test."""
    cases = []
    for i, (p, tokens, rc) in enumerate(zip(prompts, ids, ref["cases"])):
        if len(tokens) > FIXTURE_MAX_TOKENS:
            continue
        r = rc["rows"][-1]
        llama_d = {}
        for name, ec in engines.items():
            if name.startswith("llama.cpp"):
                e = ec[i]["prefill_last"]
                llama_d[name] = float(np.abs(np.array(e["logits"]) - np.array(r["logits"])).max())
        cases.append({"name": p["name"], "text": p["text"], "ids": tokens, "top": r["top"],
                      "logits": r["logits"], "margin": r["margin"], "llama_cpp_d_logit": llama_d})
    json.dump({"generator": "scripts/accuracy_f64.py run", "model_sha256": MODEL_SHA256,
               "about": "float64 NumPy forward of the dequantized GGUF; top-10 logits of the "
                        "position after the prompt", "cases": cases},
              open(FIXTURE, "w"), ensure_ascii=False, indent=1)


def summarize(per_prompt):
    dl = [x for p in per_prompt for x in p["d_logit"]]
    dp = [x for p in per_prompt for x in p["d_logprob"]]
    n = sum(p["positions"] for p in per_prompt)
    agree = sum(p["agree"] for p in per_prompt)
    miss = sum(p["decisive_miss"] for p in per_prompt)
    return dl, dp, n, agree, miss


def markdown(results, prompts, ids, ref):
    eng = results["engines"]
    names = list(eng)
    out = []
    npos = sum(len(c["positions"]) for c in ref["cases"])
    out.append(f"{len(prompts)} prompts, {sum(len(t) for t in ids)} tokens, {npos} positions scored "
               f"(the last min(64, n − 1) of each). d = max over the reference's top-10 tokens of "
               f"|engine − reference|, in logits and in log-probabilities; mean, 99th percentile and worst "
               f"over positions. Decisive misses: top-1 differs where the reference's top-2 gap exceeds {DECISIVE}.")
    out.append("")
    out.append("| engine | run | positions | mean d logit | p99 d logit | worst d logit | mean d log-prob | worst d log-prob | top-1 agree | decisive misses |")
    out.append("|---|---|---|---|---|---|---|---|---|---|")
    for name in names:
        for mode in ("prefill", "decode", "prefill_last"):
            dl, dp, n, agree, miss = summarize(eng[name][mode])
            out.append(f"| {name} | {mode} | {n} | {np.mean(dl):.4f} | {np.percentile(dl, 99):.4f} | {max(dl):.4f} | "
                       f"{np.mean(dp):.4f} | {max(dp):.4f} | {agree}/{n} ({100 * agree / n:.1f} %) | {miss} |")
    out.append("")
    out.append("By prompt length (prefill / decode), mean and worst d logit, top-1 agreement:")
    out.append("")
    cats = ["short (≤ 100)", "medium (101–512)", "long (> 512)"]
    out.append("| category | prompts | " + " | ".join(f"{n} prefill | {n} decode" for n in names) + " |")
    out.append("|---|---|" + "---|---|" * len(names))
    for cat in cats:
        cells = []
        count = sum(1 for p in eng[names[0]]["prefill"] if p["category"] == cat)
        if count == 0:
            continue
        for name in names:
            for mode in ("prefill", "decode"):
                dl, dp, n, agree, miss = summarize([p for p in eng[name][mode] if p["category"] == cat])
                cells.append(f"{np.mean(dl):.3f} / {max(dl):.3f} / {100 * agree / n:.0f} %")
        out.append(f"| {cat} | {count} | " + " | ".join(cells) + " |")
    out.append("")
    out.append("Per prompt, worst d logit over its positions (prefill / decode), and top-1 agreements:")
    out.append("")
    out.append("| prompt | lang | tokens | " + " | ".join(f"{n}" for n in names) + " |")
    out.append("|---|---|---|" + "---|" * len(names))
    for i, p in enumerate(results["prompts"]):
        cells = []
        for name in names:
            a = eng[name]["prefill"][i]
            b = eng[name]["decode"][i]
            cells.append(f"{max(a['d_logit']):.3f} / {max(b['d_logit']):.3f} "
                         f"({a['agree']}+{b['agree']}/{a['positions'] + b['positions']})")
        out.append(f"| {p['name']} | {p['lang']} | {p['tokens']} | " + " | ".join(cells) + " |")
    out.append("")
    lc = results["llama_cpp"]
    try:
        commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        commit += " (with uncommitted changes)" if dirty else ""
    except OSError:
        commit = "?"
    cpu, flags = "?", set()
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name") and cpu == "?":
            cpu = line.split(":", 1)[1].strip()
        if line.startswith("flags") and not flags:
            flags = set(line.split(":", 1)[1].split())
    simd = " ".join(f for f in ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
                                "avx512_vnni", "avx512_bf16", "avx_vnni") if f in flags)
    out.append(f"gemma-rs commit {commit}; CPU {cpu}, {os.cpu_count()} cores, instruction sets: {simd}.")
    if lc:
        out.append(f"llama.cpp: llama-cpp-python {lc['version']}, {lc['params']}; "
                   f"tokenization mismatches with ours: {results['tokenization_mismatches'] or 'none'}.")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check")
    c.add_argument("--model", default=DEFAULT_MODEL)
    c.add_argument("--ids", help="ids.json of a run, to also check its longest prompt's first 600 tokens")
    r = sub.add_parser("run")
    r.add_argument("--model", default=DEFAULT_MODEL)
    r.add_argument("--gemma", default=os.path.join(ROOT, "target", "release", "examples", "accuracy_logits"))
    r.add_argument("--llama-python", required=True, help="python of the llama-cpp-python venv, or none")
    r.add_argument("--out", default="/tmp/accuracy")
    r.add_argument("--reuse-gemma", action="store_true",
                   help="reuse gemma-rs's logits from --out when they answer the same request")
    l = sub.add_parser("llama")
    l.add_argument("model")
    l.add_argument("request")
    l.add_argument("out")
    args = ap.parse_args()
    {"check": check, "run": run, "llama": llama}[args.cmd](args)


if __name__ == "__main__":
    main()
