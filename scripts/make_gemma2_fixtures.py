#!/usr/bin/env python3
"""A tiny random-weight Gemma 2 text model and its reference logits, from transformers.

Writes fixtures/gemma2_tiny/:
  config.json, model.safetensors   the checkpoint as transformers saves it (f32)
  model.gguf                        the same weights in llama.cpp's GGUF layout (architecture
                                    "gemma2", F32, norms stored as 1 + w)
  reference.json                    input ids and logits at every position (float32 forward,
                                    eager attention: sdpa would ignore the attention soft-cap)

The config exercises every Gemma 2 quirk: sliding layers (even indices, transformers'
default `layer_types`) with a window shorter than the prompt and global layers between them,
query_pre_attn_scalar != head_dim (and head_dim != hidden / heads), GQA, a RoPE base other
than the default, random (non-zero) norm weights, and both soft-caps set low enough that they
change the logits of this random model (the script checks that they do).

Run with the reference venv:
  /root/.venvs/ref/bin/python scripts/make_gemma2_fixtures.py
"""
import json
import os
import sys

import numpy as np
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM

import gguf

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "gemma2_tiny")
SEED = 20261207
PROMPT_LEN = 24  # > sliding_window: the sliding layers' rings wrap


def build_config(**overrides):
    args = dict(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=5,  # layers 0, 2, 4 sliding; 1, 3 global
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=24,
        sliding_window=5,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 20_000.0},
        hidden_activation="gelu_pytorch_tanh",
        attn_logit_softcapping=2.0,
        final_logit_softcapping=4.0,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
    )
    args.update(overrides)
    cfg = Gemma2Config(**args)
    cfg._attn_implementation = "eager"
    return cfg


def randomize(model):
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                # Norm weights are stored as w (applied as 1 + w); keep them around 0.
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.25)


# transformers module path inside `model.layers.N.` -> llama.cpp's name inside `blk.N.`
# (gguf.MODEL_TENSORS[MODEL_ARCH.GEMMA2]: Gemma 2 has no q/k norms).
GGUF_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
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
    # The metadata llama.cpp's converter (convert_hf_to_gguf.py, Gemma2Model) writes, plus the
    # RoPE base (llama.cpp's generic key; the converter leaves the default 10 000 implicit)
    # and the score scale (llama.cpp derives it from the model size; GGUF has no
    # query_pre_attn_scalar, so the generic attention.scale key carries it, as for Gemma 3).
    w = gguf.GGUFWriter(path, "gemma2")
    w.add_name("gemma2-tiny-random")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
    w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    w.add_sliding_window(cfg.sliding_window)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_attention_scale(float(cfg.query_pre_attn_scalar) ** -0.5)
    for name, p in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied (the converter skips it too)
        a = p.detach().float().numpy().astype(np.float32)
        if name.endswith("norm.weight"):
            a = a + np.float32(1.0)  # llama.cpp's converter stores Gemma norms as 1 + w
        w.add_tensor(gguf_name(name), a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def logits_of(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(SEED)
    cfg = build_config()
    assert cfg.layer_types == [
        "sliding_attention",
        "full_attention",
        "sliding_attention",
        "full_attention",
        "sliding_attention",
    ], cfg.layer_types
    model = Gemma2ForCausalLM(cfg).float().eval()
    randomize(model)
    model.save_pretrained(OUT, safe_serialization=True)
    # Keep the folder minimal: config.json + model.safetensors.
    for extra in ("generation_config.json",):
        path = os.path.join(OUT, extra)
        if os.path.exists(path):
            os.remove(path)
    write_gguf(cfg, model, os.path.join(OUT, "model.gguf"))

    rng = np.random.default_rng(SEED)
    ids = [2] + rng.integers(3, cfg.vocab_size, size=PROMPT_LEN - 1).tolist()
    logits = logits_of(model, ids)

    # Both caps must matter for this model, or the test would not notice one missing.
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        uncapped = Gemma2ForCausalLM(build_config(**{key: None})).float().eval()
        uncapped.load_state_dict(model.state_dict())
        diff = float(np.abs(logits_of(uncapped, ids) - logits).max())
        print(f"without {key}: max |logit diff| {diff:.3f}", file=sys.stderr)
        assert diff > 0.1, f"{key} does not bite ({diff})"

    with torch.no_grad():
        # Greedy continuation of 8 tokens, recomputing the full sequence each step.
        seq = list(ids)
        for _ in range(8):
            nxt = int(model(torch.tensor([seq])).logits[0, -1].argmax())
            seq.append(nxt)
    ref = {
        "generator": "scripts/make_gemma2_fixtures.py",
        "transformers": __import__("transformers").__version__,
        "torch": torch.__version__,
        "attn_implementation": cfg._attn_implementation,
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
