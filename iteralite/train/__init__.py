"""Training, scoring and generation.

Modules:
    losses    the one next-token cross-entropy and the one distillation loss every loop uses
    loop      the FP32 training loop: AdamW, warm-up + cosine LR, clipping, periodic validation,
              resumable checkpoints, batches that depend only on (seed, step), data parallelism
    dist      processes and devices of the data-parallel train stage: rank, device, process group,
              a worker that dies with its launcher
    torchrun  `python -m iteralite.train.torchrun`: torchrun's launcher with a one-line failure report
    live      step metrics through dvclive: one logger per stage, names, summary
    distill   distillation from a teacher (the loop of QAT, fine-tuning, prune recovery, the
              student and the mixed-precision fine-tunes)
    evaluate  held-out perplexity and bits per byte on validation and WikiText-2, and the size
              metrics every model-producing stage reports
    generate  sampling (temperature, top-k, top-p): parallel prefill, then the recurrent step per token
"""
