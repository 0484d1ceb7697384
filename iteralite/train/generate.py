"""Text generation with the recurrent step: prefill the prompt with the parallel scan, then
O(1) work per new token. Works for every artifact kind the checkpoint loader can rebuild."""
from __future__ import annotations

import math
import time
from typing import Callable, Iterator

import torch

from iteralite.io.errors import IteraliteError

# A temperature below this makes logits / temperature overflow float32 for ordinary logits (and
# says nothing sampling at 0 = greedy would not); above it the distribution is as good as uniform.
TEMPERATURE_RANGE = (1e-3, 100.0)
SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes an unsigned 64-bit seed


def check_sampling(*, temperature: float, top_k: int, seed: int | None = None,
                   max_new_tokens: int | None = None, top_p: float = 1.0) -> None:
    """Raise IteraliteError for sampling settings that would crash, hang or silently misbehave.

    The messages name the CLI flags, so the command line and a Python caller read the same text.
    """
    if max_new_tokens is not None and max_new_tokens < 0:
        raise IteraliteError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
    lo, hi = TEMPERATURE_RANGE
    if not math.isfinite(temperature) or temperature < 0:
        raise IteraliteError(f"--temperature must be >= 0 (0 = greedy) and finite, got {temperature}")
    if temperature != 0 and not lo <= temperature <= hi:
        raise IteraliteError(f"--temperature must be 0 (greedy) or in [{lo:g}, {hi:g}], got {temperature:g}")
    if top_k < 0:
        raise IteraliteError(f"--top-k must be >= 0 (0 = no top-k filter), got {top_k}")
    if not (math.isfinite(top_p) and 0 < top_p <= 1):  # NaN fails every comparison: refused too
        raise IteraliteError(f"--top-p must be in (0, 1] (1 = no top-p filter), got {top_p:g}")
    if seed is not None and not 0 <= seed <= SEED_MAX:
        raise IteraliteError(f"--seed must be in [0, 2**64 - 1] = [0, {SEED_MAX}], got {seed}")


def sampling_probs(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """logits (V,) -> the distribution `sample_next` draws from (V,), float32, summing to 1.

    In the usual order: divide by `temperature` (> 0), keep the `top_k` largest logits (0 = all;
    tokens tied with the k-th are kept), softmax, then keep the smallest set of most probable
    tokens whose mass reaches `top_p` (1 = all; at least the most probable token; ties in rank
    go to the lower id, as `argmax` does) and renormalise.
    """
    logits = logits.float() / temperature
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1:  # exactly 1 is off: a float cumsum can reach 1 early and cut the tail
        p, order = torch.sort(probs, descending=True, stable=True)
        # Mass of the tokens ranked above each one, in float64 so the cut sits where P says.
        above = torch.cat([p.new_zeros(1, dtype=torch.float64), p.double().cumsum(0)[:-1]])
        probs = probs.index_fill(0, order[above >= top_p], 0.0)
        probs = probs / probs.sum()
    return probs


def sampling_probs_ref(logits: list[float], temperature: float, top_k: int = 0,
                       top_p: float = 1.0) -> list[float]:
    """Plain-Python twin of `sampling_probs` (float64, one token at a time): the tests' reference."""
    z = [float(x) / temperature for x in logits]
    if 0 < top_k < len(z):
        kth = sorted(z, reverse=True)[top_k - 1]
        z = [x if x >= kth else -math.inf for x in z]
    m = max(z)
    e = [math.exp(x - m) for x in z]
    total = sum(e)
    probs = [x / total for x in e]
    if top_p < 1:
        keep, mass = set(), 0.0
        for i in sorted(range(len(probs)), key=lambda i: -probs[i]):  # sorted() is stable
            if mass >= top_p:
                break
            keep.add(i)
            mass += probs[i]
        kept = sum(probs[i] for i in keep)
        probs = [x / kept if i in keep else 0.0 for i, x in enumerate(probs)]
    return probs


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, gen: torch.Generator,
                top_p: float = 1.0) -> int:
    """logits (V,) -> token id drawn from `sampling_probs`; temperature 0 means greedy (top-k and
    top-p then change nothing)."""
    check_sampling(temperature=temperature, top_k=top_k, top_p=top_p)
    if temperature == 0:
        return int(logits.argmax())
    return int(torch.multinomial(sampling_probs(logits, temperature, top_k, top_p), 1, generator=gen))


class TorchSampler:
    """The PyTorch sampler: `sample_next` with a seeded torch.Generator (the `_ref` of the C one's
    contract; its draws differ, since the random streams differ)."""

    def __init__(self, seed: int, temperature: float, top_k: int, top_p: float):
        self.gen = torch.Generator().manual_seed(seed)
        self.args = (temperature, top_k)
        self.top_p = top_p

    def __call__(self, logits: torch.Tensor) -> int:
        return sample_next(logits, *self.args, self.gen, self.top_p)


class CSampler:
    """The C sampler of the standalone runtime (itl_text.c, PCG32): the same draws as `itl-run` and
    the WebAssembly page for the same seed, and no per-token PyTorch work."""

    def __init__(self, seed: int, temperature: float, top_k: int, top_p: float):
        from iteralite.runtime.native.text import Sampler

        self.sampler = Sampler(seed, temperature, top_k, top_p)

    def __call__(self, logits: torch.Tensor) -> int:
        return self.sampler.sample(logits.detach().float().numpy())


def _auto_sampler(seed: int, temperature: float, top_k: int, top_p: float):
    from iteralite.runtime.native import text

    return (CSampler if text.available() else TorchSampler)(seed, temperature, top_k, top_p)


# --sampler: "auto" is the C sampler where the native text library is built (the README's setup
# builds it), else PyTorch's
SAMPLERS: dict[str, Callable] = {"auto": _auto_sampler, "c": CSampler, "torch": TorchSampler}


def make_sampler(name: str, seed: int, temperature: float, top_k: int, top_p: float):
    if name not in SAMPLERS:
        raise IteraliteError(f"--sampler must be one of {', '.join(SAMPLERS)}, got {name!r}")
    return SAMPLERS[name](seed, temperature, top_k, top_p)


@torch.no_grad()
def generate_ids(model, prompt_ids: list[int], max_new_tokens: int, *, temperature: float = 0.8,
                 top_k: int = 40, seed: int = 0, stop_id: int | None = None,
                 top_p: float = 1.0, sampler: str = "auto") -> Iterator[int]:
    """Yield new token ids one at a time. Sampling is here, on the logits of any runtime's
    `forward`/`step` (eager, fused or native), so every runtime samples the same way; `sampler`
    names the random draw (SAMPLERS). Greedy (temperature 0) is the argmax, lowest id on ties."""
    check_sampling(temperature=temperature, top_k=top_k, seed=seed, max_new_tokens=max_new_tokens,
                   top_p=top_p)
    if not prompt_ids:
        raise IteraliteError("the prompt encodes to no tokens")
    if max_new_tokens == 0:
        return
    draw = (lambda lg: int(lg.argmax())) if temperature == 0 else \
        make_sampler(sampler, seed, temperature, top_k, top_p)
    idx = torch.tensor([prompt_ids], dtype=torch.long)
    logits, _, state = model(idx, return_state=True)
    nxt = draw(logits[0, -1])
    for i in range(max_new_tokens):
        yield nxt
        if nxt == stop_id or i == max_new_tokens - 1:
            return
        logits, state = model.step(torch.tensor([nxt]), state)
        nxt = draw(logits[0])


def check_prompt(prompt: str) -> None:
    """Raise IteraliteError for a prompt that is not valid UTF-8 text.

    Python hands undecodable command-line bytes over as lone surrogates (U+DC80..U+DCFF), which the
    tokenizer cannot encode; name the first bad byte instead.
    """
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        ch = ord(prompt[e.start])
        what = f"byte 0x{ch - 0xDC00:02x}" if 0xDC80 <= ch <= 0xDCFF else f"character U+{ch:04X}"
        raise IteraliteError(f"the prompt is not valid UTF-8 ({what} at character {e.start}); "
                             "pass UTF-8 text") from None


def stream_text(tok, model, prompt: str, max_new_tokens: int, temperature: float, top_k: int, seed: int,
                write: Callable[[str], None], timing: dict | None = None, *, top_p: float = 1.0,
                sampler: str = "auto") -> list[int]:
    """Generate after `prompt`, calling `write` with each new piece of decoded text.

    Decoding is incremental (`iteralite.io.text.TextStream`): the work per token does not grow with
    the story, a multi-byte UTF-8 character split over tokens is held until it completes, and bytes
    that can never complete one (a lone continuation byte) are written at once as U+FFFD. The pieces
    add up to `tok.decode(ids)`.
    """
    from iteralite.data.tokenizer import eot_id
    from iteralite.io.text import TextStream

    check_prompt(prompt)
    eot = eot_id(tok)
    prompt_ids = tok.encode(prompt, add_special_tokens=False).ids if prompt else []
    prompt_ids = prompt_ids or [eot]  # an empty prompt starts a fresh story
    out: list[int] = []
    stream = TextStream(tok, write)
    timing = {} if timing is None else timing
    timing.update(prompt_tokens=len(prompt_ids), prompt_s=0.0, gen_tokens=0, gen_s=0.0)
    t0 = time.perf_counter()
    for t in generate_ids(model, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k,
                          seed=seed, stop_id=eot, top_p=top_p, sampler=sampler):
        now = time.perf_counter()
        if not timing["prompt_s"]:  # the prefill and the first sampled token
            timing["prompt_s"], t0 = now - t0, now
        else:
            timing["gen_tokens"], timing["gen_s"] = timing["gen_tokens"] + 1, now - t0
        if t == eot:
            break
        out.append(t)
        stream.push(t)
    stream.finish()
    return out
