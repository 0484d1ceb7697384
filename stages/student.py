"""Stage `student` (`student_<target>` for a student target other than the headline): the
fine-tuned pruned model cut in width (d_model), depth (layers) and, per target, heads and expert
channels, by importance on the dev split, its embedding optionally factorised, then distilled from
FP32 for a budget of training tokens; step metrics in dvclive/<stage>."""
import os

from iteralite.io.checkpoint import load_model
from iteralite.io.errors import ParamsError
from iteralite.io.params import load_section
from iteralite.pipeline import paths
from iteralite.pipeline.artifacts import publish
from iteralite.pipeline.baseline import load_baseline
from iteralite.pipeline.stage import TRAIN_QUALITY, run_for_target, write_metrics
from iteralite.pipeline.student import StudentConfig, make_student
from iteralite.quant.swap import dequantize_model
from iteralite.train.live import stage_live


def main(target: str):
    cfg = load_section(StudentConfig, "student").for_target(target)
    src = paths.ratio_ckpt("finetune", cfg.from_ratio)
    if not os.path.exists(src):  # prune.ratios is not a param of this stage: a ratio sweep must not rerun it
        raise ParamsError(f"params: 'student.from_ratio' {cfg.from_ratio}: {src} does not exist; "
                          "use a ratio from prune.ratios (its finetune stage writes that file)")
    stage = paths.target_stage("student", target)
    base = load_baseline(train_metrics=TRAIN_QUALITY)
    with stage_live(paths.live_dir(stage)) as live:
        model, info = make_student(base.model, dequantize_model(load_model(src)[0]), base.train_tokens,
                                   base.dev_tokens, cfg, live=live)
    _, metrics = publish(paths.for_target(paths.STUDENT_CKPT, target), model, base, kind="student", quant=None,
                         meta={"stage": stage, "parent": src})
    write_metrics(paths.for_target(paths.STUDENT_METRICS, target), {
        **metrics, "target": target, "from": src, "d_model": model.cfg.d_model, "n_layers": model.cfg.n_layers,
        **info}, quality=True)


if __name__ == "__main__":
    run_for_target("student", "stages/student.py", lambda: load_section(StudentConfig, "student").targets, main)
