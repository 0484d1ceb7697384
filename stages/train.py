"""Stage `train`: the FP32 SSM+MoE baseline on the training split; validation metrics; step metrics
in dvclive/train.

Data-parallel over `train.nproc` processes started by torchrun's launcher (dvc.yaml's cmd:
`python -m iteralite.train.torchrun --standalone --nproc-per-node ${train.nproc} stages/train.py`);
a plain `python stages/train.py` is one process. Rank 0 alone writes."""
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
from iteralite.train import dist
from iteralite.train.evaluate import EvalConfig, Evaluator
from iteralite.train.live import stage_live
from iteralite.train.loop import TrainConfig, train


def main():
    if dist.launched():
        dist.die_with_launcher()  # first: a worker must not outlive a killed launcher
    raw = read_params().get("model") or {}
    if "vocab_size" in raw:
        raise ParamsError("params: 'model.vocab_size' is set by the tokenizer; set 'tokenizer.vocab_size' instead")
    vocab = load_tokenizer(paths.TOKENIZER_JSON).get_vocab_size()
    model_cfg = from_dict(ModelConfig, {**raw, "vocab_size": vocab}, "model")
    cfg = load_section(TrainConfig, "train")
    eval_cfg = load_section(EvalConfig, "eval")
    dist.check_world(cfg.nproc)
    with dist.session(cfg.device) as env, stage_live(paths.live_dir("train"), enabled=env.is_main) as live:
        model, stats = train(model_cfg, cfg, eval_cfg, tok_dir=paths.TOKENIZER_DIR, resume_path=paths.TRAIN_RESUME,
                             code=code_digest("train"), live=live, env=env)
        if not env.is_main:
            return
        quality = Evaluator(eval_cfg, paths.TOKENIZER_DIR)(model)
        size = save_checkpoint(paths.FP32_CKPT, model, kind="fp32", tokenizer_sha256=file_sha256(paths.TOKENIZER_JSON),
                               meta=artifact_meta({"stage": "train", **stats, **quality}))
        Path(paths.TRAIN_RESUME).unlink(missing_ok=True)
        write_metrics(paths.TRAIN_METRICS, {"params": model.num_params(), "size_bytes": size, **quality, **stats},
                      quality=True)


if __name__ == "__main__":
    run("train", main)
