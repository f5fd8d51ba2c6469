#!/usr/bin/env python3
"""Tiny random-weight Gemma 3 vision-language model and its reference outputs, from transformers.

Everything here is produced by transformers' own classes (config, model, tokenizer, image processor,
processor) or by llama.cpp's own converter; nothing is computed by hand or by our engine.

Writes fixtures/gemma3_vision_tiny/:
  hf/                     exactly what transformers 5.24 `save_pretrained` writes for the model and the
                          processor: config.json, model.safetensors (F32), processor_config.json (image
                          processor nested: size 64x64, mean = std = 0.5; image_seq_length 16),
                          tokenizer.json, tokenizer_config.json, chat_template.jinja; plus
                          tokenizer.model, the SentencePiece model the tokenizer was converted from
                          (llama.cpp's converter reads it; the published checkpoint ships one too).
                          NOTE: transformers 5.24 saves `language_model.model.*`,
                          `multi_modal_projector.*` and `vision_tower.*` WITHOUT `vision_model.`; in
                          memory its names are `model.language_model.*`, `model.vision_tower.*`,
                          `model.multi_modal_projector.*` (SiglipVisionModel lost its `vision_model`
                          submodule; the prefix is dropped at load time).
  hf_published/           the same tensors under the published Gemma 3 4B checkpoint's names, and the
                          published checkpoint's config formats (transformers 4.x style):
                          preprocessor_config.json (image processor + image_seq_length 16),
                          processor_config.json, tokenizer_config.json with added_tokens_decoder
                          (special=true for ids 0-6 and 255-257); other files copied from hf/.
  hf_transformers4/       the same tensors under the names transformers 4.52-4.57 saved (common in
                          fine-tunes on the Hub); other files copied from hf/.
                          All three load back into transformers 5.24 bit-identically, and their
                          processors (AutoProcessor) give the same ids and pixels (checked each run).
  text.gguf               llama.cpp's convert_hf_to_gguf.py --outtype f32 on hf_published/: the language
                          model with its SentencePiece vocabulary (300 entries, 258..299 "[PADn]").
                          hf_published/ because the converter marks special tokens CONTROL only from
                          tokenizer_config's added_tokens_decoder, which transformers 5 no longer
                          writes (from hf/ they came out NORMAL). Norms are stored as 1 + w.
  mmproj.gguf             llama.cpp's convert_hf_to_gguf.py --mmproj --outtype f32 on hf_published/ (the
                          converter keeps only names starting `vision_tower.`/`multi_modal_projector.`,
                          so it needs the published names). It forces mm.input_projection to F16
                          whatever --outtype says, and stores mm.soft_emb_norm as 1 + w.
  img_*.png               the input images of the cases (PNG, so any decoder gets the same pixels).
  reference.json          the cases (below), ids and shapes; tensors in ref/*.bin
  ref/*.bin               little-endian float32, C order, shapes given in reference.json

Name mapping (in-memory transformers 5.24 name -> each layout; see *_RENAME below):
  in memory                     hf/ (5.24 save)          hf_published/                 hf_transformers4/
  model.language_model.X        language_model.model.X   language_model.model.X        model.language_model.X
  model.vision_tower.X          vision_tower.X           vision_tower.vision_model.X   model.vision_tower.vision_model.X
  model.multi_modal_projector.X multi_modal_projector.X  multi_modal_projector.X       model.multi_modal_projector.X
  lm_head.weight                (absent everywhere: tied to the token embedding)

Config: text like fixtures/gemma3_tiny (hidden 32, MLP 64, 7 layers: 0-4 and 6 sliding, 5 global;
4 heads / 2 KV heads, head_dim 16, query_pre_attn_scalar 16 (= head_dim, which is all a GGUF can say), linear RoPE scaling 8 on global layers)
with a sliding window of 8 and 300 vocabulary rows; SigLIP hidden 48 (!= 32, so the projector
[48, 32] shows its orientation), MLP 72, 2 layers, 4 heads (head_dim 12), image 64, patch 8 (8x8 = 64
patches), no head; mm_tokens_per_image 16 (avg-pool 2x2 -> 4x4 tokens). A 16-token image block is
longer than the window 8: in a sliding layer an image token sees later tokens of its own image further
than the window away (bidirectional block), and text more than 8 tokens past an image sees it only
through the global layer 5.

Tokenizer: a tiny SentencePiece BPE model trained here with the sentencepiece package on a few
sentences (<pad>=0 <eos>=1 <bos>=2 <unk>=3 <mask>=4 <start_of_turn>=5 <end_of_turn>=6, learned pieces,
"\n" and "\n\n" among them as ordinary pieces; <start_of_image>=255 <end_of_image>=256
<image_soft_token>=257 appended as user-defined pieces), converted to tokenizer.json by transformers'
own GemmaTokenizer. Rows 258..299 of the embedding are unused, as the real 4B's 262208 rows exceed its
262145 tokens.

Cases (reference.json "cases"). Prompts are rendered by Gemma 3's official chat template
(fixtures/tokenizer/gemma3_chat_template.jinja) and run through Gemma3Processor, so ids, token_type_ids
and pixel_values are the processor's: each image (and each pan-and-scan crop) becomes
"\n\n" <start_of_image> 16 x <image_soft_token> <end_of_image> "\n\n":
  text_only        no image (checks the text path)
  one_image        one image
  three_images     three different images with text between them
  pan_and_scan     one 800x300 image, do_pan_and_scan=True (min crop 256, max 4 crops, ratio 1.2):
                   original + 3 crops, each its own bidirectional block, "Here is the original image"
                   text etc. as the processor writes it
  long_text_after  one image followed by more than a window of text
Per case: prompt (template output), expanded_prompt (decoded ids), input_ids, token_type_ids (1 exactly
at image soft tokens), num_crops (image processor's, per input image), and in ref/:
  pixel_values     [n_images_total, 3, 64, 64]  processor output (original first, then its crops)
  vision_hidden    [n, 64, 48]   SigLIP last_hidden_state (after post_layernorm)
  image_features   [n, 16, 32]   model.get_image_features(...).pooler_output (projector output)
  logits           [n_positions, 300]  full forward with token_type_ids (bidirectional image blocks)
  *_f16proj        image_features and logits of the same model with mm_input_projection_weight rounded
                   to f16, as mmproj.gguf stores it: what an engine reading mmproj.gguf should match.
  logits_causal    (three_images only) the forward with token_type_ids all 0 (plain causal mask)
`max_abs_diff_vs_causal` (bidirectional vs causal logits) is recorded for every case.

llama.cpp's converter: the script looks for an unpacked llama-cpp-python sdist in $LLAMA_CPP_SDIST_DIR
or ~/.cache/gemma-rs/llama-cpp-python-<version>/; if absent it downloads the sdist with pip (this
needs scikit-build-core and the cmake wheel in the venv only to read the sdist's metadata;
`--no-build-isolation` keeps pip from building cmake from source):
  pip download --no-deps --no-binary :all: --no-build-isolation llama-cpp-python==0.3.36
and runs vendor/llama.cpp/convert_hf_to_gguf.py (which uses its own vendored gguf-py).

Run with the dev venv: scripts/dev-venv.sh, then
  ~/.venvs/ref/bin/python scripts/make_gemma3_vision_fixtures.py
"""
import copy
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import transformers
from transformers import (
    AutoProcessor,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessor,
    Gemma3Processor,
    Gemma3TextConfig,
    GemmaTokenizer,
    SiglipVisionConfig,
)

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "fixtures" / "gemma3_vision_tiny"
CHAT_TEMPLATE = ROOT / "fixtures" / "tokenizer" / "gemma3_chat_template.jinja"
SEED = 20261206
LLAMA_CPP_PYTHON_VERSION = "0.3.36"

VOCAB = 300
BOI, EOI, IMAGE = 255, 256, 257
WINDOW = 8
MM_TOKENS = 16
IMAGE_SIZE = 64

# In-memory parameter names of transformers 5.24 (`model.state_dict()`) -> names in each layout.
# (SiglipVisionModel has no `vision_model` submodule in 5.24; it is a load-time prefix change.)
SAVED_RENAME = [  # what transformers 5.24 save_pretrained writes (hf/)
    ("model.language_model.", "language_model.model."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
]
PUBLISHED_RENAME = [  # google/gemma-3-4b-it model-*.safetensors (hf_published/)
    ("model.language_model.", "language_model.model."),
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
]
TRANSFORMERS4_RENAME = [  # transformers 4.52-4.57 save_pretrained, common in fine-tunes (hf_transformers4/)
    ("model.language_model.", "model.language_model."),
    ("model.vision_tower.", "model.vision_tower.vision_model."),
    ("model.multi_modal_projector.", "model.multi_modal_projector."),
]


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------
CORPUS = """Describe this image.
Describe these images in detail, please.
What is in the picture? Compare the first image with the second one and the third one.
Here is the original image and here are some crops to help you see better
You are a helpful assistant. The first image shows a red square, the second a blue circle.
Look at the picture and tell me what you see. Then write a short story about it.
The cat sat on the mat. The dog ran in the park. A bird is flying over the tree.
one two three four five six seven eight nine ten 0 1 2 3 4 5 6 7 8 9
Is there a person in this photo? What colour is the car? How many windows are there?
user model system hello world good morning thanks!
"""
PARAGRAPHS = [
    CORPUS,
    "<start_of_turn>user\nDescribe this image.<end_of_turn>\n<start_of_turn>model\nA red square.<end_of_turn>\n",
    "Here is the original image\n\n and here are some crops to help you see better\n\n \n\n",
    "First line.\nSecond line.\n\nNew paragraph.\n\nAnother one.\n",
]


def build_tokenizer(workdir: Path):
    """Train a tiny SentencePiece BPE model, place the image pieces at 255..257, and let transformers'
    GemmaTokenizer convert it (tokenizer.json)."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        # Paragraphs keep "\n" and "\n\n" inside the training text, so they are learned as ordinary
        # pieces (as in the real Gemma vocabulary) rather than special tokens.
        sentence_iterator=iter(PARAGRAPHS * 8),
        model_writer=buf,
        model_type="bpe",
        vocab_size=BOI,  # ids 0..254; the image pieces are appended at 255..257
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
    n = 0
    while len(proto.pieces) < BOI:  # pad with unused user-defined pieces if training fell short
        p = proto.pieces.add()
        p.piece, p.score, p.type = f"<unused{n}>", 0.0, pb.ModelProto.SentencePiece.USER_DEFINED
        n += 1
    assert len(proto.pieces) == BOI, len(proto.pieces)
    for name in ("<start_of_image>", "<end_of_image>", "<image_soft_token>"):
        p = proto.pieces.add()
        p.piece, p.score, p.type = name, 0.0, pb.ModelProto.SentencePiece.USER_DEFINED
    spm_path = workdir / "tokenizer.model"
    spm_path.write_bytes(proto.SerializeToString())

    # The published Gemma 3 tokenizer_config names these three as extra special tokens; the processor
    # reads tokenizer.boi_token / eoi_token / image_token from them.
    (workdir / "tokenizer_config.json").write_text(json.dumps(published_tokenizer_config(proto), indent=2))
    tok = GemmaTokenizer.from_pretrained(str(workdir))  # converts tokenizer.model
    # The converted tokenizer remembers the temp path of tokenizer.model; do not save it.
    tok.init_kwargs.pop("vocab_file", None)
    ids = tok.convert_tokens_to_ids(["<start_of_image>", "<end_of_image>", "<image_soft_token>",
                                      "<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>", "\n", "\n\n"])
    assert ids[:3] == [BOI, EOI, IMAGE], ids
    assert tok.boi_token_id == BOI and tok.eoi_token_id == EOI and tok.image_token_id == IMAGE
    special = {t.content for t in tok.added_tokens_decoder.values() if t.special}
    assert {"<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<image_soft_token>"} <= special, special
    return tok, spm_path


SPECIAL_IDS = [0, 1, 2, 3, 4, 5, 6, BOI, EOI, IMAGE]


def published_tokenizer_config(proto):
    """tokenizer_config.json in the format the published checkpoint ships (transformers 4.x): the
    special tokens in `added_tokens_decoder` with special=true (llama.cpp's converter marks exactly
    these CONTROL), and boi/eoi/image tokens named. transformers 5 reads it; it no longer writes it."""
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {
            str(i): {"content": proto.pieces[i].piece, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": True}
            for i in SPECIAL_IDS
        },
        "boi_token": "<start_of_image>",
        "bos_token": "<bos>",
        "clean_up_tokenization_spaces": False,
        "eoi_token": "<end_of_image>",
        "eos_token": "<eos>",
        "extra_special_tokens": {
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
        "image_token": "<image_soft_token>",
        "mask_token": "<mask>",
        "model_max_length": 512,
        "pad_token": "<pad>",
        "padding_side": "left",
        "processor_class": "Gemma3Processor",
        "sp_model_kwargs": {},
        "spaces_between_special_tokens": False,
        "tokenizer_class": "GemmaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------
def build_config():
    text = Gemma3TextConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=7,  # pattern 6: layers 0-4 and 6 sliding, layer 5 global
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        # = head_dim: llama.cpp's GGUF has no key for it (it assumes head_dim), and text.gguf
        # must describe the same model (fixtures/gemma3_tiny covers 24 != 16).
        query_pre_attn_scalar=16,
        sliding_window=WINDOW,
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
    vision = SiglipVisionConfig(
        hidden_size=48,  # != text hidden 32, so the projector [48, 32] shows its orientation
        intermediate_size=72,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_channels=3,
        image_size=IMAGE_SIZE,
        patch_size=8,
        layer_norm_eps=1e-6,
        vision_use_head=False,
        hidden_act="gelu_pytorch_tanh",
    )
    cfg = Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=MM_TOKENS,
        boi_token_index=BOI,
        eoi_token_index=EOI,
        image_token_index=IMAGE,
        tie_word_embeddings=True,
    )
    return cfg


def randomize(model):
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if "vision_tower" in name and ("layer_norm" in name or "post_layernorm" in name):
                # SigLIP LayerNorm: weight applied as is, so keep it around 1; bias non-zero.
                p.copy_(1.0 + 0.3 * r if name.endswith(".weight") else 0.1 * r)
            elif name.endswith("norm.weight"):
                # Gemma RMSNorm (text norms, q/k norms, mm_soft_emb_norm): stored as w, applied as 1 + w.
                p.copy_(0.3 * r)
            elif name.endswith(".bias"):
                p.copy_(0.1 * r)
            elif name.endswith("patch_embedding.weight"):
                p.copy_(r / (p[0].numel() ** 0.5))
            elif name.endswith("position_embedding.weight"):
                p.copy_(0.5 * r)
            elif name.endswith("mm_input_projection_weight"):
                p.copy_(r / (p.shape[0] ** 0.5))
            else:
                p.copy_(0.25 * r)


# ---------------------------------------------------------------------------------------------
# Images (PNG so every decoder agrees on the pixels)
# ---------------------------------------------------------------------------------------------
def make_image(w, h, seed):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    chans = []
    for _ in range(3):
        fx, fy, ph = rng.uniform(0.5, 4.0), rng.uniform(0.5, 4.0), rng.uniform(0, 6.28)
        c = 0.5 + 0.35 * np.sin(2 * np.pi * (fx * x / w + fy * y / h) + ph) + 0.15 * (x / max(w - 1, 1))
        chans.append(c)
    img = np.stack(chans, -1)
    # a few flat rectangles so patches differ sharply
    for _ in range(4):
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        x1, y1 = min(w, x0 + rng.integers(w // 8 + 1, w // 2 + 2)), min(h, y0 + rng.integers(h // 8 + 1, h // 2 + 2))
        img[y0:y1, x0:x1] = rng.uniform(0, 1, 3)
    return Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8), "RGB")


IMAGES = {
    "img_a_97x73.png": (97, 73, 1),
    "img_b1_64x64.png": (64, 64, 2),
    "img_b2_40x120.png": (40, 120, 3),
    "img_b3_150x90.png": (150, 90, 4),
    "img_c_800x300.png": (800, 300, 5),
}


# ---------------------------------------------------------------------------------------------
# llama.cpp converter
# ---------------------------------------------------------------------------------------------
def llama_cpp_dir() -> Path:
    env = os.environ.get("LLAMA_CPP_SDIST_DIR")
    if env:
        return Path(env) / "vendor" / "llama.cpp"
    cache = Path(os.environ.get("GEMMA_CACHE_DIR", Path.home() / ".cache" / "gemma-rs"))
    root = cache / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}"
    if not (root / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as d:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                            "--no-build-isolation", "-d", d,
                            f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"], check=True,
                           env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
            sdist = next(Path(d).glob("llama_cpp_python-*.tar.gz"))
            with tarfile.open(sdist) as t:
                t.extractall(cache, filter="data")
    return root / "vendor" / "llama.cpp"


def convert(src: Path, outfile: Path, mmproj: bool):
    lc = llama_cpp_dir()
    cmd = [sys.executable, str(lc / "convert_hf_to_gguf.py"), str(src), "--outtype", "f32", "--outfile", str(outfile),
           "--model-name", "gemma3-vision-tiny-random"]
    if mmproj:
        cmd.append("--mmproj")
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        print(r.stdout[-4000:], r.stderr[-8000:], file=sys.stderr)
        raise SystemExit(f"convert_hf_to_gguf failed for {outfile.name}")


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
def write_bin(name, arr):
    arr = np.ascontiguousarray(arr, dtype="<f4")
    (OUT / "ref").mkdir(exist_ok=True)
    (OUT / "ref" / name).write_bytes(arr.tobytes())
    return {"file": f"ref/{name}", "dtype": "f32", "shape": list(arr.shape)}


def _rename(name, table):
    for old, new in table:
        if name.startswith(old):
            return new + name[len(old):]
    raise KeyError(name)


def saved_name(name):
    """In-memory transformers 5.24 name -> the name its save_pretrained writes."""
    return _rename(name, SAVED_RENAME)


def published_name(name):
    """In-memory transformers 5.24 name -> the published Gemma 3 checkpoint's name."""
    return _rename(name, PUBLISHED_RENAME)


def transformers4_name(name):
    """In-memory transformers 5.24 name -> the name transformers 4.52-4.57 save_pretrained wrote."""
    return _rename(name, TRANSFORMERS4_RENAME)


def main():
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    torch.manual_seed(SEED)

    with tempfile.TemporaryDirectory() as td:
        tok, spm_path = build_tokenizer(Path(td))
        spm_bytes = spm_path.read_bytes()
        published_tok_cfg = (Path(td) / "tokenizer_config.json").read_text()

    cfg = build_config()
    model = Gemma3ForConditionalGeneration(cfg)
    model.set_attn_implementation("eager")
    model = model.float().eval()
    randomize(model)

    image_processor = Gemma3ImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor = Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tok,
        chat_template=CHAT_TEMPLATE.read_text(),
        image_seq_length=MM_TOKENS,
    )

    hf = OUT / "hf"
    model.save_pretrained(hf)
    processor.save_pretrained(hf)
    (hf / "tokenizer.model").write_bytes(spm_bytes)
    gen_cfg = hf / "generation_config.json"
    if gen_cfg.exists():
        gen_cfg.unlink()

    # hf_published/ and hf_transformers4/: the same tensors under the other names found in the wild.
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(hf / "model.safetensors", "pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
    assert {saved_name(k) for k in state} == set(saved), sorted(saved)
    for k, v in state.items():
        assert torch.equal(saved[saved_name(k)], v), k
    layouts = {"hf": hf}
    for dirname, rename in (("hf_published", published_name), ("hf_transformers4", transformers4_name)):
        d = OUT / dirname
        d.mkdir()
        save_file({rename(k): v.contiguous() for k, v in state.items()}, d / "model.safetensors", metadata={"format": "pt"})
        for p in hf.iterdir():
            if p.name != "model.safetensors":
                shutil.copy(p, d / p.name)
        layouts[dirname] = d
    # hf_published/ also gets the published checkpoint's processor/tokenizer config files (the
    # transformers 4.x formats): preprocessor_config.json (image processor + image_seq_length),
    # processor_config.json (image_seq_length only) and tokenizer_config.json with added_tokens_decoder.
    pub = layouts["hf_published"]
    (pub / "tokenizer_config.json").write_text(published_tok_cfg)
    pre = processor.image_processor.to_dict()
    pre = {k: v for k, v in pre.items() if k in (
        "do_convert_rgb", "do_normalize", "do_pan_and_scan", "do_rescale", "do_resize", "image_mean",
        "image_processor_type", "image_std", "pan_and_scan_max_num_crops", "pan_and_scan_min_crop_size",
        "pan_and_scan_min_ratio_to_activate", "resample", "rescale_factor", "size")}
    pre.update({"image_seq_length": MM_TOKENS, "processor_class": "Gemma3Processor"})
    (pub / "preprocessor_config.json").write_text(json.dumps(dict(sorted(pre.items())), indent=2) + "\n")
    (pub / "processor_config.json").write_text(json.dumps(
        {"image_seq_length": MM_TOKENS, "processor_class": "Gemma3Processor"}, indent=2) + "\n")

    # Check both layouts load back to the same model.
    ids_check = torch.tensor([[2, 10, 20, 30, 40, 50]])
    with torch.no_grad():
        want = model(ids_check).logits
        for d in layouts.values():
            m2 = Gemma3ForConditionalGeneration.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
            got = m2(ids_check).logits
            assert torch.equal(want, got), (d, (want - got).abs().max())
            sd2 = m2.state_dict()
            for k, v in model.state_dict().items():
                assert torch.equal(v, sd2[k]), (d, k)
    print("hf/, hf_published/ and hf_transformers4/ reload bit-identically", file=sys.stderr)

    # Images.
    for fname, (w, h, s) in IMAGES.items():
        make_image(w, h, s).save(OUT / fname, optimize=True)

    def load(fname):
        return Image.open(OUT / fname)

    def msg(parts):
        return [{"role": "user", "content": parts}]

    filler = ("one two three four five six seven eight nine ten "
              "the cat sat on the mat and the dog ran in the park")
    cases_spec = [
        ("text_only", [], False, msg([{"type": "text", "text": "Describe the cat on the mat."}])),
        ("one_image", ["img_a_97x73.png"], False,
         msg([{"type": "image"}, {"type": "text", "text": "Describe this image."}])),
        ("three_images", ["img_b1_64x64.png", "img_b2_40x120.png", "img_b3_150x90.png"], False,
         msg([{"type": "text", "text": "Compare the first image"}, {"type": "image"},
              {"type": "text", "text": "with the second one"}, {"type": "image"},
              {"type": "text", "text": "and the third one"}, {"type": "image"},
              {"type": "text", "text": "please."}])),
        ("pan_and_scan", ["img_c_800x300.png"], True,
         msg([{"type": "image"}, {"type": "text", "text": "What is in the picture?"}])),
        ("long_text_after", ["img_a_97x73.png"], False,
         msg([{"type": "image"}, {"type": "text", "text": filler}])),
    ]
    pas_kwargs = dict(do_pan_and_scan=True, pan_and_scan_min_crop_size=256,
                      pan_and_scan_max_num_crops=4, pan_and_scan_min_ratio_to_activate=1.2)

    # llama.cpp's converter stores mm.input_projection as F16 even with --outtype f32. A second copy of
    # the model whose projection weight is rounded to f16 gives the outputs an engine reading
    # mmproj.gguf should match ("*_f16proj").
    model_f16proj = copy.deepcopy(model)
    with torch.no_grad():
        w = model_f16proj.model.multi_modal_projector.mm_input_projection_weight
        w.copy_(w.half().float())

    # Every layout's processor files must load back (AutoProcessor) to the same behaviour.
    reloaded = {d: AutoProcessor.from_pretrained(str(p)) for d, p in layouts.items()}
    for d, p in reloaded.items():
        assert type(p.image_processor).__name__ == "Gemma3ImageProcessor", (d, type(p.image_processor))
        assert p.image_seq_length == MM_TOKENS, d

    import tokenizers
    raw_tok = tokenizers.Tokenizer.from_file(str(hf / "tokenizer.json"))

    cases = []
    for name, images, pas, messages in cases_spec:
        prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        kwargs = dict(text=prompt, return_tensors="pt", add_special_tokens=False)
        if images:
            kwargs["images"] = [load(f) for f in images]
            # The processor drops num_crops from its output; ask the image processor itself.
            ip = processor.image_processor(kwargs["images"], **(pas_kwargs if pas else {}))
            num_crops = [int(n) for n in ip["num_crops"]]
        if pas:
            kwargs.update(pas_kwargs)
        enc = processor(**kwargs)
        for d, p in reloaded.items():
            prompt2 = p.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            enc2 = p(**{**kwargs, "text": prompt2})
            assert prompt2 == prompt, d
            for k in enc:
                assert torch.equal(enc[k], enc2[k]), (d, name, k)
        ids = enc["input_ids"]
        tt = enc["token_type_ids"]
        assert ids[0, 0].item() == 2, "the chat template starts with <bos>"
        assert torch.equal(tt[0] == 1, ids[0] == IMAGE)
        expanded = tok.decode(ids[0], skip_special_tokens=False)
        # The bare tokenizers library (what the Rust `tokenizers` crate mirrors) on hf/tokenizer.json
        # gives the same ids for the expanded text.
        assert raw_tok.encode(expanded, add_special_tokens=False).ids == ids[0].tolist(), name
        case = {
            "name": name,
            "images": images,
            "pan_and_scan": pas,
            "prompt": prompt,
            "expanded_prompt": expanded,
            "input_ids": ids[0].tolist(),
            "token_type_ids": tt[0].tolist(),
            "n_positions": ids.shape[1],
        }
        with torch.no_grad():
            fwd = dict(input_ids=ids, token_type_ids=tt)
            if images:
                pv = enc["pixel_values"].float()
                case["num_crops"] = num_crops
                assert pv.shape[0] == len(images) + sum(num_crops)
                feats = model.get_image_features(pv, return_dict=True)
                case["pixel_values"] = write_bin(f"{name}.pixel_values.bin", pv.numpy())
                case["vision_hidden"] = write_bin(f"{name}.vision_hidden.bin", feats.last_hidden_state.numpy())
                case["image_features"] = write_bin(f"{name}.image_features.bin", feats.pooler_output.numpy())
                assert pv.shape[0] * MM_TOKENS == int((ids == IMAGE).sum())
                fwd["pixel_values"] = pv
                feats16 = model_f16proj.get_image_features(pv, return_dict=True).pooler_output
                case["image_features_f16proj"] = write_bin(f"{name}.image_features_f16proj.bin", feats16.numpy())
                case["logits_f16proj"] = write_bin(f"{name}.logits_f16proj.bin", model_f16proj(**fwd).logits[0].numpy())
            logits = model(**fwd).logits[0]
            causal = model(**{**fwd, "token_type_ids": torch.zeros_like(tt)}).logits[0]
            no_tt = model(**{k: v for k, v in fwd.items() if k != "token_type_ids"}).logits[0]
        diff = float((logits - causal).abs().max())
        assert torch.equal(causal, no_tt)
        case["logits"] = write_bin(f"{name}.logits.bin", logits.numpy())
        case["max_abs_diff_vs_causal"] = diff
        if name == "three_images":
            case["logits_causal"] = write_bin(f"{name}.logits_causal.bin", causal.numpy())
        print(f"{name}: {ids.shape[1]} positions, images {len(images)}, "
              f"max |logits(bidirectional) - logits(causal)| = {diff:.4g}", file=sys.stderr)
        if images:
            assert diff > 1e-2, "the bidirectional image mask must change the logits"
        cases.append(case)

    # GGUF conversions with llama.cpp's own converter.
    convert(layouts["hf_published"], OUT / "text.gguf", mmproj=False)
    convert(layouts["hf_published"], OUT / "mmproj.gguf", mmproj=True)

    ref = {
        "generator": "scripts/make_gemma3_vision_fixtures.py",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "llama_cpp_python_sdist": LLAMA_CPP_PYTHON_VERSION,
        "image_processor_class": type(processor.image_processor).__name__,
        "image_input": "PIL.Image.open(file) passed to the processor (for these RGB PNGs identical to passing the "
                       "path; see fixtures/images/reference.json for where the two differ)",
        "gguf_notes": {"mmproj": "mm.input_projection.weight is F16 (forced by the converter), bytes in HF order "
                                 "[vision_hidden=48][text_hidden=32] (GGUF ne = [32, 48]); mm.soft_emb_norm = 1 + w; "
                                 "use *_f16proj references with mmproj.gguf",
                       "text": "Gemma norms stored as 1 + w; q/k not permuted"},
        "vocab_size": VOCAB,
        "boi_token_id": BOI,
        "eoi_token_id": EOI,
        "image_token_id": IMAGE,
        "bos_token_id": 2,
        "start_of_turn_id": 5,
        "end_of_turn_id": 6,
        "sliding_window": WINDOW,
        "layouts": {"hf": "transformers 5.24 save_pretrained", "hf_published": "google/gemma-3-4b-it names",
                    "hf_transformers4": "transformers 4.52-4.57 save_pretrained names"},
        "mm_tokens_per_image": MM_TOKENS,
        "image_size": IMAGE_SIZE,
        "binary_format": "little-endian float32, C order",
        "cases": cases,
    }
    (OUT / "reference.json").write_text(json.dumps(ref, indent=1))
    print("wrote", OUT, file=sys.stderr)


if __name__ == "__main__":
    main()
