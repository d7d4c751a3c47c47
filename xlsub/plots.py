"""Figures xlsub logs. Each function returns a matplotlib Figure; the caller logs and closes it."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # no screen on servers and CI
import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns


def perplexity_bars(table: pd.DataFrame) -> plt.Figure:
    """Grouped bars of perplexity per language: before and after fine-tuning, and the unigram floor.

    `table` has a `lang` column and one column per kind (ppl_before, ppl_after, ppl_unigram).
    """
    kinds = [c for c in ("ppl_before", "ppl_after", "ppl_unigram") if c in table]
    long = table.melt(id_vars="lang", value_vars=kinds, var_name="model", value_name="perplexity")
    long["model"] = long["model"].map({"ppl_before": "before", "ppl_after": "after", "ppl_unigram": "unigram"})
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(table), 4))
    sns.barplot(data=long, x="lang", y="perplexity", hue="model", ax=ax, palette="colorblind")
    ax.set_yscale("log")
    ax.set_xlabel("language")
    ax.set_ylabel("masked-token perplexity (log scale)")
    ax.set_title("Perplexity on each language's test set")
    ax.legend(title=None)
    fig.tight_layout()
    return fig
