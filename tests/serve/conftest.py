"""A tiny packed artifact and its tokenizer, a server on a free loopback port (in a thread, or as
a real `iteralite serve` subprocess), and a small stdlib HTTP client. Loopback only."""
from __future__ import annotations

import asyncio
import http.client
import json
import threading
import time
from argparse import Namespace

import pytest
import torch

from iteralite.core.model import IteraLite
from iteralite.data.tokenizer import eot_id, file_sha256, load_tokenizer
from iteralite.io.checkpoint import load_model, save_checkpoint
from tests.conftest import tiny_config

HOST = "127.0.0.1"


@pytest.fixture(scope="session")
def artifact(tok_dir, tmp_path_factory):
    """(packed checkpoint, tokenizer path): the mixed 2/3/4-bit layout the native step runs. The
    <|endoftext|> embedding row is zero so greedy stories do not end by themselves."""
    from iteralite.quant.config import mixed_config
    from iteralite.quant.units import quantize_allocation, units

    tok_path = tok_dir / "tokenizer.json"
    torch.manual_seed(0)
    m = IteraLite(tiny_config()).eval()
    with torch.no_grad():
        m.embedding.weight[eot_id(load_tokenizer(tok_path))] = 0.0
    root = tmp_path_factory.mktemp("serve")
    fp32 = root / "fp32.safetensors"
    save_checkpoint(fp32, m, kind="fp32", tokenizer_sha256=file_sha256(tok_path))
    alloc = {u: (2, 3, 4)[i % 3] for i, u in enumerate(units(load_model(fp32)[0]))}
    q = quantize_allocation(load_model(fp32)[0], dict(alloc), 8)
    path = root / "packed.safetensors"
    save_checkpoint(path, q, kind="mixed", tokenizer_sha256=file_sha256(tok_path),
                    quant=mixed_config(alloc, 8, load_model(fp32)[0]), layout="compact")
    return path, tok_path


def load_runtime(artifact, runtime="auto"):
    from iteralite.cli import _load
    rt, _, tok = _load(Namespace(checkpoint=str(artifact[0]), tokenizer=str(artifact[1]), runtime=runtime))
    return rt, tok


class Slow:
    """A runtime that sleeps before each step: a request that holds its slot long enough to test."""

    def __init__(self, runtime, delay: float = 0.005):
        self.runtime, self.delay, self.steps = runtime, delay, 0

    def __call__(self, *a, **k):
        return self.runtime(*a, **k)

    def step(self, *a, **k):
        self.steps += 1
        time.sleep(self.delay)
        return self.runtime.step(*a, **k)


class ThreadServer:
    """`serve_async` on a free loopback port in a background thread (signals stay the test's)."""

    def __init__(self, engine):
        self.engine, self.port, self._ready = engine, None, threading.Event()

    def __enter__(self):
        from iteralite.serve.app import serve_async

        async def main():
            self.loop, self.stop = asyncio.get_running_loop(), asyncio.Event()
            await serve_async(self.engine, HOST, 0, self.stop, 10.0, self._on_ready)

        self.thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
        self.thread.start()
        assert self._ready.wait(30), "the server did not start"
        return self

    def _on_ready(self, port):
        self.port = port
        self._ready.set()

    def __exit__(self, *exc):
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(30)
        assert not self.thread.is_alive()


def make_engine(runtimes, tok, queue=4, **limits):
    from iteralite.serve.engine import Engine
    from iteralite.serve.protocol import Limits
    return Engine(runtimes, tok, "packed", Limits(**limits), queue=queue)


@pytest.fixture
def server(artifact):
    """Two native slots over the tiny packed artifact."""
    from iteralite.serve.engine import runtime_pool
    rt, tok = load_runtime(artifact)
    with ThreadServer(make_engine(runtime_pool(rt, 2), tok, max_tokens=64, context=256)) as s:
        yield s


def post(port, body, raw: bool = False, timeout: float = 30):
    """POST /v1/completions -> (status, headers, parsed JSON body)."""
    c = http.client.HTTPConnection(HOST, port, timeout=timeout)
    data = body if raw else json.dumps(body).encode()
    c.request("POST", "/v1/completions", body=data, headers={"Content-Type": "application/json"})
    r = c.getresponse()
    out = r.status, dict(r.getheaders()), json.loads(r.read() or b"null")
    c.close()
    return out


def get(port, path):
    c = http.client.HTTPConnection(HOST, port, timeout=30)
    c.request("GET", path)
    r = c.getresponse()
    out = r.status, json.loads(r.read())
    c.close()
    return out


def open_stream(port, body, timeout: float = 30):
    """Start a streaming request -> (connection, response), the SSE lines not yet read."""
    c = http.client.HTTPConnection(HOST, port, timeout=timeout)
    c.request("POST", "/v1/completions", body=json.dumps({**body, "stream": True}).encode())
    r = c.getresponse()
    assert r.status == 200 and r.getheader("Content-Type").startswith("text/event-stream")
    return c, r


def events(resp):
    """Yield the `data:` payloads of an SSE response (parsed JSON, or the string "[DONE]")."""
    while True:
        line = resp.readline()
        if not line:
            return
        line = line.decode().rstrip("\n")
        if line.startswith("data: "):
            data = line[len("data: "):]
            yield data if data == "[DONE]" else json.loads(data)


def stream(port, body):
    """A whole streaming request -> (text, list of chunk objects, saw [DONE])."""
    c, r = open_stream(port, body)
    chunks, done = [], False
    for ev in events(r):
        if ev == "[DONE]":
            done = True
            break
        chunks.append(ev)
    c.close()
    return "".join(ch["choices"][0]["text"] for ch in chunks), chunks, done
