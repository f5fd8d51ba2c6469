#!/usr/bin/env python3
"""Makes llama.cpp's converted Gemma 3n mmproj usable by its own llama-mtmd-cli for a vision-only
benchmark (run with PYTHONPATH=<llama.cpp>/gguf-py):

- `clip.has_audio_encoder` is dropped: the benchmark folder has no audio tower (the converter
  writes that flag for every Gemma 3n whatever tensors it finds);
- the blocks' `layer_scale.gamma` are stored `[1, C, 1, 1]` (ne `[1, 1, C, 1]`): the converter of
  llama-cpp-python 0.3.36's llama.cpp leaves them `[C]` (its block path returns before the
  unsqueeze it applies to other gammas), and the graph's `ggml_mul` then fails
  `ggml_can_repeat`.

  gemma3n_mmproj_for_llama_cpp.py IN.gguf OUT.gguf
"""
import sys

import gguf
import numpy as np


def main():
    src, dst = sys.argv[1], sys.argv[2]
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, arch=str(bytes(r.fields["general.architecture"].parts[-1]), "utf-8"))
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "clip.has_audio_encoder"):
            continue
        vtype = f.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            sub = f.types[-1]
            if sub == gguf.GGUFValueType.STRING:
                val = [str(bytes(f.parts[i]), "utf-8") for i in f.data]
            else:
                val = [f.parts[i].tolist()[0] for i in f.data]
            w.add_array(name, val)
        elif vtype == gguf.GGUFValueType.STRING:
            w.add_string(name, str(bytes(f.parts[-1]), "utf-8"))
        else:
            w.add_key_value(name, f.parts[-1].tolist()[0], vtype)
    for t in r.tensors:
        data = np.array(t.data)
        shape = list(reversed([int(d) for d in t.shape]))  # outermost first
        if t.name.endswith("layer_scale.gamma") and len(shape) == 1:
            data = data.reshape(1, shape[0], 1, 1)
        else:
            data = data.reshape(shape) if data.ndim == len(shape) or t.tensor_type in (
                gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) else data
        w.add_tensor(t.name, data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    main()
