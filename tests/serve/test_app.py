"""`iteralite serve` end to end on loopback: completions (JSON and SSE), greedy text equal to
`iteralite generate`, 400s naming the field, concurrency without cross-talk, 503 when full, a
disconnect freeing its slot, and SIGTERM draining an in-flight request before exit 0."""
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from iteralite.cli import main
from iteralite.runtime.native.runtime import NativeIteraLite
from tests.conftest import REPO
from tests.serve.conftest import (HOST, Slow, ThreadServer, events, get, load_runtime, make_engine,
                                  open_stream, post, stream)


def test_health_and_models(server):
    status, body = get(server.port, "/health")
    assert status == 200 and body["status"] == "ok" and body["workers"] == 2
    assert body["runtime"] == "NativeIteraLite"
    status, body = get(server.port, "/v1/models")
    assert status == 200 and body["data"][0]["id"] == "packed"
    assert get(server.port, "/nope")[0] == 404


def test_completion_json_and_stream_agree(server):
    req = {"prompt": "the cat", "max_tokens": 10, "temperature": 0.9, "top_k": 20, "seed": 4}
    status, _, body = post(server.port, req)
    assert status == 200 and body["object"] == "text_completion"
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length" and choice["text"]
    assert body["usage"]["completion_tokens"] == 10
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 10
    assert {"queue_ms", "prompt_ms", "decode_ms", "total_ms"} <= set(body["timing"])
    text, chunks, done = stream(server.port, req)
    assert done and text == choice["text"]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and chunks[-1]["usage"] == body["usage"]


def test_greedy_completion_equals_generate(server, artifact, capsys):
    prompt = "Lily saw a big"
    assert main(["generate", "--checkpoint", str(artifact[0]), "--tokenizer", str(artifact[1]),
                 "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "20"]) == 0
    printed = capsys.readouterr().out
    _, _, body = post(server.port, {"prompt": prompt, "max_tokens": 20, "temperature": 0})
    assert printed == prompt + body["choices"][0]["text"] + "\n"
    assert stream(server.port, {"prompt": prompt, "max_tokens": 20, "temperature": 0})[0] == body["choices"][0]["text"]


def test_stop_sequence_cuts_the_text(server):
    full = post(server.port, {"prompt": "the", "max_tokens": 30, "temperature": 0})[2]["choices"][0]["text"]
    stop = full[5:7]
    cut = full[:full.index(stop)]
    _, _, body = post(server.port, {"prompt": "the", "max_tokens": 30, "temperature": 0, "stop": [stop]})
    assert body["choices"][0] == {"text": cut, "index": 0, "logprobs": None, "finish_reason": "stop"}
    assert stream(server.port, {"prompt": "the", "max_tokens": 30, "temperature": 0, "stop": stop})[0] == cut


@pytest.mark.parametrize("body,field", [
    (b"{\"prompt\": \"\xff\"}", "body"),
    (b"{\"prompt\": ", "body"),
    (b'{"prompt": 1}', "prompt"),
    (b'{"prompt": "a", "temperature": "warm"}', "temperature"),
    (b'{"prompt": "a", "max_tokens": 65}', "max_tokens"),
    (b'{"prompt": "a", "stream": 1}', "stream"),
    (("{\"prompt\": \"" + "the cat " * 200 + "\"}").encode(), "prompt"),  # over the 256-token context
    (b'{"prompt": "a", "max_tokens": 64, "stop": 3}', "stop"),
])
def test_bad_requests_are_400_naming_the_field(server, body, field):
    status, headers, err = post(server.port, body, raw=True)
    assert status == 400 and headers["Content-Type"].startswith("application/json")
    assert err["error"]["param"] == field and err["error"]["message"], err
    assert get(server.port, "/health")[1]["pending"] == 0  # nothing was admitted


def test_too_large_body_is_a_json_413(server):
    status, _, err = post(server.port, b'{"prompt": "' + b"a" * (1 << 20) + b'"}', raw=True)
    assert status == 413 and err["error"]["param"] == "body"


def test_concurrent_streams_equal_each_alone(server):
    reqs = [{"prompt": "the dog", "max_tokens": 40, "temperature": 1.0, "seed": 1},
            {"prompt": "Tom ran to the park and", "max_tokens": 40, "temperature": 0.7, "top_p": 0.9, "seed": 2}]
    alone = [stream(server.port, r)[0] for r in reqs]
    together = [None, None]

    def run(i):
        together[i] = stream(server.port, reqs[i])[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert together == alone and alone[0] != alone[1]


def test_full_queue_is_503_and_a_disconnect_frees_the_slot(artifact):
    rt, tok = load_runtime(artifact)
    assert isinstance(rt, NativeIteraLite)
    slow = Slow(rt)
    with ThreadServer(make_engine([slow], tok, queue=0, max_tokens=4000, context=8000)) as s:
        conn, resp = open_stream(s.port, {"prompt": "the", "max_tokens": 4000})
        first = next(events(resp))  # it holds the only slot now
        assert first["choices"][0]["text"] is not None
        status, headers, err = post(s.port, {"prompt": "the", "max_tokens": 2})
        assert status == 503 and headers["Retry-After"] == "1" and err["error"]["type"] == "server_busy"
        conn.sock.shutdown(socket.SHUT_RDWR)  # the client leaves mid-stream
        conn.close()
        deadline = time.monotonic() + 10
        while get(s.port, "/health")[1]["pending"] and time.monotonic() < deadline:
            time.sleep(0.05)
        health = get(s.port, "/health")[1]
        assert health["pending"] == 0 and health["busy"] == 0
        assert slow.steps < 1000  # the decode stopped early, it did not run to max_tokens
        status, _, body = post(s.port, {"prompt": "the", "max_tokens": 2})
        assert status == 200 and body["usage"]["completion_tokens"] == 2


def test_a_client_leaving_a_json_request_frees_its_slot(artifact):
    rt, tok = load_runtime(artifact)
    slow = Slow(rt)
    with ThreadServer(make_engine([slow], tok, queue=0, max_tokens=4000, context=8000)) as s:
        sock = socket.create_connection((HOST, s.port))
        body = b'{"prompt": "the", "max_tokens": 4000}'
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 10
        while not slow.steps and time.monotonic() < deadline:  # decoding now
            time.sleep(0.01)
        sock.close()
        while get(s.port, "/health")[1]["pending"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert get(s.port, "/health")[1]["pending"] == 0 and slow.steps < 1000


def test_sigterm_drains_the_in_flight_request_and_exits_0(artifact):
    """A real `iteralite serve` subprocess (eager runtime: slow enough to still be decoding)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "iteralite.cli", "serve", "--checkpoint", str(artifact[0]),
                             "--tokenizer", str(artifact[1]), "--port", "0", "--workers", "1",
                             "--runtime", "eager", "--max-tokens", "3000", "--context", "4000"],
                            cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        port = int(re.search(rf"http://{HOST}:(\d+)", line).group(1))
        conn, resp = open_stream(port, {"prompt": "the", "max_tokens": 1500, "temperature": 0})
        evs = events(resp)
        next(evs)
        proc.send_signal(signal.SIGTERM)
        rest = list(evs)
        assert rest[-1] == "[DONE]" and rest[-2]["choices"][0]["finish_reason"] == "length"
        assert rest[-2]["usage"]["completion_tokens"] == 1500
        assert proc.wait(30) == 0
        err = proc.stderr.read()
        assert "draining 1 request(s)" in err and "stopped (drained)" in err, err
        with pytest.raises(OSError):  # no longer listening
            socket.create_connection((HOST, port), timeout=2).close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
