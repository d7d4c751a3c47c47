"""The length-restricted null of the representation tests: a content-free length-only encoder must not pass
CKA, RSA or retrieval at it (while the unrestricted CKA null passes it), and the analyze tables carry it,
with rows for the random and length-only controls, against plain loops over the same permutation draws."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats
from scipy.spatial.distance import pdist

from tests.test_similarity import brute_force_permutations
from xlsub.report.similarity_tables import (
    LENGTH_ONLY,
    LENGTH_RESTRICTED,
    STOP_AFTER,
    UNRESTRICTED,
    Counts,
    cka_pvalue_table,
    length_groups,
    retrieval_pvalue_table,
    rsa_table,
    sentence_lengths,
)
from xlsub.similarity.cka import cka
from xlsub.similarity.controls import length_only_representations
from xlsub.similarity.permutation import cka_permutation_test
from xlsub.similarity.retrieval import retrieval_permutation_test
from xlsub.similarity.rsa import mantel_test

ALPHA = 0.05


def simulated_corpus(k: int, n: int = 40, d: int = 8) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Corpus k: source lengths from four values, the translation's length the source's plus noise (so length
    varies inside a source-length group), both languages encoded by the length-only encoder (seed k)."""
    rng = np.random.default_rng(k)
    source = rng.choice([3, 8, 14, 20], n)
    target = np.maximum(1, source + rng.integers(-2, 3, n))
    reps = length_only_representations({"en": source, "de": target}, d, seed=k, vocab=500)
    return reps["en"], reps["de"], source


def test_the_length_only_encoder_does_not_pass_the_restricted_nulls_but_passes_the_unrestricted_one():
    """Over 400 corpora (n = 40, d = 8, 39 permutations each: p <= 0.05 is the 2 smallest of 40 ranks), the
    rejection rate at alpha of each default test stays within alpha + 3 standard errors; the unrestricted
    CKA null rejects the same encoder in most corpora."""
    corpora, n_perm = 400, 39
    rejected = {"cka": 0, "rsa": 0, "retrieval": 0, "cka unrestricted": 0}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 1,600 tiny tests: a thread pool only adds its start-up cost to each op
    try:
        for k in range(corpora):
            x, y, source = simulated_corpus(k)
            p = {"cka": cka_permutation_test(x, y, n_perm, k, "debiased", groups=source).p_value,
                 "rsa": mantel_test(x, y, n_perm, k, groups=source).p_value,
                 "retrieval": retrieval_permutation_test(y, x, n_perm, k, groups=source).p_value,
                 "cka unrestricted": cka_permutation_test(x, y, n_perm, k, "debiased").p_value}
            for name, value in p.items():
                rejected[name] += float(value) <= ALPHA
    finally:
        torch.set_num_threads(threads)
    rates = {name: count / corpora for name, count in rejected.items()}
    print("rejection rates at alpha = 0.05:", rates)
    bound = ALPHA + 3 * math.sqrt(ALPHA * (1 - ALPHA) / corpora)
    for name in ("cka", "rsa", "retrieval"):
        assert rates[name] <= bound, rates
    assert rates["cka unrestricted"] > 0.8, rates


LANGS = ["en", "de", "zh"]
N, D, LAYERS = 30, 6, 3


def encodings():
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(LAYERS, N, D, generator=g, dtype=torch.float64)
    full = {l: shared + torch.randn(LAYERS, N, D, generator=g, dtype=torch.float64) for l in LANGS}
    return {"full": full, "de-s0": {l: 2 * v for l, v in full.items()},
            "random": {l: torch.randn(LAYERS, N, D, generator=g, dtype=torch.float64) for l in LANGS}}


def tokens():
    g = torch.Generator().manual_seed(1)
    source = torch.randint(3, 7, (N,), generator=g)
    return {l: [[1] * int(k + (i % 2 if l != "en" else 0)) for i, k in enumerate(source)] for l in LANGS}


def test_tables_hold_the_controls_at_the_length_restricted_null():
    enc, lengths = encodings(), sentence_lengths(tokens())
    counts = Counts(full=20, controls=15, subnetworks=10, length=12, power_draws=10)
    cka_table = cka_pvalue_table(enc, LANGS, "en", "debiased", counts, seed=0, lengths=lengths)
    rsa = rsa_table(enc, LANGS, "en", counts, seed=0, lengths=lengths)
    retrieval = retrieval_pvalue_table(enc, LANGS, "en", counts, seed=0, lengths=lengths)
    for table in (cka_table, rsa, retrieval):
        models = list(dict.fromkeys(table.index.get_level_values("model")))
        assert models == ["full", "de-s0", "random", LENGTH_ONLY]
        assert (table["null"] == LENGTH_RESTRICTED).all()
        assert table["p_value"].notna().all()  # a Mantel p for every model, not only the full one
    assert cka_table.loc[(LENGTH_ONLY, "de", LAYERS - 1), "n_perm"] == 15 == cka_table.loc[("random", "zh", LAYERS - 1), "n_perm"]
    assert len(cka_table.loc[LENGTH_ONLY]) == 2 and len(cka_table.loc["full"]) == 2 * LAYERS  # controls: the last layer only
    assert retrieval.loc[(LENGTH_ONLY, "zh", LAYERS - 1), "n_perm"] == 15
    assert rsa.loc[("full", "de"), "n_perm"] == 12 == rsa.loc[(LENGTH_ONLY, "de"), "n_perm"] and rsa.loc[("de-s0", "de"), "n_perm"] == 10
    assert list(retrieval.reset_index().columns) == ["model", "language", "layer", "top1", "null_mean", "p_value", "n_perm", "null", "lo", "hi"]
    # without token counts: the unrestricted null, said so, and no length-only rows
    plain = cka_pvalue_table(enc, LANGS, "en", "debiased", counts, seed=0)
    assert (plain["null"] == UNRESTRICTED).all() and LENGTH_ONLY not in plain.index.get_level_values("model")
    assert (plain["p_value"] == plain["p_unrestricted"]).all()
    assert (rsa_table(enc, LANGS, "en", counts, seed=0)["null"] == UNRESTRICTED).all()
    assert (retrieval_pvalue_table(enc, LANGS, "en", counts, seed=0)["null"] == UNRESTRICTED).all()


def plain_top1(queries: np.ndarray, targets: np.ndarray) -> float:
    """Top-1 retrieval by a loop: centre each language, cosine, unique argmax must be the translation."""
    q, t = queries - queries.mean(0), targets - targets.mean(0)
    hits = 0
    for i in range(len(q)):
        sims = [float(q[i] @ t[j] / (np.linalg.norm(q[i]) * np.linalg.norm(t[j]))) for j in range(len(t))]
        best = max(sims)
        hits += sims[i] == best and sims.count(best) == 1
    return hits / len(q)


def test_length_only_p_values_against_a_plain_loop_over_the_same_draws():
    """The tables' length-only rows: the encoder rebuilt from the token counts (seeded), the permutations
    redrawn one at a time within groups of the reference's token count, each statistic recomputed."""
    enc, lengths = encodings(), sentence_lengths(tokens())
    counts, seed = Counts(full=20, controls=30, subnetworks=10, length=25, power_draws=10), 3
    cka_table = cka_pvalue_table(enc, LANGS, "en", "debiased", counts, seed, lengths)
    rsa = rsa_table(enc, LANGS, "en", counts, seed, lengths)
    retrieval = retrieval_pvalue_table(enc, LANGS, "en", counts, seed, lengths)
    groups = lengths["en"].long().numpy()
    assert np.array_equal(length_groups(lengths, "en").numpy(), groups)
    reps = length_only_representations({l: lengths[l].long().tolist() for l in LANGS}, D, seed)
    x, y = reps["en"], reps["zh"]

    def p(observed: float, null: list[float]) -> float:
        return (1 + sum(v >= observed - 1e-12 for v in null)) / (1 + len(null))

    restricted, anything = brute_force_permutations(N, 30, seed, groups), brute_force_permutations(N, 30, seed)
    row = cka_table.loc[(LENGTH_ONLY, "zh", LAYERS - 1)]
    observed = float(cka(x, y, "debiased"))
    assert row["cka"] == pytest.approx(observed, abs=1e-12)
    assert row["p_value"] == pytest.approx(p(observed, [float(cka(x, y[q], "debiased")) for q in restricted]))
    assert row["p_unrestricted"] == pytest.approx(p(observed, [float(cka(x, y[q], "debiased")) for q in anything]))

    def spearman(a, b) -> float:
        return float(stats.spearmanr(pdist(a.numpy(), "cosine"), pdist(b.numpy(), "cosine")).statistic)

    observed = spearman(x, y)
    assert rsa.loc[(LENGTH_ONLY, "zh"), "rsa"] == pytest.approx(observed, abs=1e-12)
    null = [spearman(x, y[q]) for q in brute_force_permutations(N, 25, seed, groups)]
    # early stopping (Besag & Clifford): with the exact null moments the first stage is 2 STOP_AFTER permutations; a
    # language whose STOP_AFTER-th exceedance comes at L within it has p = STOP_AFTER / L and the exact permutation mean,
    # here against the mean of 2,000 more permutations (within four of its standard errors)
    reached = np.cumsum([v >= observed - 1e-12 for v in null])
    at = int(np.argmax(reached >= STOP_AFTER)) + 1 if reached[-1] >= STOP_AFTER else len(null) + 1
    stopped = at <= 2 * STOP_AFTER < len(null)
    assert rsa.loc[(LENGTH_ONLY, "zh"), "p_value"] == pytest.approx(STOP_AFTER / at if stopped else p(observed, null))
    if stopped:
        many = [spearman(x, y[q]) for q in brute_force_permutations(N, 2000, seed + 1, groups)]
        assert rsa.loc[(LENGTH_ONLY, "zh"), "null_mean"] == pytest.approx(np.mean(many), abs=4 * np.std(many) / math.sqrt(len(many)))
    else:
        assert rsa.loc[(LENGTH_ONLY, "zh"), "null_mean"] == pytest.approx(np.mean(null), abs=1e-10)

    observed = plain_top1(y.numpy(), x.numpy())
    null = [plain_top1(y.numpy(), x[q].numpy()) for q in restricted]
    assert retrieval.loc[(LENGTH_ONLY, "zh", LAYERS - 1), "top1"] == pytest.approx(observed)
    assert retrieval.loc[(LENGTH_ONLY, "zh", LAYERS - 1), "p_value"] == pytest.approx(p(observed, null))
    # and the random model's retrieval row, on its own vectors
    xr, yr = enc["random"]["en"][-1].numpy(), enc["random"]["de"][-1].numpy()
    observed = plain_top1(yr, xr)
    assert retrieval.loc[("random", "de", LAYERS - 1), "p_value"] == pytest.approx(p(observed, [plain_top1(yr, xr[q]) for q in restricted]))


def test_restricted_p_value_against_exact_enumeration_of_within_group_pairings():
    """n = 7 in groups of 3, 2 and 2: all 3! 2! 2! = 24 re-pairings; the sampled p converges to the exact one."""
    from itertools import permutations as orders
    from itertools import product

    x = torch.randn(7, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    y = x + 2.5 * torch.randn(7, 3, generator=torch.Generator().manual_seed(16), dtype=torch.float64)
    groups = np.array([0, 1, 0, 2, 1, 0, 2])
    members = [np.flatnonzero(groups == g) for g in range(3)]
    pairings = []
    for parts in product(*(orders(m) for m in members)):
        q = np.arange(7)
        for m, part in zip(members, parts):
            q[m] = part
        pairings.append(torch.as_tensor(q))
    assert len(pairings) == 24
    observed = float(cka(x, y, "linear"))
    exact = float(np.mean([float(cka(x, y[q], "linear")) >= observed - 1e-12 for q in pairings]))
    assert exact > 1 / 24  # not at the floor, so the comparison means something
    sampled = float(cka_permutation_test(x, y, 6000, 0, "linear", groups=groups).p_value)
    assert sampled == pytest.approx(exact, abs=0.02)


def test_without_lengths_the_analysis_notes_the_unrestricted_null():
    from xlsub.report.analysis import AnalysisInputs, analyze

    result = analyze(AnalysisInputs(languages=LANGS, encodings=encodings()), cka_kind="debiased", layers=None,
                     cka_precision="float64", reference="en", bootstrap=10, permutations=10, resample_seed=0,
                     counts=Counts(10, 10, 10, 10, 10), device="cpu")
    assert any("unrestricted null" in note for note in result.notes)
    assert (result.tables["retrieval_pvalue"]["null"] == UNRESTRICTED).all()
    assert isinstance(result.tables["rsa"], pd.DataFrame) and (result.tables["rsa"]["null"] == UNRESTRICTED).all()
