"""Stage `train`: the FP32 SSM+MoE baseline on the training split; validation metrics."""
from pathlib import Path

from iteralite.core.config import ModelConfig
from iteralite.data.tokenizer import file_sha256, load_tokenizer
from iteralite.io.checkpoint import save_checkpoint
from iteralite.io.errors import ParamsError
from iteralite.io.params import from_dict, load_section, read_params
from iteralite.pipeline import paths
from iteralite.pipeline.artifacts import artifact_meta
from iteralite.pipeline.dvcfile import code_digest
from iteralite.pipeline.stage import run, write_metrics
from iteralite.train.evaluate import EvalConfig, Evaluator
from iteralite.train.loop import TrainConfig, train


def main():
    raw = read_params().get("model") or {}
    if "vocab_size" in raw:
        raise ParamsError("params: 'model.vocab_size' is set by the tokenizer; set 'tokenizer.vocab_size' instead")
    vocab = load_tokenizer(paths.TOKENIZER_JSON).get_vocab_size()
    model_cfg = from_dict(ModelConfig, {**raw, "vocab_size": vocab}, "model")
    cfg = load_section(TrainConfig, "train")
    eval_cfg = load_section(EvalConfig, "eval")
    model, stats = train(model_cfg, cfg, eval_cfg, tok_dir=paths.TOKENIZER_DIR, resume_path=paths.TRAIN_RESUME,
                         curve_path=paths.TRAIN_CURVE, code=code_digest("train"))
    quality = Evaluator(eval_cfg, paths.TOKENIZER_DIR)(model)
    size = save_checkpoint(paths.FP32_CKPT, model, kind="fp32", tokenizer_sha256=file_sha256(paths.TOKENIZER_JSON),
                           meta=artifact_meta({"stage": "train", **stats, **quality}))
    Path(paths.TRAIN_RESUME).unlink(missing_ok=True)
    write_metrics(paths.TRAIN_METRICS, {"params": model.num_params(), "size_bytes": size, **quality, **stats})


if __name__ == "__main__":
    run("train", main)
