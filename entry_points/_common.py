"""What every entry point shares: the parameter dataclass base, flag parsing, languages, distributed rank."""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import ClassVar, TypeVar

from transformers import HfArgumentParser

from xlsub.errors import XlsubError
from xlsub.tracking import unquote

T = TypeVar("T")
DEVICE_HELP = "auto, cpu, cuda, cuda:N or mps"


class _OneLineParser(HfArgumentParser):
    """argparse, but a bad flag is one line naming the parameter, not a page of usage."""

    def error(self, message: str):
        print(f"xlsub {self.prog}: {message}; see --help", file=sys.stderr)
        sys.exit(2)


class _RaisingParser(HfArgumentParser):
    def error(self, message: str):
        raise XlsubError(message)


def device_field(default: str = "auto"):
    return field(default=default, metadata={"help": DEVICE_HELP})


@dataclass
class StageArgs:
    """Base of the stage parameter dataclasses: the one place a stage's parameters, defaults, help and
    bounds are declared. MLproject is generated from these classes (`python -m entry_points.mlproject`).

    Fields named in `NOT_FOR_REUSE` cannot change a result (where logs or checkpoints go, how often
    they are written): `main` leaves them out when it looks for a finished run to reuse.
    """

    NOT_FOR_REUSE: ClassVar[tuple[str, ...]] = ()

    def validate(self) -> None:
        """Refuse bad values with one XlsubError line naming the parameter. Runs inside the stage's run."""

    # -- shared checks, each naming the parameter --------------------------------------------------------
    def check_positive(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise XlsubError(f"{name}: must be a positive number, got {value}")

    def check_choice(self, name: str, choices) -> None:
        if getattr(self, name) not in choices:
            raise XlsubError(f"{name}: '{getattr(self, name)}' is not one of {', '.join(map(str, choices))}")

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
                argv += [f"--{f.name}", unquote(params[f.name])]
        try:
            (args,) = _RaisingParser(cls).parse_args_into_dataclasses(args=argv)
        except XlsubError as err:
            raise XlsubError(f"{param}: its logged parameters do not parse as {cls.__name__} ({err}); rerun that stage") from None
        return args


def parse_args(cls: type[T], argv: list[str] | None = None) -> T:
    """Parse `--name value` flags into the dataclass `cls` (help text comes from its field metadata)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per downloaded file drowns the log
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    (args,) = _OneLineParser(cls).parse_args_into_dataclasses(args=argv)
    return args


def parse_languages(value: str, param: str = "languages") -> list[str] | None:
    """`all` -> None (every language available); `en,de` -> ['en', 'de']; a repeated code is refused."""
    if value.strip().lower() in ("", "all"):
        return None
    codes = [code.strip() for code in value.split(",") if code.strip()]
    repeated = sorted({c for c in codes if codes.count(c) > 1})
    if repeated:
        raise XlsubError(f"{param}: '{','.join(repeated)}' given more than once; list each language once")
    return codes


def is_rank_zero() -> bool:
    """True outside torchrun and on its rank 0: the one process that talks to MLflow."""
    return int(os.environ.get("RANK", "0")) == 0
