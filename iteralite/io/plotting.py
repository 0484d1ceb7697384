"""The one plotting helper every report uses: a headless pyplot and an atomic PNG save."""
from __future__ import annotations

from iteralite.io.atomic import atomic_path


def pyplot():
    """matplotlib.pyplot on the Agg backend (the pipeline's machines have no display)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_png(fig, path, dpi: int = 110) -> None:
    """Write `fig` to `path` as PNG atomically (temporary file, then rename) and close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    pyplot().close(fig)
