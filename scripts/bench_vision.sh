#!/usr/bin/env bash
# Vision encode time of one 896x896 image at the real Gemma 3 4B/12B/27B SigLIP shape, gemma-rs
# next to llama.cpp's llama-mtmd-cli on the same mmproj, text model and image, plus peak RSS.
#
# What it does (every step is skipped when its output is already there):
#   1. llama.cpp: downloads the newest llama-cpp-python source package (or
#      $LLAMA_CPP_PYTHON_VERSION) into $BENCH_DIR and builds only llama-mtmd-cli from its
#      vendored llama.cpp (native CPU, release, no GPU backends, no OpenMP).
#   2. Inputs, in $BENCH_DIR/data: the default model (Gemma 3 270M Q4_K_M, fetched by
#      `gemma info`); a copy of it with the vocabulary padded to the multimodal models' 262208
#      entries (<image_soft_token> at 262144, which the 270M lacks and gemma-rs needs, see
#      scripts/make_real_shape_mmproj.py --extend-vocab); a Gemma 3 mmproj at the real SigLIP
#      shape with random weights, projecting to 640 (the 270M's width); a 896x896 PNG.
#   3. Builds gemma from the current tree (`cargo build --release -p gemma-cli`; honours
#      CARGO_TARGET_DIR) unless $GEMMA names a binary.
#   4. For each thread count, REPS times, alternating: llama-mtmd-cli, then gemma, each one
#      process that loads both files, encodes the image and produces one token. Per run it keeps
#      the engine's own image encode time, the whole process's wall time and its peak RSS
#      (GNU time's "Maximum resident set size").
#
# Encode time: llama.cpp's "mtmd batch encoding done in N ms" (older CLIs: "image slice encoded
# in N ms"), around mtmd_batch_encode: the vision tower and the projector, not image decoding or
# resizing, not the 256 tokens' pass through the text model. gemma-rs: the first stderr line matching
# "image ... encoded in N ms" (e.g. "gemma: image 1/1 encoded in 812 ms"), if the CLI prints
# one; otherwise the script falls back to "derived": wall time of the image run minus that of a
# text-only run (`logits --ids`, as many tokens as the image prompt), which also counts loading
# the mmproj and preprocessing the image, and says so in the table.
#
# Usage: scripts/bench_vision.sh [-t "1 2"] [-r REPS] [--prepare-only]
# Environment: BENCH_DIR (default: ../llama-build next to the repository, outside it),
#   LLAMA_CPP_PYTHON_VERSION (default: the newest on the index), PYTHON (default python3),
#   GEMMA (a gemma binary to use instead of building one), LLAMA_MTMD (likewise), CTX (context
#   of both engines, default 4096), KEEP_LOGS=1 (keep each run's stderr under $BENCH_DIR/logs).
# Output: a header (date, commit, CPU, flags, versions, files) and a markdown table, one row per
# engine and thread count; each row gives the median and every run.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BENCH_DIR="${BENCH_DIR:-$(dirname "$ROOT")/llama-build}"
PYTHON="${PYTHON:-python3}"
CTX="${CTX:-4096}"
THREADS="1 2"
REPS=3
PREPARE_ONLY=
PROMPT="Describe this image."

while [[ $# -gt 0 ]]; do
    case "$1" in
        -t) THREADS="$2"; shift 2 ;;
        -r) REPS="$2"; shift 2 ;;
        --prepare-only) PREPARE_ONLY=1; shift ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done

mkdir -p "$BENCH_DIR"
VENV="$BENCH_DIR/venv"
PY="$VENV/bin/python"

ensure_venv() {
    if [[ ! -x "$PY" ]]; then "$PYTHON" -m venv "$VENV" >&2; fi
    if ! "$PY" -c 'import numpy, PIL, yaml, tqdm' 2>/dev/null; then
        "$PY" -m pip install -q numpy pillow pyyaml tqdm >&2
    fi
    if ! command -v cmake >/dev/null || ! command -v ninja >/dev/null; then
        if [[ ! -x "$VENV/bin/cmake" || ! -x "$VENV/bin/ninja" ]]; then
            "$PY" -m pip install -q cmake ninja >&2
        fi
        export PATH="$VENV/bin:$PATH"
    fi
}

# Prints the llama-cpp-python version to use: $LLAMA_CPP_PYTHON_VERSION, else the newest the
# index serves, else (offline) the newest source package already in $BENCH_DIR.
pick_version() {
    if [[ -n "${LLAMA_CPP_PYTHON_VERSION:-}" ]]; then echo "$LLAMA_CPP_PYTHON_VERSION"; return; fi
    local v
    v=$("$PY" -m pip index versions llama-cpp-python 2>/dev/null \
        | sed -n 's/^llama-cpp-python (\(.*\))$/\1/p' | head -1 || true)
    if [[ -z "$v" ]]; then
        v=$(ls "$BENCH_DIR"/llama_cpp_python-*.tar.gz 2>/dev/null | sed 's/.*llama_cpp_python-\(.*\)\.tar\.gz/\1/' \
            | sort -V | tail -1 || true)
    fi
    if [[ -z "$v" ]]; then echo "cannot find a llama-cpp-python version" >&2; exit 1; fi
    echo "$v"
}

build_llama_mtmd() {
    local version="$1"
    local src="$BENCH_DIR/src-$version" build="$BENCH_DIR/build-$version"
    local bin="$build/bin/llama-mtmd-cli"
    if [[ -x "$bin" ]]; then echo "$bin"; return; fi
    local sdist="$BENCH_DIR/llama_cpp_python-$version.tar.gz"
    if [[ ! -f "$sdist" ]]; then
        # `--no-binary llama-cpp-python` rather than `:all:`, which would also build pip's build
        # dependencies (cmake itself) from source just to read the package's metadata.
        "$PY" -m pip download -q --no-deps --no-binary llama-cpp-python -d "$BENCH_DIR" \
            "llama-cpp-python==$version" >&2
    fi
    if [[ ! -f "$src/vendor/llama.cpp/CMakeLists.txt" ]]; then
        rm -rf "$src" && mkdir -p "$src"
        tar -xzf "$sdist" -C "$src" --strip-components=1
    fi
    cmake -S "$src/vendor/llama.cpp" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_OPENMP=OFF \
        -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_SERVER=OFF >&2
    cmake --build "$build" --target llama-mtmd-cli -j "$(nproc)" >&2
    echo "$bin"
}

ensure_venv
VERSION=$(pick_version)
LLAMA_MTMD="${LLAMA_MTMD:-$(build_llama_mtmd "$VERSION")}"
GGUF_PY="$BENCH_DIR/src-$VERSION/vendor/llama.cpp/gguf-py"

if [[ -z "${GEMMA:-}" ]]; then
    (cd "$ROOT" && cargo build --release -q -p gemma-cli >&2)
    GEMMA="${CARGO_TARGET_DIR:-$ROOT/target}/release/gemma"
fi

DATA="$BENCH_DIR/data"
mkdir -p "$DATA"
TEXT_BASE="${GEMMA_CACHE_DIR:-$HOME/.cache/gemma-rs}/models/gemma-3-270m-q4_k_m.gguf"
if [[ ! -f "$TEXT_BASE" ]]; then "$GEMMA" info >/dev/null; fi
TEXT="$DATA/gemma-3-270m-q4_k_m-vocab262208.gguf"
MMPROJ="$DATA/mmproj-gemma3-siglip-real-shape-640.gguf"
IMAGE="$DATA/image-896.png"
MAKE=("$PY" "$ROOT/scripts/make_real_shape_mmproj.py" --gguf-py "$GGUF_PY")
[[ -f "$TEXT" ]] || "${MAKE[@]}" --extend-vocab "$TEXT_BASE" "$TEXT"
[[ -f "$MMPROJ" ]] || "${MAKE[@]}" --out "$MMPROJ" --text-model "$TEXT"
[[ -f "$IMAGE" ]] || "${MAKE[@]}" --image "$IMAGE"

if [[ -n "$PREPARE_ONLY" ]]; then
    printf "llama-mtmd-cli: %s\ngemma: %s\ntext: %s\nmmproj: %s\nimage: %s\n" \
        "$LLAMA_MTMD" "$GEMMA" "$TEXT" "$MMPROJ" "$IMAGE"
    exit 0
fi

LOGS="$BENCH_DIR/logs"
mkdir -p "$LOGS"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# Runs "$@" under GNU time; prints "ENCODE_MS WALL_S RSS_KIB" (ENCODE_MS "-" if not found).
# $1: a name for the log, $2: a regex (sed -E) whose last group is the encode time in ms.
timed() {
    local name="$1" regex="$2"; shift 2
    local log="$TMP/$name.log"
    local enc wall rss
    if ! /usr/bin/time -v -o "$TMP/$name.time" "$@" >"$TMP/$name.out" 2>"$log" </dev/null; then
        # Reported in the table as "failed"; the log is kept for a look.
        cp "$log" "$LOGS/$name.log"
        echo "$name failed, see $LOGS/$name.log: $(grep -v '^\s*$' "$log" | tail -1)" >&2
        echo "failed - -"
        return
    fi
    enc=$(sed -nE "s/$regex/\\2/p" "$log" | head -1)
    wall=$(sed -n 's/.*Elapsed (wall clock) time (h:mm:ss or m:ss): //p' "$TMP/$name.time" \
        | awk -F: '{ s = 0; for (i = 1; i <= NF; i++) s = s * 60 + $i; print s }')
    rss=$(sed -n 's/.*Maximum resident set size (kbytes): //p' "$TMP/$name.time")
    if [[ -n "${KEEP_LOGS:-}" ]]; then cp "$log" "$LOGS/$name.log"; fi
    echo "${enc:--} $wall $rss"
}

# llama-mtmd-cli logs "mtmd batch encoding done in N ms" around mtmd_batch_encode (this
# version's CLI); older ones and mtmd-helper log "image slice encoded in N ms".
LLAMA_RE='^.*(image slice encoded in|mtmd batch encoding done in) ([0-9.]+) ms.*$'
GEMMA_RE='^.*(image.* encoded in) ([0-9.]+) ?ms.*$'

run_llama() {  # threads rep
    timed "llama-t$1-r$2" "$LLAMA_RE" "$LLAMA_MTMD" -m "$TEXT" --mmproj "$MMPROJ" \
        --image "$IMAGE" -p "$PROMPT" -n 1 -t "$1" -c "$CTX" --temp 0 --seed 1 \
        --chat-template gemma  # the 270M GGUF has no chat template, which the CLI requires
}
run_gemma() {
    timed "gemma-t$1-r$2" "$GEMMA_RE" "$GEMMA" --threads "$1" --ctx-size "$CTX" \
        --model "$TEXT" --mmproj "$MMPROJ" logits --top 1 --image "$IMAGE" "$PROMPT"
}
# Text-only run as long as the image prompt: BOS, <start_of_image>, 256 soft tokens,
# <end_of_image>, and the prompt's few tokens (8 more), all plain text ids here.
run_gemma_text() {
    local ids="2" i
    for ((i = 0; i < 266; i++)); do ids="$ids,1000"; done
    timed "gemma-text-t$1-r$2" '^(x)(y)$' "$GEMMA" --threads "$1" --ctx-size "$CTX" \
        --model "$TEXT" logits --top 1 --ids "$ids"
}

median() { tr ' ' '\n' | { grep -E '^[0-9.]+$' || true; } | sort -g | awk '{ a[NR] = $1 } END {
    if (NR == 0) { print "-"; exit } if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }

commit=$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)
dirty=$(cd "$ROOT" && git status --porcelain --untracked-files=no 2>/dev/null | head -1)
printf "date: %s\n" "$(date -u '+%Y-%m-%d %H:%M UTC')"
printf "gemma-rs: %s%s, %s\n" "$commit" "${dirty:+ (+ uncommitted changes)}" "$("$GEMMA" --version 2>&1 | head -1)"
llama_version=$("$LLAMA_MTMD" --version 2>&1 || true)
printf "llama.cpp: llama-cpp-python %s vendored, %s\n" "$VERSION" \
    "$(echo "$llama_version" | grep '^version' | head -1)"
printf "machine: %s, %s cores, %s\n" "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)" \
    "$(nproc)" "$(grep -o 'avx512[a-z_0-9]*\|avx2\|f16c\|fma\|amx[a-z_0-9]*' /proc/cpuinfo | sort -u | xargs)"
printf "load: %s\n" "$(cut -d' ' -f1-3 /proc/loadavg)"
printf "text model: %s (%s MB); mmproj: %s (%s MB); image: %s 896x896\n" "$(basename "$TEXT")" \
    "$(( $(stat -c %s "$TEXT") / 1000000 ))" "$(basename "$MMPROJ")" \
    "$(( $(stat -c %s "$MMPROJ") / 1000000 ))" "$(basename "$IMAGE")"
printf "per run: one process, load + encode one image + 1 token; context %s; %s runs each, alternating\n\n" "$CTX" "$REPS"

printf "| engine | threads | image encode ms, median | runs (ms) | process wall s, median | peak RSS MiB, max |\n"
printf "|---|---:|---:|---|---:|---:|\n"
for t in $THREADS; do
    l_enc=() l_wall=() l_rss=() g_enc=() g_wall=() g_rss=() g_text=()
    for ((r = 1; r <= REPS; r++)); do
        read -r e w m < <(run_llama "$t" "$r"); l_enc+=("$e"); l_wall+=("$w"); l_rss+=("$m")
        read -r e w m < <(run_gemma "$t" "$r"); g_enc+=("$e"); g_wall+=("$w"); g_rss+=("$m")
        if [[ "$e" == "-" && "$w" != "-" ]]; then
            read -r _ w2 _ < <(run_gemma_text "$t" "$r"); g_text[r - 1]="$w2"
        fi
    done
    max_mib() { printf '%s\n' "$@" | { grep -E '^[0-9]+$' || true; } | sort -g | tail -1 \
        | awk '{ m = $1 } END { if (NR) printf "%.0f", m / 1024; else printf "-" }'; }
    printf "| llama.cpp | %s | %s | %s | %s | %s |\n" "$t" "$(echo "${l_enc[*]}" | median)" \
        "${l_enc[*]}" "$(echo "${l_wall[*]}" | median)" "$(max_mib "${l_rss[@]}")"
    if [[ ${#g_text[@]} -eq 0 ]]; then
        printf "| gemma-rs | %s | %s | %s | %s | %s |\n" "$t" "$(echo "${g_enc[*]}" | median)" \
            "${g_enc[*]}" "$(echo "${g_wall[*]}" | median)" "$(max_mib "${g_rss[@]}")"
    else
        # No engine-reported encode time: wall(image run) - wall(text-only run), in ms.
        derived=()
        for i in "${!g_text[@]}"; do
            [[ "${g_text[$i]}" == "-" ]] && continue
            derived+=("$(awk -v a="${g_wall[$i]}" -v b="${g_text[$i]}" 'BEGIN { printf "%.0f", (a - b) * 1000 }')")
        done
        printf "| gemma-rs (derived: wall image run - wall text-only run) | %s | %s | %s | %s | %s |\n" \
            "$t" "$(echo "${derived[*]}" | median)" "${derived[*]}" \
            "$(echo "${g_wall[*]}" | median)" "$(max_mib "${g_rss[@]}")"
    fi
done
