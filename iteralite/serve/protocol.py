"""The wire format of `POST /v1/completions`: parse and check a request body into a
`CompletionRequest` (every problem is a `BadRequest` naming the field), and build the
OpenAI-shaped response objects and server-sent-event chunks.

Sampling limits are the generator's own (`check_sampling`), so the server refuses exactly what
`iteralite generate` refuses; only the messages name JSON fields instead of CLI flags."""
from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field

from iteralite.io.errors import IteraliteError
from iteralite.train.generate import check_prompt, check_sampling

MAX_STOP = 4  # OpenAI's limit on `stop` sequences
# Fields OpenAI clients commonly send that change nothing here; anything else unknown is a 400, so
# a typo (`max_token`) is not silently ignored.
IGNORED = {"model", "user", "stream_options", "n", "echo", "logprobs", "suffix", "best_of",
           "presence_penalty", "frequency_penalty", "logit_bias"}


class BadRequest(Exception):
    """A request the server refuses with 400: `field` is the JSON field (or "body")."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field, self.message = field, message

    def body(self) -> dict:
        return error_body(self.message, "invalid_request_error", self.field)


@dataclass
class Limits:
    """What one request may ask for. `context`: prompt tokens + max_tokens (the SSM has no
    positional limit; this bounds the work and memory one request can hold)."""
    max_tokens: int = 512
    context: int = 2048


@dataclass
class CompletionRequest:
    prompt: str
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stream: bool = False
    stop: list[str] = field(default_factory=list)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _sampling(name: str, **kw) -> None:
    """`check_sampling` on one field, its CLI-flag message re-worded for the JSON field."""
    try:
        check_sampling(**{"temperature": 0.0, "top_k": 0, **kw})
    except IteraliteError as e:
        flag = "--" + name.replace("_", "-") if name != "max_tokens" else "--max-new-tokens"
        raise BadRequest(name, str(e).replace(flag, name)) from None


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_request(body: bytes, limits: Limits) -> CompletionRequest:
    """Body bytes -> CompletionRequest, or BadRequest naming the first bad field."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRequest("body", f"the body is not UTF-8 (invalid byte 0x{body[e.start]:02x} at offset {e.start})") from None
    try:
        obj = json.loads(text, parse_constant=_reject_constant)  # NaN / Infinity are not JSON
    except ValueError as e:
        raise BadRequest("body", f"malformed JSON: {e}") from None
    if not isinstance(obj, dict):
        raise BadRequest("body", f"the body must be a JSON object, got {type(obj).__name__}")
    known = {f for f in CompletionRequest.__dataclass_fields__}
    for key in obj:
        if key not in known and key not in IGNORED:
            raise BadRequest(key, f"unknown field {key!r}")
    if obj.get("n", 1) != 1:
        raise BadRequest("n", "only n = 1 is supported")
    req = CompletionRequest(prompt="")
    if "prompt" not in obj:
        raise BadRequest("prompt", "prompt is required (a string)")
    if not isinstance(obj["prompt"], str):
        raise BadRequest("prompt", f"prompt must be a string, got {type(obj['prompt']).__name__}")
    try:
        check_prompt(obj["prompt"])  # a lone surrogate from a \udcxx escape
    except IteraliteError as e:
        raise BadRequest("prompt", str(e)) from None
    req.prompt = obj["prompt"]
    for name in ("max_tokens", "top_k", "seed"):
        if obj.get(name) is not None:
            if not _is_int(obj[name]):
                raise BadRequest(name, f"{name} must be an integer, got {obj[name]!r}")
            setattr(req, name, obj[name])
    for name in ("temperature", "top_p"):
        if obj.get(name) is not None:
            if not _is_number(obj[name]):
                raise BadRequest(name, f"{name} must be a finite number, got {obj[name]!r}")
            setattr(req, name, float(obj[name]))
    if obj.get("stream") is not None:
        if not isinstance(obj["stream"], bool):
            raise BadRequest("stream", f"stream must be true or false, got {obj['stream']!r}")
        req.stream = obj["stream"]
    stop = obj.get("stop")
    stop = [stop] if isinstance(stop, str) else [] if stop is None else stop
    if not (isinstance(stop, list) and len(stop) <= MAX_STOP and all(isinstance(s, str) and s for s in stop)):
        raise BadRequest("stop", f"stop must be a non-empty string or a list of at most {MAX_STOP} of them")
    req.stop = stop
    _sampling("max_tokens", max_new_tokens=req.max_tokens)
    if req.max_tokens > limits.max_tokens:
        raise BadRequest("max_tokens", f"max_tokens must be <= {limits.max_tokens}, got {req.max_tokens}")
    _sampling("temperature", temperature=req.temperature)
    _sampling("top_k", top_k=req.top_k)
    _sampling("top_p", top_p=req.top_p)
    _sampling("seed", seed=req.seed)
    return req


def check_context(n_prompt: int, req: CompletionRequest, limits: Limits) -> None:
    """BadRequest when the prompt (n_prompt tokens) and max_tokens do not fit the context."""
    if n_prompt > limits.context:
        raise BadRequest("prompt", f"the prompt is {n_prompt} tokens, over the context limit of {limits.context}")
    if n_prompt + req.max_tokens > limits.context:
        raise BadRequest("max_tokens", f"prompt ({n_prompt} tokens) + max_tokens ({req.max_tokens}) is over "
                                       f"the context limit of {limits.context} tokens")


# ----------------------------------------------------------------- responses

def error_body(message: str, kind: str, field: str | None = None) -> dict:
    """OpenAI's error shape; `param` names the offending field."""
    return {"error": {"message": message, "type": kind, "param": field, "code": None}}


def completion_id() -> str:
    return "cmpl-" + uuid.uuid4().hex[:24]


def completion_body(cid: str, model: str, text: str, finish: str | None, usage: dict | None = None,
                    timing: dict | None = None, created: int | None = None) -> dict:
    """A `text_completion` object: the whole answer, or one streamed chunk (finish None, no usage)."""
    out = {"id": cid, "object": "text_completion", "created": created or int(time.time()), "model": model,
           "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}
    if usage is not None:
        out["usage"] = usage
    if timing is not None:
        out["timing"] = timing
    return out


def sse(obj) -> bytes:
    """One server-sent event: `data: {json}\\n\\n` (or `data: [DONE]\\n\\n` for the string)."""
    data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
    return f"data: {data}\n\n".encode()
