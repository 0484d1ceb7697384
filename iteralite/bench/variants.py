"""The variant kinds the benchmark can load by name, in one explicit registry.

A kind is how a model is obtained from a checkpoint path: "artifact" loads any checkpoint as
saved, "fused" rebuilds and compiles the fused runtime model, "native" runs a packed artifact
on the C step (iteralite.runtime.native; "native_exact": with float activations), and each peer (bitsandbytes NF4,
int8 weight-only, torch.compile) is built from the FP32 checkpoint. Every loader is named as a
"module:attribute" string and imported only when a variant of that kind is loaded, so importing
this module (or the timing and memory modules that use it) imports neither the peers (nor
bitsandbytes) nor the fused runtime. `peak_rss`'s child process loads a kind through this same
registry, so parent and child always build a variant by the same recipe.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from torch import nn

from iteralite.io.checkpoint import load_model


@dataclass(frozen=True)
class VariantKind:
    """How one kind of variant is loaded, and how the benchmark scores its quality.

    loader: "module:attr" of a callable. from_fp32=False: it takes the checkpoint path and
        returns the model; from_fp32=True (a peer): it takes the FP32 model loaded from the
        checkpoint path and returns the peer built from it.
    same_weights_as_fp32: the variant computes with FP32's weights and math, so its quality is
        FP32's (the benchmark checks its logits against FP32's instead of scoring it again).
    scoring_loader: "module:attr", called like `loader`, of the model whose quality is scored
        when that should not be the timed model itself (None: score the variant as loaded).
    scorer: "module:attr" of scorer(model, path, evaluator, fp32_metrics, results so far) -> the
        variant's quality row, for a runtime of an artifact scored against that artifact
        (None: the peers' scoring).
    """
    loader: str
    from_fp32: bool = False
    same_weights_as_fp32: bool = False
    scoring_loader: str | None = None
    scorer: str | None = None


def load_artifact(path) -> nn.Module:
    """Any checkpoint, as saved."""
    return load_model(path)[0]


def load_native_exact(path):
    """A packed checkpoint on the C step with float activations (`act="f32"`)."""
    from iteralite.runtime.native.runtime import load_native

    return load_native(path, act="f32")


VARIANTS: dict[str, VariantKind] = {
    "artifact": VariantKind("iteralite.bench.variants:load_artifact"),
    "fused": VariantKind("iteralite.runtime.deploy:load_fused"),
    "native": VariantKind("iteralite.runtime.native.runtime:load_native",
                          scorer="iteralite.bench.native:score_native"),
    # the C step with float activations (no int8 quantization of the inputs): the eager arithmetic
    "native_exact": VariantKind("iteralite.bench.variants:load_native_exact",
                                scorer="iteralite.bench.native:score_native"),
    "onnxruntime": VariantKind("iteralite.bench.ort_peer:load_onnxruntime",
                               scorer="iteralite.bench.ort_peer:score_onnxruntime"),
    "bnb_nf4": VariantKind("iteralite.bench.peers:bnb_nf4", from_fp32=True),
    # torch's int8 kernel is slow on CPUs without a fast path; quality is scored on the same
    # weights through F.linear (see peers.int8_weight_only_for_scoring)
    "int8_weight_only": VariantKind("iteralite.bench.peers:int8_weight_only", from_fp32=True,
                                    scoring_loader="iteralite.bench.peers:int8_weight_only_for_scoring"),
    "compiled": VariantKind("iteralite.bench.peers:compiled", from_fp32=True, same_weights_as_fp32=True),
}

# the kinds built from the FP32 checkpoint, in registry order (what `benchmark.peers` may list)
PEER_KINDS = tuple(kind for kind, spec in VARIANTS.items() if spec.from_fp32)


def variant_kind(kind: str) -> VariantKind:
    """The registry entry of `kind` (KeyError naming the known kinds if there is none)."""
    if kind not in VARIANTS:
        raise KeyError(f"unknown variant kind '{kind}'; known: {', '.join(sorted(VARIANTS))}")
    return VARIANTS[kind]


def resolve(target: str) -> Callable:
    """"module:attr" -> that attribute, importing the module."""
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def load_variant(kind: str, path, for_scoring: bool = False) -> nn.Module:
    """The model of variant `kind` loaded from checkpoint `path` (a peer: the FP32 checkpoint),
    in eval mode. for_scoring: the model to score quality on (the entry's scoring_loader, if any)."""
    spec = variant_kind(kind)
    loader = resolve(spec.scoring_loader if for_scoring and spec.scoring_loader else spec.loader)
    return (loader(load_artifact(str(path))) if spec.from_fp32 else loader(str(path))).eval()
