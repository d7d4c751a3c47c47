"""The analyze stage's similarity tables against direct calls and hand computations."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
import torch

from xlsub.report.figures.analysis import display_label
from xlsub.report.similarity_tables import (
    LENGTH_ONLY,
    STOP_AFTER,
    TAIL_RISK,
    Counts,
    cka_interval_tables,
    cka_pvalue_table,
    length_control_table,
    retrieval_table,
    rsa_table,
    sentence_lengths,
    subnetwork_specificity,
)
from xlsub.similarity.cka import cka
from xlsub.similarity.permutation import cka_null_mean, cka_permutation_test, residualize
from xlsub.similarity.retrieval import retrieval_top1
from xlsub.similarity.rsa import mantel_test, rsa, rsa_jackknife_interval

LANGS = ["en", "de", "zh"]
N, D, LAYERS = 60, 8, 3


def encodings():
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(LAYERS, N, D, generator=g, dtype=torch.float64)
    full = {l: shared + 0.8 * torch.randn(LAYERS, N, D, generator=g, dtype=torch.float64) for l in LANGS}
    sub = {l: 2 * v for l, v in full.items()}
    random = {l: torch.randn(LAYERS, N, D, generator=g, dtype=torch.float64) for l in LANGS}
    return {"full": full, "de-s0": sub, "random": random}


def tokens():
    g = torch.Generator().manual_seed(1)
    return {l: [[1] * int(k) for k in torch.randint(3, 12, (N,), generator=g)] for l in LANGS}


def test_cka_pvalue_rows_are_the_permutation_tests_of_each_cell():
    enc = encodings()
    table = cka_pvalue_table(enc, LANGS, "en", "debiased", Counts(full=50, controls=40, subnetworks=30, length=500, power_draws=10), seed=2)
    assert set(table.index.get_level_values("model")) == {"full", "de-s0", "random"}
    assert len(table.loc["full"]) == 2 * LAYERS and len(table.loc["de-s0"]) == 2  # every layer / the last
    staged = {"tail_risk": TAIL_RISK, "stop_after": STOP_AFTER}  # as the table tests every cell
    direct = cka_permutation_test(enc["full"]["en"], enc["full"]["zh"], 50, 2, "debiased", **staged)
    row = table.loc[("full", "zh", 1)]
    assert (row["cka"], row["null_mean"], row["p_value"], row["n_perm"]) == pytest.approx(
        (float(direct.observed[1]), float(direct.null_mean[1]), float(direct.p_value[1]), 50))
    plain = cka_permutation_test(enc["full"]["en"], enc["full"]["zh"], 50, 2, "debiased")  # every permutation: the same p
    assert table.loc["full"].xs("zh")["p_value"].tolist() == pytest.approx(plain.p_value.tolist())
    assert table.loc[("de-s0", "de", LAYERS - 1), "n_perm"] == 30
    assert (table["null"] == "unrestricted").all() and (table["p_value"] == table["p_unrestricted"]).all()  # no token counts
    # with token counts: permutations within groups of the reference sentence's token count, the unrestricted p beside it
    lengths = sentence_lengths(tokens())
    restricted = cka_pvalue_table(enc, LANGS, "en", "debiased", Counts(full=50, controls=40, subnetworks=30, length=500, power_draws=10), 2, lengths)
    grouped = cka_permutation_test(enc["full"]["en"], enc["full"]["zh"], 50, 2, "debiased", groups=lengths["en"].long(), **staged)
    row = restricted.loc[("full", "zh", 1)]
    assert (row["null_mean"], row["p_value"], row["null"]) == (
        pytest.approx(float(grouped.null_mean[1])), pytest.approx(float(grouped.p_value[1])), "length_restricted")
    last = cka_permutation_test(enc["full"]["en"][-1:], enc["full"]["zh"][-1:], 50, 2, "debiased", **staged)
    assert restricted.loc[("full", "zh", LAYERS - 1), "p_unrestricted"] == pytest.approx(float(last.p_value[0]))
    assert restricted.loc["full"]["p_unrestricted"].isna().sum() == 2 * (LAYERS - 1)  # beside the last layer only
    assert set(restricted.index.get_level_values("model")) == {"full", "de-s0", "random", LENGTH_ONLY}


def test_neuron_subnetworks_are_tested_as_subnetworks_after_the_heads():
    enc = encodings()
    enc = {"random": enc["random"], "neurons.de-s0": {l: v + 1 for l, v in enc["de-s0"].items()}, **enc}
    counts = Counts(full=50, controls=40, subnetworks=30, length=500, power_draws=10)
    table = cka_pvalue_table(enc, LANGS, "en", "debiased", counts, seed=2)
    assert list(dict.fromkeys(table.index.get_level_values("model"))) == ["full", "de-s0", "neurons.de-s0", "random"]
    assert len(table.loc["neurons.de-s0"]) == 2 and (table.loc["neurons.de-s0", "n_perm"] == 30).all()  # the last layer, as a subnetwork
    direct = cka_permutation_test(enc["neurons.de-s0"]["en"][-1:], enc["neurons.de-s0"]["zh"][-1:], 30, 2, "debiased")
    assert table.loc[("neurons.de-s0", "zh", LAYERS - 1), "p_value"] == pytest.approx(float(direct.p_value[0]))
    assert display_label("neurons.de-s1") == "German neurons (seed 1)" and display_label("de-s1") == "German (seed 1)"


def test_length_controls_residuals_and_the_content_free_encoder():
    enc, toks = encodings(), tokens()
    lengths = sentence_lengths(toks)
    assert lengths["en"][0] == len(toks["en"][0]) + 2
    table = length_control_table(enc, lengths, LANGS, "en", "debiased", Counts(full=50, controls=30, subnetworks=20, length=40, power_draws=10), seed=0)
    x, y = enc["full"]["en"][-1], enc["full"]["de"][-1]
    row = table.loc[("full", "de")]
    assert row["residual_cka"] == pytest.approx(float(cka(residualize(x, lengths["en"]), residualize(y, lengths["de"]), "debiased")))
    matched = cka_permutation_test(x, y, 40, 0, "debiased", groups=lengths["en"].long())  # the full model: counts.length
    assert (row["length_null_mean"], row["p_value"], row["n_perm"]) == pytest.approx(
        (float(cka_null_mean(x, y, "debiased", lengths["en"].long())), float(matched.p_value), 40))  # the exact null mean
    control = table.loc[("random", "de")]
    xr, yr = enc["random"]["en"][-1], enc["random"]["de"][-1]
    assert control["length_null_mean"] == pytest.approx(float(cka_null_mean(xr, yr, "debiased", lengths["en"].long())))
    assert LENGTH_ONLY in table.index.get_level_values("model")
    sub = table.loc[("de-s0", "zh")]  # a subnetwork: the closed-form null mean, its own residual CKA, its own test
    xs, ys = enc["de-s0"]["en"][-1], enc["de-s0"]["zh"][-1]
    assert (sub["cka"], sub["length_null_mean"], sub["residual_cka"]) == pytest.approx(
        (float(cka(xs, ys, "debiased")), float(cka_null_mean(xs, ys, "debiased", lengths["en"].long())),
         float(cka(residualize(xs, lengths["en"]), residualize(ys, lengths["zh"]), "debiased"))))
    tested = cka_permutation_test(xs, ys, 20, 0, "debiased", groups=lengths["en"].long())  # counts.subnetworks
    assert (sub["p_value"], sub["n_perm"]) == (pytest.approx(float(tested.p_value)), 20)
    assert table.loc[(LENGTH_ONLY, "de"), "n_perm"] == 30 == table.loc[("random", "zh"), "n_perm"]
    assert list(dict.fromkeys(table.index.get_level_values("model"))) == ["full", "de-s0", "random", LENGTH_ONLY]


def test_retrieval_rsa_and_jackknife_tables_hold_the_direct_numbers():
    enc = encodings()
    retrieval = retrieval_table(enc, LANGS, "en")
    assert retrieval.loc[("full", "zh"), LAYERS - 1] == pytest.approx(retrieval_top1(enc["full"]["zh"][-1], enc["full"]["en"][-1]))
    table = rsa_table(enc, LANGS, "en", Counts(full=50, controls=40, subnetworks=20, length=30, power_draws=10), seed=0)
    assert table.loc[("random", "de"), "rsa"] == pytest.approx(float(rsa(enc["random"]["en"][-1], enc["random"]["de"][-1])))
    assert table.loc[("full", "de"), "p_value"] < 0.1
    alone = mantel_test(enc["random"]["en"][-1], enc["random"]["de"][-1], 30, 0)  # every model is tested now
    assert table.loc[("random", "de"), "p_value"] == pytest.approx(float(alone.p_value))
    assert table.loc[("de-s0", "zh"), "n_perm"] == 20 and table.loc[("random", "zh"), "n_perm"] == 30
    bounds = cka_interval_tables(enc, LANGS, "en", "debiased", blocks=10)
    point = torch.stack([cka(enc["full"]["en"], enc["full"][l], "debiased") for l in ("de", "zh")])
    assert (torch.tensor(bounds["cka_vs_reference_lo"].to_numpy()) <= point).all()
    assert (point <= torch.tensor(bounds["cka_vs_reference_hi"].to_numpy())).all()


def test_subnetwork_specificity_per_language_and_its_exact_relabelling_p():
    last = pd.DataFrame([[0.9, 0.5, 0.6], [0.4, 0.8, 0.5], [0.6, 0.5, 0.95]], index=LANGS, columns=LANGS)
    change = 1 - last.to_numpy()
    off = ~torch.eye(3, dtype=torch.bool).numpy()
    gap = change[off].mean() - change.diagonal().mean()
    table, level, p = subnetwork_specificity(last, permutations=3000, seed=0)
    assert level.value == pytest.approx(gap)  # the mean of the per-language differences is the old gap
    for i, lang in enumerate(LANGS):
        assert table.loc[lang, "d"] == pytest.approx(np.delete(change[i], i).mean() - change[i, i])
    # exact: the share of the 6 row orders whose gap reaches the observed one
    exact = sum((1 - last.to_numpy()[list(o)])[off].mean() - (1 - last.to_numpy()[list(o)]).diagonal().mean() >= gap - 1e-12
                for o in itertools.permutations(range(3))) / 6
    assert p == pytest.approx(exact)
    assert level.test == "sign_flip_exact" and level.n_units == 3 and level.p_floor == 1 / 8
    assert level.p == pytest.approx(sum(np.mean(s * table["d"].to_numpy()) >= level.value - 1e-12
                                        for s in itertools.product([-1, 1], repeat=3)) / 8)


def test_power_finds_a_strong_planted_signal_and_not_a_vanishing_one():
    from xlsub.report.similarity_tables import power_table

    base = torch.randn(80, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    lengths = {l: v.repeat(2)[:80] for l, v in sentence_lengths(tokens()).items() if l in ("en", "de")}
    table, limits = power_table(base, lengths, "en", "debiased", draws=20, seed=0, bracket=(1e-4, 10.0), bisections=0)
    for measure in ("cka", "rsa", "retrieval"):  # the bracket's top, then its bottom: no midpoints
        assert table.loc[(measure, 10.0), "power"] == 1.0 and table.loc[(measure, 10.0), "n_draws"] == 20
        assert table.loc[(measure, 1e-4), "power"] <= 0.2  # about alpha: 4 / 100 of draws at 99 permutations
        assert limits[measure] == 10.0
    # Wilson 95% at 20 of 20 detected: [1 - (1.96^2 / (20 + 1.96^2)), 1]
    assert table.loc[("cka", 10.0), "power_lo"] == pytest.approx(20 / (20 + 1.959964**2), abs=1e-6)
    control = table.xs("cka (length-only)", level="measure")  # the content-free encoder at the length-restricted null
    assert len(control) == 1 and control.index.isna().all() and control["power"].iloc[0] <= 0.2


def test_isomorphism_table_holds_the_knn_spectrum_distance():
    from xlsub.report.similarity_tables import isomorphism_table
    from xlsub.similarity.isomorphism import knn_eigen_similarity

    enc = encodings()
    table = isomorphism_table(enc, LANGS, "en", k=5)
    assert table.loc[("full", "zh"), "eigen_similarity"] == pytest.approx(
        knn_eigen_similarity(enc["full"]["en"][-1], enc["full"]["zh"][-1], k=5))
    same = isomorphism_table({"full": {"en": enc["full"]["en"], "de": 3 * enc["full"]["en"]}}, ["en", "de"], "en", k=5)
    assert same.loc[("full", "de"), "eigen_similarity"] == pytest.approx(0.0, abs=1e-9)  # a rescaled copy: same graph


def test_rsa_table_gives_every_model_a_jackknife_interval_and_the_p_floor():
    enc = encodings()
    table = rsa_table(enc, LANGS, "en", Counts(full=50, controls=40, subnetworks=20, length=30, power_draws=10), seed=0)
    assert list(table.reset_index().columns) == ["model", "language", "rsa", "lo", "hi", "null_mean", "p_value", "p_floor",
                                                 "n_perm", "null"]
    assert (table["lo"] <= table["rsa"]).all() and (table["rsa"] <= table["hi"]).all()
    for model in ("full", "de-s0", "random"):
        x, y = enc[model]["en"][-1], enc[model]["zh"][-1]
        estimate, lo, hi = rsa_jackknife_interval(x, y, blocks=20)  # 20 contiguous blocks of 3 sentences
        assert (table.loc[(model, "zh"), "lo"], table.loc[(model, "zh"), "hi"]) == pytest.approx((float(lo), float(hi)), abs=1e-12)
    assert table.loc[("full", "de"), "p_floor"] == 1 / 31 and table.loc[("de-s0", "de"), "p_floor"] == 1 / 21
