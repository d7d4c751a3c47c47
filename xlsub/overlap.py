"""How much two languages' subnetworks (head masks) share, against chance, and how much their text shares.

A head mask is a `[layers, heads]` 0/1 tensor (1 = head kept), one per language.

- `jaccard`: |kept in both| / |kept in either|, and `jaccard_matrix` over all languages.
- `expected_random_jaccard`: the chance level, E[Jaccard] of two random masks with the same number of
  kept heads in every layer as the two masks (the distribution `xlsub.pruning.random_mask_like` draws
  from), computed exactly. Masks that keep 90% of the heads overlap by ~0.8 by chance alone, so an
  observed Jaccard means little without it.
- `proportion_kept_per_layer`, `params_kept_per_layer`: where the pruning removed heads.
- `token_overlap`: the share of a sentence's tokens that also occur in its reference (English)
  translation: shared subword vocabulary as a rival explanation for shared subnetworks.
- `mean_std_over_seeds`, `seed_stability`: the same over several pruning seeds.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from itertools import combinations, product

import numpy as np
import pandas as pd
import torch

from xlsub.errors import XlsubError


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


def _hypergeometric_pmf(heads: int, k_a: int, k_b: int) -> np.ndarray:
    """P(|A & B| = i), i = 0..heads, for A, B uniform subsets of sizes k_a, k_b of `heads` heads."""
    total = math.comb(heads, k_b)
    pmf = np.zeros(heads + 1)
    for i in range(max(0, k_a + k_b - heads), min(k_a, k_b) + 1):
        pmf[i] = math.comb(k_a, i) * math.comb(heads - k_a, k_b - i) / total
    return pmf


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


def params_kept_per_layer(masks: Mapping[str, torch.Tensor], hidden_size: int, head_dim: int) -> pd.DataFrame:
    """Share of each layer's attention parameters kept: rows languages, columns layers.

    A layer's attention block with H heads of size h = head_dim and hidden size D holds
    - per head: query, key and value rows, 3 (D h + h) weights and biases, and the output projection's
      h input columns, D h: per_head = 4 D h + 3 h;
    - shared: the output projection's bias (D) and the attention LayerNorm's weight and bias (2 D),
      which stay whatever heads are pruned.
    With k of H heads kept the share is (k per_head + 3 D) / (H per_head + 3 D): the always-kept
    parameters count as kept. This is `xlsub.pruning.params_kept_frac` per layer (its mean over layers
    equals that function, every layer having the same total). A layer with every head pruned keeps
    3 D / (H per_head + 3 D), not 0.
    """
    per_head = 4 * hidden_size * head_dim + 3 * head_dim
    shared = 3 * hidden_size
    rows = {}
    for lang, mask in masks.items():
        kept = _kept(mask, lang)
        total = kept.shape[1] * per_head + shared
        rows[lang] = [(int(k) * per_head + shared) / total for k in kept.sum(1).tolist()]
    return _per_layer_table(rows)


def _per_layer_table(rows: Mapping[str, list[float]]) -> pd.DataFrame:
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name, table.columns.name = "language", "layer"
    return table


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
            result[lang] = 1.0
            continue
        shares = []
        for tokens, ref_tokens in zip(sentences, ref):
            if len(tokens) == 0:
                continue
            common = Counter(tokens) & Counter(ref_tokens)
            shares.append(sum(common.values()) / len(tokens))
        result[lang] = float(np.mean(shares)) if shares else math.nan
    return result


# -- several pruning seeds --------------------------------------------------------------------------

def _by_language(masks: Mapping[tuple[str, int], torch.Tensor]) -> dict[str, dict[int, torch.Tensor]]:
    grouped: dict[str, dict[int, torch.Tensor]] = {}
    for (lang, seed), mask in masks.items():
        grouped.setdefault(lang, {})[seed] = mask
    return grouped


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; NaN below two values)."""
    mean = float(np.mean(values)) if values else math.nan
    std = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
    return mean, std


def mean_std_over_seeds(masks: Mapping[tuple[str, int], torch.Tensor]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Mean and standard deviation of Jaccard indices over pruning seeds: {(lang, seed): mask} -> (mean, std).

    Off the diagonal, languages a != b: over every seed pair (s, t), s of a's seeds and t of b's (their
    prunings are independent runs, so a same-seed pairing has no special meaning). On the diagonal,
    language a: over the distinct seed pairs s < t of a's own masks, i.e. how stable a's subnetwork is
    across seeds; the natural ceiling for the off-diagonal overlaps. Std is the spread of the Jaccard
    values (ddof=1), not a standard error; NaN with fewer than two values.
    """
    grouped = _by_language(masks)
    langs = list(grouped)
    index = pd.Index(langs, name="language")
    mean = pd.DataFrame(np.nan, index=index, columns=index.copy())
    std = mean.copy()
    for i, a in enumerate(langs):
        for b in langs[i:]:
            if a == b:
                pairs = combinations(grouped[a].values(), 2)
            else:
                pairs = product(grouped[a].values(), grouped[b].values())
            m, s = _mean_std([jaccard(x, y) for x, y in pairs])
            mean.loc[a, b] = mean.loc[b, a] = m
            std.loc[a, b] = std.loc[b, a] = s
    return mean, std


def seed_stability(masks: Mapping[tuple[str, int], torch.Tensor]) -> pd.DataFrame:
    """Within-language Jaccard across pruning seeds: rows languages, columns mean, std, pairs.

    The diagonal of `mean_std_over_seeds` with the number of seed pairs it averages.
    """
    rows = {}
    for lang, by_seed in _by_language(masks).items():
        values = [jaccard(x, y) for x, y in combinations(by_seed.values(), 2)]
        m, s = _mean_std(values)
        rows[lang] = {"mean": m, "std": s, "pairs": len(values)}
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "language"
    return table
