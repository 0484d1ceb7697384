"""The deployable fast model: any artifact -> `FusedIteraLite`, compiled, and the `fused` artifact.

Weights are held as FP32 at run time, dequantized once at load: on this CPU torch's packed int4
and int8 matmuls are slower than FP32 at these sizes (see README, "Speed"), so the packed form
buys file size and the fused FP32 graph buys speed. The `fused` artifact is the mixed-precision
artifact's packed tensors (same bytes) under kind "fused", with the runtime settings the fuse
stage chose in its header meta; `load_fused` rebuilds, dequantizes, fuses and compiles it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from iteralite.io.checkpoint import load_model, save_checkpoint
from iteralite.runtime.fused import FusedIteraLite
from iteralite.io.params import check

BACKENDS = ("aoti", "inductor", "eager")


@dataclass
class FuseConfig:
    backend: str = "aoti"  # aoti (AOTInductor packages, no per-call guards) | inductor | eager
    prefill_lens: list[int] = field(default_factory=lambda: [128])  # prompt lengths compiled ahead
    greedy_tokens: int = 200  # greedy decode compared token for token with the unfused model
    prompt: str = "Once upon a time"
    speed_tokens: int = 128
    repeats: int = 5

    def validate(self, section: str = "fuse") -> None:
        check(self.backend in BACKENDS, section, "backend", f"must be one of {', '.join(BACKENDS)}; got {self.backend!r}")
        check(all(n >= 1 for n in self.prefill_lens), section, "prefill_lens", "entries must be >= 1")
        for key in ("greedy_tokens", "speed_tokens", "repeats"):
            check(getattr(self, key) >= 1, section, key, "must be >= 1")


def fuse(model, backend: str = "aoti", prefill_lens=(128,)) -> FusedIteraLite:
    """Float, uniform or mixed IteraLite -> FusedIteraLite (compiled unless backend is eager)."""
    fused = FusedIteraLite.from_model(model)
    if backend != "eager":
        fused.compile(batch=1, prefill_lens=tuple(prefill_lens), backend=backend)
    return fused


def save_fused(path, model, ckpt, cfg: FuseConfig, parent: str) -> int:
    """Re-save the packed tensors of `model` (loaded from `ckpt`) as the fused artifact, in the
    compact layout (integer codes entropy-coded), like the mixed-precision artifact it comes from."""
    runtime = {"backend": cfg.backend, "prefill_lens": list(cfg.prefill_lens), "weights": "fp32, dequantized at load"}
    return save_checkpoint(path, model, kind="fused", tokenizer_sha256=ckpt.tokenizer_sha256, quant=ckpt.quant,
                           meta={"stage": "fuse", "parent": parent, "runtime": runtime}, layout="compact")


def load_fused(path, backend: str | None = None) -> FusedIteraLite:
    """A fused artifact (or any artifact) -> compiled FusedIteraLite, as its header's runtime says."""
    model, ckpt = load_model(path)
    runtime = ckpt.meta.get("runtime", {})
    return fuse(model, backend or runtime.get("backend", "aoti"), runtime.get("prefill_lens", [128])).eval()
