"""Stage `tokenizer`: byte-level BPE on the training split; encode train/valid/WikiText-2."""
from iteralite.io.params import load_section
from iteralite.pipeline.stage import run, write_metrics
from iteralite.data.tokenizer import TokenizerConfig, build


def main():
    cfg = load_section(TokenizerConfig, "tokenizer")
    write_metrics("metrics/tokenizer.json", build(cfg, "data/prepared", "data/tokenizer"))


if __name__ == "__main__":
    run("tokenizer", main)
