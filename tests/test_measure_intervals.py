"""Intervals of the representation measures (retrieval, kNN isomorphism, cka_pairs, token overlap, CKA above
length chance) against independent computations: loops, numpy and scipy."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from xlsub.report.similarity_tables import (
    LENGTH_ONLY,
    Counts,
    cka_pvalue_table,
    isomorphism_table,
    length_control_table,
    retrieval_pvalue_table,
    retrieval_table,
    sentence_lengths,
)
from xlsub.report.tables import cka_pairs_interval_tables, cka_pairs_table
from xlsub.similarity.cka import cka, cka_matrix
from xlsub.similarity.isomorphism import energy_count, knn_laplacian_spectrum
from xlsub.similarity.jackknife import cka_jackknife_interval
from xlsub.similarity.permutation import cka_null_mean, cka_permutation_test
from xlsub.stats.inference import bootstrap_mean_interval, wilson_interval
from xlsub.stats.overlap import token_overlap, token_overlap_intervals

LANGS = ["en", "de", "zh"]
N, D, LAYERS = 60, 8, 3


def encodings():
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(LAYERS, N, D, generator=g, dtype=torch.float64)
    full = {l: shared + 0.8 * torch.randn(LAYERS, N, D, generator=g, dtype=torch.float64) for l in LANGS}
    random = {l: torch.randn(LAYERS, N, D, generator=g, dtype=torch.float64) for l in LANGS}
    return {"full": full, "de-s0": {l: 2 * v for l, v in full.items()}, "random": random}


def tokens():
    g = torch.Generator().manual_seed(1)
    return {l: [[1] * int(k) for k in torch.randint(3, 12, (N,), generator=g)] for l in LANGS}


def plain_hits(queries: np.ndarray, targets: np.ndarray) -> int:
    """Top-1 hits by a loop: centre each language, cosine, the unique argmax must be the translation."""
    q, t = queries - queries.mean(0), targets - targets.mean(0)
    hits = 0
    for i in range(len(q)):
        sims = [float(q[i] @ t[j] / (np.linalg.norm(q[i]) * np.linalg.norm(t[j]))) for j in range(len(t))]
        hits += sims[i] == max(sims) and sims.count(max(sims)) == 1
    return hits


def score_interval_by_roots(hits: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson's interval as the set {p : (p_hat - p)^2 <= z^2 p (1 - p) / n}: the roots of a quadratic in p."""
    z = stats.norm.ppf((1 + level) / 2)
    p_hat = hits / n
    roots = np.sort(np.roots([1 + z * z / n, -(2 * p_hat + z * z / n), p_hat * p_hat]).real)
    return float(max(roots[0], 0.0)), float(min(roots[1], 1.0))


def test_retrieval_pvalues_reuse_the_retrieval_tables_nearest_sentences(monkeypatch):
    """`retrieval_table(nearest=...)` collects each pair's last-layer nearest sentences; the p-value table given
    them computes no similarity for those pairs and gives the same numbers, the length-only pairs included."""
    from xlsub.report import similarity_tables

    enc, lengths = encodings(), sentence_lengths(tokens())
    counts = Counts(full=40, controls=30, subnetworks=20, length=20, power_draws=10)
    nearest = {}
    top1 = retrieval_table(enc, LANGS, "en", nearest)
    assert set(nearest) == {(model, lang) for model in enc for lang in ("de", "zh")}
    for (model, lang), found in nearest.items():  # each sentence's nearest reference sentence by a loop, where untied
        q, t = enc[model][lang][-1].numpy(), enc[model]["en"][-1].numpy()
        q, t = q - q.mean(0), t - t.mean(0)
        cosines = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (t / np.linalg.norm(t, axis=1, keepdims=True)).T
        assert found.tolist() == cosines.argmax(1).tolist()
        assert top1.loc[(model, lang), LAYERS - 1] == pytest.approx(float((found == torch.arange(N)).double().mean()))
    alone = retrieval_pvalue_table(enc, LANGS, "en", counts, 0, lengths)
    calls = []
    computed = similarity_tables.retrieval_permutation_test

    def counted(x, y, *args, nearest=None, **kwargs):
        calls.append(nearest is None)
        return computed(x, y, *args, nearest=nearest, **kwargs)

    monkeypatch.setattr(similarity_tables, "retrieval_permutation_test", counted)
    reused = retrieval_pvalue_table(enc, LANGS, "en", counts, 0, lengths, nearest)
    assert calls.count(False) == len(nearest) and calls.count(True) == 2  # only the length-only encoder's pairs
    pd.testing.assert_frame_equal(reused, alone)
    wrong = {key: found.roll(1) for key, found in nearest.items()}  # the given sentences are what is tested
    assert not retrieval_pvalue_table(enc, LANGS, "en", counts, 0, lengths, wrong)["top1"].equals(alone["top1"])
    with pytest.raises(ValueError, match="nearest has shape"):
        computed(enc["full"]["de"][-1], enc["full"]["en"][-1], 10, nearest=nearest["full", "de"][:-1])


def test_retrieval_interval_is_the_score_interval_of_the_hits_and_tracks_the_query_bootstrap():
    enc = encodings()
    table = retrieval_pvalue_table(enc, LANGS, "en", Counts(full=20, controls=20, subnetworks=10, length=10, power_draws=10), seed=0)
    for model in ("full", "random"):
        hits = plain_hits(enc[model]["de"][-1].numpy(), enc[model]["en"][-1].numpy())
        row = table.loc[(model, "de", LAYERS - 1)]
        assert row["top1"] == pytest.approx(hits / N)
        assert (row["lo"], row["hi"]) == pytest.approx(score_interval_by_roots(hits, N), abs=1e-12)
    assert wilson_interval(0, 100) == pytest.approx((0.0, 1.96**2 / (100 + 1.96**2)), abs=1e-4)  # not a point at 0 hits
    # resampling the queries with the pool fixed: a bootstrap of 0/1 values, close to the score interval at moderate p
    values = np.r_[np.ones(300), np.zeros(700)]
    boot = bootstrap_mean_interval(values, 4000, seed=1)
    assert boot == pytest.approx(wilson_interval(300, 1000), abs=0.006)


def test_bootstrap_mean_interval_against_a_loop_with_the_same_draws():
    values = np.random.default_rng(5).gamma(2.0, size=40)
    generator = torch.Generator().manual_seed(3)
    draws = torch.randint(0, 40, (500, 40), generator=generator).numpy()
    means = [sum(values[i] for i in index) / 40 for index in draws]
    assert bootstrap_mean_interval(values, 500, seed=3) == pytest.approx(tuple(np.percentile(means, [2.5, 97.5])), rel=1e-12)


def test_token_overlap_interval_by_brute_force():
    toks = {"en": [["a", "b", "c"], ["a", "a"], ["d"], ["x", "y"], ["p", "q", "r", "s"]] * 6,
            "de": [["a", "z"], ["a", "a", "a"], [], ["x", "y"], ["p", "w"]] * 6}
    shares = []
    for s, r in zip(toks["de"], toks["en"]):
        if s:  # clipped counts by hand: each token of s matched at most as often as it occurs in r
            left = list(r)
            common = 0
            for t in s:
                if t in left:
                    left.remove(t)
                    common += 1
            shares.append(common / len(s))
    assert token_overlap(toks)["de"] == pytest.approx(np.mean(shares))
    draws = torch.randint(0, len(shares), (300, len(shares)), generator=torch.Generator().manual_seed(7)).numpy()
    means = [np.mean([shares[i] for i in index]) for index in draws]
    assert token_overlap_intervals(toks, "en", 300, seed=7)["de"] == pytest.approx(tuple(np.percentile(means, [2.5, 97.5])))


def test_cka_pairs_intervals_are_the_jackknife_of_each_pair():
    full = encodings()["full"]
    layers = [0, LAYERS - 1]
    matrix = cka_matrix(full, "debiased")
    pairs = cka_pairs_table(matrix, LANGS, layers)
    bounds = cka_pairs_interval_tables({"full": full}, LANGS, layers, "debiased", blocks=10)
    assert bounds["cka_pairs_lo"].index.equals(pairs.index) and list(bounds["cka_pairs_hi"].columns) == LANGS
    for a in LANGS:
        for b in LANGS:
            interval = cka_jackknife_interval(full[a][layers], full[b][layers], "debiased", 10)
            for i, layer in enumerate(layers):
                assert bounds["cka_pairs_lo"].loc[(layer, a), b] == pytest.approx(float(interval.lo[i]), abs=1e-12)
                assert bounds["cka_pairs_hi"].loc[(layer, a), b] == pytest.approx(float(interval.hi[i]), abs=1e-12)
                assert bounds["cka_pairs_lo"].loc[(layer, a), b] <= pairs.loc[(layer, a), b] + 1e-9
                assert pairs.loc[(layer, a), b] <= bounds["cka_pairs_hi"].loc[(layer, a), b] + 1e-9


def test_above_length_chance_interval_by_a_delete_a_block_loop():
    enc, lengths = encodings(), sentence_lengths(tokens())
    counts = Counts(full=30, controls=25, subnetworks=15, length=20, power_draws=10)
    table = length_control_table(enc, lengths, LANGS, "en", "debiased", counts, seed=0, blocks=10)
    groups = lengths["en"].long()
    x, y = enc["random"]["en"][-1], enc["random"]["zh"][-1]
    row = table.loc[("random", "zh")]
    above = float(cka(x, y, "debiased") - cka_null_mean(x, y, "debiased", groups))
    theta = []
    for b in range(10):  # contiguous blocks of 6 sentences
        keep = [i for i in range(N) if not 6 * b <= i < 6 * (b + 1)]
        theta.append(float(cka(x[keep], y[keep], "debiased") - cka_null_mean(x[keep], y[keep], "debiased", groups[keep])))
    theta = np.array(theta)
    half = stats.t.ppf(0.975, 9) * math.sqrt(9 / 10 * np.square(theta - theta.mean()).sum())
    assert row["above_length_chance"] == pytest.approx(above, abs=1e-12)
    assert (row["lo"], row["hi"]) == pytest.approx((above - half, above + half), abs=1e-10)
    # every model has its p at the length-restricted null, with its own permutation count
    tested = cka_permutation_test(x, y, 25, 0, "debiased", groups=groups)
    assert (row["p_value"], row["n_perm"]) == (pytest.approx(float(tested.p_value)), 25)
    assert table["p_value"].notna().all() and table.loc[LENGTH_ONLY, "n_perm"].eq(25).all()
    assert (table["lo"] <= table["above_length_chance"]).all() and (table["above_length_chance"] <= table["hi"]).all()


def test_energy_rule_count_by_hand():
    """C_6's Laplacian spectrum 4, 3, 3, 1, 1, 0 sums to 12: 90% (10.8) needs 4 + 3 + 3 + 1 = 11, 50% (6) 4 + 3."""
    spectrum = torch.tensor([4.0, 3, 3, 1, 1, 0], dtype=torch.float64)
    assert (energy_count(spectrum, 0.9), energy_count(spectrum, 0.5), energy_count(spectrum, 0.3)) == (4, 2, 1)


def laplacian_by_loops(x: np.ndarray, k: int) -> np.ndarray:
    """The symmetric kNN graph's Laplacian: centre, cosine, i ~ j when either is among the other's k nearest."""
    xc = x - x.mean(0)
    xn = xc / np.linalg.norm(xc, axis=1, keepdims=True)
    n = len(x)
    adjacency = np.zeros((n, n))
    for i in range(n):
        sims = [(-float(xn[i] @ xn[j]), j) for j in range(n) if j != i]
        for _, j in sorted(sims)[:k]:
            adjacency[i, j] = adjacency[j, i] = 1.0
    return np.diag(adjacency.sum(1)) - adjacency


def test_lanczos_top_eigenvalues_equal_the_dense_spectrum():
    x = torch.randn(300, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    dense = np.sort(np.linalg.eigvalsh(laplacian_by_loops(x.numpy(), 5)))[::-1]
    np.testing.assert_allclose(knn_laplacian_spectrum(x, 5, top=10).numpy(), dense[:10], rtol=1e-8)
    np.testing.assert_allclose(knn_laplacian_spectrum(x, 5).numpy(), dense, atol=1e-9)


def test_knn_spectra_from_one_gram_equal_the_spectra_by_loops():
    """The whole sample's spectrum from the Gram matrix the subsets read is the unit rows' graph's, and each subset's
    is its own graph's, rebuilt on its rows (the compiled loops on the CPU)."""
    from xlsub.similarity.isomorphism import knn_spectra, subsamples

    x = torch.randn(300, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    subsets = subsamples(300, 4, seed=2)
    whole, parts = knn_spectra(x, subsets, 5, 4, top=10)
    np.testing.assert_allclose(whole.numpy(), np.sort(np.linalg.eigvalsh(laplacian_by_loops(x.numpy(), 5)))[::-1][:10], rtol=1e-8)
    for rows, part in zip(subsets, parts):
        np.testing.assert_allclose(part.numpy(), np.sort(np.linalg.eigvalsh(laplacian_by_loops(x[rows].numpy(), 4)))[::-1][:10], rtol=1e-8)
    assert knn_spectra(x, subsets, None, 4)[0] is None


@pytest.mark.parametrize("centre", [True, False])
def test_compiled_knn_graphs_from_the_gram_equal_the_torch_path(centre):
    """The compiled neighbours of a subset read from the whole Gram matrix (rows split between 1, 2 or 3 threads, the row
    means summed or given) give the torch path's graph (the block gathered, scaled to cosines, topk); on the torch path
    knn_spectra's spectra are the compiled path's. Ties go to the lower index."""
    from xlsub.similarity import isomorphism
    from xlsub.similarity.rsa import symmetric_products

    g = torch.Generator().manual_seed(6)
    x = torch.randn(90, 7, generator=g, dtype=torch.float64) + 0.5
    gram = symmetric_products(x - x.mean(0) if centre else x)
    threads = torch.get_num_threads()
    for index in (None, isomorphism.subsamples(90, 2, seed=1)[0], isomorphism.subsamples(90, 2, seed=1)[1]):
        block = gram if index is None else gram[index[:, None], index]
        want = isomorphism._laplacian(isomorphism._gram_cosines_(block.clone(), centre), 6)
        means = block.mean(1)
        for parts, given in itertools.product((1, 2, 3), (None, means)):
            torch.set_num_threads(parts)
            try:
                got = isomorphism._gram_laplacian(gram, index, 6, centre, given)
            finally:
                torch.set_num_threads(threads)
            assert (got != want).nnz == 0 and (got.toarray() == want.toarray()).all()
    subsets = isomorphism.subsamples(90, 3, seed=2)
    compiled = isomorphism.knn_spectra(x, subsets, 5, 4, top=6, centre=centre)
    forced = isomorphism._compiled_gram
    isomorphism._compiled_gram = lambda gram: False
    try:
        by_torch = isomorphism.knn_spectra(x, subsets, 5, 4, top=6, centre=centre)
    finally:
        isomorphism._compiled_gram = forced
    assert torch.equal(compiled[0], by_torch[0]) and torch.equal(compiled[1], by_torch[1])
    same = torch.ones(5, 5, dtype=torch.float64)  # every cosine 1: each row's neighbours are the lowest other rows
    neighbours = isomorphism._gram_laplacian(same, None, 2, centre=False).toarray()
    assert (neighbours[4] != 0).tolist() == [True, True, False, False, True]


def test_isomorphism_subsample_intervals_by_recomputation():
    enc = encodings()
    table = isomorphism_table(enc, LANGS, "en", k=5, seed=3, n_subsamples=12, top=4)
    again = isomorphism_table(enc, LANGS, "en", k=5, seed=3, n_subsamples=12, top=4)
    assert table.equals(again)  # seeded: reproducible
    assert set(table.index.get_level_values("model")) == {"full", "random"}  # no subnetworks, no length-only without lengths
    generator = torch.Generator().manual_seed(3)
    subsets = [torch.randperm(N, generator=generator)[:N // 2].sort().values.numpy() for _ in range(12)]

    def top(x: torch.Tensor) -> np.ndarray:
        return np.sort(np.linalg.eigvalsh(laplacian_by_loops(x.numpy(), 5)))[::-1][:4]

    def distance(model: str, rows=None) -> float:
        a, b = enc[model]["en"][-1], enc[model]["zh"][-1]
        if rows is not None:
            a, b = a[rows], b[rows]
        return float(np.square(top(a) - top(b)).sum())

    full = [distance("full", s) for s in subsets]
    random = [distance("random", s) for s in subsets]
    row = table.loc[("random", "zh")]
    assert row["eigen_similarity"] == pytest.approx(distance("random"), rel=1e-9)
    assert (row["subsample_lo"], row["subsample_hi"]) == pytest.approx(tuple(np.percentile(random, [2.5, 97.5])), rel=1e-9)
    paired = np.subtract(full, random)
    assert row["full_minus_control"] == pytest.approx(distance("full") - distance("random"), rel=1e-9)
    assert (row["full_minus_control_lo"], row["full_minus_control_hi"]) == pytest.approx(tuple(np.percentile(paired, [2.5, 97.5])), rel=1e-9)
    assert (row["m"], row["n"], row["n_subsamples"], row["top"]) == (N // 2, N, 12, 4)
    assert math.isnan(table.loc[("full", "zh"), "full_minus_control"])
    with_lengths = isomorphism_table(enc, LANGS, "en", k=5, seed=3, n_subsamples=4, lengths=sentence_lengths(tokens()))
    assert LENGTH_ONLY in with_lengths.index.get_level_values("model")


def test_length_table_takes_the_cka_pvalue_tables_identical_tests():
    """Given the cka_pvalue table (same encodings, seed, lengths), the subnetworks' and controls' p are its
    last-layer rows, the same permutations as running cka_permutation_test again; the full model keeps its own."""
    enc, lengths = encodings(), sentence_lengths(tokens())
    counts = Counts(full=30, controls=25, subnetworks=15, length=20, power_draws=10)
    tested = cka_pvalue_table(enc, LANGS, "en", "debiased", counts, 0, lengths)
    alone = length_control_table(enc, lengths, LANGS, "en", "debiased", counts, 0)
    reused = length_control_table(enc, lengths, LANGS, "en", "debiased", counts, 0, tested=tested)
    assert reused["p_value"].to_numpy() == pytest.approx(alone["p_value"].to_numpy())
    assert reused.loc[(LENGTH_ONLY, "zh"), "p_value"] == pytest.approx(tested.loc[(LENGTH_ONLY, "zh", LAYERS - 1), "p_value"])
    assert reused.loc[("full", "de"), "n_perm"] == 20 != tested.loc[("full", "de", LAYERS - 1), "n_perm"]


def test_gram_cosines_equal_the_cosines_of_the_centred_vectors_and_leave_the_gram_alone():
    """A subsample's kNN graph comes from its block of the Gram matrix: centred cosines equal those of the vectors
    centred on their own mean and scaled (computed here directly), also far from the origin (a shared offset 50 times
    the spread, as anisotropic encodings have), with a zero vector at similarity 0; uncentred ones are plain cosines."""
    from xlsub.similarity.isomorphism import gram_cosines

    g = torch.Generator().manual_seed(8)
    x = torch.randn(40, 6, generator=g, dtype=torch.float64) + 50 * torch.randn(6, generator=g, dtype=torch.float64)
    gram = x @ x.T
    kept = gram.clone()
    c = x - x.mean(0)
    direct = (c @ c.T) / (c.norm(dim=1)[:, None] * c.norm(dim=1)[None, :])
    np.testing.assert_allclose(gram_cosines(gram).numpy(), direct.numpy(), atol=1e-10)
    np.testing.assert_allclose(gram_cosines(gram, centre=False).numpy(), (gram / (x.norm(dim=1)[:, None] * x.norm(dim=1)[None, :])).numpy(), atol=1e-12)
    assert torch.equal(gram, kept)
    zero = torch.cat([torch.randn(5, 3, generator=g, dtype=torch.float64), torch.zeros(1, 3, dtype=torch.float64)])
    assert torch.equal(gram_cosines(zero @ zero.T, centre=False)[-1], torch.zeros(6, dtype=torch.float64))
