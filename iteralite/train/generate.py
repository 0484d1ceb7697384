"""Text generation with the recurrent step: prefill the prompt with the parallel scan, then
O(1) work per new token. Works for every artifact kind the checkpoint loader can rebuild."""
from __future__ import annotations

from typing import Callable, Iterator

import torch

from iteralite.io.errors import IteraliteError


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, gen: torch.Generator) -> int:
    """logits (V,) -> token id; temperature 0 means greedy."""
    if temperature == 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=gen))


@torch.no_grad()
def generate_ids(model, prompt_ids: list[int], max_new_tokens: int, *, temperature: float = 0.8,
                 top_k: int = 40, seed: int = 0, stop_id: int | None = None) -> Iterator[int]:
    """Yield new token ids one at a time."""
    if max_new_tokens < 0:
        raise IteraliteError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise IteraliteError(f"--temperature must be >= 0 (0 = greedy), got {temperature}")
    if not prompt_ids:
        raise IteraliteError("the prompt encodes to no tokens")
    if max_new_tokens == 0:
        return
    gen = torch.Generator().manual_seed(seed)
    idx = torch.tensor([prompt_ids], dtype=torch.long)
    logits, _, state = model(idx, return_state=True)
    nxt = sample_next(logits[0, -1], temperature, top_k, gen)
    for i in range(max_new_tokens):
        yield nxt
        if nxt == stop_id or i == max_new_tokens - 1:
            return
        logits, state = model.step(torch.tensor([nxt]), state)
        nxt = sample_next(logits[0], temperature, top_k, gen)


def stream_text(tok, model, prompt: str, max_new_tokens: int, temperature: float, top_k: int, seed: int,
                write: Callable[[str], None]) -> list[int]:
    """Generate after `prompt`, calling `write` with each new piece of decoded text."""
    from iteralite.data.tokenizer import eot_id

    eot = eot_id(tok)
    prompt_ids = tok.encode(prompt, add_special_tokens=False).ids if prompt else []
    prompt_ids = prompt_ids or [eot]  # an empty prompt starts a fresh story
    out: list[int] = []
    shown = ""
    for t in generate_ids(model, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k,
                          seed=seed, stop_id=eot):
        if t == eot:
            break
        out.append(t)
        text = tok.decode(out)
        if not text.endswith("\ufffd"):  # wait for a multi-byte character to complete
            write(text[len(shown):])
            shown = text
    return out
