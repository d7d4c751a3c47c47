"""The commands and snippets of README.md and docs/*.md, tested as printed (issue 24).

Every shell command in a code block that makes runs (`mlflow run`, `python -m entry_points.<stage>`,
`torchrun ... -m entry_points.<stage>`) is parsed as its program would parse it: `mlflow run`'s own options
by MLflow's command-line parser, the entry point and its `-P` names against MLproject, and the command
MLflow would run (MLproject's template, filled in) by the stage's own parser and checks (`parse_args`,
`validate`), with `<...>` placeholders as made-up run IDs. An `mlflow run` names its `--env-manager` and an
experiment (`--experiment-name`, or MLFLOW_EXPERIMENT_NAME exported earlier in its block); in README.md and
docs/stages.md the demo's, the experiment whose runs table they link. `mlflow run` commands in running text
are checked for their entry point and parameters. Every Python snippet compiles, and those that read the
tracking server run against a small sqlite store made the way the stages make their runs and models.
Nothing here trains or loads a model.
"""

from __future__ import annotations

import ast
import contextlib
import io
import re
import shlex
import textwrap
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import click
import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow.exceptions import MlflowException
from mlflow.projects import _project_spec

from entry_points._common import parse_args, stage_args_class
from tests.conftest import ROOT, sqlite_store
from xlsub import artifacts, stages
from xlsub.artifacts import SubnetworkId
from xlsub.errors import XlsubError

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
DEMO_EXPERIMENT = re.search(r"^EXPERIMENT \?= (\S+)$", (ROOT / "Makefile").read_text(), re.MULTILINE).group(1)
# the pages whose commands follow `make demo`: they link the demo's runs table, so their runs go there
DEMO_PAGES = {"README.md", "docs/stages.md"}
PROJECT = _project_spec.load_project(str(ROOT))
ENTRY_POINTS = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]
SHELL = {"bash", "sh", "shell", "console", ""}
PLACEHOLDER = re.compile(r"<[^<>\n]+>")


@dataclass
class Block:
    page: str  # relative to the repository root
    line: int  # of the opening fence, 1-based
    lang: str
    text: str  # dedented to its fence

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown page, indented ones (in list items) included."""
    found, lines = [], path.read_text().splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^(\s*)```\s*([\w+-]*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        indent, body, j = len(fence.group(1)), [], i + 1
        while j < len(lines) and lines[j].strip() != "```":
            body.append(lines[j][indent:] if lines[j][:indent].strip() == "" else lines[j])
            j += 1
        found.append(Block(str(path.relative_to(ROOT)), i + 1, fence.group(2).lower(), textwrap.dedent("\n".join(body))))
        i = j + 1
    return found


def prose(path: Path) -> str:
    """A page without its code blocks."""
    return re.sub(r"^\s*```.*?^\s*```\s*$", "", path.read_text(), flags=re.MULTILINE | re.DOTALL)


def shell_commands(text: str) -> list[tuple[int, list[str]]]:
    """(line, words) of every command in a shell block: continuation lines joined, comments and here-documents
    left out, a quoted string over several lines kept whole."""
    commands, pending, start, heredoc = [], "", 0, None
    for n, line in enumerate(text.splitlines(), 1):
        if heredoc is not None:
            heredoc = None if line.strip() == heredoc else heredoc
            continue
        if not pending:
            start = n
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text_so_far = pending + line
        try:
            words = shlex.split(text_so_far, comments=True)
        except ValueError:  # a quote still open: the command goes on below
            pending = text_so_far + "\n"
            continue
        pending = ""
        if here := re.search(r"<<-?\s*'?(\w+)'?", line):
            heredoc = here.group(1)
        if words:
            commands.append((start, words))
    return commands


def split_env(words: list[str]) -> tuple[dict[str, str], list[str]]:
    """`A=1 B=2 cmd ...` -> ({A: 1, B: 2}, [cmd, ...])."""
    env = {}
    while words and re.fullmatch(r"[A-Za-z_]\w*=.*", words[0]):
        key, _, value = words[0].partition("=")
        env[key] = value
        words = words[1:]
    return env, words


def fill_placeholders(value: str) -> str:
    """`<id>` (each one) -> a made-up run ID: 32 hex digits, different every time, as run-ID lists refuse repeats."""
    return PLACEHOLDER.sub(lambda _: uuid.uuid4().hex, value)


def stage_problems(stage: str, argv: list[str]) -> list[str]:
    """What the stage's own parser and checks refuse in `argv` (`--name value` flags), run as the stage runs them."""
    args = parse_args(stage_args_class(stage), [fill_placeholders(word) for word in argv])
    try:
        args.validate()
    except XlsubError as err:
        return [f"xlsub {stage}: {err}"]
    return []


def mlflow_run_problems(words: list[str], env: dict[str, str], *, complete: bool = True, experiment: str | None = None) -> list[str]:
    """Problems of one `mlflow run ...` command (`words` after `mlflow run`), `env` the variables it sees.
    `complete`: a command to copy, which must name its environment manager and experiment (`experiment`,
    where given, by that name), and whose parameters, defaults included, must pass the stage's checks; else
    (running text) the entry point and the parameters given."""
    from mlflow.cli import _user_args_to_dict
    from mlflow.cli import run as mlflow_run

    try:
        options = mlflow_run.make_context("mlflow run", list(words)).params
    except (click.ClickException, MlflowException) as err:  # an unknown option, a missing argument, an unknown --env-manager
        return [f"mlflow run does not parse it: {err}"]
    problems = []
    if options["uri"] != ".":
        problems.append(f"runs project {options['uri']!r}, not this one (.)")
    name = options["entry_point"]
    if PLACEHOLDER.fullmatch(name):
        return problems  # a template (`-e <stage>`), not a command
    if name not in ENTRY_POINTS:
        return [*problems, f"-e {name}: no such entry point in MLproject ({', '.join(ENTRY_POINTS)})"]
    entry = PROJECT.get_entry_point(name)
    given = _user_args_to_dict(options["param_list"])
    unknown = [key for key in given if key not in ENTRY_POINTS[name]["parameters"]]
    problems += [f"-P {key}: not a parameter of {name}" for key in unknown]
    if not unknown and (complete or given):  # a bare `mlflow run . -e compare` in running text names the entry point only
        command = shlex.split(entry.compute_command(given, None))
        assert command[:3] == ["python", "-m", f"entry_points.{name}"], command
        problems += stage_problems(name, command[3:])
    if complete:
        if options["env_manager"] is None:
            problems.append("no --env-manager: without conda, MLflow fails before xlsub runs and leaves a RUNNING run")
        named = options["experiment_name"] or env.get("MLFLOW_EXPERIMENT_NAME")
        if not (named or options["experiment_id"] or env.get("MLFLOW_EXPERIMENT_ID")):
            problems.append("no experiment (--experiment-name or MLFLOW_EXPERIMENT_NAME): the run goes to Default")
        elif experiment is not None and named != experiment:
            problems.append(f"experiment {named!r}, not {experiment!r} (whose runs table the page links)")
    return problems


def command_problems(words: list[str], env: dict[str, str], experiment: str | None = None) -> list[str] | None:
    """Problems of one shell command that makes runs, or None for a command of another kind."""
    extra, words = split_env(words)
    env = {**env, **extra}
    if words[:2] == ["mlflow", "run"]:
        return mlflow_run_problems(words[2:], env, experiment=experiment)
    for i, word in enumerate(words[:-1]):  # python -m entry_points.<stage>, torchrun [options] -m entry_points.<stage>
        module = words[i + 1]
        if word == "-m" and module.startswith("entry_points.") and module.removeprefix("entry_points.") in stages.names():
            problems = stage_problems(module.removeprefix("entry_points."), words[i + 2 :])
            if not (env.get("MLFLOW_EXPERIMENT_NAME") or env.get("MLFLOW_EXPERIMENT_ID")):
                problems.append("no experiment (MLFLOW_EXPERIMENT_NAME): the run goes to Default")
            return problems
    return None


def block_problems(block: Block) -> dict[str, list[str]]:
    """{`<page>:<line> <command>`: its problems} for every command of a shell block that makes runs."""
    env, found = {}, {}
    experiment = DEMO_EXPERIMENT if block.page in DEMO_PAGES else None
    for line, words in shell_commands(block.text):
        if words[0] == "export":
            env.update(split_env(words[1:])[0])
            continue
        problems = command_problems(words, env, experiment)
        if problems is not None:
            found[f"{block.page}:{block.line + line} {shlex.join(words)}"] = problems
    return found


SHELL_BLOCKS = [b for path in DOCS for b in blocks(path) if b.lang in SHELL]
PYTHON_BLOCKS = [b for path in DOCS for b in blocks(path) if b.lang == "python"]
INLINE = [(str(path.relative_to(ROOT)), span) for path in DOCS for span in re.findall(r"`(mlflow run [^`]+)`", prose(path))]


def test_the_pages_have_the_commands_this_test_reads():
    """A parser that found nothing would pass everything."""
    commands = {key for block in SHELL_BLOCKS for key in block_problems(block)}
    assert sum(key.startswith("README.md:") for key in commands) >= 3, commands
    assert sum(key.startswith("docs/stages.md:") for key in commands) >= 8, commands
    assert any("torchrun" in key for key in commands) and any(" -e compare " in key for key in commands)
    assert len(PYTHON_BLOCKS) >= 8 and INLINE


@pytest.mark.parametrize("block", SHELL_BLOCKS, ids=[b.where for b in SHELL_BLOCKS])
def test_every_command_runs_as_printed(block):
    assert {cmd: problems for cmd, problems in block_problems(block).items() if problems} == {}


@pytest.mark.parametrize("page, span", INLINE, ids=[f"{page}:{span}" for page, span in INLINE])
def test_commands_in_running_text_name_real_entry_points_and_parameters(page, span):
    env, words = split_env(shlex.split(span))
    assert mlflow_run_problems(words[2:], env, complete=False) == []


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[b.where for b in PYTHON_BLOCKS])
def test_every_python_snippet_compiles(block):
    compile(block.text, block.where, "exec")


@pytest.mark.parametrize("line, expected", [
    ("mlflow run . -e prune -P finetune_run_id=<id>", ["no --env-manager", "no experiment"]),
    ("mlflow run . -e prune --env-manager local -P finetune_run_id=<id>", ["no experiment"]),
    ("mlflow run . -e prune --env-manager conda-ish --experiment-name xlsub-demo", ["mlflow run does not parse it: Invalid value for `env_manager`"]),
    ("mlflow run . -e prun --env-manager local --experiment-name xlsub-demo", ["-e prun: no such entry point"]),
    ("mlflow run . -e prune --env-manager local --experiment-name xlsub-demo -P treshold=1.2", ["-P treshold: not a parameter of prune"]),
    ("mlflow run . -e prune --env-manager local --experiment-name xlsub-demo -P threshold=0.9", ["xlsub prune: threshold: "]),
    ("mlflow run . -e compare --env-manager local --experiment-name xlsub-demo -P analyze_run_ids=<id>", ["xlsub compare: analyze_run_ids: got 1"]),
    ("mlflow run . --env-manager local --experiment-name xlsub-demo -P languages=en,de -P reference=zh", ["xlsub main: reference: "]),
    ("mlflow run . --env-manager local --experiment-name other -P seeds=0,1", ["experiment 'other', not 'xlsub-demo'"]),
    ("mlflow run . --env-manager local --experiment-name xlsub-demo --no-such-flag", ["mlflow run does not parse it"]),
    ("python -m entry_points.prune --seeds 0,0", ["xlsub prune: seeds: ", "no experiment"]),
    ("MLFLOW_EXPERIMENT_NAME=xlsub torchrun --nproc_per_node 2 -m entry_points.finetune --epochs -1", ["xlsub finetune: epochs: "]),
])
def test_a_broken_command_is_caught(line, expected):
    """The checks above can fail: broken copies of the pages' commands, each with what must be said about it."""
    (problems,) = block_problems(Block("README.md", 1, "bash", line)).values()
    assert len(problems) == len(expected) and all(p.startswith(e) or e in p for p, e in zip(problems, expected)), problems


def test_an_export_earlier_in_the_block_names_the_experiment():
    text = "export MLFLOW_EXPERIMENT_NAME=xlsub-demo\nmlflow run . -e analyze --env-manager local   # a comment\n"
    assert list(block_problems(Block("docs/stages.md", 1, "bash", text)).values()) == [[]]
    assert list(block_problems(Block("docs/stages.md", 1, "bash", text.split("\n", 1)[1])).values()) == [[
        "no experiment (--experiment-name or MLFLOW_EXPERIMENT_NAME): the run goes to Default"]]


def test_a_snippet_that_does_not_compile_is_caught():
    with pytest.raises(SyntaxError):
        compile("(m,) = mlflow.search_logged_models(\n    experiment_ids=[...]", "README.md:1", "exec")


# -- the snippets that read the tracking server, run against a small store ------------------------------------
def snippet(containing: str) -> Block:
    (block,) = [b for b in PYTHON_BLOCKS if containing in b.text]
    return block


def run_snippet(block: Block, values: dict[str, str], stop_before: str | None = None) -> tuple[dict, object, str]:
    """Run a snippet's statements (placeholders replaced by `values`) up to the first that mentions
    `stop_before`. Returns its names, the value of its last statement where that is an expression, and what it printed."""
    text = block.text
    for placeholder, value in values.items():
        text = text.replace(placeholder, value)
    assert not PLACEHOLDER.search(text.replace("<mask>", "")), text
    statements = ast.parse(text).body
    if stop_before is not None:
        statements = statements[: next(i for i, s in enumerate(statements) if stop_before in ast.unparse(s))]
    names, last, printed = {}, None, io.StringIO()
    with contextlib.redirect_stdout(printed):
        for statement in statements:
            if isinstance(statement, ast.Expr):
                last = eval(compile(ast.Expression(statement.value), block.where, "eval"), names)
            else:
                exec(compile(ast.Module([statement], []), block.where, "exec"), names)  # noqa: S102 - the page's own snippet
    return names, last, printed.getvalue()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo's experiment with two prune runs (threshold 1.1 and 1.3), each with child runs and stock models
    tagged as prune tags them, one more prune run KILLED, the first run's subnetworks registered, and an
    analyze run's CKA table: what the snippets read, without any model."""
    from entry_points.prune import PruneArgs
    from xlsub.report.tables import cka_reference_tables, long_table
    from xlsub.tracking import runs as tracking

    folder = tmp_path_factory.mktemp("readme")
    with sqlite_store(folder) as client:
        exp = client.create_experiment(DEMO_EXPERIMENT, artifact_location=(folder / "artifacts").as_uri())
        made = {}

        def prune_run(key: str, threshold: float, status: str) -> None:
            args = PruneArgs(threshold=threshold)
            parent = client.create_run(exp, tags={artifacts.STAGE_TAG: "prune"}).info.run_id
            for name in ("threshold", "target_sparsity"):
                client.log_param(parent, name, args.params()[name])
            for sid in (SubnetworkId("de", 0), SubnetworkId("en", 0)):
                child = client.create_run(exp, tags={artifacts.STAGE_TAG: "prune", artifacts.CHILD_TAG: "true", artifacts.PARENT_TAG: parent,
                                                     artifacts.LANGUAGE_TAG: sid.language, artifacts.SEED_TAG: str(sid.seed),
                                                     artifacts.SUBNETWORK_TAG: str(sid)}).info.run_id
                model = mlflow.initialize_logged_model(name=sid.model_name, source_run_id=child, experiment_id=exp, tags={
                    artifacts.input_tag("prune"): parent, artifacts.REGISTERED_THRESHOLD_TAG: str(args.threshold),  # as prune tags them
                    artifacts.REGISTERED_TARGET_SPARSITY_TAG: args.target_sparsity, artifacts.MASK_DIGEST_TAG: "0" * 64,
                    artifacts.RUN_STATUS_TAG: "RUNNING"})
                client.log_metric(child, f"ppl.{sid.language}", 3.5, model_id=model.model_id)
                client.set_terminated(child, "FINISHED")
                made[(key, str(sid))] = model.model_id
                time.sleep(0.01)  # creation times in ms: each model is newer than the one before
            client.set_terminated(parent, status)
            tracking.mark_models(parent, status, exp)
            made[key] = parent

        prune_run("first", 1.1, "FINISHED")
        prune_run("other threshold", 1.3, "FINISHED")
        prune_run("killed", 1.1, "KILLED")  # the newest with threshold 1.1: the recipe must pass it by
        tracking.register_subnetworks(made["first"])

        generator = torch.Generator().manual_seed(0)
        encodings = {artifacts.FULL_MODEL: {lang: torch.randn(3, 12, 4, generator=generator, dtype=torch.float64) for lang in ("en", "de", "zh")}}
        _, _, tables = cka_reference_tables(encodings, ["en", "de", "zh"], "en")
        cka = tables[artifacts.TABLE.cka_vs_reference]
        with mlflow.start_run(experiment_id=exp, tags={artifacts.STAGE_TAG: "analyze"}) as analyze:
            tracking.log_table(long_table(cka), artifacts.long_table_path(artifacts.TABLE.cka_vs_reference))
        yield {"client": client, "exp": exp, "made": made, "cka": cka, "analyze": analyze.info.run_id}


def test_the_recipe_that_searches_subnetwork_models_picks_the_newest_of_a_finished_prune_run(demo):
    names, _, _ = run_snippet(snippet("search_logged_models"), {"<experiment ID>": demo["exp"]}, stop_before="load_model")
    assert names["m"].model_id == demo["made"][("first", "de-s0")]


def test_the_registered_versions_snippet_prints_each_versions_seed_threshold_and_perplexity(demo):
    _, _, printed = run_snippet(snippet("search_model_versions"), {})
    assert printed.splitlines() == ["1 0 1.1 {'ppl.de': 3.5}"]


def test_the_table_snippet_gathers_the_cka_table_of_every_analyze_run(demo):
    _, pivot, _ = run_snippet(snippet("load_table"), {})
    expected = demo["cka"].copy()
    expected.index = pd.MultiIndex.from_product([[demo["analyze"]], expected.index], names=["run_id", "language"])
    np.testing.assert_allclose(pivot.loc[expected.index, expected.columns].to_numpy(), expected.to_numpy())
    assert pivot.shape == expected.shape
