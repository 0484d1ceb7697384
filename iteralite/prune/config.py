"""The params.yaml section "prune" (`PruneConfig`), the names it accepts, the checks of ratios
every entry point shares, and the cumulative schedule of iterative pruning."""
from __future__ import annotations

from dataclasses import dataclass, field

from iteralite.io.params import check

# The names params.yaml may use; `importance.SCORERS` and `plan.ALLOCATION_WEIGHTS` map each of
# them to its implementation.
IMPORTANCES = ("taylor", "magnitude")
ALLOCATIONS = ("uniform", "sensitivity")
DEFAULT_PROTECTED = ("embedding",)


@dataclass
class PruneConfig:
    """params.yaml section "prune"."""

    # Cumulative targets. A list even for one ratio: DVC's matrix iterates it. Each ratio's text
    # names its outputs (checkpoints/prune/<ratio>...), so a quoted '0.1' or 1e-1 (a string in
    # YAML 1.1) is refused rather than converted: the report would look for other file names.
    ratios: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.4],
                                metadata={"items": "ratios", "as_written": True})
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
        for r in self.ratios:  # 0 would prune nothing and leave the sweep's report a row it cannot draw
            check(0.0 < r < 1.0, section, "ratios", f"entries must be in (0, 1) (a fraction removed), got {r}")
        # Each ratio is one pruned artifact and one plot row: a repeat would be trained twice.
        repeated = sorted({r for r in self.ratios if self.ratios.count(r) > 1})
        check(not repeated, section, "ratios",
              f"lists {', '.join(map(str, repeated))} more than once; give each ratio once, got {self.ratios}")
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
        check_layer_ratios(self.layer_ratios, None, section)

    def plan_kwargs(self) -> dict:
        """The keyword arguments of `plan` / `prune` that this section sets."""
        return dict(allocation=self.allocation, protected=list(self.protected),
                    expert_removal=self.expert_removal, expert_min_usage=self.expert_min_usage,
                    channel_multiple=self.channel_multiple, max_layer_ratio=self.max_layer_ratio,
                    layer_ratios=self.layer_ratios)


def check_ratio(ratio: float, section: str = "prune") -> None:
    check(isinstance(ratio, (int, float)) and 0.0 <= ratio < 1.0, section, "ratios",
          f"entries must be in [0, 1), got {ratio}")


def check_layer_ratios(layer_ratios, n_layers: int | None, section: str = "prune") -> None:
    for k, v in (layer_ratios or {}).items():
        ok_key = isinstance(k, int) and k >= 0 and (n_layers is None or k < n_layers)
        where = "" if n_layers is None else f" < n_layers={n_layers}"
        check(ok_key, section, "layer_ratios", f"keys must be layer indices >= 0{where}, got {k!r}")
        check(isinstance(v, (int, float)) and 0.0 <= v < 1.0, section, "layer_ratios",
              f"layer {k}: ratio must be in [0, 1), got {v}")


def iterative_schedule(target_ratio: float, steps: int, start: float = 0.0) -> list[float]:
    """Cumulative ratios from `start` to `target_ratio` in `steps` equal steps:
    (0.4, 4) -> [0.1, 0.2, 0.3, 0.4]. Each is measured against the original prunable count."""
    check_ratio(target_ratio)
    check(steps >= 1, "prune", "steps", f"must be >= 1, got {steps}")
    check(0.0 <= start <= target_ratio, "prune", "ratios",
          f"the starting ratio {start} must be in [0, target {target_ratio}]")
    return [round(start + (target_ratio - start) * k / steps, 10) for k in range(1, steps + 1)]
