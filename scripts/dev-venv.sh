#!/usr/bin/env bash
# Dev-only Python environments that produce the reference fixtures (tests never run Python).
#   ref:   transformers + torch + gguf (model parity, quantization references)
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
if [ ! -x "$dir/llama/bin/python" ]; then
  python3 -m venv "$dir/llama"
  CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_CUDA=OFF -DLLAMA_CURL=OFF -DGGML_OPENMP=OFF" \
    "$dir/llama/bin/pip" install -q llama-cpp-python numpy
fi
echo "ref:   $dir/ref/bin/python"
echo "llama: $dir/llama/bin/python"
