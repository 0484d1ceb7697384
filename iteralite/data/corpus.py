"""Corpus preparation: TinyStories train/valid (from a local folder or the Hugging Face hub) and
the WikiText-2 test text, written as plain text files with one `<|endoftext|>` line after each
story.

Three TinyStories splits come out: `train` (what the trainer sees), `dev` (carved out of the
source's training split: every calibration, sensitivity, importance, budget and selection decision
reads it) and `valid` (only ever reported). Training stories that also appear in the validation
split are dropped; the dev stories are chosen by the sha256 of their text (independent of file
order and of the data version's layout), and every training copy of a dev story is dropped, so
dev and valid are both disjoint from train.

The splits are streamed, never held whole: a local file is read chunk by chunk, a hub dataset is
the memory-mapped Arrow table `datasets` builds, iterated in batches. `prepare` reads each split
twice (once to choose the dev stories, once to write) and keeps only sha256 digests of the valid
stories and of the n_dev + 1 smallest training digests, so its memory does not grow with the
training split. `carve_dev` is the in-memory reference it is tested against.
"""
from __future__ import annotations

import hashlib
import heapq
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from iteralite.io.errors import DataError
from iteralite.io.atomic import atomic_path
from iteralite.io.params import check
from iteralite.io.text import decode_utf8

EOT = "<|endoftext|>"
_EOT_BYTES = EOT.encode("utf-8")
# Bytes read per chunk when streaming a story file, rows per batch when iterating a dataset: memory
# stays at one chunk (plus the longest story); a chunk of TinyStories is ~1000 stories, a batch
# big enough for the tokenizer's parallel encode_batch.
READ_BYTES = 1 << 20
DATASET_BATCH_ROWS = 1000

StoryBatches = Iterator[list[str]]


@dataclass
class DataConfig:
    """The `data` section. With `max_train_stories`/`max_valid_stories` set, a local split file is
    read only up to the chunk that holds its last kept story, so a bad byte further on is never read
    and is not an error."""

    source: str = "data/raw/tinystories"  # a folder with train.txt and valid.txt, or "hub"
    hub_name: str = "roneneldan/TinyStories"  # dataset id (or a local dataset folder) for source: hub
    max_train_stories: int = 0  # 0 = all; counted before the dev split is carved out
    max_valid_stories: int = 0
    dev_stories: int = 500  # carved out of the training split for every decision (never trained on)
    wikitext: str = "data/raw/wikitext-2/test.txt"

    def validate(self, section: str = "data") -> None:
        check(self.max_train_stories >= 0, section, "max_train_stories", "must be >= 0 (0 = all)")
        check(self.dev_stories >= 1, section, "dev_stories", "must be >= 1 (calibration and budgets read the dev split)")
        check(self.max_valid_stories >= 0, section, "max_valid_stories", "must be >= 0 (0 = all)")
        check(bool(self.source), section, "source", "must be a folder or 'hub'")


def _decode(raw: bytes, path: Path, offset: int = 0) -> str:
    """`raw` (found at byte `offset` of `path`) as UTF-8; a bad byte is a one-line DataError."""
    return decode_utf8(raw, str(path), DataError, offset)


def read_utf8(path: Path) -> str:
    return _decode(Path(path).read_bytes(), path)


def split_stories(text: str) -> list[str]:
    """Stories separated by `<|endoftext|>`, stripped, empty ones dropped."""
    return [s.strip() for s in text.split(EOT) if s.strip()]


def _story_record(story: bytes) -> bytes:
    """One story (UTF-8) as the story files hold it: the text, a newline, `<|endoftext|>`, a newline."""
    return story + b"\n" + _EOT_BYTES + b"\n"


def join_stories(stories: Iterable[str]) -> str:
    """The text of a story file holding `stories` (the in-memory twin of the streamed writers)."""
    return b"".join(_story_record(s.encode("utf-8")) for s in stories).decode("utf-8")


def iter_story_batches(path: str | Path, chunk_bytes: int | None = None,
                       on_read: Callable[[int], object] | None = None) -> StoryBatches:
    """The stories `split_stories(read_utf8(path))` gives, in batches (about one per chunk read),
    without holding the file. A chunk is cut after its last `<|endoftext|>`; that marker is ASCII,
    so each cut is a character boundary and a bad byte is reported at the same offset as a
    whole-file decode would. `on_read(n)` is called with the bytes of each chunk (a progress bar)."""
    path, chunk_bytes = Path(path), chunk_bytes or READ_BYTES
    buf, offset = bytearray(), 0  # buf starts at byte `offset` of the file
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            if on_read is not None:
                on_read(len(chunk))
            start = max(0, len(buf) - len(_EOT_BYTES) + 1)  # a marker may straddle the previous chunk
            buf += chunk
            cut = buf.rfind(_EOT_BYTES, start)
            if cut < 0:
                continue
            batch = split_stories(_decode(bytes(buf[:cut]), path, offset))
            del buf[:cut + len(_EOT_BYTES)]
            offset += cut + len(_EOT_BYTES)
            if batch:
                yield batch
    batch = split_stories(_decode(bytes(buf), path, offset))
    if batch:
        yield batch


def _limited(batches: StoryBatches, limit: int) -> StoryBatches:
    """The first `limit` stories (0 = all) of a stream of batches."""
    if not limit:
        yield from batches
        return
    for batch in batches:
        if len(batch) >= limit:
            yield batch[:limit]
            return
        limit -= len(batch)
        yield batch


def _missing_raw(path: Path) -> DataError:
    return DataError(f"{path} not found. The raw data comes from DVC: run `dvc pull` "
                     "(or `make repro`, which pulls it) from the repository root")


def _hub_split(name: str, split: str, limit: int):
    """One split of a dataset (`name`: a hub id or a local dataset folder) through `datasets`: an
    Arrow table memory-mapped from its cache, never a Python list of its texts."""
    import datasets

    spec = f"{split}[:{limit}]" if limit else split
    try:
        ds = datasets.load_dataset(name, split=spec)
    except Exception as e:
        raise DataError(f"could not load dataset {name!r} split {spec!r}: {e}") from None
    if "text" not in ds.column_names:
        raise DataError(f"dataset {name!r} has no 'text' column (columns: {ds.column_names})")
    return ds.select_columns(["text"])


def _dataset_batches(ds) -> StoryBatches:
    for rows in ds.iter(batch_size=DATASET_BATCH_ROWS):
        batch = [t.strip() for t in rows["text"] if t and t.strip()]
        if batch:
            yield batch


def _sources(cfg: DataConfig) -> tuple[Callable[[], StoryBatches], Callable[[], StoryBatches]]:
    """(train, valid): each call starts a fresh pass over that split's stories, limits applied."""
    if cfg.source == "hub":
        train_ds = _hub_split(cfg.hub_name, "train", cfg.max_train_stories)
        valid_ds = _hub_split(cfg.hub_name, "validation", cfg.max_valid_stories)
        return (lambda: _limited(_dataset_batches(train_ds), cfg.max_train_stories),
                lambda: _limited(_dataset_batches(valid_ds), cfg.max_valid_stories))
    train_path, valid_path = Path(cfg.source) / "train.txt", Path(cfg.source) / "valid.txt"
    for p in (train_path, valid_path):
        if not p.exists():
            raise _missing_raw(p)
    return (lambda: _limited(iter_story_batches(train_path), cfg.max_train_stories),
            lambda: _limited(iter_story_batches(valid_path), cfg.max_valid_stories))


def _digest(story: bytes) -> bytes:
    return hashlib.sha256(story).digest()


def carve_dev(train: list[str], valid: list[str], n_dev: int) -> tuple[list[str], list[str], dict]:
    """(train, dev, counts): training stories also in `valid` are dropped; `n_dev` distinct stories,
    the ones with the smallest sha256 of their text, become dev (in their original order); every
    training copy of a dev story is dropped. The in-memory reference of `prepare`'s streamed carve."""
    in_valid = set(valid)
    kept = [s for s in train if s not in in_valid]
    distinct = list(dict.fromkeys(kept))
    if n_dev >= len(distinct):
        raise _too_few_for_dev(n_dev, len(distinct))
    chosen = set(sorted(distinct, key=lambda s: hashlib.sha256(s.encode("utf-8")).digest())[:n_dev])
    dev = [s for s in distinct if s in chosen]
    rest = [s for s in kept if s not in chosen]
    return rest, dev, {"train_dropped_in_valid": len(train) - len(kept),
                       "train_dropped_dev_copies": len(kept) - len(rest) - n_dev}


def _too_few_for_dev(n_dev: int, n_distinct: int) -> DataError:
    return DataError(f"params: 'data.dev_stories' = {n_dev} leaves no training stories: the training split has "
                     f"{n_distinct} distinct stories not in the validation split; lower data.dev_stories")


def _scan_valid(batches: StoryBatches) -> tuple[set[bytes], int]:
    """(digests of the validation stories, how many stories)."""
    seen, n = set(), 0
    for batch in batches:
        n += len(batch)
        seen.update(_digest(s.encode("utf-8")) for s in batch)
    return seen, n


def _choose_dev(batches: StoryBatches, in_valid: set[bytes], n_dev: int) -> tuple[set[bytes], int, int]:
    """(digests of the dev stories, training stories read, distinct training stories not in valid
    counted up to n_dev + 1): the dev stories are the `n_dev` smallest sha256 digests of those
    distinct stories, found keeping only the n_dev + 1 smallest so far (one more than needed, to
    tell "exactly n_dev distinct" from "more")."""
    heap: list[int] = []  # -digest as an integer: heapq's min-heap holds the largest kept digest on top
    kept: set[int] = set()
    n = 0
    for batch in batches:
        n += len(batch)
        for s in batch:
            d = _digest(s.encode("utf-8"))
            if d in in_valid:
                continue
            key = int.from_bytes(d, "big")  # same order as the digests' bytes
            if key in kept:
                continue
            if len(heap) <= n_dev:
                heapq.heappush(heap, -key)
                kept.add(key)
            elif key < -heap[0]:
                kept.discard(-heapq.heapreplace(heap, -key))
                kept.add(key)
    width = hashlib.sha256().digest_size
    return {k.to_bytes(width, "big") for k in sorted(kept)[:n_dev]}, n, len(kept)


def _write_stories(batches: StoryBatches, path: Path) -> tuple[int, int]:
    """Stream stories into `path` (atomically) as `join_stories` lays them out; (stories, bytes)."""
    n = n_bytes = 0
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for batch in batches:
            raw = [s.encode("utf-8") for s in batch]
            f.write(b"".join(map(_story_record, raw)))
            n += len(raw)
            n_bytes += sum(map(len, raw))
    return n, n_bytes


def _write_train_dev(batches: StoryBatches, in_valid: set[bytes], dev: set[bytes], out_dir: Path) -> dict:
    """Second pass over the training split: each dev story's first copy goes to dev.txt, the rest
    of the stories not in valid to train.txt. Returns the stage's train/dev counts."""
    written: set[bytes] = set()
    n = {"train": 0, "dev": 0, "in_valid": 0, "dev_copies": 0}
    n_bytes = {"train": 0, "dev": 0}
    with atomic_path(out_dir / "train.txt") as train_tmp, atomic_path(out_dir / "dev.txt") as dev_tmp, \
            open(train_tmp, "wb") as train_f, open(dev_tmp, "wb") as dev_f:
        for batch in batches:
            out = {"train": [], "dev": []}
            for s in batch:
                raw = s.encode("utf-8")
                d = _digest(raw)
                if d in in_valid:
                    n["in_valid"] += 1
                elif d not in dev:
                    out["train"].append(raw)
                elif d in written:
                    n["dev_copies"] += 1
                else:
                    written.add(d)
                    out["dev"].append(raw)
            for split, f in (("train", train_f), ("dev", dev_f)):
                f.write(b"".join(map(_story_record, out[split])))
                n[split] += len(out[split])
                n_bytes[split] += sum(map(len, out[split]))
    return {"train_stories": n["train"], "train_bytes": n_bytes["train"], "dev_stories": n["dev"],
            "dev_bytes": n_bytes["dev"], "train_dropped_in_valid": n["in_valid"],
            "train_dropped_dev_copies": n["dev_copies"]}


def prepare(cfg: DataConfig, out_dir: str | Path = "data/prepared") -> dict:
    """Write train.txt, dev.txt, valid.txt and wikitext2_test.txt into `out_dir`; return statistics.
    Every check (missing or bad input, too few stories) runs before anything is written."""
    out_dir = Path(out_dir)
    train_src, valid_src = _sources(cfg)
    in_valid, n_valid = _scan_valid(valid_src())
    dev, n_train, n_distinct = _choose_dev(train_src(), in_valid, cfg.dev_stories)
    for split, n in (("train", n_train), ("valid", n_valid)):
        if not n:
            raise DataError(f"the {split} split is empty: no stories found in source {cfg.source!r}")
    if n_distinct <= cfg.dev_stories:  # then the count is exact: every distinct story was kept
        raise _too_few_for_dev(cfg.dev_stories, n_distinct)
    wiki = Path(cfg.wikitext)
    if not wiki.exists():
        raise _missing_raw(wiki)
    if not read_utf8(wiki).strip():  # fail early on bad bytes or no text: it is scored after training
        raise DataError(f"{wiki}: holds no text ({wiki.stat().st_size} bytes); WikiText-2 perplexity needs the "
                        "WikiText-2 test split there (run `dvc pull`, or point data.wikitext at it)")
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = _write_train_dev(train_src(), in_valid, dev, out_dir)
    n_valid, valid_bytes = _write_stories(valid_src(), out_dir / "valid.txt")
    stats = {k: counts[k] for k in ("train_stories", "train_bytes", "dev_stories", "dev_bytes")}
    stats.update(valid_stories=n_valid, valid_bytes=valid_bytes)
    with atomic_path(out_dir / "wikitext2_test.txt") as tmp:
        shutil.copyfile(wiki, tmp)
    stats["wikitext2_bytes"] = wiki.stat().st_size
    stats.update({k: counts[k] for k in ("train_dropped_in_valid", "train_dropped_dev_copies")})
    stats["source"] = cfg.source if cfg.source != "hub" else f"hub:{cfg.hub_name}"
    return stats
