#!/usr/bin/env bash
# Gemma 3n vision encode speed at the real MobileNet-V5-300M shape (random weights): encode time
# and frames/s of one 768x768 image at each thread count, load time and peak RSS, from
# crates/models/examples/vision3n_encode.rs.
#
#   1. Makes the model once: scripts/make_gemma3n_vision_bench_model.py (timm's own
#      `mobilenetv5_300m_enc`, bf16 tower as in the published checkpoints, embed_vision to
#      TEXT_HIDDEN) into $MODEL_DIR (default /tmp/gemma3n-vision-300m, not in the repository).
#   2. Builds the example (release; honours CARGO_TARGET_DIR).
#   3. For each thread count, one process per thread count (GEMMA_THREADS=N): a first encode
#      (pages the weights in), then REPS timed encodes; the JSON line of each run is kept.
#
# llama.cpp comparison (when LLAMA_MTMD names llama-cpp-python 0.3.36's `llama-mtmd-cli`, which
# has a Gemma 3n vision graph): the same folder converted by llama.cpp's own converter
# (`convert_hf_to_gguf.py --mmproj --outtype f16`, PYTHONPATH=<llama.cpp>/gguf-py; LLAMA_SRC
# names that llama.cpp tree), made usable by its CLI with scripts/gemma3n_mmproj_for_llama_cpp.py
# (the converter marks an audio encoder that is not there and keeps the layer-scale gammas [C],
# which its graph rejects), beside a text model exactly 2048 wide (llama.cpp reads the mmproj's
# width from the projection's other axis): TEXT_GGUF, e.g. gemma3n_synth's real-shape E2B given
# a tokenizer by scripts/gguf_with_tokenizer.py. For each thread count: gemma-rs's encode of
# that same f16 mmproj file (`vision3n_encode MMPROJ`), then llama-mtmd-cli's
# "mtmd batch encoding done in N ms" for one image (REPS runs, median).
#
#   --check: instead of timing, encodes one image (fixtures/images/rgb_300x200.png resized by the
#      reference processor) with gemma-rs and with timm on the same weights and prints the
#      largest difference of the tower's output (a correctness check at the real shape).
#
# Usage: scripts/bench_vision_gemma3n.sh [-t "1 2"] [-r REPS] [--check]
# Environment: MODEL_DIR, PYTHON (default ~/.venvs/ref/bin/python), TEXT_HIDDEN (default 2048),
#   LLAMA_MTMD, LLAMA_SRC, TEXT_GGUF (the llama.cpp comparison).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
MODEL_DIR="${MODEL_DIR:-/tmp/gemma3n-vision-300m}"
PYTHON="${PYTHON:-$HOME/.venvs/ref/bin/python}"
TEXT_HIDDEN="${TEXT_HIDDEN:-2048}"
THREADS="1 2"
REPS=3
CHECK=
while [[ $# -gt 0 ]]; do
    case "$1" in
        -t) THREADS="$2"; shift 2 ;;
        -r) REPS="$2"; shift 2 ;;
        --check) CHECK=1; shift ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done

if [[ ! -f "$MODEL_DIR/model.safetensors" ]]; then
    echo "making the real-shape random tower in $MODEL_DIR" >&2
    "$PYTHON" "$ROOT/scripts/make_gemma3n_vision_bench_model.py" "$MODEL_DIR" --text-hidden "$TEXT_HIDDEN" >&2
fi

cd "$ROOT"
cargo build --release -p gemma-models --example vision3n_encode >&2
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
BIN="$TARGET/release/examples/vision3n_encode"

if [[ -n "$CHECK" ]]; then
    px="$ROOT/fixtures/gemma3n_vision_tiny/ref/rgb_300x200.pixels.u8.bin"
    "$BIN" "$MODEL_DIR" --check "$px" "$MODEL_DIR/gemma-rs.tower.f32.bin"
    "$PYTHON" - "$MODEL_DIR" "$px" <<'PY'
import sys, numpy as np, torch, timm
from safetensors.torch import load_file
folder, px = sys.argv[1], sys.argv[2]
pre = "model.vision_tower.timm_model."
sd = {k[len(pre):]: v.float() for k, v in load_file(f"{folder}/model.safetensors").items() if k.startswith(pre)}
m = timm.create_model("mobilenetv5_300m_enc").eval()
m.load_state_dict(sd)
x = torch.from_numpy(np.fromfile(px, np.uint8).reshape(1, 3, 768, 768).astype(np.float32) / 255)
with torch.no_grad():
    ref = m(x)[0].reshape(2048, -1).T.numpy() * 2048**0.5
ours = np.fromfile(f"{folder}/gemma-rs.tower.f32.bin", "<f4").reshape(ref.shape)
d = np.abs(ours - ref).max()
print(f"real-shape tower: max |gemma-rs - timm| = {d:.3e} (x sqrt(2048) scale; unscaled {d / 2048**0.5:.3e}), "
      f"output RMS {np.sqrt((ref ** 2).mean()):.3f}")
PY
    exit 0
fi

echo "# Gemma 3n vision encode, MobileNet-V5-300M (random weights, bf16), 768x768 -> 256 tokens"
echo "date: $(date -u +%Y-%m-%dT%H:%MZ), commit: $(git rev-parse --short HEAD)"
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(nproc) cores"
echo
echo "| threads | encode ms (median) | frames/s | first encode ms | load ms | peak RSS MiB | runs ms |"
echo "| ---: | ---: | ---: | ---: | ---: | ---: | --- |"
for t in $THREADS; do
    line="$(GEMMA_THREADS="$t" "$BIN" "$MODEL_DIR" "$REPS" 2>/dev/null | tail -1)"
    "$PYTHON" - "$line" <<'PY'
import json, sys
j = json.loads(sys.argv[1])
print(f"| {j['threads']} | {j['encode_ms_median']:.0f} | {j['frames_per_s']:.2f} | "
      f"{j['first_encode_ms']:.0f} | {j['load_ms']:.0f} | {j['peak_rss_mib']} | {j['encode_ms']} |")
PY
done

if [[ -n "${LLAMA_MTMD:-}" ]]; then
    : "${LLAMA_SRC:?LLAMA_SRC: the llama.cpp source tree (its convert_hf_to_gguf.py and gguf-py)}"
    : "${TEXT_GGUF:?TEXT_GGUF: a 2048-wide Gemma 3n text GGUF with a tokenizer}"
    mmproj="$MODEL_DIR/mmproj-f16.gguf"
    if [[ ! -f "$MODEL_DIR/mmproj-llama.gguf" ]]; then
        PYTHONPATH="$LLAMA_SRC/gguf-py" "$PYTHON" "$LLAMA_SRC/convert_hf_to_gguf.py" --mmproj \
            --outtype f16 --outfile "$mmproj" "$MODEL_DIR" >&2
        "$PYTHON" "$ROOT/scripts/gemma3n_mmproj_for_llama_cpp.py" "$mmproj" "$MODEL_DIR/mmproj-llama.gguf" >&2
    fi
    img="$ROOT/fixtures/images/rgb_300x200.png"
    echo
    echo "Same f16 mmproj (llama.cpp's conversion), gemma-rs vs llama-mtmd-cli, median of $REPS:"
    echo
    echo "| threads | gemma-rs encode ms | llama.cpp encode ms | ratio |"
    echo "| ---: | ---: | ---: | ---: |"
    for t in $THREADS; do
        ours="$(GEMMA_THREADS="$t" "$BIN" "$MODEL_DIR/mmproj-llama.gguf" "$REPS" 2>/dev/null | tail -1)"
        theirs=()
        for _ in $(seq "$REPS"); do
            ms="$("$LLAMA_MTMD" -m "$TEXT_GGUF" --mmproj "$MODEL_DIR/mmproj-llama.gguf" --chat-template gemma \
                --image "$img" -p "Describe this image." -n 1 -t "$t" 2>&1 \
                | sed -n 's/.*mtmd batch encoding done in \([0-9.]*\) ms.*/\1/p' | tail -1)"
            theirs+=("$ms")
        done
        "$PYTHON" - "$ours" "${theirs[@]}" <<'PY'
import json, statistics, sys
j = json.loads(sys.argv[1])
theirs = statistics.median(float(x) for x in sys.argv[2:])
print(f"| {j['threads']} | {j['encode_ms_median']:.0f} | {theirs:.0f} | **{theirs / j['encode_ms_median']:.2f}×** |")
PY
    done
fi
