#!/usr/bin/env python3
"""Bounded loopback load test for `gemma serve` (stdlib only).

Runs CLIENTS concurrent clients, each sending streaming chat completions back to back, for
at most DURATION seconds (default 600, capped at 600), then prints throughput and latency.
Usage: load_test.py [--url http://127.0.0.1:8080] [--clients 4] [--duration 600] [--max-tokens 64]
"""

import argparse
import http.client
import json
import statistics
import threading
import time
import urllib.parse

PROMPTS = [
    "Write a short poem about the sea.",
    "Explain what a CPU cache is in two sentences.",
    "List three uses of copper.",
    "Describe a sunrise over the mountains.",
    "Give me a tip for learning a new language.",
    "What is the difference between weather and climate?",
]


def one_request(host, port, prompt, max_tokens):
    body = json.dumps(
        {
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0.8,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    start = time.monotonic()
    conn = http.client.HTTPConnection(host, port, timeout=600)
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        conn.close()
        return {"status": resp.status}
    first, usage = None, None
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if first is None and chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
            first = time.monotonic() - start
        if chunk.get("usage"):
            usage = chunk["usage"]
    conn.close()
    return {"status": 200, "ttft": first, "latency": time.monotonic() - start, "usage": usage}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--duration", type=float, default=600)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    duration = min(args.duration, 600)
    url = urllib.parse.urlparse(args.url)
    results, lock = [], threading.Lock()
    deadline = time.monotonic() + duration

    def client(i):
        n = i
        while time.monotonic() < deadline:
            r = one_request(url.hostname, url.port, PROMPTS[n % len(PROMPTS)], args.max_tokens)
            n += args.clients
            with lock:
                results.append(r)

    t0 = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    ok = [r for r in results if r["status"] == 200 and r["usage"]]
    gen = sum(r["usage"]["completion_tokens"] for r in ok)
    prompt = sum(r["usage"]["prompt_tokens"] for r in ok)
    ttft = sorted(r["ttft"] for r in ok if r["ttft"] is not None)
    lat = sorted(r["latency"] for r in ok)

    def pct(xs, p):
        return xs[min(len(xs) - 1, int(p * len(xs)))] if xs else float("nan")

    print(f"clients {args.clients}, max_tokens {args.max_tokens}, wall {wall:.1f} s")
    print(f"requests ok {len(ok)}, failed {len(results) - len(ok)}")
    print(f"generated tokens {gen} ({gen / wall:.2f} tok/s), prompt tokens {prompt}")
    print(f"requests/s {len(ok) / wall:.3f}")
    if ttft:
        print(f"TTFT p50 {pct(ttft, 0.5):.3f} s, p95 {pct(ttft, 0.95):.3f} s, mean {statistics.mean(ttft):.3f} s")
    if lat:
        print(f"latency p50 {pct(lat, 0.5):.3f} s, p95 {pct(lat, 0.95):.3f} s")


if __name__ == "__main__":
    main()
