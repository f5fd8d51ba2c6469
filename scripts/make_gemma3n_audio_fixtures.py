#!/usr/bin/env python3
"""Tiny random-weight Gemma 3n with an audio tower, and its reference outputs, from transformers.

Builds a `Gemma3nForConditionalGeneration` from transformers' own config classes: the USM audio
tower with the real block structure (two SSCP conv blocks with cumulative group norm, conformer
blocks with half-step FFNs, chunked local attention with relative positions and the 50 softcap,
the causal depthwise light conv, reduction 4) at reduced widths (hidden 32, 4 heads, SSCP
channels 8 and 4, 3 conformer blocks), the real 128-bin front end, and a tiny text decoder with
every Gemma 3n text quirk (the decoder of scripts/make_gemma3n_fixtures.py with a 400-token
vocabulary: ids 256-383 are the vision "hard" vocabulary, 384-399 the audio one, as the published
checkpoints place theirs after the text vocabulary).

Writes fixtures/gemma3n_audio_tiny/:
  config.json, model.safetensors   the checkpoint in the published layout (`model.language_model.*`,
                                   `model.audio_tower.*`, `model.embed_audio.*`, `model.embed_vision.*`;
                                   f32). The MobileNet-V5 vision tower is left out: its random 300M
                                   weights are not needed for audio and would weigh 1.2 GB.
  reference.json                   per clip: the encoder's output (`audio_tower` last_hidden_state),
                                   the SSCP output, the projected soft tokens (`get_audio_features`),
                                   and logits at every position of two prompts (float32, eager):
                                   an audio-only prompt (<start_of_audio>, the audio tokens,
                                   <end_of_audio>) and an audio clip between text.
The encoder's input is the reference feature extractor's output for the committed clips of
fixtures/audio (ref/<clip>.features.f32.bin, made by scripts/make_audio_fixtures.py), so that the
front end and the encoder are checked separately and together.

Run with the dev venv (scripts/dev-venv.sh; timm is needed because transformers builds the vision
tower with it), then
  ~/.venvs/ref/bin/python scripts/make_gemma3n_audio_fixtures.py
"""
import json
import os
import sys

import numpy as np
import torch
import transformers
from safetensors.torch import save_file
from transformers import (
    Gemma3nAudioConfig,
    Gemma3nConfig,
    Gemma3nForConditionalGeneration,
    Gemma3nTextConfig,
    Gemma3nVisionConfig,
)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "fixtures", "gemma3n_audio_tiny")
AUDIO = os.path.join(ROOT, "fixtures", "audio")
SEED = 20261206

S, F = "sliding_attention", "full_attention"

TEXT_VOCAB = 256
VISION_OFFSET, VISION_VOCAB = 256, 128
AUDIO_OFFSET, AUDIO_VOCAB = 384, 16
VOCAB = AUDIO_OFFSET + AUDIO_VOCAB  # 400
BOI, EOI, IMAGE = 250, VISION_OFFSET, VISION_OFFSET + 1
BOA, EOA, AUDIO_TOKEN = 251, AUDIO_OFFSET, AUDIO_OFFSET + 1
# The reference pads every clip's soft tokens to this many (188 for the published 30 s); small
# here so that a 2 s clip (13 tokens) exercises the padding.
SOFT_TOKENS_PER_CLIP = 16

CLIPS = ["speech_16k_mono", "clipping_16k_mono", "speech_8k_mono"]


def build_config():
    text = Gemma3nTextConfig(
        vocab_size=VOCAB,
        vocab_size_per_layer_input=TEXT_VOCAB,
        hidden_size=32,
        hidden_size_per_layer_input=8,
        intermediate_size=[32, 48, 32, 64, 48, 32, 56, 48],
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
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
    audio = Gemma3nAudioConfig(
        vocab_size=AUDIO_VOCAB,
        vocab_offset=AUDIO_OFFSET,
        input_feat_size=128,
        hidden_size=32,
        rms_norm_eps=1e-6,
        conf_attention_chunk_size=12,
        conf_attention_context_left=13,
        conf_attention_context_right=0,
        conf_attention_logit_cap=50.0,
        conf_num_attention_heads=4,
        conf_num_hidden_layers=3,
        conf_conv_kernel_size=5,
        conf_reduction_factor=4,
        conf_residual_weight=0.5,
        sscp_conv_channel_size=[8, 4],
        sscp_conv_group_norm_eps=1e-3,
    )
    vision = Gemma3nVisionConfig(vocab_size=VISION_VOCAB, vocab_offset=VISION_OFFSET)
    return Gemma3nConfig(
        text_config=text,
        vision_config=vision,
        audio_config=audio,
        audio_soft_tokens_per_image=SOFT_TOKENS_PER_CLIP,
        vision_soft_tokens_per_image=256,
        boi_token_id=BOI,
        eoi_token_id=EOI,
        image_token_id=IMAGE,
        boa_token_id=BOA,
        eoa_token_id=EOA,
        audio_token_id=AUDIO_TOKEN,
        tie_word_embeddings=True,
    )


def randomize(model, g):
    """Random values in every saved weight. Norm weights and the cumulative group norm's scale
    around 1 (they multiply), the attention's per-dim scale around 0 (softplus of it scales q);
    matrices scaled by 1/sqrt(fan-in) so activations stay O(1) through the conformer."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("model.vision_tower."):
                continue
            if "norm" in name or name.endswith("correct_output_scale"):
                p.copy_(1.0 + torch.randn(p.shape, generator=g) * 0.3)
            elif name.endswith("per_dim_scale"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif name.startswith("model.audio_tower.") or name.startswith("model.embed_audio.embedding_projection"):
                fan_in = int(np.prod(p.shape[1:])) if p.dim() > 1 else p.shape[0]
                p.copy_(torch.randn(p.shape, generator=g) * (1.5 / fan_in**0.5))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.25)


def consumer_kv_weights(cfg, g):
    """The K/V weights the published checkpoints still hold for consumer layers."""
    t = cfg.text_config
    first = t.num_hidden_layers - t.num_kv_shared_layers
    kv = t.num_key_value_heads * t.head_dim
    extra = {}
    for i in range(first, t.num_hidden_layers):
        p = f"model.language_model.layers.{i}.self_attn."
        extra[p + "k_proj.weight"] = torch.randn(kv, t.hidden_size, generator=g) * 0.25
        extra[p + "v_proj.weight"] = torch.randn(kv, t.hidden_size, generator=g) * 0.25
        extra[p + "k_norm.weight"] = 1.0 + torch.randn(t.head_dim, generator=g) * 0.3
    return extra


def load_features(name):
    with open(os.path.join(AUDIO, "reference.json")) as f:
        clips = {c["name"]: c for c in json.load(f)["clips"]}
    c = clips[name]
    feats = np.fromfile(os.path.join(AUDIO, c["features"]), dtype="<f4").reshape(c["features_shape"])
    mask = np.fromfile(os.path.join(AUDIO, c["mask"]), dtype=np.uint8).astype(bool)
    assert mask.all(), "single clips have no padded frames"
    return c, feats, mask


def flat(a):
    return [float(v) for v in np.asarray(a, dtype=np.float32).reshape(-1)]


def clip_reference(model, cfg, name, rng):
    clip, feats, mask = load_features(name)
    x = torch.from_numpy(feats).unsqueeze(0)
    m = torch.from_numpy(mask).unsqueeze(0)
    with torch.no_grad():
        tower = model.model.audio_tower
        sscp = tower.subsample_conv_projection(x)[0].numpy()
        enc = tower(x, ~m)
        hidden = enc.last_hidden_state[0].numpy()
        soft = model.model.get_audio_features(x, ~m).pooler_output[0].numpy()
        n_tokens = hidden.shape[0]
        assert n_tokens <= SOFT_TOKENS_PER_CLIP, (name, n_tokens)
        audio_block = [BOA] + [AUDIO_TOKEN] * SOFT_TOKENS_PER_CLIP + [EOA]
        prompts = {
            "audio_only": [2] + audio_block,
            "between_text": [2] + rng.integers(3, 250, size=5).tolist() + audio_block
            + rng.integers(3, 250, size=4).tolist(),
        }
        logits = {}
        for kind, ids in prompts.items():
            out = model(
                input_ids=torch.tensor([ids]),
                input_features=x,
                input_features_mask=m,
                use_cache=False,
            )
            logits[kind] = {"input_ids": ids, "logits": flat(out.logits[0])}
    return {
        "name": name,
        "features": clip["features"],
        "features_shape": list(feats.shape),
        "sscp_shape": list(sscp.shape),
        "sscp": flat(sscp),
        "encoder_shape": list(hidden.shape),
        "encoder": flat(hidden),
        "soft_tokens_shape": list(soft.shape),
        "soft_tokens": flat(soft),
        "prompts": logits,
    }


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(SEED)
    g = torch.Generator().manual_seed(SEED)
    cfg = build_config()
    cfg.text_config._attn_implementation = "eager"
    model = Gemma3nForConditionalGeneration(cfg).float().eval()
    model.config._attn_implementation = "eager"
    model.model.language_model.config._attn_implementation = "eager"
    randomize(model, g)

    tensors = {
        k: v.contiguous()
        for k, v in model.state_dict().items()
        if not k.startswith("model.vision_tower.") and k != "lm_head.weight"
    }
    tensors.update(consumer_kv_weights(cfg, g))
    save_file(tensors, os.path.join(OUT, "model.safetensors"), metadata={"format": "pt"})
    config = cfg.to_dict()
    config["architectures"] = ["Gemma3nForConditionalGeneration"]
    with open(os.path.join(OUT, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)

    rng = np.random.default_rng(SEED)
    ref = {
        "generator": "scripts/make_gemma3n_audio_fixtures.py",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "vocab_size": VOCAB,
        "audio_token_id": AUDIO_TOKEN,
        "soft_tokens_per_clip": SOFT_TOKENS_PER_CLIP,
        "clips": [clip_reference(model, cfg, name, rng) for name in CLIPS],
    }
    with open(os.path.join(OUT, "reference.json"), "w") as f:
        json.dump(ref, f)
    print("wrote", OUT, file=sys.stderr)


if __name__ == "__main__":
    main()
