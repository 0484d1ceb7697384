import numpy as np

from iteralite.data.corpus import EOT
from iteralite.data.tokenizer import (TokenizerConfig, eot_id, load_tokenizer, load_tokens, token_bytes,
                                 train_tokenizer)
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
