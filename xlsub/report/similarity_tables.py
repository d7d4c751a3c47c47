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

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pandas as pd
import torch

from xlsub.artifacts import BASE_MODEL, FULL_MODEL, RANDOM_MODEL, TABLE, SubnetworkId, ordered
from xlsub.similarity.cka import cka
from xlsub.similarity.controls import detection_limit, length_only_representations, planted_representations
from xlsub.similarity.isomorphism import knn_eigen_similarity
from xlsub.similarity.jackknife import cka_jackknife_interval
from xlsub.similarity.permutation import cka_null_mean, cka_permutation_test, residualize
from xlsub.similarity.retrieval import retrieval_permutation_test, retrieval_top1_per_layer
from xlsub.similarity.rsa import mantel_test

LENGTH_ONLY = "length-only"  # the content-free control encoder's key in the tables
# The `null` column: pairings permuted within groups of equal source length, or all pairings (no token counts).
LENGTH_RESTRICTED, UNRESTRICTED = "length_restricted", "unrestricted"


@dataclass(frozen=True)
class Counts:
    """Permutation counts of the CKA and retrieval tests: the full model (CKA at every layer), the base,
    random and length-only controls and each subnetwork at the last layer; and `length`: the full model's
    length-matched CKA test and RSA's Mantel tests (last layer; a subnetwork's at most `subnetworks`)."""

    full: int
    controls: int
    subnetworks: int
    length: int


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


def length_only_encodings(lengths: Mapping[str, torch.Tensor], d: int, seed: int, layers: int = 1) -> dict[str, torch.Tensor]:
    """The content-free length-only encoder (`length_only_representations`, seeded) on these token counts:
    {lang: [layers, n, d]}, the same vectors at every index (it has no layers; `layers` lines it up with
    a model's last layer)."""
    content_free = length_only_representations({l: lengths[l].long().tolist() for l in lengths}, d, seed)
    return {lang: reps.expand(layers, *reps.shape) for lang, reps in content_free.items()}


def with_length_only(encodings, lengths: Mapping[str, torch.Tensor] | None, reference: str, seed: int):
    """`encodings` plus the length-only encoder under `LENGTH_ONLY`, at the reference's hidden size and the
    full model's number of hidden states (so its last layer is the full model's); unchanged without
    token counts for the reference."""
    full = encodings.get(FULL_MODEL, {})
    if length_groups(lengths, reference) is None or reference not in full:
        return encodings
    layers, _, d = full[reference].shape
    return {**encodings, LENGTH_ONLY: length_only_encodings(lengths, d, seed, layers)}


def _models(encodings: Mapping[str, Mapping[str, torch.Tensor]], languages: Sequence[str]) -> list[str]:
    """Model keys in report order: full, the subnetworks (language order, seeds ascending), base, random,
    length-only."""
    position = {lang: i for i, lang in enumerate(languages)}
    subs = sorted((sid for sid in map(SubnetworkId.parse_or_none, encodings) if sid is not None),
                  key=lambda sid: (position.get(sid.language, len(position)), sid.seed))
    return [k for k in (FULL_MODEL, *map(str, subs), BASE_MODEL, RANDOM_MODEL, LENGTH_ONLY) if k in encodings]


def _n_perm(model: str, counts: Counts) -> int:
    """Permutations of a model's CKA and retrieval tests: `counts.full`, `counts.subnetworks` or `counts.controls`."""
    return counts.full if model == FULL_MODEL else counts.subnetworks if SubnetworkId.parse_or_none(model) else counts.controls


def _pairs(encodings, languages: Sequence[str], reference: str, subnetworks: bool = True):
    """(model, language, reference vectors, language vectors) for every model that encoded the reference,
    in `_models` order, every other language in `languages` order; `subnetworks=False` keeps only the
    full model and the controls."""
    for model in _models(encodings, languages):
        reps = encodings[model]
        if reference not in reps or (not subnetworks and SubnetworkId.parse_or_none(model) is not None):
            continue
        for lang in ordered([l for l in reps if l != reference], languages):
            yield model, lang, reps[reference], reps[lang]


def cka_pvalue_table(encodings, languages: Sequence[str], reference: str, kind: str, counts: Counts, seed: int,
                     lengths: Mapping[str, torch.Tensor] | None = None) -> pd.DataFrame:
    """One row per tested cell: model, language, layer, cka, null_mean, p_value, p_unrestricted, n_perm, null.
    The reference language against every other language; the full model at every layer, the subnetworks,
    the base and random controls and the length-only encoder (from `lengths`) at the last. p_value and
    null_mean: the length-restricted null (`length_groups`; `null` says `unrestricted` where `lengths` is
    None); p_unrestricted: the same number of permutations of all pairings, beside it for comparison at the
    last layer (NaN at the others)."""
    groups = length_groups(lengths, reference)
    rows = []
    for model, lang, x, y in _pairs(with_length_only(encodings, lengths, reference, seed), languages, reference):
        n_perm = _n_perm(model, counts)
        layers = list(range(x.shape[0])) if model == FULL_MODEL else [x.shape[0] - 1]
        result = cka_permutation_test(x[layers], y[layers], n_perm, seed, kind, groups=groups)
        # the unrestricted null beside it at the last layer only: what a length confound looks like, at half the cost
        plain = result if groups is None else cka_permutation_test(x[-1:], y[-1:], n_perm, seed, kind)
        for i, layer in enumerate(layers):
            unrestricted = float(plain.p_value[-1]) if layer == x.shape[0] - 1 else math.nan
            rows.append({"model": model, "language": lang, "layer": layer, "cka": float(result.observed[i]),
                         "null_mean": float(result.null_mean[i]), "p_value": float(result.p_value[i]),
                         "p_unrestricted": float(plain.p_value[i]) if groups is None else unrestricted, "n_perm": n_perm,
                         "null": null_name(groups)})
    columns = ["model", "language", "layer", "cka", "null_mean", "p_value", "p_unrestricted", "n_perm", "null"]
    return pd.DataFrame(rows, columns=columns).set_index(columns[:3])


def retrieval_pvalue_table(encodings, languages: Sequence[str], reference: str, counts: Counts, seed: int,
                           lengths: Mapping[str, torch.Tensor] | None = None) -> pd.DataFrame:
    """Top-1 retrieval of each language's sentences among the reference's (as `retrieval_table`) at the last
    layer against its length-restricted null: the accuracy with pairings permuted within groups of equal
    source length (`length_groups`; all pairings, `null` = unrestricted, where `lengths` is None),
    p = (1 + #{null >= observed}) / (1 + n_perm). The full model, the subnetworks, the base and random
    controls and the length-only encoder; `n_perm` as for CKA. Columns model, language, layer, top1,
    null_mean, p_value, n_perm, null."""
    groups = length_groups(lengths, reference)
    rows = []
    for model, lang, x, y in _pairs(with_length_only(encodings, lengths, reference, seed), languages, reference):
        n_perm = _n_perm(model, counts)
        result = retrieval_permutation_test(y[-1], x[-1], n_perm, seed, groups)
        rows.append({"model": model, "language": lang, "layer": x.shape[0] - 1, "top1": float(result.observed),
                     "null_mean": float(result.null_mean), "p_value": float(result.p_value), "n_perm": n_perm,
                     "null": null_name(groups)})
    columns = ["model", "language", "layer", "top1", "null_mean", "p_value", "n_perm", "null"]
    return pd.DataFrame(rows, columns=columns).set_index(columns[:3])


def length_control_table(encodings, lengths: Mapping[str, torch.Tensor], languages: Sequence[str], reference: str, kind: str,
                         n_perm: int, seed: int) -> pd.DataFrame:
    """At the last layer, for the full model, each subnetwork, the base and random controls and a
    content-free length-only encoder: the parallel CKA with the reference; the mean of a null that
    re-pairs only sentences whose source has the same token count (length-matched; sampled permutations
    and a p-value for the full model, the exact mean for the others); the CKA above that chance; and the
    CKA of residuals after regressing each representation on its token count (`residual_cka`: descriptive,
    not a control: the length-only encoder keeps more of it than the trained model, so it does not remove
    length)."""
    d = next(iter(encodings[FULL_MODEL].values())).shape[-1]
    everything = {**encodings, LENGTH_ONLY: length_only_encodings(lengths, d, seed)}
    groups = length_groups(lengths, reference)
    rows = []
    for model, reps in [(m, everything[m]) for m in _models(everything, languages)]:
        if reference not in reps:
            continue
        for lang in ordered([l for l in reps if l != reference and l in lengths], languages):
            x, y = reps[reference][-1].double(), reps[lang][-1].double()
            residual = float(cka(residualize(x, lengths[reference]), residualize(y, lengths[lang]), kind))
            if model == FULL_MODEL:  # the tested model: sampled length-matched permutations
                matched = cka_permutation_test(x, y, n_perm, seed, kind, groups=groups)
                observed, null_mean, p, perms = float(matched.observed), float(matched.null_mean), float(matched.p_value), n_perm
            else:  # subnetworks and controls: the exact mean over length-matched pairings (closed form), no test
                observed, null_mean, p, perms = float(cka(x, y, kind)), float(cka_null_mean(x, y, kind, groups)), math.nan, 0
            rows.append({"model": model, "language": lang, "cka": observed, "length_null_mean": null_mean,
                         "above_length_chance": observed - null_mean, "p_value": p, "residual_cka": residual, "n_perm": perms})
    return pd.DataFrame(rows).set_index(["model", "language"])


def cka_interval_tables(encodings, languages: Sequence[str], reference: str, kind: str, blocks: int = 20) -> dict[str, pd.DataFrame]:
    """`cka_vs_reference_lo` / `_hi`: the full model's CKA with the reference, language x layer, 95%
    delete-a-block jackknife interval (`blocks` contiguous blocks)."""
    full = encodings[FULL_MODEL]
    langs = ordered([l for l in full if l != reference], languages)
    blocks = min(blocks, full[reference].shape[1])  # at most one sentence a block
    bounds = {lang: cka_jackknife_interval(full[reference], full[lang], kind, blocks) for lang in langs}
    out = {}
    for table_id, pick in ((TABLE.cka_vs_reference_lo, lambda i: i.lo), (TABLE.cka_vs_reference_hi, lambda i: i.hi)):
        table = pd.DataFrame({lang: pick(bounds[lang]).numpy() for lang in langs}).T
        table.index.name, table.columns.name = "language", "layer"
        out[table_id] = table
    return out


def retrieval_table(encodings, languages: Sequence[str], reference: str) -> pd.DataFrame:
    """Top-1 accuracy of finding each sentence's translation in the reference language among all n
    reference sentences by cosine, each language centred on its own mean (Libovický et al. 2020):
    (model, language) x layer. Chance is 1/n."""
    rows = {(model, lang): retrieval_top1_per_layer(y, x).numpy() for model, lang, x, y in _pairs(encodings, languages, reference)}
    table = pd.DataFrame(rows).T
    table.index.names = ["model", "language"]
    table.columns.name = "layer"
    return table


def rsa_table(encodings, languages: Sequence[str], reference: str, counts: Counts, seed: int,
              lengths: Mapping[str, torch.Tensor] | None = None) -> pd.DataFrame:
    """RSA at the last layer (Spearman correlation of 1 - cosine dissimilarity matrices of the parallel
    sentences) between the reference and every language, for the full model, the subnetworks, the base and
    random controls and the length-only encoder (from `lengths`), each with a Mantel p-value at the
    length-restricted null (`length_groups`; unrestricted, as the `null` column says, where `lengths` is
    None). O(n^2) a permutation, the costliest test: `counts.length` permutations for the full model and
    the controls, `min(counts.length, counts.subnetworks)` for each subnetwork; each model's reference
    matrix is permuted once for all its languages (`mantel_test` with stacked languages)."""
    groups = length_groups(lengths, reference)
    rows = []
    everything = with_length_only(encodings, lengths, reference, seed)
    for model in _models(everything, languages):
        reps = everything[model]
        langs = ordered([l for l in reps if l != reference], languages)
        if reference not in reps or not langs:
            continue
        n_perm = min(counts.length, counts.subnetworks) if SubnetworkId.parse_or_none(model) else counts.length
        result = mantel_test(reps[reference][-1], torch.stack([reps[l][-1] for l in langs]), n_perm, seed, groups)
        rows += [{"model": model, "language": lang, "rsa": float(result.observed[i]), "null_mean": float(result.null_mean[i]),
                  "p_value": float(result.p_value[i]), "n_perm": n_perm, "null": null_name(groups)} for i, lang in enumerate(langs)]
    columns = ["model", "language", "rsa", "null_mean", "p_value", "n_perm", "null"]
    return pd.DataFrame(rows, columns=columns).set_index(columns[:2])


def subnetwork_specificity(last: pd.DataFrame, permutations: int, seed: int) -> dict[str, float]:
    """Does pruning to a language's subnetwork change the representations of the other languages more than
    its own? From CKA(full, subnetwork) at the last layer (subnetwork language x evaluated language):
    change = 1 - CKA; gap = mean change off the diagonal - mean change on it. p: permuting which row is
    which language (is the diagonal special?), (1 + #{gap_perm >= gap}) / (1 + permutations). Interval:
    delete-one-language jackknife with a t quantile."""
    from scipy import stats

    rows = [r for r in last.index if r in last.columns]
    if len(rows) < 2:
        return {"value": math.nan, "lo": math.nan, "hi": math.nan, "p": math.nan, "control": 0.0}
    change = 1 - torch.tensor(last.loc[rows, rows].to_numpy(dtype=float))

    def gap(m: torch.Tensor) -> float:
        eye = torch.eye(len(m), dtype=torch.bool)
        return float(m[~eye].mean() - m[eye].mean())

    observed = gap(change)
    generator = torch.Generator().manual_seed(seed)
    exceed = sum(gap(change[torch.randperm(len(rows), generator=generator)]) >= observed - 1e-12 for _ in range(permutations))
    k = len(rows)
    leave_out = torch.tensor([gap(change[[j for j in range(k) if j != i]][:, [j for j in range(k) if j != i]])
                              for i in range(k)]) if k > 2 else torch.tensor([observed])
    se = math.sqrt((k - 1) / k * float(((leave_out - leave_out.mean()) ** 2).sum())) if k > 2 else math.nan
    half = float(stats.t.ppf(0.975, k - 1)) * se if k > 2 else math.nan
    return {"value": observed, "lo": observed - half, "hi": observed + half, "p": (1 + exceed) / (1 + permutations), "control": 0.0}


POWER_SNRS = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)


def power_table(base: torch.Tensor, lengths: Mapping[str, torch.Tensor] | None, reference: str, kind: str, n_perm: int,
                seed: int, snrs: Sequence[float] = POWER_SNRS) -> tuple[pd.DataFrame, dict[str, float]]:
    """How weak a shared signal each measure detects at this n and d: a planted positive control.

    Two "languages" share the per-sentence signal `base` (the full model's reference-language vectors,
    last layer) under independent noise at each signal-to-noise ratio (`planted_representations`); CKA
    (permutation test), RSA (Mantel test) and retrieval (permutation test, one shared space) are tested
    at every SNR, at the length-restricted null the tables use (`length_groups` of `lengths`; all
    pairings without them). A content-free length-only encoder is the negative control (`snr` = NaN
    rows), whose CKA and RSA track sentence length. Returns the long table (measure, snr, statistic, p_value) and each
    measure's detection limit: the weakest SNR from which on every stronger one has p < 0.05
    (`detection_limit`; NaN if none).
    """
    groups = length_groups(lengths, reference)
    measures = {
        "cka": lambda x, y: cka_permutation_test(x, y, n_perm, seed, kind, groups=groups),
        "rsa": lambda x, y: mantel_test(x, y, max(1, n_perm // 5), seed, groups),
        "retrieval": lambda x, y: retrieval_permutation_test(x, y, n_perm, seed, groups),
    }
    rows, limits = [], {}
    for name, test in measures.items():
        found = {}

        def p_at(snr: float) -> float:
            planted = planted_representations(base, [reference, "planted"], snr, seed, rotate=name != "retrieval")
            result = test(planted[reference], planted["planted"])
            found[snr] = float(result.observed)
            return float(result.p_value)

        limit, p_values = detection_limit(p_at, snrs)
        limits[name] = math.nan if limit is None else limit
        rows += [{"measure": name, "snr": snr, "statistic": found[snr], "p_value": p} for snr, p in p_values.items()]
        if lengths is not None and reference in lengths:
            other = next((l for l in lengths if l != reference), None)
            if other is not None:
                content_free = length_only_representations({l: lengths[l].long().sub(2).clamp(min=0).tolist()
                                                            for l in (reference, other)}, base.shape[-1], seed)
                result = test(content_free[reference], content_free[other])
                rows.append({"measure": f"{name} ({LENGTH_ONLY})", "snr": math.nan, "statistic": float(result.observed),
                             "p_value": float(result.p_value)})
    return pd.DataFrame(rows).set_index(["measure", "snr"]), limits


def isomorphism_table(encodings, languages: Sequence[str], reference: str, k: int = 10) -> pd.DataFrame:
    """Eigenvector similarity of the k-nearest-neighbour graphs of each language's and the reference's
    sentence vectors at the last layer (Søgaard et al. 2018; lower = more alike in shape), for the full
    model and the base and random controls: a third view of shared structure beside CKA and RSA."""
    rows = [{"model": model, "language": lang, "eigen_similarity": float(knn_eigen_similarity(x[-1], y[-1], k=min(k, y.shape[1] - 1)))}
            for model, lang, x, y in _pairs(encodings, languages, reference, subnetworks=False)]
    return pd.DataFrame(rows).set_index(["model", "language"])
