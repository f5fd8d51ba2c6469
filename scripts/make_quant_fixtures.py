#!/usr/bin/env python3
"""Writes fixtures/quant/*.bin: reference (de)quantization results from the `gguf` Python package.

Run from the repository root with the dev venv:
    /root/.venvs/ref/bin/python scripts/make_quant_fixtures.py

For each type the package can quantize, `<TYPE>_roundtrip.bin` holds deterministic random input,
the package's quantized bytes and its dequantization of them. For each type it can dequantize,
`<TYPE>_random.bin` holds random-but-valid block bytes (sane f16 scales) and their dequantized values.

File layout (little-endian): b"GQF1", u32 n_values, u32 n_bytes, u32 has_input,
[f32; n_values] input (only when has_input), [u8; n_bytes] quantized, [f32; n_values] dequantized.
"""

import struct
import sys
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize, quantize

OUT = Path(__file__).resolve().parent.parent / "fixtures" / "quant"

# Types our kernels implement, in GGML order.
TYPES = ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q8_1",
         "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K"]

# Offsets of the f16 scale fields inside each block (from ggml-common.h); random bytes there would
# give inf/NaN scales, so they are overwritten with sane values.
F16_SCALE_OFFSETS = {
    "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q8_1": [0, 2],
    "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208],
}


def blocks_for(name: str) -> int:
    block_size, _ = GGML_QUANT_SIZES[T[name]]
    if block_size == 1:
        return 256
    return 16 if block_size == 32 else 4


def make_input(name: str, rng: np.random.Generator) -> np.ndarray:
    block_size, _ = GGML_QUANT_SIZES[T[name]]
    n = blocks_for(name) * block_size
    group = max(block_size, 32)
    x = rng.standard_normal(n).astype(np.float32)
    # Vary magnitude per group so scales differ a lot.
    scales = np.exp(rng.uniform(-6, 3, n // group)).astype(np.float32)
    x *= np.repeat(scales, group)
    # Edge cases: an all-zero group, a constant group, a single negative outlier, all-positive.
    x[0:group] = 0.0
    x[group:2 * group] = 0.75
    x[2 * group + 5] = -40.0
    x[3 * group:4 * group] = np.abs(x[3 * group:4 * group])
    if block_size == 1:
        # Float specials: rounding ties, subnormals, overflow to inf, signed zero, NaN.
        specials = [1.0 + 2.0 ** -11, 1.0 + 3 * 2.0 ** -11, 1.0 + 2.0 ** -8, 6e-8, 1e-40, 65504.0,
                    65520.0, 1e5, -0.0, 3.0e38, float("inf"), -float("inf"), float("nan")]
        x[200:200 + len(specials)] = np.array(specials, dtype=np.float32)
    return x


def random_blocks(name: str, rng: np.random.Generator) -> np.ndarray:
    block_size, type_size = GGML_QUANT_SIZES[T[name]]
    n_blocks = blocks_for(name)
    if block_size == 1:
        raw = rng.integers(0, 256, n_blocks * type_size, dtype=np.uint8)
        return raw
    raw = rng.integers(0, 256, (n_blocks, type_size), dtype=np.uint8)
    for off in F16_SCALE_OFFSETS[name]:
        sign = rng.choice([-1.0, 1.0], n_blocks)
        vals = (sign * np.exp(rng.uniform(np.log(1e-4), np.log(0.5), n_blocks))).astype(np.float16)
        raw[:, off:off + 2] = vals.view(np.uint8).reshape(n_blocks, 2)
    return raw.reshape(-1)


def can_dequantize(qtype: T) -> bool:
    _, type_size = GGML_QUANT_SIZES[qtype]
    try:
        dequantize(np.zeros(type_size, dtype=np.uint8), qtype)
        return True
    except NotImplementedError:
        return False


def write(path: Path, x, q: np.ndarray, deq: np.ndarray) -> None:
    q = np.ascontiguousarray(q).view(np.uint8).reshape(-1)
    deq = np.ascontiguousarray(deq, dtype=np.float32).reshape(-1)
    with open(path, "wb") as f:
        f.write(b"GQF1")
        f.write(struct.pack("<III", deq.size, q.size, 0 if x is None else 1))
        if x is not None:
            f.write(np.ascontiguousarray(x, dtype="<f4").tobytes())
        f.write(q.tobytes())
        f.write(deq.astype("<f4").tobytes())


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    for old in OUT.glob("*.bin"):
        old.unlink()
    for index, name in enumerate(TYPES):
        qtype = T[name]
        rng = np.random.default_rng(1234 + index)
        x = make_input(name, rng)
        try:
            with np.errstate(over="ignore"):
                q = quantize(x, qtype)
        except NotImplementedError:
            q = None
        if q is not None:
            deq = dequantize(q, qtype)
            write(OUT / f"{name}_roundtrip.bin", x, q, deq)
        if not can_dequantize(qtype):
            print(f"{name}: not supported by the gguf package (no fixture)")
            continue
        raw = random_blocks(name, rng)
        deq = dequantize(raw, qtype)
        write(OUT / f"{name}_random.bin", None, raw, deq)
        print(f"{name}: {'roundtrip + ' if q is not None else ''}random")
    total = sum(p.stat().st_size for p in OUT.glob("*.bin"))
    print(f"total {total} bytes in {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
