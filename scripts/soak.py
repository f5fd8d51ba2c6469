#!/usr/bin/env python3
"""Soak test for `gemma serve` (stdlib only; outside CI): DURATION seconds (default 1800) at
CLIENTS concurrent clients (default 8), each sending a rotating mix of every kind of request
the server takes, good and bad:

  plain and streamed chat, a stream the client drops mid-way, a required tool call and its
  follow-up with the tool's result, a json_schema answer (parsed and checked here), a
  json_object answer, a legacy completion, and malformed requests (broken JSON, wrong types,
  an unknown tool_call_id, bad logit_bias keys, an unknown role, a body announced over the
  limit) that must each get their 4xx.

It fails (exit 1) on any 5xx, any status other than the one expected, any hung request (no
answer within --request-timeout), a constrained answer that does not parse, a server that is
still busy after the run, or resident memory that grows after the warm-up: RSS is sampled
every second and, after the first WARMUP seconds, the medians of successive minutes may not
rise by more than --rss-margin-mb. It prints one summary, and a Markdown row for
BENCHMARKS.md with the CPU's instruction sets.

Usage: soak.py [--duration 1800] [--clients 8] [--warmup 300] [--binary target/release/gemma]
"""

import argparse
import http.client
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from load_test import RssSampler, metric, percentile, start_server, wait_idle  # noqa: E402

PROMPTS = [
    "Write a short poem about the sea.",
    "Explain what a CPU cache is in two sentences.",
    "List three uses of copper.",
    "Tell me a story about a lighthouse keeper.",
]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "population": {"type": "integer"}, "coastal": {"type": "boolean"}},
    "required": ["name", "population", "coastal"]}
KINDS = ["plain", "stream", "cancel", "tool", "schema", "stream", "json_object", "completion",
         "bad_json", "bad_type", "bad_tool_id", "bad_bias", "bad_role", "too_large"]


class Hung(Exception):
    pass


class Unexpected(Exception):
    pass


def chat(n, max_tokens, **extra):
    body = {"messages": [{"role": "user", "content": PROMPTS[n % len(PROMPTS)]}],
            "max_tokens": max_tokens, "temperature": 0.8, "seed": n}
    body.update(extra)
    return body


def send(host, port, path, body, timeout, headers=None):
    """(status, body bytes) of one request; `body` is a dict or raw bytes."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        conn.request("POST", path, raw, {"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def expect(status, data, wanted):
    if status != wanted:
        raise Unexpected(f"status {status} (wanted {wanted}): {data[:200]!r}")
    return json.loads(data) if data else None


def stream(host, port, body, timeout, deadline, drop_after=None):
    body = dict(body, stream=True, stream_options={"include_usage": True})
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise Unexpected(f"status {resp.status}: {resp.read()[:200]!r}")
        pieces, done, usage = 0, False, None
        for raw in resp:
            if time.monotonic() > deadline:
                raise Hung()
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise Unexpected(f"error event: {data[:200]}")
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                pieces += 1
                if drop_after is not None and pieces >= drop_after:
                    return "cancelled", 0
            usage = chunk.get("usage") or usage
        if not done or usage is None:
            raise Unexpected("stream ended without usage and [DONE]")
        return "completed", usage["completion_tokens"]
    finally:
        conn.close()


def run_kind(kind, host, port, n, args, deadline):
    """Returns (outcome, generated tokens); raises Unexpected or Hung."""
    t, mt = args.request_timeout, args.max_tokens
    path = "/v1/chat/completions"
    if kind == "plain":
        v = expect(*send(host, port, path, chat(n, mt), t), 200)
        return "completed", v["usage"]["completion_tokens"]
    if kind == "stream":
        return stream(host, port, chat(n, mt), t, deadline)
    if kind == "cancel":
        return stream(host, port, chat(n, mt), t, deadline, drop_after=1 + n % 4)
    if kind == "tool":
        q = {"role": "user", "content": "What is the weather in Lisbon?"}
        v = expect(*send(host, port, path, {"messages": [q], "tools": TOOLS, "tool_choice": "required",
                                           "max_tokens": 48, "temperature": 0.7, "seed": n}, t), 200)
        msg = v["choices"][0]["message"]
        if v["choices"][0]["finish_reason"] != "tool_calls" or not msg.get("tool_calls"):
            raise Unexpected(f"no tool call: {v}")
        call = msg["tool_calls"][0]
        json.loads(call["function"]["arguments"])
        follow = {"messages": [q, {"role": "assistant", "content": None, "tool_calls": [call]},
                               {"role": "tool", "tool_call_id": call["id"], "content": '{"sky": "sunny"}'}],
                  "tools": TOOLS, "max_tokens": 24, "temperature": 0.7, "seed": n}
        v2 = expect(*send(host, port, path, follow, t), 200)
        return "completed", v["usage"]["completion_tokens"] + v2["usage"]["completion_tokens"]
    if kind == "schema":
        body = chat(n, 200, response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}})
        body["messages"][0]["content"] = "Describe a city as JSON."
        v = expect(*send(host, port, path, body, t), 200)
        if v["choices"][0]["finish_reason"] == "stop":
            doc = json.loads(v["choices"][0]["message"]["content"])
            if set(doc) != {"name", "population", "coastal"} or not isinstance(doc["population"], int):
                raise Unexpected(f"schema violated: {doc}")
        return "completed", v["usage"]["completion_tokens"]
    if kind == "json_object":
        v = expect(*send(host, port, path, chat(n, 120, response_format={"type": "json_object"}), t), 200)
        if v["choices"][0]["finish_reason"] == "stop":
            if not isinstance(json.loads(v["choices"][0]["message"]["content"]), dict):
                raise Unexpected("json_object answer is not an object")
        return "completed", v["usage"]["completion_tokens"]
    if kind == "completion":
        v = expect(*send(host, port, "/v1/completions", {"prompt": "Once upon a time", "max_tokens": mt,
                                                         "temperature": 0.8, "seed": n}, t), 200)
        return "completed", v["usage"]["completion_tokens"]
    # Malformed requests: each must get its 4xx, quickly, with an OpenAI error body.
    if kind == "bad_json":
        v = expect(*send(host, port, path, b'{"messages": [', t), 400)
    elif kind == "bad_type":
        v = expect(*send(host, port, path, chat(n, mt, temperature="hot"), t), 400)
    elif kind == "bad_tool_id":
        body = {"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "call_x", "content": "1"}]}
        v = expect(*send(host, port, path, body, t), 400)
    elif kind == "bad_bias":
        v = expect(*send(host, port, path, chat(n, mt, logit_bias={"abc": 5}), t), 400)
    elif kind == "bad_role":
        v = expect(*send(host, port, path, {"messages": [{"role": "wizard", "content": "x"}]}, t), 400)
    elif kind == "too_large":
        conn = http.client.HTTPConnection(host, port, timeout=t)
        try:
            conn.putrequest("POST", path)
            conn.putheader("Content-Type", "application/json")
            conn.putheader("Content-Length", str(1 << 40))
            conn.endheaders()
            resp = conn.getresponse()
            v = expect(resp.status, resp.read(), 413)
        finally:
            conn.close()
    else:
        raise ValueError(kind)
    if not isinstance(v, dict) or "message" not in v.get("error", {}):
        raise Unexpected(f"{kind}: not an OpenAI error body: {v}")
    return "refused", 0


def one(host, port, n, args):
    kind = KINDS[n % len(KINDS)]
    start = time.monotonic()
    try:
        outcome, tokens = run_kind(kind, host, port, n, args, start + args.request_timeout)
        why = ""
    except (Hung, socket.timeout, TimeoutError):
        outcome, tokens, why = "hung", 0, ""
    except Unexpected as e:
        outcome, tokens, why = "failed", 0, str(e)
    except (OSError, http.client.HTTPException, ValueError, KeyError, TypeError) as e:
        outcome, tokens, why = "failed", 0, repr(e)
    latency = time.monotonic() - start
    if outcome in ("completed", "refused") and latency > args.request_timeout:
        outcome = "hung"
    return {"kind": kind, "outcome": outcome, "tokens": tokens, "latency": latency, "why": why}


def isa_flags():
    try:
        flags = next(l for l in open("/proc/cpuinfo") if l.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    wanted = ["avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16"]
    return " ".join(f for f in wanted if f in flags) or "no AVX2"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=1800)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--warmup", type=float, default=300, help="seconds before memory must stay flat")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--request-timeout", type=float, default=180)
    ap.add_argument("--rss-margin-mb", type=float, default=64)
    ap.add_argument("--binary", default="target/release/gemma")
    ap.add_argument("--server-arg", action="append", default=[])
    args = ap.parse_args()

    proc, port = start_server(args)
    host = "127.0.0.1"
    sampler = RssSampler(proc.pid)
    sampler.start()
    results, lock, counter = [], threading.Lock(), [0]
    t0 = time.monotonic()
    stop_at = t0 + args.duration

    def client():
        while time.monotonic() < stop_at:
            with lock:
                n = counter[0]
                counter[0] += 1
            r = one(host, port, n, args)
            with lock:
                results.append(r)

    problems = []
    threads = [threading.Thread(target=client, daemon=True) for _ in range(args.clients)]
    try:
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=max(0.0, stop_at - time.monotonic()) + args.request_timeout + 10)
        stuck = sum(th.is_alive() for th in threads)
        if stuck:
            problems.append(f"{stuck} client(s) never returned")
        if not wait_idle(host, port, 60):
            problems.append("slots or queue still busy after the run (a lost request)")
        failed_server = metric(host, port, "gemma_requests_failed_total") or 0
        cancelled_server = metric(host, port, "gemma_requests_cancelled_total") or 0
    finally:
        sampler.stop.set()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            problems.append("the server did not stop within 60 s of SIGTERM")
    wall = time.monotonic() - t0

    # Memory after warm-up: the median of each minute, which may not climb.
    mb = 1024 * 1024
    minutes = {}
    for t, rss in sampler.samples:
        if t - t0 >= args.warmup:
            minutes.setdefault(int((t - t0) // 60), []).append(rss)
    medians = [percentile(v, 0.5) for _, v in sorted(minutes.items())]
    growth = (max(medians) - medians[0]) if medians else 0
    if growth > args.rss_margin_mb * mb:
        problems.append(f"RSS grew {growth / mb:.0f} MB after the warm-up (minute medians {[round(m / mb) for m in medians]})")
    rss_all = [rss for _, rss in sampler.samples]

    by_kind = {}
    for r in results:
        by_kind.setdefault(r["kind"], []).append(r)
        if r["outcome"] in ("failed", "hung"):
            problems.append(f"{r['kind']} {r['outcome']}: {r['why']}")
    count = {k: sum(r["outcome"] == k for r in results) for k in ("completed", "cancelled", "refused", "failed", "hung")}
    fivexx = sum("status 5" in r["why"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    print(f"soak: {wall:.0f} s, {args.clients} clients, {len(results)} requests, machine: {platform.machine()} "
          f"{os.cpu_count()} cores [{isa_flags()}]")
    print(f"{'kind':<12} {'n':>5} {'ok':>5} {'failed':>6} {'hung':>4} {'p50 s':>6} {'p95 s':>6}")
    for kind in dict.fromkeys(KINDS):
        rs = by_kind.get(kind, [])
        if not rs:
            continue
        ok = [r for r in rs if r["outcome"] in ("completed", "cancelled", "refused")]
        lat = [r["latency"] for r in ok]
        print(f"{kind:<12} {len(rs):>5} {len(ok):>5} {sum(r['outcome'] == 'failed' for r in rs):>6} "
              f"{sum(r['outcome'] == 'hung' for r in rs):>4} {percentile(lat, 0.5):>6.2f} {percentile(lat, 0.95):>6.2f}")
    print(f"outcomes: {count}; 5xx: {fivexx}; generated tokens: {tokens} ({tokens / wall:.1f}/s); "
          f"server counted {failed_server:.0f} failed, {cancelled_server:.0f} cancelled")
    print(f"RSS: start {rss_all[0] / mb:.0f} MB, max {max(rss_all) / mb:.0f} MB, end {rss_all[-1] / mb:.0f} MB; "
          f"after {args.warmup:.0f} s warm-up, minute medians {medians[0] / mb:.0f} -> {medians[-1] / mb:.0f} MB "
          f"(growth {growth / mb:.0f} MB)" if medians else "RSS: too short for the warm-up")
    print(f"| {wall / 60:.0f} min | {args.clients} | {len(results)} | {count['completed']} / {count['cancelled']} / "
          f"{count['refused']} | {fivexx} | {count['hung']} | {count['failed']} | "
          f"{(medians[0] / mb if medians else 0):.0f} → {(medians[-1] / mb if medians else 0):.0f} MB | [{isa_flags()}] |")
    if problems:
        print("FAILED:")
        for p in problems[:50]:
            print("  " + p)
        sys.exit(1)
    print("ok: no 5xx, no hung or failed request, memory flat after warm-up")


if __name__ == "__main__":
    main()
