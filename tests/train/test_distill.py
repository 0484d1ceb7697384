import copy

import pytest
import torch

from iteralite.io.errors import DivergedError
from iteralite.quant.qat import QATConfig
from iteralite.train.distill import distill_train


def _data(cfg):
    return torch.randint(0, cfg.vocab_size, (4000,), generator=torch.Generator().manual_seed(0))


def test_distillation_trains_and_reports(model, cfg):
    student = copy.deepcopy(model)
    stats = distill_train(student, model, _data(cfg), QATConfig(steps=3, batch_size=2, seq_len=16, warmup_steps=1,
                                                                threads=1), progress=False, desc="qat")
    assert stats["steps"] == 3 and stats["final_train_ce"] > 0
    assert not all(torch.equal(a, b) for a, b in zip(student.parameters(), model.parameters()))


def test_diverging_distillation_stops_with_the_loop_name_and_step(model, cfg):
    """Every distillation loop (qat, finetune, prune recovery, mixed fine-tune) goes through here."""
    student = copy.deepcopy(model)
    qcfg = QATConfig(steps=20, batch_size=2, seq_len=16, warmup_steps=1, lr=1e8, min_lr=1e8, threads=1)
    with pytest.raises(DivergedError, match=r"recover 0.4 diverged at step \d+ of 20: .*lower it"):
        distill_train(student, model, _data(cfg), qcfg, progress=False, desc="recover 0.4")
