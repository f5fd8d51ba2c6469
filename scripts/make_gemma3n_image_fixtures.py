#!/usr/bin/env python3
"""Gemma 3n image preprocessing references, from transformers 5.24, on the committed test images.

Reads the images of fixtures/images/ (made by scripts/make_image_fixtures.py) and writes
fixtures/images/gemma3n/:
  ref/<name>.<route>.<size>.u8.bin   pixel_values * 255 of Gemma 3n's image processor for that image,
                                    as uint8 (C order, shape [1, 3, size, size]); the script checks
                                    that every value is an exact multiple of 1/255 (rescale only)
  reference.json                    index: the processor class and settings, and per image its
                                    references and shapes

THE REFERENCE PROCESSOR. `Gemma3nProcessor.image_processor` is what `AutoImageProcessor` resolves for
model_type gemma3n: `SiglipImageProcessor` (torchvision backend) in transformers 5.24. Settings as
published in google/gemma-3n-E2B-it's preprocessor_config.json: resize to 768x768 with BILINEAR
(resample 2; torchvision resize with antialias=True on the uint8 image), rescale 1/255,
`do_normalize: false` (no mean/std), RGB, channels first. Most images are compared at 224x224 (the
same processor with size 224, to keep the fixture small); two at the real 768x768.

Routes ("file": a path given to the processor, decoded by torchvision with EXIF applied and alpha
dropped; "pil": a PIL image as opened) as described in scripts/make_image_fixtures.py; a route that
fails or gives several images (animated GIF, BMP, 16-bit PNG through "file") is recorded, not stored.

Run with the dev venv: ~/.venvs/ref/bin/python scripts/make_gemma3n_image_fixtures.py
"""

import json
import shutil
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image
from transformers import SiglipImageProcessor
from transformers.image_utils import load_image_as_tensor

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "fixtures" / "images"
OUT = IMAGES / "gemma3n"
FULL = ["rgb_300x200.png", "rgb_q90_200x150.jpg"]

# google/gemma-3n-E2B-it preprocessor_config.json (image part).
PUBLISHED = {
    "do_convert_rgb": None,
    "do_normalize": False,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "resample": 2,
    "rescale_factor": 1 / 255,
    "size": {"height": 768, "width": 768},
}


def processor(size):
    kw = dict(PUBLISHED)
    kw.pop("do_convert_rgb")
    kw["size"] = {"height": size, "width": size}
    return SiglipImageProcessor(**kw)


def write_u8(rel, pv):
    levels = pv * 255.0
    rounded = torch.round(levels)
    assert torch.allclose(levels, rounded, atol=1e-3), "rescale-only values are k/255"
    assert rounded.min() >= 0 and rounded.max() <= 255
    path = OUT / "ref" / rel
    path.write_bytes(rounded.to(torch.uint8).numpy().tobytes())
    return {"file": f"ref/{rel}", "dtype": "u8", "shape": list(pv.shape)}


def main():
    if OUT.exists():
        shutil.rmtree(OUT)
    (OUT / "ref").mkdir(parents=True)
    names = sorted(
        p.name for p in IMAGES.iterdir() if p.is_file() and p.suffix in (".png", ".jpg", ".webp", ".gif", ".bmp")
    )
    procs = {224: processor(224), 768: processor(768)}
    entries = []
    for name in names:
        path = IMAGES / name
        entry = {"file": name, "references": {}}
        sizes = [224] + ([768] if name in FULL else [])
        for size in sizes:
            proc = procs[size]
            pil = proc(Image.open(path), return_tensors="pt")["pixel_values"].float()
            assert pil.shape == (1, 3, size, size)
            refs = {"pil": write_u8(f"{name}.pil.{size}.u8.bin", pil)}
            try:
                decoded = load_image_as_tensor(str(path))
                pv = proc(str(path), return_tensors="pt")["pixel_values"].float()
                if decoded.dtype != torch.uint8:
                    refs["file"] = {"not_stored": f"decoded as {decoded.dtype}"}
                elif pv.shape[0] != 1:
                    refs["file"] = {"not_stored": f"{pv.shape[0]} images from one file"}
                elif torch.equal(pv, pil):
                    refs["file"] = {"same_as": "pil", **refs["pil"]}
                else:
                    refs["file"] = write_u8(f"{name}.file.{size}.u8.bin", pv)
            except Exception as e:  # noqa: BLE001 - recorded as data
                refs["file"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            entry["references"][str(size)] = refs
        entries.append(entry)
        print(name, {s: list(r) for s, r in entry["references"].items()})
    ref = {
        "generator": "scripts/make_gemma3n_image_fixtures.py",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "image_processor_class": type(procs[768]).__name__,
        "published_settings": PUBLISHED,
        "sizes": [224, 768],
        "images": entries,
    }
    (OUT / "reference.json").write_text(json.dumps(ref, indent=1))
    print(f"{len(entries)} images")


if __name__ == "__main__":
    main()
