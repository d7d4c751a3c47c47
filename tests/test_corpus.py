"""Tests for xlsub.data.embedded, .splits and .corpus: parsing of Firefox localization files, splitting, and the
corpus loaders.

Parsing is checked against hand-written fixtures (tests/fixtures/corpus) with outputs worked out by
hand; splits are checked against sha256 computed here, independently of the module.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import datasets
import pytest

from xlsub.data import corpus, embedded
from xlsub.data.corpus import load_corpus
from xlsub.data.embedded import (
    EMBEDDED_PACKS,
    clean_text,
    deduplicate,
    drop_untranslated,
    langpack_messages,
    normalise_path,
    parse_ftl,
    parse_properties,
    properties_text,
    read_xpi,
    select_parallel,
)
from xlsub.data.splits import split_flags
from xlsub.errors import XlsubError

FIXTURES = Path(__file__).parent / "fixtures" / "corpus"


def sha_fraction(key: str, seed) -> float:
    """The split rule written out independently: first 8 bytes of sha256(seed NUL key) / 2**64."""
    return int.from_bytes(hashlib.sha256(f"{seed}\x00{key}".encode()).digest()[:8], "big") / 2**64


def col(ds: datasets.Dataset, name: str) -> list:
    return list(ds[name])


def expected_test_items(keys: list[str], seed: int) -> list[str]:
    """Test items of one language: hash below 0.1, else (rule for tiny inputs) the lowest hash."""
    test = [k for k in keys if sha_fraction(k, seed) < 0.1]
    return test or [min(keys, key=lambda k: sha_fraction(k, seed))]


# --------------------------------------------------------------------------------------------
# Fluent
# --------------------------------------------------------------------------------------------


def test_parse_ftl_keeps_text_drops_placeables_terms_shortcuts_and_junk():
    items = parse_ftl((FIXTURES / "sample.ftl").read_text(encoding="utf-8"))
    assert items == {
        "plain": "Open a new window",
        "hello-user": "Hello, ! Welcome back.",
        "brand-sentence": " is up to date",
        "tabs-open": " tabs are open",  # default variant *[other], its { $count } dropped
        "platform-settings": "Settings",  # default variant of a function selector
        "privacy-link": 'Read the <a data-l10n-name="privacy">privacy notice</a> before you <strong>continue</strong>.',
        "multi-line": "This text spans\nseveral lines.",
        "save-page": "Save",
        "save-page.label": "Save page as…",
        "save-page.tooltiptext": "Save this page to your computer",
        "attribute-only.title": "Close all tabs",
        "only-placeable": "",
        "literal-brace": "Use { and } to write braces",
        "number-literal": "Wait 5 seconds",
        "message-ref": "See also: ",
        "after-junk": "Parsing continues after junk",
    }


def test_clean_text_strips_markup_and_collapses_whitespace():
    marked_up = 'Read the <a data-l10n-name="privacy">privacy notice</a> before you <strong>continue</strong>.'
    assert clean_text(marked_up) == "Read the privacy notice before you continue."
    assert clean_text("This text spans\nseveral lines.") == "This text spans several lines."
    assert clean_text("  one\u00a0 two\t\tthree  ") == "one two three"
    assert clean_text("first line<br/>second line") == "first line second line"
    assert clean_text("<!-- trademark --><svg width='1'><path d='M0 0'/></svg>") == ""
    # A "<" that does not open a tag is text, as in HTML parser error messages.
    html_error = "Saw “<>”. Unescaped “<” (escape as “&lt;”)."
    assert clean_text(html_error) == html_error


# --------------------------------------------------------------------------------------------
# .properties
# --------------------------------------------------------------------------------------------


def test_parse_properties_syntax_placeholders_plurals_and_skipped_keys():
    items = parse_properties((FIXTURES / "sample.properties").read_text(encoding="utf-8"))
    assert items == {
        "simple": "Open a new window",
        "colon.separator": "Uses a colon",
        "indented.entry": "leading blanks are ignored",
        "printf": " wants to open  with ",
        "numbers": "Downloaded  of  files (%)",
        "objc": "Shared by ",
        "plural": "One download",
        "prose.semicolon": "Saved; you can close this tab",
        "devtools": "Open  in ",
        "continued": "This line continues on the next line",
        "unicode": "Café — naïve",
        "escapes": "Tab\there and a\\backslash",
        "key with space": "spaced key",
        "empty": "",
    }


def test_properties_plural_takes_first_form_in_every_plural_rule():
    # Real strings from the 140.12 packs: Arabic (rule 12) ends with the "zero" form.
    assert properties_text("One message;#1 messages") == "One message"
    assert properties_text("#1 сообщение;#1 сообщения;#1 сообщений") == " сообщение"
    assert properties_text("رسالة واحدة;رسالتان;#1 رسائل;#1 رسالة;#1 رسالة;لا رسائل") == "رسالة واحدة"
    assert properties_text("#1 条消息") == " 条消息"


# --------------------------------------------------------------------------------------------
# Language packs
# --------------------------------------------------------------------------------------------


def zip_langpack(folder: Path, out: Path) -> Path:
    with zipfile.ZipFile(out, "w") as z:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                z.write(path, path.relative_to(folder).as_posix())
    return out


def fixture_packs(tmp_path) -> dict[str, dict[str, str]]:
    packs = {}
    for lang, folder in (("en", "en-GB"), ("de", "de")):
        locale, files = read_xpi(zip_langpack(FIXTURES / "langpacks" / folder, tmp_path / f"{folder}.xpi"))
        assert locale == folder
        packs[lang] = langpack_messages(files, locale)
    return packs


def test_normalise_path_replaces_every_locale_component():
    assert normalise_path("chrome/zh-CN/locale/zh-CN/global/dom/dom.properties", "zh-CN") == (
        "chrome/{locale}/locale/{locale}/global/dom/dom.properties"
    )
    assert normalise_path("browser/localization/de/browser/browser.ftl", "de") == (
        "browser/localization/{locale}/browser/browser.ftl"
    )


def test_langpack_messages_ids_align_across_packs(tmp_path):
    packs = fixture_packs(tmp_path)
    ftl, props = "localization/{locale}/toolkit/app.ftl", "chrome/{locale}/locale/{locale}/global/app.properties"
    assert packs["en"] == {
        f"{ftl}:welcome": "Welcome to the browser, enjoy the web today",
        f"{ftl}:close-button": "Close",
        f"{ftl}:close-tab": "Close",
        f"{ftl}:cancel": "Cancel",
        f"{ftl}:untranslated": "Bookmarks Toolbar",
        f"{ftl}:only-english": "Only in English",
        f"{props}:downloads": "One download",
        # "symbols" has no letters once its placeables are gone: dropped.
    }
    assert packs["de"] == {
        f"{ftl}:welcome": "Willkommen im Browser, viel Spaß im Netz heute",
        f"{ftl}:close-button": "Schließen",
        f"{ftl}:close-tab": "Schließen",
        f"{ftl}:cancel": "Abbrechen",
        f"{ftl}:untranslated": "Bookmarks Toolbar",
        f"{ftl}:only-german": "Nur auf Deutsch",
        f"{props}:downloads": "Ein Download",
    }


def test_untranslated_copies_and_duplicates_are_dropped(tmp_path):
    packs = drop_untranslated(fixture_packs(tmp_path))
    ftl = "localization/{locale}/toolkit/app.ftl"
    assert f"{ftl}:untranslated" in packs["en"]
    assert f"{ftl}:untranslated" not in packs["de"]
    assert f"{ftl}:only-german" in packs["de"]  # no English counterpart: still German text
    assert list(deduplicate(packs["de"])) == sorted(set(packs["de"]) - {f"{ftl}:close-tab"})


def test_script_rule_drops_en_us_fallbacks_in_non_latin_packs():
    packs = {
        "en": {"a": "Your organisation has blocked access", "b": "Open", "c": "Close"},
        "ur": {"a": "Your organization has blocked access", "b": "کھولیں", "c": "Close"},
        "de": {"a": "Ihre Organisation hat den Zugriff blockiert", "b": "Öffnen", "c": "Close"},
    }
    assert drop_untranslated(packs) == {
        "en": packs["en"],
        "ur": {"b": "کھولیں"},
        "de": {"a": "Ihre Organisation hat den Zugriff blockiert", "b": "Öffnen"},
    }


def test_select_parallel_prefers_long_tops_up_and_caps():
    en = {
        "long1": "one two three four five six",
        "long1-copy": "one two three four five six",  # same English: only the first ID is eligible
        "mid": "one two three",
        "short": "one two",
        "tiny": "one",
        "english-only": "a b c d e f g",
    }
    de = {k: v.upper() for k, v in en.items() if k != "english-only"}
    packs = {"en": en, "de": de}
    assert select_parallel(packs, min_words=6, min_size=3, max_size=5) == ["long1", "mid", "short"]
    assert select_parallel(packs, min_words=6, min_size=1, max_size=5) == ["long1"]
    # The cap picks the IDs with the lowest hash, computed here independently.
    two_long = {"en": {"x": "a b c d e f", "y": "g h i j k l"}, "de": {"x": "A", "y": "B"}}
    expected = min(["x", "y"], key=lambda i: sha_fraction(i, "parallel"))
    assert select_parallel(two_long, min_words=6, min_size=1, max_size=1) == [expected]


# --------------------------------------------------------------------------------------------
# Embedded corpus: build, split and cache (with synthetic packs instead of apt)
# --------------------------------------------------------------------------------------------

SCRIPT_WORD = {
    "en": "sentence", "es": "frase", "ru": "фраза", "de": "Satz", "zh": "句子", "ar": "جملة", "hi": "वाक्य", "ur": "جملہ"
}


def synthetic_packs(n=3000):
    """8 languages; every 10th message short (< 6 words), every 7th an untranslated copy in hi."""
    packs = {}
    for lang in EMBEDDED_PACKS:
        messages = {}
        for i in range(n):
            words = 2 if i % 10 == 0 else 8
            messages[f"f.ftl:m{i:05d}"] = f"{SCRIPT_WORD[lang]} {i} " + " ".join(["w"] * (words - 2))
        packs[lang] = messages
    for i in range(0, n, 7):
        packs["hi"][f"f.ftl:m{i:05d}"] = packs["en"][f"f.ftl:m{i:05d}"]
    packs["de"]["f.ftl:extra"] = packs["de"]["f.ftl:m00001"]  # a duplicate text under another ID
    return packs


def test_build_embedded_holds_out_parallel_and_splits_by_id():
    packs = synthetic_packs()
    built = embedded.build_embedded(packs)
    assert built["parallel"].column_names == ["id", *EMBEDDED_PACKS]
    parallel = built["parallel"].to_dict()
    assert len(parallel["id"]) == embedded.PARALLEL_MAX_SIZE  # 2,314 eligible long items, capped
    assert all(len(en.split()) >= 6 for en in parallel["en"])
    assert not any(int(i[-5:]) % 7 == 0 for i in parallel["id"])  # hi has no real translation of these
    held_out = set(parallel["id"])
    assert built["train"].column_names == ["lang", "text", "id"]
    columns = {split: built[split].to_dict() for split in ("train", "test")}
    items = [
        (split, message_id, lang, text)
        for split, cols in columns.items()
        for message_id, lang, text in zip(cols["id"], cols["lang"], cols["text"])
    ]
    for lang in EMBEDDED_PACKS:
        ids = {split: {i for s, i, l, _ in items if s == split and l == lang} for split in ("train", "test")}
        assert not ids["train"] & ids["test"]
        assert not held_out & (ids["train"] | ids["test"])
        assert ids["test"] == {i for i in ids["train"] | ids["test"] if sha_fraction(i, 0) < 0.1}
        texts = [t for _, _, l, t in items if l == lang]
        assert len(texts) == len(set(texts))  # de's duplicate under "f.ftl:extra" is gone
        assert not set(texts) & set(parallel[lang])
    assert all(lang == "en" or packs["en"].get(i) != t for _, i, lang, t in items)


def test_embedded_cache_is_built_once_and_reused(tmp_path, monkeypatch):
    calls = []

    def fake_fetch(workdir):
        calls.append(workdir)
        return synthetic_packs(), {f"firefox-esr-l10n-{p}": "1.0" for p in EMBEDDED_PACKS.values()}

    monkeypatch.setattr(embedded, "_fetch_packs", fake_fetch)
    c = load_corpus("embedded", ["de", "en"], cache_dir=tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["embedded-v1"]  # the temporary build folder is gone
    cache = tmp_path / "embedded-v1"
    assert {**json.loads((cache / "source.json").read_text()), "uri": cache.resolve().as_uri()} == c.source
    assert c.name == "embedded" and c.languages == ["de", "en"]
    assert c.texts["train"].column_names == ["lang", "text"]
    langs = col(c.texts["train"], "lang")
    assert langs == sorted(langs, key=["de", "en"].index)  # grouped in the requested order
    assert c.parallel.column_names == ["id", *EMBEDDED_PACKS]

    monkeypatch.setattr(embedded, "_fetch_packs", lambda workdir: pytest.fail("cache was rebuilt"))
    again = load_corpus("embedded", ["de", "en"], cache_dir=tmp_path)
    assert col(again.texts["test"], "text") == col(c.texts["test"], "text")
    assert len(calls) == 1

    # Another seed re-splits the same texts; the parallel set does not move.
    other = load_corpus("embedded", ["de", "en"], cache_dir=tmp_path, seed=1)
    assert col(other.texts["test"], "text") != col(c.texts["test"], "text")
    assert sorted(col(other.texts["train"], "text") + col(other.texts["test"], "text")) == sorted(
        col(c.texts["train"], "text") + col(c.texts["test"], "text")
    )
    assert col(other.parallel, "id") == col(c.parallel, "id")


def test_interrupted_build_leaves_no_cache(tmp_path, monkeypatch):
    def crash(workdir):
        raise KeyboardInterrupt

    monkeypatch.setattr(embedded, "_fetch_packs", crash)
    with pytest.raises(KeyboardInterrupt):
        load_corpus("embedded", None, cache_dir=tmp_path)
    assert os.listdir(tmp_path) == []


def test_embedded_without_apt_names_the_alternatives(tmp_path, monkeypatch):
    monkeypatch.setattr(embedded.shutil, "which", lambda name: None)
    with pytest.raises(XlsubError) as e:
        load_corpus("embedded", None, cache_dir=tmp_path)
    message = str(e.value)
    assert "\n" not in message
    assert "apt-get" in message and "corpus=<hub dataset id>" in message and "corpus=<folder" in message
    assert os.listdir(tmp_path) == []


def test_embedded_rejects_unknown_language(tmp_path):
    with pytest.raises(XlsubError) as e:
        load_corpus("embedded", ["en", "xx"], cache_dir=tmp_path)
    assert str(e.value) == (
        "languages: unknown language code 'xx'; valid for corpus=embedded: ar, de, en, es, hi, ru, ur, zh"
    )


@pytest.mark.skipif(
    shutil.which("apt-get") is None and not (corpus.default_cache_dir() / "embedded-v1").exists(),
    reason="needs apt-get (or an already built cache) for the Firefox language packs",
)
def test_real_embedded_corpus():
    """Builds the real corpus once per machine (about 10 s), in the default cache."""
    c = load_corpus("embedded", None)
    assert c.languages == list(EMBEDDED_PACKS)
    assert set(c.source) == {f"firefox-esr-l10n-{p}" for p in EMBEDDED_PACKS.values()} | {"uri"}
    assert len(c.parallel) >= 1000
    built = datasets.load_from_disk(str(corpus.default_cache_dir() / "embedded-v1"))
    parallel = built["parallel"].to_dict()
    columns = {split: built[split].to_dict() for split in ("train", "test")}
    items = [
        (split, message_id, lang, text)
        for split, cols in columns.items()
        for message_id, lang, text in zip(cols["id"], cols["lang"], cols["text"])
    ]
    english = {i: t for _, i, lang, t in items if lang == "en"} | dict(zip(parallel["id"], parallel["en"]))
    held_out = set(parallel["id"])
    for lang in EMBEDDED_PACKS:
        ids = {split: {i for s, i, l, _ in items if s == split and l == lang} for split in ("train", "test")}
        assert not ids["train"] & ids["test"]
        assert not held_out & (ids["train"] | ids["test"])
        assert len(ids["train"]) + len(ids["test"]) + len(held_out) >= 4000
        if lang != "en":
            assert all(english.get(i) != t for _, i, l, t in items if l == lang)
            assert all(english[i] != t for i, t in zip(parallel["id"], parallel[lang]))


# --------------------------------------------------------------------------------------------
# Folder of <lang>.txt files
# --------------------------------------------------------------------------------------------


def write_text_folder(folder: Path) -> dict[str, list[str]]:
    folder.mkdir()
    lines = {
        "en": [f"English line number {i}" for i in range(40)],
        "de": ["Nur eine Zeile", "Und noch eine"],
    }
    (folder / "en.txt").write_text("\n\n".join(lines["en"]) + "\n   \n", encoding="utf-8")
    (folder / "de.txt").write_text("\n".join(lines["de"]), encoding="utf-8")
    return lines


def test_text_folder_splits_by_line_hash(tmp_path):
    lines = write_text_folder(tmp_path / "texts")
    c = load_corpus(str(tmp_path / "texts"), None, seed=0)
    assert c.languages == ["de", "en"]
    assert c.source == {"folder": str((tmp_path / "texts").resolve()), "format": "txt"}
    assert c.parallel is None
    test_en = [t for t, l in zip(col(c.texts["test"], "text"), col(c.texts["test"], "lang")) if l == "en"]
    assert test_en == expected_test_items(lines["en"], 0)
    for split in ("train", "test"):  # de.txt has two lines: one in each split
        assert col(c.texts[split], "lang").count("de") == 1
    assert col(load_corpus(str(tmp_path / "texts"), ["en"], seed=0).texts["test"], "text") == test_en


def test_split_flags_keeps_one_item_in_each_split():
    assert split_flags(["only"], 0) in ([False], [True])
    for n in (2, 3, 5):
        flags = split_flags([f"line {i}" for i in range(n)], 0)
        assert any(flags) and not all(flags)


def test_text_folder_errors(tmp_path):
    write_text_folder(tmp_path / "texts")
    folder = str(tmp_path / "texts")
    with pytest.raises(XlsubError) as e:
        load_corpus(folder, ["de", "fr"])
    assert str(e.value) == f"languages: 'fr' is not in corpus {folder} (it has de, en); add fr.txt or drop fr"
    (tmp_path / "empty").mkdir()
    with pytest.raises(XlsubError, match="has no <lang>.txt files"):
        load_corpus(str(tmp_path / "empty"), None)
    with pytest.raises(XlsubError, match="is a file"):
        load_corpus(str(tmp_path / "texts" / "en.txt"), None)
    (tmp_path / "texts" / "ru.txt").write_bytes("привет".encode("cp1251"))
    with pytest.raises(XlsubError, match="is not UTF-8"):
        load_corpus(folder, ["ru"])


def test_nonexistent_path_fails_without_hub(monkeypatch):
    monkeypatch.setattr(corpus, "_load_hub_dataset", lambda *a: pytest.fail("went to the hub"))
    for name in ("./no/such/folder", "no/such/folder", "/no/such", "nosuchfolder"):
        with pytest.raises(XlsubError, match="not a folder and not a hub dataset id"):
            load_corpus(name, None)


def test_unreachable_hub_id_fails_fast_offline():
    code = (
        "from xlsub.data.corpus import load_corpus\n"
        "from xlsub.errors import XlsubError\n"
        "try:\n"
        "    load_corpus('xlsub-tests/no-such-dataset', ['en'])\n"
        "except XlsubError as e:\n"
        "    print(e)\n"
    )
    start = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=120,
        cwd=Path(__file__).parent.parent,
    )
    assert time.monotonic() - start < 60
    assert out.stdout.startswith("corpus: cannot load hub dataset 'xlsub-tests/no-such-dataset'"), out.stderr
    assert out.stdout.count("\n") == 1


# --------------------------------------------------------------------------------------------
# Saved datasets: the layout of mbelitsky/wikipedia_subset, and xlsub's own
# --------------------------------------------------------------------------------------------


def wiki_articles(lang, n):
    return [f"{lang} article {i}. " + "Some text. " * (i % 5 + 1) for i in range(n)]


def test_saved_dataset_in_the_study_layout(tmp_path):
    # One split per language, one column "text" (see the comment in xlsub/data/corpus.py).
    folder = tmp_path / "wikipedia_subset"
    articles = {lang: wiki_articles(lang, 30) for lang in ("en", "de", "fr")}
    datasets.DatasetDict({lang: datasets.Dataset.from_dict({"text": a}) for lang, a in articles.items()}).save_to_disk(
        str(folder)
    )
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    c = load_corpus(str(folder), ["fr", "en"], seed=0)
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before  # nothing written there
    assert c.languages == ["fr", "en"]
    assert c.source == {"folder": str(folder.resolve()), "format": "save_to_disk"}
    assert c.texts["train"].column_names == ["lang", "text"]
    for lang in ("fr", "en"):
        test = [t for t, l in zip(col(c.texts["test"], "text"), col(c.texts["test"], "lang")) if l == lang]
        train = [t for t, l in zip(col(c.texts["train"], "text"), col(c.texts["train"], "lang")) if l == lang]
        assert test == expected_test_items(articles[lang], 0)
        assert sorted(train + test) == sorted(articles[lang])
    assert col(c.texts["train"], "lang")[0] == "fr"
    with pytest.raises(XlsubError) as e:
        load_corpus(str(folder), ["ru"])
    assert str(e.value) == f"languages: 'ru' is not in corpus {folder} (it has de, en, fr); drop ru"
    assert load_corpus(str(folder), None).languages == ["en", "de", "fr"]


def test_saved_dataset_in_xlsub_layout(tmp_path):
    folder = tmp_path / "texts"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"lang": ["en", "de", "en"], "text": ["a", "b", "c"]}),
            "test": datasets.Dataset.from_dict({"lang": ["de", "en"], "text": ["d", "e"]}),
        }
    ).save_to_disk(str(folder))
    c = load_corpus(str(folder), ["en"])
    assert col(c.texts["train"], "text") == ["a", "c"] and col(c.texts["test"], "text") == ["e"]
    assert col(c.texts["train"], "lang") == ["en", "en"]


def test_saved_dataset_with_unknown_layout(tmp_path):
    folder = tmp_path / "other"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"sentence": ["x"]})}).save_to_disk(str(folder))
    with pytest.raises(XlsubError, match="expected one split per language with a 'text' column"):
        load_corpus(str(folder), None)


def test_saved_dataset_in_xlsub_layout_without_test_split(tmp_path):
    folder = tmp_path / "train-only"
    texts = [f"text {i}" for i in range(30)]
    datasets.Dataset.from_dict({"text": texts, "lang": ["en"] * 30}).save_to_disk(str(folder))
    c = load_corpus(str(folder), None, seed=2)
    assert c.languages == ["en"]
    assert c.texts["train"].column_names == ["lang", "text"]
    assert col(c.texts["test"], "text") == expected_test_items(texts, 2)
    assert sorted(col(c.texts["train"], "text") + col(c.texts["test"], "text")) == sorted(texts)


def test_hub_dataset_records_the_resolved_revision(monkeypatch):
    study_layout = datasets.DatasetDict(
        {lang: datasets.Dataset.from_dict({"text": wiki_articles(lang, 20)}) for lang in ("en", "de")}
    )

    class FakeBuilder:
        hash = "0123abcd"

        def download_and_prepare(self):
            pass

        def as_dataset(self):
            return study_layout

    monkeypatch.setattr(datasets, "load_dataset_builder", lambda name: FakeBuilder())
    c = load_corpus("mbelitsky/wikipedia_subset", ["de"])
    assert c.name == "mbelitsky/wikipedia_subset" and c.languages == ["de"]
    assert c.source == {"hub": "mbelitsky/wikipedia_subset", "revision": "0123abcd"}
    assert set(col(c.texts["train"], "lang")) == set(col(c.texts["test"], "lang")) == {"de"}
    assert len(c.texts["train"]) + len(c.texts["test"]) == 20
