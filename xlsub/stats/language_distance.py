"""Typological, genealogical and geographic distances between languages from URIEL (Littell et al. 2017),
and their Mantel correlation with the analysis' language x language matrices.

URIEL ships with `lang2vec` (PyPI 1.1.2) as per-language vectors, not as distance matrices: kNN-imputed
syntax, phonology and inventory features, Glottolog family memberships and distances to 299 fixed points on
the globe. The distances are computed from them as Littell et al. (2017, Sec. 3) define them:

- syntactic, phonological, inventory: cosine distance (1 - cos) of the `syntax_knn`, `phonology_knn` and
  `inventory_knn` vectors, over the features both languages have;
- genetic: cosine distance of the family-membership vectors (one entry per Glottolog family and subfamily),
  0 for the same lineage, 1 for different families;
- geographic: orthodromic distance between the languages' locations divided by the antipodal distance
  (0..1); URIEL gives each language's orthodromic distance to the fixed points as a fraction of the antipodal
  distance, so its location is the unit vector x with u_k . x = cos(pi g_k) for the points u_k, solved by
  least squares;
- featural: cosine distance of all five vectors concatenated.

The files are read with numpy from the installed package: lang2vec's own module imports `pkg_resources`,
which the setuptools torch pins no longer has. Languages are ISO 639-1 codes in xlsub and ISO 639-3 codes in
URIEL (`URIEL_CODES`). A language URIEL has no vector for gets NaN distances and a logged note.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from xlsub.errors import XlsubError
from xlsub.similarity.permutation import permutations
from xlsub.stats.inference import benjamini_hochberg, mantel_test

log = logging.getLogger(__name__)

# ISO 639-1 -> the ISO 639-3 code URIEL files the language under. Where ISO 639-1 names a macrolanguage,
# the individual language the corpora hold: Mandarin (URIEL's `zho` has only the top-level family), Modern
# Standard Arabic, Iranian Persian, Swahili proper. The first eight are the embedded corpus' languages.
URIEL_CODES = {
    "en": "eng", "es": "spa", "ru": "rus", "de": "deu", "zh": "cmn", "ar": "arb", "hi": "hin", "ur": "urd",
    "fr": "fra", "it": "ita", "pt": "por", "nl": "nld", "sv": "swe", "da": "dan", "pl": "pol", "uk": "ukr",
    "cs": "ces", "bg": "bul", "el": "ell", "tr": "tur", "fi": "fin", "hu": "hun", "ja": "jpn", "ko": "kor",
    "vi": "vie", "th": "tha", "id": "ind", "he": "heb", "fa": "pes", "bn": "ben", "ta": "tam", "te": "tel",
    "sw": "swh",
}
DISTANCE_KINDS = ("syntactic", "genetic", "geographic", "phonological", "inventory", "featural")
DEFAULT_KINDS = ("syntactic", "genetic", "geographic")
# Fewer languages leave too few pairs: with 3, no two-sided p falls below 1/3.
MIN_LANGUAGES = 4

_TYPOLOGY_PREFIX = {"syntactic": "S_", "phonological": "P_", "inventory": "INV_"}
_MISSING = -1.0  # URIEL's value for a feature with no data


def uriel_code(lang: str) -> str:
    """The ISO 639-3 code URIEL uses for an xlsub language; a three-letter code is taken as one already."""
    if lang in URIEL_CODES:
        return URIEL_CODES[lang]
    if len(lang) == 3 and lang.isalpha() and lang.islower():
        return lang
    raise XlsubError(f"languages: no URIEL code for '{lang}'; add its ISO 639-3 code to URIEL_CODES in "
                     "xlsub/stats/language_distance.py")


def _data_dir() -> Path:
    try:
        folder = Path(str(resources.files("lang2vec") / "data"))
    except ModuleNotFoundError:
        folder = None
    if folder is None or not (folder / "family_features.npz").is_file():
        raise XlsubError("language distance: the URIEL data of lang2vec is not installed; pip install lang2vec==1.1.2")
    return folder


def _vectors(filename: str, codes: Sequence[str], prefix: str = "") -> np.ndarray:
    """Rows of one URIEL file for `codes` (NaN rows for codes it lacks), features starting with `prefix`."""
    with np.load(_data_dir() / filename) as db:
        index = {code: i for i, code in enumerate(db["langs"])}
        columns = np.flatnonzero(np.char.startswith(db["feats"], prefix))
        data = db["data"]
        rows = [index.get(code, -1) for code in codes]
        out = data[np.maximum(rows, 0)][:, columns, 0].astype(np.float64)
    out[np.asarray(rows) < 0] = math.nan
    return out


def _cosine_distances(vectors: np.ndarray) -> np.ndarray:
    """1 - cos over the features both rows have (not URIEL's -1); NaN without shared non-zero features."""
    k = len(vectors)
    out = np.full((k, k), math.nan)
    for i, j in itertools.product(range(k), repeat=2):
        a, b = vectors[i], vectors[j]
        shared = np.isfinite(a) & np.isfinite(b) & (a != _MISSING) & (b != _MISSING)
        norm = np.linalg.norm(a[shared]) * np.linalg.norm(b[shared])
        if norm > 0:
            out[i, j] = 1.0 - float(a[shared] @ b[shared]) / norm
    return np.clip(out, 0.0, 2.0)


def _fixed_points() -> np.ndarray:
    """Unit vectors of URIEL's fixed points, named `GC_<lat>_<lon>` in degrees."""
    with np.load(_data_dir() / "geocoord_features.npz") as db:
        feats = db["feats"]
    lat, lon = np.radians(np.array([[float(v) for v in f[3:].split("_")] for f in feats])).T
    return np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], axis=1)


def uriel_locations(codes: Sequence[str]) -> np.ndarray:
    """[k, 3] unit vectors of the languages' locations (NaN rows where URIEL has none), from their distances
    to the fixed points: cos(pi g_k) = u_k . x is linear in x, solved by least squares and normalised."""
    g = _vectors("geocoord_features.npz", codes)
    points = _fixed_points()
    out = np.full((len(codes), 3), math.nan)
    for i, row in enumerate(g):
        if np.isfinite(row).all() and (row != _MISSING).all():
            x = np.linalg.lstsq(points, np.cos(np.pi * row), rcond=None)[0]
            out[i] = x / np.linalg.norm(x)
    return out


def _geographic(codes: Sequence[str]) -> np.ndarray:
    x = uriel_locations(codes)
    return np.arccos(np.clip(x @ x.T, -1.0, 1.0)) / np.pi


def _distance_matrix(kind: str, codes: Sequence[str]) -> np.ndarray:
    if kind in _TYPOLOGY_PREFIX:
        return _cosine_distances(_vectors("feature_predictions.npz", codes, _TYPOLOGY_PREFIX[kind]))
    if kind == "genetic":
        families = _vectors("family_features.npz", codes)
        no_family = np.isfinite(families).all(1) & (families.sum(1) == 0)
        for code in np.asarray(codes)[no_family]:
            log.info("language distance: URIEL has no family for '%s' (an isolate or unclassified); its genetic "
                     "distances are NaN", code)
        return _cosine_distances(families)
    if kind == "geographic":
        return _geographic(codes)
    parts = [_vectors("feature_predictions.npz", codes, p) for p in _TYPOLOGY_PREFIX.values()]
    parts += [_vectors("family_features.npz", codes), _vectors("geocoord_features.npz", codes)]
    return _cosine_distances(np.concatenate(parts, axis=1))


def uriel_distances(languages: Sequence[str], kinds: Sequence[str] = DEFAULT_KINDS) -> dict[str, pd.DataFrame]:
    """{kind: language x language distance} from URIEL for xlsub languages (ISO 639-1), kinds of
    `DISTANCE_KINDS` (see the module docstring). Symmetric, zero diagonal; NaN for languages URIEL lacks."""
    unknown = [k for k in kinds if k not in DISTANCE_KINDS]
    if unknown:
        raise XlsubError(f"language distance: unknown kind '{unknown[0]}'; use one of {', '.join(DISTANCE_KINDS)}")
    langs = list(languages)
    codes = [uriel_code(lang) for lang in langs]
    with np.load(_data_dir() / "family_features.npz") as db:
        known = set(db["langs"].tolist())
    for lang, code in zip(langs, codes):
        if code not in known:
            log.info("language distance: URIEL has no language '%s' (for '%s'); its distances are NaN", code, lang)
    out = {}
    for kind in kinds:
        matrix = _distance_matrix(kind, codes)
        matrix = (matrix + matrix.T) / 2  # the geographic x x' is symmetric only up to rounding
        np.fill_diagonal(matrix, np.where(np.isfinite(np.diag(matrix)), 0.0, math.nan))
        table = pd.DataFrame(matrix, index=pd.Index(langs, name="language"), columns=pd.Index(langs, name="language"))
        out[kind] = table
    return out


def _symmetric(table: pd.DataFrame, langs: Sequence[str]) -> np.ndarray:
    """The matrix on `langs` (NaN where absent), averaged with its transpose: an asymmetric measure (a
    subnetwork on another language) counts a pair as the mean of its two directions."""
    values = table.reindex(index=langs, columns=langs).to_numpy(dtype=float)
    return (values + values.T) / 2


def _complete(x: np.ndarray, y: np.ndarray) -> list[int]:
    """Indices of languages whose pairs are all finite in x and y: the language with the most missing pairs
    is dropped until none is left (the permutation null needs full matrices)."""
    keep = list(range(len(x)))
    while keep:
        missing = ~(np.isfinite(x) & np.isfinite(y))[np.ix_(keep, keep)]
        np.fill_diagonal(missing, False)
        counts = missing.sum(1)
        if not counts.any():
            break
        keep.pop(int(counts.argmax()))
    return keep


def paired_matrices(distance: pd.DataFrame, matrix: pd.DataFrame) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The languages of `distance` with all their pairs finite in both (`_complete`), and both matrices on
    them, symmetrised (`_symmetric`)."""
    langs = list(distance.index)
    x, y = _symmetric(distance, langs), _symmetric(matrix, langs)
    keep = _complete(x, y)
    return [langs[n] for n in keep], x[np.ix_(keep, keep)], y[np.ix_(keep, keep)]


def distance_correlations(distances: Mapping[str, pd.DataFrame], matrices: Mapping[str, pd.DataFrame],
                          n_perm: int = 1000, seed: int = 0, min_languages: int = MIN_LANGUAGES) -> pd.DataFrame:
    """Two-sided Spearman Mantel test (`xlsub.stats.inference.mantel_test`) of every distance against every
    language x language matrix: all k! relabellings of the k languages up to 8 of them
    (`inference.EXACT_LIMIT`) or `n_perm`, else `n_perm` random ones (`permutations(k, n_perm, seed)`).

    Per pair, the languages with all their pairs finite in both (`paired_matrices`); fewer than
    `min_languages` gives NaN. Rows: distance, measure, spearman_r, p_value, p_bh (Benjamini-Hochberg across
    the rows), n_languages, n_perm (the permutations used), exact (all of them enumerated).
    """
    rows = []
    for (distance, dist), (measure, matrix) in itertools.product(distances.items(), matrices.items()):
        langs, x, y = paired_matrices(dist, matrix)
        if len(langs) >= min_languages:
            result = mantel_test(x, y, permutations(len(x), n_perm, seed), alternative="two-sided")
            r, p, used, exact = float(result.observed), float(result.p_value), result.n_perm, result.test == "relabel_exact"
        else:
            r, p, used, exact = math.nan, math.nan, 0, False
        rows.append({"distance": distance, "measure": measure, "spearman_r": r, "p_value": p,
                     "n_languages": len(langs), "n_perm": used, "exact": exact})
    columns = ["distance", "measure", "spearman_r", "p_value", "p_bh", "n_languages", "n_perm", "exact"]
    table = pd.DataFrame(rows, columns=columns)
    tested = table["p_value"].notna()
    table.loc[tested, "p_bh"] = benjamini_hochberg(table.loc[tested, "p_value"].to_numpy())
    return table
