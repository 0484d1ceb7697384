"""iteralite: a tiny state-space + mixture-of-experts language model, trained and compressed
for CPU inference as a reproducible DVC pipeline."""

__version__ = "0.1.0"
