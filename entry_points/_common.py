"""What every entry point shares: the parameter dataclass base with its checks, flag parsing, languages,
distributed rank."""

from __future__ import annotations

import copy
import importlib
import logging
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import ClassVar, TypeVar, get_type_hints

from transformers import HfArgumentParser

from xlsub import stages
from xlsub.artifacts import is_language_code
from xlsub.devices import PRECISIONS
from xlsub.errors import Range, XlsubError
from xlsub.tracking.runs import unquote

T = TypeVar("T")
DEVICE_HELP = "auto, cpu, cuda, cuda:N or mps"

# -- what a field accepts, in its metadata --------------------------------------------------------------
# int and float fields: "range", a Range (required; NaN and +-inf lie outside every Range).
# str fields: stripped of surrounding spaces, and non-empty unless "optional"; besides that, any of
#   "keywords": whole values accepted as they are, case-insensitive (`all`, `latest`, `none`);
#   "choices": the only values accepted; "pattern": a regular expression the value matches in full;
#   "number": a Range for a number written as text (`target_sparsity`);
#   "items": a comma-separated list, no empty or repeated item, each a LANGUAGE, a RUN_ID, one of a tuple of
#            choices (lower-cased), or an
#            integer in a Range;
#   "kind": LANGUAGE or RUN_ID for a single value.
# Languages are lower-cased: `DE` is `de`.
LANGUAGE = "language"
RUN_ID = "run_id"
SEED = Range(0, 2**32, high_open=True, meaning="a seed")  # what numpy, torch and transformers.set_seed take
COUNT = Range(1)
REPLICATES = Range(10, meaning="a number of bootstrap replicates (1000 for 95% intervals)")


def device_field(default: str = "auto"):
    return field(default=default, metadata={"help": DEVICE_HELP, "pattern": r"auto|cpu|mps|cuda(:\d+)?"})


def precision_help(passes: str) -> str:
    return f"{passes} in fp32, or mixed precision (bf16, fp16: torch.autocast): several times faster on a GPU or a CPU with AMX"


def precision_field(passes: str):
    """The `precision` of a stage's model passes outside training (`xlsub.devices.autocast`); `passes` names them."""
    return field(default="fp32", metadata={"help": precision_help(passes), "choices": tuple(PRECISIONS)})


def run_id_field(help: str):
    return field(default="latest", metadata={"help": help, "kind": RUN_ID, "keywords": ("latest",)})


def optional_run_id_field(help: str):
    """A registry input the stage can go without (`Stage.optional`): a run ID, `latest` or `none` (the default)."""
    return field(default="none", metadata={"help": help, "kind": RUN_ID, "keywords": ("latest", "none")})


@dataclass
class StageArgs:
    """Base of the stage parameter dataclasses: the one place a stage's parameters, defaults, help and
    bounds are declared. MLproject is generated from these classes (`python -m entry_points.mlproject`).

    `validate()` checks every field against its metadata (so a new parameter is checked by default), then
    the stage's own `check_stage()`: rules between parameters and what metadata cannot state. Fields
    named in `NOT_FOR_REUSE` cannot change a result (where logs or checkpoints go, how often they are
    written): `main` leaves them out when it looks for a finished run to reuse.
    """

    NOT_FOR_REUSE: ClassVar[tuple[str, ...]] = ()
    _refusal: ClassVar[XlsubError | None] = None  # set on arguments that did not parse (`parse_args`)

    def __post_init__(self) -> None:
        """Spelling only, never a refusal (that is `validate`'s, inside the run): ` abc ` is `abc`, `DE` is `de`."""
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, str):
                setattr(self, f.name, _normal(value, f.metadata))

    def validate(self) -> None:
        """Refuse bad values with one XlsubError line naming the parameter. Runs inside the stage's run."""
        if self._refusal is not None:
            raise self._refusal
        hints = get_type_hints(type(self))
        for f in fields(self):
            _check_field(f.name, hints[f.name], getattr(self, f.name), f.metadata)
        self.check_stage()

    def check_stage(self) -> None:
        """The stage's own checks, after every field passed its metadata's: rules between parameters,
        files that must exist. Override."""

    # -- to and from MLflow --------------------------------------------------------------------------------
    def params(self) -> dict[str, str]:
        """Every parameter spelled as `mlflow run -P` takes it (booleans lower-case)."""
        return {f.name: (str(v).lower() if isinstance(v := getattr(self, f.name), bool) else str(v)) for f in fields(self)}

    def reuse_params(self) -> dict[str, str]:
        """The parameters a reused run must match: all but those in `NOT_FOR_REUSE`."""
        return {k: v for k, v in self.params().items() if k not in self.NOT_FOR_REUSE}

    @classmethod
    def from_params(cls: type[T], params: Mapping[str, str], param: str = "run") -> T:
        """The arguments a finished run ran with, rebuilt from its logged parameters with the same parser
        the command line uses (parameters the run did not log keep their defaults)."""
        argv = []
        for f in fields(cls):
            if f.name in params:
                argv.append(f"--{f.name}={unquote(params[f.name])}")
        try:
            return _parse(cls, argv)
        except XlsubError as err:
            raise XlsubError(f"{param}: its logged parameters do not parse as {cls.__name__} ({err}); rerun that stage") from None

    @classmethod
    def refusing(cls: type[T], err: XlsubError, given: Mapping[str, str]) -> T:
        """Defaults, with the values given on the command line as typed (the FAILED run logs what was
        asked), whose `validate()` raises `err`: a flag that did not parse fails like any bad value."""
        args = cls()
        names = {f.name for f in fields(cls)}
        for name, value in given.items():
            if name in names:
                setattr(args, name, value)
        args._refusal = err
        return args


def _normal(value: str, meta: Mapping) -> str:
    value = value.strip()
    if value.lower() in meta.get("keywords", ()):
        return value.lower()
    if "items" in meta:
        parts = [part.strip() for part in value.split(",")]
        if meta["items"] == LANGUAGE or meta["items"] == RUN_ID:  # a run ID list spells 'latest' as a keyword does
            parts = [part.lower() if meta["items"] == LANGUAGE or part.lower() == "latest" else part for part in parts]
        elif isinstance(meta["items"], tuple):
            parts = [part.lower() for part in parts]
        return ",".join(parts)
    return value.lower() if meta.get("kind") == LANGUAGE else value


def _check_field(name: str, kind: type, value, meta: Mapping) -> None:
    if kind is bool:  # the parser accepts only true/false spellings
        return
    if kind in (int, float):
        if "range" not in meta:
            raise TypeError(f"{name}: an {kind.__name__} parameter needs a 'range' (xlsub.errors.Range) in its field metadata")
        meta["range"].check(name, value)
        return
    if value in meta.get("keywords", ()):
        return
    if not value:
        if meta.get("optional"):
            return
        raise XlsubError(f"{name}: empty; give {meta.get('help', 'a value')}")
    if "choices" in meta and value not in meta["choices"]:
        raise XlsubError(f"{name}: '{value}' is not one of {', '.join(meta['choices'])}")
    if "pattern" in meta and not re.fullmatch(meta["pattern"], value):
        raise XlsubError(f"{name}: '{value}' is not {meta.get('help', 'a valid value')}")
    if "number" in meta:
        try:
            number = float(value)
        except ValueError:
            raise XlsubError(f"{name}: '{value}' is not a number; give {meta.get('help', 'a number')}") from None
        meta["number"].check(name, number)
    if "items" in meta:
        split_items(name, value, meta["items"])
    if meta.get("kind") == LANGUAGE and not is_language_code(value):
        raise XlsubError(f"{name}: '{value}' is not a language code; give an ISO code such as en")


def split_items(name: str, value: str, item: str | Range | tuple[str, ...]) -> list:
    """`a,b,c` -> [a, b, c], each a LANGUAGE (lower-cased), a RUN_ID, one of the choices in the tuple `item`
    (lower-cased), or an integer in the Range `item`;
    refuses an empty item (`en,,de`) and a repeated one."""
    parts = [part.strip() for part in value.split(",")]
    if "" in parts:
        raise XlsubError(f"{name}: '{value}' has an empty item; separate the items by single commas, e.g. {_EXAMPLE.get(item, '0,1')}")
    parsed = [_item(name, part, item) for part in parts]
    repeated = list(dict.fromkeys(str(p) for p in parsed if parsed.count(p) > 1))
    if repeated:
        raise XlsubError(f"{name}: '{','.join(repeated)}' given more than once; list each once")
    return parsed


_EXAMPLE = {LANGUAGE: "en,de", RUN_ID: "<run id>,<run id>"}
ITEM_NAMES = {LANGUAGE: "language codes", RUN_ID: "run IDs"}
KIND_NAMES = {LANGUAGE: "a language code", RUN_ID: "a run ID"}


def _item(name: str, text: str, item: str | Range | tuple[str, ...]):
    if isinstance(item, tuple):
        if text.lower() not in item:
            raise XlsubError(f"{name}: '{text}' is not one of {', '.join(item)}; give a comma-separated list of them")
        return text.lower()
    if isinstance(item, Range):
        try:
            number = int(text)
        except ValueError:
            raise XlsubError(f"{name}: '{text}' is not an integer; give comma-separated integers in {item}, e.g. 0,1") from None
        item.check(name, number)
        return number
    if item == LANGUAGE:
        if not is_language_code(text.lower()):
            raise XlsubError(f"{name}: '{text}' is not a language code; give ISO codes such as en,de")
        return text.lower()
    return text


# -- the command line ---------------------------------------------------------------------------------------
def accepts(meta: Mapping, quote=str) -> str:
    """What a field's metadata lets through, in words: the same keys `StageArgs.validate()` checks, so no help
    text restates a bound by hand. `quote` formats values (docs/parameters.md puts them in backticks)."""
    parts = []
    if "range" in meta:
        parts.append(f"in {quote(meta['range'])}")
    if "number" in meta:
        parts.append(f"a number in {quote(meta['number'])}")
    if "choices" in meta:
        parts.append("one of " + ", ".join(quote(c) for c in meta["choices"]))
    if "items" in meta:
        item = meta["items"]
        what = ITEM_NAMES.get(item) if isinstance(item, str) else \
            f"items of {', '.join(quote(c) for c in item)}" if isinstance(item, tuple) else f"integers in {quote(item)}"
        parts.append(f"comma-separated {what}, each once")
    if "kind" in meta:
        parts.append(KIND_NAMES[meta["kind"]])
    if "pattern" in meta:
        parts.append(f"matches {quote(meta['pattern'])}")
    if meta.get("keywords"):  # whole values taken as they are (any case), besides what the other keys allow
        keywords = " or ".join(quote(k) for k in meta["keywords"])
        parts.append(f"or {keywords}" if parts else f"keywords {keywords}")
    if meta.get("optional"):
        parts.append("may be empty")
    return "; ".join(parts)


def help_text(meta: Mapping) -> str:
    """A field's help followed by what its metadata accepts, as `--help` shows it."""
    return "; ".join(part for part in (meta.get("help", ""), accepts(meta)) if part)


class _RaisingParser(HfArgumentParser):
    """argparse, but a bad flag is an XlsubError naming the parameter, not a page of usage."""

    @staticmethod
    def _parse_dataclass_field(parser, f):
        # HfArgumentParser hands a field's metadata to add_argument; the checks above are ours, not argparse's
        plain = copy.copy(f)
        plain.metadata = MappingProxyType({"help": help_text(f.metadata)} if f.metadata else {})
        HfArgumentParser._parse_dataclass_field(parser, plain)

    def error(self, message: str):
        found = re.match(r"argument --(\w+)(?:/[-\w]+)*: (.*)", message)
        if not found:
            raise XlsubError(f"{message}; see --help")
        name, detail = found.groups()
        if value := re.match(r"invalid (int|float) value: (.*)", detail):
            detail = f"{value.group(2)} is not {'an integer' if value.group(1) == 'int' else 'a number'}"
        elif value := re.match(r"Truthy value expected: got (.*?) but", detail):
            detail = f"'{value.group(1)}' is not true or false"
        raise XlsubError(f"{name}: {detail}; see --help")


def _parse(cls: type[T], argv: Sequence[str]) -> T:
    *parsed, rest = _RaisingParser(cls, allow_abbrev=False).parse_args_into_dataclasses(args=list(argv), return_remaining_strings=True)
    if rest:
        flag = next((token for token in rest if token.startswith("--")), rest[0])
        if flag.startswith("--"):
            raise XlsubError(f"{flag[2:].partition('=')[0]}: no such parameter; see --help for the parameters")
        raise XlsubError(f"'{flag}' is not a parameter; pass parameters as --name value")
    return parsed[0]


def _joined(argv: Sequence[str], names: set[str]) -> list[str]:
    """`--epochs -inf` as `--epochs=-inf`: argparse would take `-inf` for a flag and lose the value."""
    out, i = [], 0
    while i < len(argv):
        token = argv[i]
        if token.startswith("--") and token[2:] in names and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            out.append(f"{token}={argv[i + 1]}")
            i += 2
        else:
            out.append(token)
            i += 1
    return out


def parse_args(cls: type[T], argv: list[str] | None = None) -> T:
    """Parse `--name value` flags into the dataclass `cls` (help text comes from its field metadata).

    Flags that do not parse give arguments that refuse themselves in `validate()`, inside the stage's
    run: one line, a FAILED run, exit status 2, like any other bad value.
    """
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per downloaded file drowns the log
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    argv = _joined(sys.argv[1:] if argv is None else argv, {f.name for f in fields(cls)})
    try:
        return _parse(cls, argv)
    except XlsubError as err:
        given = dict(token[2:].partition("=")[::2] for token in argv if token.startswith("--") and "=" in token)
        return cls.refusing(err, given)


def parse_languages(value: str, param: str = "languages") -> list[str] | None:
    """`all` -> None (every language available); `en,DE` -> ['en', 'de']; an empty or repeated code is refused."""
    if value.strip().lower() in ("", "all"):
        return None
    return split_items(param, value, LANGUAGE)


def is_rank_zero() -> bool:
    """True outside torchrun and on its rank 0: the one process that talks to MLflow."""
    return int(os.environ.get("RANK", "0")) == 0


def stage_args_class(name: str) -> type[StageArgs]:
    """A stage's parameter dataclass, found through the registry (`xlsub.stages`): `entry_points.<name>.<args>`.
    Imported by name, so that no entry point imports another one's module."""
    stage = stages.get(name)
    return getattr(importlib.import_module(stage.module), stage.args)


def stage_classes() -> dict[str, type[StageArgs]]:
    """{stage: its parameter dataclass} for every stage, in registry order: what MLproject and the parameter
    reference are generated from."""
    return {name: stage_args_class(name) for name in stages.names()}
