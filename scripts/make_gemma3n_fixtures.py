#!/usr/bin/env python3
"""Tiny random-weight Gemma 3n text decoder and its reference logits, from transformers.

Writes fixtures/gemma3n_tiny/:
  config.json, model.safetensors   the checkpoint as transformers saves it (f32), plus random
                                   k_proj/v_proj/k_norm weights for the KV-consumer layers (the
                                   published checkpoints carry them; transformers ignores them)
  model.gguf                       the same weights in llama.cpp's `gemma3n` GGUF layout (F32,
                                   written with the `gguf` package the way llama.cpp's converter
                                   lays them out: norms stored as w, the three AltUp (un)embedding
                                   projections stacked into one [3, H, H] tensor, activation
                                   sparsity stored as the std multipliers Φ⁻¹(p))
  reference.json                   input ids, logits at every position, an 8-token greedy
                                   continuation (float32 forward, full recomputation each step)
  reference_matformer.json         MatFormer slice of the same checkpoint: narrower per-layer MLP
                                   widths; transformers builds the model at those widths from the
                                   first rows of gate/up and first columns of down, and gives the
                                   logits of the same prompt
  reference_matformer_skip.json    MatFormer slice that also skips layers (Google's MatFormer Lab
                                   recipe, docs/matformer.md): transformers builds the sub-model
                                   from the config with the kept layers only (filtered layer_types
                                   and sparsity, one MLP width per kept layer, fewer KV-shared
                                   layers) and weights cut from the full checkpoint (kept layers
                                   renumbered, their PLE columns and per_layer_model_projection
                                   rows), and gives the logits of the same prompt

The config exercises every Gemma 3n text quirk: AltUp with 4 streams, LAuReL, per-layer
embeddings (PLE), 3 KV-consumer layers of both types whose producers are not the layer just
before them, activation sparsity with different p on some layers (one of them a consumer),
per-layer MLP widths, a sliding window (6) shorter than the 16-token prompt, GQA, and random
values in every weight: norms (applied as w, not 1 + w), AltUp coefficients, router, correct
output scale, LAuReL.

Run with the dev venv: scripts/dev-venv.sh, then
  /root/.venvs/ref/bin/python scripts/make_gemma3n_fixtures.py
Options: --out DIR writes somewhere else; --skip-reference-only reads the committed checkpoint
(config.json + model.safetensors), checks it still reproduces reference.json, and (re)writes only
reference_matformer_skip.json.
"""
import argparse
import json
import os
import sys

import numpy as np
import torch
import gguf
from safetensors.torch import load_file, save_file
from transformers import Gemma3nForCausalLM, Gemma3nTextConfig

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "gemma3n_tiny")
SEED = 20261130

S, F = "sliding_attention", "full_attention"


def build_config(**overrides):
    args = dict(
        vocab_size=256,
        vocab_size_per_layer_input=256,
        hidden_size=32,
        hidden_size_per_layer_input=8,
        intermediate_size=[32, 48, 32, 64, 48, 32, 56, 48],
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        # Layers 5-7 are consumers: 5 and 7 (full) read layer 2, 6 (sliding) reads layer 4.
        layer_types=[S, S, F, S, S, F, S, F],
        num_kv_shared_layers=3,
        sliding_window=6,
        laurel_rank=4,
        altup_num_inputs=4,
        activation_sparsity_pattern=[0.95, 0.8, 0.0, 0.6, 0.0, 0.0, 0.9, 0.0],
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        final_logit_softcapping=30.0,
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
        hidden_activation="gelu_pytorch_tanh",
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
    )
    args.update(overrides)
    return Gemma3nTextConfig(**args)


def is_scale(name):
    # Multipliers that default to 1 (or 0 for correct_output_scale): keep them around 1.
    return "norm" in name or name.endswith("correct_output_scale")


def randomize(model, g):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_scale(name):
                p.copy_(1.0 + torch.randn(p.shape, generator=g) * 0.3)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.25)


def consumer_kv_weights(cfg, g):
    """The K/V weights the published checkpoints still hold for consumer layers."""
    first = cfg.num_hidden_layers - cfg.num_kv_shared_layers
    kv = cfg.num_key_value_heads * cfg.head_dim
    extra = {}
    for i in range(first, cfg.num_hidden_layers):
        p = f"model.layers.{i}.self_attn."
        extra[p + "k_proj.weight"] = torch.randn(kv, cfg.hidden_size, generator=g) * 0.25
        extra[p + "v_proj.weight"] = torch.randn(kv, cfg.hidden_size, generator=g) * 0.25
        extra[p + "k_norm.weight"] = 1.0 + torch.randn(cfg.head_dim, generator=g) * 0.3
    return extra


MATFORMER_WIDTHS = [16, 32, 32, 48, 16, 16, 32, 48]


def matformer_reference(cfg, model, ids):
    """Logits of the MatFormer slice: per-layer widths MATFORMER_WIDTHS, weights sliced from `model`."""
    sliced_cfg = build_config()
    sliced_cfg.intermediate_size = list(MATFORMER_WIDTHS)
    sliced = Gemma3nForCausalLM(sliced_cfg).float().eval()
    state = {}
    for name, p in model.state_dict().items():
        if ".mlp." in name:
            layer = int(name.split(".")[2])
            w = MATFORMER_WIDTHS[layer]
            p = p[:, :w] if "down_proj" in name else p[:w, :]
        state[name] = p.clone()
    missing, unexpected = sliced.load_state_dict(state, strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing), (missing, unexpected)
    sliced.tie_weights()
    with torch.no_grad():
        logits = sliced(torch.tensor([ids]), use_cache=False).logits[0].float().numpy()
    return {
        "generator": "scripts/make_gemma3n_fixtures.py",
        "intermediate_size": MATFORMER_WIDTHS,
        "input_ids": ids,
        "vocab_size": cfg.vocab_size,
        "logits": [[float(v) for v in row] for row in logits],
    }


# Skips two producer layers that no consumer reads (1, 3: both sparse) and one consumer (5, full),
# keeping both KV sources (2 full, 4 sliding) and a consumer of each type (6 sliding, 7 full).
MATFORMER_SKIP = [1, 3, 5]
# One width per kept layer 0, 2, 4, 6, 7 (stored: 32, 32, 48, 56, 48).
MATFORMER_SKIP_WIDTHS = [16, 32, 24, 40, 48]


def skip_config(cfg, skip, widths):
    """The sub-model's config by the MatFormer Lab rule, generalised from E4B's fixed indices:
    kept layers keep their own attention type and sparsity, each KV-shared layer skipped lowers
    num_kv_shared_layers by one, and the KV source layers of kept consumers may not be skipped."""
    n = cfg.num_hidden_layers
    kept = [i for i in range(n) if i not in skip]
    first_shared = n - cfg.num_kv_shared_layers
    sources = {t: max(i for i in range(first_shared) if cfg.layer_types[i] == t) for t in set(cfg.layer_types)}
    for i in kept:
        if i >= first_shared:
            assert sources[cfg.layer_types[i]] in kept, f"layer {i} reads a skipped source"
    assert len(widths) == len(kept)
    sub = build_config(
        num_hidden_layers=len(kept),
        intermediate_size=list(widths),
        layer_types=[cfg.layer_types[i] for i in kept],
        activation_sparsity_pattern=[cfg.activation_sparsity_pattern[i] for i in kept],
        num_kv_shared_layers=cfg.num_kv_shared_layers - sum(1 for i in skip if i >= first_shared),
    )
    return sub, kept


def skip_weights(cfg, state, kept, widths):
    """The full checkpoint's tensors cut to the kept layers, as the MatFormer Lab slices them."""
    n, p = cfg.num_hidden_layers, cfg.hidden_size_per_layer_input
    renumber = {old: new for new, old in enumerate(kept)}
    out = {}
    for name, t in state.items():
        if name.startswith("model.layers."):
            old = int(name.split(".")[2])
            if old not in renumber:
                continue
            new = renumber[old]
            name = name.replace(f"model.layers.{old}.", f"model.layers.{new}.", 1)
            if "mlp.down_proj" in name:
                t = t[:, : widths[new]]
            elif "mlp.gate_proj" in name or "mlp.up_proj" in name:
                t = t[: widths[new], :]
        elif name == "model.embed_tokens_per_layer.weight":
            t = t.reshape(t.shape[0], n, p)[:, kept, :].reshape(t.shape[0], -1)
        elif name == "model.per_layer_model_projection.weight":
            t = t.reshape(n, p, t.shape[1])[kept].reshape(-1, t.shape[1])
        out[name] = t.clone().contiguous()
    return out


def matformer_skip_reference(cfg, model, ids):
    """Logits of the sub-model that skips MATFORMER_SKIP, built by transformers from its config."""
    sub_cfg, kept = skip_config(cfg, MATFORMER_SKIP, MATFORMER_SKIP_WIDTHS)
    sliced = Gemma3nForCausalLM(sub_cfg).float().eval()
    state = skip_weights(cfg, model.state_dict(), kept, MATFORMER_SKIP_WIDTHS)
    missing, unexpected = sliced.load_state_dict(state, strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing), (missing, unexpected)
    sliced.tie_weights()
    with torch.no_grad():
        logits = sliced(torch.tensor([ids]), use_cache=False).logits[0].float().numpy()
    return {
        "generator": "scripts/make_gemma3n_fixtures.py",
        "layers_to_skip": MATFORMER_SKIP,
        "kept_layers": kept,
        "intermediate_size": MATFORMER_SKIP_WIDTHS,
        "layer_types": list(sub_cfg.layer_types),
        "activation_sparsity_pattern": list(sub_cfg.activation_sparsity_pattern),
        "num_kv_shared_layers": sub_cfg.num_kv_shared_layers,
        "input_ids": ids,
        "vocab_size": cfg.vocab_size,
        "logits": [[float(v) for v in row] for row in logits],
    }


def write_skip_reference_from_checkpoint(out):
    """The skip reference from the committed checkpoint, after checking it reproduces reference.json."""
    cfg = build_config()
    model = Gemma3nForCausalLM(cfg).float().eval()
    state = load_file(os.path.join(out, "model.safetensors"))
    own = model.state_dict()
    missing, _ = model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    assert all(k == "lm_head.weight" for k in missing), missing
    model.tie_weights()
    with open(os.path.join(out, "reference.json")) as f:
        ref = json.load(f)
    ids = ref["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids]), use_cache=False).logits[0].float().numpy()
    drift = float(np.abs(logits - np.array(ref["logits"], dtype=np.float32)).max())
    assert drift < 1e-5, f"the checkpoint no longer reproduces reference.json ({drift})"
    with open(os.path.join(out, "reference_matformer_skip.json"), "w") as f:
        json.dump(matformer_skip_reference(cfg, model, ids), f)


GGUF_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "per_layer_input_gate": "inp_gate",
    "per_layer_projection": "proj",
    "post_per_layer_input_norm": "post_norm",
    "altup.correction_coefs": "altup_correct_coef",
    "altup.correct_output_scale": "altup_correct_scale",
    "altup.prediction_coefs": "altup_predict_coef",
    "altup.modality_router": "altup_router",
    "altup.router_norm": "altup_router_norm",
    "laurel.linear_left": "laurel_l",
    "laurel.linear_right": "laurel_r",
    "laurel.post_laurel_norm": "laurel_post_norm",
}
GGUF_TOP_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.embed_tokens_per_layer.weight": "per_layer_token_embd.weight",
    "model.per_layer_model_projection.weight": "per_layer_model_proj.weight",
    "model.per_layer_projection_norm.weight": "per_layer_proj_norm.weight",
    "model.norm.weight": "output_norm.weight",
}


def gguf_name(hf_name):
    if hf_name in GGUF_TOP_NAMES:
        return GGUF_TOP_NAMES[hf_name]
    parts = hf_name.split(".")  # model.layers.N.<module...>[.weight]
    layer = parts[2]
    module = ".".join(parts[3:-1] if parts[-1] == "weight" else parts[3:])
    return f"blk.{layer}.{GGUF_LAYER_NAMES[module]}.weight"


def write_gguf(cfg, tensors, path):
    w = gguf.GGUFWriter(path, "gemma3n")
    w.add_name("gemma3n-tiny-random")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(list(cfg.intermediate_size))
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["full_attention"]["rope_theta"])
    w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    w.add_sliding_window(cfg.sliding_window)
    w.add_altup_active_idx(cfg.altup_active_idx)
    w.add_altup_num_inputs(cfg.altup_num_inputs)
    w.add_embedding_length_per_layer_input(cfg.hidden_size_per_layer_input)
    w.add_shared_kv_layers(cfg.num_kv_shared_layers)
    normal = torch.distributions.normal.Normal(0, 1)
    w.add_activation_sparsity_scale(
        [normal.icdf(torch.tensor(p, dtype=torch.float32)).item() for p in cfg.activation_sparsity_pattern]
    )
    w.add_sliding_window_pattern([t == S for t in cfg.layer_types])
    stacked = {"model.altup_projections": [], "model.altup_unembed_projections": []}
    for name, t in tensors.items():
        a = t.detach().float().numpy().astype(np.float32)
        stack = name.rsplit(".", 2)[0]
        if stack in stacked:
            stacked[stack].append((int(name.split(".")[-2]), a))
            continue
        w.add_tensor(gguf_name(name), a)
    for stack, gname in (("model.altup_projections", "altup_proj.weight"),
                         ("model.altup_unembed_projections", "altup_unembd_proj.weight")):
        mats = [a for _, a in sorted(stacked[stack], key=lambda x: x[0])]
        w.add_tensor(gname, np.stack(mats, axis=0))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=OUT)
    parser.add_argument("--skip-reference-only", action="store_true")
    args = parser.parse_args()
    out = args.out
    if args.skip_reference_only:
        write_skip_reference_from_checkpoint(out)
        print("wrote", os.path.join(out, "reference_matformer_skip.json"), file=sys.stderr)
        return
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(SEED)
    g = torch.Generator().manual_seed(SEED)
    cfg = build_config()
    model = Gemma3nForCausalLM(cfg).float().eval()
    randomize(model, g)
    model.save_pretrained(out, safe_serialization=True)
    for extra in ("generation_config.json",):
        path = os.path.join(out, extra)
        if os.path.exists(path):
            os.remove(path)
    st_path = os.path.join(out, "model.safetensors")
    tensors = load_file(st_path)
    tensors.update(consumer_kv_weights(cfg, g))
    save_file({k: v.contiguous() for k, v in tensors.items()}, st_path, metadata={"format": "pt"})
    write_gguf(cfg, tensors, os.path.join(out, "model.gguf"))

    rng = np.random.default_rng(SEED)
    ids = [2] + rng.integers(3, cfg.vocab_size, size=15).tolist()  # 16 positions > window 6
    with torch.no_grad():
        logits = model(torch.tensor([ids]), use_cache=False).logits[0].float().numpy()
        seq = list(ids)
        for _ in range(8):
            nxt = int(model(torch.tensor([seq]), use_cache=False).logits[0, -1].argmax())
            seq.append(nxt)
    ref = {
        "generator": "scripts/make_gemma3n_fixtures.py",
        "transformers": __import__("transformers").__version__,
        "torch": torch.__version__,
        "input_ids": ids,
        "vocab_size": cfg.vocab_size,
        "logits": [[float(v) for v in row] for row in logits],
        "greedy_continuation": seq[len(ids):],
        # Φ⁻¹(p) as the sparsity cutoff computes it (torch Normal(0, 1).icdf), in float64.
        "normal_icdf": [
            [p, float(torch.distributions.normal.Normal(0.0, 1.0).icdf(torch.tensor(p, dtype=torch.float64)))]
            for p in (1e-6, 0.001, 0.02, 0.05, 0.3, 0.5, 0.6, 0.8, 0.9, 0.95, 0.975, 0.999, 1 - 1e-6)
        ],
    }
    with open(os.path.join(out, "reference.json"), "w") as f:
        json.dump(ref, f)
    with open(os.path.join(out, "reference_matformer.json"), "w") as f:
        json.dump(matformer_reference(cfg, model, ids), f)
    with open(os.path.join(out, "reference_matformer_skip.json"), "w") as f:
        json.dump(matformer_skip_reference(cfg, model, ids), f)
    print("wrote", out, file=sys.stderr)


if __name__ == "__main__":
    main()
