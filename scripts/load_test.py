#!/usr/bin/env python3
"""Bounded loopback load test for `gemma serve` (stdlib only).

One run of at most DURATION seconds (default 600) in three phases of equal length with 1, 4
and 8 concurrent clients. Each client sends a rotating mix of streaming, non-streaming and
client-cancelled requests (a streaming request dropped mid-stream). The server's resident
memory is sampled once a second from /proc/<pid>/status.

The server is either started here (default: target/release/gemma serve --parallel 8 on a free
loopback port, stopped at the end) or an already running one on this machine (--url with
--pid). Loopback addresses only.

At the end it prints, per phase: requests completed, cancelled, failed and hung (no answer
within --request-timeout), requests/s, generated tokens/s, p50/p95 latency, and RSS at the
start, end and maximum. It exits non-zero when any request failed or hung, when the server
still reports busy slots or queued requests after the run (a lost request), or when the
server's RSS grew by more than --rss-margin-mb within a phase after its first quarter
(allocations for newly used slots settle in the first quarter).

Usage: load_test.py [--duration 600] [--max-tokens 64] [--binary target/release/gemma]
                    [--url http://127.0.0.1:PORT --pid PID]
"""

import argparse
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse

PHASE_CLIENTS = [1, 4, 8]
PROMPTS = [
    "Write a short poem about the sea.",
    "Explain what a CPU cache is in two sentences.",
    "List three uses of copper.",
    "Describe a sunrise over the mountains.",
    "Give me a tip for learning a new language.",
    "What is the difference between weather and climate?",
    "Tell me a story about a lighthouse keeper.",
]
SYSTEM = (
    "You are a concise assistant for a small bookshop. Answer plainly, without lists unless "
    "asked, and keep every answer short."
)
# The request mix, in rotation: streamed, streamed, plain, cancelled mid-stream, plain.
KINDS = ["stream", "stream", "plain", "cancel", "plain"]


class Hung(Exception):
    """The server did not answer within the request timeout."""


def request_body(n, max_tokens, stream):
    messages = [{"role": "user", "content": PROMPTS[n % len(PROMPTS)]}]
    if n % 2 == 0:  # half share a system prompt (prefix cache traffic)
        messages.insert(0, {"role": "system", "content": SYSTEM})
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0.8, "seed": n}
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body)


def post(host, port, body, timeout):
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    return conn, conn.getresponse()


def run_plain(host, port, body, timeout):
    conn, resp = post(host, port, body, timeout)
    try:
        data = resp.read()
        if resp.status != 200:
            return {"outcome": "failed", "why": f"status {resp.status}: {data[:200]!r}"}
        usage = json.loads(data)["usage"]
        return {"outcome": "completed", "tokens": usage["completion_tokens"]}
    finally:
        conn.close()


def run_stream(host, port, body, timeout, deadline, cancel_after=None):
    """Reads a streamed reply; with cancel_after, closes the connection after that many
    content chunks (a client going away mid-stream)."""
    conn, resp = post(host, port, body, timeout)
    try:
        if resp.status != 200:
            return {"outcome": "failed", "why": f"status {resp.status}: {resp.read()[:200]!r}"}
        usage, done, pieces = None, False, 0
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
                return {"outcome": "failed", "why": f"error event: {data[:200]}"}
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                pieces += 1
                if cancel_after is not None and pieces >= cancel_after:
                    return {"outcome": "cancelled", "tokens": 0}
            if chunk.get("usage"):
                usage = chunk["usage"]
        # A cancel whose answer ended before the client meant to leave is a completion.
        if not done or usage is None:
            return {"outcome": "failed", "why": "stream ended without usage and [DONE]"}
        return {"outcome": "completed", "tokens": usage["completion_tokens"]}
    finally:
        conn.close()


def one_request(host, port, n, args):
    kind = KINDS[n % len(KINDS)]
    start = time.monotonic()
    deadline = start + args.request_timeout
    try:
        if kind == "plain":
            result = run_plain(host, port, request_body(n, args.max_tokens, False), args.request_timeout)
        else:
            cancel_after = 1 + n % 4 if kind == "cancel" else None
            body = request_body(n, args.max_tokens, True)
            result = run_stream(host, port, body, args.request_timeout, deadline, cancel_after)
    except (Hung, socket.timeout, TimeoutError):
        result = {"outcome": "hung"}
    except (OSError, http.client.HTTPException, ValueError, KeyError) as e:
        result = {"outcome": "failed", "why": repr(e)}
    result["kind"] = kind
    result["latency"] = time.monotonic() - start
    if result["outcome"] == "completed" and result["latency"] > args.request_timeout:
        result["outcome"] = "hung"
    return result


class RssSampler(threading.Thread):
    """Samples VmRSS (bytes) of `pid` once a second."""

    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.samples, self.stop = pid, [], threading.Event()

    def read(self):
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def run(self):
        while not self.stop.is_set():
            rss = self.read()
            if rss is not None:
                self.samples.append((time.monotonic(), rss))
            self.stop.wait(1.0)

    def between(self, t0, t1):
        return [rss for t, rss in self.samples if t0 <= t <= t1]


def percentile(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))] if xs else float("nan")


def run_phase(host, port, clients, seconds, args, counter):
    results, lock = [], threading.Lock()
    stop_at = time.monotonic() + seconds

    def client():
        while time.monotonic() < stop_at:
            with lock:
                n = counter[0]
                counter[0] += 1
            r = one_request(host, port, n, args)
            with lock:
                results.append(r)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    # A client whose request hangs is waited for only up to the request timeout.
    for t in threads:
        t.join(timeout=max(0.0, stop_at - time.monotonic()) + args.request_timeout + 5)
    stuck = sum(t.is_alive() for t in threads)
    return results, stuck


def metric(host, port, name):
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        for line in conn.getresponse().read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    finally:
        conn.close()
    return None


def wait_idle(host, port, seconds=30):
    """Waits until the server has no active slot and no queued request."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if metric(host, port, "gemma_active_slots") == 0 and metric(host, port, "gemma_queue_depth") == 0:
            return True
        time.sleep(0.2)
    return False


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args):
    port = free_port()
    cmd = [args.binary, "serve", "--host", "127.0.0.1", "--port", str(port), "--parallel", "8", "-q"]
    cmd += args.server_arg
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc, port
        except OSError:
            time.sleep(0.3)
    proc.kill()
    sys.exit("the server did not come up within 300 s")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=600, help="total seconds (at most 600)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--request-timeout", type=float, default=120, help="seconds before a request counts as hung")
    ap.add_argument("--rss-margin-mb", type=float, default=64, help="allowed RSS growth within a phase")
    ap.add_argument("--binary", default="target/release/gemma", help="gemma binary to start")
    ap.add_argument("--server-arg", action="append", default=[], help="extra argument for `gemma serve`")
    ap.add_argument("--url", help="an already running server on this machine (needs --pid)")
    ap.add_argument("--pid", type=int, help="process id of the server at --url")
    args = ap.parse_args()
    duration = min(max(args.duration, 3), 600)

    proc = None
    if args.url:
        if args.pid is None:
            sys.exit("--url needs --pid (to read the server's memory)")
        url = urllib.parse.urlparse(args.url)
        if url.hostname not in ("127.0.0.1", "localhost", "::1"):
            sys.exit("loopback servers only")
        host, port, pid = url.hostname, url.port or 80, args.pid
    else:
        proc, port = start_server(args)
        host, pid = "127.0.0.1", proc.pid

    failed_before = metric(host, port, "gemma_requests_failed_total") or 0
    cancelled_before = metric(host, port, "gemma_requests_cancelled_total") or 0
    sampler = RssSampler(pid)
    sampler.start()
    counter, report, problems = [0], [], []
    try:
        phase_seconds = duration / len(PHASE_CLIENTS)
        for clients in PHASE_CLIENTS:
            t0 = time.monotonic()
            rss0 = sampler.read()
            results, stuck = run_phase(host, port, clients, phase_seconds, args, counter)
            t1 = time.monotonic()
            if not wait_idle(host, port):
                problems.append(f"{clients} clients: slots or queue still busy after the phase")
            rss1 = sampler.read()
            report.append((clients, t1 - t0, results, stuck, rss0, rss1, sampler.between(t0, t1 + 1), t0))
        server_failed = (metric(host, port, "gemma_requests_failed_total") or 0) - failed_before
        server_cancelled = (metric(host, port, "gemma_requests_cancelled_total") or 0) - cancelled_before
        if server_failed:
            problems.append(f"the server counted {server_failed:.0f} failed request(s)")
    finally:
        sampler.stop.set()
        if proc:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                problems.append("the server did not stop within 60 s of SIGTERM")

    mb = 1024 * 1024
    print(f"load test: {duration:.0f} s, phases of {phase_seconds:.0f} s at {PHASE_CLIENTS} clients, "
          f"max_tokens {args.max_tokens}, request timeout {args.request_timeout:.0f} s")
    header = (f"{'clients':>7} {'done':>5} {'cancel':>6} {'failed':>6} {'hung':>4} {'req/s':>6} {'tok/s':>7} "
              f"{'p50 s':>6} {'p95 s':>6} {'RSS start':>9} {'end':>6} {'max':>6} {'growth':>6}")
    print(header)
    for clients, wall, results, stuck, rss0, rss1, samples, t0 in report:
        count = {k: sum(r["outcome"] == k for r in results) for k in ("completed", "cancelled", "failed", "hung")}
        count["hung"] += stuck
        finished = [r for r in results if r["outcome"] == "completed"]
        tokens = sum(r["tokens"] for r in finished)
        latencies = [r["latency"] for r in finished]
        settled = [rss for t, rss in sampler.samples if t0 + wall / 4 <= t <= t0 + wall + 1]
        growth = (settled[-1] - settled[0]) if len(settled) >= 2 else 0
        rss_max = max(samples) if samples else float("nan")
        print(f"{clients:>7} {count['completed']:>5} {count['cancelled']:>6} {count['failed']:>6} {count['hung']:>4} "
              f"{count['completed'] / wall:>6.2f} {tokens / wall:>7.1f} {percentile(latencies, 0.5):>6.2f} "
              f"{percentile(latencies, 0.95):>6.2f} {(rss0 or 0) / mb:>7.0f}MB {(rss1 or 0) / mb:>4.0f}MB "
              f"{rss_max / mb:>4.0f}MB {growth / mb:>4.0f}MB")
        for r in results:
            if r["outcome"] in ("failed", "hung"):
                problems.append(f"{clients} clients: {r['kind']} request {r['outcome']}: {r.get('why', '')}")
        if stuck:
            problems.append(f"{clients} clients: {stuck} client(s) never returned")
        if growth > args.rss_margin_mb * mb:
            problems.append(f"{clients} clients: RSS grew {growth / mb:.0f} MB after the warm-up quarter")
    print(f"server: {server_cancelled:.0f} requests cancelled by their clients, {server_failed:.0f} failed")
    if problems:
        print("FAILED:")
        for p in problems[:50]:
            print("  " + p)
        sys.exit(1)
    print("ok: no lost or hung requests, memory flat")


if __name__ == "__main__":
    main()
