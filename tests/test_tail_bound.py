"""The CKA permutation test's tail bound (`xlsub.similarity.permutation.tail_bound_decided`): where it skips
permutations, the full permutation null gives the same p (its floor) and so the same decision at 0.05; where
it does not, every number is the full test's."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from xlsub.similarity.permutation import TAIL_SD_RISK, cka_null_mean, cka_permutation_test, tail_bound_decided


def pair(n: int, d: int, strength: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x and y = strength * x rotated + noise + a shared length effect, [n, d] float64."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    length = torch.randint(0, 30, (n,), generator=g).double()
    y = strength * x @ q + torch.randn(n, d, generator=g, dtype=torch.float64)
    x, y = x + 0.05 * length[:, None], y + 0.05 * length[:, None]
    return x, y, length.long()


def test_the_bound_by_hand():
    """n_perm x the upper tail of (chi2_1 - 1) / sqrt(2) at z, with the pilot's sd raised to its chi-square upper
    bound, at most risk; and no pilot value at the observed."""
    pilot = torch.tensor([[0.0, 1.0, -1.0, 2.0, -2.0] * 10])  # sd s, m = 50
    m, s = 50, float(pilot.std())
    sd = s * math.sqrt((m - 1) / stats.chi2.ppf(TAIL_SD_RISK, m - 1))
    n_perm, risk = 1000, 0.005
    z_needed = (stats.chi2.isf(risk / n_perm, 1) - 1) / math.sqrt(2)
    assert 13.5 < z_needed < 14.5
    at = torch.tensor([z_needed * sd * 1.0001, z_needed * sd * 0.9999])
    decided = tail_bound_decided(at, torch.zeros(2), pilot.expand(2, -1), n_perm, risk)
    assert decided.tolist() == [True, False]
    # a pilot value at the observed one: never decided, however far the bound says it is
    reached = pilot.clone()
    reached[0, 3] = float(at[0])
    assert not bool(tail_bound_decided(at[:1], torch.zeros(1), reached, n_perm, risk))


def test_decided_cells_have_the_full_nulls_p_and_the_rest_are_the_full_test():
    n, d, n_perm, risk = 1200, 32, 100, 0.005
    decided = agree = 0
    cases = 0
    for seed, strength in enumerate([0.0, 1.0, 2.0, 3.0, 4.0, 6.0] * 6):
        x, y, groups = pair(n, d, strength, seed)
        bounded = cka_permutation_test(x, y, n_perm, seed, "debiased", groups, tail_risk=risk)
        full = cka_permutation_test(x, y, n_perm, seed, "debiased", groups)
        cases += 1
        if bool(bounded.tail_bound):
            decided += 1
            agree += (float(full.p_value) < 0.05) == (float(bounded.p_value) < 0.05)
            assert float(bounded.p_value) == 1 / (n_perm + 1)
            assert float(bounded.null_mean) == pytest.approx(float(cka_null_mean(x, y, "debiased", groups)), rel=1e-12)
            assert float(full.p_value) == 1 / (n_perm + 1)  # the count of the full null is 0 as well
        else:
            for name in ("observed", "null_mean", "null_std", "p_value", "null"):
                torch.testing.assert_close(getattr(bounded, name), getattr(full, name), rtol=0, atol=0)
    assert decided >= 10 and decided < cases  # both branches are exercised
    assert agree / decided >= 0.99


def test_layers_decided_and_not_in_one_call():
    """Leading indices are decided one by one; the undecided ones see all permutations, as alone."""
    n, d, n_perm = 1200, 32, 100
    layers = [pair(n, d, s, 7) for s in (6.0, 0.0, 1.0)]
    x, y = torch.stack([l[0] for l in layers]), torch.stack([l[1] for l in layers])
    groups = layers[0][2]
    result = cka_permutation_test(x, y, n_perm, 3, "debiased", groups, tail_risk=0.005)
    assert result.tail_bound.tolist()[1] is False and result.tail_bound.any()
    for layer in range(3):
        alone = cka_permutation_test(x[layer], y[layer], n_perm, 3, "debiased", groups)
        if bool(result.tail_bound[layer]):
            assert float(result.p_value[layer]) == float(alone.p_value) == 1 / (n_perm + 1)
        else:
            torch.testing.assert_close(result.null[layer], alone.null, rtol=0, atol=1e-12)
            assert float(result.p_value[layer]) == float(alone.p_value)


def test_permutations_are_drawn_only_where_a_cell_needs_them(monkeypatch):
    """A test whose every cell the tail bound decides draws no permutation; one with an undecided cell draws them
    once, and its numbers are those of the permutations drawn up front."""
    from xlsub.similarity import permutation
    from xlsub.similarity.cka import cka

    n, d, n_perm = 1200, 32, 100
    layers = [pair(n, d, s, 7) for s in (6.0, 0.0)]
    groups = layers[0][2]
    drawn = []
    real = permutation.permutations
    monkeypatch.setattr(permutation, "permutations", lambda *args: drawn.append(args) or real(*args))
    decided = cka_permutation_test(layers[0][0], layers[0][1], n_perm, 3, "debiased", groups, tail_risk=0.005)
    assert bool(decided.tail_bound) and drawn == []
    mixed = cka_permutation_test(torch.stack([l[0] for l in layers]), torch.stack([l[1] for l in layers]), n_perm, 3, "debiased", groups,
                                 tail_risk=0.005)
    assert mixed.tail_bound.tolist() == [True, False] and len(drawn) == 1
    perms = real(n, n_perm, 3, groups)
    expected = torch.stack([cka(layers[1][0], layers[1][1][p], "debiased") for p in perms[:5]])
    torch.testing.assert_close(mixed.null[1, :5], expected, rtol=1e-6, atol=0)  # the null in float32 products


# -- translation retrieval: float32 similarities with float64 where the best two are close ------------------

def float64_nearest(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The nearest row of y for each row of x by float64 cosine after centring, -1 on a tie: the definition."""
    xc, yc = x.double() - x.double().mean(-2, keepdim=True), y.double() - y.double().mean(-2, keepdim=True)
    xn = xc / xc.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    yn = yc / yc.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    top = (xn @ yn.mT).topk(2, dim=-1)
    return torch.where(top.values[..., 0] > top.values[..., 1], top.indices[..., 0], -1)


def test_retrieval_equals_float64_with_near_ties_and_ties():
    from xlsub.similarity.retrieval import nearest_translation

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 300, 64, generator=g, dtype=torch.float64)
    y = x + 0.8 * torch.randn(3, 300, 64, generator=g, dtype=torch.float64)
    y[:, 1::3] = y[:, 0::3][:, :100] + 1e-9 * torch.randn(3, 100, 64, generator=g, dtype=torch.float64)  # near ties
    y[1, 7] = y[1, 6]  # an exact tie for the nearest of x[1, 6]
    x[1, 6] = 3 * y[1, 6]
    found = nearest_translation(x, y)
    torch.testing.assert_close(found, float64_nearest(x, y), rtol=0, atol=0)
    assert (found == -1).any() and (found >= 0).any()


def spread_and_peaked(g: torch.Generator, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """300 rows of d normals, and 300 whose columns are scaled by uniforms to the 8th power: most of each row's length
    on a few coordinates, where rounding errors do not average out (float64)."""
    spread = torch.randn(300, d, generator=g, dtype=torch.float64)
    return spread, torch.randn(300, d, generator=g, dtype=torch.float64) * torch.rand(d, generator=g, dtype=torch.float64) ** 8


def _representable(value: float, dtype: torch.dtype) -> tuple[float, float]:
    """The largest value of `dtype` below `value` and the smallest at or above it (stepping through the values in
    order: a float's bits, its magnitude bits flipped when negative, count up with it)."""
    ints, width = {torch.bfloat16: (torch.int16, 16), torch.float32: (torch.int32, 32)}[dtype]
    mask = (1 << (width - 1)) - 1

    def as_value(key: int) -> float:
        bits = key ^ mask if key < 0 else key
        return float(torch.tensor([bits], dtype=ints).view(dtype))

    bits = int(torch.tensor([value], dtype=torch.float64).to(dtype).view(ints))
    key = bits ^ mask if bits < 0 else bits
    while as_value(key) < value:
        key += 1
    while as_value(key - 1) >= value:
        key -= 1
    return as_value(key - 1), as_value(key)


@pytest.mark.parametrize("screen", [torch.bfloat16, torch.float32])
def test_compiled_rows_take_exactly_the_candidates_within_the_screen_margin(screen):
    """The compiled loop's candidates are the columns at or above the row's screened best less its `screen_margins`:
    the value just at that floor is compared in float64 and wins, the one just below it is not compared, though its
    float64 cosine is the largest; a row whose only candidate is its screened best takes it without comparing. The
    floor lies below 0, where neighbouring values are closer than a thousandth of the margin: a margin 0.1% wider or
    narrower changes the answer."""
    from xlsub.similarity import retrieval

    d = 4
    x_rounding, y_rounding = 0.4 * torch.finfo(screen).eps, 0.3 * torch.finfo(screen).eps  # measured rounding of unit rows is about eps / 4

    def margin_at(best: float) -> float:
        return float(retrieval.screen_margins(torch.tensor([best], dtype=torch.float64), torch.tensor([x_rounding], dtype=torch.float64),
                                              torch.tensor(y_rounding, dtype=torch.float64), screen, d)[0])

    best, larger = None, _representable(margin_at(0.0) / 2, screen)[1]
    while larger - margin_at(larger) < 0:  # the largest best (in steps of 1%) whose floor lies below 0
        best, larger = larger, _representable(larger * 1.01, screen)[1]
    margin = margin_at(best)
    below, at = _representable(best - margin, screen)
    assert below < best - margin <= at < 0 < best and at - below < 1e-3 * margin
    assert _representable(best - 1.001 * margin, screen)[1] <= below and at < _representable(best - 0.999 * margin, screen)[1]
    cosines = torch.tensor([0.3, 0.4, 0.9, 0.1], dtype=torch.float64)  # float64 cosines of x's row with y's four rows
    y_unit = torch.stack([cosines, (1 - cosines**2).sqrt(), torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)], 1)
    x_unit = torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 2, dtype=torch.float64)
    screened = torch.tensor([[best, at, below, -0.5], [best, below, below, -0.5]], dtype=torch.float64).to(screen)
    out = torch.empty(2, dtype=torch.long)
    zeros = torch.zeros(d, dtype=torch.float64)  # unit rows already: their mean taken as 0 and their scales as 1
    retrieval._compiled_rows(screened, (x_unit, zeros, torch.ones(2, dtype=torch.float64)), (y_unit, zeros, torch.ones(4, dtype=torch.float64)),
                             torch.tensor([x_rounding] * 2, dtype=torch.float64), y_rounding, out)
    assert out.tolist() == [1, 0]


def int8_screen() -> None:
    """Skip where oneDNN's int8 product is not exact on this CPU (the int8 screen is then never chosen)."""
    from xlsub.similarity import retrieval

    if not retrieval._int8_exact():
        pytest.skip("oneDNN's int8 product is not exact on this CPU: the int8 screen is not used here")


@pytest.mark.parametrize("screen", [torch.bfloat16, torch.float32, torch.int8])
@pytest.mark.parametrize("few", [2, 3, 8, "compiled"])
def test_retrieval_screens_at_either_precision_and_rechecks_every_candidate(screen, few, monkeypatch):
    """Rows with a single screening candidate, a few (rechecked pairwise in float64) and more (whole rows
    in float32, then float64 where close), against the float64 definition; a prepared reference broadcast
    over draws. The torch path (as on a GPU) with 2, 3 and 8 candidates rechecked pairwise; the compiled loop
    (the CPU's path: every candidate compared in float64), also in blocks of 7 rows that do not divide n (3 rows
    for int8, whose only path it is)."""
    from xlsub.similarity import retrieval

    if screen == torch.int8:
        int8_screen()
        if few != "compiled":
            pytest.skip("the int8 screen has the compiled path only")
    if few == "compiled":
        monkeypatch.setattr(retrieval, "_COMPILED_BLOCK_BYTES", 7 * 200 * (8 if screen == torch.int8 else torch.finfo(screen).bits) // 8)
    else:
        monkeypatch.setattr(retrieval, "_FEW", few)
        monkeypatch.setattr(retrieval, "_compiled", lambda x, dtype: False)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 200, 32, generator=g, dtype=torch.float64)
    y = x + 0.5 * torch.randn(2, 200, 32, generator=g, dtype=torch.float64)
    y[:, 100:150] = y[:, 50:100] + 2e-3 * torch.randn(2, 50, 32, generator=g, dtype=torch.float64)  # within the bf16 margin
    y[:, 150:155] = y[:, 40:41]  # five exact copies: ties, and many candidates for the rows near them
    y[:, 155:200] = y[:, 60:69].repeat_interleave(5, 1) + 3e-8 * torch.randn(2, 45, 32, generator=g, dtype=torch.float64)  # within float32's margin
    y[0, 5] = y[0, 4]
    x[0, 4] = 3 * y[0, 4]  # an exact tie for x[0, 4] after centring moves little
    side = retrieval.CosineSide(x[0], screen)
    assert side.screen.dtype == (torch.uint8 if screen == torch.int8 else screen) and side.dtype == screen
    found = retrieval.nearest_translation(side, y)  # x[0] broadcast against both layers of y
    torch.testing.assert_close(found, float64_nearest(x[0].expand_as(y), y), rtol=0, atol=0)
    torch.testing.assert_close(retrieval.nearest_translation(retrieval.CosineSide(x, screen), y), float64_nearest(x, y), rtol=0, atol=0)
    assert (found == -1).any()


@pytest.mark.parametrize("screen", [torch.bfloat16, torch.float32])
def test_screen_error_bounds_the_screened_cosines(screen):
    """|screened - float64| <= screen_error on unit vectors, spread ones and ones concentrated on a few
    coordinates (where rounding errors do not average out), at the screen's own matrix product."""
    from xlsub.similarity.retrieval import screen_error, unit_rows

    g = torch.Generator().manual_seed(4)
    d = 384
    spread, peaked = spread_and_peaked(g, d)
    worst = 0.0
    for a in (spread, peaked):
        u = unit_rows(a, True)
        screened = (u.to(screen) @ u.to(screen).mT).double()
        worst = max(worst, float((screened - u @ u.mT).abs().max()))
    assert 0 < worst <= screen_error(screen, d)
    assert screen_error(screen, d) < (0.013 if screen == torch.bfloat16 else 1e-4)


def test_int8_sides_round_the_rotated_unit_rows():
    """The int8 screen's sides against torch: the centred unit rows, signs flipped, reordered and multiplied by a
    block-diagonal Walsh-Hadamard matrix (scipy's), rounded to 7 and 8 bits at a step of each row's largest value over
    63 and 127, with each rounding's error in cosine units; the rotation keeps cosines (times the block); the roles'
    roundings made only where they serve."""
    from scipy import linalg

    from xlsub.similarity.retrieval import CosineSide, int8_rotation, unit_rows

    int8_screen()
    g = torch.Generator().manual_seed(8)
    d = 48
    x = torch.randn(2, 60, d, generator=g, dtype=torch.float64) * torch.rand(d, generator=g, dtype=torch.float64) ** 6
    signs, order, block = int8_rotation(d)
    assert block == 16 and sorted(order.tolist()) == list(range(d)) and set(signs.tolist()) == {-1.0, 1.0}
    assert order[:4].tolist() == [0, 3, 6, 9] and int8_rotation(768)[2] == 256 and int8_rotation(35)[2] == 1
    unit = unit_rows(x, True)
    hadamard = torch.block_diag(*[torch.tensor(linalg.hadamard(block), dtype=torch.float64)] * (d // block))
    z = (unit * torch.from_numpy(signs))[..., torch.from_numpy(order)] @ hadamard.T
    torch.testing.assert_close(z @ z.mT / block, unit @ unit.mT, rtol=0, atol=1e-14)
    side = CosineSide(x, torch.int8)
    for levels, values, offset, step, rounding in ((63, side.screen, 64, side.step, side.rounding),
                                                  (127, side.weights, 0, side.weight_step, side.weight_rounding)):
        expected_step = z.abs().amax(-1) / levels
        q = torch.round(z / expected_step[..., None])
        assert q.abs().max() == levels
        assert torch.equal(values.long(), q.long() + offset)
        torch.testing.assert_close(step, expected_step, rtol=1e-15, atol=0)
        torch.testing.assert_close(rounding, torch.linalg.vector_norm(q * expected_step[..., None] - z, dim=-1) / math.sqrt(block),
                                   rtol=1e-12, atol=0)
    as_x, as_y = CosineSide(x, torch.int8, "x"), CosineSide(x, torch.int8, "y")
    assert torch.equal(as_x.screen, side.screen) and torch.equal(as_y.weights, side.weights) and torch.equal(as_x.rounding, side.rounding)
    assert as_x.weights.numel() == 0 and as_y.screen.numel() == 0


def test_int8_screen_errors_within_their_measured_bound():
    """|int8-screened cosine - float64| <= |dx| + |dy| + |dx||dy| + `int8_errors` with each row's measured rounding
    (x's 7 bits, y's 8), on spread and peaked rows (a few coordinates holding most of the length: the rotation spreads
    them) against near copies, copies and independent rows, at oneDNN's own product; the bound is reached to more than
    a tenth (the rounding errors' dot products with the other row, Cauchy-Schwarz's slack, keep it there), and never
    exceeds `screen_error`'s worst case."""
    from xlsub.similarity.retrieval import CosineSide, _int8_product, int8_errors, screen_error

    int8_screen()
    g = torch.Generator().manual_seed(6)
    d = 384
    spread, peaked = spread_and_peaked(g, d)
    reached = 0.0
    for a in (spread, peaked):
        for b in (a + 0.01 * torch.randn(300, d, generator=g, dtype=torch.float64), a.clone(), torch.randn(300, d, generator=g, dtype=torch.float64)):
            x, y = CosineSide(a, torch.int8), CosineSide(b, torch.int8)
            screened = _int8_product(x.screen, y.packed(0), y.weight_step).double() * (x.step / x.block)[:, None]
            dx, dy = x.rounding[:, None], y.weight_rounding[None]
            bound = dx + dy + dx * dy + int8_errors(d)
            share = (screened - x.unit @ y.unit.mT).abs() / bound
            assert (share <= 1).all()
            assert (bound <= screen_error(torch.int8, d)).all()
            reached = max(reached, float(share.max()))
    assert reached > 0.1


def test_int8_rows_take_exactly_the_candidates_within_their_margin():
    """`compiled_nearest.nearest_int8`: a row's screened cosines are its float32 products times its factor; the
    candidates are those at or above the largest less the margin (twice |dx| + |dy| + |dx||dy| + `int8_errors`):
    the value just at that floor is compared in float64 and wins, the one just below is not compared though its
    float64 cosine is the largest; a row whose only candidate is its best takes it."""
    import numpy as np

    from xlsub.similarity import compiled_nearest
    from xlsub.similarity.retrieval import int8_errors, screen_error

    d, factor, dx, dy = 4, 0.5, 0.005, 0.006  # within the worst case's roundings at d = 4, sqrt(d) / 126 and sqrt(d) / 254
    accumulation, worst = int8_errors(d), screen_error(torch.int8, d)
    margin = 2 * (dx + dy + dx * dy + accumulation)
    assert margin < 2 * worst
    best = 0.75  # screened cosine best * factor
    below, at = _representable((best * factor - margin) / factor, torch.float32)  # factor a power of two: exact
    assert below < best - margin / factor <= at
    cosines = torch.tensor([0.3, 0.4, 0.9, 0.1], dtype=torch.float64)
    y_unit = torch.stack([cosines, (1 - cosines**2).sqrt(), torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)], 1)
    x_unit = torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 2, dtype=torch.float64)
    screened = torch.tensor([[best, at, below, -0.5], [best, below, below, -0.5]], dtype=torch.float32)
    out = np.empty(2, dtype=np.int64)
    zeros, ones, no_stage = np.zeros(d), np.ones(4), np.empty((0, d), np.float32)
    compiled_nearest.nearest_int8(screened.numpy(), x_unit.numpy(), zeros, ones[:2], np.full(2, factor), y_unit.numpy(), zeros, ones,
                                  no_stage, np.full(2, dx), dy, accumulation, worst, 0.0, 0, 2, out)
    assert out.tolist() == [1, 0]
    screened[0, 1] = below  # the same value one step lower is no longer a candidate: the screened best answers
    compiled_nearest.nearest_int8(screened.numpy(), x_unit.numpy(), zeros, ones[:2], np.full(2, factor), y_unit.numpy(), zeros, ones,
                                  no_stage, np.full(2, dx), dy, accumulation, worst, 0.0, 0, 1, out)
    assert out[0] == 0


def test_int8_float32_stage_keeps_exactly_the_candidates_within_its_margin():
    """`nearest_int8` with y's float32 unit rows: a row with more than `STAGED` screening candidates compares in float64
    only those whose float32 dot product lies at or above the largest less `margin32`: the value just at that floor is
    compared and wins, the one just below is not though its float64 cosine is the largest; with `STAGED` candidates or
    fewer there is no float32 stage and the float64 best answers."""
    import numpy as np

    from xlsub.similarity import compiled_nearest
    from xlsub.similarity.retrieval import int8_errors, screen_error

    d, m = 4, compiled_nearest.STAGED + 2
    margin32 = 2 * screen_error(torch.float32, d)
    below, at = _representable(0.5 - margin32, torch.float32)
    assert below < 0.5 - margin32 <= at
    cosines = torch.tensor([0.3, 0.8, 0.9] + [0.1] * (m - 3), dtype=torch.float64)  # float64: column 2 best, then 1
    y_unit = torch.zeros(m, d, dtype=torch.float64)
    y_unit[:, 0], y_unit[:, 1] = cosines, (1 - cosines**2).sqrt()
    y32 = np.zeros((m, d), np.float32)
    y32[:, 0] = [0.5, at, below] + [0.25] * (m - 3)  # float32 dot products with x = e_1: column 0 the largest
    x_unit = np.array([[1.0, 0.0, 0.0, 0.0]])
    zeros, ones, out = np.zeros(d), np.ones(m), np.empty(1, np.int64)

    def nearest(screened_row: list[float], stage: np.ndarray) -> int:
        screened = np.array([screened_row], np.float32)  # every value a candidate: equal screened cosines
        compiled_nearest.nearest_int8(screened, x_unit, zeros, ones[:1], np.ones(1), y_unit.numpy(), zeros, ones, stage, np.zeros(1), 0.0,
                                      int8_errors(d), screen_error(torch.int8, d), margin32, 0, 1, out)
        return int(out[0])

    assert nearest([0.6] * m, y32) == 1  # column 2 fell below the float32 floor; of 0 and 1, float64 picks 1
    y32[2, 0] = at
    assert nearest([0.6] * m, y32) == 2  # at the floor it is compared in float64 and wins
    y32[2, 0] = below
    assert nearest([0.6] * m, np.empty((0, d), np.float32)) == 2  # no float32 rows: no stage
    assert nearest([0.6] * compiled_nearest.STAGED + [-0.9] * (m - compiled_nearest.STAGED), y32) == 2  # STAGED candidates: no stage


@pytest.mark.parametrize("d", [3, 5, 8, 24, 100])
def test_int8_retrieval_equals_float64_at_any_width(d):
    """The int8 screen's answers are float64's at widths with blocks of 1 (no mixing: odd d) to 8 and at d = 100 (block
    4, 25 blocks), with exact copies (ties), near copies (within the screen's margin), rows concentrated on one
    coordinate and a zero row on each side once centred (all its cosines 0: a tie, -1; a column of zeros for the
    other side). Integer values, each language's column sums 0: the means are exact in any order of summation."""
    from xlsub.similarity.retrieval import CosineSide, nearest_translation

    int8_screen()
    g = torch.Generator().manual_seed(d)
    x = torch.randint(-20, 21, (3, 90, d), generator=g).double()
    y = 3 * x + torch.randint(-25, 26, (3, 90, d), generator=g).double()
    y[:, 10:20] = y[:, 20:30]
    y[:, 10:20, 0] += 1  # near copies
    y[:, 30] = y[:, 31]  # a copy: ties for the rows nearest to it
    x[:, 40:45, 0] *= 50  # most of their length on one coordinate
    for side in (x, y):
        side[:, 5] = 0
        side[:, 6] -= side.sum(1)  # column sums 0: the mean is 0 and row 5 stays zero once centred
    found = nearest_translation(x, CosineSide(y, torch.int8))
    torch.testing.assert_close(found, float64_nearest(x, y), rtol=0, atol=0)
    assert (found[:, 5] == -1).all() and (found >= 0).sum() > 200


def test_int8_screen_is_chosen_only_where_exact(monkeypatch):
    """`_int8_exact` checks oneDNN's products against integer ones (a product off by one fails it); without it, and
    without bfloat16, the CPU screens in float32. A side serving as x is refused as y, and the roles are checked."""
    from xlsub.similarity import retrieval

    int8_screen()
    real = retrieval._int8_product
    monkeypatch.setattr(retrieval, "_int8_product", lambda *args: real(*args).add_(1))
    assert retrieval._int8_exact.__wrapped__() is False
    monkeypatch.setattr(retrieval, "_int8_product", real)
    assert retrieval._int8_exact.__wrapped__() is True
    monkeypatch.setattr(retrieval, "_int8_exact", lambda: False)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert retrieval._screen_dtype(torch.device("cpu")) is torch.float32
    x = torch.randn(20, 8)
    with pytest.raises(ValueError, match="serve"):
        retrieval.nearest_translation(x, retrieval.CosineSide(x, torch.int8, "x"))
    with pytest.raises(ValueError, match="serves"):
        retrieval.CosineSide(x, torch.int8, "z")
    with pytest.raises(ValueError, match="CPU's compiled loops only"):
        retrieval.CosineSide(x.to("meta"), torch.int8)


def test_screen_margins_bound_each_rows_candidates():
    """Half of a row's `screen_margins` bounds |screened - float64| of every entry within the worst-case margin of
    the row's screened best, on spread and peaked rows (where rounding errors do not average out) against
    near copies, exact copies and independent rows, at the bfloat16 screen's own product. Two-sided: the errors
    reach more than 40% of the bound on peaked copies (a bound inflated 2.5-fold fails), and near chance the
    margin is well under the worst case's."""
    from xlsub.similarity.retrieval import CosineSide, screen_error, screen_margins, unit_rows

    g = torch.Generator().manual_seed(6)
    d = 384
    spread, peaked = spread_and_peaked(g, d)
    worst = screen_error(torch.bfloat16, d)
    reached, near_chance = 0.0, 1.0
    for a in (spread, peaked):
        for b in (a + 0.01 * torch.randn(300, d, generator=g, dtype=torch.float64), a.clone(), torch.randn(300, d, generator=g, dtype=torch.float64)):
            x, y = CosineSide(a, torch.bfloat16), CosineSide(b, torch.bfloat16)
            assert torch.equal(x.screen, x.unit.to(torch.bfloat16))  # the compiled rounding is torch's, value for value
            torch.testing.assert_close(x.rounding, torch.linalg.vector_norm(x.screen.double() - x.unit, dim=-1), rtol=1e-13, atol=0)
            torch.testing.assert_close(x.unit, unit_rows(a, True), rtol=0, atol=1e-15)
            screened, exact = (x.screen @ y.screen.mT).double(), x.unit @ y.unit.mT
            best = screened.amax(-1)
            margins = screen_margins(best, x.rounding, y.rounding.amax(), torch.bfloat16, d)
            assert (margins <= 2 * worst).all()
            candidate = screened >= best[:, None] - 2 * worst
            share = ((screened - exact).abs() / (margins[:, None] / 2))[candidate]
            assert (share <= 1).all()
            reached = max(reached, float(share.max()))
            near_chance = min(near_chance, float(margins.mean() / (2 * worst)))
    assert reached > 0.4
    assert near_chance < 0.45  # independent rows: the measured rounding and a best near chance


# -- RSA's Mantel test: the exact mean and sd of r on the centred rank matrices -----------------------------------

def test_mantel_tail_bound_against_the_full_test():
    from xlsub.similarity.rsa import mantel_test

    g = torch.Generator().manual_seed(5)
    n, d, n_perm = 400, 16, 100
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    ys = torch.stack([x + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64),  # shares x: decided
                      torch.randn(n, d, generator=g, dtype=torch.float64),  # independent: all permutations
                      x + 0.4 * torch.randn(n, d, generator=g, dtype=torch.float64)])
    groups = torch.randint(0, 20, (n,), generator=g)
    bounded = mantel_test(x, ys, n_perm, 1, groups, tail_risk=0.005, pilot=30)
    full = mantel_test(x, ys, n_perm, 1, groups)
    assert bounded.tail_bound.tolist() == [True, False, True]
    torch.testing.assert_close(bounded.observed, full.observed, rtol=0, atol=0)
    # decided: the full test's count is 0 too, so the same p, the floor
    assert bounded.p_value[[0, 2]].tolist() == full.p_value[[0, 2]].tolist() == [1 / (n_perm + 1)] * 2
    # their null mean and sd are the exact ones: within sampling error of the 100 permutations' own
    assert bounded.null[[0, 2]].isnan().all()  # not one permutation computed
    spread = full.null[[0, 2]].std(-1)
    assert ((bounded.null_mean[[0, 2]] - full.null[[0, 2]].mean(-1)).abs() < 4 * spread / math.sqrt(n_perm)).all()
    assert ((bounded.null_std[[0, 2]] / spread - 1).abs() < 0.3).all()
    # undecided: every number is the full test's
    assert float(bounded.p_value[1]) == float(full.p_value[1])
    torch.testing.assert_close(bounded.null[1], full.null[1], rtol=0, atol=1e-12)
    assert float(bounded.null_mean[1]) == pytest.approx(float(full.null_mean[1]), abs=1e-15)


def test_a_reference_computed_once_gives_the_same_test():
    """`null_sides` of x passed as `reference` (the tables test one reference against every language): the same
    p, null mean and decisions as computing x's side inside; a reference of the wrong length is refused."""
    from xlsub.similarity.permutation import null_sides

    layers = [pair(600, 16, s, 11) for s in (3.0, 0.0)]
    x, y = torch.stack([l[0] for l in layers]), torch.stack([l[1] for l in layers])
    groups = layers[0][2]
    inside = cka_permutation_test(x, y, 100, 2, "debiased", groups, tail_risk=0.005, stop_after=10)
    given = cka_permutation_test(x, y, 100, 2, "debiased", groups, tail_risk=0.005, stop_after=10, reference=null_sides(x, "debiased", groups))
    for name in ("p_value", "null_mean", "null_std", "tail_bound", "stopped"):
        torch.testing.assert_close(getattr(given, name), getattr(inside, name), rtol=0, atol=0)
    assert bool(inside.tail_bound[0]) and not bool(inside.tail_bound[1])
    partial = inside.tail_bound | inside.stopped  # their null mean is the exact one, here from the summaries
    assert partial.all()
    torch.testing.assert_close(inside.null_mean[partial], cka_null_mean(x, y, "debiased", groups)[partial], rtol=1e-10, atol=1e-14)
    with pytest.raises(ValueError, match="reference"):
        cka_permutation_test(x, y, 100, 2, "debiased", groups, tail_risk=0.005, reference=null_sides(x[:1], "debiased", groups))


def test_the_exact_moments_bounds_by_hand():
    """With the exact sd: the one-term chi-square tail at the per-permutation level risk / n_perm (any exceedance)
    or the binomial level for 4 of 99 (a power analysis's detection); the sub-gamma tail with weight w decides
    from sqrt(2 x) sd + 2 w x, x = log(1 / level)."""
    from scipy import optimize

    n_perm, risk = 99, 0.005
    level = optimize.brentq(lambda q: stats.binom.sf(3, n_perm, q) - risk, 0.0, 1.0)
    assert stats.binom.sf(3, n_perm, level) == pytest.approx(risk)
    for exceedances, per_perm in ((1, risk / n_perm), (4, level)):
        z_chi2 = (stats.chi2.isf(per_perm, 1) - 1) / math.sqrt(2)
        at = torch.tensor([z_chi2 * 1.0001, z_chi2 * 0.9999])
        sd, none = torch.ones(2), torch.empty(2, 0)
        decided = tail_bound_decided(at, torch.zeros(2), none, n_perm, risk, exact_sd=sd, exceedances=exceedances)
        assert decided.tolist() == [True, False]
        x, w = math.log(1 / per_perm), 0.05
        z_gamma = math.sqrt(2 * x) + 2 * w * x
        assert z_gamma < z_chi2 * 0.9999  # a small largest weight: the sub-gamma tail decides earlier
        at = torch.tensor([z_gamma * 1.0001, z_gamma * 0.9999])
        decided = tail_bound_decided(at, torch.zeros(2), none, n_perm, risk, exact_sd=sd, exact_weight=torch.full((2,), w),
                                     exceedances=exceedances)
        assert decided.tolist() == [True, False]


@pytest.mark.parametrize("path", ["compiled", "torch"])
def test_retrieval_of_no_layers_is_empty_in_both_paths(monkeypatch, path):
    """Encodings with an empty leading axis (no layers) have no answers, [0, n] (broadcast against a single layer too),
    in the compiled loops and in torch's path alike, and a side of no layers prepares without error."""
    from xlsub.similarity import retrieval

    if path == "torch":  # as on a GPU, which screens in float32
        monkeypatch.setattr(retrieval, "_compiled", lambda x, dtype: False)
        monkeypatch.setattr(retrieval, "_screen_dtype", lambda device: torch.float32)
    empty, one = torch.randn(0, 5, 4), torch.randn(5, 4)
    assert retrieval.CosineSide(empty).rounding.shape == (0, 5)
    for x, y, shape in ((empty, empty, (0, 5)), (empty, one, (0, 5)), (torch.randn(2, 0, 5, 4), one, (2, 0, 5))):
        found = retrieval.nearest_translation(x, y)
        assert found.shape == shape and found.dtype == torch.long
    assert retrieval.nearest_translation(torch.randn(2, 5, 4), one).shape == (2, 5)  # and a real one still answers


def test_float32_stage_dot_products_within_float32s_screen_error():
    """The float32 stage's operands and sums (`compiled_nearest.unit_float32`, `_dot32`, summed in whatever order the
    compiler vectorises) against float64: unit rows rounded to float32 as torch rounds them, and every dot product of
    spread and of peaked unit rows within `screen_error(float32, d)` of the float64 cosine, at a d that is not a
    multiple of the vector width."""
    import numpy as np

    from xlsub.similarity import compiled_nearest
    from xlsub.similarity.retrieval import screen_error, unit_rows

    g = torch.Generator().manual_seed(5)
    d = 389
    for rows in spread_and_peaked(g, d):
        x = rows.float()
        mean = x.double().mean(0)
        scale = 1 / (x.double() - mean).norm(dim=1)
        out = np.empty(tuple(x.shape), np.float32)
        compiled_nearest.unit_float32(x.numpy(), mean.numpy(), scale.numpy(), 0, len(x), out)
        unit = (x.double() - mean) * scale[:, None]
        assert np.array_equal(out, unit.float().numpy())
        exact = unit @ unit.mT
        worst = max(abs(float(compiled_nearest._dot32(out[i], out[j])) - float(exact[i, j])) for i in range(len(x)) for j in range(len(x)))
        assert 0 < worst <= screen_error(torch.float32, d), worst
        assert torch.allclose(unit, unit_rows(x, True), atol=1e-12)


@pytest.mark.parametrize("screen", [torch.bfloat16, torch.float32])
def test_bfloat16_and_float32_loops_with_the_float32_stage_give_float64s_answers(screen):
    """`_compiled_rows` given y's float32 unit rows (the stage retrieval itself gives only the int8 screen): the same
    answers as float64's on rows with exact copies (ties) and copies within float32's margin, where the stage must keep
    every candidate that can win or tie."""
    from xlsub.similarity import compiled_nearest, retrieval

    g = torch.Generator().manual_seed(6)
    x = torch.randn(300, 24, generator=g, dtype=torch.float64)
    y = x + 0.8 * torch.randn(300, 24, generator=g, dtype=torch.float64)
    y[200:206] = y[10:11]  # six exact copies of row 10: x[10]'s answer a tie
    y[206:300] = y[20:22].repeat_interleave(47, 0) + 3e-8 * torch.randn(94, 24, generator=g, dtype=torch.float64)  # within float32's margin
    xs, ys = retrieval.CosineSide(x, screen), retrieval.CosineSide(y, screen)
    expected = float64_nearest(x, y)
    screened = xs.screen @ ys.screen.mT
    for y32 in (ys.unit32(0), None):
        out = torch.empty(300, dtype=torch.long)
        retrieval._compiled_rows(screened, (xs.rows, xs.mean, xs.scale), (ys.rows, ys.mean, ys.scale), xs.rounding, float(ys.rounding.max()),
                                 out, y32)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert expected[10] == -1 and compiled_nearest.STAGED < 7  # x[10] has seven candidates: the stage ran
