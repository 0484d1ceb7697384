"""Text in, token ids out.

Modules:
    corpus     reading and preparing the corpora: TinyStories train/valid (a local folder or the
               hub's `roneneldan/TinyStories`), WikiText-2 test, story splitting and joining
    tokenizer  the byte-level BPE tokenizer (training, loading, its sha256) and the token arrays
               (`train.npy`, ...) every later stage reads
"""
