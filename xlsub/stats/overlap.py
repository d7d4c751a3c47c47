"""How much two languages' subnetworks (head masks) share, against chance, and how much their text shares.

A head mask is a `[layers, heads]` 0/1 tensor (1 = head kept), one per language.

- `jaccard`: |kept in both| / |kept in either|, and `jaccard_matrix` over all languages.
- `expected_random_jaccard`: the chance level, E[Jaccard] of two random masks with the same number of
  kept heads in every layer as the two masks (the distribution `xlsub.models.pruning.random_mask_like` draws
  from), computed exactly. Masks that keep 90% of the heads overlap by ~0.8 by chance alone, so an
  observed Jaccard means little without it.
- `proportion_kept_per_layer`, `params_kept_per_layer`, `params_kept_frac`: where the pruning removed
  heads, and how much of the attention it kept, counted with a layer's `AttentionParams` (what serves one
  query head, one key/value head, all heads; `xlsub.models.families.Family.attention_params` for any family).
- `token_overlap`: the share of a sentence's tokens that also occur in its reference (English)
  translation: shared subword vocabulary as a rival explanation for shared subnetworks.
- `mean_std_over_seeds`, `expected_jaccard_over_seeds`, `seed_stability`: the same over several pruning
  seeds, masks keyed by `SubnetworkId`.
- `overlap_null`, `jaccard_pvalue`, `pruned_overlap_pvalue`, `jaccard_chance_band`: the exact law of the
  overlap of random masks, and from it exact one-sided p-values and a chance band; `benjamini_hochberg`
  (`xlsub.stats.inference`) across pairs; `jaccard_pvalue_table` for every pair of languages.
- `equal_size_jaccard`: overlap at equal sparsity along the pruning trajectories, against its chance band.
- `within_vs_across_jaccard` (same-language seeds against other languages, a permutation test) and
  `split_half_reliability` (Spearman rho of importances from two halves of the data): the noise ceiling.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from itertools import combinations, product

import numpy as np
import pandas as pd
import torch

from xlsub.artifacts import SubnetworkId, group_by_language
from xlsub.errors import XlsubError
from xlsub.stats.inference import average_ranks, benjamini_hochberg, bootstrap_mean_interval


def _kept(mask: torch.Tensor, name: str = "mask") -> torch.Tensor:
    """A [layers, heads] 0/1 mask as booleans (True = kept)."""
    mask = torch.as_tensor(mask)
    if mask.ndim != 2:
        raise ValueError(f"{name} must be a [layers, heads] tensor, got shape {tuple(mask.shape)}")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"{name} must hold only 0 and 1")
    return mask == 1


def _check_same_shape(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise XlsubError(f"head masks of shapes {tuple(a.shape)} and {tuple(b.shape)} cannot be compared; "
                         "use masks pruned from the same model")


def jaccard(mask_a: torch.Tensor, mask_b: torch.Tensor) -> float:
    """Jaccard index of the kept heads: |kept in both| / |kept in either|.

    Two masks that keep nothing are identical, so 0/0 is defined as 1.0.
    """
    a, b = _kept(mask_a, "mask_a"), _kept(mask_b, "mask_b")
    _check_same_shape(a, b)
    union = int((a | b).sum())
    return 1.0 if union == 0 else int((a & b).sum()) / union


def _pairwise(masks: Mapping[str, torch.Tensor], fn) -> pd.DataFrame:
    langs = list(masks)
    table = pd.DataFrame(np.nan, index=pd.Index(langs, name="language"), columns=pd.Index(langs, name="language"))
    for i, a in enumerate(langs):
        for b in langs[i:]:
            table.loc[a, b] = table.loc[b, a] = fn(masks[a], masks[b])
    return table


def jaccard_matrix(masks: Mapping[str, torch.Tensor]) -> pd.DataFrame:
    """Jaccard index between every pair of languages' masks (languages on both axes, in `masks` order)."""
    return _pairwise(masks, jaccard)


def _hypergeometric_counts(heads: int, k_a: int, k_b: int) -> list[int]:
    """Number of k_b-subsets of `heads` heads meeting a fixed k_a-subset in i heads, i = 0..heads:
    C(k_a, i) C(heads - k_a, k_b - i), out of C(heads, k_b)."""
    return [math.comb(k_a, i) * math.comb(heads - k_a, k_b - i) if i <= k_b else 0 for i in range(heads + 1)]


def _hypergeometric_pmf(heads: int, k_a: int, k_b: int) -> np.ndarray:
    """P(|A & B| = i), i = 0..heads, for A, B uniform subsets of sizes k_a, k_b of `heads` heads."""
    total = math.comb(heads, k_b)
    return np.array([c / total for c in _hypergeometric_counts(heads, k_a, k_b)])


def expected_random_jaccard(mask_a: torch.Tensor, mask_b: torch.Tensor) -> float:
    """E[Jaccard(A, B)] for independent random masks A, B keeping as many heads per layer as mask_a, mask_b.

    In layer l with H heads, A keeps a uniform k_a(l)-subset and B a uniform k_b(l)-subset (as
    `random_mask_like` draws them), so the layer's intersection I_l is hypergeometric(H, k_a(l), k_b(l)).
    Layers are independent, so the distribution of I = sum_l I_l is the convolution of the per-layer
    distributions, and with K_a = sum_l k_a(l), K_b likewise, the union is K_a + K_b - I. Then
    E[J] = sum_i P(I = i) i / (K_a + K_b - i), exactly (not E[I] / E[union], which is biased).
    Empty-vs-empty is 1.0, as in `jaccard`.
    """
    a, b = _kept(mask_a, "mask_a"), _kept(mask_b, "mask_b")
    _check_same_shape(a, b)
    heads = a.shape[1]
    dist = np.ones(1)
    for k_a, k_b in zip(a.sum(1).tolist(), b.sum(1).tolist()):
        dist = np.convolve(dist, _hypergeometric_pmf(heads, int(k_a), int(k_b)))
    kept_a, kept_b = int(a.sum()), int(b.sum())
    if kept_a + kept_b == 0:
        return 1.0
    inter = np.arange(len(dist))
    possible = inter <= min(kept_a, kept_b)  # the convolution's tail beyond this has probability 0
    return float((dist[possible] * inter[possible] / (kept_a + kept_b - inter[possible])).sum())


def expected_random_jaccard_matrix(masks: Mapping[str, torch.Tensor]) -> pd.DataFrame:
    """`expected_random_jaccard` for every pair of languages: the chance level of `jaccard_matrix`.

    The diagonal is the chance overlap of two random masks shaped like that language's own (not 1).
    """
    return _pairwise(masks, expected_random_jaccard)


def proportion_kept_per_layer(masks: Mapping[str, torch.Tensor]) -> pd.DataFrame:
    """Share of each layer's heads kept: rows languages, columns layers (0-based).

    The mean over the heads within a layer (axis 1 of [layers, heads]); the study's
    `proportion_masked.py` summed over axis 0, i.e. over layers for each head index.
    """
    rows = {lang: _kept(mask, lang).double().mean(1).tolist() for lang, mask in masks.items()}
    return _per_layer_table(rows)


@dataclass(frozen=True)
class AttentionParams:
    """The parameters of one layer's attention block, by what they serve.

    - `per_query_head`: one query head's query rows (weights and bias) and its slice of the output
      projection's weight; where a head has its own key and value (kv_heads == heads, e.g. a fused
      q/k/v projection) its key and value rows too;
    - `per_kv_head`: one key/value head's key and value rows (weights and biases) under grouped-query
      attention, read by heads // kv_heads query heads; 0 where counted in `per_query_head`;
    - `shared`: the rest, kept whatever heads are pruned: the output projection's bias and the norms
      inside the block (BERT's attention LayerNorm, Qwen 3's and Gemma 3's q_norm and k_norm).
    """

    per_query_head: int
    per_kv_head: int
    shared: int
    heads: int
    kv_heads: int

    def __post_init__(self):
        if self.kv_heads < 1 or self.heads % self.kv_heads:
            raise ValueError(f"{self.heads} query heads cannot share {self.kv_heads} key/value heads evenly")
        if min(self.per_query_head, self.per_kv_head, self.shared) < 0:
            raise ValueError(f"parameter counts must not be negative: {self}")

    @classmethod
    def full_mha(cls, hidden_size: int, head_dim: int, heads: int) -> AttentionParams:
        """BERT's and XLM-R's block (Vaswani et al. 2017 with biases, then the attention LayerNorm), hidden
        size D, head size h: per head the query, key and value rows, 3 (D h + h), and the output
        projection's h input columns, D h, so 4 D h + 3 h; shared the output bias and the LayerNorm, 3 D."""
        return cls(4 * hidden_size * head_dim + 3 * head_dim, 0, 3 * hidden_size, heads, heads)

    @property
    def total(self) -> int:
        """The block's parameters with every head kept."""
        return self.shared + self.heads * self.per_query_head + self.kv_heads * self.per_kv_head


def _params_kept_by_layer(mask: torch.Tensor, params: AttentionParams, name: str = "mask") -> list[float]:
    """Share of each layer's attention parameters kept by `mask`, the formula of `params_kept_per_layer`."""
    kept = _kept(mask, name)
    layers, heads = kept.shape
    if heads != params.heads:
        raise XlsubError(f"{name}: {heads} heads per layer, but the model's attention has {params.heads}; "
                         "use masks pruned from this model")
    kv_kept = kept.view(layers, params.kv_heads, heads // params.kv_heads).any(2).sum(1).tolist()
    # integer numerators and one division: the full-MHA case gives the same floats as (k per_head + 3 D) / total
    return [(params.shared + int(q) * params.per_query_head + int(kv) * params.per_kv_head) / params.total
            for q, kv in zip(kept.sum(1).tolist(), kv_kept)]


def params_kept_per_layer(masks: Mapping[str, torch.Tensor], params: AttentionParams) -> pd.DataFrame:
    """Share of each layer's attention parameters kept: rows languages, columns layers.

    With k of H query heads kept, and k_kv of the key/value heads (kept while at least one query head of
    its group is: query head i reads key/value head i // (H / kv_heads)), the share is
    (shared + k per_query_head + k_kv per_kv_head) / total (`AttentionParams`): the always-kept
    parameters count as kept, as they do in a model pruned by `xlsub.models.pruning.prune_heads`. A layer
    with every head pruned keeps shared / total, not 0. For BERT and XLM-R (`AttentionParams.full_mha`,
    hidden size D, head size h) that is (k (4 D h + 3 h) + 3 D) / (H (4 D h + 3 h) + 3 D).
    """
    return _per_layer_table({lang: _params_kept_by_layer(mask, params, lang) for lang, mask in masks.items()})


def params_kept_frac(mask: torch.Tensor, params: AttentionParams) -> float:
    """Fraction of the attention parameters kept by `mask` over the whole model: every parameter of every
    layer's attention block (`params_kept_per_layer`'s formula).

    Every layer holds the same number of parameters before pruning, so this is the mean of the per-layer
    shares.
    """
    return float(np.mean(_params_kept_by_layer(mask, params)))


def _per_layer_table(rows: Mapping[str, list[float]]) -> pd.DataFrame:
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name, table.columns.name = "language", "layer"
    return table


def token_overlap_shares(tokens_by_lang: Mapping[str, Sequence[Sequence[Hashable]]],
                         reference: str = "en") -> dict[str, np.ndarray]:
    """Per language, each sentence's share of tokens found in its reference translation (`token_overlap`
    averages them): [sentences kept] float64, sentences with no tokens left out; the reference's all 1."""
    if reference not in tokens_by_lang:
        raise XlsubError(f"token_overlap: reference language '{reference}' is not among {list(tokens_by_lang)}; "
                         "pass reference= one of them")
    ref = tokens_by_lang[reference]
    result = {}
    for lang, sentences in tokens_by_lang.items():
        if len(sentences) != len(ref):
            raise XlsubError(f"token_overlap: {lang} has {len(sentences)} sentences and {reference} {len(ref)}; "
                             "pass the same parallel sentences for every language")
        if lang == reference:
            result[lang] = np.ones(sum(len(t) > 0 for t in ref))
            continue
        shares = [sum((Counter(tokens) & Counter(ref_tokens)).values()) / len(tokens)
                  for tokens, ref_tokens in zip(sentences, ref) if len(tokens) > 0]
        result[lang] = np.asarray(shares, dtype=np.float64)
    return result


def token_overlap(tokens_by_lang: Mapping[str, Sequence[Sequence[Hashable]]],
                  reference: str = "en") -> dict[str, float]:
    """Per language, the mean over sentences of the share of a sentence's tokens found in its reference translation.

    Sentence i of every language is the translation of sentence i of `reference`. Tokens are counted as a
    multiset with clipping (as in BLEU's unigram precision): a sentence with tokens s and reference r
    scores sum_t min(count_s(t), count_r(t)) / |s|, so a token repeated in s counts only as often as it
    occurs in r; a set version would reward "a a a a" against "a". Sentences with no tokens are skipped
    (NaN if none is left). Pass tokens without special tokens (<s>, </s>), which every sentence shares.
    The reference language scores 1.0.
    """
    shares = token_overlap_shares(tokens_by_lang, reference)
    return {lang: 1.0 if lang == reference else float(v.mean()) if v.size else math.nan for lang, v in shares.items()}


def token_overlap_intervals(tokens_by_lang: Mapping[str, Sequence[Sequence[Hashable]]], reference: str = "en",
                            replicates: int = 2000, seed: int = 0, level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Per language other than the reference, the percentile bootstrap interval of `token_overlap` over
    sentences (`xlsub.stats.inference.bootstrap_mean_interval` of `token_overlap_shares`): the overlap is a
    mean of one share per translation pair, so resampling the pairs (a sentence with its translation) is
    resampling the shares. NaN where a language has no sentence with tokens."""
    shares = token_overlap_shares(tokens_by_lang, reference)
    return {lang: bootstrap_mean_interval(v, replicates, seed, level) for lang, v in shares.items() if lang != reference}


# -- several pruning seeds --------------------------------------------------------------------------

def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; NaN below two values)."""
    mean = float(np.mean(values)) if values else math.nan
    std = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
    return mean, std


def _over_seed_pairs(masks: Mapping[SubnetworkId, torch.Tensor], languages: Sequence[str],
                     fn) -> dict[tuple[str, str], list[float]]:
    """fn(x, y) over the seed pairs of every pair of languages a, b (a before b in table order, a == b too).

    Languages a != b: every seed pair (s, t), s of a's seeds and t of b's (their prunings are independent
    runs, so a same-seed pairing has no special meaning). Language a with itself: the distinct seed pairs
    s < t of a's own masks.
    """
    grouped = group_by_language(masks, languages)
    langs = list(grouped)
    values = {}
    for i, a in enumerate(langs):
        for b in langs[i:]:
            if a == b:
                pairs = combinations(grouped[a].values(), 2)
            else:
                pairs = product(grouped[a].values(), grouped[b].values())
            values[(a, b)] = [fn(x, y) for x, y in pairs]
    return values


def _symmetric(values: Mapping[tuple[str, str], float]) -> pd.DataFrame:
    langs = list(dict.fromkeys(a for a, _ in values))
    index = pd.Index(langs, name="language")
    table = pd.DataFrame(np.nan, index=index, columns=index.copy())
    for (a, b), value in values.items():
        table.loc[a, b] = table.loc[b, a] = value
    return table


def mean_std_over_seeds(masks: Mapping[SubnetworkId, torch.Tensor],
                        languages: Sequence[str] = ()) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Mean and standard deviation of Jaccard indices over pruning seeds: {SubnetworkId: mask} -> (mean, std).

    Off the diagonal, languages a != b: over every seed pair (s, t), s of a's seeds and t of b's. On the
    diagonal, language a: over the distinct seed pairs s < t of a's own masks, i.e. how stable a's
    subnetwork is across seeds; the natural ceiling for the off-diagonal overlaps. Std is the spread of the
    Jaccard values (ddof=1), not a standard error; NaN with fewer than two values. Languages in
    `languages` order, any others after them.
    """
    stats = {pair: _mean_std(values) for pair, values in _over_seed_pairs(masks, languages, jaccard).items()}
    return _symmetric({p: m for p, (m, _) in stats.items()}), _symmetric({p: s for p, (_, s) in stats.items()})


def expected_jaccard_over_seeds(masks: Mapping[SubnetworkId, torch.Tensor], languages: Sequence[str] = ()) -> pd.DataFrame:
    """The chance level of `mean_std_over_seeds`' mean: `expected_random_jaccard` averaged over the same
    seed pairs (NaN for a language with a single seed on the diagonal)."""
    values = _over_seed_pairs(masks, languages, expected_random_jaccard)
    return _symmetric({pair: _mean_std(v)[0] for pair, v in values.items()})


def seed_stability(masks: Mapping[SubnetworkId, torch.Tensor], languages: Sequence[str] = ()) -> pd.DataFrame:
    """Within-language Jaccard across pruning seeds: rows languages, columns mean, std, pairs.

    The diagonal of `mean_std_over_seeds` with the number of seed pairs it averages.
    """
    rows = {}
    for lang, by_seed in group_by_language(masks, languages).items():
        values = [jaccard(x, y) for x, y in combinations(by_seed.values(), 2)]
        m, s = _mean_std(values)
        rows[lang] = {"mean": m, "std": s, "pairs": len(values)}
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "language"
    return table


# -- tests of overlap against chance ----------------------------------------------------------------
#
# Kept-head overlap O = |A & B| of two independent random masks keeping k_a(l), k_b(l) of the H heads of
# layer l is a sum of independent per-layer hypergeometrics, so its exact law is their convolution. The
# counts are Python integers (the number of mask pairs with each overlap), so tails and quantiles are
# exact and only the final division rounds.

def _overlap_counts(a: torch.Tensor, b: torch.Tensor) -> tuple[list[int], int]:
    """(counts, total): counts[i] of the `total` equally likely random mask pairs overlap in i kept heads.

    a, b are boolean [layers, heads] masks of the same shape; counts has length sum_l min(k_a(l), k_b(l)) + 1.
    """
    heads = a.shape[1]
    counts, total = [1], 1
    for k_a, k_b in zip(a.sum(1).tolist(), b.sum(1).tolist()):
        layer = _hypergeometric_counts(heads, int(k_a), int(k_b))[: min(int(k_a), int(k_b)) + 1]
        conv = [0] * (len(counts) + len(layer) - 1)
        for i, c in enumerate(counts):
            if c:
                for j, d in enumerate(layer):
                    conv[i + j] += c * d
        counts, total = conv, total * math.comb(heads, int(k_b))
    return counts, total


def _kept_pair(mask_a: torch.Tensor, mask_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = _kept(mask_a, "mask_a"), _kept(mask_b, "mask_b")
    _check_same_shape(a, b)
    return a, b


def overlap_null(mask_a: torch.Tensor, mask_b: torch.Tensor) -> np.ndarray:
    """Exact null distribution of the kept-head overlap O = |A & B|: P(O = i) at index i.

    A and B are independent random masks keeping as many heads in every layer as mask_a and mask_b
    (`xlsub.models.pruning.random_mask_like`'s distribution). In layer l with H heads the overlap is
    hypergeometric, P(O_l = i) = C(k_a, i) C(H - k_a, k_b - i) / C(H, k_b); O = sum_l O_l is their
    convolution (layers are independent). Length sum_l min(k_a(l), k_b(l)) + 1, the largest possible
    overlap plus one; computed in integers, so each entry is the exact probability correctly rounded.
    """
    counts, total = _overlap_counts(*_kept_pair(mask_a, mask_b))
    return np.array([c / total for c in counts])


def _upper_tail(a: torch.Tensor, b: torch.Tensor) -> float:
    """P(O >= o_observed) under `overlap_null`, exactly (then rounded once)."""
    counts, total = _overlap_counts(a, b)
    observed = int((a & b).sum())
    return sum(counts[observed:]) / total


def jaccard_pvalue(mask_a: torch.Tensor, mask_b: torch.Tensor) -> float:
    """Exact one-sided p-value of the kept heads' Jaccard: P(J(A, B) >= J(mask_a, mask_b)) for random A, B.

    A, B as in `overlap_null`. Both keep K_a, K_b heads in total whatever the draw, so
    J = O / (K_a + K_b - O) is strictly increasing in the overlap O and P(J >= j_obs) = P(O >= o_obs),
    the upper tail of `overlap_null`. Two empty masks (K_a + K_b = 0) have J = 1 in every draw: p = 1.
    """
    return _upper_tail(*_kept_pair(mask_a, mask_b))


def pruned_overlap_pvalue(mask_a: torch.Tensor, mask_b: torch.Tensor) -> float:
    """`jaccard_pvalue` of the pruned heads: the Jaccard of the complements 1 - mask_a, 1 - mask_b.

    The complement of a uniform k-subset of a layer is a uniform (H - k)-subset, so this is the same
    random-mask null, read on the heads the two subnetworks both removed. Its value equals
    `jaccard_pvalue`'s: with N heads, |~A & ~B| = N - K_a - K_b + |A & B| is increasing in the kept overlap,
    so the two upper tails are the same event. Only the pruned Jaccard itself (and its chance level) differ.
    """
    a, b = _kept_pair(mask_a, mask_b)
    return _upper_tail(~a, ~b)


def _quantile_index(counts: list[int], total: int, q: Fraction) -> int:
    """Smallest i with P(O <= i) >= q (the inverse of the CDF, numpy's 'inverted_cdf'), exactly."""
    cumulative = 0
    for i, c in enumerate(counts):
        cumulative += c
        if cumulative * q.denominator >= q.numerator * total:
            return i
    return len(counts) - 1


def jaccard_chance_band(mask_a: torch.Tensor, mask_b: torch.Tensor, coverage: float = 0.95) -> tuple[float, float]:
    """Central `coverage` band of the kept heads' Jaccard for random masks: its (1 - c)/2 and (1 + c)/2 quantiles.

    Quantile q of a discrete law is the smallest value j with P(J <= j) >= q (inverse CDF). J = O / (K_a +
    K_b - O) is increasing in O, so it is J at the same quantile of `overlap_null`, found exactly.
    Two empty masks: (1.0, 1.0).
    """
    if not 0 < coverage < 1:
        raise XlsubError(f"coverage: {coverage} is not between 0 and 1; pass e.g. 0.95")
    a, b = _kept_pair(mask_a, mask_b)
    counts, total = _overlap_counts(a, b)
    size = int(a.sum()) + int(b.sum())
    if size == 0:
        return 1.0, 1.0
    c = Fraction(str(coverage))
    lo, hi = (_quantile_index(counts, total, q) for q in ((1 - c) / 2, (1 + c) / 2))
    return lo / (size - lo), hi / (size - hi)


def _first_seed(masks: Mapping[SubnetworkId, object], languages: Sequence[str]) -> dict[str, object]:
    """{language: the value of its smallest seed}, languages in `languages` order, others after."""
    return {lang: next(iter(by_seed.values())) for lang, by_seed in group_by_language(masks, languages).items()}


_PVALUE_COLUMNS = ["language_a", "language_b", "jaccard", "expected", "p_value", "p_bh",
                   "pruned_jaccard", "pruned_p_value", "pruned_p_bh"]


def jaccard_pvalue_table(masks: Mapping[SubnetworkId, torch.Tensor], languages: Sequence[str] = ()) -> pd.DataFrame:
    """Every language pair's kept- and pruned-head Jaccard with its exact p-value, on the first seed's masks.

    One row per pair a < b (languages in `languages` order, others after; each language's smallest seed):
    `jaccard` and its chance level `expected` (`expected_random_jaccard`), `p_value` (`jaccard_pvalue`)
    and `p_bh`, Benjamini-Hochberg across the pairs (`benjamini_hochberg`); then the same for the pruned
    heads (`pruned_jaccard`, `pruned_p_value`, `pruned_p_bh`, `pruned_overlap_pvalue`).
    """
    first = _first_seed(masks, languages)
    rows = []
    for a, b in combinations(first, 2):
        x, y = first[a], first[b]
        rows.append({"language_a": a, "language_b": b,
                     "jaccard": jaccard(x, y), "expected": expected_random_jaccard(x, y),
                     "p_value": jaccard_pvalue(x, y),
                     "pruned_jaccard": jaccard(~_kept(x), ~_kept(y)),
                     "pruned_p_value": pruned_overlap_pvalue(x, y)})
    table = pd.DataFrame(rows, columns=_PVALUE_COLUMNS)
    table["p_bh"] = benjamini_hochberg(table["p_value"].to_numpy())
    table["pruned_p_bh"] = benjamini_hochberg(table["pruned_p_value"].to_numpy())
    return table


_EQUAL_SIZE_COLUMNS = ["frac_pruned", "heads_kept", "language_a", "language_b",
                       "jaccard", "expected", "chance_lo", "chance_hi", "p_value"]


def equal_size_jaccard(trajectories: Mapping[SubnetworkId, Sequence[torch.Tensor]], languages: Sequence[str] = (),
                       low: float = 0.1, high: float = 0.9) -> pd.DataFrame:
    """Jaccard of every language pair at equal sparsity along the pruning trajectories, against chance.

    trajectories: {SubnetworkId: [mask after step 0 (all heads on), after step 1, ...]}, all pruned with
    the same number of heads per step, so step i has the same number of heads off in every trajectory
    (refused otherwise; a trajectory may stop earlier than another). For each step whose fraction of
    heads removed, off / (layers * heads), lies in [low, high] and each pair a < b of first-seed
    trajectories that reach it: `jaccard` of the kept heads, `expected` (`expected_random_jaccard`),
    `chance_lo`, `chance_hi` (`jaccard_chance_band`, 95%) and `p_value` (`jaccard_pvalue`). Comparing
    at equal size removes the size difference between subnetworks picked by a stop rule.
    Long form, one row per (step, pair), steps ascending.
    """
    first = _first_seed(trajectories, languages)
    first = {lang: [_kept(m, f"trajectories[{lang}] step {i}") for i, m in enumerate(steps)]
             for lang, steps in first.items()}
    shapes = {tuple(m.shape) for steps in first.values() for m in steps}
    if len(shapes) > 1:
        raise XlsubError(f"trajectories: head masks of shapes {sorted(shapes)}; use trajectories pruned from the same model")
    if not shapes:
        return pd.DataFrame(columns=_EQUAL_SIZE_COLUMNS)
    layers, heads = shapes.pop()
    size = layers * heads
    off = {lang: [size - int(m.sum()) for m in steps] for lang, steps in first.items()}
    reference = max(off, key=lambda lang: len(off[lang]))
    for lang, counts in off.items():
        for step, (n, m) in enumerate(zip(counts, off[reference])):
            if n != m:
                raise XlsubError(f"trajectories: {lang} has {n} heads off after step {step} and {reference} {m}; "
                                 "prune every language with the same number of heads per step")
    rows = []
    for step, n_off in enumerate(off[reference]):
        frac = n_off / size
        if not round(low, 9) <= round(frac, 9) <= round(high, 9):
            continue
        reached = [lang for lang in first if len(first[lang]) > step]
        for a, b in combinations(reached, 2):
            x, y = first[a][step], first[b][step]
            lo, hi = jaccard_chance_band(x, y)
            rows.append({"frac_pruned": frac, "heads_kept": size - n_off, "language_a": a, "language_b": b,
                         "jaccard": jaccard(x, y), "expected": expected_random_jaccard(x, y),
                         "chance_lo": lo, "chance_hi": hi, "p_value": jaccard_pvalue(x, y)})
    return pd.DataFrame(rows, columns=_EQUAL_SIZE_COLUMNS)


def within_vs_across_jaccard(masks: Mapping[SubnetworkId, torch.Tensor], n_perm: int = 1000,
                             seed: int = 0) -> tuple[float, float, float]:
    """Noise ceiling: mean same-language Jaccard across seeds against mean cross-language Jaccard.

    within = mean of J over the pairs of subnetworks with the same language (seeds s < t, pooled over
    languages); across = mean over the pairs with different languages (every seed combination).
    Statistic T = within - across. Permutation test of the language labels: each of `n_perm` permutations
    (`numpy.random.default_rng(seed).permutation` of the labels, drawn in turn, subnetworks sorted by
    (language, seed)) keeps the number of subnetworks per language; p = (1 + #{T_perm >= T}) / (1 + n_perm),
    one-sided (Phipson & Smyth 2010). Returns (within, across, p). Without a language with two or more
    seeds `within` is NaN, and with a single language `across` is NaN; in either case p is NaN.
    """
    if isinstance(n_perm, bool) or not isinstance(n_perm, int) or n_perm < 1:
        raise XlsubError(f"n_perm: {n_perm!r} is not a positive number of permutations; pass e.g. 1000")
    ids = sorted(masks, key=lambda sid: (sid.language, sid.seed))
    kept = [_kept(masks[sid], str(sid)) for sid in ids]
    n = len(ids)
    first, second = np.triu_indices(n, 1)
    values = np.array([jaccard(kept[i], kept[j]) for i, j in zip(first, second)])
    codes = np.unique([sid.language for sid in ids], return_inverse=True)[1]

    def statistic(labels: np.ndarray) -> tuple[float, float]:
        same = labels[first] == labels[second]
        within = float(values[same].mean()) if same.any() else math.nan
        across = float(values[~same].mean()) if (~same).any() else math.nan
        return within, across

    within, across = statistic(codes)
    if math.isnan(within) or math.isnan(across):
        return within, across, math.nan
    observed = within - across
    # equal statistics from different pair sets may differ in the last bits: count them as ties
    tolerance = 1e-12 * max(1.0, abs(observed))
    rng = np.random.default_rng(seed)
    exceed = 0
    for _ in range(n_perm):
        w, a = statistic(rng.permutation(codes))
        exceed += (w - a) >= observed - tolerance
    return within, across, (1 + exceed) / (1 + n_perm)


def split_half_reliability(importance_a: torch.Tensor, importance_b: torch.Tensor) -> float:
    """Spearman rank correlation of two head-importance estimates from disjoint halves of the pruning data.

    rho = Pearson correlation of the average ranks (ties share the mean of their ranks) of the flattened
    [layers, heads] importances. How reproducible the importance ranking is at this amount of data; NaN
    when either half ranks every head the same.
    """
    a = torch.as_tensor(importance_a).double().numpy()
    b = torch.as_tensor(importance_b).double().numpy()
    if a.shape != b.shape or a.ndim != 2:
        raise XlsubError(f"importance: shapes {a.shape} and {b.shape} are not one [layers, heads] shape; "
                         "pass importances of the same model")
    if np.isnan(a).any() or np.isnan(b).any():
        raise ValueError("importance holds NaN")
    ra, rb = (average_ranks(torch.from_numpy(v.ravel())).numpy() for v in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return math.nan if denominator == 0 else float((ra * rb).sum() / denominator)


def spearman_brown(r: float) -> float:
    """The reliability of the whole from the correlation r of its two halves (Spearman 1910, Brown 1910):
    2r / (1 + r). A split-half correlation understates the reliability of the estimate made from all the
    data, which is twice the size of each half; NaN stays NaN, and r <= -1 gives NaN."""
    return 2 * r / (1 + r) if math.isfinite(r) and r > -1 else math.nan


RELIABLE = 0.7  # below this Spearman-Brown reliability, a ranking of heads by importance is called unreliable


def seed_stability_test(masks: Mapping[SubnetworkId, torch.Tensor], n_draws: int, seed: int,
                        languages: Sequence[str] = ()) -> tuple[pd.DataFrame, float]:
    """Are a language's masks from different pruning seeds more alike than chance?

    One row per language with two or more seeds (`languages` order, others after): `within`, the mean
    Jaccard of its seed pairs; `expected`, the same mean of the exact expectation for random masks with
    each mask's heads per layer (`expected_random_jaccard`); `excess` = within - expected; `p_value`, the
    share of `n_draws` Monte Carlo draws of such random masks (every mask redrawn,
    `numpy.random.default_rng(seed)`) whose mean over the language's seed pairs reaches `within`,
    (1 + #) / (1 + n_draws); `p_bh`, Benjamini-Hochberg across languages; `seeds`.

    Also returns the same draws' p of the mean over languages: descriptive, since its null redraws the
    masks and holds the languages fixed; the claim about languages is tested on `excess`
    (`xlsub.stats.inference.unit_level`). An empty table and NaN without a language with two or more seeds.
    """
    grouped = group_by_language(masks, languages)
    pairs = {lang: list(combinations(by_seed.values(), 2)) for lang, by_seed in grouped.items() if len(by_seed) > 1}
    columns = ["within", "expected", "excess", "p_value", "p_bh", "seeds"]
    if not pairs:
        return pd.DataFrame(columns=columns, index=pd.Index([], name="language")), math.nan
    within = np.array([np.mean([jaccard(a, b) for a, b in ps]) for ps in pairs.values()])
    expected = np.array([np.mean([expected_random_jaccard(a, b) for a, b in ps]) for ps in pairs.values()])
    rng = np.random.default_rng(seed)
    counts = {lang: [[int(k) for k in _kept(m).sum(1)] for m in grouped[lang].values()] for lang in pairs}
    heads = next(iter(masks.values())).shape[1]

    def draw(kept_per_layer: list[int]) -> np.ndarray:
        out = np.zeros((len(kept_per_layer), heads), dtype=bool)
        for layer, k in enumerate(kept_per_layer):
            out[layer, rng.choice(heads, size=k, replace=False)] = True
        return out

    def jac(a: np.ndarray, b: np.ndarray) -> float:
        union = int((a | b).sum())
        return 1.0 if union == 0 else int((a & b).sum()) / union

    null = np.array([[np.mean([jac(a, b) for a, b in combinations([draw(c) for c in counts[lang]], 2)]) for lang in pairs]
                     for _ in range(n_draws)]).reshape(n_draws, len(pairs))
    tolerance = 1e-12
    per_language = [(1 + int((null[:, i] >= within[i] - tolerance).sum())) / (1 + n_draws) for i in range(len(pairs))]
    overall = (1 + int((null.mean(1) >= within.mean() - tolerance).sum())) / (1 + n_draws)
    table = pd.DataFrame({"within": within, "expected": expected, "excess": within - expected, "p_value": per_language,
                          "p_bh": benjamini_hochberg(per_language), "seeds": [len(grouped[lang]) for lang in pairs]},
                         index=pd.Index(list(pairs), name="language"))
    return table, overall


def head_agreement_by_language(masks: Mapping[SubnetworkId, torch.Tensor], n_perm: int, seed: int,
                               languages: Sequence[str] = ()) -> tuple[pd.DataFrame, float]:
    """Do the languages need different heads? From every seed's masks, adjusted for mask size.

    For each pair of masks, the excess overlap J - E[J] (`expected_random_jaccard`: random masks with the
    same heads per layer), so that a small subnetwork is not called different for being small. Per
    language: `within` = mean excess over its own seed pairs, `across` = mean excess over the pairs of one
    of its masks and one of another language's (every seed combination), `difference` = within - across.
    Rows: languages (in `languages` order, others after); `within` is NaN for a language with one seed.

    p: the languages as the unit, by permuting the language labels of the masks (each language keeps its
    number of masks; `numpy.random.default_rng(seed)`), statistic = mean within - mean across over all
    pairs; p = (1 + #{T_perm >= T}) / (1 + n_perm). NaN without a language with two or more seeds.
    """
    ids = [SubnetworkId(lang, s) for lang, by_seed in group_by_language(masks, languages).items() for s in by_seed]
    kept = [_kept(masks[sid], str(sid)) for sid in ids]
    n = len(ids)
    first, second = np.triu_indices(n, 1)
    excess = np.array([jaccard(kept[i], kept[j]) - expected_random_jaccard(kept[i], kept[j]) for i, j in zip(first, second)])
    labels = np.array([sid.language for sid in ids])
    rows = {}
    for lang in dict.fromkeys(labels):
        own = (labels[first] == lang) & (labels[second] == lang)
        mixed = (labels[first] == lang) ^ (labels[second] == lang)
        within = float(excess[own].mean()) if own.any() else math.nan
        across = float(excess[mixed].mean()) if mixed.any() else math.nan
        rows[lang] = {"within": within, "across": across, "difference": within - across, "seeds": int((labels == lang).sum())}
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "language"

    def statistic(codes: np.ndarray) -> float:
        same = codes[first] == codes[second]
        if not same.any() or same.all():
            return math.nan
        return float(excess[same].mean() - excess[~same].mean())

    codes = np.unique(labels, return_inverse=True)[1]
    observed = statistic(codes)
    if math.isnan(observed):
        return table, math.nan
    tolerance = 1e-12 * max(1.0, abs(observed))
    rng = np.random.default_rng(seed)
    exceed = sum(statistic(rng.permutation(codes)) >= observed - tolerance for _ in range(n_perm))
    return table, (1 + exceed) / (1 + n_perm)
