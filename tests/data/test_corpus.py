import json

import pytest

from iteralite.data.corpus import DataConfig, join_stories, prepare, split_stories
from iteralite.io.errors import DataError
from tests.conftest import fake_stories


def _raw(tmp_path, train=None, valid=None):
    src = tmp_path / "raw"
    src.mkdir()
    (src / "train.txt").write_text(join_stories(train if train is not None else fake_stories(20, 1)))
    (src / "valid.txt").write_text(join_stories(valid if valid is not None else fake_stories(5, 2)))
    wiki = tmp_path / "wiki.txt"
    wiki.write_text(" = Heading = \n text line \n")
    return src, wiki


def test_local_source(tmp_path):
    src, wiki = _raw(tmp_path)
    stats = prepare(DataConfig(source=str(src), wikitext=str(wiki), max_train_stories=7), tmp_path / "out")
    assert stats["train_stories"] == 7 and stats["valid_stories"] == 5
    assert split_stories((tmp_path / "out" / "train.txt").read_text()) == fake_stories(20, 1)[:7]


def test_missing_raw_says_dvc_pull(tmp_path):
    with pytest.raises(DataError, match="dvc pull"):
        prepare(DataConfig(source=str(tmp_path / "nothing")), tmp_path / "out")


def test_empty_corpus(tmp_path):
    src, wiki = _raw(tmp_path, train=[])
    with pytest.raises(DataError, match="train split is empty"):
        prepare(DataConfig(source=str(src), wikitext=str(wiki)), tmp_path / "out")


def test_non_utf8_bytes(tmp_path):
    src, wiki = _raw(tmp_path)
    (src / "valid.txt").write_bytes(b"A story \xff\xfe here\n<|endoftext|>\n")
    with pytest.raises(DataError, match=r"not UTF-8.*0xff at offset 8"):
        prepare(DataConfig(source=str(src), wikitext=str(wiki)), tmp_path / "out")


def test_hub_path_with_local_dataset_files(tmp_path, monkeypatch):
    """source: hub goes through datasets.load_dataset; here pointed at local JSON files, offline."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    ds_dir = tmp_path / "TinyStories"
    ds_dir.mkdir()
    for split, stories in (("train", fake_stories(12, 1)), ("validation", fake_stories(4, 2))):
        with open(ds_dir / f"{split}.jsonl", "w") as f:
            for s in stories:
                f.write(json.dumps({"text": "  " + s + "\n"}) + "\n")
    _, wiki = _raw(tmp_path)
    cfg = DataConfig(source="hub", hub_name=str(ds_dir), max_train_stories=10, wikitext=str(wiki))
    stats = prepare(cfg, tmp_path / "out")
    assert stats["train_stories"] == 10 and stats["valid_stories"] == 4
    assert stats["source"] == f"hub:{ds_dir}"
    assert split_stories((tmp_path / "out" / "valid.txt").read_text()) == fake_stories(4, 2)


def test_hub_failure_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    _, wiki = _raw(tmp_path)
    with pytest.raises(DataError, match="could not load dataset"):
        prepare(DataConfig(source="hub", hub_name="no-such-owner/no-such-dataset", wikitext=str(wiki)), tmp_path / "o")


@pytest.mark.parametrize("text", ["", "\n \n"])
def test_wikitext_without_text_stops_the_data_stage(tmp_path, text):
    src, wiki = _raw(tmp_path)
    wiki.write_text(text)
    with pytest.raises(DataError, match=r"wiki\.txt: holds no text \(\d+ bytes\); WikiText-2 perplexity needs"):
        prepare(DataConfig(source=str(src), wikitext=str(wiki)), tmp_path / "out")
    assert not (tmp_path / "out").exists()  # stopped before writing anything


def test_one_story_and_two_word_wikitext_are_prepared(tmp_path):
    """Small but usable inputs pass the data stage; what they are too small for is said where it is
    known (the tokenizer's vocabulary, the evaluation window: see test_tokenizer, test_evaluate)."""
    src, wiki = _raw(tmp_path, train=["Once upon a time."])
    wiki.write_text("hello world")
    stats = prepare(DataConfig(source=str(src), wikitext=str(wiki)), tmp_path / "out")
    assert stats["train_stories"] == 1 and stats["wikitext2_bytes"] == 11
