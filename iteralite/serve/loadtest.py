"""Load test of `iteralite serve` (a benchmark, not a test):

    python -m iteralite.serve.loadtest --checkpoint checkpoints/mixed.safetensors \\
        [--clients 32] [--seconds 60] [--workers N] [--out metrics/serve.json]

Starts the server as a subprocess on a free loopback port (127.0.0.1 only), runs `--clients`
concurrent streaming clients for `--seconds` (and at most `--max-requests` requests) with mixed
prompt lengths, a share of deliberately bad requests (each must be a 400) and of clients that
leave mid-stream, then SIGTERMs the server. Reports requests/s, tokens/s, time to first token and
per-token latency percentiles, errors by kind and the server's peak RSS; writes the JSON atomically."""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

import aiohttp

from iteralite.io.atomic import write_text

HOST = "127.0.0.1"  # never any other address
WORDS = ("Once upon a time there was a little girl named Lily who loved to play in the park with her "
         "dog . One day she saw a big red ball under a tree and she was very happy").split()


def bad_requests(max_tokens: int, context: int) -> list[tuple[str, bytes]]:
    """(kind, body) pairs the server must refuse with 400."""
    return [("malformed_json", b'{"prompt": "Once'),
            ("non_utf8", b'{"prompt": "\xff\xfe"}'),
            ("wrong_type", b'{"prompt": 42}'),
            ("bad_temperature", b'{"prompt": "Hi", "temperature": "hot"}'),
            ("max_tokens_over_limit", json.dumps({"prompt": "Hi", "max_tokens": max_tokens + 1}).encode()),
            ("prompt_over_context", json.dumps({"prompt": " ".join(["Lily"] * (context + 8))}).encode())]


def percentiles(xs: list[float]) -> dict:
    if not xs:
        return {"p50": None, "p95": None, "p99": None, "n": 0}
    xs = sorted(xs)
    pick = lambda q: xs[min(len(xs) - 1, int(q * len(xs)))]  # noqa: E731 (nearest rank)
    return {"p50": pick(0.50), "p95": pick(0.95), "p99": pick(0.99), "n": len(xs)}


class Stats:
    def __init__(self):
        self.ok = self.tokens = self.bad_400 = self.disconnects = self.sent = 0
        self.ttft_ms: list[float] = []
        self.token_ms: list[float] = []
        self.errors: collections.Counter = collections.Counter()


async def _one_stream(session, url, body, stats: Stats, leave_after: int | None) -> None:
    t0 = time.perf_counter()
    async with session.post(url, json={**body, "stream": True}) as r:
        if r.status != 200:
            stats.errors[f"http_{r.status}"] += 1
            await r.read()
            return
        first = last = usage = None
        done, chunks = False, 0
        async for raw in r.content:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            ev = json.loads(data)
            if "error" in ev:
                stats.errors["stream_error"] += 1
                return
            now = time.perf_counter()
            if ev["choices"][0]["text"]:
                if first is None:
                    first = now
                    stats.ttft_ms.append(1000 * (now - t0))
                last = now
                chunks += 1
            usage = ev.get("usage") or usage
            if leave_after is not None and chunks >= leave_after:
                stats.disconnects += 1
                r.close()  # drop the connection mid-stream
                return
        if not done or usage is None:
            stats.errors["stream_incomplete"] += 1
            return
        stats.ok += 1
        stats.tokens += usage["completion_tokens"]
        if first is not None and usage["completion_tokens"] > 1:
            # Mean time per token after the first, per request (chunk gaps alone mislead: the
            # server coalesces the pieces it has into one write).
            stats.token_ms.append(1000 * (last - first) / (usage["completion_tokens"] - 1))


async def client(i: int, url: str, args, stats: Stats, deadline: float, bad: list, rng: random.Random) -> None:
    timeout = aiohttp.ClientTimeout(total=args.request_timeout)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while time.monotonic() < deadline and stats.sent < args.max_requests:
            stats.sent += 1
            roll = rng.random()
            try:
                if roll < args.bad_share:
                    kind, body = rng.choice(bad)
                    async with session.post(url, data=body) as r:
                        await r.read()
                        if r.status == 400:
                            stats.bad_400 += 1
                        else:
                            stats.errors[f"bad_request_{kind}_got_{r.status}"] += 1
                    continue
                n_words = rng.choice((1, 4, 16, 64, 200))
                body = {"prompt": " ".join(rng.choice(WORDS) for _ in range(n_words)),
                        "max_tokens": rng.randint(16, args.max_tokens), "temperature": 0.8, "top_k": 40,
                        "seed": rng.randrange(2**32)}
                leave = rng.randint(1, 8) if roll < args.bad_share + args.disconnect_share else None
                await _one_stream(session, url, body, stats, leave)
            except asyncio.TimeoutError:
                stats.errors["timeout"] += 1
            except aiohttp.ClientError as e:
                stats.errors[f"client_{type(e).__name__}"] += 1


def start_server(args) -> tuple[subprocess.Popen, int, list[str]]:
    cmd = [sys.executable, "-m", "iteralite.cli", "serve", "--checkpoint", args.checkpoint,
           "--tokenizer", args.tokenizer, "--host", HOST, "--port", "0", "--workers", str(args.workers),
           "--queue", str(args.clients), "--runtime", args.runtime,
           "--max-tokens", str(args.server_max_tokens), "--context", str(args.context)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    log: list[str] = []
    first = proc.stderr.readline()
    log.append(first)
    m = re.search(rf"http://{re.escape(HOST)}:(\d+)", first)
    if not m:
        proc.kill()
        raise SystemExit(f"loadtest: the server did not start: {first}{proc.stderr.read()}")
    # Keep reading its stderr so the pipe never fills and blocks the server.
    threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True).start()
    return proc, int(m.group(1)), log


def peak_rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


async def run(args) -> dict:
    proc, port, log = start_server(args)
    url = f"http://{HOST}:{port}/v1/completions"
    stats, rng = Stats(), random.Random(args.seed)
    bad = bad_requests(args.server_max_tokens, args.context)
    t0 = time.monotonic()
    try:
        await asyncio.gather(*(client(i, url, args, stats, t0 + args.seconds, bad, random.Random(rng.random()))
                               for i in range(args.clients)))
        elapsed = time.monotonic() - t0
        rss = peak_rss_bytes(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
    return {"checkpoint": args.checkpoint, "runtime": args.runtime, "workers": args.workers,
            "clients": args.clients, "seconds": round(elapsed, 3), "requests_sent": stats.sent,
            "requests_completed": stats.ok, "requests_per_s": stats.ok / elapsed,
            "completion_tokens": stats.tokens, "tokens_per_s": stats.tokens / elapsed,
            "ttft_ms": percentiles(stats.ttft_ms), "per_token_ms": percentiles(stats.token_ms),
            "deliberate_bad_requests_400": stats.bad_400, "deliberate_disconnects": stats.disconnects,
            "errors": dict(stats.errors), "server_peak_rss_bytes": rss, "server_exit_code": code,
            "server_log": [line.rstrip() for line in log]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m iteralite.serve.loadtest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="checkpoints/mixed.safetensors")
    p.add_argument("--tokenizer", default="data/tokenizer/tokenizer.json")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--runtime", default="auto", choices=["auto", "native", "fused", "eager"])
    p.add_argument("--max-tokens", type=int, default=128, help="a request asks for 16..this many tokens")
    p.add_argument("--server-max-tokens", type=int, default=512)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--bad-share", type=float, default=0.05, help="share of deliberately bad requests")
    p.add_argument("--disconnect-share", type=float, default=0.05, help="share of clients leaving mid-stream")
    p.add_argument("--max-requests", type=int, default=1_000_000, help="stop after this many requests")
    p.add_argument("--request-timeout", type=float, default=60.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="metrics/serve.json")
    args = p.parse_args(argv)
    if not (args.clients >= 1 and args.seconds > 0 and args.workers >= 1 and 16 <= args.max_tokens <= args.server_max_tokens):
        p.error("need --clients >= 1, --seconds > 0, --workers >= 1, 16 <= --max-tokens <= --server-max-tokens")
    report = asyncio.run(run(args))
    write_text(args.out, json.dumps(report, indent=2) + "\n")
    ms = lambda d: "/".join("-" if d[k] is None else f"{d[k]:.1f}" for k in ("p50", "p95", "p99"))  # noqa: E731
    rss = report["server_peak_rss_bytes"]
    print(f"{report['requests_completed']} requests in {report['seconds']:.1f} s: {report['requests_per_s']:.1f} req/s, "
          f"{report['tokens_per_s']:,.0f} tok/s; TTFT p50/p95/p99 {ms(report['ttft_ms'])} ms; per token "
          f"{ms(report['per_token_ms'])} ms; bad requests 400: {report['deliberate_bad_requests_400']}; "
          f"disconnects: {report['deliberate_disconnects']}; errors: {report['errors'] or 'none'}; server peak RSS "
          f"{'-' if rss is None else f'{rss / 2**20:.0f} MiB'}; server exit {report['server_exit_code']} -> {args.out}")
    return 0 if not report["errors"] and report["server_exit_code"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
