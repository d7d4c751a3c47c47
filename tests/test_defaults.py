"""One default per parameter: a stage's dataclass declares each default and bound once, and nothing restates it.

A library function a stage calls with one of its parameters has no default for it (or, where one remains,
the stage's); the calls are read from the entry points' source, so a new call is checked without a list to
keep up. Help texts state no bound by hand: `--help` renders the bounds from the field metadata.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from dataclasses import fields
from pathlib import Path

import pytest

from entry_points._common import _RaisingParser, stage_classes
from xlsub.errors import Range

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("finetune", "prune", "encode", "analyze", "compare")
# a bound written out in words or symbols: ">= 10", "> 0", "in [0, 2**32)", "in (0, 1]", "at least 2"
HAND_WRITTEN_BOUND = re.compile(r"(>=|<=|>|<|≥|≤)\s*-?\d|\bin\s*[\[(]\s*-?\d|\bat (least|most)\s+-?\d|2\*\*\d")


def _resolve(namespace, node: ast.expr):
    """The object a call's function expression names in the module (`encode`, `corpora.load_corpus`), or None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name) or not hasattr(namespace, node.id):
        return None
    obj = getattr(namespace, node.id)
    for part in reversed(parts):
        obj = getattr(obj, part, None)
    return obj


def _stage_argument(node: ast.expr) -> str | None:
    """`args.cka` -> 'cka': an argument that is a stage parameter (or a property of the parameters) as it is."""
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "args":
        return node.attr
    return None


def library_calls(stage: str) -> list[tuple[str, str, str, object]]:
    """(library function, its parameter, the stage's attribute, the library's default) for every call in
    entry_points/<stage>.py of an xlsub function or class with `args.<attribute>` as an argument."""
    module = importlib.import_module(f"entry_points.{stage}")
    found = []
    for call in ast.walk(ast.parse(Path(module.__file__).read_text())):
        if not isinstance(call, ast.Call):
            continue
        given = [(i, None, a) for i, a in enumerate(call.args)] + [(None, k.arg, k.value) for k in call.keywords]
        given = [(i, key, attr) for i, key, value in given if (attr := _stage_argument(value))]
        function = _resolve(module, call.func) if given else None
        if function is None or not getattr(function, "__module__", "").startswith("xlsub."):
            continue
        parameters = inspect.signature(function).parameters
        positional = [p for p in parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        for index, key, attr in given:
            parameter = parameters.get(key) if key is not None else positional[index] if index < len(positional) else None
            if parameter is not None:  # else taken by *args or **kwargs, which have no default
                found.append((function.__qualname__, parameter.name, attr, parameter.default))
    return found


@pytest.mark.parametrize("stage", STAGES)
def test_library_defaults_are_absent_or_the_stages(stage):
    defaults = stage_classes()[stage]()
    drifted = [f"{function}({parameter}={default!r}) but {stage}'s {attr} is {getattr(defaults, attr)!r}"
               for function, parameter, attr, default in library_calls(stage)
               if default is not inspect.Parameter.empty and default != getattr(defaults, attr)]
    assert not drifted, "library defaults that drifted from the stage's (drop the library's default):\n" + "\n".join(drifted)


def test_the_scan_sees_the_calls_that_drifted_before():
    """The pairs that once had two different defaults are among the calls found, and have none in the library."""
    seen = {(stage, function, parameter): default for stage in STAGES for function, parameter, _, default in library_calls(stage)}
    for key in [("analyze", "analyze", "cka_kind"), ("analyze", "Counts", "full"), ("analyze", "Counts", "length"),
                ("encode", "encode", "pooling"), ("encode", "load_parallel", "max_sentences"),
                ("prune", "iterative_pruning", "continue_to"), ("prune", "iterative_pruning", "threshold"),
                ("prune", "iterative_pruning", "amount"), ("finetune", "TrainSettings", "log_every"),
                ("finetune", "TrainSettings", "save_steps")]:
        assert key in seen, key
        assert seen[key] is inspect.Parameter.empty, key


def bounds(meta) -> list[Range]:
    return [b for b in (meta.get("range"), meta.get("number"), meta.get("items")) if isinstance(b, Range)]


def rendered_help(cls) -> dict[str, str]:
    return {action.dest: action.help for action in _RaisingParser(cls)._actions}


@pytest.mark.parametrize("stage", list(stage_classes()))
def test_help_states_no_bound_by_hand_and_renders_the_metadatas(stage):
    cls = stage_classes()[stage]
    shown = rendered_help(cls)
    for f in fields(cls):
        for bound in bounds(f.metadata):
            written = f.metadata.get("help", "")
            assert str(bound) not in written and not HAND_WRITTEN_BOUND.search(written), (stage, f.name, written)
            assert str(bound) in shown[f.name], (stage, f.name, shown[f.name])
        for choice in f.metadata.get("choices", ()):
            assert choice in shown[f.name], (stage, f.name, choice)


def test_the_bound_pattern_catches_what_was_written_before():
    for text in ["replicates, >= 10", "seed, in [0, 2**32)", "a fraction, in (0, 1]", "epochs, > 0", "(>= 2: halves)"]:
        assert HAND_WRITTEN_BOUND.search(text), text
    for text in ["tokens per example, <s> and </s> included", "peak learning rate (1e-3 for tiny)", "layers (0 = embeddings)"]:
        assert not HAND_WRITTEN_BOUND.search(text), text
