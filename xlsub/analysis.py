"""The analyze stage: how much the languages' subnetworks and representations share, as figures, tables
and a few summary numbers.

`analyze(AnalysisInputs)` runs every analysis whose inputs are present and returns an `AnalysisResult`:
figures (matplotlib), one-line captions, CSV-ready tables and metrics. It works on in-memory inputs; the
entry point loads them from the prune and encode runs and logs what comes back (`xlsub.report` writes
the files and `report.html`).

What is measured, and against which control:
- head-mask overlap between languages (Jaccard), against the exact Jaccard expected from random masks
  keeping as many heads per layer (`xlsub.overlap`); with several pruning seeds, the mean and spread
  over seed pairs and each language's agreement with itself across seeds;
- the share of heads and of attention parameters kept in each layer;
- the cross-language perplexity matrix (subnetwork x evaluation language), raw and relative to the full
  model, against random masks of the same size per layer;
- CKA (Kornblith et al. 2019) between the reference language (English) and every other language per
  layer of the full model, between all pairs at chosen layers, and between the full model and each
  subnetwork; controls: non-parallel pairings (`shuffled_pairs_cka`), a randomly initialised model and
  the model before finetuning;
- token overlap with English, the shared-vocabulary rival explanation.

Layers: CKA layer l is hidden state l (0 = embeddings, l >= 1 = output of transformer layer l); head
masks are labelled the same way, so mask layer 1 is the first transformer layer.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations, product

import numpy as np
import pandas as pd
import seaborn as sns
import torch
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from tqdm.auto import tqdm

from xlsub.cka import KINDS, check_options, cka_matrix, shuffled_pairs_cka
from xlsub.errors import XlsubError
from xlsub.overlap import (
    expected_random_jaccard,
    expected_random_jaccard_matrix,
    jaccard_matrix,
    mean_std_over_seeds,
    params_kept_per_layer,
    proportion_kept_per_layer,
    seed_stability,
    token_overlap,
)

log = logging.getLogger(__name__)

# One colour scale per kind of number, in every figure.
JACCARD_CMAP = "viridis"   # Jaccard, vmin 0 vmax 1
CKA_CMAP = "mako"          # CKA, vmin 0 vmax 1
PPL_CMAP = "rocket_r"      # raw perplexity, log scale
RATIO_CMAP = "vlag"        # perplexity / full-model perplexity, log scale centred at 1
SPREAD_CMAP = "Greys"      # standard deviations over seeds
MAX_ANNOTATED_COLUMNS = 12
LANGUAGE_NAMES = {
    "en": "English", "es": "Spanish", "ru": "Russian", "de": "German", "zh": "Chinese", "ar": "Arabic",
    "hi": "Hindi", "ur": "Urdu", "fr": "French", "it": "Italian", "pt": "Portuguese", "ja": "Japanese",
    "ko": "Korean", "tr": "Turkish", "vi": "Vietnamese", "th": "Thai", "sw": "Swahili", "el": "Greek",
    "bg": "Bulgarian", "fa": "Persian", "he": "Hebrew", "id": "Indonesian", "nl": "Dutch", "pl": "Polish",
}
_SUB_KEY = re.compile(r"^sub_(?P<lang>.+?)(?:_seed(?P<seed>-?\d+))?$")
_CONTROLS = {  # model key or pairing -> legend label, line style
    "parallel": ("parallel sentences, full model", "-"),
    "shuffled": ("shuffled (non-parallel) pairs, full model", "--"),
    "base": ("parallel, model before finetuning", "-."),
    "random": ("parallel, randomly initialised model", ":"),
}


@dataclass
class AnalysisInputs:
    """Everything `analyze` reads. Sections whose inputs are empty are skipped (and said so in `notes`).

    - `languages`: ISO codes in display order; the reference for "vs English" is `en`, or the first
      language when English is absent.
    - `masks`: {(language, pruning seed): [layers, heads] 0/1 mask}, one or several seeds per language.
    - `cross_ppl`, `cross_ppl_random`: subnetwork x evaluation language perplexities of the subnetworks
      and of their random-mask controls; rows named `de` or `de/seed1` as the prune stage logs them.
    - `ppl_full`: the full model's perplexity per evaluation language.
    - `encodings`: {model key: {language: [layers+1, n, d]}}, keys `full`, `sub_<lang>` or
      `sub_<lang>_seed<k>`, optionally `base` and `random`; row i is the same sentence in every language.
    - `tokens`: {language: token ids per sentence}, special tokens removed, sentences parallel.
    - `hidden_size`, `head_dim`: for the share of attention parameters kept.
    - `shuffle_seed`: the derangement of the non-parallel CKA control.
    """

    languages: list[str]
    masks: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    cross_ppl: pd.DataFrame | None = None
    cross_ppl_random: pd.DataFrame | None = None
    ppl_full: dict[str, float] = field(default_factory=dict)
    encodings: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    tokens: dict[str, list[list[int]]] = field(default_factory=dict)
    hidden_size: int | None = None
    head_dim: int | None = None
    shuffle_seed: int = 0

    @property
    def reference(self) -> str:
        """The language the "vs English" analyses compare with: `en`, else the first language."""
        return "en" if "en" in self.languages else self.languages[0]


@dataclass
class AnalysisResult:
    """Figures by file name (`mask_jaccard.png`), a one-line caption for each, tables by file name
    (`mask_jaccard.csv`), the tables behind each figure, summary metrics, and what was skipped."""

    figures: dict[str, Figure] = field(default_factory=dict)
    captions: dict[str, str] = field(default_factory=dict)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    figure_tables: dict[str, list[str]] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add_figure(self, name: str, figure: Figure, caption: str, tables: Mapping[str, pd.DataFrame]) -> None:
        self.figures[name] = figure
        self.captions[name] = caption
        self.tables.update(tables)
        self.figure_tables[name] = list(tables)


# -- naming ---------------------------------------------------------------------------------------------

def language_name(lang: str) -> str:
    """`German` for `de`; unknown codes stay codes."""
    return LANGUAGE_NAMES.get(lang, lang)


def parse_model_key(key: str) -> tuple[str, str | None, int | None]:
    """`sub_de_seed1` -> ("sub", "de", 1); `sub_de` -> ("sub", "de", None); `full` -> ("full", None, None)."""
    match = _SUB_KEY.match(key)
    if match is None:
        return key, None, None
    seed = match.group("seed")
    return "sub", match.group("lang"), None if seed is None else int(seed)


def subnetwork_language(name: str) -> str:
    """The language of a subnetwork row name as the prune stage writes it: `de` or `de/seed1` -> `de`."""
    return name.split("/", 1)[0]


def _ordered(present, languages: Sequence[str]) -> list[str]:
    """The languages of `present` in `languages` order, any others after them in their own order."""
    present = list(present)
    return [l for l in languages if l in present] + [l for l in present if l not in languages]


def _layer_label(layer: int, last: int) -> str:
    return "layer 0 (embeddings)" if layer == 0 else f"layer {layer}" + (" (last)" if layer == last else "")


# -- head masks ---------------------------------------------------------------------------------------------

def group_masks(masks: Mapping[tuple[str, int], torch.Tensor], languages: Sequence[str]) -> dict[str, dict[int, torch.Tensor]]:
    """{(lang, seed): mask} -> {lang: {seed: mask}}, languages in `languages` order, seeds sorted."""
    grouped: dict[str, dict[int, torch.Tensor]] = {}
    for (lang, seed), mask in masks.items():
        grouped.setdefault(lang, {})[seed] = mask
    return {lang: dict(sorted(grouped[lang].items())) for lang in _ordered(grouped, languages)}


def _several_seeds(grouped: Mapping[str, Mapping[int, torch.Tensor]]) -> bool:
    return any(len(seeds) > 1 for seeds in grouped.values())


def expected_jaccard_over_seeds(grouped: Mapping[str, Mapping[int, torch.Tensor]]) -> pd.DataFrame:
    """The chance level of `mean_std_over_seeds`' mean: `expected_random_jaccard` averaged over the same
    seed pairs (every seed pair (s, t) across two languages; distinct pairs s < t within one)."""
    langs = list(grouped)
    index = pd.Index(langs, name="language")
    table = pd.DataFrame(np.nan, index=index, columns=index.copy())
    for i, a in enumerate(langs):
        for b in langs[i:]:
            pairs = combinations(grouped[a].values(), 2) if a == b else product(grouped[a].values(), grouped[b].values())
            values = [expected_random_jaccard(x, y) for x, y in pairs]
            table.loc[a, b] = table.loc[b, a] = float(np.mean(values)) if values else math.nan
    return table


def mask_overlap_tables(masks: Mapping[tuple[str, int], torch.Tensor], languages: Sequence[str]) -> dict[str, pd.DataFrame]:
    """Jaccard of kept heads between languages and its random-mask chance level.

    One seed: `mask_jaccard.csv` (`jaccard_matrix`, diagonal 1) and `mask_jaccard_expected.csv`
    (`expected_random_jaccard_matrix`). Several seeds: the mean over seed pairs (`mean_std_over_seeds`;
    the diagonal is then a language's agreement with itself across seeds), its chance level over the same
    pairs, `mask_jaccard_std.csv` and `mask_seed_stability.csv` (within-language mean, std, pairs and the
    chance level `expected`).
    """
    grouped = group_masks(masks, languages)
    order = list(grouped)
    if not _several_seeds(grouped):
        single = {lang: next(iter(seeds.values())) for lang, seeds in grouped.items()}
        return {"mask_jaccard.csv": jaccard_matrix(single), "mask_jaccard_expected.csv": expected_random_jaccard_matrix(single)}
    mean, std = mean_std_over_seeds(masks)
    expected = expected_jaccard_over_seeds(grouped)
    stability = seed_stability(masks).reindex(order)
    stability["expected"] = [expected.loc[lang, lang] for lang in order]
    return {"mask_jaccard.csv": mean.loc[order, order], "mask_jaccard_expected.csv": expected,
            "mask_jaccard_std.csv": std.loc[order, order], "mask_seed_stability.csv": stability}


def heads_kept_tables(masks: Mapping[tuple[str, int], torch.Tensor], languages: Sequence[str],
                      hidden_size: int | None = None, head_dim: int | None = None) -> dict[str, pd.DataFrame]:
    """Share of heads (`heads_kept_per_layer.csv`) and of attention parameters (`params_kept_per_layer.csv`,
    when `hidden_size` and `head_dim` are given) kept in each layer: the mean over a layer's heads
    (`proportion_kept_per_layer`), not the study's sum over layers. Columns are layers 1..L (mask row 0 is
    transformer layer 1); rows are languages, or (language, seed) with several seeds.
    """
    grouped = group_masks(masks, languages)
    keys = [(lang, seed) for lang, seeds in grouped.items() for seed in seeds]
    flat = {str(i): grouped[lang][seed] for i, (lang, seed) in enumerate(keys)}
    if _several_seeds(grouped):
        index = pd.MultiIndex.from_tuples(keys, names=["language", "seed"])
    else:
        index = pd.Index([lang for lang, _ in keys], name="language")
    tables = {"heads_kept_per_layer.csv": proportion_kept_per_layer(flat)}
    if hidden_size and head_dim:
        tables["params_kept_per_layer.csv"] = params_kept_per_layer(flat, hidden_size, head_dim)
    for table in tables.values():
        table.index = index
        table.columns = pd.RangeIndex(1, table.shape[1] + 1, name="layer")
    return tables


# -- perplexity -----------------------------------------------------------------------------------------

def _mean_over_seeds(table: pd.DataFrame, languages: Sequence[str]) -> pd.DataFrame:
    """Rows `de`, `de/seed1`, ... -> one row per subnetwork language (the mean over its seeds)."""
    means = table.groupby(table.index.map(subnetwork_language), sort=False).mean()
    rows = _ordered(means.index, languages)
    means = means.loc[rows, _ordered(table.columns, languages)]
    means.index.name, means.columns.name = "subnetwork", "evaluated on"
    return means


def relative_perplexity(cross: pd.DataFrame, ppl_full: Mapping[str, float]) -> pd.DataFrame:
    """Subnetwork perplexity / full-model perplexity on the same evaluation language (columns)."""
    missing = [c for c in cross.columns if c not in ppl_full]
    if missing:
        raise XlsubError(f"ppl_full: no full-model perplexity for {missing}; pass one for every evaluation language")
    return cross / pd.Series({c: float(ppl_full[c]) for c in cross.columns})


def perplexity_tables(cross: pd.DataFrame, cross_random: pd.DataFrame | None, ppl_full: Mapping[str, float],
                      languages: Sequence[str]) -> dict[str, pd.DataFrame]:
    """The cross-language perplexity matrix, raw (`cross_ppl.csv`, first row `full` = the full model) and
    relative to the full model (`cross_ppl_relative.csv`), the same for the random-mask control
    (`cross_ppl_random*.csv`). With several seeds a subnetwork row is the mean over its seeds; the
    per-seed rows are kept in `*_by_seed.csv`."""
    tables = {}
    for stem, table in (("cross_ppl", cross), ("cross_ppl_random", cross_random)):
        if table is None or table.empty:
            continue
        by_language = _mean_over_seeds(table, languages)
        full_row = pd.DataFrame([[float(ppl_full.get(c, math.nan)) for c in by_language.columns]],
                                index=["full"], columns=by_language.columns)
        raw = pd.concat([full_row, by_language])
        raw.index.name = "subnetwork"
        tables[f"{stem}.csv"] = raw
        tables[f"{stem}_relative.csv"] = relative_perplexity(by_language, ppl_full)
        if len(by_language) != len(table):
            by_seed = table.loc[:, by_language.columns].copy()
            by_seed.index.name, by_seed.columns.name = "subnetwork", "evaluated on"
            tables[f"{stem}_by_seed.csv"] = by_seed
    return tables


def long_table(table: pd.DataFrame) -> pd.DataFrame:
    """One of the analysis tables with one row per value, for `mlflow.log_table` and `mlflow.load_table`.

    A table whose column axis is named (language x layer, subnetwork x evaluation language, ...) becomes
    one row per cell: its index levels, the column axis (prefixed "other " where it repeats an index name,
    as in language x language) and "value". A table with an unnamed column axis has measures as columns
    and already one row per item: only its index becomes columns.
    """
    flat = table.reset_index()
    if table.columns.name is None:
        return flat
    ids = [name if name is not None else "index" for name in table.index.names]
    column = table.columns.name
    if column in ids:
        column = f"other {column}"
    return flat.melt(id_vars=ids, var_name=column, value_name="value")


def _diag_offdiag_mean(table: pd.DataFrame) -> tuple[float, float]:
    """Means of the entries whose row language equals / differs from the column language (NaN skipped)."""
    values = table.to_numpy(dtype=float)
    same = np.array([[subnetwork_language(r) == c for c in table.columns] for r in table.index])
    values = np.where(np.isfinite(values), values, np.nan)
    mean = lambda x: float(np.nanmean(x)) if np.isfinite(x).any() else math.nan  # noqa: E731
    return mean(values[same]), mean(values[~same])


# -- CKA ------------------------------------------------------------------------------------------------

def pair_cka(x: torch.Tensor, y: torch.Tensor, kind: str = "linear", precision: str = "float64") -> torch.Tensor:
    """CKA of x and y [layers, n, d] per layer -> [layers] (through `cka_matrix`, which bounds memory)."""
    return cka_matrix({"x": x, "y": y}, kind, precision=precision)[..., 0, 1]


def _layer_table(rows: Mapping, index_names: Sequence[str]) -> pd.DataFrame:
    """{row key: per-layer values} -> rows x layers (0 = embeddings)."""
    table = pd.DataFrame({key: pd.Series(np.asarray(values, dtype=float)) for key, values in rows.items()}).T
    if index_names and len(index_names) > 1:
        table.index = pd.MultiIndex.from_tuples(list(rows), names=list(index_names))
    else:
        table.index.name = index_names[0] if index_names else None
    table.columns.name = "layer"
    return table


def cka_reference_tables(encodings: Mapping[str, Mapping[str, torch.Tensor]], languages: Sequence[str], reference: str,
                         kind: str = "linear", shuffle_seed: int = 0,
                         precision: str = "float64") -> tuple[torch.Tensor, list[str], dict[str, pd.DataFrame]]:
    """CKA between every pair of languages per layer of the full model, and with the reference language.

    Returns the [layers+1, k, k] matrix, its language order, `cka_vs_reference.csv` (language x layer,
    the reference row excluded) and `cka_controls.csv` ((condition, language) x layer): `parallel` (the
    same numbers), `shuffled` (`shuffled_pairs_cka`, non-parallel pairs), and `base` / `random` (the
    parallel CKA in those models' encodings, where present).
    """
    full = encodings["full"]
    langs = _ordered(full, languages)
    if reference not in full:
        raise XlsubError(f"encodings: the full model has no '{reference}' encodings; encode the reference language")
    matrix = cka_matrix({lang: full[lang] for lang in langs}, kind, precision=precision)
    r = langs.index(reference)
    others = [lang for lang in langs if lang != reference]
    parallel = {lang: matrix[:, r, langs.index(lang)] for lang in others}
    controls = {("parallel", lang): values for lang, values in parallel.items()}
    ref_x = full[reference]
    for lang in others:
        # layer by layer: the derangement depends only on the seed and n, so every layer gets the same pairing
        controls[("shuffled", lang)] = torch.stack([shuffled_pairs_cka(ref_x[l], full[lang][l], shuffle_seed, kind,
                                                                       precision=precision)
                                                    for l in range(ref_x.shape[0])])
    for model in ("base", "random"):
        reps = encodings.get(model, {})
        if reference not in reps:
            continue
        for lang in others:
            if lang in reps:
                controls[(model, lang)] = pair_cka(reps[reference], reps[lang], kind, precision)
    tables = {"cka_vs_reference.csv": _layer_table(parallel, ["language"]),
              "cka_controls.csv": _layer_table(controls, ["condition", "language"])}
    return matrix, langs, tables


def cka_pairs_table(matrix: torch.Tensor, langs: Sequence[str], layers: Sequence[int]) -> pd.DataFrame:
    """All-pairs CKA at the chosen layers: (layer, language) x language."""
    blocks = [pd.DataFrame(matrix[layer].numpy(), index=pd.Index(langs, name="language"), columns=list(langs))
              for layer in layers]
    table = pd.concat(blocks, keys=list(layers), names=["layer", "language"])
    table.columns.name = "language"
    return table


def cka_subnetwork_tables(encodings: Mapping[str, Mapping[str, torch.Tensor]], languages: Sequence[str],
                          kind: str = "linear", precision: str = "float64") -> dict[str, pd.DataFrame]:
    """CKA between the full model and each subnetwork.

    `cka_full_vs_subnetwork.csv`: for language l, CKA(full[l], sub_l[l]) per layer; rows language, or
    (language, seed) with several seeds. `cka_full_vs_subnetwork_last_layer.csv`: at the last layer,
    CKA(full[e], sub_s[e]) for subnetwork s (rows, mean over seeds) and evaluation language e (columns).
    """
    full = encodings["full"]
    subs = []
    for key in encodings:
        kind_, lang, seed = parse_model_key(key)
        if kind_ == "sub":
            subs.append((lang, seed, key))
    order = _ordered(dict.fromkeys(lang for lang, _, _ in subs), languages)
    subs.sort(key=lambda s: (order.index(s[0]), -1 if s[1] is None else s[1]))
    several = len(subs) > len(order)
    curves, last = {}, {}
    eval_langs = _ordered(full, languages)
    for lang, seed, key in tqdm(subs, desc="CKA full vs subnetworks", leave=False, disable=len(subs) < 4):
        reps = encodings[key]
        if lang in reps and lang in full:
            curves[(lang, seed) if several else lang] = pair_cka(full[lang], reps[lang], kind, precision)
        row = {}
        for e in eval_langs:
            if e in reps:
                row[e] = float(pair_cka(full[e][-1:], reps[e][-1:], kind, precision)[0])
        last[(lang, seed)] = row
    tables = {}
    if curves:
        tables["cka_full_vs_subnetwork.csv"] = _layer_table(curves, ["language", "seed"] if several else ["language"])
    if last:
        by_seed = pd.DataFrame(list(last.values()), index=pd.Index([lang for lang, _ in last], name="subnetwork"))
        table = by_seed.groupby(level="subnetwork", sort=False).mean()
        table = table.loc[_ordered(table.index, languages), _ordered(table.columns, languages)]
        table.index.name, table.columns.name = "subnetwork", "evaluated on"
        tables["cka_full_vs_subnetwork_last_layer.csv"] = table
    return tables


def _resolve_layers(layers: Sequence[int] | None, count: int) -> list[int]:
    """The layers of the all-pairs heatmaps: default first, middle, last; negative indices count from the end."""
    if layers is None:
        return sorted({0, (count - 1) // 2, count - 1})
    resolved = []
    for layer in layers:
        if not -count <= int(layer) < count:
            raise XlsubError(f"layers: {layer} is out of range for {count} hidden states (0 = embeddings .. {count - 1})")
        resolved.append(int(layer) % count)
    return list(dict.fromkeys(resolved))


# -- figures ----------------------------------------------------------------------------------------------

def _palette(languages: Sequence[str]) -> dict[str, tuple]:
    """One colour per language, the same in every figure."""
    colours = sns.color_palette("colorblind", max(len(languages), 1))
    if len(languages) > 10:
        colours = sns.color_palette("husl", len(languages))
    return dict(zip(languages, colours))


def _display(table: pd.DataFrame) -> pd.DataFrame:
    """The table with language codes replaced by names on both axes (`de/seed1` -> `German/seed1`)."""
    def rename(label):
        label = str(label)
        lang, _, rest = label.partition("/")
        return language_name(lang) + (f" ({rest})" if rest else "") if label != "full" else "full model"
    shown = table.copy()
    shown.index = [rename(i) for i in table.index]
    shown.columns = [rename(c) for c in table.columns]
    return shown


def _heatmap(ax, table: pd.DataFrame, *, cmap: str, norm=None, vmin=None, vmax=None, fmt: str = ".2f",
             cbar: bool = True, cbar_label: str = "", cbar_ax=None, xlabel: str = "", ylabel: str = "", title: str = ""):
    annotate = table.shape[1] <= MAX_ANNOTATED_COLUMNS
    sns.heatmap(_display(table), ax=ax, cmap=cmap, norm=norm, vmin=None if norm else vmin, vmax=None if norm else vmax,
                annot=annotate, fmt=fmt, annot_kws={"size": 8}, square=False, linewidths=0.5, linecolor="white",
                cbar=cbar, cbar_ax=cbar_ax, cbar_kws={"label": cbar_label} if cbar else None)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.tick_params(axis="x", labelrotation=45)
    ax.tick_params(axis="y", labelrotation=0)
    return ax


def _heatmap_figure(n_panels: int, rows: int, cols: int, extra_width: float = 1.2) -> tuple[Figure, list]:
    fig = Figure(figsize=(n_panels * (1.6 + 0.62 * cols) + extra_width, 1.6 + 0.5 * rows), layout="constrained")
    axes = fig.subplots(1, n_panels, squeeze=False)[0]
    return fig, list(axes)


def _ratio_norm(*tables: pd.DataFrame) -> LogNorm:
    """A log colour scale centred at 1 and symmetric in log space, shared by all `tables`."""
    values = np.concatenate([t.to_numpy(dtype=float).ravel() for t in tables])
    values = values[np.isfinite(values) & (values > 0)]
    span = max(float(np.abs(np.log(values)).max()) if values.size else 0.0, math.log(1.05))
    return LogNorm(vmin=math.exp(-span), vmax=math.exp(span))


def _log_norm(*tables: pd.DataFrame) -> LogNorm:
    values = np.concatenate([t.to_numpy(dtype=float).ravel() for t in tables])
    values = values[np.isfinite(values) & (values > 0)]
    low, high = (float(values.min()), float(values.max())) if values.size else (1.0, 10.0)
    return LogNorm(vmin=low, vmax=high if high > low else low * 1.01)


def _log_ticks(ax, norm: LogNorm, centre: float | None = None) -> None:
    """Plain-number ticks (200, 500, 1000; or 0.5, 1, 2 around `centre`) on a log-scaled colour bar, at
    least an eighth of the range apart."""
    colorbar = ax.collections[0].colorbar
    if colorbar is None:
        return
    candidates = sorted({m * 10.0**e for e in range(-3, 8) for m in (1, 2, 3, 5)}
                        | ({0.25, 0.33, 0.67, 0.8, 0.9, 1.1, 1.25, 1.5, 3, 4} if centre else set()))
    candidates = [t for t in candidates if norm.vmin <= t <= norm.vmax]
    gap = (math.log(norm.vmax) - math.log(norm.vmin)) / 8
    start = centre if centre in candidates else (candidates[len(candidates) // 2] if candidates else None)
    ticks = [start] if start is not None else []
    for side in (reversed([t for t in candidates if t < start]), (t for t in candidates if t > start)) if ticks else ():
        last = start
        for t in side:
            if abs(math.log(t) - math.log(last)) >= gap:
                ticks.append(t)
                last = t
    ticks.sort()
    colorbar.minorticks_off()
    colorbar.set_ticks(ticks, labels=[f"{t:g}" for t in ticks])


def _ppl_format(table: pd.DataFrame) -> str:
    values = table.to_numpy(dtype=float)
    values = values[np.isfinite(values)]
    largest = float(np.abs(values).max()) if values.size else 0.0
    return ".0f" if largest >= 100 else ".1f" if largest >= 10 else ".2f"


def _per_layer_lines(ax, table: pd.DataFrame, palette: Mapping[str, tuple], *, style: str = "-", label_suffix: str = "",
                     marker: str = "o") -> None:
    """One line per language over the layers; with a (language, seed) index, the mean and a +-1 std band."""
    if isinstance(table.index, pd.MultiIndex):
        grouped = table.groupby(level=0, sort=False)
        mean, std = grouped.mean(), grouped.std(ddof=1)
    else:
        mean, std = table, None
    x = np.asarray(mean.columns, dtype=float)
    for lang in mean.index:
        colour = palette.get(lang)
        ax.plot(x, mean.loc[lang].to_numpy(dtype=float), style, marker=marker, markersize=4, color=colour,
                label=f"{language_name(lang)}{label_suffix}")
        if std is not None and std.loc[lang].notna().any():
            m, s = mean.loc[lang].to_numpy(dtype=float), std.loc[lang].to_numpy(dtype=float)
            ax.fill_between(x, m - s, m + s, color=colour, alpha=0.2, linewidth=0)
    ax.set_xticks(x)
    ax.set_xticklabels([f"{int(v)}" for v in x])


def _cka_ylim(ax, *tables: pd.DataFrame) -> None:
    """0 to 1 for every CKA axis, extended below 0 only where a debiased estimate falls there."""
    values = np.concatenate([t.to_numpy(dtype=float).ravel() for t in tables])
    values = values[np.isfinite(values)]
    low = min(0.0, float(values.min()) - 0.03) if values.size else 0.0
    ax.set_ylim(low, 1.03)


def _mask_figures(result: AnalysisResult, tables: dict[str, pd.DataFrame], n_seeds: int) -> None:
    observed, expected = tables["mask_jaccard.csv"], tables["mask_jaccard_expected.csv"]
    k = len(observed)
    fig, axes = _heatmap_figure(2, k, k)
    several = "mask_jaccard_std.csv" in tables
    left = "mean over seed pairs" if several else "observed"
    _heatmap(axes[0], observed, cmap=JACCARD_CMAP, vmin=0, vmax=1, cbar=False, title=f"Jaccard of kept heads ({left})",
             xlabel="subnetwork language", ylabel="subnetwork language")
    _heatmap(axes[1], expected, cmap=JACCARD_CMAP, vmin=0, vmax=1, cbar_label="Jaccard index",
             title="expected for random masks, same heads per layer", xlabel="subnetwork language")
    fig.suptitle("Overlap of the attention heads kept by each language's subnetwork")
    seeds_note = (f"; mean over pairs of {n_seeds} pruning seeds, the diagonal is each language's agreement with itself "
                  "across seeds" if several else "")
    result.add_figure("mask_jaccard.png", fig,
                      "Jaccard index of the heads kept by two languages' subnetworks (left) beside its exact expectation "
                      f"for random masks keeping as many heads in every layer (right){seeds_note}.",
                      {"mask_jaccard.csv": observed, "mask_jaccard_expected.csv": expected})
    if not several:
        return
    std, stability = tables["mask_jaccard_std.csv"], tables["mask_seed_stability.csv"]
    fig = Figure(figsize=(2 * (1.6 + 0.62 * k) + 1.5, 1.6 + 0.5 * max(k, 6)), layout="constrained")
    ax_std, ax_stab = fig.subplots(1, 2)
    finite = std.to_numpy(dtype=float)
    top = max(0.05, float(np.nanmax(finite)) if np.isfinite(finite).any() else 0.05)
    _heatmap(ax_std, std, cmap=SPREAD_CMAP, vmin=0, vmax=top, cbar_label="std of Jaccard over seed pairs",
             title="spread of the Jaccard index over seeds", xlabel="subnetwork language", ylabel="subnetwork language")
    names = [language_name(l) for l in stability.index]
    x = np.arange(len(names))
    ax_stab.bar(x, stability["mean"], yerr=stability["std"].fillna(0), capsize=3, color=sns.color_palette("colorblind")[0],
                label="observed (mean ± std over seed pairs)")
    ax_stab.scatter(x, stability["expected"], marker="_", s=400, color="black", zorder=3, label="expected for random masks")
    ax_stab.set_xticks(x, names, rotation=45)
    ax_stab.set_ylim(0, 1.05)
    ax_stab.set_ylabel("Jaccard index between seeds")
    ax_stab.set_xlabel("subnetwork language")
    ax_stab.set_title("same language, different pruning seeds")
    ax_stab.legend(loc="lower right", fontsize=8)
    fig.suptitle("How stable the subnetworks are across pruning seeds")
    result.add_figure("mask_jaccard_seeds.png", fig,
                      "Standard deviation of the between-language Jaccard index over seed pairs (left) and each "
                      "language's Jaccard with itself across pruning seeds against its random-mask chance level (right).",
                      {"mask_jaccard_std.csv": std, "mask_seed_stability.csv": stability})


def _per_layer_bars(ax, table: pd.DataFrame, palette: Mapping[str, tuple]) -> None:
    """Grouped bars: one group per layer, one bar per language; with a (language, seed) index, the mean and
    +-1 std error bars over seeds."""
    if isinstance(table.index, pd.MultiIndex):
        grouped = table.groupby(level=0, sort=False)
        mean, std = grouped.mean(), grouped.std(ddof=1)
    else:
        mean, std = table, None
    x = np.arange(mean.shape[1])
    width = 0.8 / max(len(mean), 1)
    for i, lang in enumerate(mean.index):
        err = None if std is None else std.loc[lang].fillna(0).to_numpy(dtype=float)
        ax.bar(x - 0.4 + width * (i + 0.5), mean.loc[lang].to_numpy(dtype=float), width, yerr=err, capsize=2,
               color=palette.get(lang), label=language_name(lang), error_kw={"linewidth": 0.8})
    ax.set_xticks(x, [str(c) for c in mean.columns])


def _heads_figure(result: AnalysisResult, tables: dict[str, pd.DataFrame], palette) -> None:
    heads = tables["heads_kept_per_layer.csv"]
    params = tables.get("params_kept_per_layer.csv")
    panels = [(heads, "share of heads kept")] + ([(params, "share of attention parameters kept")] if params is not None else [])
    groups = len(heads.index.unique(level=0)) * heads.shape[1]
    fig = Figure(figsize=(len(panels) * max(5.0, 1.0 + 0.16 * groups) + 1.8, 4), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (table, label) in zip(axes, panels):
        _per_layer_bars(ax, table, palette)
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("transformer layer")
        ax.set_ylabel(label)
        ax.set_title(label + " per layer")
        ax.grid(alpha=0.3, axis="y")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", title="subnetwork")
    fig.suptitle("Where pruning removed heads: share kept in each layer")
    several = isinstance(heads.index, pd.MultiIndex)
    result.add_figure("heads_kept_per_layer.png", fig,
                      "Share of each layer's attention heads" + (" and attention parameters (query, key, value, output; "
                      "the output bias and LayerNorm always stay)" if params is not None else "")
                      + " kept by each language's subnetwork" + ("; mean ± std over pruning seeds" if several else "") + ".",
                      dict(tables))


def _perplexity_figures(result: AnalysisResult, tables: dict[str, pd.DataFrame], several: bool) -> None:
    raw, rel = tables["cross_ppl.csv"], tables["cross_ppl_relative.csv"]
    raw_ctl, rel_ctl = tables.get("cross_ppl_random.csv"), tables.get("cross_ppl_random_relative.csv")
    seeds = " (rows: mean over pruning seeds)" if several else ""
    panels = [(raw, "language subnetwork")] + ([(raw_ctl, "random mask, same heads per layer")] if raw_ctl is not None else [])
    norm = _log_norm(*(t for t, _ in panels))
    fig, axes = _heatmap_figure(len(panels), raw.shape[0], raw.shape[1])
    for i, (ax, (table, what)) in enumerate(zip(axes, panels)):
        _heatmap(ax, table, cmap=PPL_CMAP, norm=norm, fmt=_ppl_format(table), cbar=i == len(panels) - 1,
                 cbar_label="perplexity (log colour scale)", title=what, xlabel="evaluated on",
                 ylabel="subnetwork" if i == 0 else "")
    _log_ticks(axes[-1], norm)
    fig.suptitle("Masked-LM perplexity of each subnetwork on each language")
    by_seed = {n: tables[n] for n in ("cross_ppl_by_seed.csv", "cross_ppl_random_by_seed.csv") if n in tables}
    result.add_figure("cross_ppl.png", fig,
                      "Perplexity of each language's subnetwork (rows) on every language's test set (columns)"
                      + (", beside random masks of the same size per layer" if raw_ctl is not None else "")
                      + f"; first row: the full model{seeds}.",
                      {"cross_ppl.csv": raw} | ({"cross_ppl_random.csv": raw_ctl} if raw_ctl is not None else {}) | by_seed)

    panels = [(rel, "language subnetwork")] + ([(rel_ctl, "random mask, same heads per layer")] if rel_ctl is not None else [])
    norm = _ratio_norm(*(t for t, _ in panels))
    fig, axes = _heatmap_figure(len(panels), rel.shape[0], rel.shape[1])
    for i, (ax, (table, what)) in enumerate(zip(axes, panels)):
        _heatmap(ax, table, cmap=RATIO_CMAP, norm=norm, fmt=".2f", cbar=i == len(panels) - 1,
                 cbar_label="perplexity / full-model perplexity", title=what, xlabel="evaluated on",
                 ylabel="subnetwork" if i == 0 else "")
    _log_ticks(axes[-1], norm, centre=1)
    fig.suptitle("Perplexity relative to the full model (1 = no loss; shared log scale)")
    result.add_figure("cross_ppl_relative.png", fig,
                      "Each subnetwork's perplexity divided by the full model's on the same language"
                      + (" (left) and the same for random masks of the same size per layer (right), on one colour scale"
                         if rel_ctl is not None else "") + f"{seeds}.",
                      {"cross_ppl_relative.csv": rel}
                      | ({"cross_ppl_random_relative.csv": rel_ctl} if rel_ctl is not None else {}))


def _reference_note(reference: str) -> str:
    return "" if reference == "en" else f" (English is not among the languages: the reference is {language_name(reference)})"


def _cka_figures(result: AnalysisResult, tables: dict[str, pd.DataFrame], reference: str, kind: str, palette) -> None:
    ref_name = language_name(reference)
    note = _reference_note(reference)
    curves = tables["cka_vs_reference.csv"]
    last = int(curves.columns[-1])
    fig = Figure(figsize=(7.5, 4.2), layout="constrained")
    ax = fig.subplots()
    _per_layer_lines(ax, curves, palette)
    _cka_ylim(ax, curves)
    ax.set_xlabel("layer (0 = embeddings)")
    ax.set_ylabel(f"{kind} CKA with {ref_name}")
    ax.set_title(f"Similarity of parallel sentences to their {ref_name} translation, full model")
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, title="language")
    result.add_figure("cka_vs_reference.png", fig,
                      f"{kind.capitalize()} CKA between the full model's representations of {ref_name} sentences and "
                      f"their translations, per layer{note}.", {"cka_vs_reference.csv": curves})

    pairs = tables["cka_pairs.csv"]
    layers = list(dict.fromkeys(pairs.index.get_level_values("layer")))
    k = pairs.shape[1]
    fig, axes = _heatmap_figure(len(layers), k, k)
    for i, (ax, layer) in enumerate(zip(axes, layers)):
        _heatmap(ax, pairs.loc[layer], cmap=CKA_CMAP, vmin=0, vmax=1, cbar=i == len(layers) - 1, cbar_label=f"{kind} CKA",
                 title=_layer_label(layer, last), xlabel="language", ylabel="language" if i == 0 else "")
    fig.suptitle(f"{kind.capitalize()} CKA between every pair of languages, full model")
    result.add_figure("cka_pairs.png", fig,
                      f"{kind.capitalize()} CKA between the full model's representations of parallel sentences in every "
                      f"pair of languages at layers {', '.join(map(str, layers))} (0 = embeddings).",
                      {"cka_pairs.csv": pairs})

    controls = tables["cka_controls.csv"]
    conditions = list(dict.fromkeys(controls.index.get_level_values("condition")))
    langs = list(dict.fromkeys(controls.index.get_level_values("language")))
    panels = langs + ["mean"]
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(3.2 * cols + 2.6, 2.6 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True, sharey=True).ravel()
    for ax, panel in zip(axes, panels):
        for condition in conditions:
            label, style = _CONTROLS[condition]
            if panel == "mean":
                values = controls.loc[condition].mean(axis=0)
                colour = "black"
            else:
                if (condition, panel) not in controls.index:
                    continue
                values, colour = controls.loc[(condition, panel)], palette.get(panel)
            ax.plot(np.asarray(values.index, dtype=float), values.to_numpy(dtype=float), style, color=colour,
                    marker="o" if condition == "parallel" else None, markersize=3, label=label)
        ax.set_title(f"{language_name(panel)} vs {ref_name}" if panel != "mean" else "mean over languages")
        _cka_ylim(ax, controls)
        ax.grid(alpha=0.3)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    for ax in axes[::cols]:
        ax.set_ylabel(f"{kind} CKA")
    for ax in axes[(rows - 1) * cols:]:
        ax.set_xlabel("layer (0 = embeddings)")
        ax.set_xticks(np.asarray(controls.columns, dtype=float))
    handles, labels = axes[len(panels) - 1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=8)
    fig.suptitle(f"Is the CKA with {ref_name} more than chance? Parallel sentences against controls")
    result.add_figure("cka_controls.png", fig,
                      f"{kind.capitalize()} CKA with {ref_name} per layer for parallel sentences in the full model (solid) "
                      "against the same sentences paired at random (dashed)"
                      + "".join(f", {_CONTROLS[c][0].split(', ')[1]} ({'dash-dot' if c == 'base' else 'dotted'})"
                                for c in ("base", "random") if c in conditions) + f"; same y scale{note}.",
                      {"cka_controls.csv": controls})


def _subnetwork_cka_figure(result: AnalysisResult, tables: dict[str, pd.DataFrame], kind: str, palette) -> None:
    curves = tables.get("cka_full_vs_subnetwork.csv")
    last = tables.get("cka_full_vs_subnetwork_last_layer.csv")
    widths = ([6.5] if curves is not None else []) + ([1.6 + 0.62 * last.shape[1]] if last is not None else [])
    height = max(4.2, 1.6 + 0.5 * (last.shape[0] if last is not None else 0))
    fig = Figure(figsize=(sum(widths) + 2.2, height), layout="constrained")
    axes = list(fig.subplots(1, len(widths), squeeze=False, width_ratios=widths)[0])
    several = curves is not None and isinstance(curves.index, pd.MultiIndex)
    if curves is not None:
        ax = axes.pop(0)
        _per_layer_lines(ax, curves, palette)
        _cka_ylim(ax, curves)
        ax.set_xlabel("layer (0 = embeddings)")
        ax.set_ylabel(f"{kind} CKA, full model vs subnetwork")
        ax.set_title("each subnetwork on its own language")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=4, fontsize=8, title_fontsize=8,
                  title="subnetwork language" + (" (mean ± std over seeds)" if several else ""))
    if last is not None:
        ax = axes.pop(0)
        _heatmap(ax, last, cmap=CKA_CMAP, vmin=0, vmax=1, cbar_label=f"{kind} CKA", title="last layer, every language",
                 xlabel="evaluated on", ylabel="subnetwork")
    fig.suptitle("How much a subnetwork changes the full model's representations")
    result.add_figure("cka_full_vs_subnetwork.png", fig,
                      f"{kind.capitalize()} CKA between the full model and each language's subnetwork on that language per "
                      "layer (left" + ("; mean ± std over pruning seeds" if several else "") + ") and on every language at "
                      "the last layer (right" + ("; mean over seeds" if several else "") + ").",
                      {n: t for n, t in (("cka_full_vs_subnetwork.csv", curves),
                                         ("cka_full_vs_subnetwork_last_layer.csv", last)) if t is not None})


def _token_figure(result: AnalysisResult, table: pd.DataFrame, reference: str, kind: str, palette) -> None:
    ref_name = language_name(reference)
    others = [c for c in ("jaccard_with_reference", "cka_last_layer_with_reference") if c in table and table[c].notna().any()]
    fig = Figure(figsize=(5.5 + 4.8 * bool(others), 4), layout="constrained")
    axes = fig.subplots(1, 1 + bool(others), squeeze=False)[0]
    names = [language_name(l) for l in table.index]
    axes[0].bar(names, table["token_overlap"], color=[palette.get(l) for l in table.index])
    axes[0].set_ylim(0, 1.03)
    axes[0].set_ylabel(f"share of tokens also in the {ref_name} sentence")
    axes[0].set_xlabel("language")
    axes[0].tick_params(axis="x", labelrotation=45)
    axes[0].set_title(f"Token overlap with {ref_name}")
    if others:
        ax = axes[1]
        for column, marker, label, offset in (("jaccard_with_reference", "o", "Jaccard of kept heads", (4, 3)),
                                              ("cka_last_layer_with_reference", "s", f"{kind} CKA, last layer", (4, -9))):
            if column not in others:
                continue
            ax.scatter(table["token_overlap"], table[column], marker=marker, c=[palette.get(l) for l in table.index],
                       label=label, edgecolors="black", linewidths=0.5)
            for lang, x, y in zip(table.index, table["token_overlap"], table[column]):
                if np.isfinite(y):
                    ax.annotate(lang, (x, y), textcoords="offset points", xytext=offset, fontsize=7)
        # zoomed to the points (from 0): overlaps and similarities of a few tenths would crowd one corner of 0..1
        overlap = table["token_overlap"].to_numpy(dtype=float)
        ax.set_xlim(0, min(1.03, float(np.nanmax(overlap, initial=0.0)) * 1.25 + 0.02))
        _cka_ylim(ax, table[others])
        similarity = table[others].to_numpy(dtype=float)
        ax.set_ylim(top=min(1.03, float(np.nanmax(similarity, initial=0.0)) * 1.2 + 0.03))
        ax.set_xlabel(f"token overlap with {ref_name}")
        ax.set_ylabel(f"similarity to {ref_name}")
        ax.set_title("Does shared vocabulary explain the similarity?")
        # neutral legend markers: the points are coloured by language
        handles = [Line2D([], [], marker=m, linestyle="", color="grey", markeredgecolor="black", label=label)
                   for column, m, label in (("jaccard_with_reference", "o", "Jaccard of kept heads"),
                                            ("cka_last_layer_with_reference", "s", f"{kind} CKA, last layer")) if column in others]
        ax.legend(handles=handles, fontsize=8)
        ax.grid(alpha=0.3)
    result.add_figure("token_overlap.png", fig,
                      f"Mean share of a sentence's tokens that also occur in its {ref_name} translation (clipped counts)"
                      + (f", against each language's similarity to {ref_name}" if others else "")
                      + f"{_reference_note(reference)}.",
                      {"token_overlap.csv": table})


# -- the analysis ------------------------------------------------------------------------------------------

def _offdiag_mean(table: pd.DataFrame) -> float:
    values = table.to_numpy(dtype=float)
    off = values[~np.eye(len(values), dtype=bool)]
    off = off[np.isfinite(off)]
    return float(off.mean()) if off.size else math.nan


def _nanmean(values) -> float:
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else math.nan


def analyze(inputs: AnalysisInputs, cka_kind: str = "linear", layers: Sequence[int] | None = None,
            cka_precision: str = "float64") -> AnalysisResult:
    """Every analysis whose inputs are present: figures, captions, tables and metrics (see the module docstring).

    `cka_kind`: linear, debiased or rbf (`xlsub.cka`). `layers`: hidden-state indices (0 = embeddings) of the
    all-pairs CKA heatmaps; default first, middle and last. `cka_precision`: float64, or float32 products
    accumulated in float64 (linear and debiased; see `xlsub.cka`).
    """
    if cka_kind not in KINDS:
        raise XlsubError(f"cka_kind: unknown kind '{cka_kind}'; use linear, debiased or rbf")
    check_options(cka_kind, cka_precision)  # the kind is known by now: precision, and rbf with float32
    if not inputs.languages:
        raise XlsubError("languages: no languages given; pass the ISO codes analysed, e.g. en,de,zh")
    result = AnalysisResult()
    reference, langs = inputs.reference, list(inputs.languages)
    palette = _palette(_ordered(set(langs) | {l for l, _ in inputs.masks} | set(inputs.tokens), langs))
    metrics = result.metrics

    if inputs.masks:
        grouped = group_masks(inputs.masks, langs)
        n_seeds = max(len(s) for s in grouped.values())
        overlap = mask_overlap_tables(inputs.masks, langs)
        _mask_figures(result, overlap, n_seeds)
        metrics["mean_jaccard"] = _offdiag_mean(overlap["mask_jaccard.csv"])
        metrics["mean_expected_jaccard"] = _offdiag_mean(overlap["mask_jaccard_expected.csv"])
        if "mask_seed_stability.csv" in overlap:
            metrics["mean_seed_stability"] = _nanmean(overlap["mask_seed_stability.csv"]["mean"])
        kept = heads_kept_tables(inputs.masks, langs, inputs.hidden_size, inputs.head_dim)
        _heads_figure(result, kept, palette)
        metrics["mean_heads_kept_frac"] = _nanmean([float(m.float().mean()) for m in inputs.masks.values()])
        if "params_kept_per_layer.csv" in kept:
            metrics["mean_params_kept_frac"] = _nanmean(kept["params_kept_per_layer.csv"].to_numpy().mean(axis=1))
        else:
            result.notes.append("params kept per layer: skipped (hidden_size and head_dim not given)")
    else:
        result.notes.append("mask overlap and heads kept: skipped (no head masks)")

    if inputs.cross_ppl is not None and not inputs.cross_ppl.empty:
        ppl = perplexity_tables(inputs.cross_ppl, inputs.cross_ppl_random, inputs.ppl_full, langs)
        several = any(n.endswith("_by_seed.csv") for n in ppl)
        _perplexity_figures(result, ppl, several)
        (metrics["mean_relative_ppl_diag"],
         metrics["mean_relative_ppl_offdiag"]) = _diag_offdiag_mean(ppl["cross_ppl_relative.csv"])
        if "cross_ppl_random_relative.csv" in ppl:
            (metrics["mean_relative_ppl_random_diag"],
             metrics["mean_relative_ppl_random_offdiag"]) = _diag_offdiag_mean(ppl["cross_ppl_random_relative.csv"])
    else:
        result.notes.append("cross-language perplexity: skipped (no cross_ppl table)")

    full = inputs.encodings.get("full", {})
    cka_last = None
    if reference in full and len(full) > 1:
        matrix, cka_langs, cka_tables = cka_reference_tables(inputs.encodings, langs, reference, cka_kind, inputs.shuffle_seed,
                                                               cka_precision)
        chosen = _resolve_layers(layers, matrix.shape[0])
        cka_tables["cka_pairs.csv"] = cka_pairs_table(matrix, cka_langs, chosen)
        _cka_figures(result, cka_tables, reference, cka_kind, palette)
        cka_last = cka_tables["cka_vs_reference.csv"].iloc[:, -1]
        metrics["mean_cka_last_layer"] = _nanmean(cka_last)
        controls = cka_tables["cka_controls.csv"]
        for condition in ("shuffled", "base", "random"):
            if condition in controls.index.get_level_values("condition"):
                metrics[f"mean_cka_{condition}_last_layer"] = _nanmean(controls.loc[condition].iloc[:, -1])
    else:
        result.notes.append(f"CKA between languages: skipped (no full-model encodings of {reference} and another language)")
    if full and any(parse_model_key(k)[0] == "sub" for k in inputs.encodings):
        sub_tables = cka_subnetwork_tables(inputs.encodings, langs, cka_kind, cka_precision)
        if sub_tables:
            _subnetwork_cka_figure(result, sub_tables, cka_kind, palette)
            if "cka_full_vs_subnetwork.csv" in sub_tables:
                metrics["mean_cka_full_vs_subnetwork_last_layer"] = _nanmean(sub_tables["cka_full_vs_subnetwork.csv"].iloc[:, -1])
    else:
        result.notes.append("CKA full model vs subnetworks: skipped (no full-model or subnetwork encodings)")

    if inputs.tokens and reference in inputs.tokens:
        overlap = token_overlap({l: inputs.tokens[l] for l in _ordered(inputs.tokens, langs)}, reference=reference)
        table = pd.DataFrame({"token_overlap": {l: v for l, v in overlap.items() if l != reference}})
        table.index.name = "language"
        jaccard_table = result.tables.get("mask_jaccard.csv")
        if jaccard_table is not None and reference in jaccard_table.index:
            table["jaccard_with_reference"] = [jaccard_table.loc[reference].get(l, math.nan) for l in table.index]
        if cka_last is not None:
            table["cka_last_layer_with_reference"] = [cka_last.get(l, math.nan) for l in table.index]
        _token_figure(result, table, reference, cka_kind, palette)
        metrics["mean_token_overlap"] = _nanmean(table["token_overlap"])
    else:
        result.notes.append(f"token overlap: skipped (no tokens for the reference language {reference})")

    for note in result.notes:
        log.info(note)
    return result
