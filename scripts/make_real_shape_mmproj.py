#!/usr/bin/env python3
"""Write a Gemma 3 mmproj GGUF at the real SigLIP shape, with random weights.

The vision tower of Gemma 3 4B/12B/27B is SigLIP so400m: 896x896 images, 14x14 patches (4096 of
them), hidden 1152, 27 layers, 16 heads of 72, MLP 4304 (gelu_tanh), LayerNorm eps 1e-6; then
4x4 average pooling to 256 tokens, an RMSNorm and a 1152 -> text-hidden projection. This script
writes the file llama.cpp's `convert_hf_to_gguf.py --mmproj` (default `--outtype f16`) would write
for such a checkpoint, but with random values: the timing and memory of an image encode do not
depend on the weights' values, and the real checkpoint is gated.

How it matches the converter (conversion/gemma.py `Gemma3VisionModel`, conversion/base.py
`MmprojModel` and `prepare_tensors` in the vendored llama.cpp):
  * tensor names come from gguf-py's own HF -> GGUF map, `get_tensor_name_map(MMPROJ, 27)`,
    applied to the Hugging Face names of Gemma3ForConditionalGeneration's vision tower and
    projector (`mm_input_projection_weight` -> `mm_input_projection.weight`, as the converter's
    `filter_tensors` renames it);
  * shapes are the PyTorch shapes (the GGUF's ggml `ne` is their reverse, as when the converter
    passes `data_torch.numpy()` to `add_tensor`): `v.patch_embd.weight` is the Conv2d weight
    [1152, 3, 14, 14] (ne 14,14,3,1152), `mm.input_projection.weight` is the HF parameter
    [1152, text_hidden] (ne text_hidden,1152: clip.cpp transposes it and reads the text width
    from its ne[0]);
  * types: 1-D tensors and `*_norm.weight` f32; anything whose HF name holds `.embeddings.`
    (patch and position embeddings) f32; `input_projection` f16; the other matrices f16;
  * `mm.soft_emb_norm.weight` holds 1 + w (the converter adds 1 to Gemma3RMSNorm's w);
  * metadata: general.architecture "clip", general.type "mmproj", general.file_type 1 (F16),
    general.quantization_version, clip.has_vision_encoder, clip.projector_type "gemma3",
    clip.vision.{projection_dim,image_size,patch_size,embedding_length,feed_forward_length,
    block_count,attention.head_count,attention.layer_norm_epsilon,image_mean,image_std},
    clip.use_gelu; no clip.vision.projector.scale_factor (the converter writes it only when the
    pooling is not 4x4).

The projection's output width must equal the text model's hidden size (llama-mtmd-cli refuses a
pair that differs): pass --text-model to read it from a text GGUF, or --text-hidden.

Usage:
  python3 scripts/make_real_shape_mmproj.py --out mmproj.gguf --text-model gemma-3-270m-q4_k_m.gguf
  python3 scripts/make_real_shape_mmproj.py --out x.gguf --text-hidden 2560 --layers 2   # quick
  python3 scripts/make_real_shape_mmproj.py --dump x.gguf        # print metadata and tensors
  python3 scripts/make_real_shape_mmproj.py --image img.png      # a 896x896 test image (PIL)
  python3 scripts/make_real_shape_mmproj.py --extend-vocab 270m.gguf 270m-mm.gguf
      # the text GGUF with <image_soft_token> (262208 tokens, as the 4B's), see extend_vocab

Needs numpy and the `gguf` package from the vendored llama.cpp (put its gguf-py on PYTHONPATH,
or --gguf-py DIR); --image needs Pillow.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# The real Gemma 3 4B/12B/27B vision tower (SigLIP so400m at 896).
IMAGE_SIZE = 896
PATCH_SIZE = 14
HIDDEN = 1152
FFN = 4304
LAYERS = 27
HEADS = 16
EPS = 1e-6
IMAGE_MEAN = [0.5, 0.5, 0.5]
IMAGE_STD = [0.5, 0.5, 0.5]
TOKENS_PER_IMAGE = 256  # preprocessor_config's image_seq_length: 64x64 patches pooled 4x4

HF_VISION = "vision_tower.vision_model."
HF_PROJ = "multi_modal_projector."


def hf_tensors(layers: int, text_hidden: int):
    """(HF name, PyTorch shape) of Gemma3ForConditionalGeneration's vision tower and projector,
    in the order of the checkpoint's safetensors index (sorted names)."""
    n_patches = (IMAGE_SIZE // PATCH_SIZE) ** 2
    out = [
        (HF_PROJ + "mm_input_projection_weight", (HIDDEN, text_hidden)),
        (HF_PROJ + "mm_soft_emb_norm.weight", (HIDDEN,)),
        (HF_VISION + "embeddings.patch_embedding.bias", (HIDDEN,)),
        (HF_VISION + "embeddings.patch_embedding.weight", (HIDDEN, 3, PATCH_SIZE, PATCH_SIZE)),
        (HF_VISION + "embeddings.position_embedding.weight", (n_patches, HIDDEN)),
    ]
    for i in range(layers):
        p = f"{HF_VISION}encoder.layers.{i}."
        out += [
            (p + "layer_norm1.bias", (HIDDEN,)),
            (p + "layer_norm1.weight", (HIDDEN,)),
            (p + "layer_norm2.bias", (HIDDEN,)),
            (p + "layer_norm2.weight", (HIDDEN,)),
            (p + "mlp.fc1.bias", (FFN,)),
            (p + "mlp.fc1.weight", (FFN, HIDDEN)),
            (p + "mlp.fc2.bias", (HIDDEN,)),
            (p + "mlp.fc2.weight", (HIDDEN, FFN)),
            (p + "self_attn.k_proj.bias", (HIDDEN,)),
            (p + "self_attn.k_proj.weight", (HIDDEN, HIDDEN)),
            (p + "self_attn.out_proj.bias", (HIDDEN,)),
            (p + "self_attn.out_proj.weight", (HIDDEN, HIDDEN)),
            (p + "self_attn.q_proj.bias", (HIDDEN,)),
            (p + "self_attn.q_proj.weight", (HIDDEN, HIDDEN)),
            (p + "self_attn.v_proj.bias", (HIDDEN,)),
            (p + "self_attn.v_proj.weight", (HIDDEN, HIDDEN)),
        ]
    out += [
        (HF_VISION + "post_layernorm.bias", (HIDDEN,)),
        (HF_VISION + "post_layernorm.weight", (HIDDEN,)),
    ]
    return out


def gguf_name(gguf, tmap, hf_name: str) -> str:
    """The converter's renaming: `_weight` -> `.weight` (Gemma3VisionModel.filter_tensors), then
    the MMPROJ tensor map with the .weight/.bias suffix kept (ModelBase.map_tensor_name)."""
    name = hf_name.replace("_weight", ".weight")
    new = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
    if new is None:
        raise SystemExit(f"gguf-py has no MMPROJ mapping for {name}")
    return new


def gguf_type(gguf, hf_name: str, new_name: str, n_dims: int):
    """The converter's type for each tensor at --outtype f16."""
    t = gguf.GGMLQuantizationType
    # Gemma3VisionModel.tensor_force_quant
    if "input_projection" in hf_name:
        q = t.F16
    elif ".embeddings." in hf_name:
        q = t.F32
    # MmprojModel.tensor_force_quant (not reached for Gemma 3's patch embedding, kept for parity)
    elif ".patch_embd.weight" in new_name:
        q = t.F16
    else:
        q = None
    # prepare_tensors: 1-D tensors and norms are f32 whatever was forced
    if n_dims <= 1 or new_name.endswith("_norm.weight"):
        q = t.F32
    # prepare_tensors: position embeddings and anything not ending in .weight are f32
    if q is None and (new_name.startswith("v.position_embd") or not new_name.endswith(".weight")):
        q = t.F32
    if q is None:
        q = t.F16  # the f16 output type
    return q


def values(rng, np, hf_name: str, shape, dtype):
    """Random values of a plausible scale: matrices and embeddings N(0, 0.02), LayerNorm weights
    1 + N(0, 0.02), biases N(0, 0.01); the soft-embedding norm is stored as 1 + w like the
    converter writes it."""
    n = int(np.prod(shape))
    if hf_name.endswith("mm_soft_emb_norm.weight"):
        w = rng.standard_normal(n, dtype=np.float32) * 0.02
        data = w + 1.0  # Gemma3VisionModel.modify_tensors: data_torch + 1
    elif "layer_norm" in hf_name and hf_name.endswith(".weight"):
        data = 1.0 + rng.standard_normal(n, dtype=np.float32) * 0.02
    elif hf_name.endswith(".bias"):
        data = rng.standard_normal(n, dtype=np.float32) * 0.01
    else:
        data = rng.standard_normal(n, dtype=np.float32)
        data *= 0.02
    return data.reshape(shape).astype(dtype, copy=False)


def text_hidden_of(gguf, path: str) -> int:
    reader = gguf.GGUFReader(path)
    arch_field = reader.get_field("general.architecture")
    arch = arch_field.contents()
    field = reader.get_field(f"{arch}.embedding_length")
    if field is None:
        raise SystemExit(f"{path}: no {arch}.embedding_length")
    return int(field.contents())


def write(args, gguf, np) -> None:
    text_hidden = args.text_hidden
    if args.text_model:
        text_hidden = text_hidden_of(gguf, args.text_model)
    if not text_hidden:
        raise SystemExit("give --text-model or --text-hidden")

    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, args.layers)
    plan = []
    for hf_name, shape in hf_tensors(args.layers, text_hidden):
        new = gguf_name(gguf, tmap, hf_name)
        q = gguf_type(gguf, hf_name, new, len(shape))
        plan.append((hf_name, new, shape, q))

    tmp = args.out + ".tmp"
    w = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MMPROJ])
    # ModelBase.prepare_metadata / set_type / set_gguf_parameters, MmprojModel and Gemma3VisionModel
    w.add_type(gguf.GGUFType.MMPROJ)
    w.add_name("Gemma 3 SigLIP real-shape random mmproj")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_clip_has_vision_encoder(True)
    w.add_vision_projection_dim(text_hidden)
    w.add_vision_image_size(IMAGE_SIZE)
    w.add_vision_patch_size(PATCH_SIZE)
    w.add_vision_embedding_length(HIDDEN)
    w.add_vision_feed_forward_length(FFN)
    w.add_vision_block_count(args.layers)
    w.add_vision_head_count(HEADS)
    w.add_vision_image_mean(IMAGE_MEAN)
    w.add_vision_image_std(IMAGE_STD)
    w.add_clip_projector_type(gguf.VisionProjectorType.GEMMA3)
    w.add_vision_attention_layernorm_eps(EPS)
    w.add_vision_use_gelu(True)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    np_type = {gguf.GGMLQuantizationType.F16: np.float16, gguf.GGMLQuantizationType.F32: np.float32}
    for _, new, shape, q in plan:
        dt = np.dtype(np_type[q])
        w.add_tensor_info(new, shape, dt, int(np.prod(shape)) * dt.itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(args.seed)
    t0 = time.time()
    for hf_name, _, shape, q in plan:
        # one tensor in memory at a time: the whole file is about 0.85 GB
        w.write_tensor_data(values(rng, np, hf_name, shape, np_type[q]))
    w.close()
    os.replace(tmp, args.out)
    size = os.path.getsize(args.out)
    print(f"wrote {args.out}: {len(plan)} tensors, {size / 1e6:.1f} MB, {args.layers} layers, "
          f"projection {HIDDEN} -> {text_hidden}, {time.time() - t0:.1f} s", file=sys.stderr)


VISION_VOCAB = 262208  # Gemma 3 4B/12B/27B: 262144 text tokens, <image_soft_token>, 63 pads
IMAGE_SOFT_TOKEN = 262144


def extend_vocab(src: str, dst: str, gguf, np) -> None:
    """Copy a Gemma 3 text GGUF with its vocabulary padded to the multimodal models' 262208
    entries, `<image_soft_token>` at 262144 (as in the 4B/12B/27B GGUFs). Gemma 3 270M and 1B
    are text-only: their 262144-token vocabulary has no id for the image soft tokens, which
    gemma-rs places in the prompt (llama.cpp passes the image's embeddings without ids). The new
    token_embd rows (the tied output head too) are zero; every other tensor is copied byte for
    byte."""
    reader = gguf.GGUFReader(src)
    arch = reader.get_field("general.architecture").contents()
    n_vocab = len(reader.get_field("tokenizer.ggml.tokens").data)
    extra = VISION_VOCAB - n_vocab
    if n_vocab != IMAGE_SOFT_TOKEN or extra <= 0:
        raise SystemExit(f"{src}: expected a {IMAGE_SOFT_TOKEN}-token vocabulary, found {n_vocab}")
    w = gguf.GGUFWriter(dst + ".tmp", arch)
    GT = gguf.GGUFValueType
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        value = field.contents()
        sub = field.types[-1] if field.types[0] == GT.ARRAY else None
        if field.name == "tokenizer.ggml.tokens":
            value = value + ["<image_soft_token>"] + [f"[PAD{i}]" for i in range(IMAGE_SOFT_TOKEN + 1, VISION_VOCAB)]
        elif field.name == "tokenizer.ggml.scores":
            value = value + [0.0] * extra
        elif field.name == "tokenizer.ggml.token_type":
            # CONTROL for the image token (a special added token), UNUSED for the pads
            value = value + [int(gguf.TokenType.CONTROL)] + [int(gguf.TokenType.UNUSED)] * (extra - 1)
        elif field.name == "general.name":
            value = value + " (vocabulary padded to 262208 with <image_soft_token>)"
        w.add_key_value(field.name, value, field.types[0], sub_type=sub)
    for t in reader.tensors:
        data = t.data
        if t.name == "token_embd.weight":
            pad = np.zeros((extra,) + data.shape[1:], dtype=data.dtype)
            data = np.concatenate([data, pad])
        if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            w.add_tensor(t.name, data)
        else:
            w.add_tensor(t.name, data, raw_shape=data.shape, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(dst + ".tmp", dst)
    print(f"wrote {dst}: vocabulary {n_vocab} -> {VISION_VOCAB}", file=sys.stderr)


def dump(path: str, gguf) -> None:
    reader = gguf.GGUFReader(path)
    for field in reader.fields.values():
        if field.name.startswith("GGUF."):
            continue
        value = field.contents()
        print(f"kv  {field.name} = {value!r}")
    for t in reader.tensors:
        ne = ",".join(str(int(x)) for x in t.shape)
        print(f"ts  {t.name}  {t.tensor_type.name}  ne=[{ne}]")


def make_image(path: str, size: int) -> None:
    from PIL import Image
    import numpy as np

    # A smooth colour gradient with a little noise: decodes like a photo, deterministic.
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    rng = np.random.default_rng(1)
    noise = rng.normal(0, 8, (size, size, 3)).astype(np.float32)
    rgb = np.stack([255 * x, 255 * y, 255 * (1 - x) * (1 - y)], axis=-1) + noise
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB").save(path)
    print(f"wrote {path}: {size}x{size}", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="mmproj GGUF to write")
    ap.add_argument("--text-model", help="text GGUF whose hidden size the projection targets")
    ap.add_argument("--text-hidden", type=int, default=0, help="projection output width")
    ap.add_argument("--layers", type=int, default=LAYERS, help="encoder layers (27 = real)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dump", metavar="GGUF", help="print a GGUF's metadata and tensors")
    ap.add_argument("--image", metavar="PNG", help="write a test image")
    ap.add_argument("--image-size", type=int, default=IMAGE_SIZE)
    ap.add_argument("--gguf-py", help="the vendored llama.cpp's gguf-py folder")
    ap.add_argument("--extend-vocab", nargs=2, metavar=("TEXT_IN", "TEXT_OUT"),
                    help="copy a 262144-token Gemma 3 text GGUF with <image_soft_token> added")
    args = ap.parse_args()

    if args.gguf_py:
        sys.path.insert(0, args.gguf_py)
    if args.image:
        make_image(args.image, args.image_size)
    if args.out or args.dump or args.extend_vocab:
        import numpy as np
        import gguf

        if args.extend_vocab:
            extend_vocab(*args.extend_vocab, gguf, np)
        if args.out:
            write(args, gguf, np)
        if args.dump:
            dump(args.dump, gguf)
    if not (args.image or args.out or args.dump or args.extend_vocab):
        ap.error("nothing to do: give --out, --dump, --image or --extend-vocab")


if __name__ == "__main__":
    main()
