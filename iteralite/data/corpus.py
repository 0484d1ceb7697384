"""Corpus preparation: TinyStories train/valid (from a local folder or the Hugging Face hub) and
the WikiText-2 test text, written as plain text files with one `<|endoftext|>` line after each
story.

Three TinyStories splits come out: `train` (what the trainer sees), `dev` (carved out of the
source's training split: every calibration, sensitivity, importance, budget and selection decision
reads it) and `valid` (only ever reported). Training stories that also appear in the validation
split are dropped; the dev stories are chosen by the sha256 of their text (independent of file
order and of the data version's layout), and every training copy of a dev story is dropped, so
dev and valid are both disjoint from train.
"""
from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

from iteralite.io.errors import DataError
from iteralite.io.atomic import write_text
from iteralite.io.params import check

EOT = "<|endoftext|>"


@dataclass
class DataConfig:
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


def read_utf8(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (invalid byte 0x{raw[e.start]:02x} at offset {e.start})") from None


def split_stories(text: str) -> list[str]:
    """Stories separated by `<|endoftext|>`, stripped, empty ones dropped."""
    return [s.strip() for s in text.split(EOT) if s.strip()]


def join_stories(stories: list[str]) -> str:
    return "".join(f"{s}\n{EOT}\n" for s in stories)


def _missing_raw(path: Path) -> DataError:
    return DataError(f"{path} not found. The raw data comes from DVC: run `dvc pull` "
                     "(or `make repro`, which pulls it) from the repository root")


def _local_splits(folder: Path) -> tuple[list[str], list[str]]:
    out = []
    for name in ("train.txt", "valid.txt"):
        p = folder / name
        if not p.exists():
            raise _missing_raw(p)
        out.append(split_stories(read_utf8(p)))
    return out[0], out[1]


def _hub_splits(name: str, max_train: int, max_valid: int) -> tuple[list[str], list[str]]:
    """Load TinyStories through `datasets`; `name` is a hub id or a local dataset folder."""
    import datasets

    def take(split: str, limit: int) -> list[str]:
        spec = f"{split}[:{limit}]" if limit else split
        try:
            ds = datasets.load_dataset(name, split=spec)
        except Exception as e:
            raise DataError(f"could not load dataset {name!r} split {spec!r}: {e}") from None
        if "text" not in ds.column_names:
            raise DataError(f"dataset {name!r} has no 'text' column (columns: {ds.column_names})")
        return [t.strip() for t in ds["text"] if t and t.strip()]

    return take("train", max_train), take("validation", max_valid)


def carve_dev(train: list[str], valid: list[str], n_dev: int) -> tuple[list[str], list[str], dict]:
    """(train, dev, counts): training stories also in `valid` are dropped; `n_dev` distinct stories,
    the ones with the smallest sha256 of their text, become dev (in their original order); every
    training copy of a dev story is dropped."""
    in_valid = set(valid)
    kept = [s for s in train if s not in in_valid]
    distinct = list(dict.fromkeys(kept))
    if n_dev >= len(distinct):
        raise DataError(f"params: 'data.dev_stories' = {n_dev} leaves no training stories: the training split has "
                        f"{len(distinct)} distinct stories not in the validation split; lower data.dev_stories")
    chosen = set(sorted(distinct, key=lambda s: hashlib.sha256(s.encode("utf-8")).digest())[:n_dev])
    dev = [s for s in distinct if s in chosen]
    rest = [s for s in kept if s not in chosen]
    return rest, dev, {"train_dropped_in_valid": len(train) - len(kept),
                       "train_dropped_dev_copies": len(kept) - len(rest) - n_dev}


def prepare(cfg: DataConfig, out_dir: str | Path = "data/prepared") -> dict:
    """Write train.txt, dev.txt, valid.txt and wikitext2_test.txt into `out_dir`; return statistics."""
    out_dir = Path(out_dir)
    if cfg.source == "hub":
        train, valid = _hub_splits(cfg.hub_name, cfg.max_train_stories, cfg.max_valid_stories)
    else:
        train, valid = _local_splits(Path(cfg.source))
    if cfg.max_train_stories:
        train = train[: cfg.max_train_stories]
    if cfg.max_valid_stories:
        valid = valid[: cfg.max_valid_stories]
    for split, stories in (("train", train), ("valid", valid)):
        if not stories:
            raise DataError(f"the {split} split is empty: no stories found in source {cfg.source!r}")
    train, dev, dropped = carve_dev(train, valid, cfg.dev_stories)
    wiki = Path(cfg.wikitext)
    if not wiki.exists():
        raise _missing_raw(wiki)
    if not read_utf8(wiki).strip():  # fail early on bad bytes or no text: it is scored after training
        raise DataError(f"{wiki}: holds no text ({wiki.stat().st_size} bytes); WikiText-2 perplexity needs the "
                        "WikiText-2 test split there (run `dvc pull`, or point data.wikitext at it)")
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = {}
    for split, stories in (("train", train), ("dev", dev), ("valid", valid)):
        text = join_stories(stories)
        write_text(out_dir / f"{split}.txt", text)
        stats[f"{split}_stories"] = len(stories)
        stats[f"{split}_bytes"] = sum(len(s.encode("utf-8")) for s in stories)
    tmp = out_dir / ".wikitext2_test.txt.tmp"
    shutil.copyfile(wiki, tmp)
    tmp.replace(out_dir / "wikitext2_test.txt")
    stats["wikitext2_bytes"] = wiki.stat().st_size
    stats.update(dropped)
    stats["source"] = cfg.source if cfg.source != "hub" else f"hub:{cfg.hub_name}"
    return stats
