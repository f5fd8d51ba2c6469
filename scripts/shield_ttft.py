#!/usr/bin/env python3
"""Time to first token of `gemma serve` with and without the safety filter (`--shield`).

Starts the server once per configuration (no shield, then the given shield options), sends
`--requests` streamed greedy chat requests one after another (after one warm-up request) and
reports the median and mean time from sending the request to the first chunk that carries
reply text, plus the total time of each request. Standard library only.

    scripts/shield_ttft.py --gemma target/release/gemma --model MAIN \
        --shield fixtures/shield_tiny/text --policies harassment [--image FILE]

A different prompt per request (a counter in it) keeps the prefix cache from hiding the
prefill; the filter's checks are what the configuration adds.
"""

import argparse
import base64
import http.client
import json
import os
import platform
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


def run(args, shield_args, label):
    port = free_port()
    cmd = [args.gemma, "serve", "-q", "--model", args.model, "--port", str(port),
           "--parallel", "1", "--ctx-size", str(args.ctx_size)]
    if args.image:
        cmd += ["--allowed-media-dir", os.path.dirname(os.path.abspath(args.image))]
    cmd += shield_args
    env = dict(os.environ, GEMMA_THREADS=str(args.threads))
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, env=env)
    try:
        wait_ready(port, proc)
        ttft, total, finishes = [], [], []
        for i in range(args.requests + 1):
            text = f"Request {i}: {args.prompt}"
            content = text
            if args.image:
                with open(args.image, "rb") as f:
                    url = "data:image/png;base64," + base64.b64encode(f.read()).decode()
                content = [{"type": "image_url", "image_url": {"url": url}},
                           {"type": "text", "text": text}]
            body = {"messages": [{"role": "user", "content": content}], "stream": True,
                    "max_tokens": args.max_tokens, "temperature": 0}
            first, end, finish = one_request(port, body)
            if i == 0:
                continue  # warm-up: page faults of the mapped weights
            ttft.append(first)
            total.append(end)
            finishes.append(finish)
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        c.request("GET", "/metrics")
        metrics = {}
        for line in c.getresponse().read().decode().splitlines():
            if line and not line.startswith("#"):
                key, value = line.rsplit(" ", 1)
                metrics[key] = float(value)
        n = metrics.get("gemma_time_to_first_token_seconds_count", 0)
        sched = metrics.get("gemma_time_to_first_token_seconds_sum", 0) / n if n else 0
        checks = metrics.get("gemma_shield_check_seconds_count", 0)
        check_ms = metrics.get("gemma_shield_check_seconds_sum", 0) / checks * 1e3 if checks else 0
        return {
            "config": label,
            "sampled_first_token_mean_ms": round(sched * 1e3, 1),
            "shield_check_mean_ms": round(check_ms, 1),
            "ttft_median_ms": round(statistics.median(ttft) * 1e3, 1),
            "ttft_mean_ms": round(statistics.mean(ttft) * 1e3, 1),
            "total_median_ms": round(statistics.median(total) * 1e3, 1),
            "finish_reasons": sorted(set(finishes)),
        }
    finally:
        proc.terminate()
        proc.wait()


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    simd = [x for x in ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vnni",
                                        "avx_vnni", "amx_tile") if x in flags]
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
                   help="--shield-window values to measure (repeatable; default 64)")
    p.add_argument("--image")
    p.add_argument("--prompt", default="Write two sentences about baking bread at home.")
    p.add_argument("--requests", type=int, default=10)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--ctx-size", type=int, default=2048)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    shield = []
    for s in args.shield:
        shield += ["--shield", s]
    if args.policies:
        shield += ["--shield-policies", args.policies]
    shield += ["--shield-threshold", args.threshold]
    name, simd = cpu_flags()
    print(f"# {name}, {os.cpu_count()} CPUs, SIMD {' '.join(simd)}, GEMMA_THREADS={args.threads}",
          file=sys.stderr)
    with open("/proc/loadavg") as f:
        print(f"# load average before: {f.read().split()[:3]}", file=sys.stderr)
    results = [run(args, [], "no shield")]
    for window in args.window or ["64"]:
        extra = shield + ["--shield-window", window]
        results.append(run(args, extra, "shield " + " ".join(extra)))
    base = results[0]["ttft_median_ms"]
    for r in results:
        r["ttft_vs_off"] = f"{(r['ttft_median_ms'] / base - 1) * 100:+.0f} %"
        print(json.dumps(r))


if __name__ == "__main__":
    main()
