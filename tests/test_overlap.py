"""Head-mask overlap, its chance level, per-layer proportions and token overlap, against hand-made cases."""

from __future__ import annotations

import copy
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from tests.test_heads import HEADS, HIDDEN, tiny_model
from xlsub.artifacts import SubnetworkId as S
from xlsub.errors import XlsubError
from xlsub.models.pruning import prune_heads
from xlsub.stats.overlap import (
    AttentionParams,
    expected_jaccard_over_seeds,
    expected_random_jaccard,
    expected_random_jaccard_matrix,
    jaccard,
    jaccard_matrix,
    mean_std_over_seeds,
    params_kept_frac,
    params_kept_per_layer,
    proportion_kept_per_layer,
    seed_stability,
    token_overlap,
)

A = torch.tensor([[1, 1, 0], [0, 1, 1]])
B = torch.tensor([[1, 0, 0], [1, 1, 1]])


def test_jaccard_hand_made():
    # both: (0,0), (1,1), (1,2); either: those and (0,1), (1,0)
    assert jaccard(A, B) == pytest.approx(3 / 5)
    assert jaccard(A, A) == 1.0
    assert jaccard(A, 1 - A) == 0.0
    assert jaccard(torch.zeros(2, 3), torch.zeros(2, 3)) == 1.0  # 0/0: two empty masks are identical
    assert jaccard(A.float(), B.bool()) == pytest.approx(3 / 5)


def test_jaccard_refuses_bad_masks():
    with pytest.raises(XlsubError, match="same model"):
        jaccard(A, torch.ones(3, 3))
    with pytest.raises(ValueError, match="only 0 and 1"):
        jaccard(A * 0.5, B)


def test_jaccard_matrix():
    table = jaccard_matrix({"en": A, "de": B, "zh": 1 - A})
    assert list(table.index) == list(table.columns) == ["en", "de", "zh"]
    np.testing.assert_allclose(table.to_numpy(), table.to_numpy().T)
    np.testing.assert_allclose(np.diag(table.to_numpy()), 1.0)
    assert table.loc["en", "de"] == pytest.approx(0.6)
    assert table.loc["en", "zh"] == 0.0
    assert table.loc["de", "zh"] == pytest.approx(1 / 5)  # zh keeps (0,2), (1,0); de keeps (0,0), (1,*)


# -- chance level ----------------------------------------------------------------------------------

def exact_by_enumeration(mask_a: torch.Tensor, mask_b: torch.Tensor) -> Fraction:
    """E[Jaccard] over every pair of random masks, enumerated (tiny masks only), in exact fractions."""
    from itertools import combinations, product

    layers, heads = mask_a.shape
    options = [[list(combinations(range(heads), int(mask[layer].sum()))) for layer in range(layers)]
               for mask in (mask_a, mask_b)]
    total, count = Fraction(0), 0
    for pick_a in product(*options[0]):
        for pick_b in product(*options[1]):
            sets_a = {(layer, h) for layer, hs in enumerate(pick_a) for h in hs}
            sets_b = {(layer, h) for layer, hs in enumerate(pick_b) for h in hs}
            union = len(sets_a | sets_b)
            total += Fraction(len(sets_a & sets_b), union) if union else Fraction(1)
            count += 1
    return total / count


def test_expected_random_jaccard_hand_computed():
    one_of_two = torch.tensor([[1, 0]])
    assert expected_random_jaccard(one_of_two, one_of_two) == pytest.approx(1 / 2)
    # Two such layers: intersection 0, 1, 2 with probability 1/4, 1/2, 1/4, union 4 - intersection:
    # E[J] = 1/2 * 1/3 + 1/4 * 1 = 5/12, not E[inter] / E[union] = 1/3.
    two_layers = torch.tensor([[1, 0], [0, 1]])
    assert expected_random_jaccard(two_layers, two_layers) == pytest.approx(5 / 12)
    # 2 of 4 heads each: intersection 0, 1, 2 with probability 1/6, 4/6, 1/6 -> 4/6 * 1/3 + 1/6 = 7/18.
    assert expected_random_jaccard(torch.tensor([[1, 1, 0, 0]]), torch.tensor([[0, 1, 0, 1]])) == pytest.approx(7 / 18)
    full = torch.ones(3, 4)
    assert expected_random_jaccard(full, full) == 1.0
    assert expected_random_jaccard(full, torch.tensor([[1, 0, 0, 0], [0] * 4, [1, 1, 0, 0]])) == pytest.approx(3 / 12)
    assert expected_random_jaccard(torch.zeros(2, 3), A) == 0.0
    assert expected_random_jaccard(torch.zeros(2, 3), torch.zeros(2, 3)) == 1.0


def test_expected_random_jaccard_equals_enumeration():
    a = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]])
    b = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 0], [0, 0, 0, 1]])
    assert expected_random_jaccard(a, b) == pytest.approx(float(exact_by_enumeration(a, b)), abs=1e-12)


def test_expected_random_jaccard_matches_monte_carlo_of_random_mask_like():
    from xlsub.models.pruning import random_mask_like

    g = torch.Generator().manual_seed(0)
    layers, heads = 12, 12
    a = (torch.rand(layers, heads, generator=g) < torch.linspace(0.3, 0.95, layers)[:, None]).float()
    b = (torch.rand(layers, heads, generator=g) < 0.8).float()
    b[0] = 0  # a layer with every head pruned
    draws = np.array([jaccard(random_mask_like(a, seed=2 * i), random_mask_like(b, seed=2 * i + 1))
                      for i in range(3000)])
    exact = expected_random_jaccard(a, b)
    standard_error = draws.std(ddof=1) / math.sqrt(len(draws))
    assert abs(draws.mean() - exact) < 4 * standard_error
    assert standard_error < 0.002  # the check has teeth
    assert 0.3 < exact < jaccard(a, b) + 0.3


def test_expected_random_jaccard_matrix():
    masks = {"en": A, "de": B}
    table = expected_random_jaccard_matrix(masks)
    assert table.loc["en", "de"] == table.loc["de", "en"] == pytest.approx(expected_random_jaccard(A, B))
    assert table.loc["en", "en"] == pytest.approx(float(exact_by_enumeration(A, A)))
    assert table.loc["en", "en"] < 1


# -- where heads were kept -------------------------------------------------------------------------

def test_proportion_kept_per_layer_averages_over_heads():
    masks = {"en": torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 1]]), "de": torch.ones(3, 4)}
    table = proportion_kept_per_layer(masks)
    assert list(table.index) == ["en", "de"] and list(table.columns) == [0, 1, 2]
    np.testing.assert_allclose(table.loc["en"].to_numpy(), [0.5, 1.0, 0.25])
    np.testing.assert_allclose(table.loc["de"].to_numpy(), [1.0, 1.0, 1.0])


def test_params_kept_per_layer_hand_computed():
    hidden, head_dim = 8, 2  # 4 heads
    per_head = 4 * hidden * head_dim + 3 * head_dim  # q, k, v rows with biases; output projection columns
    total = 4 * per_head + 3 * hidden  # + output bias + LayerNorm weight and bias
    table = params_kept_per_layer({"en": torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]])},
                                  AttentionParams.full_mha(hidden, head_dim, 4))
    np.testing.assert_allclose(table.loc["en"].to_numpy(),
                               [1.0, (per_head + 3 * hidden) / total, 3 * hidden / total])


def test_params_kept_keeps_a_key_value_head_while_one_query_head_of_its_group_is_kept():
    # 6 query heads read 3 key/value heads in groups (0, 1), (2, 3), (4, 5)
    params = AttentionParams(per_query_head=10, per_kv_head=7, shared=5, heads=6, kv_heads=3)
    assert params.total == 6 * 10 + 3 * 7 + 5
    mask = torch.tensor([[1, 1, 1, 1, 1, 1],
                         [1, 0, 0, 1, 0, 0],   # two query heads, two groups half kept
                         [1, 1, 0, 0, 0, 0],   # two query heads, one whole group
                         [0, 0, 0, 0, 0, 0]])
    table = params_kept_per_layer({"en": mask}, params)
    expected = [1.0, (2 * 10 + 2 * 7 + 5) / 86, (2 * 10 + 1 * 7 + 5) / 86, 5 / 86]
    np.testing.assert_allclose(table.loc["en"].to_numpy(), expected)
    assert params_kept_frac(mask, params) == pytest.approx(np.mean(expected))
    with pytest.raises(XlsubError, match="6 heads per layer, but the model's attention has 4"):
        params_kept_frac(mask, AttentionParams(10, 7, 5, heads=4, kv_heads=2))
    with pytest.raises(ValueError, match="evenly"):
        AttentionParams(10, 7, 5, heads=6, kv_heads=4)


def test_full_mha_gives_the_same_floats_as_the_one_formula_of_before():
    """XLM-R base's numbers stay bit-identical: (k (4 D h + 3 h) + 3 D) / (H (4 D h + 3 h) + 3 D)."""
    hidden, head_dim, heads = 768, 64, 12
    per_head = 4 * hidden * head_dim + 3 * head_dim
    mask = (torch.rand(12, heads, generator=torch.Generator().manual_seed(0)) < 0.6).int()
    before = [(int(k) * per_head + 3 * hidden) / (heads * per_head + 3 * hidden) for k in mask.sum(1).tolist()]
    params = AttentionParams.full_mha(hidden, head_dim, heads)
    assert params_kept_per_layer({"en": mask}, params).loc["en"].tolist() == before
    assert params_kept_frac(mask, params) == float(np.mean(before))


def attention_params(model) -> list[int]:
    """Parameters of each layer's attention block as the model holds them: query, key, value, output
    projection and the attention LayerNorm."""
    return [sum(p.numel() for p in layer.attention.parameters()) for layer in model.base_model.encoder.layer]


@pytest.mark.parametrize("kind", ["xlmr", "bert"])
def test_params_kept_counts_a_physically_pruned_model(kind):
    model = tiny_model(kind)
    mask = torch.tensor([[1.0, 1, 1, 1], [0, 1, 0, 0], [0, 0, 0, 0]])  # all, one, none of the 4 heads
    before = attention_params(model)
    after = attention_params(prune_heads(copy.deepcopy(model), mask))
    assert after[0] == before[0] and after[2] < after[1] < before[1]  # the pruning did remove weights
    params = AttentionParams.full_mha(HIDDEN, HIDDEN // HEADS, HEADS)
    table = params_kept_per_layer({"en": mask}, params)
    np.testing.assert_allclose(table.loc["en"].to_numpy(), np.array(after) / np.array(before))
    assert params_kept_frac(mask, params) == pytest.approx(sum(after) / sum(before))
    assert params_kept_frac(torch.ones(3, HEADS), params) == 1.0


# -- token overlap ---------------------------------------------------------------------------------

def test_token_overlap_multiset_with_clipping():
    tokens = {
        "en": [["▁the", "▁cat", "▁sat"], ["▁ok"], ["▁a", "▁b"]],
        "de": [["▁the", "▁the", "▁katze"], ["▁ok"], []],  # "▁the" twice counts once; empty sentence skipped
        "zh": [["猫"], ["确定"], ["▁a", "▁b", "▁c", "▁d"]],
    }
    result = token_overlap(tokens)
    assert result["en"] == 1.0
    assert result["de"] == pytest.approx((1 / 3 + 1) / 2)
    assert result["zh"] == pytest.approx((0 + 0 + 2 / 4) / 3)
    ids = {lang: [[hash(t) % 1000 for t in s] for s in sents] for lang, sents in tokens.items()}
    assert token_overlap(ids, reference="en") == pytest.approx(result)  # token ids work as well as strings
    assert math.isnan(token_overlap({"en": [["a"]], "ur": [[]]})["ur"])


def test_token_overlap_refuses_mismatched_input():
    with pytest.raises(XlsubError, match="reference language 'en'"):
        token_overlap({"de": [["a"]]})
    with pytest.raises(XlsubError, match="de has 2 sentences and en 1"):
        token_overlap({"en": [["a"]], "de": [["a"], ["b"]]})


# -- several seeds ---------------------------------------------------------------------------------

def test_mean_std_over_seeds():
    m = {
        S("en", 0): torch.tensor([[1, 1, 0, 0]]), S("en", 1): torch.tensor([[1, 1, 1, 0]]),
        S("de", 0): torch.tensor([[0, 1, 1, 0]]), S("de", 1): torch.tensor([[1, 1, 0, 0]]),
        S("de", 2): torch.tensor([[0, 0, 1, 1]]),
    }
    mean, std = mean_std_over_seeds(m)
    assert list(mean.index) == list(mean.columns) == ["en", "de"]
    assert list(mean_std_over_seeds(m, ["de", "en"])[0].index) == ["de", "en"]
    cross = [jaccard(m[S("en", s)], m[S("de", t)]) for s in (0, 1) for t in (0, 1, 2)]  # all 6 seed pairs
    assert cross == pytest.approx([1 / 3, 1, 0, 2 / 3, 2 / 3, 1 / 4])
    assert mean.loc["en", "de"] == mean.loc["de", "en"] == pytest.approx(np.mean(cross))
    assert std.loc["en", "de"] == pytest.approx(np.std(cross, ddof=1))
    within_de = [1 / 3, 1 / 3, 0]  # seed pairs (0,1), (0,2), (1,2)
    assert mean.loc["de", "de"] == pytest.approx(np.mean(within_de))
    assert mean.loc["en", "en"] == pytest.approx(2 / 3) and math.isnan(std.loc["en", "en"])  # one pair only
    stability = seed_stability(m)
    assert stability.loc["de", "mean"] == pytest.approx(np.mean(within_de))
    assert stability.loc["de", "std"] == pytest.approx(np.std(within_de, ddof=1))
    assert list(stability["pairs"]) == [1, 3]
    expected = expected_jaccard_over_seeds(m)
    chance = [expected_random_jaccard(m[S("en", s)], m[S("de", t)]) for s in (0, 1) for t in (0, 1, 2)]
    assert expected.loc["en", "de"] == expected.loc["de", "en"] == pytest.approx(np.mean(chance))
    # 2 of 4 heads against 2 of 4: intersection 0, 1, 2 with probability 1/6, 4/6, 1/6 -> 7/18
    assert expected.loc["de", "de"] == pytest.approx(7 / 18)
