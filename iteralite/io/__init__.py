"""Files in and out, and the errors users see.

Modules:
    errors      IteraliteError and its kinds (params, data, checkpoint): one clear line, exit 2
    atomic      atomic writes (temporary file, then rename)
    params      params.yaml sections parsed into config dataclasses (unknown keys and wrong types
                are errors naming the key)
    checkpoint  safetensors checkpoints with a checked JSON header (config, quant config,
                tokenizer id, checksum); loading never unpickles
    compact     the compact checkpoint layout: one blob, a varint index, integer codes entropy-coded
    text        UTF-8 decoding with a one-line error naming the bad byte and its offset
    plotting    the one headless-pyplot and atomic-PNG helper every report uses
"""
