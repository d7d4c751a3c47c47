"""The analyze stage: how much the languages' subnetworks and representations share, as figures, tables
and a few summary numbers.

`analyze(AnalysisInputs)` runs every analysis whose inputs are present and returns an `AnalysisResult`:
tables (`xlsub.report.tables`), figures with one-line captions (`xlsub.report.figures`) and metrics. It works on
in-memory inputs; the entry point loads them from the prune and encode runs and hands the result to
`xlsub.report.html.write_report`, which writes the files and `report.html`.

What is measured, and against which control:
- head-mask overlap between languages (Jaccard), against the exact Jaccard expected from random masks
  keeping as many heads per layer (`xlsub.stats.overlap`); with several pruning seeds, the mean and spread
  over seed pairs and each language's agreement with itself across seeds;
- the share of heads and of attention parameters kept in each layer;
- the cross-language perplexity matrix (subnetwork x evaluation language), raw and relative to the full
  model, against random masks of the same size per layer;
- CKA (Kornblith et al. 2019) between the reference language (English by default) and every other
  language per layer of the full model, between all pairs at chosen layers, and between the full model
  and each subnetwork; controls: non-parallel pairings (`shuffled_pairs_cka`), a randomly initialised
  model and the model before finetuning;
- token overlap with the reference language, the shared-vocabulary rival explanation;
- URIEL's syntactic, genetic and geographic distances between the languages against the language x
  language Jaccard, perplexity and CKA matrices (Mantel test, `xlsub.stats.language_distance`).

Layers: CKA layer l is hidden state l (0 = embeddings, l >= 1 = output of transformer layer l); head
masks are labelled the same way, so mask layer 1 is the first transformer layer.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from xlsub.artifacts import (
    FULL_MODEL,
    METRIC,
    RANDOM_MODEL,
    TABLE,
    SubnetworkId,
    encodings_on,
    group_by_language,
    language_metric,
    last_layer,
    layer_count,
)
from xlsub.devices import ieee_float32, release_freed_memory
from xlsub.errors import XlsubError
from xlsub.report import similarity_tables, tables, verdicts
from xlsub.report.figures import CaptionedFigure, palette
from xlsub.report.figures import analysis as figures
from xlsub.report.figures.neurons import neuron_figures
from xlsub.report.neuron_tables import neuron_analysis
from xlsub.report.similarity_tables import Counts
from xlsub.report.verdicts import Inference, Verdict
from xlsub.similarity.cka import check_options, cka_matrix
from xlsub.stats.inference import sign_flip_interval, unit_level
from xlsub.stats.language_distance import MIN_LANGUAGES, distance_correlations, uriel_distances
from xlsub.stats.overlap import (
    RELIABLE,
    AttentionParams,
    equal_size_jaccard,
    head_agreement_by_language,
    jaccard_pvalue_table,
    params_kept_frac,
    seed_stability_test,
    token_overlap,
    token_overlap_intervals,
    within_vs_across_jaccard,
)

log = logging.getLogger(__name__)


@dataclass
class NeuronInputs:
    """What the neurons stage made, for `xlsub.report.neuron_tables.neuron_analysis`: each language's neuron
    mask (1 = kept), the split halves' masks, LAPE's eligible neurons per seed (empty for the importance
    method) and the per-test-chunk losses of the full model, each language's neurons off and their random
    controls ({(model, draw, language): ChunkLosses})."""

    masks: dict[SubnetworkId, torch.Tensor]
    halves: dict[SubnetworkId, dict[str, torch.Tensor]] = field(default_factory=dict)
    eligible: dict[str, torch.Tensor] = field(default_factory=dict)
    chunk_losses: dict = field(default_factory=dict)


@dataclass
class AnalysisInputs:
    """Everything `analyze` reads. Sections whose inputs are empty are skipped (and said so in `notes`).

    - `languages`: ISO codes in display order.
    - `masks`: {SubnetworkId: [layers, heads] 0/1 mask}, one or several pruning seeds per language.
    - `cross_ppl`, `cross_ppl_random`: subnetwork x evaluation language perplexities of the subnetworks
      and of their random-mask controls, rows `de-s0` (`xlsub.models.pruning.cross_perplexity_matrix`).
    - `ppl_full`: the full model's perplexity per evaluation language.
    - `encodings`: {model key: {language: [layers+1, n, d]}}, keys `full`, one `de-s0` per subnetwork,
      optionally `base` and `random` (`xlsub.artifacts`); row i is the same sentence in every language.
    - `tokens`: {language: token ids per sentence}, special tokens removed, sentences parallel.
    - `attention_params`: one layer's attention parameters per query head, per key/value head and shared
      (`xlsub.models.families.Family.attention_params`), for the share of attention parameters kept.
    - `shuffle_seed`: the derangement of the non-parallel CKA control.
    - `chunk_losses`: {(model, draw, language): ChunkLosses}, the prune run's per-test-chunk losses of the
      full model (`full`), every subnetwork (draw -1) and its random-mask controls (draw 0, 1, ...).
    - `trajectories`: {SubnetworkId: masks after each pruning step}, for overlaps at equal size.
    - `importance_reliability`: {SubnetworkId: Spearman-Brown split-half reliability of its head importance}
      (NaN where the prune run did not measure it); below `RELIABLE` the head verdicts carry a caveat.
    """

    languages: list[str]
    masks: dict[SubnetworkId, torch.Tensor] = field(default_factory=dict)
    importance_reliability: dict[SubnetworkId, float] = field(default_factory=dict)
    cross_ppl: pd.DataFrame | None = None
    cross_ppl_random: pd.DataFrame | None = None
    ppl_full: dict[str, float] = field(default_factory=dict)
    encodings: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    tokens: dict[str, list[list[int]]] = field(default_factory=dict)
    attention_params: AttentionParams | None = None
    shuffle_seed: int = 0
    chunk_losses: dict = field(default_factory=dict)
    trajectories: dict[SubnetworkId, list[torch.Tensor]] = field(default_factory=dict)
    neurons: NeuronInputs | None = None


@dataclass
class AnalysisResult:
    """Figures by figure id (`mask_jaccard`), a one-line caption for each, tables by table id
    (`mask_jaccard`, `cross_ppl_relative`), the ids of the tables behind each figure, summary metrics, and
    what was skipped."""

    figures: dict[str, Figure] = field(default_factory=dict)
    captions: dict[str, str] = field(default_factory=dict)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    figure_tables: dict[str, list[str]] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    verdicts: list[Verdict] = field(default_factory=list)

    def add_figure(self, figure_id: str, figure: Figure, caption: str, tables: Mapping[str, pd.DataFrame]) -> None:
        self.figures[figure_id] = figure
        self.captions[figure_id] = caption
        self.tables.update(tables)
        self.figure_tables[figure_id] = list(tables)

    def add(self, section: Mapping[str, pd.DataFrame], drawn: Mapping[str, CaptionedFigure]) -> None:
        """A section's tables, then its figures, each with the tables it shows."""
        self.tables.update(section)
        for figure_id, (figure, caption, table_ids) in drawn.items():
            self.add_figure(figure_id, figure, caption, {t: self.tables[t] for t in table_ids})


# -- summary numbers ---------------------------------------------------------------------------------------

def _offdiag_mean(table: pd.DataFrame) -> float:
    values = table.to_numpy(dtype=float)
    off = values[~np.eye(len(values), dtype=bool)]
    off = off[np.isfinite(off)]
    return float(off.mean()) if off.size else math.nan


def _nanmean(values) -> float:
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else math.nan


def _diag_offdiag_mean(table: pd.DataFrame) -> tuple[float, float]:
    """Means of the entries whose row language equals / differs from the column language (NaN skipped)."""
    values = table.to_numpy(dtype=float)
    same = np.array([[row == column for column in table.columns] for row in table.index])
    return _nanmean(values[same]), _nanmean(values[~same])


# -- the sections --------------------------------------------------------------------------------------------

def _masks(result: AnalysisResult, inputs: AnalysisInputs, langs: list[str], colours) -> None:
    overlap = tables.mask_overlap_tables(inputs.masks, langs)
    n_seeds = max(len(seeds) for seeds in group_by_language(inputs.masks).values())
    result.add(overlap, figures.mask_figures(overlap, n_seeds))
    metrics = result.metrics
    metrics[METRIC.mean_jaccard] = _offdiag_mean(overlap[TABLE.mask_jaccard])
    metrics[METRIC.mean_expected_jaccard] = _offdiag_mean(overlap[TABLE.mask_jaccard_expected])
    if TABLE.mask_seed_stability in overlap:
        metrics[METRIC.mean_seed_stability] = _nanmean(overlap[TABLE.mask_seed_stability]["mean"])
    pvalues = (jaccard_pvalue_table(inputs.masks, langs).drop(columns=["pruned_p_value", "pruned_p_bh"])  # = p_value: one event
               .set_index(["language_a", "language_b"]))
    result.tables[TABLE.mask_jaccard_pvalue] = pvalues
    metrics[METRIC.mask_jaccard_pairs_significant] = float((pvalues["p_bh"] < 0.05).sum()) if len(pvalues) else math.nan
    kept = tables.heads_kept_tables(inputs.masks, langs, inputs.attention_params)
    result.add(kept, figures.heads_kept_figure(kept, colours))
    metrics[METRIC.mean_heads_kept_frac] = _nanmean([float(m.float().mean()) for m in inputs.masks.values()])
    if TABLE.params_kept_per_layer in kept:
        metrics[METRIC.mean_params_kept_frac] = _nanmean([params_kept_frac(m, inputs.attention_params)
                                                     for m in inputs.masks.values()])
    else:
        result.notes.append("params kept per layer: skipped (attention_params not given)")


def _noise_ceiling(result: AnalysisResult, inputs: AnalysisInputs, langs: list[str], permutations: int, seed: int) -> None:
    """Same-language agreement of masks across seeds against cross-language agreement, chance-adjusted, at
    the language level; the masks' stability against random masks; the first and third verdicts."""
    within, across_all, p_raw = within_vs_across_jaccard(inputs.masks, permutations, seed)
    metrics = result.metrics
    metrics |= {METRIC.within_vs_across_jaccard_p: p_raw, METRIC.mean_within_language_jaccard: within,
                METRIC.mean_across_language_jaccard: across_all}
    agreement, p = head_agreement_by_language(inputs.masks, permutations, seed, langs)
    result.tables[TABLE.head_agreement] = agreement
    floor = 1 / (permutations + 1)
    differences = agreement["difference"].dropna().to_numpy()
    across = agreement["across"].dropna().to_numpy()
    lo, hi = sign_flip_interval(differences) if len(differences) > 1 else (math.nan, math.nan)
    across_lo, across_hi = sign_flip_interval(across) if len(across) > 1 else (math.nan, math.nan)
    decided = verdicts.evidence(float(differences.mean()) if len(differences) else math.nan, lo, hi, 0.0, p)

    def same_answer_without(lang: str) -> bool:
        rest = {sid: m for sid, m in inputs.masks.items() if sid.language != lang}
        table, p_rest = head_agreement_by_language(rest, permutations, seed, langs)
        values = table["difference"].dropna().to_numpy()
        bounds = sign_flip_interval(values) if len(values) > 1 else (math.nan, math.nan)
        return verdicts.evidence(float(values.mean()) if len(values) else math.nan, *bounds, 0.0, p_rest) == decided

    robust = all(same_answer_without(lang) for lang in agreement.index) if len(differences) > 2 else None
    pairs = result.tables.get(TABLE.mask_jaccard_pvalue)
    above = int((pairs["p_bh"] < 0.05).sum()) if pairs is not None else 0
    difference = float(differences.mean()) if len(differences) else math.nan
    metrics |= {METRIC.head_agreement_difference: difference, METRIC.head_agreement_p: p}
    result.verdicts.append(verdicts.different_heads(
        difference, lo, hi, p, int((differences > 0).sum()), len(differences), float(across.mean()) if len(across) else math.nan,
        across_lo, across_hi, above, len(pairs) if pairs is not None else 0,
        Inference("languages (labels permuted) > seeds", len(agreement), "relabel_mc", floor, robust)))
    _stability(result, inputs, langs, permutations, seed)


def _stability(result: AnalysisResult, inputs: AnalysisInputs, langs: list[str], permutations: int, seed: int) -> None:
    """The third verdict: per language, its masks' Jaccard across seeds minus that of random masks with the
    same heads per layer (`seed_stability_test`); the mean over languages with its sign-flip interval and p."""
    table, p_draws = seed_stability_test(inputs.masks, permutations, seed, langs)
    result.metrics[METRIC.seed_stability_p] = p_draws
    if table.empty:
        result.verdicts.append(verdicts.stability(math.nan, math.nan, math.nan, math.nan, math.nan, Inference(
            "languages > seed pairs", 0, "sign_flip_exact", math.nan), {}))
        return
    result.tables[TABLE.seed_stability] = table
    level = unit_level(table["excess"].to_numpy(dtype=float), n_perm=permutations, seed=seed)
    expected = float(table["expected"].mean())  # exact, given the masks' sizes: the interval of the excess, shifted
    result.verdicts.append(verdicts.stability(
        float(table["within"].mean()), expected + level.lo, expected + level.hi, expected, level.p,
        Inference("languages > seed pairs", level.n_units, level.test, level.p_floor, level.robust_to_leave_one_out),
        {lang: (row["excess"], row["p_bh"]) for lang, row in table.iterrows()}))


def _importance_reliability(result: AnalysisResult, inputs: AnalysisInputs, langs: list[str]) -> None:
    """Per language, the Spearman-Brown split-half reliability of head importance (mean over seeds); where
    any is below RELIABLE, the verdicts that rest on the masks say so and name the parameter that raises it."""
    measured = {sid: r for sid, r in inputs.importance_reliability.items() if math.isfinite(r)}
    if not measured:
        return
    table = pd.DataFrame({"reliability": {lang: float(np.mean(list(by_seed.values())))
                                          for lang, by_seed in group_by_language(measured, langs).items()}})
    table.index.name = "language"
    result.tables[TABLE.importance_reliability] = table
    result.metrics[METRIC.min_importance_reliability] = float(table["reliability"].min())
    low = [lang for lang, r in table["reliability"].items() if r < RELIABLE]
    if not low:
        return
    caveat = (f"; caveat: head importance is unreliable for {', '.join(low)} (Spearman-Brown split-half reliability below "
              f"{RELIABLE}), so those masks are noisy: raise eval_examples when pruning")
    masked = {verdicts.DIFFERENT_HEADS, verdicts.SPECIFICITY, verdicts.STABILITY}
    result.verdicts[:] = [replace(v, answer=v.answer + caveat) if v.question in masked else v for v in result.verdicts]


def _equal_size(result: AnalysisResult, inputs: AnalysisInputs, langs: list[str]) -> None:
    table = equal_size_jaccard(inputs.trajectories, langs).set_index(["frac_pruned", "heads_kept", "language_a", "language_b"])
    if table.empty:
        result.notes.append("equal-size overlap: skipped (trajectories do not reach 10% of heads pruned)")
        return
    result.add({TABLE.equal_size_jaccard: table}, figures.equal_size_figure(table))
    result.metrics[METRIC.equal_size_jaccard_above_chance_frac] = float((table["p_value"] < 0.05).mean())


def _intervals(result: AnalysisResult, inputs: AnalysisInputs, langs: list[str], replicates: int, seed: int) -> None:
    """Bootstrap intervals of the relative perplexities and the specificity gap; the second verdict, on the
    specificity excess over random masks at the level of languages."""
    tables_, metrics = tables.perplexity_interval_tables(inputs.chunk_losses, langs, replicates, seed)
    result.tables.update({k: v for k, v in tables_.items() if k != TABLE.specificity_gap})
    if TABLE.specificity_gap in tables_:
        result.add({TABLE.specificity_gap: tables_[TABLE.specificity_gap]}, figures.specificity_figure(tables_[TABLE.specificity_gap]))
    result.metrics |= metrics
    table = tables_.get(TABLE.specificity_gap)
    if table is None or not table["d"].notna().any():
        result.notes.append("specificity verdict: skipped (no random-mask controls in the per-chunk losses)")
        return
    # the claim is about languages: one paired difference d = gap - random gap per language
    level = tables.specificity_excess(table, replicates, seed)
    tested = table.dropna(subset=["d"])
    result.verdicts.append(verdicts.specificity(
        level.value, level.lo, level.hi, metrics.get(METRIC.specificity_gap_random, math.nan), level.p,
        Inference("languages > seeds > random draws > chunks", level.n_units, level.test, level.p_floor, level.robust_to_leave_one_out),
        {lang: (row["d"], row["p_bh"]) for lang, row in tested.iterrows()}))


def _perplexity(result: AnalysisResult, inputs: AnalysisInputs, langs: list[str]) -> None:
    ppl = tables.seed_averaged_perplexity_tables(inputs.cross_ppl, inputs.cross_ppl_random, inputs.ppl_full, langs)
    result.add(ppl, figures.perplexity_figures(ppl))
    metrics = result.metrics
    metrics[METRIC.mean_relative_ppl_diag], metrics[METRIC.mean_relative_ppl_offdiag] = _diag_offdiag_mean(ppl[TABLE.cross_ppl_relative])
    if TABLE.cross_ppl_random_relative in ppl:
        (metrics[METRIC.mean_relative_ppl_random_diag],
         metrics[METRIC.mean_relative_ppl_random_offdiag]) = _diag_offdiag_mean(ppl[TABLE.cross_ppl_random_relative])


def _cka(result: AnalysisResult, inputs: AnalysisInputs, langs: list[str], reference: str, kind: str,
         layers: Sequence[int] | None, precision: str, colours) -> pd.Series:
    """The CKA sections with the reference language; returns its last-layer CKA per language."""
    # every pair at the heatmaps' layers only (the reference's at every layer): the other layers' pairs are not reported
    full = inputs.encodings[FULL_MODEL]  # without the reference's encodings cka_reference_tables names the input
    chosen = tables.resolve_layers(layers, layer_count(full, reference)) if reference in full else None
    matrix, cka_langs, cka = tables.cka_reference_tables(inputs.encodings, langs, reference, kind, inputs.shuffle_seed,
                                                         precision, pair_layers=chosen)
    cka[TABLE.cka_pairs] = tables.cka_pairs_table(matrix, cka_langs, chosen)
    if kind != "rbf":  # rbf's jackknife recomputes the n x n kernels for every block of every pair: left out
        cka.update(tables.cka_pairs_interval_tables(inputs.encodings, cka_langs, chosen, kind))
    result.add(cka, figures.cka_figures(cka, reference, kind, colours))
    last = cka[TABLE.cka_vs_reference].iloc[:, -1]
    result.metrics[METRIC.mean_cka_last_layer] = _nanmean(last)
    controls = cka[TABLE.cka_controls]
    for condition in ("shuffled", "base", "random"):
        if condition in controls.index.get_level_values("condition"):
            result.metrics[METRIC.mean_cka_control_last_layer(condition)] = _nanmean(controls.loc[condition].iloc[:, -1])
    return last


def _subnetwork_cka(result: AnalysisResult, inputs: AnalysisInputs, langs: list[str], kind: str, precision: str,
                    colours, permutations: int, seed: int) -> None:
    sub = tables.cka_subnetwork_tables(inputs.encodings, langs, kind, precision)
    if not sub:
        return
    result.add(sub, figures.subnetwork_cka_figure(sub, kind, colours))
    if TABLE.cka_full_vs_subnetwork in sub:
        result.metrics[METRIC.mean_cka_full_vs_subnetwork_last_layer] = _nanmean(sub[TABLE.cka_full_vs_subnetwork].iloc[:, -1])
    if TABLE.cka_full_vs_subnetwork_last_layer in sub:
        table, level, p_relabel = similarity_tables.subnetwork_specificity(sub[TABLE.cka_full_vs_subnetwork_last_layer], permutations, seed)
        if level is None:
            result.notes.append("pruning-specific verdict: skipped (needs subnetworks of two or more languages)")
            return
        result.tables[TABLE.pruning_specificity] = table
        result.metrics[METRIC.subnetwork_cka_gap], result.metrics[METRIC.subnetwork_cka_gap_p] = level.value, p_relabel
        result.verdicts.append(verdicts.pruning_specific(
            level.value, level.lo, level.hi, level.p, int((table["d"] > 0).sum()),
            Inference("languages (subnetwork language's mean over its seeds)", level.n_units, level.test, level.p_floor,
                      level.robust_to_leave_one_out)))


def _similarity(result: AnalysisResult, inputs: AnalysisInputs, langs: list[str], reference: str, kind: str,
                counts: Counts, seed: int, colours) -> None:
    """Representation similarity against its nulls and length controls, retrieval and RSA; the fourth verdict."""
    full = inputs.encodings[FULL_MODEL]
    n = full[reference].shape[1]
    # token counts aligned with the encoded sentences give the length-restricted null of every test below
    aligned = reference in inputs.tokens and all(len(inputs.tokens[l]) == n for l in full if l in inputs.tokens)
    lengths = similarity_tables.sentence_lengths(inputs.tokens) if aligned else None
    if lengths is None:
        result.notes.append("representation tests (cka_pvalue, rsa, retrieval_pvalue, power): unrestricted null and no length-only "
                            "control (no token counts aligned with the encoded sentences), so a content-free length-only encoder "
                            "could pass them")
    result.tables[TABLE.cka_pvalue] = similarity_tables.cka_pvalue_table(inputs.encodings, langs, reference, kind, counts, seed, lengths)
    result.tables.update(similarity_tables.cka_interval_tables(inputs.encodings, langs, reference, kind))
    nearest = {}  # the last layer's nearest sentences, for the p-values of the same retrievals
    retrieval = similarity_tables.retrieval_table(inputs.encodings, langs, reference, nearest)
    result.add({TABLE.retrieval_top1: retrieval}, figures.retrieval_figure(retrieval, reference, colours, n))
    result.metrics |= {language_metric(METRIC.retrieval_top1, lang): float(v) for (model, lang), v in retrieval.iloc[:, -1].items() if model == FULL_MODEL}
    result.tables[TABLE.retrieval_pvalue] = similarity_tables.retrieval_pvalue_table(inputs.encodings, langs, reference, counts, seed, lengths,
                                                                                      nearest)
    result.tables[TABLE.knn_isomorphism] = similarity_tables.isomorphism_table(inputs.encodings, langs, reference, seed=seed, lengths=lengths)
    release_freed_memory()  # the tables before RSA's leave hundreds of MB of freed temporaries in the heap, under its n x n matrices
    rsa = similarity_tables.rsa_table(inputs.encodings, langs, reference, counts, seed, lengths)
    result.add({TABLE.rsa: rsa}, figures.rsa_figure(rsa, reference))
    result.metrics[METRIC.mean_rsa_last_layer] = _nanmean(rsa.loc[FULL_MODEL, "rsa"]) if FULL_MODEL in rsa.index.get_level_values(0) else math.nan
    release_freed_memory()
    power, limits = similarity_tables.power_table(last_layer(full, reference), lengths, reference, kind, counts.power_draws, seed)
    result.add({TABLE.power: power}, figures.power_figure(power, limits))
    result.metrics |= {language_metric(METRIC.detection_limit, measure): limit for measure, limit in limits.items()}
    if lengths is None:
        result.notes.append("length controls: skipped (no token counts aligned with the encoded sentences)")
        return
    length = similarity_tables.length_control_table(inputs.encodings, lengths, langs, reference, kind, counts, seed,
                                                    tested=result.tables[TABLE.cka_pvalue])
    result.add({TABLE.cka_length: length}, figures.length_control_figure(length, reference, kind))
    ours = length.loc[FULL_MODEL]
    control = RANDOM_MODEL if RANDOM_MODEL in length.index.get_level_values(0) else similarity_tables.LENGTH_ONLY
    theirs = length.loc[control]
    p = min(1.0, len(ours) * float(ours["p_value"].min()))  # the full model against its own length null: descriptive
    result.metrics |= {METRIC.mean_cka_above_length_chance: float(ours["above_length_chance"].mean()),
                       METRIC.mean_residual_cka_last_layer: float(ours["residual_cka"].mean()), METRIC.cka_beyond_length_p: p}
    # the claim is against the control: per language, the trained model's CKA above length chance minus the control's
    common = [lang for lang in ours.index if lang in theirs.index]
    judged = unit_level((ours.loc[common, "above_length_chance"] - theirs.loc[common, "above_length_chance"]).to_numpy(dtype=float))
    control_name = "randomly initialised model" if control == RANDOM_MODEL else "length-only encoder"
    result.verdicts.append(verdicts.beyond_length(
        judged.value, judged.lo, judged.hi, float(ours.loc[common, "above_length_chance"].mean()),
        float(theirs.loc[common, "above_length_chance"].mean()), judged.p, control_name, limits.get("cka", math.nan),
        Inference("languages > sentences (length-restricted null mean)", judged.n_units, judged.test, judged.p_floor,
                  judged.robust_to_leave_one_out), counts.power_draws, similarity_tables.power.N_PERM,
        int((ours.loc[common, "above_length_chance"] > theirs.loc[common, "above_length_chance"]).sum())))


def _tokens(result: AnalysisResult, inputs: AnalysisInputs, langs: list[str], reference: str, kind: str,
            cka_last: pd.Series | None, colours, bootstrap: int, seed: int) -> None:
    """Token overlap with the reference, with its bootstrap interval over sentences (`lo`, `hi`)."""
    tokens = {l: inputs.tokens[l] for l in tables.ordered(inputs.tokens, langs)}
    overlap = token_overlap(tokens, reference=reference)
    table = pd.DataFrame({"token_overlap": {l: v for l, v in overlap.items() if l != reference}})
    table.index.name = "language"
    bounds = token_overlap_intervals(tokens, reference, bootstrap, seed)
    table["lo"], table["hi"] = [bounds[l][0] for l in table.index], [bounds[l][1] for l in table.index]
    jaccard = result.tables.get(TABLE.mask_jaccard)
    if jaccard is not None and reference in jaccard.index:
        table["jaccard_with_reference"] = [jaccard.loc[reference].get(l, math.nan) for l in table.index]
    if cka_last is not None:
        table["cka_last_layer_with_reference"] = [cka_last.get(l, math.nan) for l in table.index]
    result.add({TABLE.token_overlap: table}, figures.token_overlap_figure(table, reference, kind, colours))
    result.metrics[METRIC.mean_token_overlap] = _nanmean(table["token_overlap"])


def _language_distance(result: AnalysisResult, inputs: AnalysisInputs, langs: list[str], kind: str, precision: str,
                       permutations: int, seed: int) -> None:
    """Mantel correlation of URIEL's language distances (`xlsub.stats.language_distance`) with the language x language
    matrices: Jaccard of kept heads, relative cross-language perplexity, CKA of the full model at the last layer."""
    matrices = {m: result.tables[m] for m in (TABLE.mask_jaccard, TABLE.cross_ppl_relative) if m in result.tables}
    labels = {TABLE.mask_jaccard: "Jaccard of kept heads", TABLE.cross_ppl_relative: "perplexity on the other language\n/ full model"}
    full = inputs.encodings.get(FULL_MODEL, {})
    encoded = [lang for lang in langs if lang in full]
    if len(encoded) >= MIN_LANGUAGES:
        last = full[encoded[0]].shape[0] - 1
        pairs = result.tables.get(TABLE.cka_pairs)
        if pairs is not None and last in pairs.index.get_level_values("layer"):
            matrices["cka"] = pairs.loc[last]
        else:  # the heatmaps' layers leave out the last one
            cka = cka_matrix({lang: full[lang][-1:] for lang in encoded}, kind, precision=precision)[0].numpy()
            matrices["cka"] = pd.DataFrame(cka, index=encoded, columns=encoded)
        labels["cka"] = f"{kind} CKA, last layer"
    if len(langs) < MIN_LANGUAGES or not matrices:
        result.notes.append(f"language distance: skipped (needs {MIN_LANGUAGES}+ languages and a language x language matrix)")
        return
    try:
        distances = uriel_distances(langs)
    except XlsubError as error:
        result.notes.append(f"language distance: skipped ({error})")
        return
    table = distance_correlations(distances, matrices, permutations, seed).set_index(["distance", "measure"])
    uriel = pd.concat(distances, names=["distance", "language"])
    result.add({TABLE.language_distance: table, TABLE.language_distance_uriel: uriel},
               figures.language_distance_figure(table, distances, matrices, labels))


# -- the analysis ------------------------------------------------------------------------------------------

def _neurons(result: AnalysisResult, inputs: AnalysisInputs, langs: list[str], colours, permutations: int, bootstrap: int,
             seed: int) -> None:
    """The neurons stage's tables, figures and verdicts (`xlsub.report.neuron_tables`), beside the heads'."""
    neurons = inputs.neurons
    section, found, metrics, notes = neuron_analysis(neurons.masks, neurons.halves, neurons.eligible, neurons.chunk_losses, langs,
                                                     head_masks=inputs.masks or None, head_relative=result.tables.get(TABLE.cross_ppl_relative),
                                                     permutations=permutations, bootstrap=bootstrap, seed=seed)
    result.add(section, neuron_figures(section, colours))
    result.verdicts.extend(found)
    result.metrics |= {k: v for k, v in metrics.items() if not k.startswith("verdict.")}  # the verdicts' come with the others'
    result.notes.extend(notes)


@ieee_float32()
def analyze(inputs: AnalysisInputs, *, cka_kind: str, layers: Sequence[int] | None, cka_precision: str, reference: str,
            bootstrap: int, permutations: int, resample_seed: int, counts: Counts, device: str) -> AnalysisResult:
    """Every analysis whose inputs are present: tables, figures, captions and metrics (see the module docstring).

    `cka_kind`: linear, debiased or rbf (`xlsub.similarity.cka`). `layers`: hidden-state indices (0 = embeddings) of the
    all-pairs CKA heatmaps; None: first, middle and last. `cka_precision`: float64, or float32 products
    accumulated in float64 (linear and debiased; see `xlsub.similarity.cka`). `reference`: the language the CKA and
    token overlap compare every other language with; one of `inputs.languages`. `bootstrap`: replicates of
    the paired bootstrap over test chunks; `permutations`: permutations and random draws of the overlap
    tests; `resample_seed`: their generators' seed; `counts`: the permutation counts of the CKA, length and
    Mantel tests (`xlsub.report.similarity_tables.Counts`); `device`: where the representation analyses compute
    (`cpu`, `cuda`, `cuda:N`): the encodings are read onto it, every kernel works where its inputs are, and
    permutations, subsamples and planted noise are drawn on the CPU (the same streams on every device) and moved
    there. float32 products are IEEE float32 throughout, whatever the caller's `torch.set_float32_matmul_precision`
    (`xlsub.devices.ieee_float32`: TF32 or bfloat16 passes would leave the float32 kernels' error bounds). The
    verdicts come first in `result.verdicts`. None of these has a default here: the analyze stage's parameters
    (`entry_points.analyze.AnalyzeArgs`) are their one declaration.
    """
    check_options(cka_kind, cka_precision)
    if not inputs.languages:
        raise XlsubError("languages: no languages given; pass the ISO codes analysed, e.g. en,de,zh")
    langs = list(inputs.languages)
    if reference not in langs:
        raise XlsubError(f"reference: '{reference}' is not among the analysed languages ({', '.join(langs)}); "
                         "pass one of them")
    inputs = replace(inputs, encodings=encodings_on(inputs.encodings, device))
    result = AnalysisResult()
    seen = [*langs, *(sid.language for sid in inputs.masks), *inputs.tokens]
    colours = palette(tables.ordered(dict.fromkeys(seen), langs))

    if inputs.masks:
        _masks(result, inputs, langs, colours)
        _noise_ceiling(result, inputs, langs, permutations, resample_seed)
    else:
        result.notes.append("mask overlap and heads kept: skipped (no head masks)")
    if inputs.trajectories:
        _equal_size(result, inputs, langs)
    if inputs.chunk_losses:
        _intervals(result, inputs, langs, bootstrap, resample_seed)
    else:
        result.notes.append("perplexity intervals and specificity gap: skipped (no per-chunk losses)")

    if inputs.cross_ppl is not None and not inputs.cross_ppl.empty:
        _perplexity(result, inputs, langs)
    else:
        result.notes.append("cross-language perplexity: skipped (no cross_ppl table)")

    full = inputs.encodings.get(FULL_MODEL, {})
    cka_last = None
    if reference in full and len(full) > 1:
        cka_last = _cka(result, inputs, langs, reference, cka_kind, layers, cka_precision, colours)
        if cka_kind != "rbf":
            _similarity(result, inputs, langs, reference, cka_kind, counts, resample_seed, colours)
            release_freed_memory()  # the power analysis's and length controls' freed draws, under the subnetworks' CKA tables
    else:
        result.notes.append(f"CKA between languages: skipped (no full-model encodings of {reference} and another language)")
    if full and tables.subnetwork_encodings(inputs.encodings):
        _subnetwork_cka(result, inputs, langs, cka_kind, cka_precision, colours, permutations, resample_seed)
    else:
        result.notes.append("CKA full model vs subnetworks: skipped (no full-model or subnetwork encodings)")

    if reference in inputs.tokens:
        _tokens(result, inputs, langs, reference, cka_kind, cka_last, colours, bootstrap, resample_seed)
    else:
        result.notes.append(f"token overlap: skipped (no tokens for the reference language {reference})")

    _language_distance(result, inputs, langs, cka_kind, cka_precision, permutations, resample_seed)

    _importance_reliability(result, inputs, langs)
    if inputs.neurons is not None:
        _neurons(result, inputs, langs, colours, permutations, bootstrap, resample_seed)
    # after every section: the representation sections add the last two verdicts
    result.verdicts.sort(key=lambda v: verdicts.QUESTIONS.index(v.question))
    result.metrics |= verdicts.as_metrics(result.verdicts)
    for note in result.notes:
        log.info(note)
    return result
