"""Byte-level BPE (Hugging Face `tokenizers`) trained on the training split, and the token
arrays the trainer and evaluator read.

The story files are streamed: the BPE trains from an iterator over batches of stories, and each
split is encoded batch by batch (`encode_batch`) into its .npy, so memory does not grow with the
split. `encode_stories` (one text in, one array out) is the in-memory reference."""
from __future__ import annotations

import hashlib
import io
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from iteralite.data.corpus import EOT, iter_story_batches, read_utf8, split_stories
from iteralite.io.errors import DataError
from iteralite.io.atomic import atomic_path
from iteralite.io.params import check

N_BYTES = 256
TOKEN_DTYPE = np.dtype("<u2")  # uint16, as np.save writes it on this (little-endian) machine


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
    return train_tokenizer_batches(cfg, [split_stories(train_text)])


def train_tokenizer_batches(cfg: TokenizerConfig, batches: Iterable[list[str]]) -> Tokenizer:
    """Train on a stream of story batches (read once, never held whole)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency, special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    batches = (b for b in batches if b)
    first = next(batches, None)
    if first is None:
        raise DataError("cannot train a tokenizer on an empty corpus")
    seen = {"stories": 0, "bytes": 0}  # for the error below, counted as the trainer reads

    def counted() -> Iterator[list[str]]:
        for batch in itertools.chain([first], batches):
            seen["stories"] += len(batch)
            seen["bytes"] += sum(len(s.encode("utf-8")) for s in batch)
            yield batch

    tok.train_from_iterator(counted(), trainer=trainer)
    # BPE stops early when no pair is seen min_frequency times: the model would then silently get
    # a smaller vocabulary than params.yaml asks for. Say what is too small instead.
    got = tok.get_vocab_size()
    if got < cfg.vocab_size:
        n = seen["stories"]
        raise DataError(
            f"the training split ({n} {'story' if n == 1 else 'stories'}, {seen['bytes']} bytes) "
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


def encode_story_batch(tok: Tokenizer, stories: list[str]) -> np.ndarray:
    """Each story's tokens followed by `<|endoftext|>`, concatenated (uint16); stories are encoded
    one by one (in parallel), so any split into batches gives the same tokens."""
    eot = eot_id(tok)
    ids: list[int] = []
    for enc in tok.encode_batch_fast(stories, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eot)
    return np.asarray(ids, dtype=TOKEN_DTYPE)


def encode_stories(tok: Tokenizer, text: str) -> np.ndarray:
    """Each story's tokens followed by `<|endoftext|>`, concatenated (uint16)."""
    return encode_story_batch(tok, split_stories(text))


def encode_lines(tok: Tokenizer, text: str) -> np.ndarray:
    """Plain text (WikiText-2): encoded line by line so newlines are kept, concatenated."""
    lines = text.splitlines(keepends=True)
    ids: list[int] = []
    for enc in tok.encode_batch_fast(lines, add_special_tokens=False):
        ids.extend(enc.ids)
    return np.asarray(ids, dtype=TOKEN_DTYPE)


def _npy_header(n: int) -> bytes:
    """The header np.save writes for a 1-D uint16 array of `n` tokens."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(TOKEN_DTYPE),
                                               "fortran_order": False, "shape": (n,)})
    return buf.getvalue()


class TokenWriter:
    """A 1-D uint16 .npy written chunk by chunk, byte-identical to `np.save` of the whole array.
    The header goes in last, over a placeholder: np.save pads it to a fixed multiple of 64 bytes,
    the same length for any count an array could have (checked, not assumed)."""

    def __init__(self, f):
        self.f, self.n = f, 0
        f.write(_npy_header(0))

    def write(self, ids: np.ndarray) -> None:
        self.f.write(np.ascontiguousarray(ids, dtype=TOKEN_DTYPE).tobytes())
        self.n += ids.size

    def finish(self) -> None:
        header = _npy_header(self.n)
        if len(header) != len(_npy_header(0)):
            raise DataError(f"{self.n} tokens do not fit a fixed-length .npy header")
        self.f.seek(0)
        self.f.write(header)


def save_tokens(arr: np.ndarray, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, arr)


def load_tokens(path: str | Path) -> np.ndarray:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: token array not found (run `dvc repro tokenizer`)")
    return np.load(path, allow_pickle=False)


def _prepared_batches(path: Path, desc: str, progress: bool) -> Iterator[list[str]]:
    """Story batches of a prepared file, with a progress bar (bytes read) on stderr."""
    if not path.exists():
        raise DataError(f"{path} not found (run `dvc repro data`)")
    with tqdm(total=path.stat().st_size, desc=desc, unit="B", unit_scale=True, disable=not progress,
              dynamic_ncols=True) as bar:
        yield from iter_story_batches(path, on_read=bar.update)


def encode_file(tok: Tokenizer, src: str | Path, dst: str | Path, nbytes: np.ndarray,
                progress: bool = False) -> tuple[int, int]:
    """Encode a story file into `dst` (.npy, atomically) batch by batch; (tokens, bytes they stand
    for, by `nbytes` = token_bytes(tok))."""
    total = 0
    with atomic_path(dst) as tmp, open(tmp, "wb") as f:
        out = TokenWriter(f)
        for batch in _prepared_batches(Path(src), f"encode {Path(src).name}", progress):
            ids = encode_story_batch(tok, batch)
            out.write(ids)
            total += int(nbytes[ids].sum())
        out.finish()
    return out.n, total


def build(cfg: TokenizerConfig, prepared: str | Path = "data/prepared", out_dir: str | Path = "data/tokenizer",
          progress: bool = True) -> dict:
    """Train the tokenizer on the training split only, encode train, dev, valid and WikiText-2,
    return metrics."""
    prepared, out_dir = Path(prepared), Path(out_dir)
    tok = train_tokenizer_batches(cfg, _prepared_batches(prepared / "train.txt", "train BPE", progress))
    save_tokenizer(tok, out_dir / "tokenizer.json")
    from iteralite.data.tokbin import write_tokbin

    write_tokbin(tok, out_dir / "tokenizer.bin")  # the same tokenizer for the C runtime (data.tokbin)
    nbytes = token_bytes(tok)
    metrics = {"vocab_size": tok.get_vocab_size(), "tokenizer_bin_bytes": (out_dir / "tokenizer.bin").stat().st_size}

    def add(name: str, n_tokens: int, n_bytes: int) -> None:
        metrics[f"{name}_tokens"] = n_tokens
        metrics[f"{name}_bytes_per_token"] = round(float(n_bytes) / max(1, n_tokens), 4)

    for name in ("train", "dev", "valid"):
        add(name, *encode_file(tok, prepared / f"{name}.txt", out_dir / f"{name}.npy", nbytes, progress))
    # WikiText-2's test text is small and fixed: encoded in one go, line by line
    wiki = prepared / "wikitext2_test.txt"
    if not wiki.exists():
        raise DataError(f"{wiki} not found (run `dvc repro data`)")
    arr = encode_lines(tok, read_utf8(wiki))
    save_tokens(arr, out_dir / "wikitext2.npy")
    add("wikitext2", int(arr.size), int(nbytes[arr].sum()))
    return metrics
