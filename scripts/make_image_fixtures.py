#!/usr/bin/env python3
"""Test images and the Gemma 3 image preprocessing references, from transformers 5.24.

Writes fixtures/images/:
  <name>.<ext>           test images generated here with PIL (flat/gradient content, small files)
  ref/<name>.<route>.224.f16.bin
                         pixel_values of Gemma3ImageProcessor(size 224x224) for that image,
                         little-endian float16, C order, shape [1, 3, 224, 224]
  ref/<name>.pil.896.f16.bin             one image also at the real 896x896
  ref/<name>.pil.pas224.f16.bin          pan-and-scan references: [1 + num_crops, 3, 224, 224]
  reference.json         index: every image with its decoded size/mode/frames/EXIF orientation and
                         its reference files and shapes; the findings below as data

THE REFERENCE PROCESSOR. `AutoImageProcessor` / `Gemma3Processor` in transformers 5.24 pick the
torchvision backend whenever torchvision is installed: class `Gemma3ImageProcessor` (the "fast" one;
the PIL one is now `Gemma3ImageProcessorPil`). That default is used here (torchvision 0.29.2 pinned in
scripts/dev-venv.sh). Settings as published for gemma-3-4b-it, but size 224x224: resize BILINEAR
(torchvision resize with antialias=True, done on the uint8 image so the result is rounded to uint8
levels: every value is k * 2/255 - 1), rescale 1/255, normalise mean = std = 0.5, RGB, channels first.
`pil_backend_max_abs_diff` in reference.json gives, per image, the difference of the PIL backend
(Gemma3ImageProcessorPil) from it, for information.

TWO WAYS IN, WITH DIFFERENT RESULTS. transformers decodes an image in one of two ways, and they
disagree on EXIF, alpha, GIF, BMP and 16-bit:
  route "file": a path, URL or base64 string given to the processor, which is what
      `processor.apply_chat_template(...)` / the pipeline do with {"type": "image", "url"|"path": ...}
      (the Gemma 3 model card's usage). transformers.image_utils.load_image_as_tensor decodes it with
      torchvision.io.decode_image(mode=RGB, apply_exif_orientation=True) (torchcodec instead, if
      installed; it is not).
  route "pil": a PIL.Image from PIL.Image.open(path) given to the processor (no other step);
      the processor's convert_to_rgb (transformers.image_transforms.convert_to_rgb) converts it.
Findings (each checked by this script on every run; see reference.json "findings"):
  * EXIF orientation: route "file" APPLIES it (the image is rotated upright). Route "pil" DOES NOT
    APPLY IT AT ALL: the pixels are used as stored, whatever the Orientation tag says.
  * Alpha (RGBA, LA, PNG/WebP with alpha, palette with a transparent index): route "pil" composites
    onto WHITE (PIL.Image.alpha_composite on an opaque white background, integer arithmetic; equal
    to round(c*a/255 + 255*(1 - a/255)) for every c, a: checked exhaustively). Route "file" DROPS
    alpha (the colour channels as stored, as PIL's plain convert("RGB") would).
  * Palette (P) without transparency: palette lookup in both routes.
  * Grayscale L: replicated to three channels in both routes. LA: see alpha.
  * 16-bit grayscale PNG (PIL mode I;16): route "pil" CLIPS each value to 255 (min(v, 255); not v>>8,
    not v/257), so most of a 16-bit image turns white. Route "file" gives a uint16 tensor that the
    processor rescales by 1/255 all the same: values far outside [-1, 1] (garbage; not stored).
  * CMYK JPEG: both routes give R = round((255 - C) * (255 - K) / 255) (likewise G with M, B with Y)
    from the file's CMYK after the Adobe inversion (PIL writes Adobe-marked, inverted CMYK JPEGs).
  * Animated GIF: route "pil" uses the first frame. Route "file" returns EVERY frame as a separate
    image (so one GIF counts as n images and the processor's placeholder count check fails).
  * BMP: route "pil" works; route "file" raises (torchvision decodes only JPEG, PNG, WebP, GIF).
  * JPEG and lossy WebP are decoded by libjpeg-turbo / libwebp in both routes (same pixels here);
    another decoder may differ by a few levels, so compare those with a tolerance.
For plain RGB/L/P PNG, JPEG and WebP the two routes give identical pixel_values; reference.json then
lists one file for both.

Pan-and-scan references (do_pan_and_scan=True, min crop 256, max 4 crops, min ratio 1.2; route "pil"):
a wide 3000x1000 (3 crops), a tall 400x1300 (3 crops), 600x500 (ratio exactly 1.2: 2 crops), 599x500
(ratio 1.198, just below: none), and 500x200 (ratio 2.5 but crops 250 px < 256: none).

Run with the dev venv: scripts/dev-venv.sh, then
  ~/.venvs/ref/bin/python scripts/make_image_fixtures.py
"""
import json
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image, ImageDraw

import PIL
import transformers
from transformers import AutoImageProcessor, Gemma3ImageProcessor, Gemma3ImageProcessorPil
from transformers.image_utils import load_image_as_tensor

warnings.filterwarnings("ignore")
transformers.logging.set_verbosity_error()

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "fixtures" / "images"
SEED = 20261206
SIZE = {"height": 224, "width": 224}
PAS = dict(do_pan_and_scan=True, pan_and_scan_min_crop_size=256, pan_and_scan_max_num_crops=4,
           pan_and_scan_min_ratio_to_activate=1.2)


# ---------------------------------------------------------------------------------------------
# Image content: smooth gradients and flat shapes, so PNG/JPEG compress and resizing is exercised.
# ---------------------------------------------------------------------------------------------
def gradient(w, h, seed=0):
    rng = np.random.default_rng(SEED + seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    fx, fy = x / max(w - 1, 1), y / max(h - 1, 1)
    a, b = rng.uniform(0.2, 0.8, 2)
    r = 255 * fx
    g = 255 * fy
    bl = 255 * (0.5 + 0.5 * np.sin(2 * np.pi * (a * 3 * fx + b * 2 * fy)))
    return np.stack([r, g, bl], -1).round().clip(0, 255).astype(np.uint8)


def scene(w, h, seed=0):
    """A gradient with a few flat shapes and a thin line (sharp edges for the resampler)."""
    img = Image.fromarray(gradient(w, h, seed))
    d = ImageDraw.Draw(img)
    rng = np.random.default_rng(SEED + 100 + seed)
    for _ in range(3):
        x0, y0 = int(rng.integers(0, max(w - 1, 1))), int(rng.integers(0, max(h - 1, 1)))
        x1, y1 = x0 + int(rng.integers(1, w // 2 + 2)), y0 + int(rng.integers(1, h // 2 + 2))
        d.rectangle([x0, y0, x1, y1], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    d.ellipse([w // 4, h // 4, 3 * w // 4, 3 * h // 4], outline=(255, 255, 255), width=max(1, w // 60))
    d.line([0, h - 1, w - 1, 0], fill=(0, 0, 0), width=1)
    return img


def banded(w, h):
    """Large image with flat bands and a few shapes: compresses very well."""
    img = Image.new("RGB", (w, h), (40, 90, 160))
    d = ImageDraw.Draw(img)
    cols = [(200, 60, 50), (240, 220, 80), (30, 160, 90), (250, 250, 250), (10, 10, 10)]
    for i, c in enumerate(cols):
        d.rectangle([i * w // 5, h // 3, (i + 1) * w // 5 - 1, 2 * h // 3], fill=c)
    d.ellipse([w // 10, h // 10, w // 10 + h // 4, h // 10 + h // 4], fill=(255, 128, 0))
    d.rectangle([w - w // 6, h - h // 4, w - w // 12, h - h // 10], fill=(128, 0, 200))
    for i in range(0, w, max(1, w // 40)):
        d.line([i, 0, i, h // 12], fill=(255, 255, 255), width=1)
    return img


def with_alpha(img, kind):
    a = np.array(img.convert("RGBA"))
    h, w = a.shape[:2]
    y, x = np.mgrid[0:h, 0:w]
    if kind == "ramp":  # alpha 0..255 across, with a fully opaque and a fully transparent strip
        alpha = (x * 255 // max(w - 1, 1)).astype(np.uint8)
        alpha[: h // 5] = 255
        alpha[-(h // 5):] = 0
    else:
        alpha = np.where((x // 8 + y // 8) % 2 == 0, 255, 96).astype(np.uint8)
    a[..., 3] = alpha
    return Image.fromarray(a, "RGBA")


def exif_bytes(orientation):
    e = Image.Exif()
    e[0x0112] = orientation
    return e.tobytes()


def make_images():
    """name -> (writer) ; every image is written by PIL."""
    made = []

    def save(name, img, **kw):
        img.save(OUT / name, **kw)
        made.append(name)

    save("rgb_1x1.png", Image.new("RGB", (1, 1), (200, 30, 90)))
    save("rgb_2x3.png", Image.fromarray(gradient(2, 3, 1)))
    save("rgb_224x224.png", scene(224, 224, 2))  # already the target size
    save("rgb_300x200.png", scene(300, 200, 3))
    save("rgb_97x131.png", scene(97, 131, 4))
    save("rgb_3000x1000_banded.png", banded(3000, 1000), optimize=True)
    save("rgb_400x1300_tall.png", scene(400, 1300, 5), optimize=True)
    save("rgb_600x500_ratio1.2.png", scene(600, 500, 6), optimize=True)
    save("rgb_599x500_ratio1.198.png", scene(599, 500, 7), optimize=True)
    save("rgb_500x200_smallcrops.png", scene(500, 200, 8))
    save("gray_L_120x80.png", scene(120, 80, 9).convert("L"))
    save("palette_P_64x48.png", scene(64, 48, 10).quantize(16, dither=Image.Dither.NONE))
    p = scene(64, 48, 11).quantize(16, dither=Image.Dither.NONE)
    save("palette_P_transparent_64x48.png", p, transparency=int(np.array(p)[0, 0]))
    save("rgba_partial_alpha_100x60.png", with_alpha(scene(100, 60, 12), "ramp"))
    save("la_partial_alpha_50x70.png", with_alpha(scene(50, 70, 13), "checker").convert("LA"))
    g = gradient(90, 60, 14)[..., 0].astype(np.uint16) * 257  # 0..65535
    g[:, :10] = np.arange(0, 600, 10, dtype=np.uint16)[:, None]  # a strip of small values (0..590)
    save("gray16_I16_90x60.png", Image.fromarray(g))
    save("cmyk_80x60.jpg", scene(80, 60, 15).convert("CMYK"), quality=95)
    save("rgb_q90_200x150.jpg", scene(200, 150, 16), quality=90)
    for o in (3, 6, 8):
        # Stored 120x80 (landscape); orientation 6/8 display it as 80x120.
        save(f"exif_orientation{o}_120x80.jpg", scene(120, 80, 20 + o), quality=95, exif=exif_bytes(o))
    save("webp_lossy_160x120.webp", scene(160, 120, 17), quality=80)
    save("webp_lossless_alpha_100x80.webp", with_alpha(scene(100, 80, 18), "ramp"), lossless=True)
    frames = [scene(64, 48, 30 + i).quantize(32, dither=Image.Dither.NONE) for i in range(3)]
    frames[0].save(OUT / "gif_animated_3frames_64x48.gif", save_all=True, append_images=frames[1:],
                   duration=100, loop=0)
    made.append("gif_animated_3frames_64x48.gif")
    save("bmp_rgb_70x50.bmp", scene(70, 50, 19))
    return made


PAN_AND_SCAN = ["rgb_3000x1000_banded.png", "rgb_400x1300_tall.png", "rgb_600x500_ratio1.2.png",
                "rgb_599x500_ratio1.198.png", "rgb_500x200_smallcrops.png"]
FULL_SIZE = "rgb_3000x1000_banded.png"  # also stored at 896x896


# ---------------------------------------------------------------------------------------------
def write_f16(name, t):
    a = np.ascontiguousarray(t.numpy().astype("<f2"))
    assert np.abs(a.astype(np.float32) - t.numpy()).max() < 1e-3
    (OUT / "ref").mkdir(exist_ok=True)
    (OUT / "ref" / name).write_bytes(a.tobytes())
    return {"file": f"ref/{name}", "dtype": "f16", "shape": list(a.shape)}


def check_alpha_composite_formula():
    """PIL's alpha_composite onto opaque white == round(c*a/255 + 255*(1-a/255)) for all c, a?"""
    c, a = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    rgba = np.stack([c, c, c, a], -1).astype(np.uint8)
    src = Image.fromarray(rgba, "RGBA")
    white = Image.new("RGBA", src.size, (255, 255, 255, 255))
    got = np.array(Image.alpha_composite(white, src).convert("RGB"))[..., 0].astype(int)
    want = np.floor(c * a / 255.0 + 255.0 * (1 - a / 255.0) + 0.5).astype(int)
    return int(np.abs(got - want).max())


def check_cmyk_formula():
    v = np.arange(0, 256, 5)
    c, k = np.meshgrid(v, v, indexing="ij")
    cmyk = np.stack([c, np.zeros_like(c), np.zeros_like(c), k], -1).astype(np.uint8)
    got = np.array(Image.fromarray(cmyk, "CMYK").convert("RGB"))[..., 0].astype(int)
    want = np.floor((255 - c) * (255 - k) / 255.0 + 0.5).astype(int)
    return int(np.abs(got - want).max())


def main():
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    names = make_images()

    # The default class, as AutoImageProcessor resolves it for a Gemma 3 preprocessor config.
    probe_dir = ROOT / "fixtures" / "gemma3_vision_tiny" / "hf"
    if probe_dir.is_dir():
        auto_cls = type(AutoImageProcessor.from_pretrained(str(probe_dir))).__name__
    else:
        auto_cls = None
    proc = Gemma3ImageProcessor(size=SIZE, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    proc896 = Gemma3ImageProcessor(size={"height": 896, "width": 896}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    proc_pil = Gemma3ImageProcessorPil(size=SIZE, image_mean=[0.5] * 3, image_std=[0.5] * 3)

    entries = []
    findings = {}
    for name in names:
        path = OUT / name
        im = Image.open(path)
        exif = im.getexif().get(0x0112)
        entry = {
            "file": name,
            "format": im.format,
            "mode": im.mode,
            "size_wh": list(im.size),
            "n_frames": getattr(im, "n_frames", 1),
            "exif_orientation": exif,
            "has_transparency": "A" in im.getbands() or im.info.get("transparency") is not None,
        }
        # route "pil"
        pv_pil = proc(Image.open(path), return_tensors="pt")["pixel_values"].float()
        assert pv_pil.shape == (1, 3, 224, 224)
        ref_pil = write_f16(f"{name}.pil.224.f16.bin", pv_pil)
        refs = {"pil": ref_pil}
        # route "file"
        try:
            decoded = load_image_as_tensor(str(path))
            entry["file_route_decoded_shape"] = list(decoded.shape)
            entry["file_route_decoded_dtype"] = str(decoded.dtype).replace("torch.", "")
            pv_file = proc(str(path), return_tensors="pt")["pixel_values"].float()
            if decoded.dtype != torch.uint8:
                refs["file"] = {"not_stored": f"decoded as {decoded.dtype}; processor output range "
                                              f"[{pv_file.min():.3f}, {pv_file.max():.3f}]"}
            elif pv_file.shape[0] != 1:
                refs["file"] = {"not_stored": f"{pv_file.shape[0]} images from one file (every frame)",
                                "first_frame_equals_pil": bool(torch.equal(pv_file[:1], pv_pil))}
            elif torch.equal(pv_file, pv_pil):
                refs["file"] = {"same_as": "pil", **ref_pil}
            else:
                refs["file"] = write_f16(f"{name}.file.224.f16.bin", pv_file)
                refs["file"]["max_abs_diff_vs_pil"] = float((pv_file - pv_pil).abs().max())
        except Exception as e:  # noqa: BLE001 - recorded as data
            refs["file"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
        entry["references"] = refs
        # information: the PIL backend's difference (route "pil")
        pv_slow = proc_pil(Image.open(path), return_tensors="pt")["pixel_values"]
        pv_slow = torch.as_tensor(np.asarray(pv_slow)).float()
        entry["pil_backend_max_abs_diff"] = float((pv_slow - pv_pil).abs().max())

        if name == FULL_SIZE:
            pv = proc896(Image.open(path), return_tensors="pt")["pixel_values"].float()
            entry["references"]["pil_896"] = write_f16(f"{name}.pil.896.f16.bin", pv)
        if name in PAN_AND_SCAN:
            out = proc(Image.open(path), return_tensors="pt", **PAS)
            pv = out["pixel_values"].float()
            n = int(out["num_crops"][0])
            assert pv.shape[0] == 1 + n
            assert torch.equal(pv[:1], pv_pil), "pan-and-scan's first image is the plain one"
            entry["pan_and_scan"] = {"num_crops": n, **write_f16(f"{name}.pil.pas224.f16.bin", pv)}
        entries.append(entry)
        print(f"{name:40s} {entry['mode']:5s} {entry['size_wh']} file:"
              f"{ {k: v for k, v in refs['file'].items() if k not in ('file', 'dtype', 'shape')} } "
              f"pil-backend diff {entry['pil_backend_max_abs_diff']:.4f}"
              + (f" crops {entry['pan_and_scan']['num_crops']}" if "pan_and_scan" in entry else ""),
              file=sys.stderr)

    by = {e["file"]: e for e in entries}
    # Findings as data (the asserts keep the docstring honest).
    findings["alpha_composite_on_white_formula_max_err"] = check_alpha_composite_formula()
    findings["cmyk_formula_max_err"] = check_cmyk_formula()
    assert findings["alpha_composite_on_white_formula_max_err"] == 0
    assert findings["cmyk_formula_max_err"] == 0
    for o in (3, 6, 8):
        e = by[f"exif_orientation{o}_120x80.jpg"]
        assert e["references"]["file"].get("same_as") is None, "EXIF must change route 'file'"
    assert by["exif_orientation6_120x80.jpg"]["file_route_decoded_shape"] == [3, 120, 80]
    for a in ("rgba_partial_alpha_100x60.png", "la_partial_alpha_50x70.png",
              "palette_P_transparent_64x48.png", "webp_lossless_alpha_100x80.webp"):
        assert by[a]["references"]["file"].get("same_as") is None, a
    for same in ("rgb_300x200.png", "gray_L_120x80.png", "palette_P_64x48.png", "cmyk_80x60.jpg",
                 "rgb_q90_200x150.jpg", "webp_lossy_160x120.webp"):
        assert by[same]["references"]["file"].get("same_as") == "pil", same
    assert "error" in by["bmp_rgb_70x50.bmp"]["references"]["file"]
    assert "not_stored" in by["gif_animated_3frames_64x48.gif"]["references"]["file"]
    assert "not_stored" in by["gray16_I16_90x60.png"]["references"]["file"]
    # 16-bit: PIL's I;16 -> RGB clips at 255.
    g = np.array(Image.open(OUT / "gray16_I16_90x60.png"))
    rgb = np.array(Image.open(OUT / "gray16_I16_90x60.png").convert("RGB"))[..., 0]
    assert np.array_equal(rgb, np.minimum(g, 255).astype(np.uint8))
    findings.update({
        "exif_orientation": {"file": "applied", "pil": "NOT applied (pixels as stored)"},
        "alpha": {"file": "dropped (colour channels as stored)",
                  "pil": "composited onto opaque white: round(c*a/255 + 255*(1-a/255))"},
        "palette": "palette lookup (both routes); a transparent index counts as alpha (see alpha)",
        "grayscale_L": "replicated to RGB (both routes)",
        "gray16_I16": {"pil": "each value clipped to 255 (min(v, 255))",
                       "file": "uint16 tensor rescaled by 1/255: values far outside [-1, 1]"},
        "cmyk_jpeg": "R = round((255-C)*(255-K)/255), G with M, B with Y, after the Adobe inversion (both routes)",
        "animated_gif": {"pil": "first frame", "file": "every frame becomes its own image"},
        "bmp": {"pil": "decoded", "file": "error: torchvision decodes JPEG, PNG, WebP and GIF only"},
        "resize": "torchvision resize, bilinear, antialias=True, on the uint8 image (output rounded to uint8), "
                  "then x/255, then (x-0.5)/0.5",
    })

    ref = {
        "generator": "scripts/make_image_fixtures.py",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pillow": PIL.__version__,
        "image_processor_class": type(proc).__name__,
        "auto_image_processor_class": auto_cls,
        "settings": {"size": SIZE, "resample": "bilinear (2)", "antialias": True, "rescale_factor": 1 / 255,
                     "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "do_convert_rgb": True},
        "pan_and_scan_settings": {k: v for k, v in PAS.items()},
        "routes": {
            "file": "path/URL/base64 string given to the processor (apply_chat_template with url/path): "
                    "torchvision.io.decode_image(mode=RGB, apply_exif_orientation=True)",
            "pil": "PIL.Image.open(path) given to the processor: transformers convert_to_rgb",
        },
        "binary_format": "little-endian float16, C order",
        "findings": findings,
        "images": entries,
    }
    (OUT / "reference.json").write_text(json.dumps(ref, indent=1))
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    imgs = sum((OUT / n).stat().st_size for n in names)
    print(f"wrote {OUT}: images {imgs / 1e6:.2f} MB, total {total / 1e6:.2f} MB", file=sys.stderr)


if __name__ == "__main__":
    main()
