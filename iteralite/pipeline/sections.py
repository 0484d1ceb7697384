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
    """Parse every section of `path` with its class: {section: config}. Unknown sections and every
    key error are ParamsErrors naming the key."""
    raw = read_params(path)
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ParamsError(f"params: unknown section(s) {unknown}; known: {', '.join(SECTIONS)}")
    return {sec: from_dict(section_class(sec), raw.get(sec), sec) for sec in SECTIONS}
