"""The HTTP side of `iteralite serve` (aiohttp): `POST /v1/completions` (JSON or server-sent
events), `GET /v1/models`, `GET /health`; JSON errors only, never a traceback; a client that
leaves stops its decode and frees its slot; SIGTERM / SIGINT drain the admitted requests, then exit 0."""
from __future__ import annotations

import asyncio
import logging
import signal
import sys
import threading
import time
from pathlib import Path

from aiohttp import web

from iteralite.serve.engine import Cancelled, Engine
from iteralite.serve.protocol import (BadRequest, check_context, completion_body, completion_id,
                                      error_body, parse_request, sse)

log = logging.getLogger("iteralite.serve")
ENGINE = web.AppKey("engine", Engine)
MAX_BODY = 1 << 20  # 1 MiB: far over any prompt that fits the context
RETRY_AFTER_S = 1
POLL_S = 0.25  # how often a waiting handler looks whether its client is still there


def _error(status: int, message: str, kind: str, field: str | None = None, headers=None) -> web.Response:
    return web.json_response(error_body(message, kind, field), status=status, headers=headers)


@web.middleware
async def json_errors(request, handler):
    """aiohttp's own errors (404, 405, 413) and anything unexpected, as JSON error bodies."""
    try:
        return await handler(request)
    except web.HTTPRequestEntityTooLarge:
        return _error(413, f"the body is over {MAX_BODY} bytes", "invalid_request_error", "body")
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return _error(e.status, e.reason, "invalid_request_error")
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("unexpected error on %s %s", request.method, request.path)
        return _error(500, "internal error (see the server log)", "server_error")


def _gone(request) -> bool:
    t = request.transport
    return t is None or t.is_closing()


async def _pieces(request, task: asyncio.Task, queue: asyncio.Queue, cancelled: threading.Event):
    """The text pieces of a running decode, as lists of those that have arrived (one write each,
    not one per token); tells the decode to stop if the client leaves."""
    while True:
        try:
            batch = [await asyncio.wait_for(queue.get(), POLL_S)]
        except asyncio.TimeoutError:
            if _gone(request):
                cancelled.set()
            continue
        while not queue.empty():
            batch.append(queue.get_nowait())
        if batch[-1] is None:  # the decode task is done (its marker comes last)
            if batch[:-1]:
                yield batch[:-1]
            return
        yield batch


async def completions(request: web.Request) -> web.StreamResponse:
    engine: Engine = request.app[ENGINE]
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return _error(413, f"the body is over {MAX_BODY} bytes", "invalid_request_error", "body")
    try:
        req = parse_request(body, engine.limits)
        n_prompt = len(engine.tok.encode(req.prompt, add_special_tokens=False).ids) or 1  # empty: <|endoftext|>
        check_context(n_prompt, req, engine.limits)
    except BadRequest as e:
        return web.json_response(e.body(), status=400)
    if not engine.admit():
        why = "the server is shutting down" if engine.draining else "the server is busy (queue full)"
        return _error(503, f"{why}; retry later", "server_busy", headers={"Retry-After": str(RETRY_AFTER_S)})

    loop, queue, cancelled = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()
    task = asyncio.create_task(engine.run(req, lambda p: loop.call_soon_threadsafe(queue.put_nowait, p), cancelled))
    # After every piece the decode thread queued (call_soon_threadsafe keeps the order).
    task.add_done_callback(lambda _: queue.put_nowait(None))
    cid, created, t0 = completion_id(), int(time.time()), time.perf_counter()
    try:
        if req.stream:
            return await _stream(request, engine, task, queue, cancelled, cid, created, t0)
        async for _ in _pieces(request, task, queue, cancelled):
            pass
        try:
            result = task.result()
        except Cancelled:
            return web.Response(status=499)  # nobody is there to read it
        timing = {**result.timing, "total_ms": 1000 * (time.perf_counter() - t0)}
        return web.json_response(completion_body(cid, engine.model_name, result.text, result.finish_reason,
                                                 result.usage(), timing, created))
    finally:
        cancelled.set()  # a no-op when the decode ended; otherwise (a write failed) it stops it
        if not task.done():
            await asyncio.wait({task})
        if not task.cancelled():
            task.exception()  # retrieved: Cancelled after a disconnect is expected, not an error


async def _stream(request, engine: Engine, task, queue, cancelled, cid, created, t0) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    try:
        await resp.prepare(request)
        async for batch in _pieces(request, task, queue, cancelled):
            await resp.write(b"".join(sse(completion_body(cid, engine.model_name, piece, None, created=created))
                                      for piece in batch))
        try:
            result = task.result()
        except Cancelled:
            return resp
        except Exception as e:  # the status line is sent: say it in the stream
            log.exception("decode failed")
            await resp.write(sse(error_body(f"decode failed: {type(e).__name__}", "server_error")))
            await resp.write(sse("[DONE]"))
            return resp
        timing = {**result.timing, "total_ms": 1000 * (time.perf_counter() - t0)}
        await resp.write(sse(completion_body(cid, engine.model_name, "", result.finish_reason, result.usage(),
                                             timing, created)))
        await resp.write(sse("[DONE]"))
        await resp.write_eof()
    except ConnectionError:  # the client left mid-stream (aiohttp's reset error is one)
        cancelled.set()
    return resp


async def models(request: web.Request) -> web.Response:
    engine: Engine = request.app[ENGINE]
    return web.json_response({"object": "list", "data": [
        {"id": engine.model_name, "object": "model", "created": 0, "owned_by": "iteralite"}]})


async def health(request: web.Request) -> web.Response:
    e: Engine = request.app[ENGINE]
    body = {"status": "draining" if e.draining else "ok", "runtime": e.runtime_name, "workers": e.slots,
            "busy": e.busy, "pending": e.pending, "capacity": e.capacity}
    return web.json_response(body, status=503 if e.draining else 200)


def make_app(engine: Engine) -> web.Application:
    app = web.Application(middlewares=[json_errors], client_max_size=MAX_BODY)
    app[ENGINE] = engine
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    return app


async def serve_async(engine: Engine, host: str, port: int, stop: asyncio.Event, drain_s: float = 60.0,
                      on_ready=None) -> bool:
    """Serve until `stop` is set, then stop listening, drain (up to `drain_s`) and close.
    `on_ready(port)` is called once listening (port 0 picks a free one). True if all requests ended."""
    runner = web.AppRunner(make_app(engine), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0][1]
    if on_ready is not None:
        on_ready(bound)
    await stop.wait()
    engine.draining = True
    print(f"iteralite: stopping; draining {engine.pending} request(s)", file=sys.stderr, flush=True)
    await site.stop()
    drained = await engine.drain(drain_s)
    await runner.cleanup()
    engine.close()
    return drained


def serve(engine: Engine, host: str, port: int, drain_s: float = 60.0) -> int:
    """Run in the foreground until SIGTERM or SIGINT; 0 once every admitted request has ended."""
    def ready(bound: int) -> None:
        print(f"iteralite: serving {engine.model_name} ({engine.runtime_name}, {engine.slots} workers, "
              f"{engine.capacity - engine.slots} queued at most) on http://{host}:{bound}", file=sys.stderr, flush=True)

    async def main() -> bool:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        return await serve_async(engine, host, port, stop, drain_s, ready)

    drained = asyncio.run(main())
    print(f"iteralite: stopped ({'drained' if drained else 'drain timed out'})", file=sys.stderr, flush=True)
    return 0 if drained else 1


def model_name(checkpoint) -> str:
    return Path(checkpoint).stem
