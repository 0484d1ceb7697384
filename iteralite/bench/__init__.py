"""Benchmarking: every variant of the model side by side, and the report.

- `timing`: speed of a model: batch-1 decode tokens/s, prefill latency, both at 1 thread and at
  all cores (`measure_variant`), and the profiler's decode hotspots. Imports no variant code.
- `memory`: peak resident memory of loading and running one variant, in a fresh process, and
  `state_bytes`, the in-memory bytes of a model's weights (the size of what is never saved).
- `variants`: the registry of variant kinds ("artifact", "fused", and one per peer), each a
  lazily imported "module:function" loader plus how the benchmark scores its quality.
- `peers`: baselines built from the FP32 model by off-the-shelf means (bitsandbytes NF4, int8
  weight-only, torch.compile).
- `suite`: the benchmark stage's configuration, its plan of variants (paths passed in) and
  `run_benchmark`, which measures and scores all of them.
- `report`: the markdown report, the Pareto and speed plots and the Pareto CSV.
"""
