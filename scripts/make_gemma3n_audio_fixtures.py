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
  tokenizer.json, tokenizer_config.json, chat_template.jinja
                                   a tiny SentencePiece BPE tokenizer trained here (as
                                   scripts/make_gemma3_vision_fixtures.py trains its own) with Gemma
                                   3n's media pieces at this vocabulary's ids: <start_of_image>=250
                                   <start_of_audio>=251 <end_of_image>=256 <image_soft_token>=257
                                   <end_of_audio>=384 <audio_soft_token>=385, converted by
                                   transformers' GemmaTokenizer; and Gemma 3n's chat template: the
                                   Gemma 3 template of fixtures/tokenizer with the media branch of the
                                   published google/gemma-3n-E4B-it template (an audio part writes
                                   <audio_soft_token>, an image part <image_soft_token>)
  reference.json                   per clip: the encoder's output (`audio_tower` last_hidden_state),
                                   the SSCP output, the projected soft tokens (`get_audio_features`),
                                   and logits at every position of two prompts (float32, eager):
                                   an audio-only prompt (<start_of_audio>, the audio tokens,
                                   <end_of_audio>) and an audio clip between text.
  reference.json "chat"            a chat request (one audio part, then a text part) rendered by the
                                   chat template and run through Gemma3nProcessor (audio_seq_length
                                   16): the prompt text, the processor's input_ids, logits at every
                                   position, and the greedy continuation (model.generate, 12 tokens, EOS,
                                   <end_of_turn> and the media ids suppressed)
                                   with its decoded text
The encoder's input is the reference feature extractor's output for the committed clips of
fixtures/audio (ref/<clip>.features.f32.bin, made by scripts/make_audio_fixtures.py), so that the
front end and the encoder are checked separately and together.

Run with the dev venv (scripts/dev-venv.sh; timm is needed because transformers builds the vision
tower with it), then
  ~/.venvs/ref/bin/python scripts/make_gemma3n_audio_fixtures.py
"""
import io
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.torch import save_file
from transformers import (
    Gemma3nAudioConfig,
    Gemma3nAudioFeatureExtractor,
    Gemma3nProcessor,
    GemmaTokenizer,
    SiglipImageProcessor,
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
CHAT_CLIP = "speech_16k_mono"
CHAT_TEXT = "Transcribe this audio."
GEMMA3_TEMPLATE = os.path.join(ROOT, "fixtures", "tokenizer", "gemma3_chat_template.jinja")

# ---------------------------------------------------------------------------------------------
# Tokenizer and chat template
# ---------------------------------------------------------------------------------------------
PARAGRAPHS = [
    """Transcribe this audio. Translate this audio into French. Translate this audio into German.
What is said in this recording? Summarise the speech in one sentence. Who is speaking?
The cat sat on the mat. The dog ran in the park. A bird is flying over the tree.
one two three four five six seven eight nine ten 0 1 2 3 4 5 6 7 8 9
user model system hello world good morning thanks! Describe this image.
""",
    "<start_of_turn>user\nTranscribe this audio.<end_of_turn>\n<start_of_turn>model\nHello world.<end_of_turn>\n",
    "First line.\nSecond line.\n\nNew paragraph.\n\nAnother one.\n",
]
# Media pieces at their ids; the gaps are unused pieces.
MEDIA_PIECES = {
    BOI: "<start_of_image>",
    BOA: "<start_of_audio>",
    EOI: "<end_of_image>",
    IMAGE: "<image_soft_token>",
    EOA: "<end_of_audio>",
    AUDIO_TOKEN: "<audio_soft_token>",
}
SPECIAL_IDS = [0, 1, 2, 3, 4, 5, 6] + sorted(MEDIA_PIECES)


def build_tokenizer(workdir):
    """Train a tiny SentencePiece BPE model of BOI pieces, append the media and unused pieces up to
    VOCAB, and let transformers' GemmaTokenizer convert it (tokenizer.json)."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(PARAGRAPHS * 8),
        model_writer=buf,
        model_type="bpe",
        vocab_size=BOI,
        hard_vocab_limit=False,
        character_coverage=1.0,
        byte_fallback=False,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        user_defined_symbols=["<mask>", "<start_of_turn>", "<end_of_turn>"],
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        num_threads=1,
        minloglevel=2,
    )
    proto = pb.ModelProto()
    proto.ParseFromString(buf.getvalue())
    unused = 0
    while len(proto.pieces) < VOCAB:
        p = proto.pieces.add()
        i = len(proto.pieces) - 1
        if i in MEDIA_PIECES:
            p.piece = MEDIA_PIECES[i]
        else:
            p.piece = f"<unused{unused}>"
            unused += 1
        p.score, p.type = 0.0, pb.ModelProto.SentencePiece.USER_DEFINED
    assert len(proto.pieces) == VOCAB
    spm_path = Path(workdir) / "tokenizer.model"
    spm_path.write_bytes(proto.SerializeToString())
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {
            str(i): {"content": proto.pieces[i].piece, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": True}
            for i in SPECIAL_IDS
        },
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "mask_token": "<mask>",
        "clean_up_tokenization_spaces": False,
        "extra_special_tokens": {
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
            "boa_token": "<start_of_audio>",
            "eoa_token": "<end_of_audio>",
            "audio_token": "<audio_soft_token>",
        },
        "model_max_length": 512,
        "padding_side": "left",
        "processor_class": "Gemma3nProcessor",
        "spaces_between_special_tokens": False,
        "tokenizer_class": "GemmaTokenizer",
    }
    (Path(workdir) / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    tok = GemmaTokenizer.from_pretrained(str(workdir))
    tok.init_kwargs.pop("vocab_file", None)
    names = [MEDIA_PIECES[i] for i in sorted(MEDIA_PIECES)]
    assert tok.convert_tokens_to_ids(names) == sorted(MEDIA_PIECES), tok.convert_tokens_to_ids(names)
    assert tok.audio_token_id == AUDIO_TOKEN and tok.boa_token == "<start_of_audio>"
    return tok


def chat_template():
    """Gemma 3's template with the published Gemma 3n media branch."""
    with open(GEMMA3_TEMPLATE) as f:
        t = f.read()
    old = """            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}"""
    new = """            {%- if item['type'] == 'audio' -%}
                {{ '<audio_soft_token>' }}
            {%- elif item['type'] == 'image' -%}
                {{ '<image_soft_token>' }}
            {%- elif item['type'] == 'text' -%}"""
    assert old in t
    return t.replace(old, new)


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


def load_signal(name):
    import soundfile as sf

    signal, rate = sf.read(os.path.join(AUDIO, f"{name}.wav"), dtype="float32")
    assert rate == 16000 and signal.ndim == 1
    return signal


def chat_reference(model, processor):
    messages = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": CHAT_TEXT}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # As apply_chat_template(tokenize=True) calls it: the template already wrote <bos>.
    inputs = processor(text=prompt, audio=[load_signal(CHAT_CLIP)], return_tensors="pt",
                       add_special_tokens=False)
    ids = inputs["input_ids"][0].tolist()
    with torch.no_grad():
        out = model(**inputs, use_cache=False)
        # The random model ends its turn at once; EOS and <end_of_turn> are suppressed so that
        # the continuation shows 12 tokens (gemma-rs: --logit-bias 1=-100 --logit-bias 6=-100).
        # The image and audio ids (256..399) are suppressed too: gemma-rs never samples them
        # (`Decoder::sampleable_vocab`), since they are not text.
        suppressed = [1, 6] + list(range(VISION_OFFSET, VOCAB))
        gen = model.generate(**inputs, do_sample=False, max_new_tokens=12, suppress_tokens=suppressed)
    continuation = gen[0, len(ids):].tolist()
    return {
        "messages": [{"role": "user", "content": [{"type": "audio", "clip": CHAT_CLIP},
                                                  {"type": "text", "text": CHAT_TEXT}]}],
        "prompt": prompt,
        "input_ids": ids,
        "logits": flat(out.logits[0]),
        "greedy_suppressed": [1, 6, f"{VISION_OFFSET}..{VOCAB - 1}"],
        "greedy_continuation": continuation,
        "greedy_text": processor.tokenizer.decode(continuation, skip_special_tokens=True),
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

    with tempfile.TemporaryDirectory() as td:
        tok = build_tokenizer(td)
    processor = Gemma3nProcessor(
        feature_extractor=Gemma3nAudioFeatureExtractor(),
        image_processor=SiglipImageProcessor(),
        tokenizer=tok,
        chat_template=chat_template(),
        audio_seq_length=SOFT_TOKENS_PER_CLIP,
        image_seq_length=256,
    )
    tok.save_pretrained(OUT)
    with open(os.path.join(OUT, "chat_template.jinja"), "w") as f:
        f.write(chat_template())
    for extra in ("special_tokens_map.json", "tokenizer.model"):
        path = os.path.join(OUT, extra)
        if os.path.exists(path):
            os.remove(path)

    rng = np.random.default_rng(SEED)
    ref = {
        "generator": "scripts/make_gemma3n_audio_fixtures.py",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "vocab_size": VOCAB,
        "audio_token_id": AUDIO_TOKEN,
        "soft_tokens_per_clip": SOFT_TOKENS_PER_CLIP,
        "clips": [clip_reference(model, cfg, name, rng) for name in CLIPS],
        "chat": chat_reference(model, processor),
    }
    with open(os.path.join(OUT, "reference.json"), "w") as f:
        json.dump(ref, f)
    print("wrote", OUT, file=sys.stderr)


if __name__ == "__main__":
    main()
