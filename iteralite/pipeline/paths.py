"""Every artifact path of the pipeline, in one place (relative to the repository root, where DVC
runs the stages). `dvc.yaml` names the same files; library functions take paths as arguments,
and only the stage scripts and the CLI's defaults read them from here."""
from __future__ import annotations

PARAMS = "params.yaml"
RAW_DIR = "data/raw"
PREPARED_DIR = "data/prepared"
TOKENIZER_DIR = "data/tokenizer"
TOKENIZER_JSON = f"{TOKENIZER_DIR}/tokenizer.json"
TRAIN_TOKENS = f"{TOKENIZER_DIR}/train.npy"
DEV_TOKENS = f"{TOKENIZER_DIR}/dev.npy"  # every calibration, budget and selection decision reads this

FP32_CKPT = "checkpoints/fp32.safetensors"
TRAIN_RESUME = "checkpoints/train_resume.safetensors"
CALIBRATION = "checkpoints/calibration.safetensors"
QAT_CKPT = "checkpoints/qat.safetensors"
STUDENT_CKPT = "checkpoints/student.safetensors"
MIXED_CKPT = "checkpoints/mixed.safetensors"
MIXED_CANDIDATES_DIR = "checkpoints/mixed"
FUSED_CKPT = "checkpoints/fused.safetensors"

DATA_METRICS = "metrics/data.json"
TOKENIZER_METRICS = "metrics/tokenizer.json"
TRAIN_METRICS = "metrics/train.json"
CALIBRATE_METRICS = "metrics/calibrate.json"
INT4_METRICS = "metrics/int4.json"
QAT_METRICS = "metrics/qat.json"
STUDENT_METRICS = "metrics/student.json"
MIXED_METRICS = "metrics/mixed_precision.json"
FUSE_METRICS = "metrics/fuse.json"
BENCH_METRICS = "metrics/benchmark.json"
BENCH_REPORT = "metrics/report.md"

SENSITIVITY_PNG, SENSITIVITY_CSV = "plots/sensitivity.png", "plots/sensitivity.csv"
PRUNE_RATIO_CSV, PRUNE_RATIO_PNG, PRUNE_SPARSITY_PNG = \
    "plots/prune_ratio.csv", "plots/prune_ratio.png", "plots/prune_sparsity.png"
MIXED_PARETO_PNG, MIXED_PARETO_CSV, MIXED_ALLOCATION_PNG = \
    "plots/mixed_pareto.png", "plots/mixed_pareto.csv", "plots/mixed_allocation.png"
MIXED_CODING_CSV = "plots/mixed_coding.csv"  # per code tensor: packed, entropy-coded and entropy bytes
BENCH_PARETO_PNG, BENCH_SPEED_PNG, BENCH_PARETO_CSV = \
    "plots/bench_pareto.png", "plots/bench_speed.png", "plots/bench_pareto.csv"

LIVE_ROOT = "dvclive"  # one dvclive folder per training stage: step metrics, summary, plot data


def int4_ckpt(method: str) -> str:
    return f"checkpoints/int4/{method}.safetensors"


def ratio_ckpt(stage: str, ratio) -> str:
    """checkpoints/<prune|finetune>/<ratio>.safetensors (the ratio as written in params)."""
    return f"checkpoints/{stage}/{ratio}.safetensors"


def ratio_metrics(stage: str, ratio) -> str:
    return f"metrics/{stage}_{ratio}.json"


def mixed_candidate(name: str, target: str = "headline") -> str:
    return f"{for_target(MIXED_CANDIDATES_DIR, target)}/{name}.safetensors"


HEADLINE = "headline"  # the student target whose outputs keep the plain names
TARGETS = (HEADLINE, "tiny")  # the student targets dvc.yaml has stages for (student_tiny, mixed_precision_tiny)
EXTRA_TARGETS = TARGETS[1:]


def for_target(path: str, target: str) -> str:
    """A headline output's path for student target `target`: the headline's own path, else with
    `_<target>` before the extension (checkpoints/mixed.safetensors -> checkpoints/mixed_tiny.safetensors,
    checkpoints/mixed -> checkpoints/mixed_tiny)."""
    if target == HEADLINE:
        return path
    head, slash, name = path.rpartition("/")
    stem, dot, ext = name.partition(".")
    return f"{head}{slash}{stem}_{target}{dot}{ext}"


def target_stage(stage: str, target: str) -> str:
    """The dvc.yaml stage of `stage` ("student", "mixed_precision") for a target: `stage` for the
    headline, `<stage>_<target>` otherwise."""
    return stage if target == HEADLINE else f"{stage}_{target}"


def live_dir(stage: str, ratio=None) -> str:
    """dvclive/<stage> (dvclive/<stage>_<ratio> for a matrix stage): where a training stage's
    dvclive logger writes its step metrics (plots/metrics/*.tsv) and summary (metrics.json)."""
    return f"{LIVE_ROOT}/{stage}" if ratio is None else f"{LIVE_ROOT}/{stage}_{ratio}"
