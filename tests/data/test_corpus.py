import json

import pytest

from iteralite.data.corpus import DataConfig, carve_dev, join_stories, prepare, split_stories
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
    stats = prepare(DataConfig(source=str(src), wikitext=str(wiki), max_train_stories=7, dev_stories=2),
                    tmp_path / "out")
    assert stats["train_stories"] == 5 and stats["dev_stories"] == 2 and stats["valid_stories"] == 5
    train = split_stories((tmp_path / "out" / "train.txt").read_text())
    dev = split_stories((tmp_path / "out" / "dev.txt").read_text())
    assert sorted(train + dev) == sorted(fake_stories(20, 1)[:7])  # the first 7 source stories, split in two


def test_missing_raw_says_dvc_pull(tmp_path):
    with pytest.raises(DataError, match="dvc pull"):
        prepare(DataConfig(source=str(tmp_path / "nothing")), tmp_path / "out")


def test_empty_corpus(tmp_path):
    src, wiki = _raw(tmp_path, train=[])
    with pytest.raises(DataError, match="train split is empty"):
        prepare(DataConfig(source=str(src), wikitext=str(wiki), dev_stories=2), tmp_path / "out")


def test_non_utf8_bytes(tmp_path):
    src, wiki = _raw(tmp_path)
    (src / "valid.txt").write_bytes(b"A story \xff\xfe here\n<|endoftext|>\n")
    with pytest.raises(DataError, match=r"not UTF-8.*0xff at offset 8"):
        prepare(DataConfig(source=str(src), wikitext=str(wiki), dev_stories=2), tmp_path / "out")


def test_hub_path_with_local_dataset_files(tmp_path, hub_offline):
    """source: hub goes through datasets.load_dataset; here pointed at local JSON files, offline."""
    ds_dir = tmp_path / "TinyStories"
    ds_dir.mkdir()
    for split, stories in (("train", fake_stories(12, 1)), ("validation", fake_stories(4, 2))):
        with open(ds_dir / f"{split}.jsonl", "w") as f:
            for s in stories:
                f.write(json.dumps({"text": "  " + s + "\n"}) + "\n")
    _, wiki = _raw(tmp_path)
    cfg = DataConfig(source="hub", hub_name=str(ds_dir), max_train_stories=10, dev_stories=3, wikitext=str(wiki))
    stats = prepare(cfg, tmp_path / "out")
    assert stats["train_stories"] == 7 and stats["dev_stories"] == 3 and stats["valid_stories"] == 4
    assert stats["source"] == f"hub:{ds_dir}"
    assert split_stories((tmp_path / "out" / "valid.txt").read_text()) == fake_stories(4, 2)


def test_hub_failure_is_a_clear_error(tmp_path, hub_offline):
    _, wiki = _raw(tmp_path)
    with pytest.raises(DataError, match="could not load dataset"):
        prepare(DataConfig(source="hub", hub_name="no-such-owner/no-such-dataset", wikitext=str(wiki)), tmp_path / "o")


@pytest.mark.parametrize("text", ["", "\n \n"])
def test_wikitext_without_text_stops_the_data_stage(tmp_path, text):
    src, wiki = _raw(tmp_path)
    wiki.write_text(text)
    with pytest.raises(DataError, match=r"wiki\.txt: holds no text \(\d+ bytes\); WikiText-2 perplexity needs"):
        prepare(DataConfig(source=str(src), wikitext=str(wiki), dev_stories=2), tmp_path / "out")
    assert not (tmp_path / "out").exists()  # stopped before writing anything


def test_one_story_and_two_word_wikitext(tmp_path):
    """A one-story corpus cannot give both a dev and a training split: the data stage says so. A
    2-word WikiText passes it; the evaluation window is checked where it is known (test_evaluate)."""
    src, wiki = _raw(tmp_path, train=["Once upon a time."])
    wiki.write_text("hello world")
    with pytest.raises(DataError, match="'data.dev_stories' = 1 leaves no training stories: the training split "
                                        "has 1 distinct stories"):
        prepare(DataConfig(source=str(src), wikitext=str(wiki), dev_stories=1), tmp_path / "out")
    (tmp_path / "b").mkdir()
    src2, _ = _raw(tmp_path / "b", train=fake_stories(3, 1))
    stats = prepare(DataConfig(source=str(src2), wikitext=str(wiki), dev_stories=1), tmp_path / "out")
    assert stats["train_stories"] == 2 and stats["wikitext2_bytes"] == 11


def test_dev_carve_is_deterministic_disjoint_and_order_free():
    train = fake_stories(50, 1)
    valid = fake_stories(5, 2) + [train[3]]  # one training story also in validation
    train = train + [train[10], train[10]]  # copies
    rest, dev, counts = carve_dev(train, valid, 8)
    assert len(dev) == 8 and len(set(dev)) == 8
    assert not set(dev) & set(rest) and not set(valid) & set(rest) and not set(valid) & set(dev)
    assert counts["train_dropped_in_valid"] == 1
    assert len(rest) + len(dev) + counts["train_dropped_dev_copies"] == len(train) - 1
    rest2, dev2, _ = carve_dev(list(reversed(train)), valid, 8)  # which stories: by content, not position
    assert set(dev2) == set(dev) and sorted(rest2) == sorted(rest)


def test_dev_stories_must_leave_training_stories():
    with pytest.raises(DataError, match="'data.dev_stories' = 5 leaves no training stories"):
        carve_dev(fake_stories(5, 1), [], 5)
