"""Text corpora for xlsub: per-language train/test texts and, for the embedded corpus, a parallel set.

``load_corpus(corpus, languages)`` is the one entry point. ``corpus`` is one of

* ``"embedded"`` (default): the Firefox ESR localization packs shipped by Debian
  (``firefox-esr-l10n-<pack>``, see ``EMBEDDED_PACKS``), fetched with ``apt-get download``,
  parsed, cleaned and cached on disk by ``xlsub.data.embedded``. Messages aligned across all 8
  languages give a held-out parallel set (used only for encoding, never for MLM training or evaluation).
* a local folder of ``<lang>.txt`` files (UTF-8, one text per non-empty line),
* a folder written by ``datasets`` ``save_to_disk``, or
* a Hugging Face hub dataset id (``owner/name``), loaded with ``datasets``.

Every split into train and test is a hash of a key (a message ID, a line, an article) with
``hashlib`` (``xlsub.data.splits``), so it is the same on every machine and run, whatever ``PYTHONHASHSEED`` is.
Tokenising and chunking into model-sized blocks happen elsewhere; this module provides texts.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import datasets

from xlsub.data.embedded import EMBEDDED_PACKS, embedded_cache
from xlsub.data.splits import flags_from_scores, hash_fraction, is_test, split_flags
from xlsub.errors import XlsubError
from xlsub.models.hub import is_hub_id

_TEXT_FEATURES = datasets.Features({"lang": datasets.Value("string"), "text": datasets.Value("string")})


@dataclass
class Corpus:
    """Texts of one corpus, restricted to the requested languages.

    ``texts`` has splits ``train`` and ``test`` with columns ``lang`` and ``text``, grouped by
    language in the order of ``languages``. ``parallel`` (embedded corpus only) has a column ``id``
    and one column per ISO code of all 8 embedded languages; its items are in no train or test split.
    ``source`` records provenance (package versions, hub revision or folder path).
    """

    name: str
    languages: list[str]
    texts: datasets.DatasetDict
    source: dict[str, str]
    parallel: datasets.Dataset | None = None


def default_cache_dir() -> Path:
    """Where built corpora are cached: ``$XLSUB_CACHE`` or ``~/.cache/xlsub``."""
    return Path(os.environ.get("XLSUB_CACHE") or Path.home() / ".cache" / "xlsub")


def load_corpus(
    corpus: str, languages: list[str] | None, cache_dir: Path | None = None, seed: int = 0
) -> Corpus:
    """Load ``corpus`` ("embedded", a folder, or a hub dataset id) for ``languages`` (None: all).

    ``seed`` picks the train/test split (the same hash rule with a different salt); the embedded
    parallel set does not depend on it. ``cache_dir`` is used by the embedded corpus only.
    """
    if corpus == "embedded":
        return _load_embedded(languages, Path(cache_dir) if cache_dir else default_cache_dir(), seed)
    path = Path(corpus).expanduser()
    if path.exists():
        if not path.is_dir():
            raise XlsubError(
                f"corpus: {corpus} is a file; give the folder that holds the <lang>.txt files"
            )
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            return _load_saved_dataset(corpus, path, languages, seed)
        return _load_text_folder(corpus, path, languages, seed)
    # Hub datasets may have no owner (`is_hub_id` allows it, `xlsub.data.parallel` takes them), but here a bare
    # word that is no folder is more likely a mistyped folder of <lang>.txt files: refused, owner/name only.
    if not (is_hub_id(corpus) and "/" in corpus):
        raise XlsubError(
            f"corpus: {corpus!r} is not a folder and not a hub dataset id (owner/name); "
            "use corpus=embedded, a folder of <lang>.txt files, or a hub id like mbelitsky/wikipedia_subset"
        )
    return _load_hub_dataset(corpus, languages, seed)


# --------------------------------------------------------------------------------------------
# Language selection, shared by every kind of corpus
# --------------------------------------------------------------------------------------------


def _choose_languages(requested: list[str] | None, available: list[str], corpus: str, fix: str) -> list[str]:
    """Validate ``requested`` against ``available`` (None means all available, in their order)."""
    if requested is None:
        return list(available)
    if not requested:
        raise XlsubError(f"languages: empty list; give ISO codes, or leave it out for all of {corpus}")
    for lang in requested:
        if requested.count(lang) > 1:
            raise XlsubError(f"languages: {lang!r} is listed twice; list each language once")
        if lang not in available:
            raise XlsubError(
                f"languages: {lang!r} is not in corpus {corpus} (it has {', '.join(sorted(available))}); "
                + fix.format(lang=lang)
            )
    return list(requested)


def _texts_dataset(rows: Iterable[tuple[str, str]]) -> datasets.Dataset:
    langs, texts = [], []
    for lang, text in rows:
        langs.append(lang)
        texts.append(text)
    return datasets.Dataset.from_dict({"lang": langs, "text": texts}, features=_TEXT_FEATURES)


# --------------------------------------------------------------------------------------------
# corpus=embedded: the cached build (`xlsub.data.embedded`), re-split by seed
# --------------------------------------------------------------------------------------------


def _load_embedded(languages: list[str] | None, cache_dir: Path, seed: int) -> Corpus:
    if languages is not None:
        for lang in languages:
            if lang not in EMBEDDED_PACKS:
                raise XlsubError(
                    f"languages: unknown language code {lang!r}; valid for corpus=embedded: "
                    + ", ".join(sorted(EMBEDDED_PACKS))
                )
    langs = _choose_languages(languages, list(EMBEDDED_PACKS), "embedded", "")
    path = embedded_cache(cache_dir)
    built = datasets.load_from_disk(str(path))
    source = {**json.loads((path / "source.json").read_text()), "uri": path.resolve().as_uri()}
    # The cache holds the seed-0 split; any seed re-splits train+test by the same ID hash.
    by_lang: dict[str, list[tuple[str, str]]] = {lang: [] for lang in langs}
    for split in ("train", "test"):
        columns = built[split].to_dict()
        for lang, message_id, text in zip(columns["lang"], columns["id"], columns["text"]):
            if lang in by_lang:
                by_lang[lang].append((message_id, text))
    splits: dict[str, list[tuple[str, str]]] = {"train": [], "test": []}
    for lang in langs:
        for message_id, text in sorted(by_lang[lang]):
            splits["test" if is_test(message_id, seed) else "train"].append((lang, text))
    texts = datasets.DatasetDict({name: _texts_dataset(rows) for name, rows in splits.items()})
    parallel = datasets.Dataset.from_dict(built["parallel"].to_dict())  # in memory, detached from the cache
    return Corpus("embedded", langs, texts, source, parallel)


# --------------------------------------------------------------------------------------------
# corpus=<folder of <lang>.txt files>
# --------------------------------------------------------------------------------------------


def _load_text_folder(name: str, folder: Path, languages: list[str] | None, seed: int) -> Corpus:
    """One text per non-empty line of ``<lang>.txt`` (UTF-8); split by a hash of the line."""
    try:
        files = {p.stem: p for p in sorted(folder.glob("*.txt")) if p.is_file()}
    except OSError as e:
        raise XlsubError(f"corpus: cannot read folder {name} ({e.strerror}); check its permissions") from e
    if not files:
        raise XlsubError(
            f"corpus: folder {name} has no <lang>.txt files; add e.g. en.txt with one text per line"
        )
    langs = _choose_languages(languages, sorted(files), name, "add {lang}.txt or drop {lang}")
    splits: dict[str, list[tuple[str, str]]] = {"train": [], "test": []}
    for lang in langs:
        try:
            raw = files[lang].read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise XlsubError(f"corpus: {files[lang]} is not UTF-8 (byte {e.start}); save it as UTF-8") from e
        except OSError as e:
            raise XlsubError(f"corpus: cannot read {files[lang]} ({e.strerror}); check its permissions") from e
        lines = [line.strip() for line in raw.splitlines() if line.strip()]
        if not lines:
            raise XlsubError(f"corpus: {files[lang]} has no text; add lines or drop {lang}")
        for line, test in zip(lines, split_flags(lines, seed)):
            splits["test" if test else "train"].append((lang, line))
    texts = datasets.DatasetDict({split: _texts_dataset(rows) for split, rows in splits.items()})
    return Corpus(name, langs, texts, {"folder": str(folder.resolve()), "format": "txt"})


# --------------------------------------------------------------------------------------------
# corpus=<hub dataset id> or a folder written by save_to_disk
# --------------------------------------------------------------------------------------------
#
# The study's dataset, mbelitsky/wikipedia_subset, is a DatasetDict with ONE SPLIT PER LANGUAGE
# (split name = ISO code: lt ru cs en fr de zh sw ar hi fa ur es) and one column, "text" (a whole
# Wikipedia article); 80,000 articles per language, drawn with shuffle(seed=42) from
# wikimedia/wikipedia dumps 20231101.<lang>, other columns removed, then push_to_hub. It has no
# test split: the study split 3,000 chunks per language after tokenising. Read in the study's
# code, github.com/MaxBelitsky/cross-lingual-subnetworks: cross_lingual_subnets/create_subsets.py
# (WIKIPEDIA_DUMPS, create_wikipedia_subsets) and cross_lingual_subnets/data.py (get_dataset:
# load_dataset(name), then DatasetDict({lang: dataset[lang] for lang in languages}), x["text"]).
#
# Also accepted: xlsub's own layout (Corpus.texts saved to disk): splits train [and test] with
# columns lang and text.


def _load_hub_dataset(name: str, languages: list[str] | None, seed: int) -> Corpus:
    try:
        # What datasets.load_dataset(name) does, keeping the builder to read the resolved commit.
        builder = datasets.load_dataset_builder(name)
        builder.download_and_prepare()
        dataset = builder.as_dataset()
    except (OSError, ValueError) as e:  # ConnectionError, DatasetNotFoundError, offline mode, bad format
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise XlsubError(
            f"corpus: cannot load hub dataset {name!r} ({reason}); check the id and your connection "
            "(HF_HUB_OFFLINE), or use corpus=embedded or a local folder"
        ) from e
    return _corpus_from_dataset(name, dataset, languages, seed, {"hub": name, "revision": str(builder.hash)})


def _load_saved_dataset(name: str, folder: Path, languages: list[str] | None, seed: int) -> Corpus:
    dataset = datasets.load_from_disk(str(folder))
    source = {"folder": str(folder.resolve()), "format": "save_to_disk"}
    return _corpus_from_dataset(name, dataset, languages, seed, source)


def _split_by_text(ds: datasets.Dataset, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Train and test parts of one language's dataset, by a hash of each text (an article)."""
    # Scores, not texts, are kept: a language of the study's dataset is ~80,000 whole articles.
    flags = flags_from_scores([hash_fraction(t, seed) for b in ds.iter(batch_size=1000) for t in b["text"]])
    # keep_in_memory: select() would otherwise write an index file next to the user's data.
    train = ds.select([i for i, t in enumerate(flags) if not t], keep_in_memory=True)
    return train, ds.select([i for i, t in enumerate(flags) if t], keep_in_memory=True)


def _lang_text(ds: datasets.Dataset, lang: str | None = None) -> datasets.Dataset:
    """Columns lang, text in that order (a new lang column when ``lang`` is given), texts not copied.

    Call it before selecting rows: with an index mapping, datasets would flatten it to a cache file
    next to the user's data.
    """
    langs = ds.select_columns(["lang"]) if lang is None else datasets.Dataset.from_dict({"lang": [lang] * len(ds)})
    return datasets.concatenate_datasets([langs, ds.select_columns(["text"])], axis=1)


def _rows_of(ds: datasets.Dataset, lang: str) -> datasets.Dataset:
    return ds.select([i for i, x in enumerate(ds["lang"]) if x == lang], keep_in_memory=True)


def _corpus_from_dataset(
    name: str, dataset: datasets.Dataset | datasets.DatasetDict, languages: list[str] | None, seed: int,
    source: dict[str, str],
) -> Corpus:
    """A dataset in the study's layout or in xlsub's own -> Corpus (texts memory-mapped, not copied)."""
    if isinstance(dataset, datasets.Dataset):
        dataset = datasets.DatasetDict({"train": dataset})
    if "train" in dataset and {"lang", "text"} <= set(dataset["train"].column_names):
        given = {split: _lang_text(dataset[split]) for split in ("train", "test") if split in dataset}
        langs = _choose_languages(languages, sorted(set(given["train"]["lang"])), name, "drop {lang}")

        def train_test(lang):
            if "test" in given:
                return _rows_of(given["train"], lang), _rows_of(given["test"], lang)
            return _split_by_text(_rows_of(given["train"], lang), seed)

    elif all("text" in ds.column_names for ds in dataset.values()):
        langs = _choose_languages(languages, list(dataset), name, "drop {lang}")

        def train_test(lang):
            return _split_by_text(_lang_text(dataset[lang], lang), seed)

    else:
        columns = sorted(set().union(*(ds.column_names for ds in dataset.values())))
        raise XlsubError(
            f"corpus: {name} has splits {list(dataset)} with columns {columns}; expected one split per "
            "language with a 'text' column (like mbelitsky/wikipedia_subset) or train/test splits "
            "with 'lang' and 'text' columns"
        )
    pairs = [train_test(lang) for lang in langs]
    texts = datasets.DatasetDict(
        {
            "train": datasets.concatenate_datasets([train for train, _ in pairs]),
            "test": datasets.concatenate_datasets([test for _, test in pairs]),
        }
    )
    return Corpus(name, langs, texts, source)


if __name__ == "__main__":
    # `python -m xlsub.data.corpus`: build the embedded corpus cache (if missing) and say what it holds.
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    built = load_corpus("embedded", None)
    for split, ds in built.texts.items():
        print(f"{split}: {len(ds)} texts in {', '.join(built.languages)}")
    print(f"parallel: {len(built.parallel)} items aligned across {len(built.parallel.column_names) - 1} languages")
    print(f"cache: {built.source['uri']}")
