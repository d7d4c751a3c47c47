"""The analyze stage's numbers against hand-made cases and independent computations, and its figures drawn."""

from __future__ import annotations

import io
import itertools
import math
from dataclasses import replace
from itertools import combinations, product

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.collections import QuadMesh

from tests.reference import linear_cka_gram
from xlsub.artifacts import SubnetworkId as S
from xlsub.errors import XlsubError
from xlsub.models.pruning import cross_perplexity_matrix
from xlsub.report.analysis import AnalysisInputs, AnalysisResult, analyze
from xlsub.report.figures import CKA_CMAP, JACCARD_CMAP
from xlsub.report.figures.stages import cross_perplexity_figures, head_mask_heatmap, matrix_heatmap, perplexity_bars
from xlsub.report.similarity_tables import Counts
from xlsub.report.tables import (
    heads_kept_tables,
    long_table,
    mask_overlap_tables,
    relative_perplexity,
)
from xlsub.similarity.cka import shuffled_pairs_cka
from xlsub.stats.overlap import AttentionParams, expected_random_jaccard

LANGS = ["en", "de", "zh"]
# 2 layers x 4 heads, two pruning seeds per language, made by hand.
MASKS = {
    S("en", 0): torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]]),
    S("en", 1): torch.tensor([[1, 0, 1, 0], [1, 1, 1, 0]]),
    S("de", 0): torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1]]),
    S("de", 1): torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]]),
    S("zh", 0): torch.tensor([[0, 0, 1, 1], [1, 0, 0, 1]]),
    S("zh", 1): torch.tensor([[0, 1, 1, 1], [1, 0, 0, 1]]),
}
SEED0 = {sid: mask for sid, mask in MASKS.items() if sid.seed == 0}
PPL_FULL = {"en": 100.0, "de": 200.0, "zh": 400.0}
# rows: the subnetworks of seed 0, as the prune stage logs them
CROSS = pd.DataFrame([[110.0, 300.0, 800.0], [150.0, 220.0, 600.0], [180.0, 500.0, 440.0]],
                     index=[f"{lang}-s0" for lang in LANGS], columns=LANGS)
CROSS_RANDOM = CROSS * 1.5
# de shares 2 of its 3 tokens with en in sentence 0 and, with clipping, 1 of 2 in sentence 1; zh shares none.
TOKENS = {"en": [[1, 2, 3], [4, 5]], "de": [[1, 2, 9], [4, 4]], "zh": [[7, 8], [9]]}
# `analyze` has no defaults of its own (the analyze stage's dataclass declares them); these tests were
# written for linear CKA with these counts, and the other analysis tests share them
OPTIONS = dict(cka_kind="linear", layers=None, cka_precision="float64", reference="en", bootstrap=1000, permutations=1000,
               resample_seed=0, counts=Counts(full=1000, controls=1000, subnetworks=200, length=500, power_draws=10), device="cpu")


def analyzed(given: AnalysisInputs, **options) -> AnalysisResult:
    """`analyze(given)` with OPTIONS, those named in `options` replaced."""
    return analyze(given, **(OPTIONS | options))
N, LAYERS, D = 20, 3, 8


def gaussian(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def orthogonal(d, seed):
    q, r = torch.linalg.qr(gaussian(d, d, seed=seed))
    return q * torch.sign(torch.diagonal(r))


def encodings(seeds=(0,)):
    """de is an orthogonal rotation (plus an offset) of en at every layer, so CKA(en, de) = 1; zh is independent noise.
    Subnetworks: en-s* and de-s* reproduce the full model up to scale (CKA 1), zh-s* are unrelated to it."""
    en = gaussian(LAYERS, N, D, seed=1)
    full = {"en": en, "de": en @ orthogonal(D, 2) + 5.0, "zh": gaussian(LAYERS, N, D, seed=3)}
    enc = {"full": full}
    for s in seeds:
        enc[f"en-s{s}"] = {lang: 2.0 * x for lang, x in full.items()}
        enc[f"de-s{s}"] = {lang: x @ orthogonal(D, 10 + s) for lang, x in full.items()}
        enc[f"zh-s{s}"] = {lang: gaussian(LAYERS, N, D, seed=20 + s + i) for i, lang in enumerate(full)}
    enc["random"] = {lang: gaussian(LAYERS, N, D, seed=30 + i) for i, lang in enumerate(LANGS)}
    enc["base"] = {"en": en, "de": en @ orthogonal(D, 4), "zh": gaussian(LAYERS, N, D, seed=5)}
    return enc


def inputs(several_seeds=False, languages=LANGS):
    if several_seeds:
        masks, seeds = MASKS, (0, 1)
        names = [f"{lang}-s{s}" for lang in LANGS for s in seeds]
        cross = pd.DataFrame([CROSS.loc[f"{n[:2]}-s0"] * (1 + 0.1 * int(n[-1])) for n in names], index=names)
        cross_random = cross * 1.5
    else:
        masks, seeds, cross, cross_random = SEED0, (0,), CROSS, CROSS_RANDOM
    return AnalysisInputs(languages=list(languages), masks=masks, cross_ppl=cross, cross_ppl_random=cross_random,
                          ppl_full=PPL_FULL, encodings=encodings(seeds), tokens=TOKENS,
                          attention_params=AttentionParams.full_mha(hidden_size=16, head_dim=4, heads=4))


@pytest.fixture(scope="module")
def single():
    return analyzed(inputs())


@pytest.fixture(scope="module")
def several():
    return analyzed(inputs(several_seeds=True))


def set_jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    """Jaccard with Python sets of (layer, head) positions."""
    kept_a = {tuple(p) for p in a.nonzero().tolist()}
    kept_b = {tuple(p) for p in b.nonzero().tolist()}
    return len(kept_a & kept_b) / len(kept_a | kept_b)


# -- head masks --------------------------------------------------------------------------------------------

def test_jaccard_table_hand_made(single):
    table = single.tables["mask_jaccard"]
    assert list(table.index) == LANGS and list(table.columns) == LANGS
    # en0 & de0 share (0,0) (0,1) (1,1) (1,2) of the 6 heads either keeps; zh0 shares one head of 8 with each
    assert table.loc["en", "de"] == pytest.approx(4 / 6)
    assert table.loc["en", "zh"] == pytest.approx(1 / 8)
    assert table.loc["de", "zh"] == pytest.approx(1 / 8)
    assert np.allclose(np.diag(table), 1.0)
    for a, b in product(LANGS, LANGS):
        assert table.loc[a, b] == pytest.approx(set_jaccard(SEED0[S(a, 0)], SEED0[S(b, 0)]))


def test_expected_table_equals_expected_random_jaccard(single):
    table = single.tables["mask_jaccard_expected"]
    for a, b in product(LANGS, LANGS):
        assert table.loc[a, b] == pytest.approx(expected_random_jaccard(SEED0[S(a, 0)], SEED0[S(b, 0)]))


def test_several_seeds_mean_std_and_stability(several):
    mean, std = several.tables["mask_jaccard"], several.tables["mask_jaccard_std"]
    expected = several.tables["mask_jaccard_expected"]
    for a, b in combinations(LANGS, 2):  # across languages: all 2 x 2 seed pairings
        values = [set_jaccard(MASKS[S(a, s)], MASKS[S(b, t)]) for s, t in product((0, 1), (0, 1))]
        assert mean.loc[a, b] == pytest.approx(np.mean(values))
        assert std.loc[a, b] == pytest.approx(np.std(values, ddof=1))
        chance = [expected_random_jaccard(MASKS[S(a, s)], MASKS[S(b, t)]) for s, t in product((0, 1), (0, 1))]
        assert expected.loc[a, b] == pytest.approx(np.mean(chance))
    stability = several.tables["mask_seed_stability"]
    # en: seed 0 keeps {00,01,10,11,12}, seed 1 {00,02,10,11,12}: 4 shared of 6
    assert stability.loc["en", "mean"] == pytest.approx(4 / 6)
    for lang in LANGS:
        assert stability.loc[lang, "mean"] == pytest.approx(set_jaccard(MASKS[S(lang, 0)], MASKS[S(lang, 1)]))
        assert mean.loc[lang, lang] == pytest.approx(stability.loc[lang, "mean"])
        assert stability.loc[lang, "expected"] == pytest.approx(expected_random_jaccard(MASKS[S(lang, 0)], MASKS[S(lang, 1)]))
    assert several.metrics["mean_seed_stability"] == pytest.approx(stability["mean"].mean())
    assert "mask_jaccard_seeds" in several.figures


def test_proportion_kept_is_per_layer_not_per_head(single):
    table = single.tables["heads_kept_per_layer"]
    # one column per transformer layer (numbered as CKA's hidden states), not one per head index as the
    # study's proportion_masked.py has it (its sum over axis 0)
    assert list(table.columns) == [1, 2]
    assert table.index.name == "subnetwork" and list(table.index) == ["en-s0", "de-s0", "zh-s0"]
    hand = {"en-s0": [2 / 4, 3 / 4], "de-s0": [2 / 4, 3 / 4], "zh-s0": [2 / 4, 2 / 4]}
    for sid, values in hand.items():
        assert table.loc[sid].tolist() == pytest.approx(values)


def test_params_kept_per_layer_hand_made(single):
    table = single.tables["params_kept_per_layer"]
    hidden, head_dim, heads = 16, 4, 4
    per_head = 4 * hidden * head_dim + 3 * head_dim  # q, k, v rows with biases, output columns
    shared = 3 * hidden  # output bias and LayerNorm
    for lang in LANGS:
        for layer, kept in enumerate(SEED0[S(lang, 0)].sum(1).tolist(), start=1):
            assert table.loc[f"{lang}-s0", layer] == pytest.approx((kept * per_head + shared) / (heads * per_head + shared))


def test_several_seeds_heads_kept_has_a_row_per_seed():
    shuffled = {sid: MASKS[sid] for sid in reversed(list(MASKS))}
    table = heads_kept_tables(shuffled, LANGS)["heads_kept_per_layer"]
    assert table.index.name == "subnetwork"
    assert list(table.index) == ["en-s0", "en-s1", "de-s0", "de-s1", "zh-s0", "zh-s1"]
    assert table.loc["zh-s1"].tolist() == pytest.approx([3 / 4, 2 / 4])


def test_mask_tables_keep_language_order():
    shuffled = {key: MASKS[key] for key in reversed(list(MASKS))}
    tables = mask_overlap_tables(shuffled, LANGS)
    assert list(tables["mask_jaccard"].index) == LANGS
    assert list(tables["mask_jaccard"].columns) == LANGS


# -- perplexity -----------------------------------------------------------------------------------------

def test_relative_perplexity_is_raw_over_full(single):
    rel = single.tables["cross_ppl_relative"]
    assert rel.index.name == "subnetwork language" and rel.columns.name == "evaluated on"
    expected = CROSS.to_numpy() / np.array([PPL_FULL[c] for c in LANGS])[None, :]
    assert np.allclose(rel.loc[LANGS, LANGS].to_numpy(), expected)
    rel_random = single.tables["cross_ppl_random_relative"]
    assert np.allclose(rel_random.loc[LANGS, LANGS].to_numpy(), 1.5 * expected)
    raw = single.tables["cross_ppl"]
    assert raw.loc["full"].tolist() == [PPL_FULL[c] for c in LANGS]
    assert np.allclose(raw.loc[LANGS, LANGS].to_numpy(), CROSS.to_numpy())


def test_relative_perplexity_metrics(single):
    ratios = CROSS.to_numpy() / np.array([PPL_FULL[c] for c in LANGS])[None, :]
    off = ratios[~np.eye(3, dtype=bool)]
    assert single.metrics["mean_relative_ppl_offdiag"] == pytest.approx(off.mean())
    assert single.metrics["mean_relative_ppl_diag"] == pytest.approx(np.diag(ratios).mean())
    assert single.metrics["mean_relative_ppl_random_offdiag"] == pytest.approx(1.5 * off.mean())


def test_several_seeds_perplexity_is_the_mean_over_seeds(several):
    rel = several.tables["cross_ppl_relative"]
    # seed s scales the row by (1 + 0.1 s): the mean over seeds 0 and 1 is 1.05 x the base row
    expected = 1.05 * CROSS.to_numpy() / np.array([PPL_FULL[c] for c in LANGS])[None, :]
    assert list(rel.index) == LANGS
    assert np.allclose(rel.to_numpy(), expected)
    by_seed = several.tables["cross_ppl_by_seed"]
    assert list(by_seed.index) == ["en-s0", "en-s1", "de-s0", "de-s1", "zh-s0", "zh-s1"]
    assert by_seed.loc["zh-s1", "de"] == pytest.approx(1.1 * 500.0)


def test_the_prune_stage_matrix_and_its_relative_form():
    """The matrices prune logs: rows `de-s0` in language then seed order, whatever order they were measured in."""
    rows = {S("zh", 0): {"zh": 440.0, "en": 180.0, "de": 500.0}, S("en", 1): {"en": 120.0, "de": 310.0, "zh": 810.0}}
    rows |= {S(lang, 0): dict(zip(LANGS, CROSS.loc[f"{lang}-s0"])) for lang in ("de", "en")}
    matrix = cross_perplexity_matrix(rows, LANGS)
    assert matrix.index.name == "subnetwork" and matrix.columns.name == "evaluated on"
    assert list(matrix.index) == ["en-s0", "en-s1", "de-s0", "zh-s0"] and list(matrix.columns) == LANGS
    assert matrix.loc["en-s1", "zh"] == 810.0 and matrix.loc["zh-s0", "en"] == 180.0
    relative = relative_perplexity(matrix, PPL_FULL)
    for sid, ppls in rows.items():
        for lang, ppl in ppls.items():
            assert relative.loc[str(sid), lang] == pytest.approx(ppl / PPL_FULL[lang])
    assert relative.index.equals(matrix.index) and relative.columns.equals(matrix.columns)


def test_relative_perplexity_needs_every_full_ppl():
    with pytest.raises(XlsubError, match="ppl_full"):
        relative_perplexity(CROSS, {"en": 1.0})


# -- CKA ------------------------------------------------------------------------------------------------

def test_cka_with_english_rotation_is_one_noise_is_low(single):
    curves = single.tables["cka_vs_reference"]
    assert list(curves.index) == ["de", "zh"] and list(curves.columns) == [0, 1, 2]
    assert np.allclose(curves.loc["de"].to_numpy(), 1.0)
    assert (curves.loc["zh"] < 0.9).all()
    enc = encodings()["full"]
    for layer in range(LAYERS):  # against the Gram-matrix form, an independent formula
        assert curves.loc["zh", layer] == pytest.approx(float(linear_cka_gram(enc["en"][layer], enc["zh"][layer])))


def test_shuffled_control_is_below_parallel(single):
    controls = single.tables["cka_controls"]
    parallel, shuffled = controls.loc[("parallel", "de")], controls.loc[("shuffled", "de")]
    assert (shuffled < parallel - 0.1).all()
    enc = encodings()["full"]
    assert shuffled[2] == pytest.approx(float(shuffled_pairs_cka(enc["en"][2], enc["de"][2], seed=0)))
    assert set(controls.index.get_level_values("condition")) == {"parallel", "shuffled", "base", "random"}
    assert np.allclose(controls.loc[("base", "de")].to_numpy(), 1.0)  # base encodings: de rotated from en


def test_cka_metrics(single):
    enc = encodings()
    full = enc["full"]
    last = [float(linear_cka_gram(full["en"][-1], full[l][-1])) for l in ("de", "zh")]
    assert single.metrics["mean_cka_last_layer"] == pytest.approx(np.mean(last))
    shuffled = [float(shuffled_pairs_cka(full["en"][-1], full[l][-1], seed=0)) for l in ("de", "zh")]
    assert single.metrics["mean_cka_shuffled_last_layer"] == pytest.approx(np.mean(shuffled))
    rnd = [float(linear_cka_gram(enc["random"]["en"][-1], enc["random"][l][-1])) for l in ("de", "zh")]
    assert single.metrics["mean_cka_random_last_layer"] == pytest.approx(np.mean(rnd))


def test_cka_pairs_at_default_and_chosen_layers(single):
    pairs = single.tables["cka_pairs"]
    assert sorted(set(pairs.index.get_level_values("layer"))) == [0, 1, 2]
    assert pairs.loc[(2, "en"), "de"] == pytest.approx(1.0)
    assert pairs.loc[(0, "zh"), "zh"] == pytest.approx(1.0)
    chosen = analyzed(AnalysisInputs(languages=LANGS, encodings={"full": encodings()["full"]}), layers=[-1])
    assert sorted(set(chosen.tables["cka_pairs"].index.get_level_values("layer"))) == [2]
    with pytest.raises(XlsubError, match="layers"):
        analyzed(AnalysisInputs(languages=LANGS, encodings={"full": encodings()["full"]}), layers=[3])


def test_cka_full_vs_subnetwork(single):
    curves = single.tables["cka_full_vs_subnetwork"]
    assert curves.index.name == "subnetwork" and list(curves.index) == ["en-s0", "de-s0", "zh-s0"]
    assert np.allclose(curves.loc["en-s0"].to_numpy(), 1.0)  # a scaled copy
    assert np.allclose(curves.loc["de-s0"].to_numpy(), 1.0)  # a rotated copy
    assert (curves.loc["zh-s0"] < 0.9).all()
    enc = encodings()
    last = single.tables["cka_full_vs_subnetwork_last_layer"]
    assert last.index.name == "subnetwork language" and list(last.index) == LANGS
    assert last.loc["zh", "en"] == pytest.approx(float(linear_cka_gram(enc["full"]["en"][-1], enc["zh-s0"]["en"][-1])))
    assert single.metrics["mean_cka_full_vs_subnetwork_last_layer"] == pytest.approx(curves[2].mean())


def test_cka_full_vs_subnetwork_several_seeds(several):
    curves = several.tables["cka_full_vs_subnetwork"]
    assert curves.index.name == "subnetwork" and len(curves) == 6
    enc = encodings(seeds=(0, 1))
    for seed in (0, 1):
        expected = float(linear_cka_gram(enc["full"]["zh"][1], enc[f"zh-s{seed}"]["zh"][1]))
        assert curves.loc[f"zh-s{seed}", 1] == pytest.approx(expected)
    last = several.tables["cka_full_vs_subnetwork_last_layer"]
    mean = np.mean([float(linear_cka_gram(enc["full"]["de"][-1], enc[f"zh-s{s}"]["de"][-1])) for s in (0, 1)])
    assert last.loc["zh", "de"] == pytest.approx(mean)


def test_long_table_one_row_per_cell():
    square = pd.DataFrame([[1.0, 0.25], [0.25, 1.0]], index=pd.Index(["en", "de"], name="language"),
                          columns=pd.Index(["en", "de"], name="language"))
    long = long_table(square)
    assert list(long.columns) == ["language", "other language", "value"]
    assert set(long.itertuples(index=False, name=None)) == {
        ("en", "en", 1.0), ("de", "en", 0.25), ("en", "de", 0.25), ("de", "de", 1.0)}
    curves = pd.DataFrame([[0.1, 0.2, 0.3]], index=pd.MultiIndex.from_tuples([("shuffled", "de")], names=["condition", "language"]),
                          columns=pd.Index([0, 1, 2], name="layer"))
    long = long_table(curves)
    assert list(long.columns) == ["condition", "language", "layer", "value"]
    assert long["layer"].tolist() == [0, 1, 2] and long["value"].tolist() == [0.1, 0.2, 0.3]
    measures = pd.DataFrame({"token_overlap": [0.5], "jaccard_with_reference": [0.2]}, index=pd.Index(["de"], name="language"))
    assert long_table(measures).to_dict("records") == [{"language": "de", "token_overlap": 0.5, "jaccard_with_reference": 0.2}]


# -- token overlap, metrics, reference ---------------------------------------------------------------------

def test_token_overlap_and_metrics(single):
    table = single.tables["token_overlap"]
    assert table.loc["de", "token_overlap"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert table.loc["zh", "token_overlap"] == 0.0
    assert single.metrics["mean_token_overlap"] == pytest.approx((7 / 12 + 0) / 2)
    assert table.loc["de", "jaccard_with_reference"] == pytest.approx(4 / 6)
    assert table.loc["de", "cka_last_layer_with_reference"] == pytest.approx(1.0)


def test_mask_metrics(single):
    assert single.metrics["mean_jaccard"] == pytest.approx((4 / 6 + 1 / 8 + 1 / 8) / 3)
    expected = np.mean([expected_random_jaccard(SEED0[S(a, 0)], SEED0[S(b, 0)]) for a, b in combinations(LANGS, 2)])
    assert single.metrics["mean_expected_jaccard"] == pytest.approx(expected)
    assert single.metrics["mean_heads_kept_frac"] == pytest.approx((5 + 5 + 4) / 24)
    # hidden 16, head_dim 4: a head holds 4*16*4 + 3*4 = 268 parameters, a layer 4*268 + 3*16 = 1120
    kept_heads = (5 + 5 + 4)
    assert single.metrics["mean_params_kept_frac"] == pytest.approx((kept_heads * 268 + 3 * 2 * 48) / (3 * 2 * 1120))


def test_reference_is_an_argument():
    full = {k: v for k, v in encodings()["full"].items() if k != "en"}
    tokens = {k: v for k, v in TOKENS.items() if k != "en"}
    german = AnalysisInputs(languages=["de", "zh"], encodings={"full": full}, tokens=tokens)
    with pytest.raises(XlsubError, match=r"reference: 'en' is not among the analysed languages \(de, zh\); pass one of them"):
        analyzed(german)
    result = analyzed(german, reference="de")
    assert list(result.tables["cka_vs_reference"].index) == ["zh"]
    assert result.tables["cka_vs_reference"].loc["zh", 2] == pytest.approx(float(linear_cka_gram(full["de"][2], full["zh"][2])))
    assert "German" in result.captions["cka_vs_reference"] and "German" in result.captions["token_overlap"]
    # with English present, another reference still wins
    chinese = analyzed(AnalysisInputs(languages=LANGS, tokens=TOKENS), reference="zh")
    assert set(chinese.tables["token_overlap"].index) == {"en", "de"}
    assert chinese.tables["token_overlap"].loc["en", "token_overlap"] == 0.0


def test_missing_inputs_are_skipped_with_a_note():
    result = analyzed(AnalysisInputs(languages=LANGS, masks=SEED0))
    assert "mask_jaccard" in result.figures and "cka_vs_reference" not in result.figures
    assert any("CKA" in note for note in result.notes)
    with pytest.raises(XlsubError, match="unknown kind 'cosine'"):
        analyzed(AnalysisInputs(languages=LANGS), cka_kind="cosine")
    with pytest.raises(XlsubError, match="cka_precision"):
        analyzed(AnalysisInputs(languages=LANGS), cka_precision="half")


def test_float32_products_give_the_same_cka_tables(single):
    fast = analyzed(inputs(), cka_precision="float32")
    for name in ("cka_vs_reference", "cka_controls", "cka_pairs", "cka_full_vs_subnetwork"):
        exact, approx = single.tables[name], fast.tables[name]
        assert exact.shape == approx.shape and exact.index.equals(approx.index), name
        np.testing.assert_allclose(approx.to_numpy(float), exact.to_numpy(float), rtol=0, atol=1e-6, err_msg=name)
    assert fast.metrics["mean_cka_last_layer"] == pytest.approx(single.metrics["mean_cka_last_layer"], abs=1e-6)


# -- figures --------------------------------------------------------------------------------------------

EXPECTED_FIGURES = {"mask_jaccard", "heads_kept_per_layer", "cross_ppl", "cross_ppl_relative",
                    "cka_vs_reference", "cka_pairs", "cka_controls", "cka_full_vs_subnetwork",
                    "token_overlap", "retrieval", "rsa", "power"}


@pytest.mark.parametrize("which", ["single", "several"])
def test_every_figure_has_caption_tables_and_data(which, request):
    result = request.getfixturevalue(which)
    expected = EXPECTED_FIGURES | ({"mask_jaccard_seeds"} if which == "several" else set())
    assert set(result.figures) == expected
    owned = set()
    for name, fig in result.figures.items():
        caption = result.captions[name]
        assert caption and "\n" not in caption
        assert result.figure_tables[name], name
        for table in result.figure_tables[name]:
            assert "." not in table and not result.tables[table].empty  # an id, not a file name
            owned.add(table)
        drawn = [ax for ax in fig.axes if ax.get_visible()]
        assert drawn, name
        for ax in drawn:  # every visible panel (colour bars included) has something drawn
            assert ax.collections or ax.lines or ax.patches or ax.images, (name, ax.get_title())
        assert fig.get_suptitle() or all(ax.get_title() for ax in drawn if ax.get_label() != "<colorbar>"), name
        fig.savefig(io.BytesIO(), format="png", dpi=40)
    assert owned <= set(result.tables)


def test_one_colour_scale_per_kind(single, several):
    def meshes(fig):
        """The heatmaps' meshes (colour bars, whose axes matplotlib labels "<colorbar>", left out)."""
        return [c for ax in fig.axes if ax.get_label() != "<colorbar>" for c in ax.collections if isinstance(c, QuadMesh)]
    for result in (single, several):
        assert len(meshes(result.figures["mask_jaccard"])) == 2  # observed and chance level
        assert len(meshes(result.figures["cka_pairs"])) == 3  # first, middle, last layer
        for mesh in meshes(result.figures["mask_jaccard"]):
            assert (mesh.norm.vmin, mesh.norm.vmax, mesh.cmap.name) == (0, 1, JACCARD_CMAP)
        for name in ("cka_pairs", "cka_full_vs_subnetwork"):
            for mesh in meshes(result.figures[name]):
                assert (mesh.norm.vmin, mesh.norm.vmax, mesh.cmap.name) == (0, 1, CKA_CMAP)
        relative = meshes(result.figures["cross_ppl_relative"])
        assert len(relative) == 2  # subnetwork and random control share one scale, centred at 1 (log)
        assert relative[0].norm.vmin == relative[1].norm.vmin and relative[0].norm.vmax == relative[1].norm.vmax
        assert relative[0].norm.vmin * relative[0].norm.vmax == pytest.approx(1.0)
        values = np.concatenate([result.tables[n].to_numpy().ravel()
                                 for n in ("cross_ppl_relative", "cross_ppl_random_relative")])
        assert relative[0].norm.vmin <= values.min() and values.max() <= relative[0].norm.vmax * (1 + 1e-12)


def test_language_names_on_axes(single):
    ax = single.figures["mask_jaccard"].axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["English", "German", "Chinese"]
    assert not math.isnan(single.metrics["mean_cka_last_layer"])


def test_stage_figures_show_their_numbers():
    """The finetune and prune stages' figures: the drawn values are the table's."""
    table = pd.DataFrame({"lang": ["en", "de"], "ppl_before": [30.0, 40.0], "ppl_after": [10.0, 12.0], "ppl_unigram": [900.0, 800.0]})
    bars = perplexity_bars(table).axes[0]
    heights = sorted(round(p.get_height(), 6) for p in bars.patches if p.get_height() > 0)
    assert heights == sorted([30.0, 40.0, 10.0, 12.0, 900.0, 800.0])
    mask = torch.tensor([[1, 0], [1, 1]])
    importance = torch.tensor([[0.9, 0.1], [0.5, 0.25]])
    heat = head_mask_heatmap(mask, importance, "de-s0").axes[0]
    assert [t.get_text() for t in heat.texts] == ["0.90", "×", "0.50", "0.25"]
    assert "3/4 heads kept" in heat.get_title()
    matrix = matrix_heatmap(CROSS, "perplexity", "ppl").axes[0]
    assert [t.get_text() for t in matrix.texts] == [f"{v:.0f}" for v in CROSS.to_numpy().ravel()]
    relative = relative_perplexity(CROSS, PPL_FULL)
    drawn = cross_perplexity_figures(CROSS_RANDOM, 1.5 * relative, control=True)
    assert list(drawn) == ["cross_ppl_random", "cross_ppl_random_relative"]
    shown = [t.get_text() for t in drawn["cross_ppl_random_relative"].axes[0].texts]
    assert shown == [f"{1.5 * v / PPL_FULL[c]:.2f}" for row in CROSS.to_numpy() for v, c in zip(row, LANGS)]
    assert list(cross_perplexity_figures(CROSS, relative)) == ["cross_ppl", "cross_ppl_relative"]


def test_one_extreme_cell_does_not_flatten_the_relative_perplexity_heatmap():
    """Issue 24, case 6: the demo's cross_ppl_relative.png had one 20.8 cell and every other between 1.0 and
    ~1.6 one colour. With the log scale capped at the values' 10-90% range (symmetric about 1), 1.0 and 1.6
    are far apart in colour; the caption says the scale is logarithmic and capped, the numbers stay exact."""
    from matplotlib.colors import LogNorm

    values = np.full((4, 4), 1.3)
    values[np.diag_indices(4)] = 1.0
    values[0, 1], values[2, 3] = 1.6, 20.8
    table = pd.DataFrame(values, index=[f"{l}-s0" for l in "abcd"], columns=list("abcd"))
    ax = cross_perplexity_figures(100 * table, table)["cross_ppl_relative"].axes[0]
    norm = ax.collections[0].norm
    assert isinstance(norm, LogNorm) and math.isclose(norm.vmin * norm.vmax, 1.0)  # ratio 1 in the middle
    assert norm(1.6) - norm(1.0) >= 0.45  # a linear scale up to 20.8 puts them 0.6 / 19.8 = 0.03 apart
    assert norm(20.8) > 1  # past the cap: the top colour, said in the caption
    assert "log scale, capped to" in ax.get_title() and "20.80" in [t.get_text() for t in ax.texts]


# -- verdicts as metrics ------------------------------------------------------------------------------------

# written out here, not taken from xlsub.report.verdicts: the metric key of each question
VERDICT_KEYS = {
    "different_heads": "Do the languages need different heads?",
    "specificity": "Does a language's subnetwork serve the other languages worse than its own?",
    "stability": "Are the masks stable across seeds?",
    "beyond_length": "Do parallel sentences share representation beyond what length explains?",
    "pruning_specific": "Does pruning to a language's subnetwork change the representation of other languages more than its own?",
}


@pytest.fixture(scope="module")
def complete():
    """Every section present, so all five verdicts are made: two seeds, per-chunk losses, and token counts
    aligned with the N encoded sentences (the length control)."""
    from tests.test_uncertainty import chunk_losses

    given = inputs(several_seeds=True)
    g = torch.Generator().manual_seed(7)
    given.tokens = {l: [torch.randint(3, 50, (int(k),), generator=g).tolist() for k in torch.randint(2, 6, (N,), generator=g)]
                    for l in LANGS}
    given.chunk_losses = chunk_losses(True, seeds=(0, 1))
    return analyzed(given, bootstrap=50, permutations=50, counts=Counts(20, 20, 20, 20, 10))


@pytest.mark.parametrize("key", list(VERDICT_KEYS))
def test_every_verdict_is_logged_as_metrics(complete, key):
    found = [v for v in complete.verdicts if v.question == VERDICT_KEYS[key]]
    assert len(found) == 1
    verdict = found[0]
    fields = {"value": verdict.value, "lo": verdict.lo, "hi": verdict.hi, "control": verdict.control_value, "p": verdict.p,
              "p_floor": verdict.p_floor}
    assert all(math.isfinite(fields[name]) for name in ("value", "control", "p", "p_floor"))
    for name, x in fields.items():  # an interval end is infinite where 3 languages cannot give a 95% sign-flip interval
        assert complete.metrics.get(f"verdict.{key}.{name}") == (x if math.isfinite(x) else None)


def test_verdict_values_against_their_tables(complete):
    """The verdicts' numbers, recomputed from the tables and masks they summarise."""
    by_key = {key: next(v for v in complete.verdicts if v.question == q) for key, q in VERDICT_KEYS.items()}
    assert [v.question for v in complete.verdicts] == list(VERDICT_KEYS.values())
    within = np.mean([set_jaccard(MASKS[S(l, 0)], MASKS[S(l, 1)]) for l in LANGS])
    assert by_key["stability"].value == pytest.approx(within)
    agreement = complete.tables["head_agreement"]
    assert by_key["different_heads"].value == pytest.approx(agreement["difference"].mean())
    assert agreement.loc["de", "within"] == pytest.approx(set_jaccard(MASKS[S("de", 0)], MASKS[S("de", 1)])
                                                          - expected_random_jaccard(MASKS[S("de", 0)], MASKS[S("de", 1)]))
    assert (by_key["different_heads"].lo, by_key["different_heads"].hi) == (-math.inf, math.inf)  # 3 languages: 2^-3 > 0.025
    # the claim about languages: the mean over languages of gap - random gap, at the unit of languages
    specificity = complete.tables["specificity_gap"]
    assert by_key["specificity"].value == pytest.approx((specificity["gap"] - specificity["random_gap"]).mean())
    assert by_key["specificity"].value == pytest.approx(complete.metrics["specificity_excess"])
    assert (by_key["specificity"].lo, by_key["specificity"].hi) == (-math.inf, math.inf)  # 3 languages: 2^-3 > 0.025
    assert by_key["specificity"].p == complete.metrics["specificity_excess_p"] >= by_key["specificity"].p_floor == 1 / 8
    length = complete.tables["cka_length"]
    difference = length.loc["full", "above_length_chance"] - length.loc["random", "above_length_chance"]
    assert by_key["beyond_length"].value == pytest.approx(difference.mean())  # the paired difference, per language
    assert by_key["beyond_length"].control_value == pytest.approx(length.loc["random", "above_length_chance"].mean())
    signs = np.array(list(itertools.product((1, -1), repeat=len(difference))))
    exact = float(np.mean(signs @ difference.to_numpy() / len(difference) >= difference.mean() - 1e-12))
    assert by_key["beyond_length"].p == pytest.approx(exact) and by_key["beyond_length"].inference.test == "sign_flip_exact"
    change = 1 - complete.tables["cka_full_vs_subnetwork_last_layer"].loc[LANGS, LANGS].to_numpy()
    off = ~np.eye(len(LANGS), dtype=bool)
    assert by_key["pruning_specific"].value == pytest.approx(change[off].mean() - np.diag(change).mean())


def test_every_table_id_and_metric_name_is_in_the_contract(complete):
    """What analyze writes is named in xlsub.artifacts: table ids in TABLE, metrics in METRIC (per language
    with a dot), besides the verdicts' `verdict.<key>.<field>`."""
    from dataclasses import astuple

    from xlsub.artifacts import METRIC, TABLE

    assert set(complete.tables) <= set(astuple(TABLE))
    assert {"cka_length", "cka_pvalue", "retrieval_pvalue", "power", "specificity_gap", "cross_ppl_random_relative_hi"} <= set(complete.tables)
    assert (complete.tables["retrieval_pvalue"]["null"] == "length_restricted").all()  # the tokens align with the sentences
    named = set(astuple(METRIC))
    for name in complete.metrics:
        stem = name.split(".")[0]
        assert name in named or stem in named or stem == "verdict", name
    assert complete.metrics["retrieval_top1.de"] == complete.tables["retrieval_top1"].loc[("full", "de")].iloc[-1]


def test_power_table_limits_and_the_verdicts_power_sentence(complete):
    """power.csv: one row per measure and tested level (Counts.power_draws = 10 draws each here), the detection limit
    metric the smallest tested SNR with power >= 0.8, and the beyond-length verdict names the draws and permutations."""
    power = complete.tables["power"].reset_index()
    assert list(power.columns) == ["measure", "snr", "n_draws", "power", "power_lo", "power_hi"]
    assert (power["n_draws"] == 10).all()
    for measure in ("cka", "rsa", "retrieval"):
        rows = power[power["measure"] == measure]
        reached = rows.loc[rows["power"] >= 0.8, "snr"]
        limit = complete.metrics[f"detection_limit.{measure}"]
        assert (limit == reached.min()) if len(reached) else math.isnan(limit)
    verdict = next(v for v in complete.verdicts if v.question == VERDICT_KEYS["beyond_length"])
    if math.isfinite(complete.metrics["detection_limit.cka"]):
        assert "has power >= 0.8 (from up to 10 planted draws per level, 99 permutations each) from a signal-to-noise ratio of" in verdict.answer


def test_spearman_brown_and_the_reliability_caveat():
    """Reliability of the whole from two halves, 2r / (1 + r); a language below 0.7 puts a caveat naming it and
    eval_examples on the verdicts that rest on the masks, and only on those."""
    from xlsub.stats.overlap import spearman_brown

    assert spearman_brown(0.5) == pytest.approx(2 / 3) and spearman_brown(1.0) == 1.0 and math.isnan(spearman_brown(math.nan))
    given = inputs(several_seeds=True)
    reliability = {sid: (0.4 if sid.language == "de" else 0.9) + 0.02 * sid.seed for sid in given.masks}
    result = analyzed(replace(given, importance_reliability=reliability), permutations=50, bootstrap=50)
    table = result.tables["importance_reliability"]
    assert table.loc["de", "reliability"] == pytest.approx(0.41) and table.loc["en", "reliability"] == pytest.approx(0.91)
    assert result.metrics["min_importance_reliability"] == pytest.approx(0.41)
    flagged = [v for v in result.verdicts if "caveat: head importance is unreliable for de " in v.answer]
    assert {v.key for v in flagged} == {"different_heads", "stability"} and all("eval_examples" in v.answer for v in flagged)
    fine = analyzed(replace(given, importance_reliability={sid: 0.9 for sid in given.masks}), permutations=50, bootstrap=50)
    assert not any("caveat" in v.answer for v in fine.verdicts)
