#!/usr/bin/env bash
# Streaming-audio latency of Gemma 3n at the real E2B shapes (random weights; built here, never
# committed): 30 s of audio pushed in 160 ms chunks through the live path (log-mel, streaming
# USM encoder, embed_audio, the E2B decoder appending the tokens to its KV cache), and the
# whole-clip encode of the same 30 s, then the same 30 s arriving in real time (each push takes
# what has arrived; per-token lag). One JSON line per tower weight type (bf16 as published, and
# q8_0: --audio-weights q8_0) and thread count; the machine's CPU flags and load first.
# Goal (issue 11): under 100 ms per 160 ms chunk.
# Usage: scripts/bench_audio.sh [THREADS...]   (default: 1 2)
# Synthetic files go to $GEMMA_AUDIO_BENCH_DIR (default /tmp/gemma3n-audio-bench), deleted after.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${GEMMA_AUDIO_BENCH_DIR:-/tmp/gemma3n-audio-bench}"
threads=("$@")
[ ${#threads[@]} -eq 0 ] && threads=(1 2)

cargo build --release -q -p gemma-models --example gemma3n_synth
cargo build --release -q -p gemma-engine --example audio_latency
mkdir -p "$dir"
trap 'rm -rf "$dir"' EXIT
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
echo "load: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "commit: $(git rev-parse --short HEAD)$(git diff --quiet || echo ' (+ uncommitted changes)')"
echo "isa: $(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx2|fma|f16c|avx512f|avx512bw|avx512vl|avx512_vnni|avx512_bf16|avx_vnni)$' | tr '\n' ' ')"
target/release/examples/audio_latency write "$dir/tower"
target/release/examples/gemma3n_synth write e2b "$dir/e2b.gguf"
for w in bf16 q8_0; do
    for t in "${threads[@]}"; do
        AUDIO_WEIGHTS="$w" GEMMA_THREADS="$t" \
            target/release/examples/audio_latency run "$dir/tower" "$dir/e2b.gguf"
    done
done
