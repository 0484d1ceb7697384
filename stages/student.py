"""Stage `student`: the fine-tuned pruned model cut in width (d_model) and depth (layers) by
activation importance on the dev split, then distilled from FP32 for a budget of training tokens;
step metrics in dvclive/student."""
import os

from iteralite.io.checkpoint import load_model
from iteralite.io.errors import ParamsError
from iteralite.io.params import load_section
from iteralite.pipeline import paths
from iteralite.pipeline.artifacts import publish
from iteralite.pipeline.baseline import load_baseline
from iteralite.pipeline.stage import TRAIN_QUALITY, run, write_metrics
from iteralite.pipeline.student import StudentConfig, make_student
from iteralite.quant.swap import dequantize_model
from iteralite.train.live import stage_live


def main():
    cfg = load_section(StudentConfig, "student")
    src = paths.ratio_ckpt("finetune", cfg.from_ratio)
    if not os.path.exists(src):  # prune.ratios is not a param of this stage: a ratio sweep must not rerun it
        raise ParamsError(f"params: 'student.from_ratio' {cfg.from_ratio}: {src} does not exist; "
                          "use a ratio from prune.ratios (its finetune stage writes that file)")
    base = load_baseline(train_metrics=TRAIN_QUALITY)
    with stage_live(paths.live_dir("student")) as live:
        model, info = make_student(base.model, dequantize_model(load_model(src)[0]), base.train_tokens,
                                   base.dev_tokens, cfg, live=live)
    _, metrics = publish(paths.STUDENT_CKPT, model, base, kind="student", quant=None,
                         meta={"stage": "student", "parent": src})
    write_metrics(paths.STUDENT_METRICS, {**metrics, "from": src, "d_model": model.cfg.d_model,
                                          "n_layers": model.cfg.n_layers, **info}, quality=True)


if __name__ == "__main__":
    run("student", main)
