#!/usr/bin/env python3
"""Server throughput of `gemma serve` next to llama.cpp's `llama-server` (stdlib only).

Both servers get the same model file, slot count, per-slot context and thread count, and the
same workload, one engine after the other on loopback:

  * every request is a streamed chat completion (`stream: true`, usage in the last chunk);
  * prompts rotate between short questions and a long one (a 2,100-token document followed by
    a question), and two of every three requests start with the same long system prompt
    (prefix-cache traffic);
  * at each concurrency level (default 1, 4 and 8 clients) every client sends requests back to
    back for --duration seconds (default 40); a request started before the end runs to its end.

Per engine and level it reports generated tokens/s (completion tokens of every request of the
level over the level's wall time), time to first token (first content chunk; p50 and p99),
requests completed and failed, and the server's peak resident memory (VmHWM at the end of the
engine's run, which covers every level). Then the ratios gemma-rs / llama.cpp.

llama-server is the one scripts/bench_vs_llama_cpp.sh builds (target/llama-cpp-0.3.36 by
default; `scripts/bench_vs_llama_cpp.sh --build-only` builds it), started with
`-np SLOTS -c SLOTS*CTX` (llama.cpp divides its context among the slots) and continuous batching;
gemma serve with `--parallel SLOTS --ctx-size CTX`. Sampling is the same for both (temperature
0.8, a seed per request, `max_tokens`); neither ignores the end-of-turn token, so both stop
where the model does, and the report counts the tokens each generated.

Usage: server_vs_llama_cpp.py [--model GGUF] [--slots 8] [--ctx 4096] [--clients 1,4,8]
                              [--duration 40] [--max-tokens 128] [--threads N]
                              [--gemma target/release/gemma] [--llama-server PATH]
                              [--only gemma|llama] [--llama-args '--swa-full']
"""

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHORT = [
    "Write a short poem about the sea.",
    "Explain what a CPU cache is.",
    "List some uses of copper and say why each works.",
    "Describe a sunrise over the mountains.",
    "Give me advice for learning a new language.",
    "What is the difference between weather and climate?",
    "Tell me a story about a lighthouse keeper.",
]
SYSTEM = (
    "You are the assistant of a small bookshop in a harbour town. You help customers find "
    "books, explain the shop's opening hours (Monday to Saturday, nine to six; Sundays closed, "
    "except in December), its return policy (unread books within thirty days with a receipt), "
    "its reading club (first Thursday of the month, seven in the evening, free for members) and "
    "its ordering service (two to five working days; rare books take longer). Answer plainly "
    "and warmly. "
) * 3
# A long document (2,101 tokens of the default model) for the long prompts.
DOCUMENT = " ".join(
    f"Section {i}: the harbour's log records that on day {i} the tide rose {i % 7 + 1} metres, "
    f"{i % 5 + 2} fishing boats went out before dawn and {i % 3 + 1} came back with a full "
    f"catch, while the lighthouse keeper noted the wind from the {['north', 'south', 'east', 'west'][i % 4]}."
    for i in range(40)
)


def request_body(n, max_tokens):
    if n % 4 == 3:
        user = DOCUMENT + "\n\nSummarise the log above and say which wind was most common."
    else:
        user = SHORT[n % len(SHORT)]
    messages = [{"role": "user", "content": user}]
    if n % 3 != 2:
        messages.insert(0, {"role": "system", "content": SYSTEM})
    return json.dumps({
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0.8,
        "seed": n,
        "stream": True,
        "stream_options": {"include_usage": True},
    })


def streamed_request(port, body, timeout):
    """One streamed chat completion: (completion tokens, seconds to first content, error)."""
    start = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            return 0, None, f"status {resp.status}: {resp.read()[:200]!r}"
        first, pieces, usage, done = None, 0, None, False
        for raw in resp:
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                return 0, None, f"error event: {data[:200]}"
            choices = chunk.get("choices") or []
            if choices and (choices[0].get("delta") or {}).get("content"):
                pieces += 1
                if first is None:
                    first = time.monotonic() - start
            if chunk.get("usage"):
                usage = chunk["usage"]
        if not done:
            return 0, first, "stream ended without [DONE]"
        tokens = usage["completion_tokens"] if usage else pieces
        return tokens, first, None
    except (OSError, http.client.HTTPException, ValueError, KeyError) as e:
        return 0, None, repr(e)
    finally:
        conn.close()


def percentile(xs, p):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    # Nearest rank.
    k = max(0, min(len(xs) - 1, int(round(p * len(xs) + 0.5)) - 1))
    return xs[k]


def run_level(port, clients, seconds, max_tokens, counter, timeout):
    lock = threading.Lock()
    results = []
    start = time.monotonic()
    stop_at = start + seconds

    def client():
        while time.monotonic() < stop_at:
            with lock:
                n = counter[0]
                counter[0] += 1
            r = streamed_request(port, request_body(n, max_tokens), timeout)
            with lock:
                results.append(r)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - start
    ok = [r for r in results if r[2] is None]
    errors = [r[2] for r in results if r[2] is not None]
    ttft = [r[1] for r in ok if r[1] is not None]
    return {
        "clients": clients,
        "completed": len(ok),
        "failed": len(errors),
        "first_error": errors[0] if errors else None,
        "tokens": sum(r[0] for r in ok),
        "wall_s": wall,
        "tokens_per_s": sum(r[0] for r in ok) / wall,
        "ttft_p50_ms": 1e3 * percentile(ttft, 0.50),
        "ttft_p99_ms": 1e3 * percentile(ttft, 0.99),
    }


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port, proc, seconds=300):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode} before it was ready")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit("server not ready in time")


def peak_rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def save_metrics(port, path):
    """gemma serve's /metrics after the run, and the prefix cache's share of the prompt tokens
    (how much of the prompt side the cache saved)."""
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    except (OSError, http.client.HTTPException) as e:
        print(f"  gemma-rs /metrics: {e}", file=sys.stderr)
        return
    with open(path, "w") as f:
        f.write(text)
    values = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and not line.startswith("#"):
            try:
                values[parts[0]] = float(parts[1])
            except ValueError:
                pass
    prompt = values.get("gemma_prompt_tokens_total", 0)
    hit = values.get("gemma_prefix_cache_hit_tokens_total", 0)
    if prompt:
        print(f"  gemma-rs prefix cache: {hit:.0f} of {prompt:.0f} prompt tokens reused "
              f"({100 * hit / prompt:.0f} %); metrics in {path}", file=sys.stderr)


def run_engine(name, argv, port, args):
    log = open(os.path.join(args.log_dir, f"{name}.log"), "w")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_ready(port, proc)
        # One untimed request per slot count's worth: loads pages, fills the prefix caches.
        for n in range(4):
            streamed_request(port, request_body(n, 16), args.request_timeout)
        counter = [1000]
        levels = []
        for clients in args.clients:
            level = run_level(port, clients, args.duration, args.max_tokens, counter,
                              args.request_timeout)
            print(f"  {name}, {clients} client(s): {level['tokens_per_s']:.1f} tokens/s, "
                  f"TTFT p50 {level['ttft_p50_ms']:.0f} ms, p99 {level['ttft_p99_ms']:.0f} ms, "
                  f"{level['completed']} done, {level['failed']} failed", file=sys.stderr)
            levels.append(level)
        peak = peak_rss_mib(proc.pid)
        if name == "gemma-rs":
            save_metrics(port, os.path.join(args.log_dir, "gemma-rs-metrics.txt"))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    return {"levels": levels, "peak_rss_mib": peak}


def main():
    default_model = os.path.join(
        os.environ.get("GEMMA_CACHE_DIR", os.path.expanduser("~/.cache/gemma-rs")),
        "models", "gemma-3-270m-q4_k_m.gguf")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=default_model)
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--ctx", type=int, default=4096, help="context per slot")
    p.add_argument("--clients", default="1,4,8")
    p.add_argument("--duration", type=float, default=40.0, help="seconds per level")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--gemma", default=os.path.join(ROOT, "target", "release", "gemma"))
    p.add_argument("--llama-server", default=os.path.join(
        ROOT, "target", "llama-cpp-0.3.36", "build", "bin", "llama-server"))
    p.add_argument("--only", choices=["gemma", "llama"])
    p.add_argument("--llama-args", default="",
                   help="extra llama-server arguments, e.g. '--swa-full' (its prompt cache can "
                        "then restore prompts longer than the sliding window)")
    p.add_argument("--log-dir", default="/tmp")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    if not os.path.isfile(args.model):
        raise SystemExit(f"no model at {args.model} (run `gemma run` once to fetch the default)")

    engines = {}
    if args.only != "llama":
        port = free_port()
        engines["gemma-rs"] = ([args.gemma, "--model", args.model, "--threads", str(args.threads),
                                "--ctx-size", str(args.ctx), "serve", "--host", "127.0.0.1",
                                "--port", str(port), "--parallel", str(args.slots)], port)
    if args.only != "gemma":
        port = free_port()
        engines["llama.cpp"] = ([args.llama_server, "-m", args.model, "-t", str(args.threads),
                                 "-tb", str(args.threads), "-np", str(args.slots),
                                 "-c", str(args.slots * args.ctx), "-cb", "--host", "127.0.0.1",
                                 "--port", str(port)] + args.llama_args.split(), port)
    version = ""
    if "llama.cpp" in engines:
        out = subprocess.run([args.llama_server, "--version"], capture_output=True, text=True)
        version = (out.stdout + out.stderr).strip().splitlines()[0] if (out.stdout + out.stderr).strip() else ""

    results = {}
    for name, (argv, port) in engines.items():
        print(f"running {name}: {' '.join(argv)}", file=sys.stderr)
        results[name] = run_engine(name, argv, port, args)

    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    flags = next((l.split(":", 1)[1].split() for l in open("/proc/cpuinfo") if l.startswith("flags")), [])
    isa = [f for f in flags if f in ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
                                     "avx512_vnni", "avx512_bf16", "avx_vnni")]
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    print(f"model: {args.model}\nmachine: {cpu}, {os.cpu_count()} cores ({' '.join(isa)})\n"
          f"commit: {commit}; llama-server: {version}\n"
          f"{args.slots} slots, context {args.ctx} per slot, {args.threads} threads, "
          f"{args.duration:.0f} s per level, max_tokens {args.max_tokens}, streamed chat\n")
    print("| engine | clients | requests | failed | generated tokens/s | TTFT p50 ms | TTFT p99 ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        for l in r["levels"]:
            print(f"| {name} | {l['clients']} | {l['completed']} | {l['failed']} | "
                  f"{l['tokens_per_s']:.1f} | {l['ttft_p50_ms']:.0f} | {l['ttft_p99_ms']:.0f} |")
    print()
    for name, r in results.items():
        print(f"peak RSS of {name}: {r['peak_rss_mib']:.0f} MiB")
    if len(results) == 2:
        g, l = results["gemma-rs"], results["llama.cpp"]
        print("\n| clients | tokens/s ratio | TTFT p99 gemma-rs / llama.cpp |")
        print("|---:|---:|---:|")
        for a, b in zip(g["levels"], l["levels"]):
            print(f"| {a['clients']} | **{a['tokens_per_s'] / b['tokens_per_s']:.2f}×** | "
                  f"{a['ttft_p99_ms']:.0f} / {b['ttft_p99_ms']:.0f} ms |")
        print(f"\npeak RSS ratio: {g['peak_rss_mib'] / l['peak_rss_mib']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    failed = sum(l["failed"] for r in results.values() for l in r["levels"])
    if failed:
        for name, r in results.items():
            for l in r["levels"]:
                if l["first_error"]:
                    print(f"{name}, {l['clients']} clients: {l['first_error']}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
