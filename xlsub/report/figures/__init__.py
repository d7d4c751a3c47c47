"""Every figure xlsub logs, built with matplotlib's object API (`matplotlib.figure.Figure`), so that nothing
accumulates in pyplot's global state: a figure lives as long as its caller holds it, and `save_figure`
writes and releases it.

- `xlsub.report.figures.stages`: `perplexity_bars` (finetune), `head_mask_heatmap`, `matrix_heatmap` and
  `cross_perplexity_figures` (prune).
- `xlsub.report.figures.analysis`: the analyze stage's figures; each takes the tables of `xlsub.report.tables` (by table
  id) and returns {figure id: `CaptionedFigure`}: the figure, a one-line caption and the ids of the tables
  it shows.

One package, one module per stage: a stage's code version digests only the figure code it imports, so
a new caption in an analyze figure leaves finished finetune and prune runs reusable. One colour scale per
kind of number and one colour per language in every figure; languages are shown by name (`German`),
subnetworks as `German (seed 1)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import seaborn as sns
from matplotlib.figure import Figure

# One colour scale per kind of number, in every figure.
JACCARD_CMAP = "viridis"   # Jaccard, vmin 0 vmax 1
CKA_CMAP = "mako"          # CKA, vmin 0 vmax 1
PPL_CMAP = "rocket_r"      # raw perplexity, log scale
RATIO_CMAP = "vlag"        # perplexity / full-model perplexity, log scale centred at 1
SPREAD_CMAP = "Greys"      # standard deviations over seeds
MAX_ANNOTATED_COLUMNS = 12


class CaptionedFigure(NamedTuple):
    """A figure, its one-line caption, and the ids of the tables whose numbers it shows."""

    figure: Figure
    caption: str
    tables: tuple[str, ...]


def save_figure(fig: Figure, path: str | Path, dpi: int = 110) -> Path:
    """Write `fig` to `path` (format from the suffix, tight bounding box) and release it: its artists are
    cleared, and a figure pyplot manages is closed, so saving many figures does not accumulate them."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    if fig.canvas.manager is not None:  # made through pyplot: also drop pyplot's reference
        import matplotlib.pyplot as plt

        plt.close(fig)
    fig.clear()
    return path


# -- shared pieces ------------------------------------------------------------------------------------------

def palette(languages: Sequence[str]) -> dict[str, tuple]:
    """One colour per language, the same in every figure."""
    colours = sns.color_palette("colorblind", max(len(languages), 1))
    if len(languages) > 10:
        colours = sns.color_palette("husl", len(languages))
    return dict(zip(languages, colours))
