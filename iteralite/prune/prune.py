"""Structured pruning of the float model: SSM heads, expert hidden channels and (optionally) whole
experts are physically removed from the tensors, and `model.cfg` records the new per-layer sizes
(layer_n_heads, layer_n_experts, layer_d_ff), so a checkpoint rebuilds the pruned model from its
config and loads with strict shapes.

Units of layer i (p headdim, d d_model, n d_state, r dt_rank, K d_conv, f d_ff):
  head h         in_proj rows (x half and z half), conv1d channels (weight + bias), x_proj
                 columns, dt_proj row + bias, A_log[h], D[h], out_proj columns:
                 p * (3d + K + 1 + r + 2n) + r + 3 parameters. A layer keeps >= 1 head.
  expert channel hidden unit j of expert e: w1[e, j, :] and w2[e, :, j]. The experts are stacked
                 tensors, so every expert of a layer loses the same count, each choosing by its own
                 scores. A layer keeps >= max(1, channel_multiple) channels.
  expert e       w1[e], w2[e] and router row e: 2 d f + d parameters. Optional; a layer keeps
                 >= top_k experts.
The tied embedding / LM head, the norms and d_model are never pruned.

What the ratio counts: "prunable" parameters are every parameter of the SSM mixers and of the
MoE blocks (all of them belong to exactly one head or one expert, so all can be removed); the
ratio is the fraction of them removed, measured against the unpruned model's count
(`base_prunable`), so `prune` can be called repeatedly with cumulative ratios between recovery
training steps. Parameters are replaced by new tensors: rebuild any optimizer afterwards.

torch-pruning: the three unit kinds are `torch_pruning.pruner.BasePruningFunc` subclasses
(`SSMHeadPruner`, `ExpertChannelPruner`, `ExpertPruner`) whose channels are heads, flattened
expert channels and experts; they follow torch-pruning's intra-layer convention
(prune_in_channels = prune_out_channels) and cut the nn.Linear / depthwise nn.Conv1d /
nn.Parameter pieces with torch-pruning's own pruning functions. torch-pruning's DependencyGraph is
NOT used for grouping: it traces this model without error, but the chunked scan is
einsum/bmm/permute/reshape, which it treats as element-wise, so a group rooted at one head's
out_proj columns wrongly pulls in x_proj's output rows (dt, B, C), dt_proj's outputs, and
A_log / D with channel indices (out of range for these per-head vectors). Because d_model is
never pruned, all coupling sits inside one mixer or one MoE and is encoded in the pruners.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import logging
import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch_pruning.pruner import function as tpf

from iteralite.io.errors import IteraliteError
from iteralite.core.moe import Experts, MoE
from iteralite.io.params import check
from iteralite.core.ssm import SSM

log = logging.getLogger(__name__)

IMPORTANCES = ("taylor", "magnitude")
ALLOCATIONS = ("uniform", "sensitivity")
DEFAULT_PROTECTED = ("embedding",)

# torch-pruning's per-parameter pruner along dim 0 (its shared PrunerBox instance prunes dim -1).
_PARAM_DIM0 = tpf.ParameterPruner(pruning_dim=0)


# --------------------------------------------------------------------------- config


@dataclass
class PruneConfig:
    """params.yaml section "prune"."""

    ratios: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.4])  # cumulative targets
    importance: str = "taylor"  # taylor | magnitude
    allocation: str = "uniform"  # uniform | sensitivity
    steps: int = 4  # iterative steps to each ratio (recovery training between them)
    protected: list[str] = field(default_factory=lambda: list(DEFAULT_PROTECTED))
    expert_removal: bool = False  # also remove whole, rarely routed experts
    expert_min_usage: float = 0.25  # "rarely routed": routed share < this * (1 / n_experts)
    recovery_steps: int = 60
    calib_batches: int = 8  # batches for Taylor gradients, routing stats and sensitivity
    # Kept d_ff stays a multiple of this, so group quantization after pruning still finds groups
    # of 32 (the int4 kernels accept 32..256); 1 = any width.
    channel_multiple: int = 32
    max_layer_ratio: float = 0.8  # no layer loses more than this fraction of its prunable params
    probe_ratio: float = 0.25  # per-layer probe size for measure_sensitivity
    layer_ratios: dict[int, float] | None = None  # explicit per-layer fractions (others allocated)

    def validate(self, section: str = "prune") -> None:
        check(len(self.ratios) > 0, section, "ratios", "must list at least one ratio, e.g. [0.1, 0.2, 0.4]")
        for r in self.ratios:
            check(0.0 <= r < 1.0, section, "ratios", f"entries must be in [0, 1), got {r}")
        check(self.importance in IMPORTANCES, section, "importance",
              f"must be one of {', '.join(IMPORTANCES)}, got {self.importance!r}")
        check(self.allocation in ALLOCATIONS, section, "allocation",
              f"must be one of {', '.join(ALLOCATIONS)}, got {self.allocation!r}")
        check(self.steps >= 1, section, "steps", f"must be >= 1, got {self.steps}")
        check(self.recovery_steps >= 0, section, "recovery_steps", f"must be >= 0, got {self.recovery_steps}")
        check(self.calib_batches >= 1, section, "calib_batches", f"must be >= 1, got {self.calib_batches}")
        check(self.channel_multiple >= 1, section, "channel_multiple",
              f"must be >= 1, got {self.channel_multiple}")
        check(0.0 < self.max_layer_ratio <= 1.0, section, "max_layer_ratio",
              f"must be in (0, 1], got {self.max_layer_ratio}")
        check(0.0 <= self.expert_min_usage <= 1.0, section, "expert_min_usage",
              f"must be in [0, 1], got {self.expert_min_usage}")
        check(0.0 < self.probe_ratio < 1.0, section, "probe_ratio", f"must be in (0, 1), got {self.probe_ratio}")
        for p in self.protected:
            check(bool(p.strip()), section, "protected", "entries must be non-empty module names")
        _check_layer_ratios(self.layer_ratios, None, section)

    def plan_kwargs(self) -> dict:
        """The keyword arguments of `plan` / `prune` that this section sets."""
        return dict(allocation=self.allocation, protected=list(self.protected),
                    expert_removal=self.expert_removal, expert_min_usage=self.expert_min_usage,
                    channel_multiple=self.channel_multiple, max_layer_ratio=self.max_layer_ratio,
                    layer_ratios=self.layer_ratios)


def _check_ratio(ratio: float, section: str = "prune") -> None:
    check(isinstance(ratio, (int, float)) and 0.0 <= ratio < 1.0, section, "ratios",
          f"entries must be in [0, 1), got {ratio}")


def _check_layer_ratios(layer_ratios, n_layers: int | None, section: str = "prune") -> None:
    for k, v in (layer_ratios or {}).items():
        ok_key = isinstance(k, int) and k >= 0 and (n_layers is None or k < n_layers)
        where = "" if n_layers is None else f" < n_layers={n_layers}"
        check(ok_key, section, "layer_ratios", f"keys must be layer indices >= 0{where}, got {k!r}")
        check(isinstance(v, (int, float)) and 0.0 <= v < 1.0, section, "layer_ratios",
              f"layer {k}: ratio must be in [0, 1), got {v}")


def iterative_schedule(target_ratio: float, steps: int, start: float = 0.0) -> list[float]:
    """Cumulative ratios from `start` to `target_ratio` in `steps` equal steps:
    (0.4, 4) -> [0.1, 0.2, 0.3, 0.4]. Each is measured against the original prunable count."""
    _check_ratio(target_ratio)
    check(steps >= 1, "prune", "steps", f"must be >= 1, got {steps}")
    check(0.0 <= start <= target_ratio, "prune", "ratios",
          f"the starting ratio {start} must be in [0, target {target_ratio}]")
    return [round(start + (target_ratio - start) * k / steps, 10) for k in range(1, steps + 1)]


# --------------------------------------------------------------------------- counting


def head_params(cfg) -> int:
    """Parameters one SSM head owns (see the module docstring)."""
    p, d = cfg.headdim, cfg.d_model
    return p * (3 * d + cfg.d_conv + 1 + cfg.dt_rank + 2 * cfg.d_state) + cfg.dt_rank + 3


def _layer_count(cfg, shape: dict) -> int:
    """Prunable parameters of a layer with `shape` {"n_heads", "n_experts", "d_ff"}."""
    d = cfg.d_model
    moe = shape["n_experts"] * (2 * d * shape["d_ff"] + d)
    return shape["n_heads"] * head_params(cfg) + moe


def layer_shapes(model) -> dict[int, dict[str, int]]:
    """Current per-layer sizes, read from the modules: {i: {"n_heads", "n_experts", "d_ff"}}."""
    return {i: {"n_heads": layer.mixer.n_heads, "n_experts": layer.moe.experts.w1.shape[0],
                "d_ff": layer.moe.experts.w1.shape[1]}
            for i, layer in enumerate(model.layers)}


def prunable_params(model) -> int:
    """Number of prunable parameters: every SSM-mixer and MoE parameter, over all layers."""
    return sum(p.numel() for layer in model.layers
               for p in (*layer.mixer.parameters(), *layer.moe.parameters()))


def _require_float(model) -> None:
    """Pruning cuts float tensors; a quantized artifact must be dequantized first."""
    for i, layer in enumerate(model.layers):
        pieces = {"mixer.in_proj": layer.mixer.in_proj, "mixer.x_proj": layer.mixer.x_proj,
                  "mixer.out_proj": layer.mixer.out_proj, "moe.router": layer.moe.router,
                  "moe.experts": layer.moe.experts}
        for name, m in pieces.items():
            if type(m) not in (nn.Linear, Experts):
                raise IteraliteError(
                    f"prune needs a plain float model, but 'layers.{i}.{name}' is a {type(m).__name__}; "
                    "dequantize it first with iteralite.quantize.dequantize_model (and remove QAT "
                    "fake-quant with iteralite.qat.strip_fake_quant)")


# --------------------------------------------------------------------------- torch-pruning pruners


def _gather_param(w: nn.Parameter, dim: int, index: torch.Tensor) -> nn.Parameter:
    """A new Parameter holding w gathered along `dim` (and its gradient, as torch-pruning does)."""
    new = nn.Parameter(torch.gather(w.detach(), dim, index), requires_grad=w.requires_grad)
    if w.grad is not None:
        new.grad = torch.gather(w.grad, dim, index)
    return new


class SSMHeadPruner(tpf.BasePruningFunc):
    """Removes whole heads of an `SSM` mixer; its channels are head indices 0 <= h < n_heads.

    Head h owns d_inner channels c = h*p .. h*p + p - 1: in_proj rows c (x half) and d_inner + c
    (z half), conv1d channels c, x_proj columns c, out_proj columns c; and dt_proj row h, A_log[h],
    D[h]. Input and output channels are the same heads (torch-pruning's intra-layer convention).
    """

    TARGET_MODULES = SSM

    def check(self, layer, idxs, to_output=True):
        super().check(layer, idxs, to_output)
        if len(set(idxs)) != len(idxs):
            raise ValueError(f"SSM head pruning: duplicate head indices {idxs}")
        if len(idxs) >= layer.n_heads:
            raise ValueError(f"SSM head pruning: removing {len(idxs)} of {layer.n_heads} heads; "
                             "a layer must keep at least one head")

    def prune_out_channels(self, layer: SSM, idxs: Sequence[int]) -> SSM:
        p, d_inner = layer.headdim, layer.d_inner
        heads = sorted(idxs)
        ch = [h * p + k for h in heads for k in range(p)]  # the heads' d_inner channels
        with torch.no_grad():
            tpf.prune_linear_out_channels(layer.in_proj, ch + [d_inner + c for c in ch])
            tpf.prune_depthwise_conv_out_channels(layer.conv1d, ch)  # also fixes groups / in_channels
            tpf.prune_linear_in_channels(layer.x_proj, ch)
            tpf.prune_linear_out_channels(layer.dt_proj, heads)
            layer.A_log = _PARAM_DIM0.prune_out_channels(layer.A_log, heads)
            layer.D = _PARAM_DIM0.prune_out_channels(layer.D, heads)
            tpf.prune_linear_in_channels(layer.out_proj, ch)
        layer.n_heads -= len(heads)
        layer.d_inner = layer.n_heads * p  # forward reshapes and conv groups read these
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: SSM) -> int:
        return layer.n_heads

    get_in_channels = get_out_channels


class ExpertChannelPruner(tpf.BasePruningFunc):
    """Removes hidden channels of stacked `Experts` (w1 (e, f, d), w2 (e, d, f)).

    Channel index e * f + j names hidden unit j of expert e, so each expert can lose different
    units; every expert must lose the same count because the weights stay one stacked tensor.
    """

    TARGET_MODULES = Experts

    def check(self, layer, idxs, to_output=True):
        super().check(layer, idxs, to_output)
        e, f, _ = layer.w1.shape
        if len(set(idxs)) != len(idxs):
            raise ValueError("expert channel pruning: duplicate channel indices")
        per_expert = torch.bincount(torch.as_tensor(list(idxs), dtype=torch.long) // f, minlength=e)
        if len(idxs) and (per_expert != per_expert[0]).any():
            raise ValueError(f"expert channel pruning: every expert must lose the same number of "
                             f"channels, got {per_expert.tolist()}")
        if len(idxs) and int(per_expert[0]) >= f:
            raise ValueError(f"expert channel pruning: removing all {f} channels of each expert; keep >= 1")

    def prune_out_channels(self, layer: Experts, idxs: Sequence[int]) -> Experts:
        e, f, d = layer.w1.shape
        drop = torch.zeros(e * f, dtype=torch.bool)
        drop[list(idxs)] = True
        keep = (~drop).view(e, f).nonzero()[:, 1].view(e, -1)  # (e, f') kept units, ascending per expert
        with torch.no_grad():
            layer.w1 = _gather_param(layer.w1, 1, keep[:, :, None].expand(-1, -1, d))
            layer.w2 = _gather_param(layer.w2, 2, keep[:, None, :].expand(-1, d, -1))
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: Experts) -> int:
        return layer.w1.shape[0] * layer.w1.shape[1]

    get_in_channels = get_out_channels


class ExpertPruner(tpf.BasePruningFunc):
    """Removes whole experts of a `MoE`: w1[e], w2[e] and router row e (never below top_k)."""

    TARGET_MODULES = MoE

    def check(self, layer, idxs, to_output=True):
        super().check(layer, idxs, to_output)
        n = layer.experts.w1.shape[0]
        if len(set(idxs)) != len(idxs):
            raise ValueError(f"expert pruning: duplicate expert indices {idxs}")
        if n - len(idxs) < layer.top_k:
            raise ValueError(f"expert pruning: removing {len(idxs)} of {n} experts leaves fewer than "
                             f"top_k={layer.top_k}")

    def prune_out_channels(self, layer: MoE, idxs: Sequence[int]) -> MoE:
        ids = sorted(idxs)
        with torch.no_grad():
            tpf.prune_linear_out_channels(layer.router, ids)
            layer.experts.w1 = _PARAM_DIM0.prune_out_channels(layer.experts.w1, ids)
            layer.experts.w2 = _PARAM_DIM0.prune_out_channels(layer.experts.w2, ids)
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: MoE) -> int:
        return layer.experts.w1.shape[0]

    get_in_channels = get_out_channels


HEAD_PRUNER, CHANNEL_PRUNER, EXPERT_PRUNER = SSMHeadPruner(), ExpertChannelPruner(), ExpertPruner()


# --------------------------------------------------------------------------- importance


@dataclass
class Scores:
    """Importance per unit for the model's current shapes (higher = keep).
    heads[i] (h,), channels[i] (e, f), experts[i] (e,)."""

    heads: dict[int, torch.Tensor]
    channels: dict[int, torch.Tensor]
    experts: dict[int, torch.Tensor]
    kind: str = "custom"


# The group of a unit is every parameter whose zeroing is part of switching the unit off.
# A_log and the dt_proj bias are left out although they are removed with the head: zero is not
# their "off" value (A_log = 0 means decay rate 1, the dt bias is an inverse softplus of dt near
# -5), and their size would swamp the weights' norms. The router row is left out of an expert's
# group for the same reason (logit 0 is not "never routed").


def _head_sums(mixer: SSM, t) -> torch.Tensor:
    """Sum of t(w) over each head's entries of every tensor in its group -> (h,).
    t maps a parameter to an elementwise tensor of the same shape (w**2, w*grad, ...)."""
    h, p = mixer.n_heads, mixer.headdim
    s = t(mixer.in_proj.weight).view(2, h, p, -1).sum((0, 2, 3))  # x and z halves
    s = s + t(mixer.conv1d.weight).reshape(h, -1).sum(1) + t(mixer.conv1d.bias).view(h, p).sum(1)
    s = s + t(mixer.x_proj.weight).view(-1, h, p).sum((0, 2))
    s = s + t(mixer.dt_proj.weight).sum(1) + t(mixer.D)
    return s + t(mixer.out_proj.weight).view(-1, h, p).sum((0, 2))


def _channel_sums(experts: Experts, t) -> torch.Tensor:
    """Per expert hidden unit: w1 row + w2 column -> (e, f)."""
    return t(experts.w1).sum(2) + t(experts.w2).sum(1)


def _expert_sums(experts: Experts, t) -> torch.Tensor:
    """Per expert: all of w1[e] and w2[e] -> (e,)."""
    return t(experts.w1).sum((1, 2)) + t(experts.w2).sum((1, 2))


def magnitude_scores(model, routing: dict | None = None) -> Scores:
    """L2 norm of each unit's group; an expert's norm is scaled by its mean router probability
    when `routing` (from routing_stats) is given."""
    def sq(w):
        return w.detach().float() ** 2

    heads, channels, experts = {}, {}, {}
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            heads[i] = _head_sums(layer.mixer, sq).sqrt()
            channels[i] = _channel_sums(layer.moe.experts, sq).sqrt()
            experts[i] = _expert_sums(layer.moe.experts, sq).sqrt()
            if routing is not None:
                experts[i] = experts[i] * routing[i]["prob"]
    return Scores(heads, channels, experts, "magnitude")


def lm_loss(model, batch: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of batch (b, l+1) (as training computes it, without the aux loss)."""
    logits, _ = model(batch[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def taylor_scores(model, batches: Iterable[torch.Tensor]) -> Scores:
    """First-order Taylor importance |sum over the group of w * dL/dw| per unit.

    batches: token tensors (b, l+1). The score is averaged over batches of the per-batch
    |sum w*g| rather than taken from the summed gradient: near a trained minimum the mean
    gradient vanishes and the signed sum would cancel to noise.
    """
    params = [p for layer in model.layers for p in (*layer.mixer.parameters(), *layer.moe.parameters())]
    flags = [p.requires_grad for p in params]
    acc_h, acc_c, acc_e, n = {}, {}, {}, 0
    was_training = model.training
    model.eval()
    try:
        for p in params:
            p.requires_grad_(True)
        for batch in batches:
            with torch.enable_grad():
                grads = torch.autograd.grad(lm_loss(model, batch), params, allow_unused=True)
            gmap = {p: (torch.zeros_like(p) if g is None else g) for p, g in zip(params, grads)}

            def wg(w):
                return w.detach() * gmap[w]

            for i, layer in enumerate(model.layers):
                acc_h[i] = acc_h.get(i, 0) + _head_sums(layer.mixer, wg).abs()
                acc_c[i] = acc_c.get(i, 0) + _channel_sums(layer.moe.experts, wg).abs()
                acc_e[i] = acc_e.get(i, 0) + _expert_sums(layer.moe.experts, wg).abs()
            n += 1
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        model.train(was_training)
    if n == 0:
        raise ValueError("taylor_scores needs at least one calibration batch")
    return Scores(*({i: v / n for i, v in acc.items()} for acc in (acc_h, acc_c, acc_e)), kind="taylor")


@torch.no_grad()
def routing_stats(model, batches: Iterable[torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
    """Per layer: "prob" (e,) mean router probability and "routed" (e,) share of the top-k slots
    each expert receives (sums to 1), over the tokens of batches (b, l+1)."""
    prob, routed, tokens, hooks = {}, {}, {}, []

    def hook_for(i, moe):
        def hook(_mod, _inp, logits):
            probs = F.softmax(logits.reshape(-1, logits.shape[-1]).float(), dim=-1)  # (t, e)
            top = probs.topk(moe.top_k, dim=-1).indices.reshape(-1)
            prob[i] = prob.get(i, 0) + probs.sum(0)
            routed[i] = routed.get(i, 0) + torch.bincount(top, minlength=probs.shape[1]).float()
            tokens[i] = tokens.get(i, 0) + probs.shape[0]
        return hook

    for i, layer in enumerate(model.layers):
        hooks.append(layer.moe.router.register_forward_hook(hook_for(i, layer.moe)))
    try:
        for batch in batches:
            model(batch[:, :-1])
    finally:
        for h in hooks:
            h.remove()
    if not tokens:
        raise ValueError("routing_stats needs at least one calibration batch")
    return {i: {"prob": prob[i] / tokens[i], "routed": routed[i] / routed[i].sum()} for i in tokens}


def importance_scores(model, importance: str, batches=None, routing=None) -> Scores:
    """Scores by name: "magnitude" (batches not needed) or "taylor" (needs batches)."""
    check(importance in IMPORTANCES, "prune", "importance",
          f"must be one of {', '.join(IMPORTANCES)}, got {importance!r}")
    if importance == "magnitude":
        return magnitude_scores(model, routing)
    if batches is None:
        raise ValueError("taylor importance needs calibration batches (token tensors (b, l+1))")
    return taylor_scores(model, batches)


# --------------------------------------------------------------------------- protection


def _unit_names(model, i: int, kind: str) -> list[str]:
    """Module and parameter names a unit kind of layer i touches."""
    layer = model.layers[i]
    mods = {"heads": [("mixer", layer.mixer)], "channels": [("moe.experts", layer.moe.experts)],
            "experts": [("moe.router", layer.moe.router), ("moe.experts", layer.moe.experts)]}[kind]
    names = []
    for prefix, m in mods:
        full = f"layers.{i}.{prefix}"
        names += [f"{full}.{n}" if n else full for n, _ in m.named_modules()]
        names += [f"{full}.{n}" for n, _ in m.named_parameters()]
    return names


def _matches(name: str, pattern: str) -> bool:
    """A pattern protects the module it names and everything inside it (fnmatch wildcards allowed)."""
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, pattern + ".*")


def _protected_by(model, i: int, kind: str, protected: Sequence[str]) -> str | None:
    """The first pattern that protects this unit kind of layer i (None if unprotected).
    A pattern naming a container (e.g. 'layers.0') protects what is inside; one naming a part
    (e.g. 'layers.0.mixer.out_proj') protects every unit that would cut that part."""
    names = _unit_names(model, i, kind)
    return next((pat for pat in protected if any(_matches(n, pat) for n in names)), None)


def _check_protected(model, protected: Sequence[str]) -> None:
    """Every pattern must name at least one module or parameter of the model."""
    names = [n for n, _ in model.named_modules() if n] + [n for n, _ in model.named_parameters()]
    for pattern in protected:
        check(isinstance(pattern, str) and any(_matches(n, pattern) for n in names), "prune", "protected",
              f"entry {pattern!r} names no module or parameter of the model "
              f"(names look like 'embedding', 'layers.0.mixer', 'layers.1.moe.experts')")


# --------------------------------------------------------------------------- plan


@dataclass
class LayerPlan:
    """What to remove from one layer, in the layer's current indices. Applied in this order:
    experts, then channels (one list per expert kept, ascending expert id; equal lengths), then heads."""

    heads: list[int] = field(default_factory=list)
    experts: list[int] = field(default_factory=list)
    channels: list[list[int]] = field(default_factory=list)

    def empty(self) -> bool:
        return not (self.heads or self.experts or any(self.channels))


@dataclass
class PrunePlan:
    layers: dict[int, LayerPlan] = field(default_factory=dict)
    ratio: float | None = None
    base_prunable: int | None = None
    base_shapes: dict[int, dict[str, int]] | None = None
    predicted_prunable_after: int | None = None


@dataclass
class _Layer:
    """Planning state of one layer: its current sizes, limits and the chosen counts."""

    i: int
    h: int
    e: int
    f: int
    d: int
    head_cost: int
    base: int  # prunable count of this layer in the unpruned model
    removed_before: int  # already removed by earlier calls
    kh_max: int  # most heads removable (0 when protected)
    levels: list[int]  # allowed kept d_ff, levels[0] = f (no channel removal)
    fixed: bool = False  # ratio given explicitly in layer_ratios
    cap: float = 1.0
    kh: int = 0
    c: int = 0  # index into levels
    experts: list[int] = field(default_factory=list)

    def removed(self, kh: int | None = None, c: int | None = None) -> int:
        """Parameters this plan removes from the layer now (exact: experts at width f, then
        channels from the experts left)."""
        kh = self.kh if kh is None else kh
        c = self.c if c is None else c
        ke = len(self.experts)
        return (kh * self.head_cost + ke * (2 * self.d * self.f + self.d)
                + (self.e - ke) * 2 * self.d * (self.f - self.levels[c]))

    def frac_after(self, kh=None, c=None) -> float:
        return (self.removed_before + self.removed(kh, c)) / self.base

    def max_removed(self) -> int:
        """Most this layer can lose now through heads and channels."""
        return self.removed(self.kh_max, len(self.levels) - 1)


def _kept_levels(f: int, multiple: int) -> list[int]:
    """Kept widths allowed: f itself, then multiples of `multiple` below f, never below it."""
    m = max(1, multiple)
    return [f] + [k for k in range((f - 1) // m * m, m - 1, -m) if k < f]


def _resolve_base(model, base_prunable, base_shapes) -> tuple[int, dict[int, dict[str, int]]]:
    """(total, per-layer unpruned shapes) the ratio is measured against.

    No base given: the model as it is now is the original. Only base_prunable given: the
    unpruned shapes are the config's uniform sizes (pruning only writes the layer_* lists), which
    must add up to base_prunable; pass base_shapes (from the first report) otherwise."""
    cfg = model.cfg
    if base_shapes is not None:
        shapes = {int(k): {key: int(v[key]) for key in ("n_heads", "n_experts", "d_ff")}
                  for k, v in base_shapes.items()}
        if sorted(shapes) != list(range(len(model.layers))):
            raise ValueError(f"base_shapes has layers {sorted(shapes)}, the model has {len(model.layers)}")
    elif base_prunable is None:
        shapes = layer_shapes(model)
    else:
        shapes = {i: {"n_heads": cfg.n_heads, "n_experts": cfg.n_experts, "d_ff": cfg.d_ff}
                  for i in range(len(model.layers))}
    total = sum(_layer_count(cfg, s) for s in shapes.values())
    if base_prunable is not None and int(base_prunable) != total:
        raise ValueError(f"base_prunable={base_prunable} does not match the unpruned layer shapes "
                         f"({total} prunable params); pass base_shapes from the first prune report")
    for i, now in layer_shapes(model).items():
        if any(now[k] > shapes[i][k] for k in now):
            raise ValueError(f"layer {i} is larger now ({now}) than in the base shapes ({shapes[i]})")
    return total, shapes


def _water_fill(amount: float, bases: dict, weights: dict, caps: dict) -> dict[int, float]:
    """Fractions a_i = min(cap_i, lam * w_i) with sum a_i * base_i = amount (as far as caps allow)."""
    fracs, free = {}, set(bases)
    while free:
        taken = sum(fracs[i] * bases[i] for i in fracs)
        denom = sum(weights[i] * bases[i] for i in free)
        lam = max(0.0, amount - taken) / denom if denom > 0 else 0.0
        over = [i for i in free if lam * weights[i] > caps[i]]
        if not over:
            fracs.update({i: lam * weights[i] for i in free})
            break
        for i in over:  # capped layers stop growing; the rest share what is left
            fracs[i] = caps[i]
            free.discard(i)
    return fracs


def _choose_experts(L: _Layer, target: float, scores: Scores, routing: dict, min_usage: float,
                    top_k: int) -> None:
    """Whole experts that are rarely routed, least important first, while they fit the target."""
    routed = routing[L.i]["routed"]
    rare = [e for e in range(L.e) if float(routed[e]) < min_usage / L.e]
    rare.sort(key=lambda e: float(scores.experts[L.i][e]))
    for e in rare:
        if L.e - len(L.experts) <= top_k:
            break
        if L.removed() + 2 * L.d * L.f + L.d <= target:
            L.experts.append(e)


def _decompose(L: _Layer, target: float) -> None:
    """Split a layer's removal target into heads (the SSM's proportional share, rounded) and
    expert channels (the finer unit, absorbing the heads' rounding)."""
    rest = target - L.removed(0, 0)
    size = L.h * L.head_cost + (L.e - len(L.experts)) * (2 * L.d * L.f + L.d)
    L.kh = min(L.kh_max, max(0, round(rest / size * L.h))) if size > 0 else 0
    L.c = min(range(len(L.levels)), key=lambda c: (abs(target - L.removed(L.kh, c)), c))


def _fill(layers: list[_Layer], goal: float) -> None:
    """Greedy +-1 head / channel-level moves across layers while they bring the total removal
    closer to `goal`; ties go to the layer with the smaller removed fraction (for +) or larger (for -)."""
    total = sum(L.removed() for L in layers)
    while True:
        best = None
        for L in layers:
            for kind, delta in (("c", 1), ("c", -1), ("h", 1), ("h", -1)):
                kh, c = L.kh + (delta if kind == "h" else 0), L.c + (delta if kind == "c" else 0)
                if not (0 <= kh <= L.kh_max and 0 <= c < len(L.levels)):
                    continue
                if delta > 0 and L.frac_after(kh, c) > L.cap + 1e-12:
                    continue
                new_total = total - L.removed() + L.removed(kh, c)
                key = (abs(goal - new_total), delta * L.frac_after(kh, c), kind != "c")
                if best is None or key < best[0]:
                    best = (key, L, kh, c, new_total)
        if best is None or best[0][0] >= abs(goal - total) - 1e-9:
            return
        _, L, L.kh, L.c, total = best


def _pick(L: _Layer, scores: Scores) -> LayerPlan:
    """Turn counts into indices: the lowest-scored heads, and per kept expert its own lowest
    channels."""
    heads = sorted(torch.argsort(scores.heads[L.i].float(), stable=True)[:L.kh].tolist())
    k = L.f - L.levels[L.c]
    kept = [e for e in range(L.e) if e not in L.experts]
    channels = [sorted(torch.argsort(scores.channels[L.i][e].float(), stable=True)[:k].tolist()) for e in kept] \
        if k else []
    return LayerPlan(heads=heads, experts=sorted(L.experts), channels=channels)


def _check_scores(model, scores: Scores) -> None:
    for i, s in layer_shapes(model).items():
        want = {"heads": (s["n_heads"],), "channels": (s["n_experts"], s["d_ff"]), "experts": (s["n_experts"],)}
        for kind, shape in want.items():
            got = getattr(scores, kind).get(i)
            if got is None or tuple(got.shape) != shape:
                raise ValueError(f"scores.{kind}[{i}] has shape {None if got is None else tuple(got.shape)}, "
                                 f"the model needs {shape}: compute scores on the model being pruned")


def _layer_states(model, shapes, removed_now, protected, channel_multiple) -> list[_Layer]:
    cfg, hc = model.cfg, head_params(model.cfg)
    out = []
    for i, s in layer_shapes(model).items():
        base = _layer_count(cfg, shapes[i])
        kh_max = 0 if _protected_by(model, i, "heads", protected) else s["n_heads"] - 1
        levels = [s["d_ff"]] if _protected_by(model, i, "channels", protected) \
            else _kept_levels(s["d_ff"], channel_multiple)
        out.append(_Layer(i, s["n_heads"], s["n_experts"], s["d_ff"], cfg.d_model, hc, base,
                          removed_now[i], kh_max, levels))
    return out


def plan(model, ratio: float, scores: Scores, *, allocation: str = "uniform",
         layer_sensitivity: dict[int, float] | None = None, protected: Sequence[str] = DEFAULT_PROTECTED,
         expert_removal: bool = False, routing: dict | None = None, expert_min_usage: float = 0.25,
         channel_multiple: int = 1, max_layer_ratio: float = 0.8,
         layer_ratios: dict[int, float] | None = None, base_prunable: int | None = None,
         base_shapes: dict | None = None) -> PrunePlan:
    """Decide which heads / expert channels / experts to remove so that the prunable parameters
    removed, as a fraction of `base_prunable` (default: the model's current count), reach `ratio`
    as closely as the units allow. Does not modify the model.

    allocation "uniform": every layer loses the same fraction of its own prunable params;
    "sensitivity": fractions proportional to 1 / layer_sensitivity[i] (lower = less sensitive =
    pruned more), normalised to the total. Either way no layer goes above
    max(max_layer_ratio, ratio). layer_ratios fixes the fraction of the layers it names; the rest
    share the remaining target. Inside a layer, whole experts go first (only with expert_removal,
    only experts whose routed share is below expert_min_usage / n_experts, needs `routing`), then
    the SSM gives its proportional share in whole heads and expert channels absorb the rounding;
    a final pass moves single heads / channel steps between layers to hit the total.
    """
    _check_ratio(ratio)
    check(allocation in ALLOCATIONS, "prune", "allocation",
          f"must be one of {', '.join(ALLOCATIONS)}, got {allocation!r}")
    _require_float(model)
    _check_scores(model, scores)
    n_layers = len(model.layers)
    protected = list(protected)
    _check_protected(model, protected)
    _check_layer_ratios(layer_ratios, n_layers)
    kinds = ("heads", "channels") + (("experts",) if expert_removal else ())
    for i in (layer_ratios or {}):
        for kind in kinds:
            pat = _protected_by(model, i, kind, protected)
            check(pat is None, "prune", "layer_ratios",
                  f"sets a ratio for layer {i}, but {pat!r} is protected (prune.protected) and "
                  f"would be pruned; remove the layer from one of the two")
    if expert_removal and routing is None:
        raise ValueError("expert_removal needs routing statistics: pass routing=routing_stats(model, batches)")

    total_base, shapes = _resolve_base(model, base_prunable, base_shapes)
    removed_now = {i: _layer_count(model.cfg, shapes[i]) - _layer_count(model.cfg, s)
                   for i, s in layer_shapes(model).items()}
    layers = _layer_states(model, shapes, removed_now, protected, channel_multiple)
    current = prunable_params(model)
    need = current - (1.0 - ratio) * total_base  # still to remove now
    result = PrunePlan({}, ratio, total_base, shapes, current)
    if need <= 0:
        return result

    fracs = _allocate(layers, ratio * total_base, allocation, layer_sensitivity, max(max_layer_ratio, ratio),
                      layer_ratios or {})
    for L in layers:
        target = max(0.0, fracs[L.i] * L.base - L.removed_before)
        if expert_removal and target > 0 and not _protected_by(model, L.i, "experts", protected):
            _choose_experts(L, target, scores, routing, expert_min_usage, model.cfg.top_k)
        _decompose(L, target)
    free = [L for L in layers if not L.fixed]
    _fill(free, need - sum(L.removed() for L in layers if L.fixed))

    for L in layers:
        lp = _pick(L, scores)
        if not lp.empty():
            result.layers[L.i] = lp
    result.predicted_prunable_after = current - sum(L.removed() for L in layers)
    return result


def _allocate(layers: list[_Layer], amount: float, allocation: str, sensitivity, cap: float,
              layer_ratios: dict) -> dict[int, float]:
    """Per-layer fractions of their base counts (total removal incl. earlier calls)."""
    fracs = {}
    for L in layers:
        L.cap = cap
        if L.i in layer_ratios:
            L.fixed, L.cap = True, max(cap, layer_ratios[L.i])
            fracs[L.i] = float(layer_ratios[L.i])
    free = [L for L in layers if not L.fixed]
    if allocation == "sensitivity":
        if sensitivity is None:
            raise ValueError("allocation 'sensitivity' needs layer_sensitivity {layer: value} "
                             "(see measure_sensitivity)")
        for L in free:
            s = sensitivity.get(L.i, sensitivity.get(str(L.i)))
            if s is None or not math.isfinite(s) or s <= 0:
                raise ValueError(f"layer_sensitivity[{L.i}] must be a finite value > 0, got {s!r}")
        weights = {L.i: 1.0 / float(sensitivity.get(L.i, sensitivity.get(str(L.i)))) for L in free}
    else:
        weights = {L.i: 1.0 for L in free}
    # A layer's cap also reflects what its unprotected units can give at all.
    caps = {L.i: min(L.cap, (L.removed_before + L.max_removed()) / L.base) for L in free}
    rest = amount - sum(fracs[L.i] * L.base for L in layers if L.fixed)
    fracs.update(_water_fill(rest, {L.i: L.base for L in free}, weights, caps))
    return fracs


# --------------------------------------------------------------------------- apply


def _check_plan_protection(model, p: PrunePlan, protected: Sequence[str]) -> None:
    for i, lp in p.layers.items():
        for kind, used in (("heads", lp.heads), ("channels", any(lp.channels)), ("experts", lp.experts)):
            pat = _protected_by(model, i, kind, protected) if used else None
            check(pat is None, "prune", "protected",
                  f"the plan removes {kind} of layer {i}, but {pat!r} is protected")


def apply_plan(model, p: PrunePlan, protected: Sequence[str] = ()) -> nn.Module:
    """Remove the planned units in place (experts, then channels, then heads per layer) and
    record the new per-layer sizes in model.cfg. Raises ParamsError if the plan touches a
    protected module. Returns the model."""
    _require_float(model)
    _check_protected(model, protected)
    n_layers = len(model.layers)
    for i in p.layers:
        if not (isinstance(i, int) and 0 <= i < n_layers):
            raise ValueError(f"plan names layer {i!r}; the model has layers 0..{n_layers - 1}")
    _check_plan_protection(model, p, protected)
    for i, lp in sorted(p.layers.items()):
        layer = model.layers[i]
        if lp.experts:
            EXPERT_PRUNER(layer.moe, lp.experts)
        if any(lp.channels):
            e, f = layer.moe.experts.w1.shape[:2]
            if len(lp.channels) != e:
                raise ValueError(f"plan for layer {i}: {len(lp.channels)} channel lists for {e} experts")
            CHANNEL_PRUNER(layer.moe.experts, [k * f + j for k, chans in enumerate(lp.channels) for j in chans])
        if lp.heads:
            HEAD_PRUNER(layer.mixer, lp.heads)
    _update_config(model)
    return model


def _update_config(model) -> None:
    """A new config (the old object may be shared with the caller) with per-layer sizes."""
    shapes = layer_shapes(model)
    order = range(len(model.layers))
    model.cfg = dataclasses.replace(
        model.cfg, layer_n_heads=[shapes[i]["n_heads"] for i in order],
        layer_n_experts=[shapes[i]["n_experts"] for i in order], layer_d_ff=[shapes[i]["d_ff"] for i in order])
    model.cfg.validate()


# --------------------------------------------------------------------------- prune + report


def prune(model, ratio: float, importance: str | Scores = "magnitude", *, batches=None,
          routing: dict | None = None, base_prunable: int | None = None, base_shapes: dict | None = None,
          **plan_kwargs) -> dict:
    """plan + apply_plan in place; returns the report (see `_report`).

    importance: "magnitude", "taylor" (needs batches: token tensors (b, l+1)) or precomputed
    Scores. For repeated (iterative) calls pass the first report's base_prunable (and
    base_shapes when the unpruned model was not uniform): `ratio` is cumulative against it.
    plan_kwargs: see `plan` (PruneConfig.plan_kwargs() gives them from params).
    """
    _check_ratio(ratio)
    _require_float(model)
    batches = None if batches is None else list(batches)  # iterated more than once
    if plan_kwargs.get("expert_removal") and routing is None:
        if batches is None:
            raise ValueError("expert_removal needs routing statistics: pass batches or routing")
        routing = routing_stats(model, batches)
    if isinstance(importance, Scores):
        scores = importance
    else:
        scores = importance_scores(model, importance, batches, routing)
    total_base, shapes = _resolve_base(model, base_prunable, base_shapes)
    before, params_before = prunable_params(model), model.num_params()
    p = plan(model, ratio, scores, routing=routing, base_prunable=total_base, base_shapes=shapes, **plan_kwargs)
    apply_plan(model, p, protected=plan_kwargs.get("protected", DEFAULT_PROTECTED))
    rep = _report(model, ratio, total_base, shapes, before, params_before, p)
    rep["importance"] = scores.kind
    rep["allocation"] = plan_kwargs.get("allocation", "uniform")
    if rep["prunable_params_removed_frac"] < ratio - 0.02:
        log.warning("pruning reached %.3f of the requested %.3f (protected modules or per-layer limits)",
                    rep["prunable_params_removed_frac"], ratio)
    return rep


def _report(model, ratio, total_base, shapes, before, params_before, p: PrunePlan) -> dict:
    """JSON-able summary. sparsity[i]: fraction removed from the unpruned layer, per kind."""
    cfg, now = model.cfg, layer_shapes(model)
    after = prunable_params(model)
    d = cfg.d_model
    sparsity = {}
    for i, s in now.items():
        b = shapes[i]
        moe_b, moe_n = b["n_experts"] * (2 * d * b["d_ff"] + d), s["n_experts"] * (2 * d * s["d_ff"] + d)
        sparsity[i] = {"heads": 1 - s["n_heads"] / b["n_heads"], "experts": 1 - s["n_experts"] / b["n_experts"],
                       "d_ff": 1 - s["d_ff"] / b["d_ff"], "ssm_params": 1 - s["n_heads"] / b["n_heads"],
                       "moe_params": 1 - moe_n / moe_b,
                       "prunable_params": 1 - _layer_count(cfg, s) / _layer_count(cfg, b)}
    removed = {i: {"heads": lp.heads, "experts": lp.experts,
                   "channels_per_expert": len(lp.channels[0]) if lp.channels else 0}
               for i, lp in p.layers.items()}
    return {"ratio": ratio, "base_prunable": total_base, "base_shapes": shapes,
            "prunable_before": before, "prunable_after": after,
            "prunable_params_removed_frac": (total_base - after) / total_base,
            "params_before": params_before, "params_after": model.num_params(),
            "layers": now, "sparsity": sparsity, "removed_now": removed}


# --------------------------------------------------------------------------- sensitivity


@torch.no_grad()
def _mask_plan(model, p: PrunePlan) -> None:
    """Zero what makes the planned heads / channels contribute nothing (no experts): a head's
    x_proj and out_proj columns (dt, B, C stop depending on it and its output is dropped), a
    channel's w2 column. Equivalent to removing them."""
    for i, lp in p.layers.items():
        mixer, experts = model.layers[i].mixer, model.layers[i].moe.experts
        for h in lp.heads:
            cols = slice(h * mixer.headdim, (h + 1) * mixer.headdim)
            mixer.x_proj.weight[:, cols] = 0
            mixer.out_proj.weight[:, cols] = 0
        for e, chans in enumerate(lp.channels):
            experts.w2[e, :, chans] = 0


@torch.no_grad()
def measure_sensitivity(model, batches, scores: Scores, probe_ratio: float = 0.25,
                        channel_multiple: int = 1) -> dict[int, float]:
    """Per layer: LM-loss increase on `batches` when that layer alone loses `probe_ratio` of its
    prunable params (heads + channels chosen by `scores`, applied as an exact zero mask and
    restored). Protection is ignored here: this measures the layer. Values are floored at 1e-6 so
    they can be inverted by the "sensitivity" allocation."""
    batches = list(batches)
    base = sum(float(lm_loss(model, b)) for b in batches) / len(batches)
    out = {}
    for i, layer in enumerate(model.layers):
        others = {j: (probe_ratio if j == i else 0.0) for j in range(len(model.layers))}
        p = plan(model, probe_ratio, scores, protected=(), layer_ratios=others,
                 channel_multiple=channel_multiple)
        saved = {k: v.clone() for k, v in layer.state_dict().items()}
        try:
            _mask_plan(model, p)
            loss = sum(float(lm_loss(model, b)) for b in batches) / len(batches)
        finally:
            layer.load_state_dict(saved)
        out[i] = max(loss - base, 1e-6)
    return out
