import numpy as np
import pytest

from iteralite.data.corpus import EOT
from iteralite.data.tokenizer import (TokenizerConfig, build, eot_id, load_tokenizer, load_tokens, token_bytes,
                                      train_tokenizer)
from iteralite.io.errors import DataError
from iteralite.data.corpus import join_stories
from tests.conftest import fake_stories


def test_build_outputs(tok_dir):
    tok = load_tokenizer(tok_dir / "tokenizer.json")
    assert tok.get_vocab_size() == 300
    assert tok.token_to_id(EOT) is not None
    train = load_tokens(tok_dir / "train.npy")
    assert train.dtype == np.uint16 and (train == eot_id(tok)).sum() == 300


def test_token_bytes_match_utf8_length():
    text = join_stories(fake_stories(50) + ["Émile ate crème brûlée — 日本 😀"])
    tok = train_tokenizer(TokenizerConfig(vocab_size=300), text)
    nb = token_bytes(tok)
    for s in ["The cat ran.", "Émile ate crème brûlée — 日本 😀", "unseen ☃ chars ∑"]:
        ids = tok.encode(s, add_special_tokens=False).ids
        assert nb[ids].sum() == len(s.encode("utf-8"))
        assert tok.decode(ids) == s
    assert nb[eot_id(tok)] == 1


def test_one_story_corpus_is_too_small_for_the_vocabulary():
    with pytest.raises(DataError, match=r"the training split \(1 story, 17 bytes\) is too small for "
                                        r"'tokenizer.vocab_size' = 2000: byte-level BPE found only \d+ tokens.*"
                                        r"lower tokenizer.vocab_size to <= \d+"):
        train_tokenizer(TokenizerConfig(vocab_size=2000), join_stories(["Once upon a time."]))


def test_tokenizer_stage_stops_on_a_one_story_corpus_before_writing(tmp_path):
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    (prepared / "train.txt").write_text(join_stories(["Once upon a time."]))
    (prepared / "valid.txt").write_text(join_stories(fake_stories(5)))
    (prepared / "wikitext2_test.txt").write_text("hello world")
    with pytest.raises(DataError, match="too small for 'tokenizer.vocab_size' = 300"):
        build(TokenizerConfig(vocab_size=300), prepared, tmp_path / "tokenizer")
    assert not (tmp_path / "tokenizer").exists()


def test_two_word_wikitext_is_encoded(tmp_path):
    """A 2-word WikiText file tokenizes; whether it holds an evaluation window is checked when the
    Evaluator is built, at the start of training (eval.seq_len is not a param of this stage)."""
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    (prepared / "train.txt").write_text(join_stories(fake_stories(300, 1)))
    (prepared / "valid.txt").write_text(join_stories(fake_stories(5)))
    (prepared / "dev.txt").write_text(join_stories(fake_stories(4, 3)))
    (prepared / "wikitext2_test.txt").write_text("hello world")
    metrics = build(TokenizerConfig(vocab_size=300), prepared, tmp_path / "tokenizer")
    assert 2 <= metrics["wikitext2_tokens"] <= 11
    assert metrics["dev_tokens"] > 0 and (tmp_path / "tokenizer" / "dev.npy").exists()
