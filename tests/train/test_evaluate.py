"""Evaluation windows versus split sizes: a window that does not fit stops the Evaluator when it is
built (before training), naming the key, the split and its token count."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from iteralite.io.errors import DataError, IteraliteError, ParamsError
from iteralite.train.evaluate import EvalConfig, Evaluator, evaluate_tokens, tiles


@pytest.fixture
def small_tok_dir(tok_dir, tmp_path):
    """A copy of the tiny tokenizer folder whose wikitext2 split is 9 tokens long (a 2-word file)."""
    d = tmp_path / "tokenizer"
    shutil.copytree(tok_dir, d)
    np.save(d / "wikitext2.npy", np.load(d / "wikitext2.npy")[:9])
    return d


def test_evaluator_scores_both_splits(tok_dir, model):
    out = Evaluator(EvalConfig(seq_len=16, batch_size=4, max_tokens=256), tok_dir)(model)
    assert set(out) == {"val_loss", "val_ppl", "val_bpb", "wikitext2_ppl", "wikitext2_bpb"}
    assert all(np.isfinite(v) and v > 0 for v in out.values())


def test_seq_len_longer_than_a_split_fails_when_the_evaluator_is_built(small_tok_dir):
    with pytest.raises(ParamsError, match=r"'eval.seq_len' = 16 is longer than the wikitext2 split, which has 9 "
                                          r"tokens.*lower eval.seq_len to <= 9"):
        Evaluator(EvalConfig(seq_len=16), small_tok_dir)
    Evaluator(EvalConfig(seq_len=9), small_tok_dir)  # one full window fits


def test_seq_len_longer_than_the_validation_split(tok_dir):
    n = len(np.load(tok_dir / "valid.npy"))
    with pytest.raises(ParamsError, match=rf"'eval.seq_len' = {n + 1} is longer than the valid split, which has {n} tokens"):
        Evaluator(EvalConfig(seq_len=n + 1), tok_dir)


def test_max_tokens_below_one_window_fails_when_the_evaluator_is_built(tok_dir):
    with pytest.raises(ParamsError, match=r"'eval.max_tokens' = 5 leaves less than one window of 'eval.seq_len' = "
                                          r"32 tokens of the valid split \(\d+ tokens\); set it to >= 32"):
        Evaluator(EvalConfig(seq_len=32, max_tokens=5), tok_dir)
    Evaluator(EvalConfig(seq_len=32, max_tokens=32), tok_dir)


def test_check_window_names_the_setting_it_is_given(tok_dir):
    ev = Evaluator(EvalConfig(seq_len=32), tok_dir)
    with pytest.raises(ParamsError, match=r"'train.eval_tokens' = 8 leaves less than one window"):
        ev.check_window("valid", len(ev.valid), 8, "train.eval_tokens")


def test_evaluate_tokens_too_short_is_a_clear_error(model):
    tokens = np.arange(10, dtype=np.uint16)
    with pytest.raises(DataError, match=r"at least one window of 16 tokens, got 10 tokens") as err:
        evaluate_tokens(model, tokens, np.ones(300, dtype=np.int64), seq_len=16, batch_size=2)
    assert isinstance(err.value, IteraliteError) and not isinstance(err.value, ValueError)
    with pytest.raises(DataError, match=r"got 5 tokens \(max_tokens=5\)"):
        evaluate_tokens(model, np.arange(100, dtype=np.uint16), np.ones(300, dtype=np.int64), 16, 2, max_tokens=5)


def test_a_scorer_that_is_no_torch_module_is_scored_like_the_model_it_wraps(model):
    """The benchmark scores the native C step and ONNX Runtime sessions, which are no nn.Module:
    their windows stay on the CPU and the numbers equal the wrapped model's."""

    class Wrapped:  # the duck type the scorers share: callable, train()/eval(), .training
        training = False

        def __call__(self, x):
            return model(x)

        def eval(self):
            return self

        def train(self, mode=True):
            return self

    tokens = np.arange(200, dtype=np.uint16) % model.cfg.vocab_size
    nbytes = np.ones(model.cfg.vocab_size, dtype=np.int64)
    assert evaluate_tokens(Wrapped(), tokens, nbytes, 16, 4) == evaluate_tokens(model, tokens, nbytes, 16, 4)


def test_tiles_score_every_token_once_and_drop_the_tail():
    data = torch.arange(23)
    t = tiles(data, 5)
    assert t.shape == (4, 5) and torch.equal(t.flatten(), data[:20])
    assert tiles(data[:4], 5).shape == (0, 5)
