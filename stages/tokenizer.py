"""Stage `tokenizer`: byte-level BPE on the training split; encode train/valid/WikiText-2."""
from iteralite.data.tokenizer import TokenizerConfig, build
from iteralite.io.params import load_section
from iteralite.pipeline import paths
from iteralite.pipeline.stage import run, write_metrics


def main():
    cfg = load_section(TokenizerConfig, "tokenizer")
    write_metrics(paths.TOKENIZER_METRICS, build(cfg, paths.PREPARED_DIR, paths.TOKENIZER_DIR))


if __name__ == "__main__":
    run("tokenizer", main)
