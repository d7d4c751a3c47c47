"""URIEL language distances and their Mantel test, against independent computations: scipy's Spearman over
every permutation, lang2vec's own reader (with a stand-in for `pkg_resources`), Glottolog coordinates."""

from __future__ import annotations

import importlib
import importlib.util
import io
import logging
import math
import sys
import types
from itertools import permutations as all_permutations
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.spatial.distance import cosine
from scipy.stats import false_discovery_control, spearmanr

from tests.reference import linear_cka_gram
from tests.test_analysis import analyzed
from xlsub.artifacts import LANGUAGE_DISTANCE, LANGUAGE_DISTANCE_URIEL
from xlsub.artifacts import SubnetworkId as S
from xlsub.errors import XlsubError
from xlsub.report.analysis import AnalysisInputs
from xlsub.report.similarity_tables import Counts
from xlsub.similarity.permutation import permutations
from xlsub.stats.inference import mantel_test
from xlsub.stats.language_distance import (
    DISTANCE_KINDS,
    URIEL_CODES,
    distance_correlations,
    uriel_code,
    uriel_distances,
    uriel_locations,
)

EMBEDDED = ["en", "es", "ru", "de", "zh", "ar", "hi", "ur"]


def symmetric(k: int, seed: int, ties: bool = False) -> np.ndarray:
    values = np.random.default_rng(seed).random((k, k))
    if ties:
        values = np.round(values * 3) / 3  # few distinct values: many tied pairs
    values = (values + values.T) / 2
    np.fill_diagonal(values, 0.0)
    return values


def upper(m: np.ndarray) -> np.ndarray:
    i, j = np.triu_indices(len(m), 1)
    return m[i, j]


def mantel_spearman(x, y, n_perm: int = 1000, seed: int = 0, **options) -> tuple[float, float, int, bool]:
    """The language-distance call of the Mantel test (two-sided Spearman): r, p, permutations used, exact."""
    result = mantel_test(x, y, permutations(len(x), n_perm, seed), alternative="two-sided", **options)
    return float(result.observed), float(result.p_value), result.n_perm, result.test == "relabel_exact"


def brute_force_r(x: np.ndarray, y: np.ndarray, perm) -> float:
    """Spearman of x's upper triangle with that of y with its languages relabelled by perm."""
    p = list(perm)
    return spearmanr(upper(x), upper(y[np.ix_(p, p)])).statistic


# -- the Mantel test --------------------------------------------------------------------------------------

@pytest.mark.parametrize("ties", [False, True])
def test_exact_mantel_equals_spearman_over_every_permutation(ties):
    x, y = symmetric(5, 1, ties), symmetric(5, 2, ties)
    observed = spearmanr(upper(x), upper(y)).statistic
    null = np.array([brute_force_r(x, y, p) for p in all_permutations(range(5))])
    r, p, used, exact = mantel_spearman(x, y, n_perm=10)
    assert exact and used == 120
    assert r == pytest.approx(observed, abs=1e-12)
    assert p == pytest.approx(np.mean(np.abs(null) >= abs(observed) - 1e-12), abs=1e-12)


def test_sampled_mantel_equals_spearman_over_the_same_permutations():
    x, y = symmetric(6, 3), symmetric(6, 4)
    y += 0.5 * x  # some shared structure, so p is not near 1
    observed = spearmanr(upper(x), upper(y)).statistic
    drawn = permutations(6, 200, seed=7).numpy()
    null = np.array([brute_force_r(x, y, p) for p in drawn])
    r, p, used, exact = mantel_spearman(x, y, n_perm=200, seed=7, max_exact=0)
    assert not exact and used == 200
    assert r == pytest.approx(observed, abs=1e-12)
    assert p == pytest.approx((1 + np.sum(np.abs(null) >= abs(observed) - 1e-12)) / 201, abs=1e-12)


def test_exact_whenever_affordable_and_nan_for_a_constant_matrix():
    x, y = symmetric(8, 5), symmetric(8, 6)
    assert mantel_spearman(x, y, n_perm=100)[2:] == (40320, True)  # 8! is enumerated however few n_perm asks for
    assert mantel_spearman(symmetric(9, 5), symmetric(9, 6), n_perm=100)[2:] == (100, False)
    r, p, _, _ = mantel_spearman(x, 1.0 - np.eye(8))
    assert math.isnan(r) and math.isnan(p)
    # a perfect monotone relation is the most extreme of all 4! relabellings, together with its mirror images
    x4 = symmetric(4, 8)
    r, p, used, exact = mantel_spearman(x4, x4 ** 3)
    null = np.array([brute_force_r(x4, x4, q) for q in all_permutations(range(4))])
    assert r == pytest.approx(1.0) and p == pytest.approx(np.mean(np.abs(null) >= 1 - 1e-12))


def test_distance_correlations_drop_incomplete_languages_and_average_directions():
    langs = list("abcdef")
    dist = pd.DataFrame(symmetric(6, 9), index=langs, columns=langs)
    full = pd.DataFrame(symmetric(6, 10), index=langs, columns=langs)
    holes = full.copy()
    holes.loc["c", "e"] = holes.loc["f", "c"] = math.nan  # c misses two pairs, e and f one each: c goes
    asym = full + pd.DataFrame(np.random.default_rng(11).random((6, 6)), index=langs, columns=langs)
    table = distance_correlations({"d": dist}, {"holes": holes, "asym": asym}, n_perm=50).set_index("measure")
    assert list(table.reset_index().columns) == ["measure", "distance", "spearman_r", "p_value", "p_bh", "n_languages",
                                                 "n_perm", "exact"]
    assert table["p_bh"].dtype == float
    np.testing.assert_allclose(table["p_bh"], false_discovery_control(table["p_value"]), rtol=1e-12)
    kept = [l for l in langs if l != "c"]
    assert table.loc["holes", "n_languages"] == 5 and table.loc["holes", "n_perm"] == 120 and table.loc["holes", "exact"]
    expected = spearmanr(upper(dist.loc[kept, kept].to_numpy()), upper(full.loc[kept, kept].to_numpy())).statistic
    assert table.loc["holes", "spearman_r"] == pytest.approx(expected, abs=1e-12)
    # an asymmetric measure (subnetwork a on language b) counts the pair with the mean of both directions
    both = [(asym.loc[a, b] + asym.loc[b, a]) / 2 for i, a in enumerate(langs) for b in langs[i + 1:]]
    assert table.loc["asym", "spearman_r"] == pytest.approx(spearmanr(upper(dist.to_numpy()), both).statistic, abs=1e-12)
    assert table.loc["asym", "n_perm"] == 720
    few = distance_correlations({"d": dist.iloc[:3, :3]}, {"m": full}, n_perm=50)
    assert few.loc[0, "n_languages"] == 3 and few.loc[0, "n_perm"] == 0
    assert few[["spearman_r", "p_value", "p_bh"]].isna().all(axis=None)


# -- URIEL distances ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def l2v():
    """lang2vec's own reader, importable with a stand-in for the `pkg_resources` the installed setuptools lacks."""
    shim = types.ModuleType("pkg_resources")
    shim.resource_filename = lambda package, name: str(Path(importlib.util.find_spec(package).origin).parent / name)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "pkg_resources", shim)
        patch.delitem(sys.modules, "lang2vec.lang2vec", raising=False)
        module = importlib.import_module("lang2vec.lang2vec")
    return module


@pytest.fixture(scope="module")
def embedded():
    return uriel_distances(EMBEDDED, DISTANCE_KINDS)


def family_vectors(codes) -> dict[str, np.ndarray]:
    """The Glottolog family-membership rows of URIEL, read from lang2vec's data file by hand."""
    path = Path(importlib.util.find_spec("lang2vec").origin).parent / "data" / "family_features.npz"
    with np.load(path) as db:
        langs, data = list(db["langs"]), db["data"]
    return {code: data[langs.index(code), :, 0].astype(float) for code in codes}


def test_codes_map_to_uriel_languages_with_data(l2v):
    assert [uriel_code(l) for l in EMBEDDED] == ["eng", "spa", "rus", "deu", "cmn", "arb", "hin", "urd"]
    assert uriel_code("kor") == "kor"  # an ISO 639-3 code is taken as it is
    for bad in ("xx", "zh-cn", "EN"):
        with pytest.raises(XlsubError, match=f"languages: no URIEL code for '{bad}'; add its ISO 639-3 code to URIEL_CODES"):
            uriel_code(bad)
    families = family_vectors(URIEL_CODES.values())
    for lang, code in URIEL_CODES.items():
        assert code in l2v.URIEL_LANGUAGES, lang
        assert families[code].sum() >= 1, lang  # a lineage: the individual language, not an empty macrolanguage entry


def test_typological_distances_equal_lang2vecs_vectors(l2v, embedded):
    codes = [uriel_code(l) for l in EMBEDDED]
    pairs = list(zip(zip(EMBEDDED, codes), zip(EMBEDDED[::-1], codes[::-1])))
    vectors = {}
    for kind, feature_set in (("syntactic", "syntax_knn"), ("phonological", "phonology_knn"), ("inventory", "inventory_knn")):
        vectors[kind] = l2v.get_features(codes, feature_set)
        for (a, ca), (b, cb) in pairs:
            expected = cosine(np.array(vectors[kind][ca], dtype=float), np.array(vectors[kind][cb], dtype=float))
            assert embedded[kind].loc[a, b] == pytest.approx(expected, abs=1e-12), (kind, a, b)
    geo = l2v.get_features(["eng", "cmn"], "geo")
    fam = family_vectors(["eng", "cmn"])
    every = {c: np.concatenate([*(vectors[k][c] for k in vectors), fam[c], geo[c]]) for c in ("eng", "cmn")}
    assert embedded["featural"].loc["en", "zh"] == pytest.approx(cosine(every["eng"], every["cmn"]), abs=1e-12)


def test_genetic_distance_by_hand():
    """Glottolog in URIEL: English in 9 families and subfamilies, German in 6, sharing Indo-European, Germanic,
    Northwest Germanic and West Germanic; Mandarin (Sino-Tibetan) shares none."""
    table = uriel_distances(["en", "de", "zh"], ["genetic"])["genetic"]
    assert table.loc["en", "de"] == pytest.approx(1 - 4 / math.sqrt(9 * 6), abs=1e-12)
    assert table.loc["en", "zh"] == table.loc["de", "zh"] == 1.0


def test_geographic_distance_from_glottolog_coordinates(l2v, embedded):
    """English at 53.0 N 1.0 W and Standard German at 48.649 N 12.468 E in Glottolog; the antipodal distance is pi."""
    def unit(lat, lon):
        lat, lon = math.radians(lat), math.radians(lon)
        return np.array([math.cos(lat) * math.cos(lon), math.cos(lat) * math.sin(lon), math.sin(lat)])
    expected = math.acos(unit(53.0, -1.0) @ unit(48.649, 12.468)) / math.pi
    assert embedded["geographic"].loc["en", "de"] == pytest.approx(expected, abs=2e-3)
    # the recovered location reproduces lang2vec's distances to the fixed points (whole degrees: ~0.3% off)
    x = uriel_locations(["eng"])[0]
    feats = l2v.get_features(["eng"], "geo", header=True)
    points = np.array([unit(*map(float, name[3:].split("_"))) for name in feats["CODE"]])
    assert np.abs(np.arccos(np.clip(points @ x, -1, 1)) / np.pi - np.array(feats["eng"])).max() < 5e-3


def test_distance_matrices_are_symmetric_with_known_relations(embedded):
    for kind, table in embedded.items():
        values = table.to_numpy()
        assert list(table.index) == EMBEDDED and list(table.columns) == EMBEDDED
        assert np.isfinite(values).all(), kind
        np.testing.assert_array_equal(values, values.T)
        assert (np.diag(values) == 0).all() and (values >= 0).all() and (values <= 1 + 1e-12).all(), kind
    genetic, geographic = embedded["genetic"], embedded["geographic"]
    assert genetic.loc["en", "de"] < genetic.loc["en", "ru"] < genetic.loc["en", "zh"] == 1.0  # Germanic < Indo-European
    assert genetic.loc["hi", "ur"] == pytest.approx(0.0, abs=1e-12) and genetic.loc["zh", "ar"] == 1.0  # both Hindustani; unrelated families
    assert geographic.loc["en", "de"] < geographic.loc["en", "zh"]
    assert embedded["syntactic"].loc["hi", "ur"] < embedded["syntactic"].loc["hi", "en"]


def test_languages_uriel_lacks_give_nan_and_a_note(caplog):
    with caplog.at_level(logging.INFO, logger="xlsub.stats.language_distance"):
        table = uriel_distances(["en", "de", "qqq", "eus"], ["syntactic", "genetic"])
    assert table["syntactic"].loc["qqq"].isna().all() and table["syntactic"].loc["en", "qqq"] != 0
    assert math.isnan(table["syntactic"].loc["en", "qqq"]) and np.isfinite(table["syntactic"].loc["en", "eus"])
    assert table["genetic"].loc["eus"].isna().all()  # Basque: an isolate, no family to share
    assert "URIEL has no language 'qqq'" in caplog.text and "URIEL has no family for 'eus'" in caplog.text
    with pytest.raises(XlsubError, match="unknown kind 'lexical'"):
        uriel_distances(["en", "de"], ["lexical"])


# -- the analyze step --------------------------------------------------------------------------------------

LANGS = ["en", "de", "es", "zh", "ar"]
N, LAYERS, D = 24, 3, 6
PPL_FULL = {lang: 100.0 * (i + 1) for i, lang in enumerate(LANGS)}


def analysis_inputs() -> AnalysisInputs:
    g = torch.Generator().manual_seed(0)
    masks = {S(lang, 0): (torch.rand(2, 6, generator=g) < 0.6).long() for lang in LANGS}
    cross = pd.DataFrame([[PPL_FULL[e] * (1.05 if s == e else 1.2 + torch.rand(1, generator=g).item()) for e in LANGS]
                          for s in LANGS], index=[f"{s}-s0" for s in LANGS], columns=LANGS)
    shared = torch.randn(LAYERS, N, D, generator=g, dtype=torch.float64)
    full = {lang: shared + (i + 1) * 0.4 * torch.randn(LAYERS, N, D, generator=g, dtype=torch.float64)
            for i, lang in enumerate(LANGS)}
    return AnalysisInputs(languages=LANGS, masks=masks, cross_ppl=cross, ppl_full=PPL_FULL, encodings={"full": full})


SMALL = dict(bootstrap=20, permutations=30, counts=Counts(full=20, controls=20, subnetworks=10, length=20, power_draws=10))


@pytest.fixture(scope="module")
def analysed():
    return analysis_inputs(), analyzed(analysis_inputs(), **SMALL)


def test_analyze_writes_the_language_distance_table(analysed):
    inputs, result = analysed
    table = result.tables[LANGUAGE_DISTANCE]
    assert list(table.index.names) == ["distance", "measure"]
    assert list(table.columns) == ["spearman_r", "p_value", "p_bh", "n_languages", "n_perm", "exact"]
    np.testing.assert_allclose(table["p_bh"], false_discovery_control(table["p_value"]), rtol=1e-12)
    assert set(table.index) == {(d, m) for d in ("syntactic", "genetic", "geographic")
                                for m in ("mask_jaccard", "cross_ppl_relative", "cka")}
    assert (table["n_languages"] == 5).all() and (table["n_perm"] == 120).all() and table["exact"].all()
    uriel = result.tables[LANGUAGE_DISTANCE_URIEL]
    assert uriel.loc[("genetic", "en"), "de"] == uriel_distances(["en", "de"], ["genetic"])["genetic"].loc["en", "de"]

    # every matrix rebuilt independently from the inputs
    k = len(LANGS)
    jaccard = np.ones((k, k))
    cka = np.ones((k, k))
    relative = np.array([[inputs.cross_ppl.loc[f"{s}-s0", e] / PPL_FULL[e] for e in LANGS] for s in LANGS])
    for a in range(k):
        for b in range(k):
            ma, mb = inputs.masks[S(LANGS[a], 0)].bool(), inputs.masks[S(LANGS[b], 0)].bool()
            jaccard[a, b] = (ma & mb).sum().item() / (ma | mb).sum().item()
            cka[a, b] = float(linear_cka_gram(inputs.encodings["full"][LANGS[a]][-1], inputs.encodings["full"][LANGS[b]][-1]))
    matrices = {"mask_jaccard": jaccard, "cross_ppl_relative": (relative + relative.T) / 2, "cka": cka}
    for distance in ("syntactic", "genetic", "geographic"):
        dist = uriel.loc[distance].loc[LANGS, LANGS].to_numpy()
        for measure, matrix in matrices.items():
            observed = spearmanr(upper(dist), upper(matrix)).statistic
            null = np.array([brute_force_r(dist, matrix, p) for p in all_permutations(range(k))])
            row = table.loc[(distance, measure)]
            assert row["spearman_r"] == pytest.approx(observed, abs=1e-9), (distance, measure)
            assert row["p_value"] == pytest.approx(np.mean(np.abs(null) >= abs(observed) - 1e-9), abs=1e-12)


def test_analyze_draws_the_language_distance_figure(analysed):
    _, result = analysed
    fig = result.figures[LANGUAGE_DISTANCE]
    assert result.figure_tables[LANGUAGE_DISTANCE] == [LANGUAGE_DISTANCE, LANGUAGE_DISTANCE_URIEL]
    assert "URIEL" in result.captions[LANGUAGE_DISTANCE] and "\n" not in result.captions[LANGUAGE_DISTANCE]
    axes = fig.axes
    assert len(axes) == 9
    table = result.tables[LANGUAGE_DISTANCE]
    r = table.loc[("syntactic", "mask_jaccard"), "spearman_r"]
    assert axes[0].get_title().startswith(f"r = {r:.2f}, p = ")
    for ax in axes:
        assert len(ax.collections[0].get_offsets()) == 10  # the 10 pairs of 5 languages
    fig.savefig(io.BytesIO(), format="png", dpi=40)


def test_cka_without_the_last_heatmap_layer_is_computed_and_the_same(analysed):
    _, result = analysed
    other = analyzed(analysis_inputs(), layers=[0], **SMALL)
    assert LAYERS - 1 not in other.tables["cka_pairs"].index.get_level_values("layer")
    pd.testing.assert_frame_equal(other.tables[LANGUAGE_DISTANCE], result.tables[LANGUAGE_DISTANCE], atol=1e-9)


def test_analyze_skips_language_distance_with_few_languages_or_unmapped_codes():
    three = ["en", "de", "zh"]
    few = analyzed(AnalysisInputs(languages=three, masks={S(l, 0): m for l, m in zip(three, analysis_inputs().masks.values())}))
    assert LANGUAGE_DISTANCE not in few.tables and any(n.startswith("language distance: skipped (needs 4+") for n in few.notes)
    inputs = analysis_inputs()
    inputs.languages = ["en", "de", "es", "xx"]
    inputs.masks = {S(l, 0): m for l, m in zip(inputs.languages, analysis_inputs().masks.values())}
    inputs.cross_ppl, inputs.encodings = None, {}
    result = analyzed(inputs, **SMALL)
    assert LANGUAGE_DISTANCE not in result.tables
    assert "language distance: skipped (languages: no URIEL code for 'xx'; add its ISO 639-3 code" in "\n".join(result.notes)
