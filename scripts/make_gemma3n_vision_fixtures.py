#!/usr/bin/env python3
"""Tiny random-weight Gemma 3n with the MobileNet-V5 vision tower, and its reference outputs.

Everything is built by transformers' and timm's own classes: a `Gemma3nForConditionalGeneration`
whose vision tower is timm's `mobilenetv5_300m_enc` with `model_args={"channel_multiplier":
0.0625}` (the real block structure: stem, 3 edge-residual blocks, 5 + 37 + 39 UIR / mobile-MQA
blocks, the MSFA to 2048x16x16; widths 8/16/40/80 instead of 128/256/640/1280; the attention
head counts and dims are not scaled by timm, so 12x64 with 2x2-downsampled K/V in stage 2 and
16x96 in stage 3 as in the real tower), and the audio tower, tiny text decoder, tokenizer and chat
template of scripts/make_gemma3n_audio_fixtures.py (imported from there, not copied).

The vision tower's weights are rounded to bfloat16 and stored as BF16 (the published checkpoints
keep the tower in bf16 too; it halves the file); the reference runs in float32 on exactly those
rounded values. Everything else is F32.

Writes fixtures/gemma3n_vision_tiny/:
  config.json, model.safetensors   the checkpoint in the published layout (`model.vision_tower.timm_model.*`,
                                   `model.embed_vision.*`, `model.audio_tower.*`, `model.embed_audio.*`,
                                   `model.language_model.*`)
  tokenizer.json, tokenizer_config.json, chat_template.jinja, preprocessor_config.json
  reference.json                   shapes, ids, prompts; the tensors are in ref/*.bin
  ref/*.bin                        little-endian, C order: *.u8.bin pixels as u8 [3,768,768]
                                   (value/255 is the tower's input), *.f32.bin float32

The image cases: each image's pixels are the reference processor's `pixel_values` (768x768, bilinear,
rescale 1/255, no mean/std) rounded to the u8 grid (the processor's own values are recorded next to
them: `processor_max_abs_diff`); the tower and every logits prompt below are run on the rounded
values, so a Rust test can feed the stored u8 pixels and expect the stored outputs exactly.

Run with the dev venv (scripts/dev-venv.sh), then
  ~/.venvs/ref/bin/python scripts/make_gemma3n_vision_fixtures.py
"""
import json
import os
import sys
import tempfile

import numpy as np
import torch
import transformers
from PIL import Image
from safetensors.torch import save_file
from transformers import (
    Gemma3nAudioFeatureExtractor,
    Gemma3nConfig,
    Gemma3nForConditionalGeneration,
    Gemma3nProcessor,
    Gemma3nVisionConfig,
    SiglipImageProcessor,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_gemma3n_audio_fixtures as audio_fx  # noqa: E402  (tokenizer, template, text/audio config)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "fixtures", "gemma3n_vision_tiny")
IMAGES = os.path.join(ROOT, "fixtures", "images")
SEED = 20261207
CHANNEL_MULTIPLIER = 0.0625
IMAGE_SIZE = 768
TOKENS_PER_IMAGE = 256

IMAGE_A = "rgb_300x200.png"
IMAGE_B = "rgb_q90_200x150.jpg"
CLIP = "speech_16k_mono"


def build_config():
    base = audio_fx.build_config()
    vision = Gemma3nVisionConfig(
        architecture="mobilenetv5_300m_enc",
        model_args={"channel_multiplier": CHANNEL_MULTIPLIER},
        vocab_size=audio_fx.VISION_VOCAB,
        vocab_offset=audio_fx.VISION_OFFSET,
    )
    d = base.to_dict()
    d["vision_config"] = vision.to_dict()
    d["vision_soft_tokens_per_image"] = TOKENS_PER_IMAGE
    return Gemma3nConfig.from_dict(d)


def randomize_vision(model, g):
    """Random tower weights that keep activations O(1) through 81 blocks: convs ~ N(0, 1/fan_in),
    norm weights around 1, layer-scale gammas in [0.1, 0.6] (timm inits them at 1e-5, which would
    make every block almost the identity), the stem bias small. Rounded to bf16."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("model.vision_tower."):
                continue
            if name.endswith("layer_scale.gamma"):
                v = 0.1 + 0.5 * torch.rand(p.shape, generator=g)
            elif p.dim() == 1 and (".bn" in name or "norm" in name):
                v = 1.0 + torch.randn(p.shape, generator=g) * 0.3
            elif p.dim() == 1:
                v = torch.randn(p.shape, generator=g) * 0.1
            else:
                fan_in = int(np.prod(p.shape[1:]))
                v = torch.randn(p.shape, generator=g) * (1.0 / fan_in**0.5)
            p.copy_(v.bfloat16().float())


def image_processor():
    # The published google/gemma-3n-* preprocessor: SigLIP's, 768x768 bilinear, rescale only.
    return SiglipImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        resample=2,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=False,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_convert_rgb=True,
    )


def load_image(name):
    return Image.open(os.path.join(IMAGES, name)).convert("RGB")


def to_u8_grid(pixel_values):
    """[n,3,H,W] float → (u8 array, rounded float tensor, max |diff|)."""
    pv = pixel_values.float()
    u8 = torch.clamp(torch.round(pv * 255), 0, 255).to(torch.uint8)
    rounded = u8.float() / 255
    return u8.numpy(), rounded, float((rounded - pv).abs().max())


def write(rel, array, dtype):
    path = os.path.join(OUT, rel)
    np.ascontiguousarray(np.asarray(array, dtype=dtype)).tofile(path)
    return rel


def main():
    os.makedirs(os.path.join(OUT, "ref"), exist_ok=True)
    torch.manual_seed(SEED)
    g = torch.Generator().manual_seed(SEED)
    cfg = build_config()
    cfg.text_config._attn_implementation = "eager"
    model = Gemma3nForConditionalGeneration(cfg).float().eval()
    model.config._attn_implementation = "eager"
    model.model.language_model.config._attn_implementation = "eager"
    audio_fx.randomize(model, g)  # everything but the vision tower (embed_vision included)
    randomize_vision(model, g)

    tensors = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight":
            continue
        v = v.contiguous()
        tensors[k] = v.bfloat16() if k.startswith("model.vision_tower.") else v
    tensors.update(audio_fx.consumer_kv_weights(cfg, g))
    save_file(tensors, os.path.join(OUT, "model.safetensors"), metadata={"format": "pt"})
    config = cfg.to_dict()
    config["architectures"] = ["Gemma3nForConditionalGeneration"]
    with open(os.path.join(OUT, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)

    with tempfile.TemporaryDirectory() as td:
        tok = audio_fx.build_tokenizer(td)
    template = audio_fx.chat_template()
    processor = Gemma3nProcessor(
        feature_extractor=Gemma3nAudioFeatureExtractor(),
        image_processor=image_processor(),
        tokenizer=tok,
        chat_template=template,
        audio_seq_length=audio_fx.SOFT_TOKENS_PER_CLIP,
        image_seq_length=TOKENS_PER_IMAGE,
    )
    tok.save_pretrained(OUT)
    with open(os.path.join(OUT, "chat_template.jinja"), "w") as f:
        f.write(template)
    processor.image_processor.to_json_file(os.path.join(OUT, "preprocessor_config.json"))
    for extra in ("special_tokens_map.json", "tokenizer.model"):
        path = os.path.join(OUT, extra)
        if os.path.exists(path):
            os.remove(path)

    # Pixels: the reference processor's, rounded to the u8 grid.
    images = {}
    for name in (IMAGE_A, IMAGE_B):
        pv = processor.image_processor(images=[load_image(name)], return_tensors="pt")["pixel_values"]
        assert tuple(pv.shape) == (1, 3, IMAGE_SIZE, IMAGE_SIZE), pv.shape
        u8, rounded, diff = to_u8_grid(pv)
        stem = os.path.splitext(name)[0]
        images[name] = {
            "file": f"fixtures/images/{name}",
            "pixels_u8": write(f"ref/{stem}.pixels.u8.bin", u8[0], np.uint8),
            "shape": [3, IMAGE_SIZE, IMAGE_SIZE],
            "processor_max_abs_diff": diff,
            "_tensor": rounded,
        }

    # The tower, the scaled soft tokens and embed_vision on image A.
    px = images[IMAGE_A]["_tensor"]
    with torch.no_grad():
        tower = model.model.vision_tower(pixel_values=px, do_pooling=False, return_dict=True).last_hidden_state
        assert tuple(tower.shape) == (1, 2048, 16, 16), tower.shape
        scaled = tower.reshape(1, 2048, TOKENS_PER_IMAGE).permute(0, 2, 1) * (2048**0.5)
        soft = model.model.get_image_features(px).pooler_output
        assert torch.allclose(soft, model.model.embed_vision(inputs_embeds=scaled), atol=1e-5)
        hard_ids = [audio_fx.EOI, audio_fx.VISION_OFFSET + 1, audio_fx.VISION_OFFSET + audio_fx.VISION_VOCAB - 1]
        hard = model.model.embed_vision(input_ids=torch.tensor([hard_ids]))
    tower_ref = {
        "image": IMAGE_A,
        "tower": write("ref/tower.f32.bin", tower[0].numpy(), "<f4"),
        "tower_shape": [2048, 16, 16],
        "tower_scaled": write("ref/tower_scaled.f32.bin", scaled[0].numpy(), "<f4"),
        "tower_scaled_shape": [TOKENS_PER_IMAGE, 2048],
        "soft_tokens": write("ref/soft_tokens.f32.bin", soft[0].numpy(), "<f4"),
        "soft_tokens_shape": list(soft[0].shape),
        "hard_ids": hard_ids,
        "hard_embeddings": [float(v) for v in hard[0].numpy().reshape(-1)],
        "hard_embeddings_shape": list(hard[0].shape),
    }

    # Three chat prompts through the reference processor and chat template.
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    signal = audio_fx.load_signal(CLIP)
    cases = {
        "image_only": ([{"type": "image", "image": IMAGE_A}], [IMAGE_A], []),
        "two_images": (
            [{"type": "image", "image": IMAGE_A}, {"type": "image", "image": IMAGE_B},
             {"type": "text", "text": "Describe this image."}],
            [IMAGE_A, IMAGE_B],
            [],
        ),
        "image_audio_text": (
            [{"type": "image", "image": IMAGE_A}, {"type": "text", "text": "What is said in this recording?"},
             {"type": "audio", "audio": CLIP}, {"type": "text", "text": "Who is speaking?"}],
            [IMAGE_A],
            [CLIP],
        ),
    }
    prompts = {}
    for kind, (content, image_names, clips) in cases.items():
        # The template only looks at each part's type.
        messages = [{"role": "user", "content": [{k: v for k, v in p.items() if k in ("type", "text")}
                                                  for p in content]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        kwargs = {}
        if image_names:
            kwargs["images"] = [[load_image(n) for n in image_names]]
        if clips:
            kwargs["audio"] = [signal]
        # As apply_chat_template(tokenize=True) calls it: the template already wrote <bos>.
        inputs = processor(text=prompt, return_tensors="pt", add_special_tokens=False, **kwargs)
        ids = inputs["input_ids"][0].tolist()
        if image_names:
            _, rounded, _ = to_u8_grid(inputs["pixel_values"])
            expect = torch.cat([images[n]["_tensor"] for n in image_names])
            assert torch.equal(rounded, expect), kind
            inputs["pixel_values"] = rounded
        with torch.no_grad():
            out = model(**inputs, use_cache=False)
        logits = out.logits[0].float().numpy()
        assert ids.count(audio_fx.IMAGE) == TOKENS_PER_IMAGE * len(image_names), kind
        prompts[kind] = {
            "content": content,
            "images": image_names,
            "audio": [f"fixtures/audio/{c}.wav" for c in clips],
            "prompt": prompt,
            "input_ids": ids,
            "logits": write(f"ref/{kind}.logits.f32.bin", logits, "<f4"),
            "logits_shape": list(logits.shape),
        }

    for v in images.values():
        del v["_tensor"]
    ref = {
        "generator": "scripts/make_gemma3n_vision_fixtures.py",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "timm": __import__("timm").__version__,
        "vision_architecture": "mobilenetv5_300m_enc",
        "channel_multiplier": CHANNEL_MULTIPLIER,
        "vocab_size": audio_fx.VOCAB,
        "image_token_id": audio_fx.IMAGE,
        "boi_token_id": audio_fx.BOI,
        "eoi_token_id": audio_fx.EOI,
        "audio_token_id": audio_fx.AUDIO_TOKEN,
        "boa_token_id": audio_fx.BOA,
        "eoa_token_id": audio_fx.EOA,
        "tokens_per_image": TOKENS_PER_IMAGE,
        "audio_tokens_per_clip": audio_fx.SOFT_TOKENS_PER_CLIP,
        "images": images,
        "tower": tower_ref,
        "prompts": prompts,
    }
    with open(os.path.join(OUT, "reference.json"), "w") as f:
        json.dump(ref, f, indent=1)
    print("wrote", OUT, file=sys.stderr)


if __name__ == "__main__":
    main()
