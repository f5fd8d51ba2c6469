#!/usr/bin/env bash
# Peak resident memory of Gemma 3n at real E2B / E4B text-decoder shapes (random Q4_0
# weights, PLE table included; built here, never committed), generating 64 tokens.
# Usage: scripts/gemma3n_memory.sh [e2b] [e4b]   (default: both; e4b also measures E4B with
# every MLP cut to 8192 units by MatFormer extraction)
# Synthetic files go to $GEMMA3N_MEM_DIR (default /tmp/gemma3n-mem) and are deleted after.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${GEMMA3N_MEM_DIR:-/tmp/gemma3n-mem}"
tokens="${GEMMA3N_MEM_TOKENS:-64}"
shapes=("$@")
[ ${#shapes[@]} -eq 0 ] && shapes=(e2b e4b)

cargo build --release -q -p gemma-models --example gemma3n_synth
bin=target/release/examples/gemma3n_synth
mkdir -p "$dir"
trap 'rm -rf "$dir"' EXIT
for shape in "${shapes[@]}"; do
    file="$dir/$shape.gguf"
    echo "== $shape: writing $file" >&2
    "$bin" write "$shape" "$file"
    # Drop the written file from the page cache so the run starts cold (best effort).
    if command -v dd >/dev/null; then dd of="$file" oflag=nocache conv=notrunc,fdatasync count=0 status=none || true; fi
    "$bin" run "$file" "$tokens"
    if [ "$shape" = e4b ]; then
        # The MatFormer route to a smaller model: E4B with every MLP cut to E2B's 8192 units.
        echo "== e4b sliced to FFN 8192 (gemma extract --matformer)" >&2
        "$bin" slice "$file" 8192 "$dir/e4b-8192.gguf"
        rm -f "$file"
        "$bin" run "$dir/e4b-8192.gguf" "$tokens"
        rm -f "$dir/e4b-8192.gguf"
    fi
    rm -f "$file"
done
