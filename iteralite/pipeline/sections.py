"""params.yaml section -> the config dataclass that parses it: one registry, so a check of the
whole file (`check_params`, and the test that parses the repository's params) covers every
section. Classes are named as "module:Class" and imported on use, so importing this module
imports nothing else."""
from __future__ import annotations

import importlib
from pathlib import Path

from iteralite.io.errors import ParamsError
from iteralite.io.params import from_dict, read_params

SECTIONS: dict[str, str] = {
    "data": "iteralite.data.corpus:DataConfig",
    "tokenizer": "iteralite.data.tokenizer:TokenizerConfig",
    "model": "iteralite.core.config:ModelConfig",
    "train": "iteralite.train.loop:TrainConfig",
    "eval": "iteralite.train.evaluate:EvalConfig",
    "calibrate": "iteralite.quant.calibrate:CalibrateConfig",
    "int4": "iteralite.pipeline.int4:Int4Config",
    "qat": "iteralite.quant.qat:QATConfig",
    "prune": "iteralite.prune.config:PruneConfig",
    "finetune": "iteralite.quant.qat:QATConfig",
    "student": "iteralite.pipeline.student:StudentConfig",
    "mixed_precision": "iteralite.pipeline.mixed:MixedConfig",
    "fuse": "iteralite.runtime.deploy:FuseConfig",
    "benchmark": "iteralite.bench.suite:BenchmarkConfig",
}


def section_class(section: str) -> type:
    """The config class of `section` (a ParamsError for an unknown section)."""
    if section not in SECTIONS:
        raise ParamsError(f"params: unknown section '{section}'; known: {', '.join(SECTIONS)}")
    module, _, name = SECTIONS[section].partition(":")
    return getattr(importlib.import_module(module), name)


def check_params(path: str | Path = "params.yaml") -> dict:
    """Parse every section of `path` with its class and check what one section says about another:
    {section: config}. Unknown sections, every key error and every disagreement between sections are
    ParamsErrors naming the keys. The pipeline's first stage (`check_params` in dvc.yaml) runs this,
    so a setting that only a late stage reads stops the run before any work."""
    raw = read_params(path)
    parsed = {sec: from_dict(section_class(sec), raw.get(sec), sec) for sec in SECTIONS}
    check_across(parsed)
    return parsed


def check_across(cfg: dict) -> None:
    """The rules that span sections (each section's own ranges are its class's `validate`)."""
    from iteralite.runtime.native.layout import MAX_EXPERTS

    ratios, student = cfg["prune"].ratios, cfg["student"]
    if student.from_ratio not in ratios:
        raise ParamsError(f"params: 'student.from_ratio' = {student.from_ratio} is not one of 'prune.ratios' "
                          f"{ratios}: the student is cut from checkpoints/finetune/<ratio>, which only a listed "
                          "ratio's finetune stage writes; pick one of them or add it to prune.ratios")
    from iteralite.pipeline.paths import TARGETS

    for sec in ("student", "mixed_precision"):
        names = set(cfg[sec].targets)
        if sec == "mixed_precision":
            names |= set(TARGETS)  # a target without overrides takes the section as it is
        if names != set(TARGETS):
            raise ParamsError(f"params: '{sec}.targets' names {sorted(names)}, but the pipeline has stages for the "
                              f"targets {list(TARGETS)} (dvc.yaml: student, student_tiny, mixed_precision, "
                              "mixed_precision_tiny); give exactly those")
    model = cfg["model"]
    most = max([model.n_experts] + list(model.layer_n_experts or []))
    if most > MAX_EXPERTS:
        raise ParamsError(f"params: 'model.n_experts' = {most} is more than the {MAX_EXPERTS} experts per layer "
                          "the native runtime routes (ITL_MAX_EXPERTS in itl_step.c); the fuse and benchmark "
                          f"stages run it, so use at most {MAX_EXPERTS}")
