#!/usr/bin/env python3
"""A random-weight Gemma 3n vision tower at the REAL `mobilenetv5_300m_enc` shape, as a Hugging
Face folder (for timing only; never committed).

Writes OUT/config.json (transformers' default `Gemma3nConfig`: the E4B-like text config, hidden
TEXT_HIDDEN, `vision_soft_tokens_per_image` 256), OUT/preprocessor_config.json (the published
Gemma 3n image processor: 768x768, rescale only) and OUT/model.safetensors holding only
`model.vision_tower.timm_model.*` (timm's own init of `mobilenetv5_300m_enc`, stored as bf16 like
the published checkpoints, 294M parameters, ~590 MB) and `model.embed_vision.*` (f32).

  ~/.venvs/ref/bin/python scripts/make_gemma3n_vision_bench_model.py OUT [--text-hidden N]
"""
import argparse
import json
import os

import timm
import torch
from safetensors.torch import save_file
from transformers import Gemma3nConfig


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--text-hidden", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    os.makedirs(a.out, exist_ok=True)
    tower = timm.create_model("mobilenetv5_300m_enc").eval()
    tensors = {f"model.vision_tower.timm_model.{k}": v.to(torch.bfloat16).contiguous()
               for k, v in tower.state_dict().items()}
    cfg = Gemma3nConfig()
    cfg.text_config.hidden_size = a.text_hidden
    vh, vv = cfg.vision_config.hidden_size, cfg.vision_config.vocab_size
    g = torch.Generator().manual_seed(a.seed)
    tensors.update({
        "model.embed_vision.embedding.weight": torch.randn(vv, vh, generator=g) * 0.02,
        "model.embed_vision.hard_embedding_norm.weight": torch.ones(vh),
        "model.embed_vision.soft_embedding_norm.weight": torch.ones(vh),
        "model.embed_vision.embedding_projection.weight": torch.randn(a.text_hidden, vh, generator=g) * vh**-0.5,
    })
    save_file(tensors, os.path.join(a.out, "model.safetensors"), metadata={"format": "pt"})
    config = cfg.to_dict()
    config["architectures"] = ["Gemma3nForConditionalGeneration"]
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    with open(os.path.join(a.out, "preprocessor_config.json"), "w") as f:
        json.dump({
            "do_normalize": False, "do_rescale": True, "do_resize": True, "image_mean": [0.5] * 3,
            "image_std": [0.5] * 3, "image_processor_type": "SiglipImageProcessor", "resample": 2,
            "rescale_factor": 1 / 255, "size": {"height": 768, "width": 768}, "image_seq_length": 256,
        }, f, indent=2)
    n = sum(v.numel() for k, v in tensors.items() if "vision_tower" in k)
    print(f"wrote {a.out}: {n} tower parameters")


if __name__ == "__main__":
    main()
