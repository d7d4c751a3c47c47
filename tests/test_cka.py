"""CKA estimators against their Gram-matrix definitions, done another way, and their known invariances."""

from __future__ import annotations

import math
from itertools import combinations

import numpy as np
import pytest
import torch

import xlsub.similarity.cka as cka_module
from tests.reference import linear_cka_gram
from xlsub.errors import XlsubError
from xlsub.similarity.cka import (
    KINDS,
    cka,
    cka_matrix,
    debiased_linear_cka,
    linear_cka,
    rbf_cka,
    shuffled_pairs_cka,
)


def gaussian(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def related(n: int = 60, d1: int = 12, d2: int = 9, layers: int | None = None, seed: int = 0):
    """X and Y sharing a few latent directions, plus noise and a common offset (so centring matters)."""
    lead = () if layers is None else (layers,)
    z = gaussian(*lead, n, 3, seed=seed)
    x = z @ gaussian(3, d1, seed=seed + 1) + 0.5 * gaussian(*lead, n, d1, seed=seed + 2) + 3.0
    y = z @ gaussian(3, d2, seed=seed + 3) + 0.5 * gaussian(*lead, n, d2, seed=seed + 4) - 1.0
    return x, y


def orthogonal(d: int, seed: int) -> torch.Tensor:
    q, r = torch.linalg.qr(gaussian(d, d, seed=seed))
    return q * torch.sign(torch.diagonal(r))


# -- independent references, in numpy, with an explicit centring matrix H ---------------------------------

def centring(n: int) -> np.ndarray:
    return np.eye(n) - np.ones((n, n)) / n


def hsic_biased(k: np.ndarray, l: np.ndarray) -> float:
    h = centring(len(k))
    return float(np.trace(k @ h @ l @ h))


def hsic_unbiased(k: np.ndarray, l: np.ndarray) -> float:
    """Song et al. 2012, eq. 5, term by term on the raw (uncentred) kernels."""
    n = len(k)
    kt, lt = k - np.diag(np.diag(k)), l - np.diag(np.diag(l))
    one = np.ones(n)
    return float((np.trace(kt @ lt) + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
                  - 2 / (n - 2) * one @ kt @ lt @ one) / (n * (n - 3)))


def cka_numpy(k: np.ndarray, l: np.ndarray, hsic) -> float:
    return hsic(k, l) / math.sqrt(hsic(k, k) * hsic(l, l))


def rbf_kernel_numpy(x: np.ndarray, sigma_frac: float) -> np.ndarray:
    dist = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    sigma = sigma_frac * np.median(dist[np.triu_indices(len(x), k=1)])
    return np.exp(-dist**2 / (2 * sigma**2))


# -- linear CKA ------------------------------------------------------------------------------------

@pytest.mark.parametrize("n, d1, d2", [(60, 12, 9), (20, 50, 35)])  # more and fewer examples than features
def test_linear_cka_equals_gram_form(n, d1, d2):
    x, y = related(n, d1, d2)
    value = linear_cka(x, y)
    assert value.dtype == torch.float64 and value.shape == ()
    assert float(value) == pytest.approx(float(linear_cka_gram(x, y)), abs=1e-8)
    reference = cka_numpy((x @ x.T).numpy(), (y @ y.T).numpy(), hsic_biased)
    assert float(value) == pytest.approx(reference, abs=1e-8)
    assert 0.2 < float(value) < 0.95  # related but not identical: the comparison is not trivially 0 or 1


def test_linear_cka_float32_input_is_computed_in_float64():
    x, y = related()
    assert float(linear_cka(x.float(), y.float())) == pytest.approx(float(linear_cka(x.float().double(),
                                                                                     y.float().double())), abs=1e-12)


@pytest.mark.parametrize("kind", ["linear", "debiased"])
def test_float32_products_agree_with_float64(kind, monkeypatch):
    """float32 products accumulated in float64: within 1e-6 of float64 here, yet really computed in float32."""
    x, y = related(n=3000, d1=64, d2=48, layers=2)
    exact = cka(x, y, kind)
    fast = cka(x, y, kind, precision="float32")
    assert fast.dtype == torch.float64
    difference = float((fast - exact).abs().max())
    assert 1e-12 < difference < 1e-6, difference  # float32 rounding is visible, and small
    # Blocks of 100 examples summed in float64 give the same CKA (the blocking is a sum, not an approximation)
    # and no larger error than one 3000-example float32 product.
    monkeypatch.setattr(cka_module, "FLOAT32_BLOCK", 100)
    blocked = cka(x, y, kind, precision="float32")
    assert float((blocked - exact).abs().max()) < 1e-6
    assert not torch.equal(blocked, fast)


def test_float32_product_blocks_sum_to_the_whole_product(monkeypatch):
    a, b = gaussian(2, 250, 7, seed=1).float(), gaussian(2, 250, 5, seed=2).float()
    monkeypatch.setattr(cka_module, "FLOAT32_BLOCK", 64)  # 64 + 64 + 64 + 58
    blocked = cka_module.blocked_product(a, b)
    assert blocked.dtype == torch.float64 and blocked.shape == (2, 5, 7)
    torch.testing.assert_close(blocked, b.double().mT @ a.double(), rtol=0, atol=1e-4)


def test_precision_is_checked():
    x, y = related()
    with pytest.raises(XlsubError, match="cka_precision: unknown precision 'float16'"):
        cka(x, y, precision="float16")
    with pytest.raises(XlsubError, match="cka_precision: rbf"):
        cka_matrix({"en": x, "de": y}, "rbf", precision="float32")


def test_cka_matrix_float32_products(monkeypatch):
    reps = languages(n=300)
    exact = cka_matrix(reps, "linear")
    fast = cka_matrix(reps, "linear", precision="float32")
    torch.testing.assert_close(fast, exact, rtol=0, atol=1e-6)
    for a, b in combinations(range(len(reps)), 2):
        pair = [list(reps)[a], list(reps)[b]]
        torch.testing.assert_close(fast[:, a, b], linear_cka(reps[pair[0]], reps[pair[1]], "float32"), rtol=0, atol=1e-12)


def test_batched_over_layers_equals_a_loop():
    x, y = related(layers=4)
    for fn in (linear_cka, linear_cka_gram, debiased_linear_cka, rbf_cka):
        batched = fn(x, y)
        assert batched.shape == (4,)
        loop = torch.stack([fn(x[layer], y[layer]) for layer in range(4)])
        torch.testing.assert_close(batched, loop, rtol=0, atol=1e-12)
    more = torch.stack([x, 2 * x]), torch.stack([y, y])  # [2, 4, n, d]: any number of leading dimensions
    assert linear_cka(*more).shape == (2, 4)


def test_linear_cka_invariances():
    x, y = related(n=200, d1=20, d2=20)
    base = float(linear_cka(x, y))
    assert float(linear_cka(x, x)) == pytest.approx(1.0, abs=1e-12)
    assert float(linear_cka(x @ orthogonal(20, seed=7), y)) == pytest.approx(base, abs=1e-10)
    assert float(linear_cka(3.7 * x, y)) == pytest.approx(base, abs=1e-12)
    # A general invertible map with condition number 1e3 is not a symmetry of linear CKA: isotropic data
    # mapped through it keeps little more than its few largest directions.
    g = gaussian(200, 20, seed=3)
    a = orthogonal(20, seed=8) @ torch.diag(torch.logspace(0, -3, 20, dtype=torch.float64)) @ orthogonal(20, seed=9)
    assert float(linear_cka(g, g @ orthogonal(20, seed=10))) == pytest.approx(1.0, abs=1e-12)
    assert float(linear_cka(g, g @ a)) < 0.6
    assert abs(float(linear_cka(x @ a, y)) - base) > 0.05


def test_constant_representation_gives_nan():
    x, _ = related()
    for kind in KINDS:
        for constant in (torch.zeros(60, 5), torch.full((60, 5), 0.1, dtype=torch.float64)):
            assert math.isnan(float(cka(constant, x, kind))), kind
            assert math.isnan(float(cka(x, constant, kind))), kind


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="same leading dimensions"):
        linear_cka(torch.randn(10, 3), torch.randn(11, 3))


def test_unknown_kind_raises_xlsub_error():
    x, y = related()
    message = "cka: unknown kind 'cosine'; use linear, debiased or rbf"
    with pytest.raises(XlsubError) as caught:
        cka(x, y, "cosine")
    assert str(caught.value) == message
    with pytest.raises(XlsubError, match="unknown kind 'cosine'"):
        cka_matrix({"en": x[None], "de": y[None]}, "cosine")


# -- debiased CKA ----------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [4, 9, 40])
def test_debiased_equals_song_formula_on_raw_kernels(n):
    x, y = related(n=n, d1=7, d2=5, seed=n)
    reference = cka_numpy((x @ x.T).numpy(), (y @ y.T).numpy(), hsic_unbiased)
    assert float(debiased_linear_cka(x, y)) == pytest.approx(reference, abs=1e-9)


def test_debiased_removes_the_small_sample_bias():
    biased, debiased = [], []
    for seed in range(10):
        x, y = gaussian(32, 64, seed=2 * seed), gaussian(32, 64, seed=2 * seed + 1)
        biased.append(float(linear_cka(x, y)))
        debiased.append(float(debiased_linear_cka(x, y)))
    assert abs(np.mean(debiased)) < 0.05
    assert np.mean(biased) > 0.15 and min(biased) > 0.15


def test_debiased_self_is_one_and_degenerate_input_is_nan():
    x, y = related()
    assert float(debiased_linear_cka(x, x)) == pytest.approx(1.0, abs=1e-12)
    assert float(debiased_linear_cka(x @ orthogonal(12, seed=3) * 2, y)) == pytest.approx(
        float(debiased_linear_cka(x, y)), abs=1e-10)
    # All examples identical but one: HSIC_1(K, K) is exactly 0, computed as a rounding error of either sign.
    outlier = torch.full((60, 12), 0.3, dtype=torch.float64)
    outlier[5] = gaussian(12, seed=11)
    assert math.isnan(float(debiased_linear_cka(outlier, y)))
    assert math.isnan(float(cka_matrix({"a": outlier[None], "b": y[None]}, "debiased")[0, 0, 1]))
    # ... also with float32 products: the self terms that decide it stay float64.
    assert math.isnan(float(debiased_linear_cka(outlier, y, "float32")))


def test_debiased_needs_four_examples():
    with pytest.raises(ValueError, match="at least 4"):
        debiased_linear_cka(torch.randn(3, 2), torch.randn(3, 2))


# -- RBF CKA ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("sigma_frac", [0.5, 1.0, 2.0])
def test_rbf_cka_equals_numpy_reference(sigma_frac):
    x, y = related(n=41, d1=6, d2=4)  # odd number of pairs: 820; the median is a single value
    reference = cka_numpy(rbf_kernel_numpy(x.numpy(), sigma_frac), rbf_kernel_numpy(y.numpy(), sigma_frac),
                          hsic_biased)
    assert float(rbf_cka(x, y, sigma_frac)) == pytest.approx(reference, abs=1e-10)
    x, y = related(n=40, d1=6, d2=4)  # even number of pairs: the mean of the two middle distances
    reference = cka_numpy(rbf_kernel_numpy(x.numpy(), sigma_frac), rbf_kernel_numpy(y.numpy(), sigma_frac),
                          hsic_biased)
    assert float(rbf_cka(x, y, sigma_frac)) == pytest.approx(reference, abs=1e-10)


def test_rbf_cka_properties():
    x, y = related(n=80, d1=10, d2=10)
    value = float(rbf_cka(x, y))
    assert 0 <= value <= 1 and 0.1 < value < 0.95
    assert float(rbf_cka(x, x)) == pytest.approx(1.0, abs=1e-12)
    assert float(rbf_cka(x @ orthogonal(10, seed=5), y)) == pytest.approx(value, abs=1e-10)
    assert float(rbf_cka(4.0 * x + 2.0, y)) == pytest.approx(value, abs=1e-10)  # bandwidth scales with the data
    independent = [float(rbf_cka(gaussian(30, 8, seed=s), gaussian(30, 8, seed=100 + s))) for s in range(5)]
    assert all(0 <= v <= 1 for v in independent)


# -- all pairs, control ----------------------------------------------------------------------------

def languages(layers: int = 3, n: int = 30) -> dict[str, torch.Tensor]:
    z = gaussian(layers, n, 4, seed=0)
    return {
        lang: z @ gaussian(4, d, seed=10 + i) + gaussian(layers, n, d, seed=20 + i) * (0.3 + 0.3 * i)
        for i, (lang, d) in enumerate([("en", 8), ("de", 8), ("zh", 6), ("ar", 10)])
    }


@pytest.mark.parametrize("kind", KINDS)
def test_cka_matrix_equals_pairwise_calls(kind, monkeypatch):
    reps = languages()
    langs = list(reps)
    matrix = cka_matrix(reps, kind)
    assert matrix.shape == (3, 4, 4) and matrix.dtype == torch.float64
    torch.testing.assert_close(matrix, matrix.transpose(1, 2), rtol=0, atol=0)
    assert bool((torch.diagonal(matrix, dim1=1, dim2=2) == 1).all())
    for i, a in enumerate(langs):
        for j, b in enumerate(langs):
            if i != j:
                torch.testing.assert_close(matrix[:, i, j], cka(reps[a], reps[b], kind), rtol=0, atol=1e-12)
    if kind == "linear":
        for i, a in enumerate(langs):
            for j, b in enumerate(langs[i + 1:], start=i + 1):
                torch.testing.assert_close(matrix[:, i, j], linear_cka_gram(reps[a], reps[b]), rtol=0, atol=1e-10)
    monkeypatch.setattr(cka_module, "_CHUNK_BYTES", 1)  # one layer at a time: the same numbers
    torch.testing.assert_close(cka_matrix(reps, kind), matrix, rtol=0, atol=1e-12)


def test_cka_matrix_nan_on_a_degenerate_language():
    reps = languages()
    reps["ur"] = torch.ones(3, 30, 5)
    matrix = cka_matrix(reps)
    assert bool(matrix[:, 4, :].isnan().all()) and bool(matrix[:, :4, :4].isfinite().all())


def test_shuffled_pairs_control():
    x, y = related(n=200, layers=2)
    parallel = debiased_linear_cka(x, y)
    shuffled = shuffled_pairs_cka(x, y, seed=0, kind="debiased")
    assert bool((parallel > 0.5).all()) and bool((shuffled.abs() < 0.1).all())
    torch.testing.assert_close(shuffled, shuffled_pairs_cka(x, y, seed=0, kind="debiased"), rtol=0, atol=0)
    assert not torch.equal(shuffled, shuffled_pairs_cka(x, y, seed=1, kind="debiased"))
    # One permutation for all layers: per-layer calls with the same seed agree.
    for layer in range(2):
        assert float(shuffled_pairs_cka(x[layer], y[layer], seed=0)) == pytest.approx(
            float(shuffled_pairs_cka(x, y, seed=0)[layer]), abs=1e-12)
    # No sentence keeps its partner: with 3 points on a line, the identity pairing gives 1 and every other 0.25.
    line = torch.arange(3.0)[:, None]
    assert {round(float(shuffled_pairs_cka(line, line, seed=s)), 12) for s in range(30)} == {0.25}


@pytest.mark.parametrize("kind", ["linear", "debiased"])
def test_self_terms_computed_once_give_the_same_cka(kind, monkeypatch):
    """self_hsic (a layer at a time here) is prepare's self term; cka_matrix and shuffled_pairs_cka given the self terms
    equal their own computation (bit for bit, up to rounding once re-paired); a wrong self term given is used (so the shortcut is not ignored)."""
    x, y = related(layers=3)
    monkeypatch.setattr(cka_module, "_CHUNK_BYTES", 1)
    selves = {"x": cka_module.self_hsic(x, kind), "y": cka_module.self_hsic(y, kind)}
    assert torch.equal(selves["x"], cka_module.prepare(x, kind)["self"])
    for precision in ("float64", "float32"):
        assert torch.equal(cka_matrix({"x": x, "y": y}, kind, precision=precision, selves=selves),
                           cka_matrix({"x": x, "y": y}, kind, precision=precision))
        # the re-paired y's own self term sums its rows in another order: equal up to rounding
        torch.testing.assert_close(cka_module.shuffled_pairs_cka(x, y, 3, kind, precision=precision, selves=(selves["x"], selves["y"])),
                                   cka_module.shuffled_pairs_cka(x, y, 3, kind, precision=precision), rtol=1e-12, atol=0)
    doubled = cka_matrix({"x": x, "y": y}, kind, selves={"x": 4 * selves["x"], "y": selves["y"]})
    torch.testing.assert_close(doubled[:, 0, 1], cka_matrix({"x": x, "y": y}, kind)[:, 0, 1] / 2, rtol=1e-12, atol=0)


@pytest.mark.parametrize("d", [5, 96, 97, 200])
def test_self_product_sq_from_the_upper_blocks_equals_the_whole_product(d):
    """||X'X||_F^2 from X'X's blocks on and above the diagonal (the self term of linear and debiased CKA) is the whole
    product's, batched over leading dimensions, with d below, at and across multiples of SELF_BLOCK."""
    from xlsub.similarity.cka import SELF_BLOCK, self_product_sq

    assert SELF_BLOCK == 96
    x = torch.randn(3, 2, 40, d, generator=torch.Generator().manual_seed(d), dtype=torch.float64)
    want = (x.mT @ x).square().sum((-2, -1))
    torch.testing.assert_close(self_product_sq(x), want, rtol=1e-13, atol=0)
    torch.testing.assert_close(self_product_sq(x[0, 0]), want[0, 0], rtol=1e-13, atol=0)


@pytest.mark.parametrize("kind", ["linear", "debiased", "rbf"])
def test_cka_matrix_with_an_anchor_computes_every_pair_only_at_the_layers_asked(kind, monkeypatch):
    """`cka_matrix(anchor=, every_pair=)`: the anchor's row and column at every layer and every pair at the chosen
    layers (negative counted from the end) are the whole matrix's (to float64 rounding: a batch of other layers), with
    layers in chunks of one or all; the other pairs are NaN."""
    from xlsub.similarity import cka as module

    g = torch.Generator().manual_seed(3)
    reps = {lang: torch.randn(5, 30, 4, generator=g, dtype=torch.float64) for lang in ("en", "de", "zh", "ar")}
    whole = cka_matrix(reps, kind)
    for chunk in (1, 2**40):
        monkeypatch.setattr(module, "_CHUNK_BYTES", chunk)
        some = cka_matrix(reps, kind, anchor="de", every_pair=[0, -1])
        anchored = torch.zeros(4, 4, dtype=torch.bool)
        anchored[1, :] = anchored[:, 1] = True
        anchored.fill_diagonal_(True)
        for layer in range(5):
            wanted = torch.ones(4, 4, dtype=torch.bool) if layer in (0, 4) else anchored
            torch.testing.assert_close(some[layer][wanted], whole[layer][wanted], rtol=1e-12, atol=0)
            assert some[layer][~wanted].isnan().all()
    assert torch.equal(cka_matrix(reps, kind, anchor="de"), whole)  # no layers named: every pair everywhere
    with pytest.raises(ValueError, match="anchor 'fr'"):
        cka_matrix(reps, kind, anchor="fr", every_pair=[0])
