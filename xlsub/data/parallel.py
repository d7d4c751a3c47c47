"""Parallel corpora: the same items in several languages, one row per item, for encoding.

``load_parallel(corpus, languages, max_sentences)`` reads any of

* ``"embedded"`` (default): the held-out parallel set of the embedded corpus
  (``xlsub.data.corpus.load_corpus("embedded", None).parallel``), never used for MLM training;
* a JSON file ``{lang: [sentence, ...]}``, lists aligned by index (the layout of the study's
  Bible corpus); an item's ID is its index. A JSON list of records is read like JSONL;
* a JSONL file, one record ``{"id": ..., "<lang>": text, ...}`` per line (no ``id``: the line's index);
* a Hugging Face dataset with one column per language: a hub id (``datasets.load_dataset``) or a
  ``save_to_disk`` folder (``datasets.load_from_disk``); IDs from an ``id`` column, else the index.

and returns a ``ParallelCorpus``: row i of every language is item ``ids[i]``. Items absent, null
or blank in any requested language are dropped (and counted), so the rows stay aligned.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets

from xlsub.errors import XlsubError
from xlsub.models.hub import is_hub_id, looks_local

log = logging.getLogger(__name__)

EMBEDDED = "embedded"
ID_COLUMN = "id"
_JSON_SUFFIXES = (".json", ".jsonl", ".ndjson")
_FORMATS = "embedded, a .json file {lang: [sentences]}, a .jsonl file of {id, <lang>: text} records, " \
    "a datasets save_to_disk folder or a hub dataset id (owner/name)"


@dataclass
class ParallelCorpus:
    """Aligned sentences: ``texts[lang][i]`` is item ``ids[i]`` in every language of ``languages``.

    ``dropped`` counts the items left out because they were absent, null or blank in at least one
    requested language; ``source`` records provenance (file and sha256, hub id and split, or the
    embedded corpus' package versions).
    """

    name: str
    languages: list[str]
    ids: list[str]
    texts: dict[str, list[str]]
    dropped: int
    source: dict[str, str]

    def __len__(self) -> int:
        return len(self.ids)


def load_parallel(
    corpus: str,
    languages: list[str] | None,
    max_sentences: int | None,
    *,
    split: str | None = None,
) -> ParallelCorpus:
    """Load a parallel corpus for ``languages`` (None: every language it has), first ``max_sentences`` items
    (None: all).

    ``max_sentences`` counts items left after dropping incomplete ones, in corpus order (so the
    same corpus always gives the same items). ``split`` picks the split of a hub or saved
    ``DatasetDict``; left out, the only split, else ``test``.
    """
    if max_sentences is not None and (isinstance(max_sentences, bool) or not isinstance(max_sentences, int)
                                      or max_sentences <= 0):
        raise XlsubError(
            f"max_sentences: must be a positive number of items, got {max_sentences!r}; or None to keep all"
        )
    if languages is not None:
        _check_language_list(languages)

    if corpus == EMBEDDED:
        name, ids, columns, source = _read_embedded()
    else:
        path = Path(corpus).expanduser()
        if path.is_dir():
            name, ids, columns, source = _read_saved_dataset(corpus, path, split)
        elif path.exists():
            name, ids, columns, source = _read_json_file(corpus, path)
        elif looks_local(corpus) or corpus.lower().endswith(_JSON_SUFFIXES) or not is_hub_id(corpus):
            # can only be a path, so a missing one fails at once instead of trying the hub
            raise XlsubError(f"corpus: {corpus} does not exist; give {_FORMATS}")
        else:
            name, ids, columns, source = _read_hub_dataset(corpus, split)
    return _align(name, ids, columns, languages, max_sentences, source)


# --------------------------------------------------------------------------------------------
# Selection shared by every format: languages, dropping incomplete items, max_sentences
# --------------------------------------------------------------------------------------------


def _check_language_list(languages: Sequence[str]) -> None:
    if isinstance(languages, str) or not languages:
        raise XlsubError(
            f"languages: give a list of ISO codes (e.g. ['en', 'de']), got {languages!r}; leave it out for all"
        )
    for lang in languages:
        if list(languages).count(lang) > 1:
            raise XlsubError(f"languages: {lang!r} is listed twice; list each language once")


def _is_missing(value) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _align(
    name: str,
    ids: list[str],
    columns: Mapping[str, Sequence],
    languages: list[str] | None,
    max_sentences: int | None,
    source: dict[str, str],
) -> ParallelCorpus:
    """Keep the items with text in every requested language, then the first ``max_sentences``.

    ``columns`` maps each key of the corpus (a language, or metadata) to one value per item (None
    where absent); ``languages=None`` takes every key whose values are all text or None.
    """
    available = list(columns)
    if languages is None:  # every column of text: a number or a list is metadata, not a language
        languages = [lang for lang in available if all(v is None or isinstance(v, str) for v in columns[lang])]
        if not languages:
            raise XlsubError(
                f"corpus: parallel corpus {name} has no column of text (it has {', '.join(available) or 'nothing'}); "
                "give one text per item for each language, keyed by its ISO code"
            )
    for lang in languages:
        if lang not in columns:
            raise XlsubError(
                f"languages: parallel corpus {name} has no {lang!r} (it has {', '.join(sorted(available))}); "
                f"drop {lang!r} or use a corpus that has it"
            )
    duplicate = _first_duplicate(ids)
    if duplicate is not None:
        raise XlsubError(f"corpus: parallel corpus {name} has the id {duplicate!r} twice; give every item a unique id")

    keep = []
    for i, item in enumerate(ids):
        values = [columns[lang][i] for lang in languages]
        for lang, value in zip(languages, values):
            if value is not None and not isinstance(value, str):
                raise XlsubError(
                    f"corpus: parallel corpus {name} item {item!r} has a {type(value).__name__} for {lang!r}, "
                    "not text; store each sentence as a string (null or \"\" where missing)"
                )
        if not any(_is_missing(v) for v in values):
            keep.append(i)
    dropped = len(ids) - len(keep)
    if not keep:
        raise XlsubError(
            f"corpus: parallel corpus {name} has no item with text in every one of {', '.join(languages)} "
            f"({dropped} items, all incomplete); request fewer languages"
        )
    if max_sentences is not None:
        keep = keep[:max_sentences]
    if dropped:
        log.info("%s: dropped %d of %d items missing in some of %s", name, dropped, len(ids), ", ".join(languages))
    return ParallelCorpus(
        name=name,
        languages=list(languages),
        ids=[ids[i] for i in keep],
        texts={lang: [columns[lang][i] for i in keep] for lang in languages},
        dropped=dropped,
        source=source,
    )


def _first_duplicate(ids: Sequence[str]) -> str | None:
    seen: set[str] = set()
    for item in ids:
        if item in seen:
            return item
        seen.add(item)
    return None


# --------------------------------------------------------------------------------------------
# Formats
# --------------------------------------------------------------------------------------------

Columns = dict[str, list]


def _read_embedded() -> tuple[str, list[str], Columns, dict[str, str]]:
    from xlsub.data.corpus import load_corpus  # the embedded corpus pulls in fluent and apt tooling

    built = load_corpus(EMBEDDED, None)
    table = built.parallel.to_dict()
    ids = [str(i) for i in table.pop(ID_COLUMN)]
    return EMBEDDED, ids, table, {**built.source, "subset": "parallel (held out of MLM training)"}


def _read_json_file(name: str, path: Path) -> tuple[str, list[str], Columns, dict[str, str]]:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise XlsubError(f"corpus: cannot read {name} ({e.strerror}); check the path and its permissions") from e
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise XlsubError(f"corpus: {name} is not UTF-8 (byte {e.start}); save it as UTF-8") from e
    source = {"file": str(path.resolve()), "sha256": hashlib.sha256(raw).hexdigest()}

    if path.suffix.lower() in (".jsonl", ".ndjson"):
        records = _parse_jsonl(name, text)
        return name, *_from_records(name, records), {**source, "format": "jsonl"}
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # one object per line: JSONL under another name
            records = _parse_jsonl(name, text)
            return name, *_from_records(name, records), {**source, "format": "jsonl"}
        raise XlsubError(
            f"corpus: {name} is not valid JSON (line {e.lineno} column {e.colno}: {e.msg}); fix the file"
        ) from e
    if isinstance(data, dict):
        return name, *_from_aligned_lists(name, data), {**source, "format": "json"}
    if isinstance(data, list):
        return name, *_from_records(name, data), {**source, "format": "json records"}
    raise XlsubError(
        f"corpus: {name} holds a JSON {type(data).__name__}; expected {{lang: [sentence, ...]}} or a list of records"
    )


def _parse_jsonl(name: str, text: str) -> list:
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise XlsubError(f"corpus: {name} line {lineno} is not valid JSON ({e.msg}); fix that line") from e
    return records


def _from_aligned_lists(name: str, data: dict) -> tuple[list[str], Columns]:
    """``{lang: [sentence, ...]}``, all lists the same length; item i is index i of every list."""
    for lang, sentences in data.items():
        if not isinstance(sentences, list):
            raise XlsubError(
                f"corpus: {name} maps {lang!r} to a {type(sentences).__name__}; "
                "expected {lang: [sentence, ...]} with one list per language"
            )
    lengths = {lang: len(sentences) for lang, sentences in data.items()}
    if len(set(lengths.values())) > 1:
        shown = ", ".join(f"{lang} {n}" for lang, n in lengths.items())
        raise XlsubError(
            f"corpus: {name} has lists of different lengths ({shown}); aligned lists need one entry per item "
            "in every language (null or \"\" where a translation is missing)"
        )
    n = next(iter(lengths.values()), 0)
    return [str(i) for i in range(n)], {lang: list(sentences) for lang, sentences in data.items()}


def _from_records(name: str, records: list) -> tuple[list[str], Columns]:
    """``[{"id": ..., "<lang>": text, ...}]``; a language absent from a record is None there."""
    languages: dict[str, None] = {}  # every key but the id, in first-seen order
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise XlsubError(
                f"corpus: {name} record {i} is a JSON {type(record).__name__}; "
                'each record must be an object like {"id": "1", "en": "...", "de": "..."}'
            )
        languages.update((key, None) for key in record if key != ID_COLUMN)
    ids = [str(record.get(ID_COLUMN, i)) for i, record in enumerate(records)]
    return ids, {lang: [record.get(lang) for record in records] for lang in languages}


def _read_saved_dataset(name: str, folder: Path, split: str | None) -> tuple[str, list[str], Columns, dict[str, str]]:
    if not ((folder / "dataset_dict.json").exists() or (folder / "state.json").exists()):
        raise XlsubError(
            f"corpus: folder {name} is not a datasets save_to_disk folder (no dataset_dict.json or state.json); "
            f"give {_FORMATS}"
        )
    dataset = _pick_split(name, datasets.load_from_disk(str(folder)), split)
    source = {"folder": str(folder.resolve()), "format": "save_to_disk", "fingerprint": dataset._fingerprint}
    return name, *_from_dataset(name, dataset), source


def _read_hub_dataset(name: str, split: str | None) -> tuple[str, list[str], Columns, dict[str, str]]:
    try:
        loaded = datasets.load_dataset(name, split=split)
    except (OSError, ValueError) as e:  # ConnectionError, DatasetNotFoundError, offline mode, unknown split
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise XlsubError(
            f"corpus: cannot load hub dataset {name!r} ({reason}); check the id, the split and your connection "
            "(HF_HUB_OFFLINE), or use corpus=embedded or a local file"
        ) from e
    dataset = _pick_split(name, loaded, split)
    source = {"hub": name, "split": str(dataset.split or ""), "fingerprint": dataset._fingerprint}
    return name, *_from_dataset(name, dataset), source


def _pick_split(name: str, loaded, split: str | None) -> datasets.Dataset:
    if isinstance(loaded, datasets.Dataset):
        return loaded
    if split is not None:
        if split not in loaded:
            raise XlsubError(f"split: {name} has no split {split!r} (it has {', '.join(loaded)}); pick one of those")
        return loaded[split]
    if len(loaded) == 1:
        return next(iter(loaded.values()))
    if "test" in loaded:
        return loaded["test"]
    raise XlsubError(f"split: {name} has splits {', '.join(loaded)}; say which one holds the parallel items")


def _from_dataset(name: str, dataset: datasets.Dataset) -> tuple[list[str], Columns]:
    """One column per language (string columns other than ``id``); IDs from ``id``, else the row index."""
    text_columns = [
        column for column, feature in dataset.features.items()
        if column != ID_COLUMN and isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")
    ]
    table = dataset.select_columns(text_columns + ([ID_COLUMN] if ID_COLUMN in dataset.column_names else [])).to_dict()
    ids = [str(i) for i in table.pop(ID_COLUMN)] if ID_COLUMN in table else [str(i) for i in range(len(dataset))]
    return ids, table
