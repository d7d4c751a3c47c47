"""The analyze stage's similarity tables against direct calls and hand computations."""

from __future__ import annotations

import itertools

import pandas as pd
import pytest
import torch

from xlsub.report.similarity_tables import (
    LENGTH_ONLY,
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
from xlsub.similarity.rsa import mantel_test, rsa

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
    table = cka_pvalue_table(enc, LANGS, "en", "debiased", Counts(full=50, controls=40, subnetworks=30, length=500), seed=2)
    assert set(table.index.get_level_values("model")) == {"full", "de-s0", "random"}
    assert len(table.loc["full"]) == 2 * LAYERS and len(table.loc["de-s0"]) == 2  # every layer / the last
    direct = cka_permutation_test(enc["full"]["en"], enc["full"]["zh"], 50, 2, "debiased")
    row = table.loc[("full", "zh", 1)]
    assert (row["cka"], row["null_mean"], row["p_value"], row["n_perm"]) == pytest.approx(
        (float(direct.observed[1]), float(direct.null_mean[1]), float(direct.p_value[1]), 50))
    assert table.loc[("de-s0", "de", LAYERS - 1), "n_perm"] == 30
    assert (table["null"] == "unrestricted").all() and (table["p_value"] == table["p_unrestricted"]).all()  # no token counts
    # with token counts: permutations within groups of the reference sentence's token count, the unrestricted p beside it
    lengths = sentence_lengths(tokens())
    restricted = cka_pvalue_table(enc, LANGS, "en", "debiased", Counts(full=50, controls=40, subnetworks=30, length=500), 2, lengths)
    grouped = cka_permutation_test(enc["full"]["en"], enc["full"]["zh"], 50, 2, "debiased", groups=lengths["en"].long())
    row = restricted.loc[("full", "zh", 1)]
    assert (row["null_mean"], row["p_value"], row["null"]) == (
        pytest.approx(float(grouped.null_mean[1])), pytest.approx(float(grouped.p_value[1])), "length_restricted")
    last = cka_permutation_test(enc["full"]["en"][-1:], enc["full"]["zh"][-1:], 50, 2, "debiased")
    assert restricted.loc[("full", "zh", LAYERS - 1), "p_unrestricted"] == pytest.approx(float(last.p_value[0]))
    assert restricted.loc["full"]["p_unrestricted"].isna().sum() == 2 * (LAYERS - 1)  # beside the last layer only
    assert set(restricted.index.get_level_values("model")) == {"full", "de-s0", "random", LENGTH_ONLY}


def test_length_controls_residuals_and_the_content_free_encoder():
    enc, toks = encodings(), tokens()
    lengths = sentence_lengths(toks)
    assert lengths["en"][0] == len(toks["en"][0]) + 2
    table = length_control_table(enc, lengths, LANGS, "en", "debiased", n_perm=40, seed=0)
    x, y = enc["full"]["en"][-1], enc["full"]["de"][-1]
    row = table.loc[("full", "de")]
    assert row["residual_cka"] == pytest.approx(float(cka(residualize(x, lengths["en"]), residualize(y, lengths["de"]), "debiased")))
    assert row["length_null_mean"] == pytest.approx(float(cka_permutation_test(x, y, 40, 0, "debiased", groups=lengths["en"].long()).null_mean))
    control = table.loc[("random", "de")]
    xr, yr = enc["random"]["en"][-1], enc["random"]["de"][-1]
    assert control["length_null_mean"] == pytest.approx(float(cka_null_mean(xr, yr, "debiased", lengths["en"].long())))
    assert LENGTH_ONLY in table.index.get_level_values("model")
    sub = table.loc[("de-s0", "zh")]  # a subnetwork: the closed-form null mean, its own residual CKA, no test
    xs, ys = enc["de-s0"]["en"][-1], enc["de-s0"]["zh"][-1]
    assert (sub["cka"], sub["length_null_mean"], sub["residual_cka"]) == pytest.approx(
        (float(cka(xs, ys, "debiased")), float(cka_null_mean(xs, ys, "debiased", lengths["en"].long())),
         float(cka(residualize(xs, lengths["en"]), residualize(ys, lengths["zh"]), "debiased"))))
    assert pd.isna(sub["p_value"]) and sub["n_perm"] == 0
    assert list(dict.fromkeys(table.index.get_level_values("model"))) == ["full", "de-s0", "random", LENGTH_ONLY]


def test_retrieval_rsa_and_jackknife_tables_hold_the_direct_numbers():
    enc = encodings()
    retrieval = retrieval_table(enc, LANGS, "en")
    assert retrieval.loc[("full", "zh"), LAYERS - 1] == pytest.approx(retrieval_top1(enc["full"]["zh"][-1], enc["full"]["en"][-1]))
    table = rsa_table(enc, LANGS, "en", Counts(full=50, controls=40, subnetworks=20, length=30), seed=0)
    assert table.loc[("random", "de"), "rsa"] == pytest.approx(float(rsa(enc["random"]["en"][-1], enc["random"]["de"][-1])))
    assert table.loc[("full", "de"), "p_value"] < 0.1
    alone = mantel_test(enc["random"]["en"][-1], enc["random"]["de"][-1], 30, 0)  # every model is tested now
    assert table.loc[("random", "de"), "p_value"] == pytest.approx(float(alone.p_value))
    assert table.loc[("de-s0", "zh"), "n_perm"] == 20 and table.loc[("random", "zh"), "n_perm"] == 30
    bounds = cka_interval_tables(enc, LANGS, "en", "debiased", blocks=10)
    point = torch.stack([cka(enc["full"]["en"], enc["full"][l], "debiased") for l in ("de", "zh")])
    assert (torch.tensor(bounds["cka_vs_reference_lo"].to_numpy()) <= point).all()
    assert (point <= torch.tensor(bounds["cka_vs_reference_hi"].to_numpy())).all()


def test_subnetwork_specificity_gap_and_its_permutation_p():
    last = pd.DataFrame([[0.9, 0.5, 0.6], [0.4, 0.8, 0.5], [0.6, 0.5, 0.95]], index=LANGS, columns=LANGS)
    change = 1 - last.to_numpy()
    gap = change[~torch.eye(3, dtype=torch.bool).numpy()].mean() - change.diagonal().mean()
    result = subnetwork_specificity(last, permutations=3000, seed=0)
    assert result["value"] == pytest.approx(gap)
    # exact: the share of the 6 row orders whose gap reaches the observed one
    exact = sum(1 - last.to_numpy()[list(p)][~torch.eye(3, dtype=torch.bool).numpy()].mean()
                - (1 - last.to_numpy()[list(p)]).diagonal().mean() >= gap - 1e-12 for p in itertools.permutations(range(3))) / 6
    assert result["p"] == pytest.approx(exact, abs=0.03)
    assert result["lo"] < result["value"] < result["hi"]


def test_power_finds_a_strong_planted_signal_and_not_a_vanishing_one():
    from xlsub.report.similarity_tables import power_table

    base = torch.randn(80, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    lengths = {l: v.repeat(2)[:80] for l, v in sentence_lengths(tokens()).items() if l in ("en", "de")}
    table, limits = power_table(base, lengths, "en", "debiased", n_perm=100, seed=0, snrs=(1e-4, 10.0))
    assert table.loc[("cka", 10.0), "p_value"] < 0.05 and table.loc[("cka", 1e-4), "p_value"] > 0.05
    assert limits["cka"] == 10.0 and limits["retrieval"] == 10.0
    assert "cka (length-only)" in table.index.get_level_values("measure")


def test_isomorphism_table_holds_the_knn_spectrum_distance():
    from xlsub.report.similarity_tables import isomorphism_table
    from xlsub.similarity.isomorphism import knn_eigen_similarity

    enc = encodings()
    table = isomorphism_table(enc, LANGS, "en", k=5)
    assert table.loc[("full", "zh"), "eigen_similarity"] == pytest.approx(
        knn_eigen_similarity(enc["full"]["en"][-1], enc["full"]["zh"][-1], k=5))
    same = isomorphism_table({"full": {"en": enc["full"]["en"], "de": 3 * enc["full"]["en"]}}, ["en", "de"], "en", k=5)
    assert same.loc[("full", "de"), "eigen_similarity"] == pytest.approx(0.0, abs=1e-9)  # a rescaled copy: same graph
