#!/usr/bin/env python3
"""Reference view of the default model's GGUF header, read with the PyPI `gguf` package.

Writes fixtures/formats/default_model_gguf.json: header counts, alignment, data offset, every
metadata entry (scalars in full; arrays as type, length, first 5 and last element) and every
tensor (ggml type name, shape outermost first, absolute offset, byte size, first 8 bytes).

  /root/.venvs/ref/bin/python scripts/make_gguf_reference.py ~/.cache/gemma-rs/models/gemma-3-270m-q4_k_m.gguf
"""
import json
import os
import sys

import gguf
import numpy as np

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "formats", "default_model_gguf.json")


def scalar(field, index):
    part = field.parts[index]
    if field.types[-1] == gguf.GGUFValueType.STRING:
        return part.tobytes().decode("utf-8")
    value = part.tolist()[0]
    return value


def describe_field(field):
    types = [t.name for t in field.types]
    if field.types[0] == gguf.GGUFValueType.ARRAY:
        values = [scalar(field, i) for i in field.data]
        return {
            "type": types,
            "length": len(values),
            "first": values[:5],
            "last": values[-1] if values else None,
        }
    return {"type": types, "value": scalar(field, field.data[0])}


def main(path):
    reader = gguf.GGUFReader(path)
    raw = np.memmap(path, mode="r")
    metadata = {}
    header = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            header[name] = scalar(field, field.data[0])
        else:
            metadata[name] = describe_field(field)
    tensors = []
    for t in reader.tensors:
        start = int(t.data_offset)
        tensors.append({
            "name": t.name,
            "type": t.tensor_type.name,
            "shape": [int(d) for d in reversed(t.shape.tolist())],
            "offset": start,
            "n_bytes": int(t.n_bytes),
            "first_bytes": bytes(raw[start:start + 8]).hex(),
        })
    out = {
        "version": header["GGUF.version"],
        "tensor_count": header["GGUF.tensor_count"],
        "kv_count": header["GGUF.kv_count"],
        "alignment": int(reader.alignment),
        "data_offset": int(reader.data_offset),
        "file_size": os.path.getsize(path),
        "metadata_keys_in_order": list(metadata.keys()),
        "metadata": metadata,
        "tensors": tensors,
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(out, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {OUT}: {len(metadata)} metadata entries, {len(tensors)} tensors")


if __name__ == "__main__":
    main(os.path.expanduser(sys.argv[1]))
