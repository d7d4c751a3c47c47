"""Early stopping of clearly null cells (`xlsub.similarity.permutation.sequential_null`, Besag & Clifford
1991): the stopped p by hand, the same decisions as the full permutation test at 0.05 (and never a stopped
cell below `STOP_P`), the level kept under the null, and the CKA and Mantel tests through it."""

from __future__ import annotations

import math

import pytest
import torch

from tests.test_tail_bound import pair
from xlsub.similarity.permutation import STOP_P, cka_exceeds, cka_null_mean, cka_permutation_test, sequential_null


def fixed_null(values: torch.Tensor):
    """A `compute` that serves columns of a fixed null matrix, recording what it was asked."""
    asked = []

    def compute(cells, start, stop):
        asked.append((cells.tolist(), start, stop))
        return values[cells, start:stop]

    return compute, asked


def test_the_stopped_p_is_h_over_the_permutation_of_the_hth_exceedance():
    n_perm, h = 300, 10
    observed = torch.tensor([0.5, 0.5, 0.5, 0.5], dtype=torch.float64)
    null = torch.zeros(4, n_perm, dtype=torch.float64)
    null[0, torch.arange(2, 60, 3)[:h]] = 1.0  # the 10th exceedance at permutation 30 (1-based): stops, p = 10 / 30
    null[1, torch.arange(0, n_perm, 12)] = 1.0  # the 10th at 109 > 100 = h / STOP_P: runs all 300
    null[2, :h] = 1.0  # the first ten: p = 10 / 10 = 1
    null[3, 40:49] = 1.0  # only 9 in all: runs all
    compute, asked = fixed_null(null)
    done = sequential_null(compute, observed, n_perm, cka_exceeds, stop_after=h)
    assert done.stopped.tolist() == [True, False, True, False] and not done.tail_bound.any()
    assert done.used.tolist() == [30, n_perm, 10, n_perm]
    assert done.p_value[0] == pytest.approx(10 / 30) and done.p_value[2] == 1.0
    assert done.p_value[1] == pytest.approx((1 + 25) / (1 + n_perm)) and done.p_value[3] == pytest.approx(10 / (1 + n_perm))
    assert done.null[0, :30].isfinite().all() and done.null[0, 30:].isnan().all()
    torch.testing.assert_close(done.null[[1, 3]], null[[1, 3]], rtol=0, atol=0)
    # stages: the pilot (50) for all, up to 100 for those not stopped, the rest for those still running
    assert asked == [([0, 1, 2, 3], 0, 50), ([1, 3], 50, 100), ([1, 3], 100, n_perm)]


def test_without_stopping_or_tail_bound_every_cell_runs_every_permutation():
    null = torch.rand(3, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    observed = torch.tensor([0.1, 0.5, 0.99], dtype=torch.float64)
    done = sequential_null(fixed_null(null)[0], observed, 40, cka_exceeds)
    expected = (1 + (null >= observed[:, None]).sum(-1)).double() / 41
    torch.testing.assert_close(done.p_value, expected, rtol=0, atol=0)
    assert not done.stopped.any() and done.used.tolist() == [40] * 3


def test_cka_decisions_are_the_full_tests_and_stopped_cells_are_clearly_null():
    """Across null, weak and strong pairings (p spread over (0, 1), many near 0.05): the same decision at 0.05
    as all 400 permutations in >= 99% of cells; a stopped cell's p is >= STOP_P; a cell that ran every
    permutation has the full test's p exactly; the null cells cost a fraction of the permutations."""
    n, d, n_perm = 300, 8, 400
    same = stopped = cells = 0
    spent = 0
    for seed, strength in enumerate([0.0, 0.05, 0.1, 0.15, 0.2, 0.3] * 12):
        x, y, groups = pair(n, d, strength, seed)
        early = cka_permutation_test(x, y, n_perm, seed, "debiased", groups, stop_after=10)
        full = cka_permutation_test(x, y, n_perm, seed, "debiased", groups)
        cells += 1
        same += (float(early.p_value) < 0.05) == (float(full.p_value) < 0.05)
        spent += int(early.null.isfinite().sum())
        if bool(early.stopped):
            stopped += 1
            assert float(early.p_value) >= STOP_P
            assert float(early.null_mean) == pytest.approx(float(cka_null_mean(x, y, "debiased", groups)), rel=1e-12)
        else:
            assert float(early.p_value) == float(full.p_value)
    assert same / cells >= 0.99
    assert 10 <= stopped < cells  # both branches
    assert spent < 0.8 * cells * n_perm


def test_early_stopping_keeps_the_level_under_the_null():
    """No pairing information: the share of p <= 0.05 stays within alpha + 3 SE (and the p-values spread
    as a valid p does: P(p <= 0.2) <= 0.2 + 3 SE)."""
    n, d, n_perm, runs = 120, 4, 200, 300
    p = []
    for seed in range(runs):
        g = torch.Generator().manual_seed(1000 + seed)
        x, y = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)
        p.append(float(cka_permutation_test(x, y, n_perm, seed, "linear", stop_after=10).p_value))
    p = torch.tensor(p)
    for level in (0.05, 0.2):
        assert float((p <= level).double().mean()) <= level + 3 * math.sqrt(level * (1 - level) / runs)


def test_tail_bound_and_early_stopping_together_over_layers():
    """Layers decided by the tail bound, stopped as null and run in full, in one call: each as its own test."""
    n, d, n_perm = 600, 16, 300
    layers = [pair(n, d, s, 11) for s in (6.0, 0.0, 0.25)]
    x, y = torch.stack([l[0] for l in layers]), torch.stack([l[1] for l in layers])
    groups = layers[0][2]
    both = cka_permutation_test(x, y, n_perm, 3, "debiased", groups, tail_risk=0.005, stop_after=10)
    assert bool(both.tail_bound[0]) and float(both.p_value[0]) == 1 / (n_perm + 1)
    for layer in (1, 2):
        alone = cka_permutation_test(x[layer], y[layer], n_perm, 3, "debiased", groups, stop_after=10)
        assert float(both.p_value[layer]) == float(alone.p_value)
        assert bool(both.stopped[layer]) == bool(alone.stopped)


def test_mantel_early_stopping_against_the_full_test():
    from xlsub.similarity.rsa import mantel_test

    g = torch.Generator().manual_seed(5)
    n, d, n_perm = 200, 8, 300
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    ys = torch.stack([x + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64),
                      *(torch.randn(n, d, generator=g, dtype=torch.float64) for _ in range(6))])
    groups = torch.randint(0, 10, (n,), generator=g)
    early = mantel_test(x, ys, n_perm, 1, groups, tail_risk=0.005, stop_after=10)
    full = mantel_test(x, ys, n_perm, 1, groups)
    assert bool(early.tail_bound[0]) and early.stopped[1:].any()
    for i in range(len(ys)):
        if bool(early.stopped[i]):
            assert float(early.p_value[i]) >= STOP_P and (float(full.p_value[i]) < 0.05) is False
            used = int(early.null[i].isfinite().sum())
            assert float(early.p_value[i]) == pytest.approx(10 / used)
            torch.testing.assert_close(early.null[i, :used], full.null[i, :used], rtol=0, atol=1e-12)
            # the exact permutation mean, within sampling error of the full test's 300 permutations
            assert float(early.null_mean[i]) == float(early.exact_null_mean[i])
            assert abs(float(early.null_mean[i]) - float(full.null_mean[i])) < 4 * float(full.null_std[i]) / n_perm ** 0.5
        elif not bool(early.tail_bound[i]):
            assert float(early.p_value[i]) == float(full.p_value[i])
