#!/usr/bin/env python3
"""Tiny random-weight Gemma 3 text models and their reference logits, from transformers.

Writes fixtures/gemma3_tiny/:
  config.json, model.safetensors   the checkpoint as transformers saves it (f32)
  model.gguf                        the same weights in llama.cpp's GGUF layout (F32, norms stored as 1 + w)
  reference.json                    input ids and logits at every position (float32 forward)

The config exercises every Gemma 3 quirk: a sliding window shorter than the prompt, a global
layer, query_pre_attn_scalar != head_dim, linear RoPE scaling on global layers, GQA, and
random (non-zero) norm weights.

Run with the dev venv: scripts/dev-venv.sh, then
  /root/.venvs/ref/bin/python scripts/make_gemma3_fixtures.py
"""
import json
import os
import sys

import numpy as np
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

import gguf

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "gemma3_tiny")
SEED = 20261129


def build_config():
    return Gemma3TextConfig(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=7,  # pattern 6: layers 0-4 and 6 sliding, layer 5 global
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=24,
        sliding_window=5,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
        hidden_activation="gelu_pytorch_tanh",
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
    )


def randomize(model):
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                # Norm weights are stored as w (applied as 1 + w); keep them around 0.
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.25)


GGUF_NAMES = {
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
}


def gguf_name(hf_name):
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    parts = hf_name.split(".")  # model.layers.N.<module...>.weight
    layer, module = parts[2], ".".join(parts[3:-1])
    return f"blk.{layer}.{GGUF_NAMES[module]}.weight"


def write_gguf(cfg, model, path):
    w = gguf.GGUFWriter(path, "gemma3")
    w.add_name("gemma3-tiny-random")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["full_attention"]["rope_theta"])
    w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    w.add_rope_scaling_factor(cfg.rope_parameters["full_attention"]["factor"])
    w.add_sliding_window(cfg.sliding_window)
    # llama.cpp's generic attention-scale key: GGUF has no query_pre_attn_scalar.
    w.add_attention_scale(float(cfg.query_pre_attn_scalar) ** -0.5)
    for name, p in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied
        a = p.detach().float().numpy().astype(np.float32)
        if name.endswith("norm.weight"):
            a = a + np.float32(1.0)  # llama.cpp's converter stores Gemma norms as 1 + w
        w.add_tensor(gguf_name(name), a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(SEED)
    cfg = build_config()
    model = Gemma3ForCausalLM(cfg).float().eval()
    randomize(model)
    model.save_pretrained(OUT, safe_serialization=True)
    # Keep the folder minimal: config.json + model.safetensors.
    for extra in ("generation_config.json",):
        path = os.path.join(OUT, extra)
        if os.path.exists(path):
            os.remove(path)
    write_gguf(cfg, model, os.path.join(OUT, "model.gguf"))

    rng = np.random.default_rng(SEED)
    ids = [2] + rng.integers(3, cfg.vocab_size, size=15).tolist()  # 16 positions > window 5
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float().numpy()
        # Greedy continuation of 8 tokens, recomputing the full sequence each step.
        seq = list(ids)
        for _ in range(8):
            nxt = int(model(torch.tensor([seq])).logits[0, -1].argmax())
            seq.append(nxt)
    ref = {
        "generator": "scripts/make_gemma3_fixtures.py",
        "transformers": __import__("transformers").__version__,
        "torch": torch.__version__,
        "input_ids": ids,
        "vocab_size": cfg.vocab_size,
        "logits": [[float(v) for v in row] for row in logits],
        "greedy_continuation": seq[len(ids):],
    }
    with open(os.path.join(OUT, "reference.json"), "w") as f:
        json.dump(ref, f)
    print("wrote", OUT, file=sys.stderr)


if __name__ == "__main__":
    main()
