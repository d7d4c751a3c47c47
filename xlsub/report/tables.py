"""The analyze stage's tables: plain DataFrames keyed by a table id (`mask_jaccard`, `cross_ppl_relative`,
`cka_vs_reference`), which `xlsub.report.html` writes as `tables/<table id>.csv`.

Rows and columns:
- a table with one row per subnetwork has the index "subnetwork" and rows `de-s0` (`SubnetworkId`), also
  with a single pruning seed;
- a table aggregated per language (the mean over seeds) has ISO-code rows, the index "language" or
  "subnetwork language";
- per-layer tables have the column axis "layer": CKA layer l is hidden state l (0 = embeddings, l >= 1 =
  output of transformer layer l), and head masks are labelled the same way, so mask layer 1 is the first
  transformer layer.

`cross_perplexity_matrix` and `relative_perplexity` live in `xlsub.models.pruning`: the prune stage logs its matrices
with them and this module reuses `relative_perplexity`, so the two stages compute the relative perplexity in
one place.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from xlsub.artifacts import (
    BASE_MODEL,
    FULL_MODEL,
    METRIC,
    RANDOM_MODEL,
    TABLE,
    SubnetworkId,
    derived,
    group_by_language,
    language_metric,
    last_layer,
    layer_count,
    ordered,
    subnetwork_ids,
)
from xlsub.errors import XlsubError
from xlsub.models.mlm import ChunkLosses
from xlsub.models.pruning import relative_perplexity
from xlsub.similarity.cka import cka_matrix, ratio, self_hsic, shuffled_pairs_cka
from xlsub.similarity.jackknife import BlockHsic, cka_jackknife_interval, jackknife_blocks, jackknife_bounds, leave_block_out_self
from xlsub.stats.inference import (
    UnitLevel,
    benjamini_hochberg,
    monte_carlo_p,
    percentile_interval,
    unit_level,
)
from xlsub.stats.intervals import relative_replicates
from xlsub.stats.overlap import (
    AttentionParams,
    expected_jaccard_over_seeds,
    expected_random_jaccard_matrix,
    jaccard_matrix,
    mean_std_over_seeds,
    params_kept_per_layer,
    proportion_kept_per_layer,
    seed_stability,
)

LANGUAGE_NAMES = {
    "en": "English", "es": "Spanish", "ru": "Russian", "de": "German", "zh": "Chinese", "ar": "Arabic",
    "hi": "Hindi", "ur": "Urdu", "fr": "French", "it": "Italian", "pt": "Portuguese", "ja": "Japanese",
    "ko": "Korean", "tr": "Turkish", "vi": "Vietnamese", "th": "Thai", "sw": "Swahili", "el": "Greek",
    "bg": "Bulgarian", "fa": "Persian", "he": "Hebrew", "id": "Indonesian", "nl": "Dutch", "pl": "Polish",
}


# -- naming ---------------------------------------------------------------------------------------------

def language_name(lang: str) -> str:
    """`German` for `de`; unknown codes stay codes."""
    return LANGUAGE_NAMES.get(lang, lang)


def several_seeds(ids: Iterable[SubnetworkId]) -> bool:
    """Whether some language has more than one pruning seed among `ids`."""
    languages = [sid.language for sid in ids]
    return len(languages) > len(set(languages))


# -- head masks ---------------------------------------------------------------------------------------------

def mask_overlap_tables(masks: Mapping[SubnetworkId, torch.Tensor], languages: Sequence[str]) -> dict[str, pd.DataFrame]:
    """Jaccard of kept heads between languages and its random-mask chance level (`xlsub.stats.overlap`).

    One seed: `mask_jaccard` (`jaccard_matrix`, diagonal 1) and `mask_jaccard_expected`
    (`expected_random_jaccard_matrix`). Several seeds: the mean over seed pairs (`mean_std_over_seeds`;
    the diagonal is then a language's agreement with itself across seeds), its chance level over the same
    pairs (`expected_jaccard_over_seeds`), `mask_jaccard_std` and `mask_seed_stability` (within-language
    mean, std, pairs and the chance level `expected`).
    """
    grouped = group_by_language(masks, languages)
    if not several_seeds(masks):
        single = {lang: next(iter(seeds.values())) for lang, seeds in grouped.items()}
        return {TABLE.mask_jaccard: jaccard_matrix(single), TABLE.mask_jaccard_expected: expected_random_jaccard_matrix(single)}
    mean, std = mean_std_over_seeds(masks, languages)
    expected = expected_jaccard_over_seeds(masks, languages)
    stability = seed_stability(masks, languages)
    stability["expected"] = [expected.loc[lang, lang] for lang in stability.index]
    return {TABLE.mask_jaccard: mean, TABLE.mask_jaccard_expected: expected, TABLE.mask_jaccard_std: std,
            TABLE.mask_seed_stability: stability}


def heads_kept_tables(masks: Mapping[SubnetworkId, torch.Tensor], languages: Sequence[str],
                      params: AttentionParams | None = None) -> dict[str, pd.DataFrame]:
    """Share of heads (`heads_kept_per_layer`) and of attention parameters (`params_kept_per_layer`, when
    the model's `params` are given) kept in each layer: the mean over a layer's heads
    (`proportion_kept_per_layer`), not the study's sum over layers. Rows are subnetworks (`de-s0`);
    columns are layers 1..L (mask row 0 is transformer layer 1).
    """
    flat = {str(sid): masks[sid] for sid in subnetwork_ids(masks, languages)}
    tables = {TABLE.heads_kept_per_layer: proportion_kept_per_layer(flat)}
    if params is not None:
        tables[TABLE.params_kept_per_layer] = params_kept_per_layer(flat, params)
    for table in tables.values():
        table.index.name = "subnetwork"
        table.columns = pd.RangeIndex(1, table.shape[1] + 1, name="layer")
    return tables


# -- perplexity -----------------------------------------------------------------------------------------

def _by_seed(matrix: pd.DataFrame, languages: Sequence[str]) -> pd.DataFrame:
    """The matrix as the prune stage logs it (rows `de-s0`), rows and columns in `languages` order."""
    rows = {SubnetworkId.parse(row): row for row in matrix.index}
    table = matrix.loc[[rows[sid] for sid in subnetwork_ids(rows, languages)], ordered(matrix.columns, languages)]
    table.index.name, table.columns.name = "subnetwork", "evaluated on"
    return table


def _mean_over_seeds(by_seed: pd.DataFrame) -> pd.DataFrame:
    """Rows `de-s0`, `de-s1`, ... -> one row per subnetwork language: the mean over its seeds."""
    means = by_seed.groupby(by_seed.index.map(lambda row: SubnetworkId.parse(row).language), sort=False).mean()
    means.index.name, means.columns.name = "subnetwork language", "evaluated on"
    return means


def seed_averaged_perplexity_tables(cross: pd.DataFrame, cross_random: pd.DataFrame | None, ppl_full: Mapping[str, float],
                                     languages: Sequence[str]) -> dict[str, pd.DataFrame]:
    """The cross-language perplexity matrix (rows `de-s0` as `xlsub.models.pruning.cross_perplexity_matrix` makes
    them) per subnetwork language: raw (`cross_ppl`, first row `full` = the full model) and relative to the full model
    (`cross_ppl_relative`), the same for the random-mask control (`cross_ppl_random*`). With several seeds a
    row is the mean over the language's seeds and the per-seed rows are kept in `*_by_seed`."""
    tables = {}
    for (stem, relative, seeds), table in (((TABLE.cross_ppl, TABLE.cross_ppl_relative, TABLE.cross_ppl_by_seed), cross),
                                           ((TABLE.cross_ppl_random, TABLE.cross_ppl_random_relative,
                                             TABLE.cross_ppl_random_by_seed), cross_random)):
        if table is None or table.empty:
            continue
        by_seed = _by_seed(table, languages)
        by_language = _mean_over_seeds(by_seed)
        full_row = pd.DataFrame([[float(ppl_full.get(c, math.nan)) for c in by_language.columns]],
                                index=[FULL_MODEL], columns=by_language.columns)
        raw = pd.concat([full_row, by_language])
        raw.index.name = by_language.index.name
        tables[stem] = raw
        tables[relative] = relative_perplexity(by_language, ppl_full)
        if len(by_language) != len(by_seed):
            tables[seeds] = by_seed
    return tables


def perplexity_interval_tables(chunk_losses: Mapping[tuple[str, int, str], ChunkLosses], languages: Sequence[str],
                               replicates: int = 1000, seed: int = 0) -> tuple[dict[str, pd.DataFrame], dict[str, float]]:
    """95% intervals of the relative cross-language perplexity and of the language-specificity gap, from a
    paired bootstrap over test chunks (`xlsub.stats.intervals`) of the prune run's per-chunk losses, and the
    specificity excess over random masks tested at the level of languages.

    Tables (rows: subnetwork language, the mean over its seeds as in `cross_ppl_relative`):
    `cross_ppl_relative_lo` / `_hi`, `cross_ppl_random_relative_lo` / `_hi` (random draws resampled too),
    and `specificity_gap`: per language, the gap (mean relative perplexity on the other languages minus on
    its own) with its chunk-bootstrap interval (within-language uncertainty), the same for the random
    masks, `d` = gap - random_gap, `p_value` from a label-swap test within the language
    (`label_swap_test`, `replicates` swaps) and `p_bh` (Benjamini-Hochberg across languages).

    Metrics: descriptive `specificity_gap` (`_lo`, `_hi`: chunk bootstrap of the mean over languages),
    `specificity_gap.<lang>`, `specificity_gap_random` (`_lo`, `_hi`); the claim about languages
    `specificity_excess` = mean over languages of d, its 95% sign-flip interval over languages
    (`specificity_excess_lo`, `_hi`; NaN where the languages are too few for one) and one-sided exact
    sign-flip p (`specificity_excess_p`), all from `specificity_excess`; `specificity_excess.<lang>` = d.
    """
    full = {lang: c for (model, draw, lang), c in chunk_losses.items() if model == FULL_MODEL}
    cells = {(model, lang): c for (model, draw, lang), c in chunk_losses.items() if model != FULL_MODEL and draw < 0}
    random_cells: dict[tuple[str, str], list[ChunkLosses]] = {}
    for (model, draw, lang), c in sorted(chunk_losses.items(), key=lambda item: item[0][1]):
        if model != FULL_MODEL and draw >= 0:
            random_cells.setdefault((model, lang), []).append(c)
    sub_reps, random_reps = relative_replicates(cells, random_cells, full, replicates, seed)

    def by_language(reps: Mapping[tuple[str, str], torch.Tensor]) -> dict[tuple[str, str], torch.Tensor]:
        grouped: dict[tuple[str, str], list[torch.Tensor]] = {}
        for (model, lang), values in reps.items():
            grouped.setdefault((SubnetworkId.parse(model).language, lang), []).append(values)
        return {cell: torch.stack(v).mean(0) for cell, v in grouped.items()}

    sub, rand = by_language(sub_reps), by_language(random_reps)
    rows = ordered(dict.fromkeys(r for r, _ in sub), languages)
    columns = ordered(dict.fromkeys(c for _, c in sub), languages)
    out: dict[str, pd.DataFrame] = {}
    for ids, reps in (((TABLE.cross_ppl_relative_lo, TABLE.cross_ppl_relative_hi), sub),
                      ((TABLE.cross_ppl_random_relative_lo, TABLE.cross_ppl_random_relative_hi), rand)):
        bounds = {(r, c): percentile_interval(reps[(r, c)]) for r in rows for c in columns if (r, c) in reps}
        for i, table_id in enumerate(ids):
            table = pd.DataFrame([[bounds[(r, c)][i] if (r, c) in bounds else math.nan for c in columns] for r in rows],
                                 index=pd.Index(rows, name="subnetwork language"), columns=pd.Index(columns, name="evaluated on"))
            out[table_id] = table

    def gaps(reps) -> dict[str, torch.Tensor]:
        """Per language: replicates [B] (or the point estimate) of mean off-diagonal minus diagonal."""
        result = {}
        for r in rows:
            others = [reps[(r, c)] for c in columns if c != r and (r, c) in reps]
            if others and (r, r) in reps:
                result[r] = torch.stack(others).mean(0) - reps[(r, r)]
        return result

    points = {name: by_language({cell: relative_point(chunk_losses, cell, full, draw=name == "random")
                                 for cell in (cells if name == "sub" else random_cells)}) for name in ("sub", "random")}
    gap, gap_random = gaps(sub), gaps(rand)
    gap_point, gap_random_point = gaps(points["sub"]), gaps(points["random"])
    excess = {r: float(gap_point[r] - gap_random_point[r]) for r in gap if r in gap_random_point}
    swap_p = {r: label_swap_test(chunk_losses, r, columns, replicates, _swap_seed(seed, r))[1] for r in excess}
    p_bh = dict(zip(swap_p, benjamini_hochberg(list(swap_p.values()))))
    table_rows = []
    for r in gap:
        lo, hi = percentile_interval(gap[r])
        rlo, rhi = percentile_interval(gap_random[r]) if r in gap_random else (math.nan, math.nan)
        table_rows.append({"subnetwork language": r, "gap": float(gap_point[r]), "gap_lo": lo, "gap_hi": hi,
                           "random_gap": float(gap_random_point.get(r, torch.tensor(math.nan))), "random_gap_lo": rlo,
                           "random_gap_hi": rhi, "d": excess.get(r, math.nan), "p_value": swap_p.get(r, math.nan),
                           "p_bh": p_bh.get(r, math.nan)})
    metrics: dict[str, float] = {}
    if table_rows:
        out[TABLE.specificity_gap] = pd.DataFrame(table_rows).set_index("subnetwork language")
        mean_gap = torch.stack(list(gap.values())).mean(0)
        metrics[METRIC.specificity_gap] = float(torch.stack(list(gap_point.values())).mean())
        metrics[METRIC.specificity_gap_lo], metrics[METRIC.specificity_gap_hi] = percentile_interval(mean_gap)
        metrics |= {language_metric(METRIC.specificity_gap, r): float(v) for r, v in gap_point.items()}
        if gap_random:
            mean_random = torch.stack(list(gap_random.values())).mean(0)
            metrics[METRIC.specificity_gap_random] = float(torch.stack(list(gap_random_point.values())).mean())
            metrics[METRIC.specificity_gap_random_lo], metrics[METRIC.specificity_gap_random_hi] = percentile_interval(mean_random)
        if excess:
            level = specificity_excess(out[TABLE.specificity_gap], replicates, seed)
            metrics[METRIC.specificity_excess] = level.value
            metrics[METRIC.specificity_excess_lo], metrics[METRIC.specificity_excess_hi] = (
                x if math.isfinite(x) else math.nan for x in (level.lo, level.hi))
            metrics[METRIC.specificity_excess_p] = level.p
            metrics |= {language_metric(METRIC.specificity_excess, r): v for r, v in excess.items()}
    return out, metrics


def specificity_excess(table: pd.DataFrame, n_perm: int, seed: int) -> UnitLevel:
    """The claim about languages from the `specificity_gap` table: one paired difference per language,
    d = gap - random_gap (its seeds, random draws and chunks already averaged in), its mean, 95% sign-flip
    interval, one-sided sign-flip p (exact up to 16 languages, else `n_perm` flips from `seed`) and
    robustness to leaving out a language (`xlsub.stats.inference.unit_level`)."""
    return unit_level(table["d"].dropna().to_numpy(dtype=float), n_perm=n_perm, seed=seed)


def _swap_seed(seed: int, language: str) -> int:
    """The label-swap test's generator seed for a language: stable whichever other languages are analysed."""
    return seed * 1_000_003 + zlib.crc32(f"label swap {language}".encode())


def label_swap_test(chunk_losses: Mapping[tuple[str, int, str], ChunkLosses], language: str, evaluated_on: Sequence[str],
                    n_swaps: int, seed: int) -> tuple[float, float]:
    """Monte Carlo label-swap test of one subnetwork language's specificity excess over its random masks.

    H0: the language's subnetwork is no more specific than random masks with the same heads per layer, so
    on every test chunk its loss and its random-mask control's loss are exchangeable. The statistic is the
    language's gap minus random gap, gap = mean relative perplexity on the other languages minus on its own
    (mean over its seeds); here the control's chunk loss is the draws' mean NLL (and mean token count), so
    the observed statistic differs from the table's `d` (mean of the draws' perplexities) only by that
    averaging. Each null replicate swaps, independently per seed, evaluation language and chunk with
    probability 1/2, the subnetwork's (NLL, tokens) with the control's, and recomputes the statistic.
    Swaps come from `torch.Generator().manual_seed(seed)`, one `torch.rand(n_swaps, chunks) < 0.5` per
    (seed in order, evaluation language in `evaluated_on` order). Returns (observed, p), p = (1 + #{null >=
    observed}) / (1 + n_swaps) (`xlsub.stats.inference.monte_carlo_p`).
    """
    full = {lang: c for (model, draw, lang), c in chunk_losses.items() if model == FULL_MODEL}
    models = sorted({model for (model, draw, lang) in chunk_losses
                     if model != FULL_MODEL and draw < 0 and SubnetworkId.parse(model).language == language}, key=SubnetworkId.parse)
    generator = torch.Generator().manual_seed(seed)
    relative: dict[str, list[torch.Tensor]] = {}  # evaluation language -> per seed [2, 1 + n_swaps]: subnetwork, control
    for model in models:
        for lang in evaluated_on:
            draws = [c for (m, d, l), c in sorted(chunk_losses.items(), key=lambda item: item[0][1])
                     if m == model and l == lang and d >= 0]
            if (model, -1, lang) not in chunk_losses or not draws or lang not in full:
                continue
            sub = chunk_losses[(model, -1, lang)]
            control_nll = torch.stack([c.nll.double() for c in draws]).mean(0)
            control_tokens = torch.stack([c.tokens.double() for c in draws]).mean(0)
            swap = torch.rand(n_swaps, len(sub.nll), generator=generator) < 0.5
            swap = torch.cat([torch.zeros(1, len(sub.nll), dtype=torch.bool), swap])  # row 0: as observed
            log_full = float(full[lang].nll.sum()) / float(full[lang].tokens.sum())
            pair = []
            for own, other in (((sub.nll.double(), sub.tokens.double()), (control_nll, control_tokens)),
                               ((control_nll, control_tokens), (sub.nll.double(), sub.tokens.double()))):
                nll = torch.where(swap, other[0], own[0]).sum(-1)
                tokens = torch.where(swap, other[1], own[1]).sum(-1)
                pair.append(torch.exp(nll / tokens - log_full))
            relative.setdefault(lang, []).append(torch.stack(pair))
    others = [lang for lang in relative if lang != language]
    if language not in relative or not others:
        return math.nan, math.nan
    mean = {lang: torch.stack(v).mean(0) for lang, v in relative.items()}
    gap = torch.stack([mean[lang] for lang in others]).mean(0) - mean[language]  # [2, 1 + n_swaps]
    statistic = gap[0] - gap[1]
    return float(statistic[0]), monte_carlo_p(statistic[1:].numpy(), float(statistic[0]))


def relative_point(chunk_losses: Mapping[tuple[str, int, str], ChunkLosses], cell: tuple[str, str],
                   full: Mapping[str, ChunkLosses], draw: bool = False) -> torch.Tensor:
    """A cell's relative perplexity on all chunks (no resampling): the model's, or the mean over its random
    draws (`draw=True`), over the full model's."""
    model, lang = cell
    if not draw:
        return torch.tensor(chunk_losses[(model, -1, lang)].perplexity / full[lang].perplexity, dtype=torch.float64)
    ppls = [c.perplexity for (m, d, l), c in chunk_losses.items() if m == model and l == lang and d >= 0]
    return torch.tensor(sum(ppls) / len(ppls) / full[lang].perplexity, dtype=torch.float64)


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


# -- CKA ------------------------------------------------------------------------------------------------

def self_terms(reps: Mapping[str, torch.Tensor], lang: str, kind: str, last: bool = False) -> torch.Tensor:
    """HSIC(K, K) of `reps[lang]` (one model's languages) at every hidden state [layers+1] (`self_hsic`), or with `last`
    at the last one alone [1]: for encodings read from an `EncodingStore`, computed once per model, language and kind
    for every table that asks (`artifacts.derived`), the last one taken from all of them where those are known. Linear
    and debiased CKA (rbf's self term needs its n x n kernel)."""
    if not last:
        return derived(reps, lang, ("cka_self", kind), lambda: self_hsic(reps[lang], kind))
    known = derived(reps, lang, ("cka_self", kind), None)
    return known[-1:] if known is not None else derived(reps, lang, ("cka_self", kind, "last"), lambda: self_hsic(last_layer(reps, lang)[None], kind))


def block_self_terms(reps: Mapping[str, torch.Tensor], lang: str, kind: str, labels: torch.Tensor,
                     layers: Sequence[int] | None = None) -> BlockHsic:
    """`leave_block_out_self` of `reps[lang]` (one model's languages) on the blocks `labels` at the hidden states
    `layers` (default all; negative count from the end), stacked [len(layers), ...]: for encodings read from an
    `EncodingStore`, each layer's computed once per model, language, kind and blocks for every table that asks (the
    jackknife intervals of the pairs, of the reference's CKA and of the length control), the last layer read alone
    where it is the only one asked for; linear and debiased CKA."""
    count = layer_count(reps, lang)
    layers = [layer % count for layer in (range(count) if layers is None else layers)]
    labels = torch.as_tensor(labels, dtype=torch.long)
    name = ("block_self", kind, len(labels), zlib.crc32(labels.cpu().numpy().astype(np.int64).tobytes()))
    found = {layer: derived(reps, lang, (*name, layer), None) for layer in layers}
    missing = [layer for layer in layers if found[layer] is None]
    if missing:
        x = last_layer(reps, lang)[None] if missing == [count - 1] else reps[lang][missing]
        computed = leave_block_out_self(x, labels, kind)
        for i, layer in enumerate(missing):
            found[layer] = derived(reps, lang, (*name, layer), lambda i=i: BlockHsic(computed.kept[i], computed.whole[i]))
    return BlockHsic(*(torch.stack(values) for values in zip(*(found[layer] for layer in layers))))


def reference_cka(reps: Mapping[str, torch.Tensor], reference: str, lang: str, kind: str,
                  values: torch.Tensor | None = None) -> torch.Tensor | None:
    """The float64 CKA of `reps[reference]` and `reps[lang]` at every hidden state [layers+1] as `cka_reference_tables`
    computed it (its matrix, float64 precision), kept by an `EncodingStore` for the tables that test the same pair
    (`cka_pvalue_table`): `values` given, kept; else the kept one, or None (not computed, or not kept: tensors in
    memory)."""
    return derived(reps, lang, ("cka_with", reference, kind), None if values is None else lambda: values)


def pair_cka(x: torch.Tensor, y: torch.Tensor, kind: str = "linear", precision: str = "float64",
             selves: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """CKA of x and y [layers, n, d] per layer -> [layers] (through `cka_matrix`, which bounds memory); `selves`:
    their `self_hsic`, already computed."""
    return cka_matrix({"x": x, "y": y}, kind, precision=precision, selves=None if selves is None else dict(zip("xy", selves)))[..., 0, 1]


def _layer_table(rows: Mapping, index_names: Sequence[str]) -> pd.DataFrame:
    """{row key: per-layer values} -> rows x layers (0 = embeddings)."""
    table = pd.DataFrame({key: pd.Series(np.asarray(values.cpu() if isinstance(values, torch.Tensor) else values, dtype=float))
                          for key, values in rows.items()}).T
    if len(index_names) > 1:
        table.index = pd.MultiIndex.from_tuples(list(rows), names=list(index_names))
    else:
        table.index.name = index_names[0]
    table.columns.name = "layer"
    return table


def cka_reference_tables(encodings: Mapping[str, Mapping[str, torch.Tensor]], languages: Sequence[str], reference: str,
                         kind: str = "linear", shuffle_seed: int = 0, precision: str = "float64",
                         pair_layers: Sequence[int] | None = None) -> tuple[torch.Tensor, list[str], dict[str, pd.DataFrame]]:
    """CKA (Kornblith et al. 2019) between every pair of languages per layer of the full model, and with the
    reference language.

    Returns the [layers+1, k, k] matrix (with `pair_layers`, every pair at those layers only, the reference's at every
    layer, NaN elsewhere: the all-pairs tables' layers), its language order, `cka_vs_reference` (language x layer, the
    reference row excluded) and `cka_controls` ((condition, language) x layer): `parallel` (the same
    numbers), `shuffled` (`shuffled_pairs_cka`, non-parallel pairs), and `base` / `random` (the parallel
    CKA in the encodings of the model before finetuning / a randomly initialised model, where present).
    """
    full = encodings[FULL_MODEL]
    langs = ordered(full, languages)
    if reference not in full:
        raise XlsubError(f"encodings: the full model has no '{reference}' encodings; encode the reference language")
    # each representation's self term once (half of a pair's cost), for the matrix and every control pair it is in
    selves = None if kind == "rbf" else {lang: self_terms(full, lang, kind) for lang in langs}
    matrix = cka_matrix({lang: full[lang] for lang in langs}, kind, precision=precision, selves=selves, anchor=reference,
                        every_pair=pair_layers)
    r = langs.index(reference)
    others = [lang for lang in langs if lang != reference]
    parallel = {lang: matrix[:, r, langs.index(lang)] for lang in others}
    if precision == "float64":  # the float64 observed CKA of the permutation tests (`cka_pvalue_table`): not again
        for lang in others:
            reference_cka(full, reference, lang, kind, parallel[lang].clone())
    controls = {("parallel", lang): values for lang, values in parallel.items()}
    ref_x = full[reference]
    for lang in others:
        # layer by layer: the derangement depends only on the seed and n, so every layer gets the same pairing
        pair = (lambda l: None) if selves is None else (lambda l: (selves[reference][l], selves[lang][l]))
        controls[("shuffled", lang)] = torch.stack([shuffled_pairs_cka(ref_x[l], full[lang][l], shuffle_seed, kind,
                                                                       precision=precision, selves=pair(l))
                                                    for l in range(ref_x.shape[0])])
    for model in (BASE_MODEL, RANDOM_MODEL):
        reps = encodings.get(model, {})
        if reference not in reps:
            continue
        mine = None if kind == "rbf" else self_terms(reps, reference, kind)
        for lang in others:
            if lang in reps:
                pair = None if mine is None else (mine, self_terms(reps, lang, kind))
                controls[(model, lang)] = pair_cka(reps[reference], reps[lang], kind, precision, pair)
    tables = {TABLE.cka_vs_reference: _layer_table(parallel, ["language"]),
              TABLE.cka_controls: _layer_table(controls, ["condition", "language"])}
    return matrix, langs, tables


def cka_pairs_table(matrix: torch.Tensor, langs: Sequence[str], layers: Sequence[int]) -> pd.DataFrame:
    """All-pairs CKA at the chosen layers (`cka_pairs`): (layer, language) x language."""
    blocks = [pd.DataFrame(matrix[layer].cpu().numpy(), index=pd.Index(langs, name="language"), columns=list(langs))
              for layer in layers]
    table = pd.concat(blocks, keys=list(layers), names=["layer", "language"])
    table.columns.name = "language"
    return table


def cka_pairs_interval_tables(encodings: Mapping[str, Mapping[str, torch.Tensor]], langs: Sequence[str], layers: Sequence[int],
                              kind: str, blocks: int = 20) -> dict[str, pd.DataFrame]:
    """`cka_pairs_lo` / `_hi`: the 95% delete-a-block jackknife interval (`blocks` contiguous blocks of
    sentences, `xlsub.similarity.jackknife.cka_jackknife_interval`, as `cka_vs_reference_lo`) of every pair's
    CKA in `cka_pairs` (the full model's encodings), laid out as that table: (layer, language) x language."""
    full = encodings[FULL_MODEL]
    layers = list(layers)
    k = len(langs)
    lo, hi = torch.full((len(layers), k, k), math.nan, dtype=torch.float64), torch.full((len(layers), k, k), math.nan, dtype=torch.float64)
    n = full[langs[0]].shape[-2] if k else 0
    blocks = min(blocks, n)
    labels = jackknife_blocks(n, blocks) if k and kind != "rbf" else None
    selves = {} if labels is None else {lang: block_self_terms(full, lang, kind, labels, layers) for lang in langs}  # once per language
    for i, j in ((i, j) for i in range(k) for j in range(i, k)):
        x, y = full[langs[i]][layers], full[langs[j]][layers]
        pair = (selves[langs[i]], selves[langs[j]]) if selves else None
        if i == j and pair:  # a language with itself: its cross term is its self term
            interval = jackknife_bounds(ratio(pair[0].kept, pair[0].kept, pair[0].kept), ratio(pair[0].whole, pair[0].whole, pair[0].whole))
        else:
            interval = cka_jackknife_interval(x, y, kind, blocks, selves=pair)
        lo[:, i, j] = lo[:, j, i] = interval.lo.cpu()
        hi[:, i, j] = hi[:, j, i] = interval.hi.cpu()
    return {table_id: cka_pairs_table(dict(zip(layers, bound)), langs, layers) for table_id, bound in ((TABLE.cka_pairs_lo, lo), (TABLE.cka_pairs_hi, hi))}


def subnetwork_encodings(encodings: Mapping[str, object], languages: Sequence[str] = ()) -> dict[SubnetworkId, str]:
    """{SubnetworkId: model key} of the subnetworks among the encodings' model keys (`de-s0`; not `full`,
    `base`, `random`), in table order."""
    keys = {sid: key for key in encodings if (sid := SubnetworkId.parse_or_none(key)) is not None}
    return {sid: keys[sid] for sid in subnetwork_ids(keys, languages)}


def cka_subnetwork_tables(encodings: Mapping[str, Mapping[str, torch.Tensor]], languages: Sequence[str],
                          kind: str = "linear", precision: str = "float64") -> dict[str, pd.DataFrame]:
    """CKA between the full model and each subnetwork.

    `cka_full_vs_subnetwork`: for subnetwork `de-s0`, CKA(full[de], de-s0[de]) per layer; rows subnetworks.
    `cka_full_vs_subnetwork_last_layer`: at the last layer, CKA(full[e], s[e]) for subnetwork language s
    (rows, the mean over its seeds) and evaluation language e (columns).
    """
    full = encodings[FULL_MODEL]
    subs = subnetwork_encodings(encodings, languages)
    eval_langs = ordered(full, languages)
    curves, last = {}, {}
    for sid, key in tqdm(subs.items(), desc="CKA full vs subnetworks", leave=False, disable=len(subs) < 4):
        reps = encodings[key]
        if sid.language in reps and sid.language in full:
            pair = None if kind == "rbf" else (self_terms(full, sid.language, kind), self_terms(reps, sid.language, kind))
            curves[str(sid)] = pair_cka(full[sid.language], reps[sid.language], kind, precision, pair)
        last[str(sid)] = {e: float(pair_cka(last_layer(full, e)[None], last_layer(reps, e)[None], kind, precision,
                                            None if kind == "rbf" else (self_terms(full, e, kind, True), self_terms(reps, e, kind, True)))[0])
                          for e in eval_langs if e in reps}
    tables = {}
    if curves:
        tables[TABLE.cka_full_vs_subnetwork] = _layer_table(curves, ["subnetwork"])
    if last:
        by_seed = pd.DataFrame.from_dict(last, orient="index")
        table = _mean_over_seeds(by_seed)
        tables[TABLE.cka_full_vs_subnetwork_last_layer] = table.loc[:, ordered(table.columns, languages)]
    return tables


def resolve_layers(layers: Sequence[int] | None, count: int) -> list[int]:
    """The layers of the all-pairs heatmaps: default first, middle, last; negative indices count from the end."""
    if layers is None:
        return sorted({0, (count - 1) // 2, count - 1})
    resolved = []
    for layer in layers:
        if not -count <= int(layer) < count:
            raise XlsubError(f"layers: {layer} is out of range for {count} hidden states (0 = embeddings .. {count - 1})")
        resolved.append(int(layer) % count)
    return list(dict.fromkeys(resolved))
