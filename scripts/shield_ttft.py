#!/usr/bin/env python3
"""Time to first token of `gemma serve` with and without the safety filter (`--shield`).

Starts one server per configuration (no shield, then the given shield options with each
`--window`), all at once, and sends `--requests` streamed greedy chat requests round-robin: each
round sends the same new prompt to every server in turn, one request at a time (after one
warm-up round), so the configurations alternate and a load change on the machine touches them
alike. Reports, per configuration, the p50 and p90 time from sending the request to the first
chunk that carries reply text (TTFT as a client sees it: with the filter, after the input check
and the first output window's check), the scheduler's mean time to the first sampled token, the
filter's mean check time (/metrics), and the p50 total time. Standard library only.

    scripts/shield_ttft.py --gemma target/release/gemma --model MAIN \
        --shield SHIELD [--shield SHIELD2] --policies harassment [--image FILE] \
        [--window 64 --window 64/64] [--shield-ctx N] [--one-server-at-a-time]

`--window N` measures `--shield-window N` with the default first window (1 token, then
doubling); `--window F/N` adds `--shield-first-window F` (`64/64`: fixed windows of 64).
`--variant "ARGS"` measures the shield options plus ARGS (repeatable, e.g. `--variant
"--shield-stages input"`). `--one-server-at-a-time` runs the configurations one after the other (one server in memory at
a time: for a main model too large to hold twice); the default alternates them request by
request, which is what to use whenever memory allows: this VM's speed drifts by ~15 % over
minutes. For the 27B shape of scripts/make_real_shape_gemma3.py, let the servers share one
copy of the weights in the page cache: `GEMMA_INTERLEAVE=0` and `--server-args "--mmap"`.

The realistic classifier is a text ShieldGemma at the real 2B shape with random weights:
`python scripts/make_real_shape_shield.py --out sg2b.gguf` (dev venv). Record figures only on
an idle machine (the script prints the load average before and after).

A different prompt per request (a counter in it) keeps the prefix cache from hiding the
prefill; the filter's checks are what the configuration adds.
"""

import argparse
import base64
import http.client
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import time


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port, proc, timeout=120):
    start = time.time()
    while time.time() - start < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read().decode()}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/health")
            if c.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit("the server did not start")


def one_request(port, body):
    """(seconds to the first reply text, seconds to the end, finish_reason)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    data = json.dumps(body).encode()
    start = time.perf_counter()
    c.request("POST", "/v1/chat/completions", data, {"Content-Type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        raise SystemExit(f"status {r.status}: {r.read().decode()}")
    first = None
    finish = None
    for raw in r:
        line = raw.decode().strip()
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            break
        chunk = json.loads(payload)
        choice = chunk["choices"][0] if chunk.get("choices") else {}
        if first is None and (choice.get("delta", {}).get("content") or choice.get("finish_reason")):
            first = time.perf_counter() - start
        finish = choice.get("finish_reason") or finish
    return first, time.perf_counter() - start, finish


def start(args, shield_args):
    port = free_port()
    cmd = [args.gemma, "serve", "-q", "--model", args.model, "--port", str(port),
           "--parallel", "1", "--ctx-size", str(args.ctx_size)]
    if args.image:
        cmd += ["--allowed-media-dir", os.path.dirname(os.path.abspath(args.image))]
    cmd += shlex.split(args.server_args) + shield_args
    env = dict(os.environ, GEMMA_THREADS=str(args.threads))
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, env=env)
    wait_ready(port, proc)
    return port, proc


def body_for(args, i):
    text = f"Request {i}: {args.prompt}"
    content = text
    if args.image:
        with open(args.image, "rb") as f:
            url = "data:image/png;base64," + base64.b64encode(f.read()).decode()
        content = [{"type": "image_url", "image_url": {"url": url}},
                   {"type": "text", "text": text}]
    return {"messages": [{"role": "user", "content": content}], "stream": True,
            "max_tokens": args.max_tokens, "temperature": 0}


def metrics_of(port):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("GET", "/metrics")
    metrics = {}
    for line in c.getresponse().read().decode().splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            metrics[key] = float(value)
    return metrics


def p(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def summary(label, port, s):
    m = metrics_of(port)
    n = m.get("gemma_time_to_first_token_seconds_count", 0)
    sched = m.get("gemma_time_to_first_token_seconds_sum", 0) / n if n else 0
    checks = m.get("gemma_shield_check_seconds_count", 0)
    check_ms = m.get("gemma_shield_check_seconds_sum", 0) / checks * 1e3 if checks else 0
    return {
        "config": label,
        "ttft_p50_ms": round(statistics.median(s["ttft"]) * 1e3, 1),
        "ttft_p90_ms": round(p(s["ttft"], 0.9) * 1e3, 1),
        "sampled_first_token_mean_ms": round(sched * 1e3, 1),
        "shield_checks": int(checks),
        "shield_check_mean_ms": round(check_ms, 1),
        "total_p50_ms": round(statistics.median(s["total"]) * 1e3, 1),
        "finish_reasons": sorted(set(s["finish"])),
    }


def record(stats, i, port, args):
    # The same text for every configuration; a new one per round (the counter), so the
    # prefix cache does not hide the prefill.
    first, end, finish = one_request(port, body_for(args, i))
    if i == 0:
        return  # warm-up: page faults of the mapped weights
    stats["ttft"].append(first)
    stats["total"].append(end)
    stats["finish"].append(finish)


def run_all(args, configs):
    """Starts one server per configuration, all at once, and sends the requests round-robin
    (one at a time: request i goes to every server before request i + 1), so drifting load on
    the machine touches every configuration alike."""
    servers = []
    try:
        for shield_args, label in configs:
            servers.append((label, *start(args, shield_args)))
        stats = {label: {"ttft": [], "total": [], "finish": []} for label, _, _ in servers}
        for i in range(args.requests + 1):
            for label, port, _ in servers:
                record(stats[label], i, port, args)
        return [summary(label, port, stats[label]) for label, port, _ in servers]
    finally:
        for _, _, proc in servers:
            proc.terminate()
            proc.wait()


def run_one_at_a_time(args, configs):
    """One configuration after the other, each with a server of its own (started, warmed up,
    measured, stopped): the same prompts, for machines that cannot hold two servers."""
    results = []
    for shield_args, label in configs:
        port, proc = start(args, shield_args)
        try:
            stats = {"ttft": [], "total": [], "finish": []}
            for i in range(args.requests + 1):
                record(stats, i, port, args)
            results.append(summary(label, port, stats))
            print(json.dumps(results[-1]), file=sys.stderr)
        finally:
            proc.terminate()
            proc.wait()
    return results


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    simd = [x for x in ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
                                        "avx512dq", "avx512_vnni", "avx512_bf16", "avx_vnni",
                                        "amx_tile") if x in flags]
                    return name, simd
    except OSError:
        pass
    return platform.processor(), []


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gemma", default="target/release/gemma")
    p.add_argument("--model", required=True)
    p.add_argument("--shield", action="append", required=True)
    p.add_argument("--policies", default="")
    p.add_argument("--threshold", default="0.99", help="high enough that nothing is blocked")
    p.add_argument("--window", action="append",
                   help="--shield-window values to measure, N or FIRST/N with "
                        "--shield-first-window (repeatable; default 64)")
    p.add_argument("--variant", action="append", default=[],
                   help="a configuration: the shield options plus these (shell words; repeatable)")
    p.add_argument("--server-args", default="",
                   help="more `gemma serve` options for every configuration (e.g. \"--mmap\")")
    p.add_argument("--one-server-at-a-time", action="store_true",
                   help="run the configurations one after the other, not alternating")
    p.add_argument("--image")
    p.add_argument("--prompt", default="Write two sentences about baking bread at home.")
    p.add_argument("--prompt-file", help="the prompt's text from this file instead")
    p.add_argument("--requests", type=int, default=10)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--ctx-size", type=int, default=2048)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--shield-ctx", type=int, help="--shield-ctx for the filter")
    args = p.parse_args()
    if args.prompt_file:
        with open(args.prompt_file) as f:
            args.prompt = f.read().strip()
    shield = []
    for s in args.shield:
        shield += ["--shield", s]
    if args.policies:
        shield += ["--shield-policies", args.policies]
    shield += ["--shield-threshold", args.threshold]
    if args.shield_ctx:
        shield += ["--shield-ctx", str(args.shield_ctx)]
    name, simd = cpu_flags()
    print(f"# {name}, {os.cpu_count()} CPUs, SIMD {' '.join(simd)}, GEMMA_THREADS={args.threads}",
          file=sys.stderr)
    with open("/proc/loadavg") as f:
        print(f"# load average before: {f.read().split()[:3]}", file=sys.stderr)
    configs = [([], "no shield")]
    for variant in args.variant:
        extra = shield + shlex.split(variant)
        configs.append((extra, "shield " + " ".join(extra)))
    for window in args.window or ([] if args.variant else ["64"]):
        first, _, most = window.rpartition("/")
        extra = shield + ["--shield-window", most]
        if first:
            extra += ["--shield-first-window", first]
        configs.append((extra, "shield " + " ".join(extra)))
    run = run_one_at_a_time if args.one_server_at_a_time else run_all
    results = run(args, configs)
    base = results[0]["ttft_p50_ms"]
    for r in results:
        r["ttft_p50_vs_off"] = f"{(r['ttft_p50_ms'] / base - 1) * 100:+.0f} %"
        print(json.dumps(r))
    with open("/proc/loadavg") as f:
        print(f"# load average after: {f.read().split()[:3]}", file=sys.stderr)


if __name__ == "__main__":
    main()
