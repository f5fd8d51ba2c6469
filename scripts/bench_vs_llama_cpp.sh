#!/usr/bin/env bash
# Side-by-side CPU speed of gemma-rs and llama.cpp on the same GGUF, machine and thread count.
#
# Builds llama.cpp's `llama-bench` (and `llama-server`, `llama-mtmd-cli` for the server and vision
# comparisons) from the llama-cpp-python source package (which vendors llama.cpp; pinned to the
# newest release the package index served when this was last run) into $BENCH_DIR (default:
# target/llama-cpp-<version>), builds `gemma` in release, prints llama.cpp's build id, the CPU's
# instruction sets and the measured read bandwidth, then runs every test with both engines
# alternately (llama.cpp, gemma, llama.cpp, gemma, ...) and prints tokens/s of each and the ratio
# gemma / llama.cpp. Generation tests also get gemma-rs's fraction of the bandwidth limit
# (weight bytes read per token over the measured read bandwidth, `gemma bench --read-bandwidth`).
#
# Usage: scripts/bench_vs_llama_cpp.sh [-m MODEL] [-t "1 2"] [-r REPS] [--tests "pp512 tg128 ..."]
# Tests: ppN (prompt of N tokens), tgN (N generated tokens), tgN@dD / ppN@dD (after D tokens).
# pp32 doubles as time to first token (TTFT = 32 / t/s: the prompt's forward pass yields the
# first token's logits). A last row per thread count compares peak RSS (GNU time's %M) of one
# run generating 128 tokens at a 4096-token context (-d 3968 -n 128).
# Environment: LLAMA_CPP_PYTHON_VERSION (default 0.3.36, the newest on 2026-12-06), BENCH_DIR, PYTHON (default python3),
# CACHE_TYPE (KV cache of both engines: f16, the default of both, or q8_0 / f32; llama.cpp
# stores a quantized V cache only with flash attention, so q8_0 adds -fa 1 to llama-bench),
# LLAMA_ARGS (extra llama-bench flags, e.g. "-mmp 0" to read the weights into memory instead of
# mapping the file) and GEMMA_ARGS (extra global gemma flags, e.g. "--mmap" to map the file
# instead of gemma's default copy into huge pages).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
MODEL="${GEMMA_CACHE_DIR:-$HOME/.cache/gemma-rs}/models/gemma-3-270m-q4_k_m.gguf"
THREADS="1 2"
REPS=3
BUILD_ONLY=
TESTS="pp512 tg128 tg128@d4096 pp8192 pp32"
PYTHON="${PYTHON:-python3}"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
BENCH_DIR="${BENCH_DIR:-$ROOT/target/llama-cpp-$VERSION}"
CACHE_TYPE="${CACHE_TYPE:-f16}"

while [[ $# -gt 0 ]]; do
    case "$1" in
        -m) MODEL="$2"; shift 2 ;;
        -t) THREADS="$2"; shift 2 ;;
        -r) REPS="$2"; shift 2 ;;
        --tests) TESTS="$2"; shift 2 ;;
        --build-only) BUILD_ONLY=1; shift ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done

build_llama_bench() {
    local bin="$BENCH_DIR/build/bin/llama-bench"
    if [[ -x "$bin" ]]; then echo "$bin"; return; fi
    mkdir -p "$BENCH_DIR"
    if [[ ! -d "$BENCH_DIR/venv" ]]; then
        "$PYTHON" -m venv "$BENCH_DIR/venv" >&2
    fi
    local py="$BENCH_DIR/venv/bin/python"
    if ! command -v cmake >/dev/null || ! command -v ninja >/dev/null; then
        "$py" -m pip install -q cmake ninja >&2
        export PATH="$BENCH_DIR/venv/bin:$PATH"
    fi
    local sdist
    sdist=$(ls "$BENCH_DIR"/llama_cpp_python-*.tar.gz 2>/dev/null | head -1 || true)
    if [[ -z "$sdist" ]]; then
        # `--no-binary llama-cpp-python` rather than `:all:`: the latter also builds pip's build
        # dependencies (cmake itself) from source just to read the package metadata.
        "$py" -m pip download -q --no-deps --no-binary llama-cpp-python -d "$BENCH_DIR" \
            "llama-cpp-python==$VERSION" >&2
        sdist=$(ls "$BENCH_DIR"/llama_cpp_python-*.tar.gz | head -1)
    fi
    rm -rf "$BENCH_DIR/src" && mkdir -p "$BENCH_DIR/src"
    tar -xzf "$sdist" -C "$BENCH_DIR/src" --strip-components=1
    # Native CPU build, release, no GPU backends: the configuration llama.cpp is fastest with here.
    cmake -S "$BENCH_DIR/src/vendor/llama.cpp" -B "$BENCH_DIR/build" -G Ninja \
        -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_METAL=OFF \
        -DGGML_VULKAN=OFF -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON \
        -DLLAMA_BUILD_SERVER=ON >&2
    cmake --build "$BENCH_DIR/build" --target llama-bench llama-server llama-mtmd-cli \
        -j "$(nproc)" >&2
    echo "$bin"
}

if [[ -n "${BUILD_ONLY:-}" ]]; then build_llama_bench; exit 0; fi

LLAMA_BENCH=$(build_llama_bench)
(cd "$ROOT" && cargo build --release -q --bin gemma)
GEMMA="$ROOT/target/release/gemma"

# `pp512@d4096` -> "-p 512 -n 0 -d 4096"; `tg128` -> "-p 0 -n 128 -d 0".
test_flags() {
    local t="$1" depth=0 kind n
    if [[ "$t" == *@d* ]]; then depth="${t#*@d}"; t="${t%@d*}"; fi
    kind="${t:0:2}"; n="${t:2}"
    if [[ "$kind" == pp ]]; then echo "-p $n -n 0 -d $depth"; else echo "-p 0 -n $n -d $depth"; fi
}

# Mean tokens/s from a llama-bench-style JSON array (first object).

extract() {
    "$PYTHON" -c '
import json, sys
rows = json.loads(sys.stdin.read())
r = rows[0]
print(r.get("avg_ts", r.get("tokens_per_second")))'
}

# The instruction sets the kernels of either engine can use.
isa=$(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -xE \
    'avx|avx2|fma|f16c|avx512f|avx512bw|avx512vl|avx512dq|avx512_vnni|avx512_bf16|avx_vnni|amx_tile|amx_int8|amx_bf16' \
    | xargs)
printf "model: %s\nmachine: %s, %s cores\ninstruction sets: %s\ncommit: %s\n" "$MODEL" \
    "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)" "$(nproc)" "$isa" \
    "$(cd "$ROOT" && git rev-parse HEAD 2>/dev/null || echo unknown)"
llama_version=$("$LLAMA_BENCH" --version 2>&1 || true)
printf "llama.cpp: llama-cpp-python %s, %s\n" "$VERSION" "$(echo "$llama_version" | head -1)"
for threads in $THREADS; do
    # The read bandwidth on this many threads and the weight bytes a generated token reads.
    bw_json=$("$GEMMA" bench -m "$MODEL" -p 0 -n 1 -r 1 -t "$threads" --read-bandwidth --json 2>/dev/null)
    "$PYTHON" -c '
import json, sys
r = json.loads(sys.argv[1])[0]
bw, per_token = r["read_bandwidth_bytes_per_s"], r["weight_bytes_per_token"]
print(f"read bandwidth, {r['"'"'threads'"'"']} thread(s): {bw / 1e9:.2f} GB/s; weights read per "
      f"generated token: {per_token / 1e6:.1f} MB; bandwidth limit: {bw / per_token:.1f} t/s")' "$bw_json"
done
echo
LLAMA_CACHE="-ctk $CACHE_TYPE -ctv $CACHE_TYPE"
if [[ "$CACHE_TYPE" == q* ]]; then LLAMA_CACHE="$LLAMA_CACHE -fa 1"; fi
GEMMA_CACHE="--cache-type $CACHE_TYPE"
LLAMA_CACHE="$LLAMA_CACHE ${LLAMA_ARGS:-}"
GEMMA_CACHE="$GEMMA_CACHE ${GEMMA_ARGS:-}"
printf "KV cache: %s; extra llama-bench flags: '%s'; extra gemma flags: '%s'\n\n" "$CACHE_TYPE" \
    "${LLAMA_ARGS:-}" "${GEMMA_ARGS:-}"
printf "| test | threads | llama.cpp t/s | gemma-rs t/s | ratio |\n|---|---|---|---|---|\n"
for threads in $THREADS; do
    for t in $TESTS; do
        flags=$(test_flags "$t")
        # shellcheck disable=SC2086
        llama=$("$LLAMA_BENCH" -m "$MODEL" $flags $LLAMA_CACHE -t "$threads" -r "$REPS" -o json 2>/dev/null | extract)
        # shellcheck disable=SC2086
        gemma=$("$GEMMA" $GEMMA_CACHE bench -m "$MODEL" $flags -t "$threads" -r "$REPS" --json 2>/dev/null | extract)
        ratio=$("$PYTHON" -c "print(f'{$gemma / $llama:.2f}')")
        printf "| %s | %s | %.1f | %.1f | %s |\n" "$t" "$threads" "$llama" "$gemma" "$ratio"
    done
    # shellcheck disable=SC2086
    rss_llama=$(/usr/bin/time -f %M "$LLAMA_BENCH" -m "$MODEL" -p 0 -n 128 -d 3968 $LLAMA_CACHE \
        -t "$threads" -r 1 -o json 2>&1 >/dev/null | tail -1)
    # shellcheck disable=SC2086
    rss_gemma=$(/usr/bin/time -f %M "$GEMMA" $GEMMA_CACHE bench -m "$MODEL" -p 0 -n 128 -d 3968 \
        -t "$threads" -r 1 --json 2>&1 >/dev/null | tail -1)
    ratio=$("$PYTHON" -c "print(f'{$rss_gemma / $rss_llama:.2f}')")
    printf "| peak RSS MiB, tg128 at ctx 4096 | %s | %.1f | %.1f | %s |\n" "$threads" \
        "$(echo "$rss_llama / 1024" | bc -l)" "$(echo "$rss_gemma / 1024" | bc -l)" "$ratio"
done
