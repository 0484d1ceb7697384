"""Training, scoring and generation.

Modules:
    losses    the one next-token cross-entropy and the one distillation loss every loop uses
    loop      the FP32 training loop: AdamW, warm-up + cosine LR, clipping, periodic validation,
              resumable checkpoints, batches that depend only on (seed, step)
    distill   distillation from a teacher (the loop of QAT, fine-tuning, prune recovery and the
              mixed-precision fine-tune)
    evaluate  held-out perplexity and bits per byte on validation and WikiText-2, and the size
              metrics every model-producing stage reports
    generate  sampling: parallel prefill, then the recurrent step per token
"""
