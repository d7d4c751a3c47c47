"""Feed-forward neurons as the unit of subnetwork (issue 23): the analyze stage's tables, verdicts and
metrics for the neurons stage's output, as pure functions, judged at the level of languages.

Inputs are what the neurons stage records (`xlsub.artifacts`: NEURON_MASK, NEURON_MASK_HALVES, NEURON_ELIGIBLE,
NEURON_CHUNK_LOSSES). A neuron mask is [layers, neurons] of 0/1, 1 = kept; a language's neuron set is where its
mask is 0 (the neurons LAPE assigns to it, Tang et al. 2024, `xlsub.models.neurons.lape_selection`, switched
off). Chunk losses are keyed (model, draw, language) as the prune stage's: `full` (draw -1), each `de-s0` with its
neurons off (draw -1) and its random-neuron controls (the same count per layer; draws 0, 1, ...).

- `deactivation_tables`: the matrix Tang et al. report, perplexity with a language's neurons off over the full
  model's, per evaluation language (`neuron_deactivation`), its random-neuron control (`neuron_deactivation_random`,
  mean over draws), and their paired chunk-bootstrap intervals (`xlsub.stats.intervals`).
- `specificity`: "Does switching off a language's neurons hurt that language most?" Per language
  d = [log rel. ppl on its own language - mean over the others] - the same for its random neurons (seeds, draws
  and chunks averaged in); mean, sign-flip interval, one-sided p and leave-one-out over languages
  (`xlsub.stats.inference.unit_level`); within each language a chunk label-swap p, BH across languages, for
  "k of n".
- `jaccard_tables`: language x language Jaccard of the neuron sets (first seed), the chance level from the exact law
  of the overlap of random sets with the same count per layer (`set_jaccard`), its p per pair and BH.
- `stability_tables`: split-half (two disjoint halves of a language's text) and across-seed Jaccard, minus chance.
- `layer_tables`, `layers`: where language neurons sit, against the layer distribution of the neurons eligible for
  selection (not a uniform one): share in the outer layers (bottom and top quarter) minus the eligible share, per
  language, sign flips over languages; within a language an exact hypergeometric p.
- `neurons_vs_heads`: Mantel test (`xlsub.stats.inference.mantel_test`, exact relabelling up to 8 languages) of
  the head-mask Jaccard matrix against the neuron-set Jaccard matrix, with a leave-one-language-out jackknife
  interval; beside it, descriptive, the Spearman correlation of the deactivation matrix with the head
  subnetworks' cross-language relative perplexity (off-diagonal).
- `neuron_analysis`: all of them; (tables, verdicts, metrics, notes).

Layers in tables are numbered 1..L (mask row 0 is transformer layer 1), as `heads_kept_per_layer`.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations

import numpy as np
import pandas as pd
import scipy.stats
import torch

from xlsub.artifacts import FULL_MODEL, SubnetworkId, group_by_language, language_metric, ordered, subnetwork_ids
from xlsub.errors import XlsubError
from xlsub.models.mlm import ChunkLosses
from xlsub.report.verdicts import (
    ALPHA,
    KEYS,
    NEURON_LAYERS,
    NEURON_SPECIFICITY,
    NEURONS_VS_HEADS,
    Inference,
    Verdict,
    as_metrics,
    evidence,
    format_p,
    listed,
    robustness_clause,
    too_few_clause,
)
from xlsub.similarity.permutation import permutations as random_permutations
from xlsub.stats.inference import (
    EXACT_LIMIT,
    average_ranks,
    benjamini_hochberg,
    jackknife_interval,
    mantel_test,
    monte_carlo_p,
    percentile_interval,
    unit_level,
)
from xlsub.stats.intervals import relative_replicates
from xlsub.stats.overlap import jaccard

# -- names -----------------------------------------------------------------------------------------------
# These belong beside `TABLE` and `METRIC` in xlsub/artifacts.py (one home for every name); kept here until
# that file takes them.


@dataclass(frozen=True)
class NeuronTableIds:
    neuron_deactivation: str = "neuron_deactivation"  # neurons off (`de-s0`) x evaluated on: ppl / full ppl
    neuron_deactivation_lo: str = "neuron_deactivation_lo"  # its paired chunk-bootstrap 95% interval
    neuron_deactivation_hi: str = "neuron_deactivation_hi"
    neuron_deactivation_random: str = "neuron_deactivation_random"  # random neurons, same count per layer: mean over draws
    neuron_deactivation_random_lo: str = "neuron_deactivation_random_lo"
    neuron_deactivation_random_hi: str = "neuron_deactivation_random_hi"
    neuron_specificity: str = "neuron_specificity"  # per language: log own - log others, random's, d, p, p_bh
    neuron_jaccard: str = "neuron_jaccard"  # language x language Jaccard of neuron sets, first seed
    neuron_jaccard_expected: str = "neuron_jaccard_expected"  # its exact chance level
    neuron_jaccard_pvalue: str = "neuron_jaccard_pvalue"  # per pair: jaccard, expected, p_value, p_bh
    neuron_split_half: str = "neuron_split_half"  # per language: Jaccard of its two half-text sets, chance, excess
    neuron_seed_stability: str = "neuron_seed_stability"  # per language (several seeds): Jaccard across seeds, chance, excess
    neuron_layers: str = "neuron_layers"  # language / pooled / eligible x layer: share of the neurons in each layer
    neuron_outer_layers: str = "neuron_outer_layers"  # per language: outer-layer share, eligible's, d, p, p_bh
    neurons_vs_heads: str = "neurons_vs_heads"  # per comparison: r, interval, p


@dataclass(frozen=True)
class NeuronMetricNames:
    mean_neurons_off: str = "mean_neurons_off"
    mean_neuron_relative_ppl_diag: str = "mean_neuron_relative_ppl_diag"
    mean_neuron_relative_ppl_offdiag: str = "mean_neuron_relative_ppl_offdiag"
    mean_neuron_relative_ppl_random_diag: str = "mean_neuron_relative_ppl_random_diag"
    mean_neuron_relative_ppl_random_offdiag: str = "mean_neuron_relative_ppl_random_offdiag"
    neuron_specificity_excess: str = "neuron_specificity_excess"  # also per language: language_metric(., lang) = d
    neuron_specificity_excess_lo: str = "neuron_specificity_excess_lo"
    neuron_specificity_excess_hi: str = "neuron_specificity_excess_hi"
    neuron_specificity_excess_p: str = "neuron_specificity_excess_p"
    mean_neuron_jaccard: str = "mean_neuron_jaccard"
    mean_neuron_jaccard_expected: str = "mean_neuron_jaccard_expected"
    neuron_jaccard_pairs_significant: str = "neuron_jaccard_pairs_significant"
    mean_neuron_split_half_jaccard: str = "mean_neuron_split_half_jaccard"
    mean_neuron_split_half_excess: str = "mean_neuron_split_half_excess"
    mean_neuron_seed_stability: str = "mean_neuron_seed_stability"
    mean_neuron_seed_stability_excess: str = "mean_neuron_seed_stability_excess"
    neuron_outer_share: str = "neuron_outer_share"
    neuron_outer_share_eligible: str = "neuron_outer_share_eligible"
    neurons_vs_heads_mantel_r: str = "neurons_vs_heads_mantel_r"
    neurons_vs_heads_mantel_p: str = "neurons_vs_heads_mantel_p"
    neurons_vs_heads_ppl_spearman: str = "neurons_vs_heads_ppl_spearman"


NEURON_TABLE = NeuronTableIds()
NEURON_METRIC = NeuronMetricNames()

# The questions, in the report's order (declared with the others in `xlsub.report.verdicts`)
NEURON_QUESTIONS = (NEURON_SPECIFICITY, NEURON_LAYERS, NEURONS_VS_HEADS)
NEURON_KEYS = {question: KEYS[question] for question in NEURON_QUESTIONS}
MIN_MANTEL_LANGUAGES = 4  # with 3 languages, 3 pairs: no relabelling p below 1/6


@dataclass(frozen=True)
class NeuronVerdict(Verdict):
    """A `Verdict` whose key comes from `NEURON_KEYS` (the same schema, `as_dict` and `as_metrics`)."""

    @property
    def key(self) -> str:
        return NEURON_KEYS[self.question]


def _fmt(x: float) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.3g}"


def _interval(lo: float, hi: float) -> str:
    return f"95% interval [{_fmt(lo)}, {_fmt(hi)}]" if math.isfinite(lo) and math.isfinite(hi) else "no interval"


def _cannot_tell(question: str, why: str, control: str, unit: str) -> NeuronVerdict:
    return NeuronVerdict(question, f"cannot tell: {why}", math.nan, math.nan, math.nan, control, math.nan, math.nan,
                         Inference(unit, 0, "none", math.nan))


# -- neuron sets -------------------------------------------------------------------------------------------

def neuron_set(mask: torch.Tensor, name: str = "neuron mask") -> torch.Tensor:
    """The language's neurons of a [layers, neurons] 0/1 mask (1 = kept): bool, True where the mask is 0."""
    mask = torch.as_tensor(mask)
    if mask.ndim != 2 or not bool(((mask == 0) | (mask == 1)).all()):
        raise XlsubError(f"{name}: expected a [layers, neurons] tensor of 0/1, got shape {tuple(mask.shape)}; "
                         "pass the neurons stage's neuron_mask.json")
    return mask == 0


def set_overlap_law(set_a: torch.Tensor, set_b: torch.Tensor) -> np.ndarray:
    """P(O = i), i = 0..sum_l min(k_a(l), k_b(l)), of the overlap O = |A & B| of independent random sets with as
    many neurons in every layer as set_a and set_b: per layer a hypergeometric (scipy's pmf, float64), convolved
    over the layers. The law `xlsub.stats.overlap.overlap_null` computes in integers; in floats, because at FFN
    widths (thousands of neurons a layer, hundreds selected) the integers cost seconds per pair."""
    a, b = torch.as_tensor(set_a).bool(), torch.as_tensor(set_b).bool()
    if a.shape != b.shape or a.ndim != 2:
        raise XlsubError(f"neuron sets of shapes {tuple(a.shape)} and {tuple(b.shape)} cannot be compared; use masks of one neurons run")
    neurons = a.shape[1]
    law = np.ones(1)
    for k_a, k_b in zip(a.sum(1).tolist(), b.sum(1).tolist()):
        law = np.convolve(law, scipy.stats.hypergeom.pmf(np.arange(min(k_a, k_b) + 1), neurons, k_a, k_b))
    return law


def set_jaccard(set_a: torch.Tensor, set_b: torch.Tensor) -> tuple[float, float, float]:
    """(Jaccard, its chance level, its one-sided p) of two neuron sets, against random sets with the same count
    per layer (`set_overlap_law`). Chance: E[J] = sum_i P(O = i) i / (K_a + K_b - i), exactly (not E[O] / E[union]);
    p = P(J >= observed) = P(O >= observed overlap), J being increasing in O for fixed sizes (as
    `xlsub.stats.overlap.jaccard_pvalue`). Two empty sets: J = 1, chance 1, p = 1, as `jaccard`."""
    a, b = torch.as_tensor(set_a).bool(), torch.as_tensor(set_b).bool()
    law = set_overlap_law(a, b)
    k_a, k_b, observed = int(a.sum()), int(b.sum()), int((a & b).sum())
    if k_a + k_b == 0:
        return 1.0, 1.0, 1.0
    overlap = np.arange(len(law))
    expected = float((law * overlap / (k_a + k_b - overlap)).sum())
    return observed / (k_a + k_b - observed), expected, min(1.0, float(law[observed:].sum()))


def expected_set_jaccard(set_a: torch.Tensor, set_b: torch.Tensor) -> float:
    """E[Jaccard(A, B)] for independent random sets with as many neurons in every layer as set_a and set_b
    (`set_jaccard`); the number `xlsub.stats.overlap.expected_random_jaccard` gives, at FFN widths in milliseconds."""
    return set_jaccard(set_a, set_b)[1]


def _sets(masks: Mapping[SubnetworkId, torch.Tensor]) -> dict[SubnetworkId, torch.Tensor]:
    sets = {sid: neuron_set(mask, f"neuron mask of {sid}") for sid, mask in masks.items()}
    shapes = {tuple(s.shape) for s in sets.values()}
    if len(shapes) > 1:
        raise XlsubError(f"neuron masks: shapes {sorted(shapes)} differ; use masks of one neurons run")
    return sets


def _first_seed(values: Mapping[SubnetworkId, object], languages: Sequence[str]) -> dict[str, object]:
    return {lang: next(iter(by_seed.values())) for lang, by_seed in group_by_language(values, languages).items()}


def _symmetric(values: Mapping[tuple[str, str], float], langs: Sequence[str]) -> pd.DataFrame:
    index = pd.Index(list(langs), name="language")
    table = pd.DataFrame(np.nan, index=index, columns=index.copy())
    for (a, b), value in values.items():
        table.loc[a, b] = table.loc[b, a] = value
    return table


# -- the deactivation matrix ---------------------------------------------------------------------------------

def _losses(chunk_losses: Mapping[tuple[str, int, str], object]) -> dict[tuple[str, int, str], ChunkLosses]:
    """ChunkLosses, also from `read_chunk_losses`' (nll, tokens) pairs."""
    return {key: value if isinstance(value, ChunkLosses) else ChunkLosses(*value) for key, value in chunk_losses.items()}


@dataclass(frozen=True)
class _Cells:
    full: dict[str, ChunkLosses]  # evaluation language -> the full model's chunks
    off: dict[tuple[str, str], ChunkLosses]  # (subnetwork id, evaluation language) -> its neurons off
    random: dict[tuple[str, str], list[ChunkLosses]]  # the same -> its random-neuron draws, in draw order
    ids: list[SubnetworkId]  # table order
    evaluated: list[str]  # evaluation languages, `languages` order


def _cells(chunk_losses: Mapping[tuple[str, int, str], object], languages: Sequence[str]) -> _Cells:
    losses = _losses(chunk_losses)
    full = {lang: c for (model, draw, lang), c in losses.items() if model == FULL_MODEL}
    off, random = {}, {}
    for (model, draw, lang), c in sorted(losses.items(), key=lambda item: item[0][1]):
        if model == FULL_MODEL or lang not in full:
            continue
        SubnetworkId.parse(model)
        if draw < 0:
            off[(model, lang)] = c
        else:
            random.setdefault((model, lang), []).append(c)
    ids = subnetwork_ids({SubnetworkId.parse(model): None for model, _ in off}, languages)
    evaluated = ordered(dict.fromkeys(lang for _, lang in off), languages)
    return _Cells(full, off, random, ids, evaluated)


def _matrix(values: Mapping[tuple[str, str], float], ids: Sequence[SubnetworkId], evaluated: Sequence[str]) -> pd.DataFrame:
    return pd.DataFrame([[values.get((str(sid), lang), math.nan) for lang in evaluated] for sid in ids],
                        index=pd.Index([str(sid) for sid in ids], name="neurons off"),
                        columns=pd.Index(list(evaluated), name="evaluated on"), dtype=float)


def deactivation_tables(chunk_losses: Mapping[tuple[str, int, str], object], languages: Sequence[str],
                        bootstrap: int, seed: int) -> dict[str, pd.DataFrame]:
    """The deactivation matrix (Tang et al. 2024, their Fig. 3) and its random-neuron control.

    `neuron_deactivation`: rows `de-s0` (that subnetwork's neurons off), columns evaluation languages, values
    ppl(neurons off) / ppl(full) on all test chunks of the evaluation language; `neuron_deactivation_random`:
    the mean over the random draws of ppl(draw) / ppl(full). With `bootstrap` > 0, their 95% paired
    chunk-bootstrap intervals (`_lo`, `_hi`; `xlsub.stats.intervals.relative_replicates`, the random draws
    resampled too). Empty without chunk losses of the full model and a neuron set.
    """
    cells = _cells(chunk_losses, languages)
    if not cells.off:
        return {}
    full_ppl = {lang: c.perplexity for lang, c in cells.full.items()}
    point = {cell: c.perplexity / full_ppl[cell[1]] for cell, c in cells.off.items()}
    random_point = {cell: float(np.mean([c.perplexity for c in draws])) / full_ppl[cell[1]] for cell, draws in cells.random.items()}
    tables = {NEURON_TABLE.neuron_deactivation: _matrix(point, cells.ids, cells.evaluated)}
    if random_point:
        tables[NEURON_TABLE.neuron_deactivation_random] = _matrix(random_point, cells.ids, cells.evaluated)
    if bootstrap > 0:
        reps, random_reps = relative_replicates(cells.off, cells.random, cells.full, bootstrap, seed)
        for (lo_id, hi_id), replicates in (((NEURON_TABLE.neuron_deactivation_lo, NEURON_TABLE.neuron_deactivation_hi), reps),
                                           ((NEURON_TABLE.neuron_deactivation_random_lo, NEURON_TABLE.neuron_deactivation_random_hi),
                                            random_reps)):
            if not replicates:
                continue
            bounds = {cell: percentile_interval(values) for cell, values in replicates.items()}
            tables[lo_id] = _matrix({cell: b[0] for cell, b in bounds.items()}, cells.ids, cells.evaluated)
            tables[hi_id] = _matrix({cell: b[1] for cell, b in bounds.items()}, cells.ids, cells.evaluated)
    return tables


def by_language(matrix: pd.DataFrame) -> pd.DataFrame:
    """Rows `de-s0`, `de-s1`, ... -> one row per language whose neurons are off: the mean over its seeds."""
    means = matrix.groupby(matrix.index.map(lambda row: SubnetworkId.parse(row).language), sort=False).mean()
    means.index.name, means.columns.name = "neurons off", matrix.columns.name
    return means


# -- does switching off a language's neurons hurt that language most? ------------------------------------------

def _log_gap(log_relative: Mapping[str, float], own: str) -> float:
    """log rel. ppl on its own language minus the mean over the other evaluation languages."""
    others = [v for lang, v in log_relative.items() if lang != own]
    return log_relative[own] - float(np.mean(others)) if others and own in log_relative else math.nan


def _swap_seed(seed: int, language: str) -> int:
    """The label-swap test's generator seed for a language: stable whichever other languages are analysed."""
    return seed * 1_000_003 + zlib.crc32(f"neuron label swap {language}".encode())


def label_swap_test(chunk_losses: Mapping[tuple[str, int, str], object], language: str, languages: Sequence[str],
                    n_swaps: int, seed: int) -> tuple[float, float]:
    """Within one language: are its neurons off worse for it, relative to the others, than random neurons?

    H0: on every test chunk the loss with the language's neurons off and that with its random neurons (the
    draws' mean NLL and mean token count) are exchangeable. Statistic: the language's gap (log rel. ppl on its
    own language minus the mean over the others), neurons off minus random, mean over its seeds. Each of
    `n_swaps` null replicates swaps the two models' chunk losses, independently per seed, evaluation language
    (`languages` order) and chunk with probability 1/2 (`torch.Generator().manual_seed(seed)`). Returns (observed, p), p =
    (1 + #) / (1 + n_swaps). A test of chunks inside one language: it counts the languages the claim holds
    for ("k of n"), never the claim about languages.
    """
    cells = _cells(chunk_losses, languages)
    generator = torch.Generator().manual_seed(seed)
    statistics = []
    for sid in [sid for sid in cells.ids if sid.language == language]:
        log_rel: dict[str, torch.Tensor] = {}
        for lang in cells.evaluated:
            cell = (str(sid), lang)
            if cell not in cells.off or cell not in cells.random:
                continue
            off, draws = cells.off[cell], cells.random[cell]
            control_nll = torch.stack([c.nll.double() for c in draws]).mean(0)
            control_tokens = torch.stack([c.tokens.double() for c in draws]).mean(0)
            swap = torch.rand(n_swaps, len(off.nll), generator=generator) < 0.5
            swap = torch.cat([torch.zeros(1, len(off.nll), dtype=torch.bool), swap])  # row 0: as observed
            log_full = float(cells.full[lang].nll.sum()) / float(cells.full[lang].tokens.sum())
            pair = []
            for own, other in (((off.nll.double(), off.tokens.double()), (control_nll, control_tokens)),
                               ((control_nll, control_tokens), (off.nll.double(), off.tokens.double()))):
                pair.append(torch.where(swap, other[0], own[0]).sum(-1) / torch.where(swap, other[1], own[1]).sum(-1) - log_full)
            log_rel[lang] = torch.stack(pair)  # [2, 1 + n_swaps]: neurons off, random
        others = [v for lang, v in log_rel.items() if lang != language]
        if language in log_rel and others:
            gap = log_rel[language] - torch.stack(others).mean(0)
            statistics.append(gap[0] - gap[1])
    if not statistics:
        return math.nan, math.nan
    statistic = torch.stack(statistics).mean(0)
    return float(statistic[0]), monte_carlo_p(statistic[1:].numpy(), float(statistic[0]))


def specificity_table(chunk_losses: Mapping[tuple[str, int, str], object], languages: Sequence[str], n_swaps: int,
                      seed: int) -> pd.DataFrame:
    """Per language whose neurons are off (rows in `languages` order), from all test chunks of every evaluation
    language: `own` = log(ppl / full ppl) on its own language, `others` = its mean over the other languages,
    `gap` = own - others (> 0: its own language is hurt most), `random_gap` the same for its random neurons
    (each cell the mean over draws of log(ppl(draw) / full ppl)), `d` = gap - random_gap, each the mean over
    the language's seeds; `p_value` from `label_swap_test` (`n_swaps` swaps), `p_bh` across languages; `seeds`.
    Languages without random draws, without their own language or without another evaluated are left out.
    """
    cells = _cells(chunk_losses, languages)
    full_log = {lang: math.log(c.perplexity) for lang, c in cells.full.items()}
    rows: dict[str, dict[str, list[float]]] = {}
    for sid in cells.ids:
        name = str(sid)
        log_rel = {lang: math.log(cells.off[(name, lang)].perplexity) - full_log[lang]
                   for lang in cells.evaluated if (name, lang) in cells.off}
        log_random = {lang: float(np.mean([math.log(c.perplexity) for c in cells.random[(name, lang)]])) - full_log[lang]
                      for lang in cells.evaluated if (name, lang) in cells.random}
        gap, random_gap = _log_gap(log_rel, sid.language), _log_gap(log_random, sid.language)
        if not (math.isfinite(gap) and math.isfinite(random_gap)):
            continue
        others = float(np.mean([v for lang, v in log_rel.items() if lang != sid.language]))
        row = rows.setdefault(sid.language, {"own": [], "others": [], "gap": [], "random_gap": [], "d": []})
        for key, value in (("own", log_rel[sid.language]), ("others", others), ("gap", gap), ("random_gap", random_gap),
                           ("d", gap - random_gap)):
            row[key].append(value)
    columns = ["own", "others", "gap", "random_gap", "d", "p_value", "p_bh", "seeds"]
    if not rows:
        return pd.DataFrame(columns=columns, index=pd.Index([], name="neurons off"), dtype=float)
    table = pd.DataFrame({lang: {key: float(np.mean(v)) for key, v in row.items()} | {"seeds": len(row["d"])}
                          for lang, row in rows.items()}).T
    table["p_value"] = [label_swap_test(chunk_losses, lang, languages, n_swaps, _swap_seed(seed, lang))[1] for lang in table.index]
    table["p_bh"] = benjamini_hochberg(table["p_value"].to_numpy(dtype=float))
    table.index.name = "neurons off"
    return table[columns]


def specificity_verdict(table: pd.DataFrame, permutations: int, seed: int) -> NeuronVerdict:
    """The verdict on the `neuron_specificity` table: the claim is about languages, judged on one d per
    language (`xlsub.stats.inference.unit_level`: mean, sign-flip interval, one-sided sign-flip p, exact up to
    16 languages, and leave-one-language-out). "yes" needs p < ALPHA and a lower end above 0 (so at least 6
    languages at 95%); "for k of n languages" counts those with d > 0 and BH-adjusted within-language p < ALPHA.
    """
    control = "random neurons with the same count per layer"
    tested = table.dropna(subset=["d"])
    if tested.empty:
        return _cannot_tell(NEURON_SPECIFICITY, "no language has its neurons off and random-neuron controls evaluated on "
                            "its own and another language; run the neurons stage with random_draws >= 1", control, "languages")
    level = unit_level(tested["d"].to_numpy(dtype=float), n_perm=permutations, seed=seed)
    inference = Inference("languages > seeds > random draws > chunks", level.n_units, level.test, level.p_floor,
                          level.robust_to_leave_one_out)
    n, p_text = level.n_units, format_p(level.p, level.p_floor)
    random_gap = float(tested["random_gap"].mean())
    holds = [lang for lang, row in tested.iterrows() if row["d"] > 0 and row["p_bh"] < ALPHA]
    without = [lang for lang in tested.index if lang not in holds]
    includes = ", which includes 0" if math.isfinite(level.lo) and level.lo <= 0 else ""
    shown = (f"{_fmt(level.value)} in log perplexity relative to the full model (mean over {n} languages, "
             f"{_interval(level.lo, level.hi)}{includes} from sign flips over languages; random neurons' own gap {_fmt(random_gap)})")
    if math.isfinite(level.lo) and level.lo > 0 and level.p < ALPHA:
        scope = f"for all {n} languages" if not without else f"for {len(holds)} of {n} languages"
        answer = (f"yes {scope}: switching off a language's neurons raises its own perplexity more, against the other "
                  f"languages', than switching off as many random neurons per layer, by {shown}, one-sided {p_text}")
        if without:
            answer += (f"; {listed(without)} {'shows' if len(without) == 1 else 'show'} no excess over random neurons "
                       f"(BH-adjusted p >= {ALPHA:g})")
    else:
        answer = (f"no evidence at the level of languages: with a language's neurons off, its own perplexity rises, against "
                  f"the other languages', more than with random neurons by {shown}, "
                  f"one-sided {p_text}{too_few_clause(inference, level.lo)}; within languages the excess is significant for "
                  f"{len(holds)} of {len(tested)} (BH-adjusted p < {ALPHA:g})")
    answer += robustness_clause(inference)
    return NeuronVerdict(NEURON_SPECIFICITY, answer, level.value, level.lo, level.hi, control, random_gap, level.p, inference)


def specificity(chunk_losses: Mapping[tuple[str, int, str], object], languages: Sequence[str], permutations: int,
                seed: int) -> tuple[pd.DataFrame, NeuronVerdict]:
    """`specificity_table` (`permutations` label swaps per language) and its `specificity_verdict`."""
    table = specificity_table(chunk_losses, languages, permutations, seed)
    return table, specificity_verdict(table, permutations, seed)


# -- overlap and stability ------------------------------------------------------------------------------------

_PVALUE_COLUMNS = ["language_a", "language_b", "jaccard", "expected", "p_value", "p_bh"]


def jaccard_tables(masks: Mapping[SubnetworkId, torch.Tensor], languages: Sequence[str]) -> dict[str, pd.DataFrame]:
    """The languages' neuron sets against each other, first seed (each language's smallest): `neuron_jaccard`
    (language x language, diagonal 1), `neuron_jaccard_expected` (`expected_set_jaccard`: random sets with the
    same count per layer; its diagonal is the chance overlap of two such sets of one language) and
    `neuron_jaccard_pvalue`: per pair a < b the Jaccard, its chance level, the one-sided p of the exact law
    (`set_jaccard`: P(overlap >= observed)) and `p_bh` across the pairs."""
    first = _first_seed(_sets(masks), languages)
    pairs = {(a, b): set_jaccard(first[a], first[b]) for i, a in enumerate(first) for b in list(first)[i:]}
    rows = [{"language_a": a, "language_b": b, "jaccard": j, "expected": e, "p_value": p}
            for (a, b), (j, e, p) in pairs.items() if a != b]
    pvalues = pd.DataFrame(rows, columns=_PVALUE_COLUMNS)
    pvalues["p_bh"] = benjamini_hochberg(pvalues["p_value"].to_numpy(dtype=float))
    return {NEURON_TABLE.neuron_jaccard: _symmetric({pair: j for pair, (j, _, _) in pairs.items()}, list(first)),
            NEURON_TABLE.neuron_jaccard_expected: _symmetric({pair: e for pair, (_, e, _) in pairs.items()}, list(first)),
            NEURON_TABLE.neuron_jaccard_pvalue: pvalues.set_index(["language_a", "language_b"])}


def stability_tables(masks: Mapping[SubnetworkId, torch.Tensor], halves: Mapping[SubnetworkId, Mapping[str, torch.Tensor]],
                     languages: Sequence[str]) -> dict[str, pd.DataFrame]:
    """How reproducible a language's neuron set is, against chance (descriptive).

    `neuron_split_half`: per language, the Jaccard of the sets selected from two disjoint halves of its text
    (`halves[sid]` = {"a": mask, "b": mask} or the pair (a, b)), its chance level `expected` (`expected_set_jaccard`), `excess` =
    jaccard - expected, the sets' sizes, each the mean over the language's seeds. `neuron_seed_stability`
    (languages with two or more seeds): the mean Jaccard over its seed pairs, its chance level, excess, pairs.
    """
    tables = {}
    rows = {}
    for lang, by_seed in group_by_language(halves, languages).items():
        values = []
        for sid_seed, pair in by_seed.items():
            pair = (pair["a"], pair["b"]) if isinstance(pair, Mapping) else tuple(pair)
            a, b = (neuron_set(m, f"{NEURON_TABLE.neuron_split_half} {lang}-s{sid_seed} half {half}") for m, half in zip(pair, "ab"))
            j, e = jaccard(a.int(), b.int()), expected_set_jaccard(a, b)
            values.append((j, e, j - e, int(a.sum()), int(b.sum())))
        mean = np.mean(values, axis=0)
        rows[lang] = dict(zip(("jaccard", "expected", "excess", "neurons_a", "neurons_b"), mean.tolist())) | {"seeds": len(values)}
    if rows:
        tables[NEURON_TABLE.neuron_split_half] = pd.DataFrame.from_dict(rows, orient="index").rename_axis("language")
    rows = {}
    for lang, by_seed in group_by_language(_sets(masks), languages).items():
        pairs = list(combinations(by_seed.values(), 2))
        if pairs:
            j = float(np.mean([jaccard(a.int(), b.int()) for a, b in pairs]))
            e = float(np.mean([expected_set_jaccard(a, b) for a, b in pairs]))
            rows[lang] = {"jaccard": j, "expected": e, "excess": j - e, "pairs": len(pairs)}
    if rows:
        tables[NEURON_TABLE.neuron_seed_stability] = pd.DataFrame.from_dict(rows, orient="index").rename_axis("language")
    return tables


# -- where the neurons sit ----------------------------------------------------------------------------------

def outer_layers(layers: int) -> torch.Tensor:
    """bool [layers]: the bottom and top quarter of the layers (at least one each), where LAPE finds language
    neurons concentrated (Tang et al. 2024). With fewer than 3 layers every layer is outer."""
    quarter = max(1, layers // 4)
    outer = torch.zeros(layers, dtype=torch.bool)
    outer[:quarter] = outer[layers - quarter:] = True
    return outer


def _eligible(eligible: Mapping[object, torch.Tensor]) -> dict[int, torch.Tensor]:
    out = {}
    for key, value in eligible.items():
        tensor = torch.as_tensor(value)
        if tensor.ndim != 2 or not bool(((tensor == 0) | (tensor == 1)).all()):
            raise XlsubError(f"eligible neurons of seed {key}: expected a [layers, neurons] tensor of 0/1; pass the neurons "
                             "stage's neuron_eligible.json")
        out[int(key)] = tensor == 1
    return out


def hypergeometric_upper(population: int, successes: int, draws: int, observed: int) -> float:
    """P(X >= observed) for X hypergeometric: `draws` of `population` items without replacement, `successes`
    of them marked; exactly, in integers (one division)."""
    if draws > population or successes > population:
        raise ValueError(f"draws {draws} and successes {successes} must not exceed the population {population}")
    total = math.comb(population, draws)
    tail = sum(math.comb(successes, i) * math.comb(population - successes, draws - i)
               for i in range(max(observed, 0), min(successes, draws) + 1))
    return tail / total


def layer_tables(masks: Mapping[SubnetworkId, torch.Tensor], eligible: Mapping[object, torch.Tensor],
                 languages: Sequence[str]) -> dict[str, pd.DataFrame]:
    """Where the language neurons sit, against the neurons eligible for selection.

    `neuron_layers`: rows each language (the mean over its seeds of the share of its neurons in each layer),
    `pooled` (every subnetwork's neurons together) and `eligible` (the mean over seeds of the share of the
    eligible neurons: those LAPE could select, p above some language's filter quantile); columns layers 1..L.
    `neuron_outer_layers`: per language with neurons, `outer_share` = share of its neurons in the outer layers
    (`outer_layers`), `eligible_share` = the eligible neurons' share there (same seed), `d` = the difference,
    each the mean over its seeds; `neurons`; `p_value`: exact hypergeometric P(at least as many of its eligible
    neurons in the outer layers) were they a random subset of the eligible neurons (`hypergeometric_upper`,
    first seed; neurons outside the eligible set are not counted), `p_bh` across languages.
    """
    sets = _sets(masks)
    allowed = _eligible(eligible)
    missing = sorted({sid.seed for sid in sets} - set(allowed))
    if missing:
        raise XlsubError(f"eligible neurons: none for seeds {missing}; pass the neurons stage's neuron_eligible.json for every seed")
    layers = next(iter(sets.values())).shape[0]
    outer = outer_layers(layers)
    columns = pd.RangeIndex(1, layers + 1, name="layer")
    shares: dict[str, list[np.ndarray]] = {}
    rows: dict[str, dict[str, list[float]]] = {}
    first: dict[str, float] = {}
    pooled = np.zeros(layers)
    for sid in subnetwork_ids(sets, languages):
        s, e = sets[sid], allowed[sid.seed]
        if tuple(e.shape) != tuple(s.shape):
            raise XlsubError(f"eligible neurons of seed {sid.seed}: shape {tuple(e.shape)}, the neuron masks {tuple(s.shape)}; "
                             "use both from one neurons run")
        counts = s.sum(1).double().numpy()
        pooled += counts
        if counts.sum() == 0 or int(e.sum()) == 0:
            continue
        share = counts / counts.sum()
        eligible_share = float(e[outer].sum()) / float(e.sum())
        shares.setdefault(sid.language, []).append(share)
        row = rows.setdefault(sid.language, {"outer_share": [], "eligible_share": [], "d": [], "neurons": []})
        for key, value in (("outer_share", float(share[outer.numpy()].sum())), ("eligible_share", eligible_share),
                           ("d", float(share[outer.numpy()].sum()) - eligible_share), ("neurons", float(counts.sum()))):
            row[key].append(value)
        if sid.language not in first:
            chosen = s & e
            first[sid.language] = hypergeometric_upper(int(e.sum()), int(e[outer].sum()), int(chosen.sum()), int(chosen[outer].sum()))
    per_layer = {lang: np.mean(v, axis=0) for lang, v in shares.items()}
    if pooled.sum() > 0:
        per_layer["pooled"] = pooled / pooled.sum()
    used = sorted({sid.seed for sid in sets})
    per_layer["eligible"] = np.mean([(allowed[s].sum(1).double() / max(int(allowed[s].sum()), 1)).numpy() for s in used], axis=0)
    table = pd.DataFrame.from_dict(per_layer, orient="index", columns=columns)
    table.index.name = "neurons"
    tables = {NEURON_TABLE.neuron_layers: table}
    outer_table = pd.DataFrame({lang: {key: float(np.mean(v)) for key, v in row.items()} | {"seeds": len(row["d"])}
                                for lang, row in rows.items()}, index=["outer_share", "eligible_share", "d", "neurons", "seeds"]).T
    outer_table["p_value"] = [first[lang] for lang in outer_table.index]
    outer_table["p_bh"] = benjamini_hochberg(outer_table["p_value"].to_numpy(dtype=float))
    outer_table.index.name = "language"
    tables[NEURON_TABLE.neuron_outer_layers] = outer_table
    return tables


def layers_verdict(outer: pd.DataFrame, layers: int, permutations: int, seed: int) -> NeuronVerdict:
    """Do language neurons concentrate in the bottom and top layers? On `neuron_outer_layers`: per language
    d = its neurons' share in the outer layers minus the eligible neurons' share there; the mean over languages
    with its sign-flip interval, one-sided p and leave-one-out (`unit_level`). Shown as the languages' mean
    share (the interval shifted by the eligible share, exact given the masks) against the eligible share."""
    control = "neurons eligible for selection (their share in the outer layers)"
    unit = "languages > seeds"
    outer_index = outer_layers(layers)
    if bool(outer_index.all()):
        return _cannot_tell(NEURON_LAYERS, f"with {layers} layers every layer is a bottom or top layer", control, unit)
    if outer.empty:
        return _cannot_tell(NEURON_LAYERS, "no language has neurons among the eligible ones", control, unit)
    level = unit_level(outer["d"].to_numpy(dtype=float), n_perm=permutations, seed=seed)
    inference = Inference(unit, level.n_units, level.test, level.p_floor, level.robust_to_leave_one_out)
    eligible = float(outer["eligible_share"].mean())
    share = float(outer["outer_share"].mean())
    lo, hi = eligible + level.lo, eligible + level.hi
    which = [i + 1 for i in range(layers) if outer_index[i]]
    where = f"layers {', '.join(map(str, which))} of {layers}"
    holds = [lang for lang, row in outer.iterrows() if row["d"] > 0 and row["p_bh"] < ALPHA]
    count = (f"; within languages, more than the eligible neurons for {len(holds)} of {len(outer)} (exact hypergeometric, "
             f"BH-adjusted p < {ALPHA:g})")
    shown = (f"{_fmt(share)} of a language's neurons lie in the bottom and top layers ({where}; {_interval(lo, hi)} from sign "
             f"flips over {level.n_units} languages), against {_fmt(eligible)} of the neurons eligible for selection")
    if evidence(share, lo, hi, eligible, level.p):
        answer = f"yes: {shown}, one-sided {format_p(level.p, level.p_floor)}{count}"
    else:
        answer = f"no evidence at the level of languages: {shown}, one-sided {format_p(level.p, level.p_floor)}{too_few_clause(inference, lo)}{count}"
    answer += robustness_clause(inference)
    return NeuronVerdict(NEURON_LAYERS, answer, share, lo, hi, control, eligible, level.p, inference)


# -- heads and neurons -------------------------------------------------------------------------------------

def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho: Pearson's r of the average ranks; NaN where either is constant or fewer than 3 pairs."""
    if len(x) < 3:
        return math.nan
    rx, ry = (average_ranks(torch.as_tensor(v, dtype=torch.float64)).numpy() for v in (x, y))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    return math.nan if denominator == 0 else float((rx * ry).sum() / denominator)


def _mantel(x: np.ndarray, y: np.ndarray, permutations: int, seed: int) -> tuple[float, float, float, str]:
    """`mantel_test` (Spearman, "greater") of two language x language matrices: exact over all k! relabellings
    up to `EXACT_LIMIT`, else `permutations` random ones from `seed`. (r, p, p_floor, test)."""
    k = len(x)
    sample = None if math.factorial(k) <= EXACT_LIMIT else random_permutations(k, permutations, seed)
    result = mantel_test(torch.as_tensor(x), torch.as_tensor(y), sample=sample)
    return float(result.observed), float(result.p_value), result.p_floor, result.test


def offdiagonal_spearman(neurons: pd.DataFrame, heads: pd.DataFrame) -> tuple[float, int]:
    """Spearman's rho between the off-diagonal cells (row language != column language) that two language x
    evaluation-language matrices share, both finite; (rho, cells)."""
    rows = [r for r in neurons.index if r in heads.index]
    columns = [c for c in neurons.columns if c in heads.columns]
    pairs = [(float(neurons.loc[r, c]), float(heads.loc[r, c])) for r in rows for c in columns if r != c]
    pairs = [(a, b) for a, b in pairs if math.isfinite(a) and math.isfinite(b)]
    if not pairs:
        return math.nan, 0
    x, y = np.array(pairs).T
    return _spearman(x, y), len(pairs)


def _head_relative_by_language(head_relative: pd.DataFrame) -> pd.DataFrame:
    """Rows `de-s0` become languages (mean over seeds); rows already languages stay."""
    if all(SubnetworkId.parse_or_none(str(r)) is not None for r in head_relative.index):
        return by_language(head_relative)
    return head_relative


def neurons_vs_heads(masks: Mapping[SubnetworkId, torch.Tensor], head_masks: Mapping[SubnetworkId, torch.Tensor],
                     languages: Sequence[str], permutations: int, seed: int, deactivation: pd.DataFrame | None = None,
                     head_relative: pd.DataFrame | None = None) -> tuple[pd.DataFrame, NeuronVerdict]:
    """Do languages that share heads share neurons? Mantel test (Spearman; `mantel_test`, exact relabelling up to
    8 languages, else `permutations` random ones) of the first-seed Jaccard of kept heads against the first-seed
    Jaccard of neuron sets, over the languages with both; the interval is the delete-one-language jackknife
    (`jackknife_interval` of the leave-one-out r, clipped to [-1, 1]), and leave-one-out asks whether p < ALPHA survives dropping any
    language. Beside it, descriptive: Spearman's rho of the off-diagonal cells of the deactivation matrix (mean over
    seeds, `deactivation`: rows `de-s0`) against the head subnetworks' relative cross-language perplexity
    (`head_relative`, `cross_ppl_relative`). Returns the `neurons_vs_heads` table and the verdict.
    """
    control = "no association (languages relabelled)"
    unit = "languages (relabelled)"
    neuron_first = _first_seed(_sets(masks), languages)
    head_first = _first_seed(dict(head_masks), languages)
    common = [lang for lang in neuron_first if lang in head_first]
    rows = []
    rho, cells = math.nan, 0
    if deactivation is not None and head_relative is not None and not deactivation.empty and not head_relative.empty:
        rho, cells = offdiagonal_spearman(by_language(deactivation), _head_relative_by_language(head_relative))
        rows.append({"comparison": "deactivation_vs_head_cross_ppl", "r": rho, "lo": math.nan, "hi": math.nan, "p": math.nan,
                     "p_floor": math.nan, "test": "descriptive", "n": cells})
    ppl_text = ("" if cells == 0 else
                f"; descriptively, the deactivation matrix and the head subnetworks' relative perplexity correlate at Spearman "
                f"{_fmt(rho)} over {cells} off-diagonal cells (shared computation in both units predicts a negative value: a "
                f"language hurt by another's neurons off is served well by that language's heads)")
    if len(common) < MIN_MANTEL_LANGUAGES:
        verdict = _cannot_tell(NEURONS_VS_HEADS, f"{len(common)} languages have both head masks and neuron sets; a Mantel test "
                               f"needs {MIN_MANTEL_LANGUAGES}{ppl_text}", control, unit)
        return pd.DataFrame(rows).set_index("comparison") if rows else pd.DataFrame(), verdict
    heads = np.array([[jaccard(head_first[a], head_first[b]) for b in common] for a in common])
    neurons = np.array([[jaccard(neuron_first[a].int(), neuron_first[b].int()) for b in common] for a in common])
    r, p, floor, test = _mantel(heads, neurons, permutations, seed)
    leave_out = []
    for i in range(len(common)):
        keep = [j for j in range(len(common)) if j != i]
        leave_out.append(_mantel(heads[np.ix_(keep, keep)], neurons[np.ix_(keep, keep)], permutations, seed)[:2])
    loo_r = torch.tensor([x for x, _ in leave_out], dtype=torch.float64)
    if math.isfinite(r) and bool(loo_r.isfinite().all()):
        lo, hi = (min(1.0, max(-1.0, float(x))) for x in jackknife_interval(r, loo_r))  # a correlation's range
    else:
        lo, hi = math.nan, math.nan
    decided = evidence(r, lo, hi, 0.0, p)
    robust = all((math.isfinite(pi) and pi < ALPHA and ri > 0) == decided for ri, pi in leave_out)
    inference = Inference(unit, len(common), test, floor, robust)
    rows.insert(0, {"comparison": "mantel_jaccard_heads_vs_neurons", "r": r, "lo": lo, "hi": hi, "p": p, "p_floor": floor,
                    "test": test, "n": len(common)})
    shown = (f"the head-mask Jaccard and the neuron-set Jaccard of {len(common)} languages correlate at Mantel r = {_fmt(r)} "
             f"(Spearman; {_interval(lo, hi)}, delete-one-language jackknife), one-sided {format_p(p, floor)} from "
             f"{'all' if test == 'relabel_exact' else 'random'} relabellings of the languages")
    if not math.isfinite(r):
        answer = f"cannot tell: one of the Jaccard matrices is constant over the language pairs{ppl_text}"
    elif decided:
        answer = f"yes: {shown}{ppl_text}"
    else:
        too_few = f"; {len(common)} languages cannot give p below {floor:.3g}" if floor >= ALPHA else ""
        answer = f"no evidence: {shown}{too_few}{ppl_text}"
    answer += robustness_clause(inference)
    return pd.DataFrame(rows).set_index("comparison"), NeuronVerdict(NEURONS_VS_HEADS, answer, r, lo, hi, control, 0.0, p, inference)


# -- everything --------------------------------------------------------------------------------------------

def _nanmean(values) -> float:
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else math.nan


def _diag_offdiag(table: pd.DataFrame) -> tuple[float, float]:
    """Means of the cells whose row's language (`de-s0` -> de) is / is not the column's."""
    values = table.to_numpy(dtype=float)
    same = np.array([[SubnetworkId.parse(row).language == column for column in table.columns] for row in table.index])
    return _nanmean(values[same]), _nanmean(values[~same])


def neuron_analysis(masks: Mapping[SubnetworkId, torch.Tensor], halves: Mapping[SubnetworkId, Mapping[str, torch.Tensor]],
                    eligible: Mapping[object, torch.Tensor], chunk_losses: Mapping[tuple[str, int, str], object],
                    languages: Sequence[str], head_masks: Mapping[SubnetworkId, torch.Tensor] | None = None,
                    head_relative: pd.DataFrame | None = None, *, permutations: int, bootstrap: int, seed: int
                    ) -> tuple[dict[str, pd.DataFrame], list[NeuronVerdict], dict[str, float], list[str]]:
    """Every neuron analysis whose inputs are present; (tables by `NEURON_TABLE` id, the three verdicts in
    `NEURON_QUESTIONS` order, metrics by `NEURON_METRIC` name plus `verdict.<key>.*`, notes on what was skipped).

    `masks`: {SubnetworkId: [layers, neurons] 0/1, 1 = kept} (NEURON_MASK). `halves`: {SubnetworkId: {"a": mask,
    "b": mask} or (a, b)} (NEURON_MASK_HALVES; may be empty). `eligible`: {seed: [layers, neurons] 0/1} (NEURON_ELIGIBLE;
    keys may be the JSON's strings). `chunk_losses`: {(model, draw, language): ChunkLosses or (nll, tokens)}
    (NEURON_CHUNK_LOSSES, `read_chunk_losses`). `head_masks`: the prune run's {SubnetworkId: head mask};
    `head_relative`: its cross-language relative perplexity (`cross_ppl_relative`, rows languages or `de-s0`).
    `permutations`: sign flips beyond exact enumeration, label swaps and relabellings beyond 8 languages;
    `bootstrap`: replicates of the chunk bootstrap of the deactivation matrix (0: no intervals); `seed`: theirs.
    """
    if not languages:
        raise XlsubError("languages: no languages given; pass the ISO codes analysed, e.g. en,de,zh")
    tables: dict[str, pd.DataFrame] = {}
    metrics: dict[str, float] = {}
    notes: list[str] = []
    verdicts: list[NeuronVerdict] = []
    if masks:
        metrics[NEURON_METRIC.mean_neurons_off] = _nanmean([float((torch.as_tensor(m) == 0).sum()) for m in masks.values()])

    if chunk_losses:
        tables.update(deactivation_tables(chunk_losses, languages, bootstrap, seed))
    deactivation = tables.get(NEURON_TABLE.neuron_deactivation)
    if deactivation is not None:
        metrics[NEURON_METRIC.mean_neuron_relative_ppl_diag], metrics[NEURON_METRIC.mean_neuron_relative_ppl_offdiag] = _diag_offdiag(deactivation)
        if NEURON_TABLE.neuron_deactivation_random in tables:
            (metrics[NEURON_METRIC.mean_neuron_relative_ppl_random_diag],
             metrics[NEURON_METRIC.mean_neuron_relative_ppl_random_offdiag]) = _diag_offdiag(tables[NEURON_TABLE.neuron_deactivation_random])
        # a language without a neuron selected has nothing switched off: its d is 0 by construction, not a measurement
        empty = sorted(str(sid) for sid, m in masks.items() if not bool((torch.as_tensor(m) == 0).any()))
        if empty:
            notes.append(f"neuron specificity: left out {listed(empty)}, whose neuron set is empty (nothing switched off)")
        table, verdict = specificity({k: v for k, v in chunk_losses.items() if k[0] not in empty}, languages, permutations, seed)
        if table.empty and empty and len(empty) == len(masks):
            verdict = _cannot_tell(NEURON_SPECIFICITY, "every language's neuron set is empty, so nothing was switched off; raise "
                                   "top_rate or lower activation_bar (lape), or use method=importance", verdict.control, "languages")
        tables[NEURON_TABLE.neuron_specificity] = table
        if math.isfinite(verdict.value):
            metrics |= {NEURON_METRIC.neuron_specificity_excess: verdict.value, NEURON_METRIC.neuron_specificity_excess_p: verdict.p}
            metrics |= {name: x for name, x in ((NEURON_METRIC.neuron_specificity_excess_lo, verdict.lo),
                                                (NEURON_METRIC.neuron_specificity_excess_hi, verdict.hi)) if math.isfinite(x)}
            metrics |= {language_metric(NEURON_METRIC.neuron_specificity_excess, lang): float(d) for lang, d in table["d"].dropna().items()}
        verdicts.append(verdict)
    else:
        notes.append("neuron deactivation and its verdict: skipped (no per-chunk losses of the full model and a neuron set)")
        verdicts.append(_cannot_tell(NEURON_SPECIFICITY, "no per-chunk losses with a language's neurons off; run the neurons stage",
                                     "random neurons with the same count per layer", "languages"))

    if masks:
        overlap = jaccard_tables(masks, languages)
        tables.update(overlap)
        pvalues = overlap[NEURON_TABLE.neuron_jaccard_pvalue]
        metrics[NEURON_METRIC.mean_neuron_jaccard] = _nanmean(pvalues["jaccard"])
        metrics[NEURON_METRIC.mean_neuron_jaccard_expected] = _nanmean(pvalues["expected"])
        metrics[NEURON_METRIC.neuron_jaccard_pairs_significant] = float((pvalues["p_bh"] < ALPHA).sum()) if len(pvalues) else math.nan
        stable = stability_tables(masks, halves, languages)
        tables.update(stable)
        if NEURON_TABLE.neuron_split_half in stable:
            metrics[NEURON_METRIC.mean_neuron_split_half_jaccard] = _nanmean(stable[NEURON_TABLE.neuron_split_half]["jaccard"])
            metrics[NEURON_METRIC.mean_neuron_split_half_excess] = _nanmean(stable[NEURON_TABLE.neuron_split_half]["excess"])
        else:
            notes.append("neuron split-half stability: skipped (no half-text neuron masks)")
        if NEURON_TABLE.neuron_seed_stability in stable:
            metrics[NEURON_METRIC.mean_neuron_seed_stability] = _nanmean(stable[NEURON_TABLE.neuron_seed_stability]["jaccard"])
            metrics[NEURON_METRIC.mean_neuron_seed_stability_excess] = _nanmean(stable[NEURON_TABLE.neuron_seed_stability]["excess"])
    else:
        notes.append("neuron overlap and stability: skipped (no neuron masks)")

    if masks and eligible:
        placed = layer_tables(masks, eligible, languages)
        tables.update(placed)
        outer = placed[NEURON_TABLE.neuron_outer_layers]
        layers = tables[NEURON_TABLE.neuron_layers].shape[1]
        verdict = layers_verdict(outer, layers, permutations, seed)
        if not outer.empty:
            metrics[NEURON_METRIC.neuron_outer_share] = float(outer["outer_share"].mean())
            metrics[NEURON_METRIC.neuron_outer_share_eligible] = float(outer["eligible_share"].mean())
        verdicts.append(verdict)
    else:
        notes.append("neuron layers: skipped (no neuron masks or no eligible neurons)")
        verdicts.append(_cannot_tell(NEURON_LAYERS, "no neuron masks with their eligible neurons; run the neurons stage with "
                                     "method=lape", "neurons eligible for selection (their share in the outer layers)", "languages > seeds"))

    if masks and head_masks:
        table, verdict = neurons_vs_heads(masks, head_masks, languages, permutations, seed, deactivation, head_relative)
        if not table.empty:
            tables[NEURON_TABLE.neurons_vs_heads] = table
            if "mantel_jaccard_heads_vs_neurons" in table.index:
                metrics[NEURON_METRIC.neurons_vs_heads_mantel_r] = float(table.loc["mantel_jaccard_heads_vs_neurons", "r"])
                metrics[NEURON_METRIC.neurons_vs_heads_mantel_p] = float(table.loc["mantel_jaccard_heads_vs_neurons", "p"])
            if "deactivation_vs_head_cross_ppl" in table.index:
                metrics[NEURON_METRIC.neurons_vs_heads_ppl_spearman] = float(table.loc["deactivation_vs_head_cross_ppl", "r"])
        verdicts.append(verdict)
    else:
        notes.append("neurons vs heads: skipped (no neuron masks or no head masks)")
        verdicts.append(_cannot_tell(NEURONS_VS_HEADS, "needs both the prune run's head masks and the neurons run's neuron masks",
                                     "no association (languages relabelled)", "languages (relabelled)"))

    metrics = {name: value for name, value in metrics.items() if value is not None and math.isfinite(value)}
    metrics |= as_metrics(verdicts)
    return tables, verdicts, metrics, notes
