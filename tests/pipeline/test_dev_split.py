"""Every decision reads the dev split: the calibrate stage's statistics come from dev.npy (a run
where dev and train differ gives the dev calibration, not the training one), and the real data's
dev and validation stories are disjoint from the training stories."""
from __future__ import annotations

import runpy
import shutil

import pytest
import torch
import yaml

from iteralite.data.corpus import DataConfig, prepare, split_stories
from iteralite.data.tokenizer import file_sha256, load_tokens
from iteralite.io.checkpoint import save_checkpoint
from iteralite.quant.calibrate import CalibrateConfig, calibrate, load_stats
from tests.conftest import REPO
from tests.pipeline_utils import raw_data

CALIB = {"n_samples": 8, "seq_len": 16, "batch_size": 4, "sens_samples": 4, "sens_bits": [4], "group_size": 8,
         "seed": 3}


def test_calibrate_stage_reads_the_dev_split(tmp_path, tok_dir, model, monkeypatch):
    shutil.copytree(tok_dir, tmp_path / "data" / "tokenizer")
    save_checkpoint(tmp_path / "checkpoints" / "fp32.safetensors", model, kind="fp32",
                    tokenizer_sha256=file_sha256(tok_dir / "tokenizer.json"))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"calibrate": CALIB}))
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(REPO / "stages" / "calibrate.py"), run_name="__main__")
    stored, summary = load_stats(tmp_path / "checkpoints" / "calibration.safetensors")
    cfg = CalibrateConfig(**CALIB)
    tokens = {s: torch.from_numpy(load_tokens(tok_dir / f"{s}.npy").astype("int64")) for s in ("dev", "train")}
    expected = {s: calibrate(model, t, cfg, progress=False) for s, t in tokens.items()}
    assert summary["baseline_loss"] == expected["dev"][1]["baseline_loss"]
    assert summary["baseline_loss"] != expected["train"][1]["baseline_loss"]
    for key, t in stored.items():
        torch.testing.assert_close(t, expected["dev"][0][f"{key}.act_sq_mean"])


def test_real_data_dev_and_validation_are_disjoint_from_training(tmp_path):
    """On the pulled data (data/raw, version 2) with the default params: >= 16,000 training stories
    after the carve-out, >= 200 dev stories, no dev or validation story among the training ones."""
    raw = raw_data()
    defaults = yaml.safe_load((REPO / "params.yaml").read_text())["data"]
    if not (raw / "tinystories" / "train.txt").stat().st_size > 10_000_000:
        pytest.fail(f"{raw}: not data version 2 (run `dvc pull`)")
    cfg = DataConfig(**{**defaults, "source": str(raw / "tinystories"), "wikitext": str(raw / "wikitext-2" / "test.txt")})
    stats = prepare(cfg, tmp_path)
    assert stats["train_stories"] >= 16000 and stats["dev_stories"] >= 200
    train, dev, valid = (set(split_stories((tmp_path / f"{s}.txt").read_text())) for s in ("train", "dev", "valid"))
    assert len(dev) == stats["dev_stories"] and not dev & train and not valid & train and not dev & valid
