"""Parallel-corpus loaders: every format gives the same aligned rows, incomplete items dropped and counted."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from xlsub.data.parallel import load_parallel
from xlsub.errors import XlsubError

FIXTURES = Path(__file__).parent / "fixtures" / "parallel"
BIBLE = str(FIXTURES / "bible.json")  # de blank at index 2, es null at index 3
ITEMS = str(FIXTURES / "items.jsonl")  # "bye" has no zh, "help" has blank de


def raw_bible() -> dict[str, list]:
    return json.loads((FIXTURES / "bible.json").read_text())


@pytest.fixture
def no_hub(monkeypatch):
    """Fail the test if anything reaches for the hub."""

    def refuse(*args, **kwargs):
        raise AssertionError("the hub must not be tried")

    monkeypatch.setattr(datasets, "load_dataset", refuse)


# -- JSON {lang: [sentences]} ---------------------------------------------------------------------

def test_json_aligned_lists_drop_items_missing_in_any_language():
    bible = raw_bible()
    corpus = load_parallel(BIBLE, None, max_sentences=None)
    assert corpus.languages == ["en", "de", "es"]
    assert corpus.ids == ["0", "1", "4"]
    assert corpus.dropped == 2
    for lang in corpus.languages:
        assert corpus.texts[lang] == [bible[lang][int(i)] for i in corpus.ids]
    assert corpus.source["format"] == "json" and len(corpus.source["sha256"]) == 64


@pytest.mark.parametrize(
    ("languages", "ids", "dropped"),
    [(["en", "de"], ["0", "1", "3", "4"], 1), (["es", "en"], ["0", "1", "2", "4"], 1), (["en"], ["0", "1", "2", "3", "4"], 0)],
)
def test_json_only_requested_languages_count(languages, ids, dropped):
    corpus = load_parallel(BIBLE, languages, max_sentences=None)
    assert corpus.languages == languages
    assert list(corpus.texts) == languages
    assert corpus.ids == ids and corpus.dropped == dropped
    assert corpus.texts["en"] == [raw_bible()["en"][int(i)] for i in ids]


def test_max_sentences_keeps_the_first_complete_items():
    corpus = load_parallel(BIBLE, ["en", "de"], max_sentences=3)
    assert corpus.ids == ["0", "1", "3"]
    assert corpus.dropped == 1  # counted over the whole corpus, not the kept prefix
    assert load_parallel(BIBLE, ["en", "de"], max_sentences=100).ids == ["0", "1", "3", "4"]


def test_json_file_of_records_and_jsonl_under_a_json_name(tmp_path):
    records = [{"id": 7, "en": "One.", "de": "Eins.", "verse": 1}, {"id": 8, "en": "Two.", "verse": 2}]
    (tmp_path / "records.json").write_text(json.dumps(records))
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in records))
    for name in ("records.json", "lines.json"):
        corpus = load_parallel(str(tmp_path / name), None, max_sentences=None)
        assert corpus.ids == ["7"] and corpus.texts == {"en": ["One."], "de": ["Eins."]} and corpus.dropped == 1


# -- JSONL ----------------------------------------------------------------------------------------

def test_jsonl_records_by_id():
    corpus = load_parallel(ITEMS, None, max_sentences=None)
    assert corpus.languages == ["en", "de", "zh"]
    assert corpus.ids == ["greet", "thanks", "water"]
    assert corpus.dropped == 2
    assert corpus.texts["zh"] == ["早上好。", "非常感谢。", "请给我一杯水。"]
    assert corpus.texts["de"][2] == "Ein Glas Wasser, bitte."
    assert corpus.source["format"] == "jsonl"

    en_de = load_parallel(ITEMS, ["en", "de"], max_sentences=None)
    assert en_de.ids == ["greet", "thanks", "bye", "water"] and en_de.dropped == 1
    assert en_de.texts["en"][2] == "Goodbye."


# -- datasets: save_to_disk folder and hub --------------------------------------------------------

def bible_dataset(with_id: bool = True) -> datasets.Dataset:
    bible = raw_bible()
    columns = dict(bible)
    columns["verse"] = [1, 2, 3, 4, 5]  # not text: never taken for a language
    if with_id:
        columns["id"] = [f"Gen.1.{i + 1}" for i in range(5)]
    return datasets.Dataset.from_dict(columns)


def test_saved_dataset_with_id_column(tmp_path, no_hub):
    bible_dataset().save_to_disk(str(tmp_path / "ds"))
    corpus = load_parallel(str(tmp_path / "ds"), None, max_sentences=None)
    assert corpus.languages == ["en", "de", "es"]
    assert corpus.ids == ["Gen.1.1", "Gen.1.2", "Gen.1.5"] and corpus.dropped == 2
    assert corpus.texts["es"] == [raw_bible()["es"][i] for i in (0, 1, 4)]
    assert corpus.source["format"] == "save_to_disk"


def test_saved_dataset_dict_without_ids_uses_the_index(tmp_path, no_hub):
    splits = datasets.DatasetDict({"train": bible_dataset(False).select(range(2)), "test": bible_dataset(False)})
    splits.save_to_disk(str(tmp_path / "dd"))
    corpus = load_parallel(str(tmp_path / "dd"), ["en", "de"], max_sentences=None)  # two splits: "test" by default
    assert corpus.ids == ["0", "1", "3", "4"] and corpus.dropped == 1
    train = load_parallel(str(tmp_path / "dd"), ["en", "de"], split="train", max_sentences=None)
    assert train.ids == ["0", "1"] and train.texts["de"] == raw_bible()["de"][:2]
    with pytest.raises(XlsubError, match="^split: "):
        load_parallel(str(tmp_path / "dd"), None, split="validation", max_sentences=None)


def test_hub_dataset_goes_through_load_dataset(monkeypatch):
    calls = []

    def fake_load_dataset(name, split=None):
        calls.append((name, split))
        return bible_dataset()

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    corpus = load_parallel("someone/bible-parallel", ["en", "es"], max_sentences=2, split="test")
    assert calls == [("someone/bible-parallel", "test")]
    assert corpus.ids == ["Gen.1.1", "Gen.1.2"] and corpus.dropped == 1
    assert corpus.source["hub"] == "someone/bible-parallel"


def test_hub_failure_is_one_line(monkeypatch):
    def offline(name, split=None):
        raise ConnectionError("Couldn't reach 'someone/missing' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(XlsubError, match="^corpus: cannot load hub dataset 'someone/missing'") as caught:
        load_parallel("someone/missing", None, max_sentences=None)
    assert "\n" not in str(caught.value)


# -- embedded -------------------------------------------------------------------------------------

def test_embedded_parallel_set():
    corpus = load_parallel("embedded", None, max_sentences=None)
    assert corpus.name == "embedded"
    assert corpus.languages == ["en", "es", "ru", "de", "zh", "ar", "hi", "ur"]
    assert len(corpus.ids) >= 1000 and len(set(corpus.ids)) == len(corpus.ids)
    assert corpus.dropped == 0
    for lang in corpus.languages:
        assert len(corpus.texts[lang]) == len(corpus.ids)
        assert all(text.strip() for text in corpus.texts[lang])
    assert corpus.texts["de"][0] != corpus.texts["en"][0]  # translations, not copies
    assert any(key.startswith("firefox-esr-l10n-") for key in corpus.source)

    first = load_parallel("embedded", ["de", "en"], max_sentences=10)
    assert first.languages == ["de", "en"]
    assert first.ids == corpus.ids[:10] and first.texts["en"] == corpus.texts["en"][:10]


# -- bad input: one line that starts with the parameter's name ------------------------------------

@pytest.mark.parametrize(
    ("kwargs", "prefix", "mentions"),
    [
        (dict(corpus=BIBLE, languages=["en", "fr"]), "languages: ", "has no 'fr' (it has de, en, es)"),
        (dict(corpus=BIBLE, languages=["en", "en"]), "languages: ", "twice"),
        (dict(corpus=BIBLE, languages=[]), "languages: ", "list of ISO codes"),
        (dict(corpus=BIBLE, languages=None, max_sentences=0), "max_sentences: ", "positive"),
        (dict(corpus=BIBLE, languages=None, max_sentences=-3), "max_sentences: ", "positive"),
        (dict(corpus="embedded", languages=["en", "fr"]), "languages: ", "has no 'fr'"),
    ],
)
def test_bad_parameters(kwargs, prefix, mentions):
    with pytest.raises(XlsubError) as caught:
        load_parallel(**({"max_sentences": None} | kwargs))
    message = str(caught.value)
    assert message.startswith(prefix) and mentions in message and "\n" not in message


@pytest.mark.parametrize(
    ("content", "languages", "mentions"),
    [
        ('{"en": ["a", "b"], "de": ["a"', None, "not valid JSON (line 1"),
        ('{"en": ["a", "b"], "de": ["a"]}', None, "different lengths (en 2, de 1)"),
        ('{"en": "a sentence"}', None, "maps 'en' to a str"),
        ('{"en": ["a", ""], "de": [null, "b"]}', None, "no item with text in every one of en, de"),
        ('{"en": ["a", 3], "de": ["b", "c"]}', ["en", "de"], "has a int for 'en'"),
        ('{"n": [1, 2]}', None, "has no column of text (it has n)"),
        ('"just a string"', None, "holds a JSON str"),
    ],
)
def test_bad_files(tmp_path, no_hub, content, languages, mentions):
    path = tmp_path / "corpus.json"
    path.write_text(content)
    with pytest.raises(XlsubError) as caught:
        load_parallel(str(path), languages, max_sentences=None)
    message = str(caught.value)
    assert message.startswith("corpus: ") and mentions in message and "\n" not in message


def test_bad_jsonl_line_and_duplicate_ids(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"id": 1, "en": "a"}\n{"id": 2, "en": \n')
    with pytest.raises(XlsubError, match="^corpus: .* line 2 is not valid JSON"):
        load_parallel(str(tmp_path / "bad.jsonl"), None, max_sentences=None)
    (tmp_path / "dup.jsonl").write_text('{"id": 1, "en": "a"}\n{"id": "1", "en": "b"}\n')
    with pytest.raises(XlsubError, match="^corpus: .* the id '1' twice"):
        load_parallel(str(tmp_path / "dup.jsonl"), None, max_sentences=None)


@pytest.mark.parametrize("name", ["missing.json", "data/missing.jsonl", "./nope", "/no/such/folder", "not a hub id"])
def test_missing_path_fails_at_once_without_the_hub(no_hub, name):
    with pytest.raises(XlsubError, match=r"^corpus: .* does not exist; give embedded"):
        load_parallel(name, None, max_sentences=None)


def test_folder_that_is_not_a_dataset(tmp_path, no_hub):
    with pytest.raises(XlsubError, match="^corpus: folder .* is not a datasets save_to_disk folder"):
        load_parallel(str(tmp_path), None, max_sentences=None)
