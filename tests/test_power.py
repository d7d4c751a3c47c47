"""The power analysis (xlsub.similarity.power): Besag & Clifford's sequential test against the full test, the
Wilson interval, power at the two ends of the signal-to-noise scale, the bisection and the power table."""

from __future__ import annotations

import math

import pytest
import scipy.stats
import torch

from xlsub.similarity.cka import cka, prepare
from xlsub.similarity.controls import planted_representations
from xlsub.similarity.permutation import FLOAT32_RECHECK, cka_permutation_test, permutations, permuted_cka
from xlsub.similarity.power import (
    MEASURES,
    TAIL_RISK,
    Power,
    bisect_power,
    cka_extreme,
    draw_seed,
    measure_extreme,
    planted_cka_terms,
    planted_power,
    power_curve,
    sequential_test,
    stop_count,
)
from xlsub.similarity.retrieval import retrieval_permutation_test
from xlsub.similarity.rsa import mantel_test
from xlsub.stats.inference import wilson_interval

N, D = 72, 12


def base(seed: int = 0) -> torch.Tensor:
    """Sentence vectors with a few dominant directions, as a trained encoder's are."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, 3, generator=g, dtype=torch.float64) @ torch.randn(3, D, generator=g, dtype=torch.float64) \
        + 0.3 * torch.randn(N, D, generator=g, dtype=torch.float64)


def groups() -> torch.Tensor:
    """Source token counts: 9 lengths, 8 sentences each (the length-restricted null permutes within them)."""
    return torch.arange(N) % 9 + 4


def test_stop_count_is_where_p_below_alpha_becomes_impossible():
    assert stop_count(99, 0.05) == 4  # p = 5 / 100 is not below 0.05; 4 / 100 is
    assert stop_count(999, 0.05) == 49 and stop_count(199, 0.01) == 1
    for n_perm, alpha in ((99, 0.05), (999, 0.05), (199, 0.01), (19, 0.05)):
        h = stop_count(n_perm, alpha)
        assert (h + 1) / (n_perm + 1) >= alpha > h / (n_perm + 1)


@pytest.mark.parametrize("k, n", [(0, 50), (2, 50), (40, 50), (50, 50), (17, 120)])
def test_wilson_interval_of_a_power_estimate(k, n):
    ci = scipy.stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson_interval(k, n) == pytest.approx((ci.low, ci.high), abs=1e-9)


def test_spearman_matrix_is_the_mantel_tests_bit_for_bit():
    from xlsub.similarity.power import spearman_matrix
    from xlsub.similarity.rsa import rdm
    from xlsub.stats.inference import centred_upper

    d = rdm(torch.randn(3, 30, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    assert torch.equal(spearman_matrix(d), centred_upper(d, "spearman"))
    tied = rdm(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]], dtype=torch.float64))  # ties: average ranks
    assert torch.equal(spearman_matrix(tied), centred_upper(tied, "spearman"))


def test_sequential_test_counts_a_stream_by_hand():
    """Each 'permutation' is its index in a 0/1 stream of exceedances: a draw stops at its 4th one; a draw with
    at most 3 in 99 is detected, (k + 1) / 100 < 0.05."""
    g = torch.Generator().manual_seed(1)
    rates = torch.tensor([0.0, 0.01, 0.02, 0.03, 0.05, 0.2, 0.5, 0.9])
    stream = torch.rand(len(rates), 99, generator=g) < rates[:, None]
    stream[1, [3, 90]] = True  # 2 + chance
    result = sequential_test(lambda draws, block: stream[draws][:, block[:, 0]], len(rates), torch.arange(99)[:, None])
    totals = stream.sum(1)
    assert torch.equal(result.detected, (totals + 1) / 100 < 0.05)
    for j in range(len(rates)):
        hits = stream[j].nonzero().reshape(-1)
        if len(hits) >= 4:  # stopped at its 4th exceedance, with the Besag-Clifford p = h / l
            assert (result.exceed[j], result.used[j]) == (4, hits[3] + 1)
            assert result.p_value[j] == pytest.approx(4 / float(hits[3] + 1))
        else:
            assert (result.exceed[j], result.used[j]) == (len(hits), 99)
            assert result.p_value[j] == pytest.approx((len(hits) + 1) / 100)
    # the blocks grow from 4 (the fewest that can stop a draw), each as large as all before it, up to the batch; any
    # blocks give the same result, and the growing ones compute fewer (draw, permutation) values than blocks of 20
    asked = []

    def recorded(draws, block):
        asked.append((len(draws), len(block)))
        return stream[draws][:, block[:, 0]]

    grown = sequential_test(recorded, len(rates), torch.arange(99)[:, None])
    assert [size for _, size in asked] == [4, 4, 8, 16, 20, 20, 20, 7][:len(asked)]
    computed = sum(d * b for d, b in asked)
    for batch in (1, 7, 99):
        other = sequential_test(lambda draws, block: stream[draws][:, block[:, 0]], len(rates), torch.arange(99)[:, None], batch=batch)
        assert all(torch.equal(getattr(other, f), getattr(grown, f)) for f in ("exceed", "used", "detected"))
    fixed = 0
    active = [j for j in range(len(rates))]
    for start in range(0, 99, 20):  # the old fixed blocks of 20, by hand: a draw is computed to the end of its stopping block
        fixed += len(active) * len(range(start, min(99, start + 20)))
        active = [j for j in active if grown.used[j] > start + 20 or grown.exceed[j] < 4]
    assert computed < fixed


@pytest.mark.parametrize("measure", MEASURES)
def test_sequential_decision_is_the_full_tests_on_the_same_permutations(measure):
    """Draws around the detection threshold, with the same 99 permutations the verdicts' tests draw from
    that seed: the early-stopped decision equals p < 0.05 of cka_permutation_test, mantel_test and
    retrieval_permutation_test, and a draw that ran to the end has the full test's count."""
    x = planted_representations(base(), ["reference"], math.inf, 0, rotate=False)["reference"]
    snrs = [0.0, 0.02, 0.05, 0.1, 0.2, 0.4, 1.0, 3.0] if measure != "retrieval" else [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0]
    ys = torch.stack([planted_representations(base(), ["planted"], snr, j, rotate=measure != "retrieval")["planted"]
                      for j, snr in enumerate(snrs)])
    seed, g = 7, groups()
    result = sequential_test(measure_extreme(measure, x, ys), len(ys), permutations(N, 99, seed, g))
    for j, y in enumerate(ys):
        if measure == "cka":
            full = cka_permutation_test(x, y, 99, seed, "debiased", groups=g)
        elif measure == "rsa":
            full = mantel_test(x, y, 99, seed, g)
        else:
            full = retrieval_permutation_test(x, y, 99, seed, g)
        assert bool(result.detected[j]) == bool(full.p_value < 0.05), (j, float(full.p_value))
        if result.used[j] == 99:
            assert float(result.p_value[j]) == pytest.approx(float(full.p_value))
        else:
            assert float(full.p_value) >= 0.05
    assert result.detected.any() and not result.detected.all()
    assert int(result.used.sum()) < 99 * len(ys)  # the undetectable draws stopped early
    # with the tail bound (CKA, RSA), the draws it decides are detected by the full test too, and the rest unchanged
    extreme = measure_extreme(measure, x, ys, tail=(g, 99, TAIL_RISK, 0.05))
    bounded = sequential_test(extreme, len(ys), permutations(N, 99, seed, g), decided=extreme.decided)
    assert torch.equal(bounded.detected, result.detected)
    if measure != "retrieval":
        assert extreme.decided.any() and (bounded.used[extreme.decided] == 0).all()
        assert torch.equal(bounded.used[~extreme.decided], result.used[~extreme.decided])
    if measure == "cka":  # a reference of each draw's own (the length-only control's pairs): each pair's full test
        xs = x + 0.3 * torch.randn(ys.shape, generator=torch.Generator().manual_seed(5), dtype=ys.dtype)
        own = sequential_test(cka_extreme(xs, ys), len(ys), permutations(N, 99, seed, g))
        for j in range(len(ys)):
            full = cka_permutation_test(xs[j], ys[j], 99, seed, "debiased", groups=g)
            assert bool(own.detected[j]) == bool(full.p_value < 0.05)
            if own.used[j] == 99:
                assert float(own.p_value[j]) == pytest.approx(float(full.p_value))
        assert own.detected.any() and not own.detected.all()


@pytest.mark.parametrize("measure", MEASURES)
def test_power_is_one_without_noise_and_alpha_without_signal(measure):
    """snr = inf: every draw detected. snr = 0: the partner is independent noise, so at the length-restricted
    null a draw is detected with probability 4 / 100 (k <= 3 of 99 exchangeable null values; retrieval's
    ties make it at most that), within Monte Carlo error."""
    strong = planted_power(measure, base(), math.inf, groups(), draws=20, seed=0)
    assert (strong.power, strong.detected, strong.n_draws) == (1.0, 20, 20)
    # a detected draw sees every permutation, but where the exact null moments decide it (CKA, RSA): none
    assert strong.permutations == (0 if measure in ("cka", "rsa") else 20 * 99)
    null = planted_power(measure, base(), 0.0, groups(), draws=300, seed=1)
    sd = math.sqrt(0.04 * 0.96 / 300)
    assert null.power <= 0.04 + 3 * sd
    if measure != "retrieval":
        assert null.power >= 0.04 - 3 * sd
    assert null.lo <= null.power + 1e-12 and null.power <= null.hi + 1e-12 and (null.lo, null.hi) == pytest.approx(wilson_interval(null.detected, 300))
    assert null.permutations < 300 * 50  # most null draws stop within the first batch or two


@pytest.mark.parametrize("k, n_perm", [(1, 3), (2, 9), (40, 8), (97, 13)])
def test_permuted_cross_of_gram_matrices_compiled_and_torch_against_numpy(monkeypatch, k, n_perm):
    """sum_ij A_ij B_p(i)p(j) of symmetric float32 A and Bs with nonzero diagonals (Gram matrices, as PlantedCkaTerms'
    Gram engine passes them): the compiled loop on the CPU (rows split between the threads; permutation counts that do
    and do not fill its groups of 8), torch's path off the CPU and the small-k path, against numpy in float64, for all
    matrices and a selection of them, stacked or in a list."""
    import numpy as np

    from xlsub.stats import inference

    g = torch.Generator().manual_seed(k)

    def symmetric(m: int) -> torch.Tensor:
        half = torch.randn(m, k, k, generator=g)
        return half + half.mT

    a, bs = symmetric(1)[0], symmetric(3)
    perms = torch.stack([torch.randperm(k, generator=g) for _ in range(n_perm)])
    want = torch.from_numpy(np.array([[(a.double().numpy() * b.double().numpy()[np.ix_(p, p)]).sum() for p in perms.numpy()] for b in bs]))
    select = torch.tensor([2, 0])
    torch.testing.assert_close(inference.permuted_cross(a, bs, perms), want, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(inference.permuted_cross(a, bs, perms, select=select), want[select], rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(inference.permuted_cross(a, list(bs), perms, select=select), want[select], rtol=1e-12, atol=1e-9)  # a list
    monkeypatch.setattr(inference, "on_cpu", lambda values: False)  # the GPU's branch
    torch.testing.assert_close(inference.permuted_cross(a, bs, perms), want, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(inference.permuted_cross(a, bs, perms, select=select), want[select], rtol=1e-12, atol=1e-9)


def test_planted_engine_takes_gram_space_where_n_is_well_below_d_squared():
    from xlsub.similarity.power import planted_engine

    assert planted_engine(5_000, 768) == "gram"  # the study's size
    assert planted_engine(1_077, 128) == "feature"  # the demo's: d^2 / n = 15
    assert planted_engine(20_000, 4_096) == "feature"  # the Gram matrices would not fit GRAM_BYTES
    assert planted_engine(72, 12, "gram") == "gram"
    with pytest.raises(ValueError, match="engine must be one of"):
        planted_engine(72, 12, "fast")


@pytest.mark.parametrize("engine", ["feature", "gram"])
@pytest.mark.parametrize("kind", ["debiased", "linear"])
def test_planted_cka_terms_give_the_null_of_every_level(kind, engine):
    """PlantedCkaTerms' null of a draw at any level (from six scalars per draw and permutation, computed once, by
    either engine) is permuted_cka in float64 of that level's planted partner under the chunk's permutations, to
    float32 rounding within the recheck distance (FLOAT32_RECHECK of the observed CKA) and of the feature engine's
    float32 null's size; the chunk's permutations are its first seed's."""
    terms = planted_cka_terms(base(), groups(), kind, n_perm=99, engine=engine)
    assert terms.engine == engine
    x = planted_representations(base(), ["reference"], math.inf, 0, rotate=False)["reference"]
    seeds = [draw_seed(3, j) for j in range(4)]
    assert torch.equal(terms.perms(seeds), permutations(N, 99, seeds[0], groups()))
    block = torch.tensor([0, 5, 17, 98, 40])
    for snr in (1e-3, 0.1, 3.0, math.inf):
        ys = torch.stack([planted_representations(base(), ["planted"], snr, s, rotate=False)["planted"] for s in seeds])
        assert all(torch.equal(terms.partner(s, snr), y) for s, y in zip(seeds, ys))  # the draws themselves, bit for bit
        # the observed CKA and HSIC(L, L) of every draw from the terms kept per draw, against the draws' own in float64
        from_terms, self_y, total_y = terms.observed(seeds, snr)
        assert from_terms == pytest.approx(torch.stack([cka(x, y, kind) for y in ys]), rel=1e-12, abs=0)
        assert self_y == pytest.approx(torch.stack([prepare(y, kind)["self"] for y in ys]), rel=1e-12, abs=0)
        if kind == "debiased":
            assert total_y == pytest.approx(torch.stack([prepare(y, kind)["total"] for y in ys]), rel=1e-12, abs=0)
        if math.isinf(snr):
            continue
        level_observed, null = terms.level(seeds, snr)
        assert torch.equal(level_observed, from_terms)
        got = null(torch.tensor([0, 2, 3]), block)
        want = torch.stack([permuted_cka(x, ys[j], terms.perms(seeds)[block], kind) for j in (0, 2, 3)])
        observed = torch.stack([cka(x, ys[j], kind) for j in (0, 2, 3)])
        float32_null = torch.stack([permuted_cka(x, ys[j], terms.perms(seeds)[block], kind, precision="float32") for j in (0, 2, 3)])
        assert (got - want).abs().max() <= FLOAT32_RECHECK * observed.abs().min()
        assert (got - want).abs().max() <= 10 * (float32_null - want).abs().max()  # as close as the feature engine's float32 null
    if engine == "feature":
        assert terms.products == 5 * (1 + len(seeds)) and terms.grams == 0  # each permutation once, for the reference and every draw
    else:
        assert terms.products == 0 and terms.grams == 99 * len(seeds)  # every permutation of the chunk at its first use


def test_the_gram_engine_decides_every_level_as_the_feature_engine():
    """Planted CKA draws tested on terms from either engine, level by level with the terms shared across levels: the
    same detections and draws at every level, near the detection limit too (the Gram engine computes every
    permutation and needs no tail bound, so it may evaluate more permutations)."""
    engines = {engine: planted_cka_terms(base(), groups(), "debiased", n_perm=99, engine=engine) for engine in ("feature", "gram")}
    decided = {engine: [] for engine in engines}
    for snr in (1e-3, 0.03, 0.1, 0.3, 3.0):
        for engine, terms in engines.items():
            level = planted_power("cka", base(), snr, groups(), draws=20, seed=4, terms=terms)
            decided[engine].append((level.n_draws, level.detected))
    assert decided["gram"] == decided["feature"]
    assert {detected for _, detected in decided["gram"]} - {0, 20}  # a level where some draws are detected and some not


def test_power_curve_shares_ckas_terms_across_levels_with_the_same_decisions():
    """CKA's power curve with terms kept for every level: the same levels and detections as testing each level
    afresh. A draw whose chunk's terms are all computed takes its permutations rather than the tail bound, so it may
    evaluate more of them; where no chunk is complete (every level far above the limit) the tail bound decides
    every draw, as afresh."""
    levels, limit = power_curve("cka", base(), groups(), draws=20, seed=2, bracket=(1e-3, 10.0), bisections=3)
    fresh, fresh_limit = bisect_power(lambda snr: planted_power("cka", base(), snr, groups(), draws=20, seed=2, target=0.8), (1e-3, 10.0), 3)
    assert [(level.snr, level.n_draws, level.detected) for level in levels] == [(level.snr, level.n_draws, level.detected) for level in fresh]
    assert limit == fresh_limit or math.isnan(limit) and math.isnan(fresh_limit)
    assert all(level.permutations >= old.permutations for level, old in zip(levels, fresh))
    assert any(level.permutations > old.permutations for level, old in zip(levels, fresh))  # a level after its chunks were computed
    assert 0 < sum(level.permutations for level in levels)
    assert any(0 < level.power < 1 for level in levels)  # the bracket crosses the limit: draws run their permutations
    strong, _ = power_curve("cka", base(), groups(), draws=20, seed=2, bracket=(1e3, 1e4), bisections=2)
    assert [level.power for level in strong] == [1.0] * len(strong) and [level.permutations for level in strong] == [0] * len(strong)


@pytest.mark.parametrize("per_chunk, used", [(10, 30), (0, 10), (5, 20), (8, 50)])
def test_a_level_stops_drawing_once_its_side_of_the_target_is_settled(per_chunk, used):
    """With the bisection's target, draws stop after a chunk once the Wilson interval at 1 - 0.05 / 5 (five looks
    at 50 draws in chunks of 10) excludes 0.8: all detected settles above at 30 (30 / (30 + 2.576^2) = 0.819),
    none below at 10, half below at 20; 8 of 10 never settles. Without a target every draw is used."""
    from xlsub.similarity.power import Sequential, detection_rate

    def test(seeds):
        m = len(seeds)
        detected = torch.arange(m) < per_chunk
        return Sequential(torch.zeros(m, dtype=torch.long), torch.full((m,), 99), 99, detected)

    stopped = detection_rate(test, 50, 0, 1.0, 10, target=0.8)
    assert (stopped.n_draws, stopped.detected) == (used, used * per_chunk // 10)
    assert (stopped.lo, stopped.hi) == pytest.approx(wilson_interval(stopped.detected, used))
    assert detection_rate(test, 50, 0, 1.0, 10).n_draws == 50
    z = scipy.stats.norm.ppf(1 - 0.05 / 10)
    assert 30 / (30 + z * z) > 0.8 > 20 / (20 + z * z)  # the settling point of the all-detected stream, by hand


def fake_power(crossing: float, tested: list):
    """A monotone power curve in log SNR crossing 0.8 at `crossing`; records the levels asked for."""
    def power_at(snr: float) -> Power:
        tested.append(snr)
        p = 1 / (1 + math.exp(-(math.log(snr / crossing) + math.log(4))))  # 0.8 at the crossing
        return Power(snr, 50, round(50 * p), p, max(0.0, p - 0.1), min(1.0, p + 0.1), 0)
    return power_at


def test_bisection_on_log_snr_finds_the_crossing():
    tested: list = []
    levels, limit = bisect_power(fake_power(0.02, tested), (1e-4, 1.0), bisections=4)
    # by hand, on the grid 10^(-4 + k/4): 1e-2 (0.67, below), 1e-1 (above), 10^-1.5 (0.86, above), 10^-1.75 (0.78, below)
    assert tested == pytest.approx([1e-2, 1e-1, 10 ** -1.5, 10 ** -1.75]) and len(tested) <= 4 + 1
    assert [level.snr for level in levels] == sorted(tested)
    assert limit == pytest.approx(10 ** -1.5) and limit == min(level.snr for level in levels if level.power >= 0.8)
    # the resolution of 4 bisections of the bracket: the crossing lies within a factor 1e4^(1/16) below the limit
    assert 0.02 <= limit < 0.02 * 1e4 ** (1 / 16)


@pytest.mark.parametrize("crossing", [3e-4, 7e-3, 0.2, 0.9])
def test_bisection_brackets_any_crossing_to_one_step(crossing):
    tested: list = []
    _, limit = bisect_power(fake_power(crossing, tested), (1e-4, 1.0), bisections=4)
    assert crossing <= limit < crossing * 1e4 ** (1 / 16) and len(tested) <= 5
    step_below = limit / 1e4 ** (1 / 16)
    assert any(snr == pytest.approx(step_below) for snr in tested)  # the level one step below was tested: below 0.8


@pytest.mark.parametrize("crossing", [3e-5, 3e-4, 7e-3, 0.2, 0.9, 5.0])
@pytest.mark.parametrize("start", [1e-4, 1e-3, 0.05, 1.0, "limit"])
def test_a_search_from_a_starting_level_finds_the_bisections_limit(crossing, start):
    """From any starting level (below, above, at the limit, at the bracket's ends) the same limit as the plain
    bisection on the same grid; from the limit itself two levels: it and the one step below it (one at the bracket's
    bottom); never more than twice the bisection's levels."""
    plain: list = []
    _, want = bisect_power(fake_power(crossing, plain), (1e-4, 1.0), bisections=4)
    tested: list = []
    begin = (want if math.isfinite(want) else 1.0) if start == "limit" else start
    levels, limit = bisect_power(fake_power(crossing, tested), (1e-4, 1.0), bisections=4, start=begin)
    assert limit == want or math.isnan(limit) and math.isnan(want)
    nearest = 10 ** (-4 + round((math.log10(begin) + 4) * 4) / 4)  # the grid level nearest the start, 10^(-4 + k/4)
    assert tested[0] == pytest.approx(nearest) and len(set(tested)) == len(tested) <= 2 * len(plain)
    assert [level.snr for level in levels] == sorted(tested)
    if start == "limit" and math.isfinite(want):
        assert len(tested) == (1 if want == 1e-4 else 2)


def test_bisection_when_the_bracket_holds_no_crossing():
    tested: list = []
    levels, limit = bisect_power(fake_power(5.0, tested), (1e-4, 1.0))
    assert math.isnan(limit) and tested[-1] == 1.0 and len(levels) == 5  # below 0.8 up to the bracket's top
    tested = []
    levels, limit = bisect_power(fake_power(1e-6, tested), (1e-4, 1.0))
    assert limit == 1e-4 and tested[-1] == 1e-4 and len(levels) == 4  # already 0.8 at the bottom


def test_power_table_columns_levels_and_the_length_only_control():
    from xlsub.report.similarity_tables import power_table

    lengths = {"en": groups().double(), "de": (groups() + torch.arange(N) % 2).double()}
    table, limits = power_table(base(), lengths, "en", "debiased", draws=10, seed=0, bisections=1)
    flat = table.reset_index()
    assert list(flat.columns) == ["measure", "snr", "n_draws", "power", "power_lo", "power_hi"]
    assert set(limits) == set(MEASURES)
    assert list(dict.fromkeys(flat["measure"])) == ["cka", "cka (length-only)", "rsa", "retrieval", "retrieval (length-only)"]
    assert (flat["n_draws"] == 10).all()
    assert (flat["power_lo"] <= flat["power"] + 1e-12).all() and (flat["power"] <= flat["power_hi"] + 1e-12).all()
    for measure in MEASURES:
        rows = flat[flat["measure"] == measure]  # one bisection: the levels 1e-4, 1e-2, 1, at most 2 of them tested
        assert rows["snr"].is_monotonic_increasing and len(rows) == 2
        assert all(min(abs(math.log10(snr) - e) for e in (-4, -2, 0)) < 1e-12 for snr in rows["snr"])
        reached = rows.loc[rows["power"] >= 0.8, "snr"]
        assert limits[measure] == reached.min()
        assert rows["power"].iloc[0] < 0.8 or rows["snr"].iloc[0] == 1e-4
    assert flat.loc[flat["measure"].str.contains("length-only"), "snr"].isna().all()
    # the same draws again: the same table
    again, _ = power_table(base(), lengths, "en", "debiased", draws=10, seed=0, bisections=1)
    assert again.equals(table)


def test_planted_cka_terms_keep_recent_chunks_noise_within_the_budget(monkeypatch):
    """A chunk's noise is made once while the recent chunks' fit in NOISE_BYTES, and again (the same terms) once evicted."""
    from xlsub.similarity import power

    def run(budget: int) -> tuple[list[int], torch.Tensor]:
        monkeypatch.setattr(power, "NOISE_BYTES", budget)
        terms = planted_cka_terms(base(), groups(), "debiased", n_perm=99)
        made, noise = [], terms.noise
        terms.noise = lambda seed: (made.append(seed), noise(seed))[1]
        first, second = [draw_seed(0, j) for j in range(3)], [draw_seed(0, j) for j in range(3, 6)]
        draws = torch.arange(3)
        terms.level(first, 0.1)[1](draws, torch.arange(10))
        terms.level(second, 0.1)[1](draws, torch.arange(10))
        return made, terms.level(first, 0.1)[1](draws, torch.arange(10, 30))

    kept, kept_null = run(2**29)
    assert kept == [draw_seed(0, j) for j in range(6)]  # each draw's noise made once
    evicted, evicted_null = run(1)  # only the latest chunk held: the first chunk's noise made again for its next fill
    assert evicted == kept + [draw_seed(0, j) for j in range(3)]
    assert torch.equal(kept_null, evicted_null)


def test_gram_engine_fills_the_upper_triangles_alone_where_the_compiled_sums_read_no_more(monkeypatch):
    """On the CPU the Gram engine writes each draw's two n x n matrices on and above the diagonal only, in blocks of
    rows (`GRAM_ROWS`), S as one product of twice the width: its terms are those of the whole matrices (the path taken
    where `permuted_cross` reads them whole) to float32 rounding, and the sums never read the unwritten lower triangles
    (NaN there changes nothing)."""
    from xlsub.similarity import power

    seeds = [draw_seed(5, j) for j in range(3)]

    def terms_of(upper: bool, rows: int, fill: float | None = None):
        monkeypatch.setattr(power, "permuted_cross_reads_upper", lambda a: upper)
        monkeypatch.setattr(power, "GRAM_ROWS", rows)
        if fill is not None:  # what the unwritten triangles hold
            real = torch.empty
            monkeypatch.setattr(torch, "empty", lambda *a, **k: real(*a, **k).fill_(fill) if k.get("dtype") == torch.float32 else real(*a, **k))
        terms = planted_cka_terms(base(), groups(), "debiased", n_perm=99, engine="gram")
        terms.perms(seeds)
        monkeypatch.undo()
        return terms._chunks[tuple(seeds)]

    whole = terms_of(False, 16)
    for rows in (16, 72, 500):
        upper = terms_of(True, rows, math.nan)
        assert torch.equal(upper["shared"], whole["shared"])  # the reference's own terms: the same matrix
        assert upper["draw"].isfinite().all()
        assert torch.allclose(upper["draw"], whole["draw"], rtol=1e-5, atol=1e-5 * whole["draw"].abs().max().item())
