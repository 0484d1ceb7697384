"""Stage `data`: TinyStories train/valid and WikiText-2 test -> data/prepared/."""
from iteralite.data.corpus import DataConfig, prepare
from iteralite.io.params import load_section
from iteralite.pipeline import paths
from iteralite.pipeline.stage import run, write_metrics


def main():
    cfg = load_section(DataConfig, "data")
    write_metrics(paths.DATA_METRICS, prepare(cfg, paths.PREPARED_DIR))


if __name__ == "__main__":
    run("data", main)
