"""Shared fixtures: tiny configs and a tiny corpus/tokenizer built in a temporary folder, so unit
tests run in seconds and never need the network or the pulled data."""
from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

from iteralite.core.config import ModelConfig

REPO = Path(__file__).resolve().parents[1]

WORDS = ("the cat dog sun tree ball girl boy mom happy sad big little red blue ran jumped saw "
         "played with a and to in on was is said Lily Tom park home friend").split()


def pytest_collection_modifyitems(config, items):
    """The `critical_path` module first, then the other `slow` tests (real pipelines in temporary
    clones: minutes each), then the `early` ones (a minute or more each), in their order: `make test`
    hands test modules to its workers in this order, so the longest chains start at once and many
    short modules, not one long one, end the run."""
    items.sort(key=lambda item: tuple(item.get_closest_marker(m) is None
                                      for m in ("critical_path", "slow", "early")))  # stable within each part


# Under pytest-xdist, a worker lowers its own CPU priority (and its children's) before its first test
# off the critical path. On 2 cores with 3 workers the critical module's single-threaded `dvc repro`
# chain then keeps a core to itself and ends with the rest instead of minutes after them, alone on one
# core; the other tests share the other core and take the first one back when the chain waits. Only
# the order of work changes: every test still runs, and their time limits count CPU time.
YIELD_NICENESS = 10
_yielded = False


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Before the test's fixtures (a module's compile or clone included) are set up."""
    global _yielded
    if not _yielded and os.environ.get("PYTEST_XDIST_WORKER") and item.get_closest_marker("critical_path") is None:
        os.nice(YIELD_NICENESS)
        _yielded = True


def tiny_config(**kw) -> ModelConfig:
    base = dict(vocab_size=300, d_model=32, n_layers=2, d_state=4, d_conv=4, headdim=8, n_heads=2,
                dt_rank=4, n_experts=3, top_k=2, d_ff=16, chunk_size=8)
    base.update(kw)
    return ModelConfig(**base)


def fake_stories(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))).capitalize() + "."
            for _ in range(n)]


@pytest.fixture
def cfg() -> ModelConfig:
    return tiny_config()


@pytest.fixture
def model(cfg):
    from iteralite.core.model import IteraLite

    torch.manual_seed(0)
    return IteraLite(cfg).eval()


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory) -> Path:
    """A prepared corpus + trained tokenizer + token arrays, as the data/tokenizer stages write them."""
    from iteralite.data.corpus import join_stories
    from iteralite.data.tokenizer import TokenizerConfig, build

    root = tmp_path_factory.mktemp("corpus")
    prepared = root / "prepared"
    prepared.mkdir()
    (prepared / "train.txt").write_text(join_stories(fake_stories(300, 1)))
    (prepared / "valid.txt").write_text(join_stories(fake_stories(60, 2)))
    (prepared / "dev.txt").write_text(join_stories(fake_stories(40, 4)))
    (prepared / "wikitext2_test.txt").write_text("\n".join(fake_stories(40, 3)) + "\n")
    build(TokenizerConfig(vocab_size=300), prepared, root / "tokenizer")
    return root / "tokenizer"
