#!/usr/bin/env bash
# Dev-only Python environments that produce the reference fixtures (tests never run Python).
#   ref:   transformers + torch + torchvision + gguf (model parity, quantization and vision references),
#          soundfile + soxr (audio references)
#   llama: llama-cpp-python built from source (llama.cpp tokenizer ids; later the speed baseline)
# Usage: scripts/dev-venv.sh [DIR]   (default ~/.venvs)
set -euo pipefail
dir=${1:-$HOME/.venvs}
mkdir -p "$dir"
if [ ! -x "$dir/ref/bin/python" ]; then
  python3 -m venv "$dir/ref"
  # PyPI's Linux torch wheel pulls the CUDA runtime libraries; it runs on CPU all the same.
  "$dir/ref/bin/pip" install -q torch==2.15.0 transformers==5.24.0 accelerate gguf==0.19.0 numpy safetensors sentencepiece tokenizers protobuf jinja2
fi
# Vision fixtures (make_gemma3_vision_fixtures.py, make_image_fixtures.py): torchvision is what makes
# transformers pick its default (torchvision) image processor backend; pillow decodes the images;
# scikit-build-core + cmake only let `pip download --no-build-isolation` read llama-cpp-python's sdist
# metadata (its vendored convert_hf_to_gguf.py writes the GGUFs). Pinned; safe to rerun on an old venv.
"$dir/ref/bin/pip" install -q torch==2.15.0 transformers==5.24.0 torchvision==0.29.2 pillow==13.0.0 \
  numpy==2.4.6 safetensors==0.8.0 sentencepiece==0.2.3 tokenizers==0.23.3 protobuf==7.36.2 jinja2==3.1.6 \
  accelerate==1.16.0 gguf==0.19.0 scikit-build-core==1.1.2 cmake==4.4.5 tqdm==4.70.1 pyyaml==6.0.4 requests==2.34.2
# Audio fixtures (make_audio_fixtures.py): soundfile (bundles libsndfile: WAV/FLAC/OGG/MP3) decodes
# and soxr resamples, the route transformers.audio_utils.load_audio takes without torchcodec.
"$dir/ref/bin/pip" install -q soundfile==0.14.0 soxr==1.1.0
# Gemma 3n vision (make_gemma3n_vision_fixtures.py, make_gemma3n_vision_bench_model.py): timm's
# MobileNet-V5, which transformers' Gemma 3n vision tower wraps.
"$dir/ref/bin/pip" install -q timm==1.0.31
if [ ! -x "$dir/llama/bin/python" ]; then
  python3 -m venv "$dir/llama"
  CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_CUDA=OFF -DLLAMA_CURL=OFF -DGGML_OPENMP=OFF" \
    "$dir/llama/bin/pip" install -q llama-cpp-python numpy
fi
echo "ref:   $dir/ref/bin/python"
echo "llama: $dir/llama/bin/python"
