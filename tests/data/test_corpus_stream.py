"""The streamed data stage against its in-memory reference (`split_stories` of the whole file,
`carve_dev`, `join_stories`): same files, same statistics, on corpora with the awkward cases
(duplicates, stories also in valid, dev copies, blank stories, non-ASCII text, markers straddling
a chunk boundary), from a local folder and from a local dataset through the hub path."""
import json
import tracemalloc

import pytest

from iteralite.data import corpus
from iteralite.data.corpus import (DataConfig, carve_dev, iter_story_batches, join_stories, prepare, read_utf8,
                                   split_stories)
from iteralite.io.errors import DataError
from tests.conftest import fake_stories


def _awkward_corpus() -> tuple[list[str], list[str]]:
    """(train, valid) as lists of raw stories (unstripped, some blank)."""
    train = fake_stories(60, 1) + ["Émile ate crème brûlée — 日本 😀", "Line one\r\nline two"]
    valid = fake_stories(8, 2) + [train[5], train[7]]  # two training stories are also in valid
    train = train + [train[11]] * 3 + [train[5]] + ["   ", "\n"] + [" " + train[20] + "\n\n"]
    return train, valid


def _reference(train: list[str], valid: list[str], n_dev: int, max_train: int = 0, max_valid: int = 0):
    """What the data stage wrote before streaming: everything in memory."""
    train = split_stories(join_stories(train))
    valid = split_stories(join_stories(valid))
    train = train[:max_train] if max_train else train
    valid = valid[:max_valid] if max_valid else valid
    rest, dev, counts = carve_dev(train, valid, n_dev)
    return {"train": join_stories(rest), "dev": join_stories(dev), "valid": join_stories(valid)}, counts


def _write_raw(root, train, valid):
    src = root / "raw"
    src.mkdir()
    (src / "train.txt").write_bytes(join_stories(train).encode("utf-8"))
    (src / "valid.txt").write_bytes(join_stories(valid).encode("utf-8"))
    wiki = root / "wiki.txt"
    wiki.write_text(" = Heading = \n text line \n")
    return src, wiki


def _check_against_reference(out, stats, ref, counts):
    for split, text in ref.items():
        assert (out / f"{split}.txt").read_bytes() == text.encode("utf-8"), split
        assert stats[f"{split}_stories"] == len(split_stories(text))
        assert stats[f"{split}_bytes"] == sum(len(s.encode("utf-8")) for s in split_stories(text))
    for key, value in counts.items():
        assert stats[key] == value, key


@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 20])
def test_story_batches_equal_whole_file_split(tmp_path, chunk):
    train, _ = _awkward_corpus()
    path = tmp_path / "t.txt"
    path.write_bytes(join_stories(train).encode("utf-8") + b"  trailing story without a marker\n")
    streamed = [s for batch in iter_story_batches(path, chunk_bytes=chunk) for s in batch]
    assert streamed == split_stories(read_utf8(path))


@pytest.mark.parametrize("chunk", [5, 64, 1 << 20])
@pytest.mark.parametrize("limits", [(0, 0), (40, 6)])
def test_streamed_prepare_equals_in_memory_reference(tmp_path, monkeypatch, chunk, limits):
    monkeypatch.setattr(corpus, "READ_BYTES", chunk)
    train, valid = _awkward_corpus()
    src, wiki = _write_raw(tmp_path, train, valid)
    max_train, max_valid = limits
    cfg = DataConfig(source=str(src), wikitext=str(wiki), dev_stories=9, max_train_stories=max_train,
                     max_valid_stories=max_valid)
    stats = prepare(cfg, tmp_path / "out")
    ref, counts = _reference(train, valid, 9, max_train, max_valid)
    _check_against_reference(tmp_path / "out", stats, ref, counts)
    if not max_train:  # the awkward cases are really exercised
        assert counts["train_dropped_in_valid"] == 3 and stats["train_stories"] > 0
    assert (tmp_path / "out" / "wikitext2_test.txt").read_bytes() == wiki.read_bytes()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["dev.txt", "train.txt", "valid.txt",
                                                                     "wikitext2_test.txt"]  # no temp files left


def test_dev_copies_are_dropped_like_the_reference(tmp_path):
    """A corpus where the dev stories have training copies: the streamed carve drops them all."""
    train = fake_stories(30, 5)
    dev_ref = carve_dev(train, [], 4)[1]
    train = train + dev_ref * 2 + train[:3]
    src, wiki = _write_raw(tmp_path, train, fake_stories(3, 6))
    stats = prepare(DataConfig(source=str(src), wikitext=str(wiki), dev_stories=4), tmp_path / "out")
    ref, counts = _reference(train, fake_stories(3, 6), 4)
    assert counts["train_dropped_dev_copies"] >= 8
    _check_against_reference(tmp_path / "out", stats, ref, counts)


def test_too_few_distinct_stories_counts_them_exactly(tmp_path):
    a, b = fake_stories(2, 7)
    src, wiki = _write_raw(tmp_path, [a, a, b, a], fake_stories(2, 8))
    with pytest.raises(DataError, match="'data.dev_stories' = 2 leaves no training stories: the training split "
                                        "has 2 distinct stories"):
        prepare(DataConfig(source=str(src), wikitext=str(wiki), dev_stories=2), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_byte_deep_in_a_streamed_file_is_one_line_at_the_whole_file_offset(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "READ_BYTES", 64)
    train = fake_stories(40, 1)
    src, wiki = _write_raw(tmp_path, train, fake_stories(5, 2))
    raw = (src / "train.txt").read_bytes()
    cut = raw.index(train[30].encode()) + 3  # well past the first chunks
    (src / "train.txt").write_bytes(raw[:cut] + b"\xe2<|endoftext|>" + raw[cut:])  # a truncated 3-byte character
    with pytest.raises(DataError) as e:
        prepare(DataConfig(source=str(src), wikitext=str(wiki), dev_stories=2), tmp_path / "out")
    assert str(e.value) == f"{src / 'train.txt'}: not UTF-8 text (invalid byte 0xe2 at offset {cut})"
    with pytest.raises(DataError, match=f"0xe2 at offset {cut}"):  # the same offset the whole-file reader gives
        read_utf8(src / "train.txt")
    assert not (tmp_path / "out").exists()


def test_bytes_past_the_story_limit_are_not_read(tmp_path, monkeypatch):
    """With max_train_stories set the file is read only as far as the limit (DataConfig's
    docstring): a bad byte far past it is no error; without the limit it is."""
    monkeypatch.setattr(corpus, "READ_BYTES", 64)
    train = fake_stories(60, 1)
    src, wiki = _write_raw(tmp_path, train, fake_stories(5, 2))
    raw = (src / "train.txt").read_bytes()
    cut = raw.index(train[50].encode()) + 3
    (src / "train.txt").write_bytes(raw[:cut] + b"\xff" + raw[cut:])
    cfg = DataConfig(source=str(src), wikitext=str(wiki), dev_stories=2, max_train_stories=20)
    stats = prepare(cfg, tmp_path / "out")
    ref, counts = _reference(train, fake_stories(5, 2), 2, max_train=20)
    _check_against_reference(tmp_path / "out", stats, ref, counts)
    with pytest.raises(DataError, match=f"invalid byte 0xff at offset {cut}"):
        prepare(DataConfig(source=str(src), wikitext=str(wiki), dev_stories=2), tmp_path / "all")


def _dataset_folder(tmp_path, train, valid, column="text"):
    ds_dir = tmp_path / "TinyStories"
    ds_dir.mkdir()
    for split, stories in (("train", train), ("validation", valid)):
        with open(ds_dir / f"{split}.jsonl", "w") as f:
            for s in stories:
                f.write(json.dumps({column: s}) + "\n")
    return ds_dir


def test_hub_path_full_split_equals_local_folder_and_reference(tmp_path, monkeypatch, hub_offline):
    """source: hub with max_train_stories: 0 (the whole split, iterated in batches of Arrow rows)
    writes the same files as the same stories in a local folder, and as the in-memory reference."""
    monkeypatch.setattr(corpus, "DATASET_BATCH_ROWS", 7)  # several batches, a short last one
    train, valid = _awkward_corpus()
    ds_dir = _dataset_folder(tmp_path, train, valid)
    src, wiki = _write_raw(tmp_path, train, valid)
    hub = prepare(DataConfig(source="hub", hub_name=str(ds_dir), max_train_stories=0, dev_stories=9,
                             wikitext=str(wiki)), tmp_path / "hub")
    local = prepare(DataConfig(source=str(src), dev_stories=9, wikitext=str(wiki)), tmp_path / "local")
    assert hub.pop("source") == f"hub:{ds_dir}" and local.pop("source") == str(src)
    assert hub == local
    for split in ("train", "dev", "valid", "wikitext2_test"):
        assert (tmp_path / "hub" / f"{split}.txt").read_bytes() == (tmp_path / "local" / f"{split}.txt").read_bytes()
    ref, counts = _reference(train, valid, 9)
    _check_against_reference(tmp_path / "hub", hub, ref, counts)


def test_hub_dataset_without_text_column_is_one_line(tmp_path, hub_offline):
    ds_dir = _dataset_folder(tmp_path, fake_stories(5, 1), fake_stories(2, 2), column="story")
    _, wiki = _write_raw(tmp_path, [], [])
    with pytest.raises(DataError) as e:
        prepare(DataConfig(source="hub", hub_name=str(ds_dir), wikitext=str(wiki)), tmp_path / "out")
    assert "has no 'text' column (columns: ['story'])" in str(e.value) and "\n" not in str(e.value)


def test_memory_does_not_grow_with_the_training_split(tmp_path, monkeypatch):
    """Python allocations stay near one read chunk, far below the split's size."""
    chunk = 1 << 14
    monkeypatch.setattr(corpus, "READ_BYTES", chunk)
    train = fake_stories(10000, 9)
    src, wiki = _write_raw(tmp_path, train, fake_stories(20, 2))
    size = (src / "train.txt").stat().st_size
    tracemalloc.start()
    try:
        prepare(DataConfig(source=str(src), wikitext=str(wiki), dev_stories=10), tmp_path / "out")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert size > 40 * chunk and peak < size / 4, (size, peak)
