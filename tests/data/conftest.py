"""Fixtures of the data tests."""
import pytest


@pytest.fixture
def hub_offline(tmp_path, monkeypatch):
    """`datasets` offline, with its cache in the test's folder: the hub path runs on local files."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
