"""The DVC pipeline's glue: what is not a library concept but the stages' own orchestration.

Modules:
    paths          every artifact path, in one place
    sections       params.yaml section -> its config dataclass (one registry)
    stage          the stage runner (one clear line and exit 2 on a user error) and metric files
    headline       the numbers people compare: each stage's headline metrics (the declared metrics)
    baseline       what every post-training stage starts from (FP32 model, metrics, evaluator)
    artifacts      save, reload, score: the common end of every model-producing stage
    int4           the int4 stage: every 4-bit method as a packed artifact
    mixed          the mixed_precision stage: profile, allocate, fine-tune, export, candidates
    mixed_report   the mixed_precision stage's Pareto and allocation plots
    dvcfile        what dvc.yaml says about one stage (deps digest, output folders), read at run time
    deps           `make deps`: rewrites dvc.yaml's stage deps from each script's import closure
"""
