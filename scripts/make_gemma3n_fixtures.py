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

The config exercises every Gemma 3n text quirk: AltUp with 4 streams, LAuReL, per-layer
embeddings (PLE), 3 KV-consumer layers of both types whose producers are not the layer just
before them, activation sparsity with different p on some layers (one of them a consumer),
per-layer MLP widths, a sliding window (6) shorter than the 16-token prompt, GQA, and random
values in every weight: norms (applied as w, not 1 + w), AltUp coefficients, router, correct
output scale, LAuReL.

Run with the dev venv: scripts/dev-venv.sh, then
  /root/.venvs/ref/bin/python scripts/make_gemma3n_fixtures.py
"""
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


def build_config():
    return Gemma3nTextConfig(
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
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(SEED)
    g = torch.Generator().manual_seed(SEED)
    cfg = build_config()
    model = Gemma3nForCausalLM(cfg).float().eval()
    randomize(model, g)
    model.save_pretrained(OUT, safe_serialization=True)
    for extra in ("generation_config.json",):
        path = os.path.join(OUT, extra)
        if os.path.exists(path):
            os.remove(path)
    st_path = os.path.join(OUT, "model.safetensors")
    tensors = load_file(st_path)
    tensors.update(consumer_kv_weights(cfg, g))
    save_file({k: v.contiguous() for k, v in tensors.items()}, st_path, metadata={"format": "pt"})
    write_gguf(cfg, tensors, os.path.join(OUT, "model.gguf"))

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
    with open(os.path.join(OUT, "reference.json"), "w") as f:
        json.dump(ref, f)
    with open(os.path.join(OUT, "reference_matformer.json"), "w") as f:
        json.dump(matformer_reference(cfg, model, ids), f)
    print("wrote", OUT, file=sys.stderr)


if __name__ == "__main__":
    main()
