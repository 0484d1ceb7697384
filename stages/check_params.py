"""Stage `check_params`: every section of params.yaml parsed with its class and checked against the
others (`pipeline.sections.check_params`) before any stage works. dvc.yaml makes it the first stage
(it tracks the whole file; `data` depends on its output), so a setting that only a late stage reads
(student.from_ratio, model.n_experts, ...) stops `dvc repro` here with one line. Its output never
changes, so rerunning it reruns nothing else."""
from iteralite.pipeline import paths
from iteralite.pipeline.sections import SECTIONS, check_params
from iteralite.pipeline.stage import PARAMS_CHECKED, run, write_metrics


def main():
    check_params(paths.PARAMS)
    write_metrics(PARAMS_CHECKED, {"checked_sections": list(SECTIONS)})


if __name__ == "__main__":
    run("check_params", main)
