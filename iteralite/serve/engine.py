"""The decoding side of the server: a pool of runtime instances (one per worker slot), bounded
admission, and one completion run start to end in a worker thread.

A native runtime holds one C scratch context and one logits buffer, so two threads must never
step the same instance: each slot gets its own `NativeIteraLite` over the same packed weights
(the weights are shared, only the scratch is per instance). The eager and fused torch models take
the recurrent state as an argument and keep no per-call buffers, so their slots share one model.
Every request gets a fresh state from `generate_ids`, so requests never see each other's tokens.
The C step and torch ops release the GIL, so slots decode in parallel and the event loop stays free."""
from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from iteralite.serve.protocol import CompletionRequest, Limits
from iteralite.train.generate import stream_text


class Cancelled(Exception):
    """The client went away: the decode stops at its next step."""


def runtime_pool(first, n: int) -> list:
    """`n` runtime slots from one loaded runtime (see the module docstring for why)."""
    from iteralite.runtime.native.runtime import NativeIteraLite

    if isinstance(first, NativeIteraLite):
        return [first] + [NativeIteraLite(first.w, first.cfg, first.isa) for _ in range(n - 1)]
    return [first] * n


class StopFilter:
    """Cuts the text at the first `stop` sequence. Text that could still be the start of one is
    held back until the next piece decides, so a streamed answer never shows part of a stop."""

    def __init__(self, stops: list[str]):
        self.stops, self.buf, self.hit = stops, "", False

    def feed(self, piece: str) -> str:
        """The text now safe to send; sets `hit` when a stop sequence is found."""
        self.buf += piece
        if not self.stops:
            out, self.buf = self.buf, ""
            return out
        cuts = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if cuts:
            out, self.buf, self.hit = self.buf[:min(cuts)], "", True
            return out
        # The longest tail of buf that begins some stop sequence stays held.
        keep = max((k for s in self.stops for k in range(1, min(len(s), len(self.buf) + 1))
                    if s.startswith(self.buf[-k:])), default=0)
        out, self.buf = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
        return out

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out


class _Guarded:
    """A runtime whose prefill and every step first check the request's cancel flag."""

    def __init__(self, runtime, cancelled: threading.Event):
        self.runtime, self.cancelled = runtime, cancelled

    def _check(self):
        if self.cancelled.is_set():
            raise Cancelled()

    def __call__(self, *args, **kw):
        self._check()
        return self.runtime(*args, **kw)

    def step(self, *args, **kw):
        self._check()
        return self.runtime.step(*args, **kw)


class _StopHit(Exception):
    pass


@dataclass
class Result:
    text: str
    finish_reason: str  # "stop" (end of text or a stop sequence) or "length" (max_tokens)
    prompt_tokens: int
    completion_tokens: int  # tokens sampled, an end-of-text token included
    timing: dict = field(default_factory=dict)

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


def run_completion(runtime, tok, req: CompletionRequest, emit: Callable[[str], None],
                   cancelled: threading.Event) -> Result:
    """One completion on `runtime` (in a worker thread): the text `iteralite generate` would print
    after the prompt, cut at a stop sequence, `emit` called with each piece as it is decoded.
    Raises Cancelled when `cancelled` is set."""
    stops, parts = StopFilter(req.stop), []

    def write(piece: str) -> None:
        out = stops.feed(piece)
        if out:
            parts.append(out)
            emit(out)
        if stops.hit:
            raise _StopHit()

    timing: dict = {}
    try:
        ids = stream_text(tok, _Guarded(runtime, cancelled), req.prompt, req.max_tokens, req.temperature,
                          req.top_k, req.seed, write, timing, top_p=req.top_p)
        finish = "length" if len(ids) == req.max_tokens else "stop"
    except _StopHit:
        finish = "stop"
    rest = stops.flush()
    if rest:
        parts.append(rest)
        emit(rest)
    sampled = timing["gen_tokens"] + (1 if timing["prompt_s"] else 0)
    t = {"prompt_ms": 1000 * timing["prompt_s"], "decode_ms": 1000 * timing["gen_s"],
         "decode_tokens_per_s": timing["gen_tokens"] / timing["gen_s"] if timing["gen_s"] > 0 else None}
    return Result("".join(parts), finish, timing["prompt_tokens"], sampled, t)


class Engine:
    """Worker slots behind a bounded admission: at most `slots + queue` requests are admitted
    (decoding or waiting for a slot); `admit()` says no beyond that, and the caller answers 503."""

    def __init__(self, runtimes: list, tok, model_name: str, limits: Limits | None = None, queue: int = 16):
        self.tok, self.model_name, self.limits = tok, model_name, limits or Limits()
        self.slots, self.capacity = len(runtimes), len(runtimes) + queue
        self.runtime_name = type(runtimes[0]).__name__
        self._free: asyncio.Queue = asyncio.Queue()
        for rt in runtimes:
            self._free.put_nowait(rt)
        self._executor = ThreadPoolExecutor(self.slots, thread_name_prefix="iteralite-decode")
        self.pending = 0  # admitted and not yet finished (decoding + queued)
        self.draining = False

    @property
    def busy(self) -> int:
        return self.slots - self._free.qsize()

    def admit(self) -> bool:
        """Take a place for one request (then `run` must follow); False when full or draining."""
        if self.draining or self.pending >= self.capacity:
            return False
        self.pending += 1
        return True

    def _release(self, rt) -> None:
        self._free.put_nowait(rt)
        self.pending -= 1

    async def run(self, req: CompletionRequest, emit: Callable[[str], None], cancelled: threading.Event) -> Result:
        """Wait for a slot, decode `req` in a worker thread, free the slot. An admitted request only.

        The slot goes back when the thread is done with it, never earlier: if this coroutine is
        cancelled, the decode is told to stop and the slot is freed when it has."""
        t0 = time.perf_counter()
        try:
            rt = await self._free.get()
        except BaseException:
            self.pending -= 1
            raise
        if cancelled.is_set():  # the client left while queued
            self._release(rt)
            raise Cancelled()
        queued = time.perf_counter() - t0
        fut = asyncio.get_running_loop().run_in_executor(
            self._executor, run_completion, rt, self.tok, req, emit, cancelled)
        fut.add_done_callback(lambda _: self._release(rt))
        try:
            result = await asyncio.shield(fut)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        result.timing = {"queue_ms": 1000 * queued, **result.timing}
        return result

    async def drain(self, timeout: float) -> bool:
        """Refuse new requests and wait up to `timeout` s for the admitted ones; True if all ended."""
        self.draining = True
        end = time.monotonic() + timeout
        while self.pending and time.monotonic() < end:
            await asyncio.sleep(0.02)
        return not self.pending

    def close(self) -> None:
        self._executor.shutdown(wait=True)
