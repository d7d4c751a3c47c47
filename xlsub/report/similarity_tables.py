"""The analyze stage's representation-similarity tables against their nulls and length controls
(`xlsub.similarity`'s `permutation`, `jackknife`, `retrieval`, `rsa`, `controls` and `isomorphism` compute; this
module lays the numbers out by table id).

Sentence length confounds pooled representations: a content-free encoder that sees only lengths gives
parallel pairs a high CKA, and passes a null that permutes all pairings. So every representation test
here (CKA, RSA's Mantel test, retrieval) uses the length-restricted null by default: pairings permuted
only within groups of sentences whose reference (source) sentence has the same token count
(`length_groups`; the `null` column says which null a row used). The content-free length-only encoder
(`LENGTH_ONLY`) and the randomly initialised model are tested beside the full model and the subnetworks,
as negative controls that must not pass. The CKA of residuals after regressing out token count is
descriptive, not a control (the length-only encoder keeps more of it than the trained model). Intervals
use the delete-a-block jackknife, never resampling with replacement (duplicated rows inflate CKA).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from xlsub.artifacts import BASE_MODEL, FULL_MODEL, RANDOM_MODEL, TABLE, last_layer, layer_count, ordered, subnetwork_key
from xlsub.devices import release_freed_memory
from xlsub.report.tables import block_self_terms, reference_cka, self_terms
from xlsub.similarity import power
from xlsub.similarity.cka import prepare, prepared_cka
from xlsub.similarity.controls import length_only_representations
from xlsub.similarity.isomorphism import TOP_EIGENVALUES, knn_laplacian_spectrum, knn_spectra, spectrum_distance, subsamples
from xlsub.similarity.jackknife import BlockHsic, cka_jackknife_interval, jackknife_blocks, leave_block_out_above_chance
from xlsub.similarity.permutation import STOP_EXCEEDANCES, cka_null_mean, cka_permutation_test, null_sides, residualize
from xlsub.similarity.retrieval import CosineSide, nearest_translation, retrieval_permutation_test, top1
from xlsub.similarity.rsa import centred_ranks, centred_ranks_each, mantel_test, rank_dtype, rsa_jackknife_interval
from xlsub.stats.inference import EXACT_LIMIT, UnitLevel, jackknife_interval, unit_level, wilson_interval

LENGTH_ONLY = "length-only"  # the content-free control encoder's key in the tables
# The `null` column: pairings permuted within groups of equal source length, or all pairings (no token counts).
LENGTH_RESTRICTED, UNRESTRICTED = "length_restricted", "unrestricted"
# The permutation tests' tail bound (`xlsub.similarity.permutation.tail_bound_decided`): a cell whose observed
# value its null mean and a pilot of 50 permutations put about 19 pilot sds or more above chance (a one-term
# chi-square tail: the rest could reach it with probability <= 0.005) gets the floor p without the other
# permutations. At the study's 5,000 sentences it skips most of the full model's and subnetworks' permutations.
TAIL_RISK = 0.005
# Early stopping of clearly null cells (`xlsub.similarity.permutation.sequential_null`, Besag & Clifford 1991): a
# cell whose 10th null value at or above the observed one comes within the first 100 permutations stops there
# with p = 10 / L (>= 0.1). The controls' and length-only encoder's cells, null by design, then cost ~20
# permutations instead of all; no decision below 0.1 changes (tests/test_early_stop.py).
STOP_AFTER = STOP_EXCEEDANCES
# Random halves of the sentences for the isomorphism table's intervals: 50 keep that table near 11 s of one core at
# the demo's sizes (n = 1,077, d = 128, 8 languages, 3 models: 1,200 kNN graphs of 538 sentences, ~9 ms each).
ISOMORPHISM_SUBSAMPLES = 50


@dataclass(frozen=True)
class Counts:
    """Permutation counts of the CKA and retrieval tests: the full model (CKA at every layer), the base,
    random and length-only controls and each subnetwork at the last layer; and `length`: the full model's
    length-matched CKA test and RSA's Mantel tests (last layer; a subnetwork's at most `subnetworks`)."""

    full: int
    controls: int
    subnetworks: int
    length: int
    power_draws: int  # planted draws per signal-to-noise level of `power_table`


def sentence_lengths(tokens: Mapping[str, Sequence[Sequence[int]]]) -> dict[str, torch.Tensor]:
    """Token count of every sentence as the encoder sees it (<s> and </s> included)."""
    return {lang: torch.tensor([len(ids) + 2 for ids in sentences], dtype=torch.float64) for lang, sentences in tokens.items()}


def length_groups(lengths: Mapping[str, torch.Tensor] | None, reference: str) -> torch.Tensor | None:
    """The groups of the length-restricted null: each sentence's label is its reference (source) sentence's
    token count, so a permutation re-pairs only sentences of equal source length. Exact counts, not
    `xlsub.similarity.permutation.length_bins`: within coarse bins length still varies, and the length-only
    encoder passed (p = 0.005 with 10 and 20 bins on the demo). None without token counts: the unrestricted null."""
    if lengths is None or reference not in lengths:
        return None
    return lengths[reference].long()


def null_name(groups) -> str:
    """The `null` column of a test permuted within `groups` (None: all pairings)."""
    return UNRESTRICTED if groups is None else LENGTH_RESTRICTED


def length_only_encodings(lengths: Mapping[str, torch.Tensor], d: int, seed: int, layers: int = 1,
                          device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The content-free length-only encoder (`length_only_representations`, seeded, drawn on the CPU) on these token
    counts: {lang: [layers, n, d]} on `device`, the same vectors at every index (it has no layers; `layers` lines it
    up with a model's last layer)."""
    content_free = length_only_representations({l: lengths[l].long().tolist() for l in lengths}, d, seed)
    return {lang: reps.to(device).expand(layers, *reps.shape) for lang, reps in content_free.items()}


def with_length_only(encodings, lengths: Mapping[str, torch.Tensor] | None, reference: str, seed: int):
    """`encodings` plus the length-only encoder under `LENGTH_ONLY`, at the reference's hidden size and the
    full model's number of hidden states (so its last layer is the full model's); unchanged without
    token counts for the reference."""
    full = encodings.get(FULL_MODEL, {})
    if length_groups(lengths, reference) is None or reference not in full:
        return encodings
    vectors = full[reference]
    return {**encodings, LENGTH_ONLY: length_only_encodings(lengths, vectors.shape[-1], seed, vectors.shape[0], vectors.device)}


def _models(encodings: Mapping[str, Mapping[str, torch.Tensor]], languages: Sequence[str]) -> list[str]:
    """Model keys in report order: full, the head subnetworks (language order, seeds ascending), the neuron
    subnetworks (likewise), base, random, length-only."""
    position = {lang: i for i, lang in enumerate(languages)}
    named = {key: found for key in encodings if (found := subnetwork_key(key)) is not None}
    subs = sorted(named, key=lambda key: (named[key][0] != "heads", position.get(named[key][1].language, len(position)), named[key][1].seed))
    return [k for k in (FULL_MODEL, *subs, BASE_MODEL, RANDOM_MODEL, LENGTH_ONLY) if k in encodings]


def _n_perm(model: str, counts: Counts) -> int:
    """Permutations of a model's CKA and retrieval tests: `counts.full`, `counts.subnetworks` or `counts.controls`."""
    return counts.full if model == FULL_MODEL else counts.subnetworks if subnetwork_key(model) else counts.controls


def _pairs(encodings, languages: Sequence[str], reference: str, subnetworks: bool = True):
    """(model, language, the model's {language: vectors}) for every model that encoded the reference, in `_models`
    order, every other language in `languages` order; `subnetworks=False` keeps only the full model and the
    controls. Nothing is read here: `_vectors` reads a pair."""
    for model in _models(encodings, languages):
        reps = encodings[model]
        if reference not in reps or (not subnetworks and subnetwork_key(model) is not None):
            continue
        for lang in ordered([l for l in reps if l != reference], languages):
            yield model, lang, reps


def _vectors(reps, reference: str, lang: str, last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's and the language's vectors of one model: with `last`, the last hidden states [n, d] alone
    (`last_layer`: read without the other layers from an `EncodingStore`), else [layers+1, n, d]."""
    if last:
        return last_layer(reps, reference), last_layer(reps, lang)
    return reps[reference], reps[lang]


def cka_pvalue_table(encodings, languages: Sequence[str], reference: str, kind: str, counts: Counts, seed: int,
                     lengths: Mapping[str, torch.Tensor] | None = None) -> pd.DataFrame:
    """One row per tested cell: model, language, layer, cka, null_mean, p_value, p_unrestricted, n_perm, null.
    The reference language against every other language; the full model at every layer, the subnetworks,
    the base and random controls and the length-only encoder (from `lengths`) at the last. p_value and
    null_mean: the length-restricted null (`length_groups`; `null` says `unrestricted` where `lengths` is
    None); p_unrestricted: the same number of permutations of all pairings, beside it for comparison at the
    last layer (NaN at the others). Both with the tail bound (`TAIL_RISK`): where it decides, p is the floor
    1 / (1 + n_perm) and null_mean the exact permutation mean (`cka_null_mean`), not the permutations' mean;
    and with early stopping (`STOP_AFTER`): a clearly null cell has p = 10 / L >= 0.1 from its first L
    permutations and the exact null mean. `n_perm` is the most permutations a cell may use."""
    groups = length_groups(lengths, reference)
    rows = []
    sides = {}  # per model, the reference's null sides (`null_sides`) for both nulls: computed once for all its languages
    everything = with_length_only(encodings, lengths, reference, seed)
    for model, lang, reps in _pairs(everything, languages, reference):
        x, y = _vectors(reps, reference, lang, last=model != FULL_MODEL)
        n_perm = _n_perm(model, counts)
        if model == FULL_MODEL:
            layers = list(range(x.shape[0]))
        else:  # the last layer alone (read alone from a store)
            layers, x, y = [layer_count(everything[model], reference) - 1], x[None], y[None]
        # the self terms every table shares (`self_terms`: kept by the store), not recomputed for either null
        known = (lambda l: None) if kind == "rbf" else (lambda l: self_terms(reps, l, kind, last=model != FULL_MODEL))
        if model not in sides:
            mine = known(reference)  # the reference's, with its null sides: once per model
            sides = {model: (null_sides(x, kind, groups, selves=mine),
                             None if groups is None else null_sides(x[-1:], kind, selves=None if mine is None else mine[-1:]), mine)}
        restricted, unrestricted, mine = sides[model]
        theirs = known(lang)
        # the full model's observed CKA at every layer as `cka_reference_tables` computed it (float64), where the store kept it
        seen = reference_cka(reps, reference, lang, kind) if model == FULL_MODEL else None
        result = cka_permutation_test(x, y, n_perm, seed, kind, groups=groups, tail_risk=TAIL_RISK, stop_after=STOP_AFTER,
                                      reference=restricted, selves=(mine, theirs),
                                      observed=seen if seen is not None and seen.shape == x.shape[:-2] else None)
        # the unrestricted null beside it at the last layer only: what a length confound looks like, at half the cost
        plain = result if groups is None else cka_permutation_test(
            x[-1:], y[-1:], n_perm, seed, kind, tail_risk=TAIL_RISK, stop_after=STOP_AFTER, reference=unrestricted,
            selves=(None, None) if theirs is None else (mine[-1:], theirs[-1:]), observed=result.observed[-1:])
        for i, layer in enumerate(layers):
            unrestricted = float(plain.p_value[-1]) if i == len(layers) - 1 else math.nan
            rows.append({"model": model, "language": lang, "layer": layer, "cka": float(result.observed[i]),
                         "null_mean": float(result.null_mean[i]), "p_value": float(result.p_value[i]),
                         "p_unrestricted": float(plain.p_value[i]) if groups is None else unrestricted, "n_perm": n_perm,
                         "null": null_name(groups)})
    columns = ["model", "language", "layer", "cka", "null_mean", "p_value", "p_unrestricted", "n_perm", "null"]
    return pd.DataFrame(rows, columns=columns).set_index(columns[:3])


def retrieval_pvalue_table(encodings, languages: Sequence[str], reference: str, counts: Counts, seed: int,
                           lengths: Mapping[str, torch.Tensor] | None = None,
                           nearest: Mapping[tuple[str, str], torch.Tensor] | None = None) -> pd.DataFrame:
    """Top-1 retrieval of each language's sentences among the reference's (as `retrieval_table`) at the last
    layer against its length-restricted null: the accuracy with pairings permuted within groups of equal
    source length (`length_groups`; all pairings, `null` = unrestricted, where `lengths` is None),
    p = (1 + #{null >= observed}) / (1 + n_perm). The full model, the subnetworks, the base and random
    controls and the length-only encoder; `n_perm` as for CKA. Columns model, language, layer, top1,
    null_mean, p_value, n_perm, null, lo, hi.

    lo, hi: the 95% interval of top-1 over the queries (the language's sentences) with the candidate pool
    (all reference sentences) held fixed. With the pool fixed, each query's hit or miss is fixed, so
    resampling the queries is resampling independent 0/1 values and the hit count is binomial: the
    Wilson score interval (`xlsub.stats.inference.wilson_interval`) is that bootstrap's interval in closed
    form, and unlike the percentile bootstrap it does not collapse to a point at 0 hits (controls near
    chance, 1/n). It is conditional on the pool: another set of reference sentences is not resampled.

    `nearest`: {(model, language): each sentence's nearest reference sentence at the last layer}, as
    `retrieval_table(nearest=...)` collects them from the same encodings: where given, the similarities
    are not computed again."""
    groups = length_groups(lengths, reference)
    rows = []
    everything = with_length_only(encodings, lengths, reference, seed)
    for model, lang, reps in _pairs(everything, languages, reference):
        x, y = _vectors(reps, reference, lang, last=True)
        n_perm = _n_perm(model, counts)
        known = None if nearest is None else nearest.get((model, lang))
        result = retrieval_permutation_test(y, x, n_perm, seed, groups, nearest=known)
        n = y.shape[-2]
        lo, hi = wilson_interval(round(float(result.observed) * n), n)
        rows.append({"model": model, "language": lang, "layer": layer_count(everything[model], reference) - 1, "top1": float(result.observed),
                     "null_mean": float(result.null_mean), "p_value": float(result.p_value), "n_perm": n_perm,
                     "null": null_name(groups), "lo": lo, "hi": hi})
    columns = ["model", "language", "layer", "top1", "null_mean", "p_value", "n_perm", "null", "lo", "hi"]
    return pd.DataFrame(rows, columns=columns).set_index(columns[:3])


def length_control_table(encodings, lengths: Mapping[str, torch.Tensor], languages: Sequence[str], reference: str, kind: str,
                         counts: Counts, seed: int, blocks: int = 20, tested: pd.DataFrame | None = None) -> pd.DataFrame:
    """At the last layer, for the full model, each subnetwork, the base and random controls and a
    content-free length-only encoder: the parallel CKA with the reference; the exact mean of the null that
    re-pairs only sentences whose source has the same token count (`length_null_mean`, `cka_null_mean`
    within `length_groups`); the CKA above that chance; its p-value at that length-restricted null
    (`cka_permutation_test` with the groups; `counts.length` permutations for the full model, as `Counts`
    says, `_n_perm` for the others); and the CKA of residuals after regressing each representation on its
    token count (`residual_cka`: descriptive, not a control: the length-only encoder keeps more of it than
    the trained model, so it does not remove length). `tested`: the `cka_pvalue_table` of the same
    encodings, seed and lengths, whose last-layer rows are the same tests for every model but the full
    one (the same permutations): their p is taken from it instead of permuting again.

    `lo`, `hi`: the 95% delete-a-block jackknife interval of `above_length_chance` (`blocks` contiguous
    blocks of sentences, `jackknife_blocks`; `xlsub.stats.inference.jackknife_interval`): without block b,
    the CKA minus the exact length-matched null mean, both recomputed on the remaining sentences with the
    groups restricted to them. Sentences are never duplicated (a bootstrap inflates CKA)."""
    everything = with_length_only(encodings, lengths, reference, seed)  # the vectors cka_pvalue_table tests
    groups = length_groups(lengths, reference)
    rows = []
    for model, reps in [(m, everything[m]) for m in _models(everything, languages)]:
        if reference not in reps:
            continue
        n_perm = counts.length if model == FULL_MODEL else _n_perm(model, counts)
        langs = ordered([l for l in reps if l != reference and l in lengths], languages)
        if not langs:
            continue
        x = last_layer(reps, reference).double()
        labels = jackknife_blocks(x.shape[0], min(blocks, x.shape[0]))
        # the self terms every table shares (`self_terms`: kept by the store)
        known = {} if kind == "rbf" else {l: self_terms(reps, l, kind, last=True)[0] for l in (reference, *langs)}
        # the reference's terms, once for all its languages: its CKA state, its residuals' and its leave-block-out self terms
        mine = prepare(x, kind, self_=known.get(reference)), prepare(residualize(x, lengths[reference]), kind), \
            last_block_self(reps, reference, kind, labels) if kind != "rbf" else None
        for lang in langs:
            y = last_layer(reps, lang).double()
            residual = float(prepared_cka(mine[1], prepare(residualize(y, lengths[lang]), kind), kind))
            states = mine[0], prepare(y, kind, self_=known.get(lang))  # once for the CKA and its null mean
            observed, null_mean = float(prepared_cka(*states, kind)), float(cka_null_mean(x, y, kind, groups, states))
            del states
            key = (model, lang, layer_count(reps, reference) - 1)
            if model != FULL_MODEL and tested is not None and key in tested.index and tested.loc[key, "n_perm"] == n_perm \
                    and tested.loc[key, "null"] == LENGTH_RESTRICTED:
                p = float(tested.loc[key, "p_value"])
            else:
                p = float(cka_permutation_test(x, y, n_perm, seed, kind, groups=groups, tail_risk=TAIL_RISK, stop_after=STOP_AFTER,
                                               selves=(known.get(reference), known.get(lang))).p_value)
            selves = None if mine[2] is None else (mine[2], last_block_self(reps, lang, kind, labels))
            above = leave_block_out_above_chance(x, y, labels, kind, groups, selves).tolist()
            lo, hi = jackknife_interval(observed - null_mean, above)
            rows.append({"model": model, "language": lang, "cka": observed, "length_null_mean": null_mean,
                         "above_length_chance": observed - null_mean, "lo": float(lo), "hi": float(hi), "p_value": p,
                         "residual_cka": residual, "n_perm": n_perm, "blocks": len(above)})
    return pd.DataFrame(rows).set_index(["model", "language"])


def last_block_self(reps, lang: str, kind: str, labels: torch.Tensor) -> BlockHsic:
    """`leave_block_out_self` of `reps[lang]`'s last hidden state (`block_self_terms`: kept by an `EncodingStore`)."""
    both = block_self_terms(reps, lang, kind, labels, [-1])
    return BlockHsic(both.kept[0], both.whole[0])


def cka_interval_tables(encodings, languages: Sequence[str], reference: str, kind: str, blocks: int = 20) -> dict[str, pd.DataFrame]:
    """`cka_vs_reference_lo` / `_hi`: the full model's CKA with the reference, language x layer, 95%
    delete-a-block jackknife interval (`blocks` contiguous blocks)."""
    full = encodings[FULL_MODEL]
    langs = ordered([l for l in full if l != reference], languages)
    blocks = min(blocks, full[reference].shape[1])  # at most one sentence a block
    mine = None  # the reference's leave-one-block-out self terms, once for all languages
    if kind != "rbf" and langs:
        labels = jackknife_blocks(full[reference].shape[-2], blocks)
        mine = block_self_terms(full, reference, kind, labels)
    bounds = {lang: cka_jackknife_interval(full[reference], full[lang], kind, blocks,
                                           selves=None if mine is None else (mine, block_self_terms(full, lang, kind, labels)))
              for lang in langs}
    out = {}
    for table_id, pick in ((TABLE.cka_vs_reference_lo, lambda i: i.lo), (TABLE.cka_vs_reference_hi, lambda i: i.hi)):
        table = pd.DataFrame({lang: pick(bounds[lang]).cpu().numpy() for lang in langs}).T
        table.index.name, table.columns.name = "language", "layer"
        out[table_id] = table
    return out


def retrieval_table(encodings, languages: Sequence[str], reference: str,
                    nearest: dict[tuple[str, str], torch.Tensor] | None = None) -> pd.DataFrame:
    """Top-1 accuracy of finding each sentence's translation in the reference language among all n
    reference sentences by cosine, each language centred on its own mean (Libovický et al. 2020):
    (model, language) x layer. Chance is 1/n. `nearest` (a dict, filled): {(model, language): each
    sentence's nearest reference sentence at the last layer (`nearest_translation`)}, for
    `retrieval_pvalue_table`'s test of the same encodings."""
    rows, side = {}, None
    for model, lang, reps in _pairs(encodings, languages, reference):
        x, y = _vectors(reps, reference, lang, last=False)
        if side is None or side[0] != model:  # the reference's unit rows, once per model
            side = model, CosineSide(x)
        found = nearest_translation(y, side[1])  # [layers, n]
        rows[model, lang] = top1(found).cpu().numpy()
        if nearest is not None:
            nearest[model, lang] = found[-1].clone()
    table = pd.DataFrame(rows).T
    table.index.names = ["model", "language"]
    table.columns.name = "layer"
    return table


def rsa_table(encodings, languages: Sequence[str], reference: str, counts: Counts, seed: int,
              lengths: Mapping[str, torch.Tensor] | None = None, blocks: int = 20) -> pd.DataFrame:
    """RSA at the last layer (Spearman correlation of 1 - cosine dissimilarity matrices of the parallel
    sentences) between the reference and every language, for the full model, the subnetworks, the base and
    random controls and the length-only encoder (from `lengths`), each with a 95% interval and a Mantel
    p-value at the length-restricted null (`length_groups`; unrestricted, as the `null` column says, where
    `lengths` is None).

    `lo`, `hi`: the delete-a-block jackknife over sentences (`rsa_jackknife_interval`, `blocks` contiguous
    blocks, t quantile), as for CKA: deleting a block removes its sentences' rows and columns from both
    RDMs. Not a bootstrap with replacement: a duplicated sentence has dissimilarity 0 to its copy in both
    RDMs, and these shared zeros inflate the rank correlation. The Mantel test
    (`xlsub.stats.inference.mantel_test`) is O(n^2) a permutation, the costliest test: `counts.length`
    permutations for the full model and the controls, `min(counts.length, counts.subnetworks)` for each
    subnetwork (`n_perm`: the permutations used; `p_floor`: the smallest p they can give); each model's
    reference matrix is permuted once for all its languages (`mantel_test` with stacked languages), with the
    tail bound (`TAIL_RISK`): where the exact permutation mean and sd of r (`xlsub.similarity.moments`) put the observed
    RSA far enough in the tail, p is the floor, without any permutation; and with early stopping (`STOP_AFTER`): a
    clearly null language has p = 10 / L >= 0.1 from its first L permutations. Where either spares permutations,
    null_mean is the exact permutation mean."""
    groups = length_groups(lengths, reference)
    rows = []
    everything = with_length_only(encodings, lengths, reference, seed)
    for model in _models(everything, languages):
        reps = everything[model]
        langs = ordered([l for l in reps if l != reference], languages)
        if reference not in reps or not langs:
            continue
        n_perm = min(counts.length, counts.subnetworks) if subnetwork_key(model) else counts.length
        x, ys = last_layer(reps, reference), torch.stack([last_layer(reps, l) for l in langs])
        # each dissimilarity matrix ranked once, for the test and the interval; the interval frees the languages' as it sorts them
        ranks = centred_ranks(x).to(rank_dtype(x.shape[0])), centred_ranks_each(ys)  # exact in rank_dtype: half the Mantel gathers' traffic
        result = mantel_test(x, ys, n_perm, seed, groups, tail_risk=TAIL_RISK, stop_after=STOP_AFTER, ranks=ranks)
        interval = rsa_jackknife_interval(x, ys, min(blocks, x.shape[0]), ranks=ranks, estimate=result.observed)
        del ranks
        release_freed_memory()  # the model's sort buffers (tens of MB each, kept in glibc's heaps), before the next model's
        rows += [{"model": model, "language": lang, "rsa": float(result.observed[i]), "lo": float(interval.lo[i]),
                  "hi": float(interval.hi[i]), "null_mean": float(result.null_mean[i]), "p_value": float(result.p_value[i]),
                  "p_floor": result.p_floor, "n_perm": result.n_perm, "null": null_name(groups)} for i, lang in enumerate(langs)]
    columns = ["model", "language", "rsa", "lo", "hi", "null_mean", "p_value", "p_floor", "n_perm", "null"]
    return pd.DataFrame(rows, columns=columns).set_index(columns[:2])


def subnetwork_specificity(last: pd.DataFrame, permutations: int, seed: int) -> tuple[pd.DataFrame, UnitLevel | None, float]:
    """Does pruning to a language's subnetwork change the representations of the other languages more than
    its own? From CKA(full, subnetwork) at the last layer (subnetwork language x evaluated language):
    change = 1 - CKA, and per subnetwork language d = mean change on the other languages - change on its
    own (the table `pruning_specificity`: `own`, `others`, `d`).

    The claim is about languages: the mean of d over languages with its sign-flip interval, one-sided p and
    leave-one-language-out robustness (`xlsub.stats.inference.unit_level`). Beside it, descriptive: the
    relabelling p, which permutes which row is which language (is the diagonal special?), over all k!
    orders when k! <= `EXACT_LIMIT` (8 languages: 40,320), else `permutations` random orders from `seed`,
    (1 + #) / (1 + permutations). Returns (table, unit level or None with fewer than two languages, p).
    """
    rows = [r for r in last.index if r in last.columns]
    table = pd.DataFrame(columns=["own", "others", "d"], index=pd.Index([], name="subnetwork language"))
    if len(rows) < 2:
        return table, None, math.nan
    change = 1 - last.loc[rows, rows].to_numpy(dtype=float)
    k = len(rows)
    own = np.diagonal(change)
    others = (change.sum(1) - own) / (k - 1)
    table = pd.DataFrame({"own": own, "others": others, "d": others - own}, index=pd.Index(rows, name="subnetwork language"))
    # the gap of a relabelling falls as the summed change on its diagonal rises
    if math.factorial(k) <= EXACT_LIMIT:
        orders = np.array(list(itertools.permutations(range(k))))
        diagonal = change[orders, np.arange(k)].sum(1)
        p = float((diagonal <= own.sum() + 1e-12 * k).mean())
    else:
        rng = np.random.default_rng(seed)
        diagonal = np.array([change[rng.permutation(k), np.arange(k)].sum() for _ in range(permutations)])
        p = (1 + int((diagonal <= own.sum() + 1e-12 * k).sum())) / (1 + permutations)
    return table, unit_level(table["d"].to_numpy(), n_perm=permutations, seed=seed), p


def power_table(base: torch.Tensor, lengths: Mapping[str, torch.Tensor] | None, reference: str, kind: str, draws: int,
                seed: int, *, bracket: tuple[float, float] = power.BRACKET, bisections: int = power.BISECTIONS,
                n_perm: int = power.N_PERM) -> tuple[pd.DataFrame, dict[str, float]]:
    """How strong a shared signal each measure detects at this n and d: power against a planted positive control.

    The reference language's vectors (`base`: the full model's, last layer) against `draws` partners per
    signal-to-noise level that share them under independent noise (`xlsub.similarity.power.planted_power`);
    CKA (permutation test), RSA (Mantel test) and retrieval (permutation test, one shared space) each at
    the length-restricted null the tables use (`length_groups` of `lengths`; all pairings without them), on
    `n_perm` permutations a draw with Besag & Clifford's early stopping. power = the share of draws with
    p < 0.05, power_lo/power_hi its Wilson 95% interval; levels by bisection on log SNR in `bracket`
    (`xlsub.similarity.power.power_curve`; RSA's and retrieval's searches begin at the previous measure's detection
    limit, `bisect_power(start=)`: the same grid and limit, fewer levels where the limits are close); a level whose
    side of 0.8 is settled before its last draw (its Bonferroni-adjusted interval excludes 0.8) stops there, and `n_draws` says how many it used. The content-free length-only encoder, `draws` seeds of it tested
    by CKA and retrieval (not RSA: too slow), is the negative control (`snr` NaN rows; about 0.05 at the
    length-restricted null).
    Returns the table (measure, snr, n_draws, power, power_lo, power_hi) and each measure's detection limit:
    the smallest tested SNR with power >= 0.8 (NaN if none).
    """
    groups = length_groups(lengths, reference)
    rows, limits = [], {}

    def row(name: str, level: power.Power) -> dict:
        return {"measure": name, "snr": level.snr, "n_draws": level.n_draws, "power": level.power,
                "power_lo": level.lo, "power_hi": level.hi}

    other = next((l for l in lengths or {} if l != reference), None)
    controls = {}
    if groups is not None and other is not None:
        counts = {l: lengths[l].long().sub(2).clamp(min=0) for l in (reference, other)}  # the encoder adds <s>, </s>
        controls = power.length_only_power(counts, base.shape[-1], groups, draws, seed, kind, n_perm=n_perm, device=base.device)
    start = None  # each measure's search begins at the last finite detection limit: the measures' limits lie close together
    for name in power.MEASURES:
        levels, limits[name] = power.power_curve(name, base, groups, draws, seed, kind, n_perm, bracket, bisections, start=start)
        start = limits[name] if math.isfinite(limits[name]) else start
        rows += [row(name, level) for level in levels]
        if name in controls:
            rows.append(row(f"{name} ({LENGTH_ONLY})", controls[name]))
    return pd.DataFrame(rows).set_index(["measure", "snr"]), limits


def isomorphism_table(encodings, languages: Sequence[str], reference: str, k: int = 10, seed: int = 0,
                      lengths: Mapping[str, torch.Tensor] | None = None, n_subsamples: int = ISOMORPHISM_SUBSAMPLES,
                      top: int = TOP_EIGENVALUES) -> pd.DataFrame:
    """Eigenvector similarity of the k-nearest-neighbour graphs of each language's and the reference's
    sentence vectors at the last layer (Søgaard et al. 2018; lower = more alike in shape; the `top` largest
    Laplacian eigenvalues, `xlsub.similarity.isomorphism.TOP_EIGENVALUES`), for the full model and the base,
    random and length-only (from `lengths`) controls: a third view of shared structure beside CKA and RSA.

    It does not depend on the pairing, so there is no pairing null: its uncertainty is which sentences
    were sampled. `n_subsamples` random halves of the sentences (m = n // 2, the same half for every
    language and model; `subsamples` with `seed`), each graph rebuilt on the half. `subsample_lo`,
    `subsample_hi`: the 2.5% and 97.5% quantiles of the statistic at m, not rescaled to n (Politis & Romano's
    rescaling needs the statistic's rate, unknown here, and the leading eigenvalues grow with n): the
    spread from the choice of sentences, of the m-sentence statistic, not a calibrated interval of
    `eigen_similarity`. On each control's rows, the comparison with the full model: `full_minus_control`
    at n and the same quantiles of the paired difference at m (same halves for both models); below 0, the
    trained model's languages are more alike in shape than the control's. Columns model, language,
    eigen_similarity, subsample_lo, subsample_hi, full_minus_control, full_minus_control_lo,
    full_minus_control_hi, top, n, m, n_subsamples."""
    everything = with_length_only(encodings, lengths, reference, seed)
    models = [m for m in _models(everything, languages) if subnetwork_key(m) is None and reference in everything[m]]
    n = last_layer(everything[models[0]], reference).shape[0] if models else 0
    subsets = subsamples(n, n_subsamples, seed) if models else torch.empty(0, 0, dtype=torch.long)
    whole, parts = {}, {}  # {(model, lang): top eigenvalues at n}, {(model, lang): [S, top] at m}
    for model in models:
        for lang in everything[model]:
            last = last_layer(everything[model], lang)
            if len(subsets):  # both from one Gram matrix
                whole[model, lang], parts[model, lang] = knn_spectra(last, subsets, min(k, n - 1), min(k, subsets.shape[1] - 1), top)
            else:
                whole[model, lang], parts[model, lang] = knn_laplacian_spectrum(last, min(k, n - 1), top=top), None

    def quantiles(values) -> tuple[float, float]:  # the 2.5% and 97.5% quantiles over the subsamples (linear interpolation)
        if values is None:
            return math.nan, math.nan
        lo, hi = torch.quantile(values, torch.tensor([0.025, 0.975], dtype=values.dtype))
        return float(lo), float(hi)

    rows = []
    for model, lang, _ in _pairs({m: everything[m] for m in models}, languages, reference):
        value = float(spectrum_distance(whole[model, reference], whole[model, lang], top))
        sub = None if parts[model, lang] is None else spectrum_distance(parts[model, reference], parts[model, lang], top)
        lo, hi = quantiles(sub)
        row = {"model": model, "language": lang, "eigen_similarity": value, "subsample_lo": lo, "subsample_hi": hi,
               "full_minus_control": math.nan, "full_minus_control_lo": math.nan, "full_minus_control_hi": math.nan,
               "top": top, "n": n, "m": subsets.shape[1], "n_subsamples": len(subsets)}
        if model != FULL_MODEL and (FULL_MODEL, lang) in whole:
            full_value = float(spectrum_distance(whole[FULL_MODEL, reference], whole[FULL_MODEL, lang], top))
            paired = None if sub is None else spectrum_distance(parts[FULL_MODEL, reference], parts[FULL_MODEL, lang], top) - sub
            row["full_minus_control"] = full_value - value
            row["full_minus_control_lo"], row["full_minus_control_hi"] = quantiles(paired)
        rows.append(row)
    columns = ["model", "language", "eigen_similarity", "subsample_lo", "subsample_hi", "full_minus_control", "full_minus_control_lo",
               "full_minus_control_hi", "top", "n", "m", "n_subsamples"]
    return pd.DataFrame(rows, columns=columns).set_index(columns[:2])