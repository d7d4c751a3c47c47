"""The embedded corpus: the Firefox ESR localization packs shipped by Debian, as plain text.

The packs (``firefox-esr-l10n-<pack>``, see ``EMBEDDED_PACKS``) are fetched with ``apt-get download``,
unpacked with ``dpkg-deb``, and their Fluent (``fluent.syntax``) and ``.properties`` messages parsed
and cleaned. Messages aligned across all 8 languages give a held-out parallel set (used only for
encoding, never for MLM training or evaluation); the rest is split into train and test by message ID
(``xlsub.data.splits``). ``embedded_cache`` builds all this once per machine and caches it on disk;
``xlsub.data.corpus.load_corpus("embedded", ...)`` reads it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
import unicodedata
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath

import datasets
from fluent.syntax import FluentParser
from fluent.syntax import ast as fluent_ast

from xlsub.data.splits import hash_fraction, is_test
from xlsub.errors import XlsubError

log = logging.getLogger(__name__)

# ISO code -> Debian package suffix: firefox-esr-l10n-<pack>.
EMBEDDED_PACKS = {
    "en": "en-gb",
    "es": "es-es",
    "ru": "ru",
    "de": "de",
    "zh": "zh-cn",
    "ar": "ar",
    "hi": "hi-in",
    "ur": "ur",
}
ENGLISH = "en"
EMBEDDED_CACHE_NAME = "embedded-v1"  # bump when parsing or splitting rules change
PARALLEL_MIN_WORDS = 6  # English words for an item to count as sentence-length
PARALLEL_MIN_SIZE = 1000
PARALLEL_MAX_SIZE = 1500


# --------------------------------------------------------------------------------------------
# Firefox localization files -> plain text
# --------------------------------------------------------------------------------------------

# Attributes and keys that hold keyboard shortcuts or CSS, not language.
_NON_TEXT_ATTRIBUTES = {"key", "keycode", "commandkey", "style"}
_NON_TEXT_KEY = re.compile(r"accesskey|commandkey|[._-]key$|[._-]keycode$", re.IGNORECASE)
# intl.properties holds locale settings ("de, en-US, en", "x-western"), not messages.
_LOCALE_SETTING_KEY = re.compile(r"^(intl\.|font\.|pluralRule$)")


def _is_text_name(name: str) -> bool:
    return name.lower() not in _NON_TEXT_ATTRIBUTES and not _NON_TEXT_KEY.search(name)


def pattern_text(pattern: fluent_ast.Pattern | None) -> str:
    """The literal text of a Fluent pattern.

    Text elements are kept. Placeables are dropped (variables, message and term references such
    as ``{ -brand-short-name }``, functions), except string and number literals, which Fluent uses
    to write characters literally (``{ "{" }``). A select expression contributes the text of its
    default variant (``*[other]``), the form a translator marks as the general case; its other
    variants are dropped so each message gives one text in every language.
    """
    if pattern is None:
        return ""
    parts = []
    for element in pattern.elements:
        if isinstance(element, fluent_ast.TextElement):
            parts.append(element.value)
        else:
            parts.append(_placeable_text(element.expression))
    return "".join(parts)


def _placeable_text(expression) -> str:
    if isinstance(expression, fluent_ast.StringLiteral):
        return expression.parse()["value"]
    if isinstance(expression, fluent_ast.NumberLiteral):
        return expression.value
    if isinstance(expression, fluent_ast.SelectExpression):
        default = next(v for v in expression.variants if v.default)
        return pattern_text(default.value)
    if isinstance(expression, fluent_ast.Placeable):
        return _placeable_text(expression.expression)
    return ""


def parse_ftl(text: str) -> dict[str, str]:
    """Fluent (.ftl) source -> {message id or ``id.attribute``: literal text}.

    Each message value and each attribute is one item (an attribute's id is ``<message>.<attr>``).
    Terms (``-brand-name = ...``) are skipped: they are brand names, not sentences. Attributes that
    are keyboard shortcuts or CSS (``accesskey``, ``key``, ``style``, ...) are skipped. Junk (syntax
    errors) is skipped. The text is not cleaned yet: see ``clean_text``.
    """
    items: dict[str, str] = {}
    for entry in FluentParser(with_spans=False).parse(text).body:
        if not isinstance(entry, fluent_ast.Message):
            continue
        if entry.value is not None:
            items[entry.id.name] = pattern_text(entry.value)
        for attribute in entry.attributes:
            if _is_text_name(attribute.id.name):
                items[f"{entry.id.name}.{attribute.id.name}"] = pattern_text(attribute.value)
    return items


_PROPERTIES_ESCAPES = {"t": "\t", "n": "\n", "r": "\r", "f": "\f"}


def _unescape_properties(s: str) -> str:
    out, i = [], 0
    while i < len(s):
        ch = s[i]
        if ch != "\\" or i + 1 == len(s):
            out.append(ch)
            i += 1
            continue
        nxt = s[i + 1]
        if nxt == "u" and re.fullmatch(r"[0-9A-Fa-f]{4}", s[i + 2 : i + 6]):
            out.append(chr(int(s[i + 2 : i + 6], 16)))
            i += 6
        else:
            out.append(_PROPERTIES_ESCAPES.get(nxt, nxt))
            i += 2
    return "".join(out)


def _logical_lines(text: str) -> Iterable[str]:
    """Join lines ending in an odd number of backslashes with the next (leading blanks dropped)."""
    pending = None
    for raw in text.splitlines():
        line = raw if pending is None else pending + raw.lstrip()
        trailing = len(line) - len(line.rstrip("\\"))
        if trailing % 2 == 1:
            pending = line[:-1]
            continue
        pending = None
        yield line
    if pending is not None:
        yield pending


def parse_properties_raw(text: str) -> dict[str, str]:
    """Java/Mozilla .properties source -> {key: value}, escapes decoded, nothing else removed.

    Lines starting with ``#`` or ``!`` are comments; a trailing backslash continues a line; the key
    ends at the first unescaped ``=``, ``:`` or blank; ``\\uXXXX``, ``\\n``, ``\\t`` and ``\\<c>``
    escapes are decoded.
    """
    items: dict[str, str] = {}
    for line in _logical_lines(text):
        stripped = line.lstrip()
        if not stripped or stripped[0] in "#!":
            continue
        i = 0
        while i < len(stripped) and stripped[i] not in "=: \t\f":
            i += 2 if stripped[i] == "\\" else 1
        key = stripped[:i]
        rest = stripped[i:].lstrip(" \t\f")
        if rest[:1] in ("=", ":"):
            rest = rest[1:].lstrip(" \t\f")
        items[_unescape_properties(key)] = _unescape_properties(rest)
    return items


# printf (%S, %1$S, %d, %@, %.2f, %ld), Mozilla plural placeholders (#1), devtools {{name}},
# Fluent-style { $var }; %% is a literal percent sign.
_PLACEHOLDER = re.compile(
    r"%%"
    r"|%(?:\d+\$)?[-+ #0]*\d*(?:\.\d+)?(?:ll|l|h)?[sSdDuifFxXc@]"
    r"|#\d+"
    r"|\{\{\s*[\w.$-]+\s*\}\}"
    r"|\{\s*\$[\w-]+\s*\}"
)


def strip_placeholders(value: str) -> str:
    """Remove the placeholders of .properties strings; ``%%`` becomes ``%``."""
    return _PLACEHOLDER.sub(lambda m: "%" if m.group(0) == "%%" else "", value)


def properties_text(value: str) -> str:
    """A .properties value -> literal text: first plural form, placeholders removed.

    Mozilla plural strings (PluralForm.sys.mjs) list forms separated by ``;`` and use ``#1`` for
    the number; we treat a value as a plural list when it contains both. The first form is kept:
    it is the "one" form in all 8 embedded locales (the last form is "zero" in Arabic, rule 12:
    one;two;few;many;other;zero). Values with ``;`` but no ``#1`` are ordinary prose.
    """
    if ";" in value and "#1" in value:
        value = value.split(";", 1)[0]
    return strip_placeholders(value)


def parse_properties(text: str) -> dict[str, str]:
    """.properties source -> {key: literal text}, skipping shortcut keys and locale settings."""
    return {
        key: properties_text(value)
        for key, value in parse_properties_raw(text).items()
        if _is_text_name(key) and not _LOCALE_SETTING_KEY.match(key)
    }


_BREAK_TAG = re.compile(r"<br\s*/?>", re.IGNORECASE)
_MARKUP = re.compile(r"<!--.*?-->|</?[A-Za-z][^<>]*>", re.DOTALL)
_WHITESPACE = re.compile(r"\s+")


def clean_text(s: str) -> str:
    """Strip markup (HTML/XML tags such as ``<a data-l10n-name="x">``, comments), keep the text
    between tags, and collapse runs of whitespace to one space. ``<`` not starting a tag stays."""
    s = _BREAK_TAG.sub(" ", s)
    s = _MARKUP.sub("", s)
    return _WHITESPACE.sub(" ", s).strip()


def has_letter(s: str) -> bool:
    return any(ch.isalpha() for ch in s)


def normalise_path(path: str, locale: str) -> str:
    """Replace the path components naming the pack's locale (``de``, ``en-GB``, ``zh-CN``) with
    ``{locale}``, so the same file has the same path in every pack."""
    return "/".join("{locale}" if part == locale else part for part in PurePosixPath(path).parts)


def langpack_messages(files: Mapping[str, str], locale: str) -> dict[str, str]:
    """Files of one language pack ({path inside the pack: source text}) -> {message ID: clean text}.

    A message ID is ``<normalised path>:<id>``, e.g.
    ``browser/localization/{locale}/browser/browser.ftl:urlbar-identity-button.aria-label``.
    Items with no letters after cleaning are dropped (empty values, pure placeholders, symbols).
    """
    messages: dict[str, str] = {}
    for path in sorted(files):
        if path.endswith(".ftl"):
            items = parse_ftl(files[path])
        elif path.endswith(".properties"):
            items = parse_properties(files[path])
        else:
            continue
        prefix = normalise_path(path, locale)
        for key, text in items.items():
            text = clean_text(text)
            if has_letter(text):
                messages[f"{prefix}:{key}"] = text
    return messages


def read_xpi(xpi: Path) -> tuple[str, dict[str, str]]:
    """A Firefox language pack (.xpi, a zip) -> (locale, {path: text} of its .ftl and .properties).

    The locale is ``langpack_id`` in ``manifest.json`` (e.g. ``en-GB``, ``zh-CN``).
    """
    with zipfile.ZipFile(xpi) as z:
        locale = json.loads(z.read("manifest.json"))["langpack_id"]
        files = {
            name: z.read(name).decode("utf-8")
            for name in z.namelist()
            if name.endswith((".ftl", ".properties"))
        }
    return locale, files


# Languages with a script of their own: a text in such a pack with no letter of that script is
# not in that language (names in unicodedata start with the script: "CYRILLIC SMALL LETTER A").
EMBEDDED_SCRIPTS = {"ru": "CYRILLIC", "zh": "CJK", "ar": "ARABIC", "hi": "DEVANAGARI", "ur": "ARABIC"}


def has_script_letter(text: str, script: str) -> bool:
    return any(ch.isalpha() and unicodedata.name(ch, "").startswith(script) for ch in text)


def drop_untranslated(packs: Mapping[str, Mapping[str, str]]) -> dict[str, dict[str, str]]:
    """Drop untranslated copies of English from the non-English packs.

    Packs fall back to English where a translation is missing (in the 140.12 packs 500-1,700
    strings each in ru, zh, ar, hi, ur; about 900 in es and de, mostly names, terms and new
    strings). A copy is a text equal to the English (en-GB) text of the same ID, or, in a language
    listed in ``EMBEDDED_SCRIPTS``, a text with no letter of its script: the fallback is en-US,
    which differs from en-GB in spelling and quotes ("organization").
    """
    english = packs[ENGLISH]

    def translated(lang: str, message_id: str, text: str) -> bool:
        if lang == ENGLISH:
            return True
        if english.get(message_id) == text:
            return False
        return lang not in EMBEDDED_SCRIPTS or has_script_letter(text, EMBEDDED_SCRIPTS[lang])

    return {
        lang: {i: t for i, t in messages.items() if translated(lang, i, t)}
        for lang, messages in packs.items()
    }


def deduplicate(messages: Mapping[str, str]) -> dict[str, str]:
    """Keep the first ID (in sorted order) of each distinct text."""
    seen: set[str] = set()
    kept = {}
    for message_id in sorted(messages):
        if messages[message_id] not in seen:
            seen.add(messages[message_id])
            kept[message_id] = messages[message_id]
    return kept


def select_parallel(
    packs: Mapping[str, Mapping[str, str]],
    min_words: int = PARALLEL_MIN_WORDS,
    min_size: int = PARALLEL_MIN_SIZE,
    max_size: int = PARALLEL_MAX_SIZE,
) -> list[str]:
    """IDs for the held-out parallel set, sorted: present in every language of ``packs``.

    Only one ID per English text is eligible (the first by sorted ID), so no sentence is encoded
    twice. Sentence-length items are preferred: at least ``min_words`` English words. If there are
    more than ``max_size`` of them, a hash of the ID picks ``max_size``; if fewer than ``min_size``,
    the longest other aligned IDs (by English words, ties by ID) top the set up.
    """
    aligned = set.intersection(*(set(m) for m in packs.values()))
    candidates = deduplicate({i: packs[ENGLISH][i] for i in aligned})
    words = {i: len(t.split()) for i, t in candidates.items()}
    long_ids = sorted(i for i in candidates if words[i] >= min_words)
    if len(long_ids) > max_size:
        long_ids = sorted(sorted(long_ids, key=lambda i: hash_fraction(i, "parallel"))[:max_size])
    others = sorted((i for i in candidates if words[i] < min_words), key=lambda i: (-words[i], i))
    chosen = long_ids + others[: max(0, min_size - len(long_ids))]
    if len(chosen) < min_size:
        log.warning("only %d messages are aligned across all languages (wanted %d)", len(chosen), min_size)
    return sorted(chosen)


def build_embedded(packs: Mapping[str, Mapping[str, str]]) -> datasets.DatasetDict:
    """Per-language {ID: clean text} of all embedded languages -> DatasetDict train/test/parallel.

    1. ``drop_untranslated``; 2. ``select_parallel`` holds out IDs aligned across all languages;
    3. per language, every text equal to one of its held-out texts is removed (a duplicate under
    another ID would leak the parallel set into training), then ``deduplicate``; 4. an item goes
    to test when ``is_test(ID, seed=0)``, so the test IDs are the same in every language.
    train and test have columns lang, text, id; parallel has id and one column per language.
    """
    translated = drop_untranslated(packs)
    parallel_ids = select_parallel(translated)
    held_out = set(parallel_ids)
    columns: dict[str, dict[str, list[str]]] = {s: {"lang": [], "text": [], "id": []} for s in ("train", "test")}
    for lang in EMBEDDED_PACKS:
        held_texts = {translated[lang][i] for i in parallel_ids}
        rest = {i: t for i, t in translated[lang].items() if i not in held_out and t not in held_texts}
        for message_id, text in deduplicate(rest).items():
            split = columns["test" if is_test(message_id, 0) else "train"]
            split["lang"].append(lang)
            split["text"].append(text)
            split["id"].append(message_id)
    parallel = {"id": parallel_ids} | {lang: [translated[lang][i] for i in parallel_ids] for lang in EMBEDDED_PACKS}
    return datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(columns["train"]),
            "test": datasets.Dataset.from_dict(columns["test"]),
            "parallel": datasets.Dataset.from_dict(parallel),
        }
    )


# --------------------------------------------------------------------------------------------
# corpus=embedded: download, build once, cache
# --------------------------------------------------------------------------------------------

_NO_APT = (
    "corpus=embedded needs apt-get (Debian/Ubuntu) to fetch the Firefox ESR language packs; {why}. "
    "Use corpus=<hub dataset id> (e.g. mbelitsky/wikipedia_subset) or corpus=<folder of <lang>.txt files>"
)


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)


def _download_debs(workdir: Path) -> dict[str, Path]:
    """``apt-get download`` the 8 packs into ``workdir``; one ``apt-get update`` and a retry if needed."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise XlsubError(_NO_APT.format(why="apt-get or dpkg-deb is not installed here"))
    packages = [f"firefox-esr-l10n-{pack}" for pack in EMBEDDED_PACKS.values()]
    workdir.mkdir(parents=True, exist_ok=True)
    result = _run(["apt-get", "download", *packages], workdir)
    if result.returncode != 0:
        log.info("apt-get download failed; running apt-get update once and retrying")
        _run(["apt-get", "update"], workdir)
        result = _run(["apt-get", "download", *packages], workdir)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no message"])[-1]
        raise XlsubError(_NO_APT.format(why=f"apt-get download failed ({last})"))
    debs = {}
    for lang, pack in EMBEDDED_PACKS.items():
        found = sorted(workdir.glob(f"firefox-esr-l10n-{pack}_*.deb"))
        if not found:
            raise XlsubError(_NO_APT.format(why=f"apt-get download gave no firefox-esr-l10n-{pack}"))
        debs[lang] = found[0]
    return debs


def _fetch_packs(workdir: Path) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """Download and parse the 8 packs -> ({lang: {ID: text}}, {package: Debian version})."""
    packs, versions = {}, {}
    for lang, deb in _download_debs(workdir).items():
        package = f"firefox-esr-l10n-{EMBEDDED_PACKS[lang]}"
        fields = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], capture_output=True, text=True, check=True)
        versions[package] = fields.stdout.strip()
        root = workdir / lang
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
        (xpi,) = root.glob("usr/lib/firefox-esr/browser/extensions/langpack-*.xpi")
        locale, files = read_xpi(xpi)
        packs[lang] = langpack_messages(files, locale)
        log.info("%s (%s %s): %d files, %d strings", lang, package, versions[package], len(files), len(packs[lang]))
    return packs, versions


def embedded_cache(cache_dir: Path) -> Path:
    """Path of the built embedded corpus, building it first if it is missing.

    The build goes to a temporary folder inside ``cache_dir`` and is renamed into place only when
    complete, so an interrupted build never leaves a folder that looks finished.
    """
    final = cache_dir / EMBEDDED_CACHE_NAME
    if (final / "source.json").exists():
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    log.info("building the embedded corpus in %s (once per machine)", final)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=f".{EMBEDDED_CACHE_NAME}-") as tmp:
        tmp = Path(tmp)
        packs, versions = _fetch_packs(tmp / "download")
        built = build_embedded(packs)
        built.save_to_disk(str(tmp / "dataset"))
        (tmp / "dataset" / "source.json").write_text(json.dumps(versions, indent=1, sort_keys=True))
        try:
            os.replace(tmp / "dataset", final)
        except OSError:
            if not (final / "source.json").exists():  # not a concurrent build that finished first
                raise
    log.info(
        "built the embedded corpus in %.1f s: %s",
        time.perf_counter() - start,
        ", ".join(f"{split} {n}" for split, n in built.num_rows.items()),
    )
    return final
