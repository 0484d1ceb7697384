"""Byte-level BPE (Hugging Face `tokenizers`) trained on the training split, and the token
arrays the trainer and evaluator read."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from iteralite.data.corpus import EOT, read_utf8, split_stories
from iteralite.io.errors import DataError
from iteralite.io.atomic import atomic_path
from iteralite.io.params import check

N_BYTES = 256


@dataclass
class TokenizerConfig:
    vocab_size: int = 2000
    min_frequency: int = 2

    def validate(self, section: str = "tokenizer") -> None:
        check(self.vocab_size >= N_BYTES + 1, section, "vocab_size",
              f"must be >= {N_BYTES + 1}: a byte-level BPE needs all {N_BYTES} byte symbols plus "
              f"{EOT}, got {self.vocab_size}")
        check(self.vocab_size <= 65535, section, "vocab_size", "must be <= 65535 (tokens are stored as uint16)")
        check(self.min_frequency >= 1, section, "min_frequency", "must be >= 1")


def train_tokenizer(cfg: TokenizerConfig, train_text: str) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency, special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    stories = split_stories(train_text)
    if not stories:
        raise DataError("cannot train a tokenizer on an empty corpus")
    tok.train_from_iterator(stories, trainer=trainer)
    # BPE stops early when no pair is seen min_frequency times: the model would then silently get
    # a smaller vocabulary than params.yaml asks for. Say what is too small instead.
    got = tok.get_vocab_size()
    if got < cfg.vocab_size:
        n_bytes = sum(len(s.encode("utf-8")) for s in stories)
        raise DataError(
            f"the training split ({len(stories)} {'story' if len(stories) == 1 else 'stories'}, {n_bytes} bytes) "
            f"is too small for 'tokenizer.vocab_size' = {cfg.vocab_size}: byte-level BPE found only {got} tokens "
            f"(merges need pairs seen >= tokenizer.min_frequency = {cfg.min_frequency} times); add training "
            f"stories (data.max_train_stories, data.source) or lower tokenizer.vocab_size to <= {got}")
    return tok


def save_tokenizer(tok: Tokenizer, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tok.save(str(tmp))


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: tokenizer not found (run `dvc repro tokenizer`)")
    return Tokenizer.from_file(str(path))


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def eot_id(tok: Tokenizer) -> int:
    return tok.token_to_id(EOT)


def token_bytes(tok: Tokenizer) -> np.ndarray:
    """Bytes each token stands for (V,); `<|endoftext|>` counts as 1 byte, the story separator."""
    byte_decoder = {c: b for b, c in _bytes_to_unicode().items()}
    out = np.zeros(tok.get_vocab_size(), dtype=np.int64)
    for piece, i in tok.get_vocab().items():
        out[i] = 1 if piece == EOT else sum(1 for ch in piece if ch in byte_decoder)
    return out


def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character map of byte-level BPE (GPT-2's convention)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def encode_stories(tok: Tokenizer, text: str) -> np.ndarray:
    """Each story's tokens followed by `<|endoftext|>`, concatenated (uint16)."""
    eot = eot_id(tok)
    ids: list[int] = []
    for enc in tok.encode_batch(split_stories(text), add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eot)
    return np.asarray(ids, dtype=np.uint16)


def encode_lines(tok: Tokenizer, text: str) -> np.ndarray:
    """Plain text (WikiText-2): encoded line by line so newlines are kept, concatenated."""
    lines = text.splitlines(keepends=True)
    ids: list[int] = []
    for enc in tok.encode_batch(lines, add_special_tokens=False):
        ids.extend(enc.ids)
    return np.asarray(ids, dtype=np.uint16)


def save_tokens(arr: np.ndarray, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, arr)


def load_tokens(path: str | Path) -> np.ndarray:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: token array not found (run `dvc repro tokenizer`)")
    return np.load(path, allow_pickle=False)


def build(cfg: TokenizerConfig, prepared: str | Path = "data/prepared", out_dir: str | Path = "data/tokenizer") -> dict:
    """Train the tokenizer on the training split only, encode train, dev, valid and WikiText-2,
    return metrics."""
    prepared, out_dir = Path(prepared), Path(out_dir)
    train_text = read_utf8(prepared / "train.txt")
    tok = train_tokenizer(cfg, train_text)
    save_tokenizer(tok, out_dir / "tokenizer.json")
    nbytes = token_bytes(tok)
    metrics = {"vocab_size": tok.get_vocab_size()}
    for name, fname, enc in (("train", "train.txt", encode_stories), ("dev", "dev.txt", encode_stories),
                             ("valid", "valid.txt", encode_stories),
                             ("wikitext2", "wikitext2_test.txt", encode_lines)):
        arr = enc(tok, train_text if name == "train" else read_utf8(prepared / fname))
        save_tokens(arr, out_dir / f"{name}.npy")
        metrics[f"{name}_tokens"] = int(arr.size)
        metrics[f"{name}_bytes_per_token"] = round(float(nbytes[arr.astype(np.int64)].sum()) / max(1, arr.size), 4)
    return metrics
