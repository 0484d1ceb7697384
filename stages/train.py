"""Stage `train`: the FP32 baseline checkpoint and its metrics (the base of every ratio later)."""
from pathlib import Path

from iteralite.io.checkpoint import save_checkpoint
from iteralite.core.config import ModelConfig
from iteralite.io.errors import ParamsError
from iteralite.train.evaluate import EvalConfig, Evaluator
from iteralite.io.params import from_dict, load_section, read_params
from iteralite.pipeline.stage import run, write_metrics
from iteralite.data.tokenizer import file_sha256, load_tokenizer
from iteralite.train.loop import TrainConfig, train

TOKENIZER = "data/tokenizer/tokenizer.json"
OUT = "checkpoints/fp32.safetensors"
RESUME = "checkpoints/train_resume.safetensors"


def main():
    raw = read_params().get("model") or {}
    if "vocab_size" in raw:
        raise ParamsError("params: 'model.vocab_size' is set by the tokenizer; set 'tokenizer.vocab_size' instead")
    model_cfg = from_dict(ModelConfig, {**raw, "vocab_size": load_tokenizer(TOKENIZER).get_vocab_size()}, "model")
    cfg = load_section(TrainConfig, "train")
    eval_cfg = load_section(EvalConfig, "eval")
    model, stats = train(model_cfg, cfg, eval_cfg, resume_path=RESUME, curve_path="plots/train_curve.csv")
    quality = Evaluator(eval_cfg)(model)
    size = save_checkpoint(OUT, model, kind="fp32", tokenizer_sha256=file_sha256(TOKENIZER),
                           meta={"stage": "train", **stats, **quality})
    Path(RESUME).unlink(missing_ok=True)
    write_metrics("metrics/train.json", {"params": model.num_params(), "size_bytes": size, **quality, **stats})


if __name__ == "__main__":
    run("train", main)
