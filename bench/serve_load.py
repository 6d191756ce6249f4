"""Load on `pico-llm serve`: N concurrent streaming clients on localhost for a bounded time.

    python bench/serve_load.py runs/NAME --clients 1,8,32 --seconds 20 --max_tokens 64 [--max_active 8]

It starts the server itself (`pico-llm serve RUN --port 0`) unless --url names one that is running. Each
phase runs C client threads that send streaming /v1/completions requests back to back until the phase's
time is up; the phases run in interleaved rounds (1, 8, 32, 1, 8, 32, ...) so that a slow moment of a
shared machine falls on every setting alike. Per setting it reports: requests, errors (a non-200 answer,
an error event, a stream without [DONE] or a broken connection: must be 0), time to first token p50/p99,
and aggregate completion tokens/s (from each stream's usage) with its ratio to one client alone.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import threading
import time
from urllib.parse import urlparse

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

PROMPTS = ["0 1 2 3 4", "Once upon a time", "the cat sat on", "1 2 4 8", "There was a", "5 10 15"]


def start_server(run: str, max_active: int, max_tokens: int):
    proc = subprocess.Popen([sys.executable, "-m", "picollm", "serve", run, "--port", "0", "--max_active",
                             str(max_active), "--max_tokens_limit", str(max(max_tokens, 16))],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if "listening on http://" in line:
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            return proc, line.split("listening on ")[1].split()[0]
        print(line, end="", file=sys.stderr)
    raise SystemExit("the server did not start")


def one_request(host: str, port: int, body: dict) -> dict:
    """{"ttft": s or None, "tokens": n, "error": message or None} of one streamed completion."""
    t0 = time.perf_counter()
    ttft, tokens, done = None, 0, False
    try:
        conn = http.client.HTTPConnection(host, port, timeout=300)
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            return {"ttft": None, "tokens": 0, "error": f"HTTP {resp.status}: {resp.read()[:200]!r}"}
        while True:
            line = resp.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data: "):
                continue
            data = line[6:]
            if data == b"[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                return {"ttft": ttft, "tokens": tokens, "error": chunk["error"]["message"]}
            if ttft is None and any(c.get("text") for c in chunk.get("choices", [])):
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
        conn.close()
    except (OSError, http.client.HTTPException, ValueError) as e:
        return {"ttft": ttft, "tokens": tokens, "error": f"{type(e).__name__}: {e}"}
    return {"ttft": ttft, "tokens": tokens, "error": None if done else "the stream ended without [DONE]"}


def phase(url: str, clients: int, seconds: float, max_tokens: int, seed0: int) -> dict:
    u = urlparse(url)
    results: list[dict] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def client(c: int):
        i = 0
        while time.perf_counter() < deadline:
            body = {"prompt": PROMPTS[(c + i) % len(PROMPTS)], "max_tokens": max_tokens, "stream": True,
                    "seed": seed0 + c * 1000 + i, "top_p": 0.95}
            r = one_request(u.hostname, u.port, body)
            with lock:
                results.append(r)
            i += 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0  # includes the requests that were running at the deadline
    return {"wall": wall, "results": results}


def percentile(xs: list[float], q: float):
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def summarize(phases: list[dict]) -> dict:
    results = [r for p in phases for r in p["results"]]
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    tokens = sum(r["tokens"] for r in results)
    errors = [r["error"] for r in results if r["error"]]
    wall = sum(p["wall"] for p in phases)
    return {"requests": len(results), "errors": len(errors), "first_errors": errors[:3],
            "ttft_p50_ms": None if not ttft else 1000 * percentile(ttft, 50),
            "ttft_p99_ms": None if not ttft else 1000 * percentile(ttft, 99),
            "tokens": tokens, "tokens_per_s": tokens / wall if wall else 0.0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", nargs="?", help="a run directory (the script starts the server)")
    ap.add_argument("--url", default=None, help="a running server instead, e.g. http://127.0.0.1:8000")
    ap.add_argument("--clients", default="1,8,32", help="concurrent streams per setting, comma-separated")
    ap.add_argument("--seconds", type=float, default=20.0, help="time per setting per round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max_tokens", type=int, default=64)
    ap.add_argument("--max_active", type=int, default=8, help="the started server's --max_active")
    ap.add_argument("--json", default=None, help="also write the figures here")
    a = ap.parse_args()
    if (a.run is None) == (a.url is None):
        ap.error("give a run directory or --url")
    try:
        levels = [int(x) for x in a.clients.split(",")]
    except ValueError:
        ap.error(f"--clients: {a.clients!r} is not a comma-separated list of numbers")
    if any(c < 1 for c in levels) or a.seconds <= 0 or a.rounds < 1 or a.max_tokens < 1:
        ap.error("--clients, --seconds, --rounds and --max_tokens must be positive")
    proc, url = (None, a.url) if a.url else start_server(a.run, a.max_active, a.max_tokens)
    try:
        one_request(urlparse(url).hostname, urlparse(url).port, {"prompt": "0", "max_tokens": 2, "stream": True})
        runs: dict[int, list[dict]] = {c: [] for c in levels}
        for r in range(a.rounds):
            for c in levels:
                print(f"round {r + 1}/{a.rounds}: {c} client(s) for {a.seconds:g} s", file=sys.stderr)
                runs[c].append(phase(url, c, a.seconds, a.max_tokens, seed0=r * 10 ** 6))
        health = json.loads(_get(url + "/health"))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    figures = {c: summarize(p) for c, p in runs.items()}
    base = figures[min(levels)]["tokens_per_s"]
    print(f"server: {url}, max_active {health.get('max_active')}, {a.max_tokens} tokens per request, top-p 0.95, "
          f"{a.rounds} interleaved rounds of {a.seconds:g} s per setting")
    print("| streams | requests | errors | TTFT p50 ms | TTFT p99 ms | tokens/s | vs 1 stream |")
    print("|---|---|---|---|---|---|---|")
    for c in levels:
        f = figures[c]
        p50 = "-" if f["ttft_p50_ms"] is None else f"{f['ttft_p50_ms']:.0f}"
        p99 = "-" if f["ttft_p99_ms"] is None else f"{f['ttft_p99_ms']:.0f}"
        ratio = f["tokens_per_s"] / base if base else float("nan")
        print(f"| {c} | {f['requests']} | {f['errors']} | {p50} | {p99} | {f['tokens_per_s']:.0f} | {ratio:.2f}x |")
    for c in levels:
        for e in figures[c]["first_errors"]:
            print(f"error with {c} streams: {e}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"url": url, "max_tokens": a.max_tokens, "health": health,
                       "figures": {str(c): v for c, v in figures.items()}}, f, indent=2)
    return 1 if any(f["errors"] for f in figures.values()) else 0


def _get(url: str) -> str:
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.request("GET", u.path)
    return conn.getresponse().read().decode()


if __name__ == "__main__":
    raise SystemExit(main())
