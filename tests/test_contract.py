"""The stage contract: subnetwork ids, artifact round trips, parameters declared once (dataclasses ->
MLproject -> main), validation bounds shared with the library, and a code version per stage."""

from __future__ import annotations

import math
import shutil
from dataclasses import fields
from pathlib import Path
from typing import get_type_hints

import pandas as pd
import pytest
import torch
import yaml
from transformers import XLMRobertaConfig, XLMRobertaForMaskedLM

from entry_points import analyze, docs, encode, finetune, main, mlproject, prune
from entry_points._common import stage_classes
from xlsub import artifacts, stages
from xlsub.artifacts import SubnetworkId
from xlsub.errors import XlsubError
from xlsub.models.pruning import iterative_pruning, kept_heads_mask, load_subnetwork, prune_heads
from xlsub.tracking.code_version import code_version, import_closure
from xlsub.tracking.runs import same_value

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("finetune", "prune", "encode", "analyze")
DOCUMENTED = STAGES + ("compare", "neurons")


# -- subnetwork ids ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, language, seed", [("de-s0", "de", 0), ("zh-cn-s12", "zh-cn", 12), ("en-s4294967295", "en", 2**32 - 1)])
def test_subnetwork_id_round_trip(text, language, seed):
    sid = SubnetworkId.parse(text)
    assert (sid.language, sid.seed) == (language, seed)
    assert str(sid) == text and sid.run_name == f"prune/{text}"
    assert not set(text) & set("/:.%")  # MLflow model names refuse these


@pytest.mark.parametrize("text", ["de", "de/seed1", "sub_de_seed1", "de-s", "de-s-1", "-s0", "de-s1.0", "full", "de s0"])
def test_subnetwork_id_refuses_other_spellings(text):
    with pytest.raises(XlsubError, match="^subnetwork: "):
        SubnetworkId.parse(text)
    assert SubnetworkId.parse_or_none(text) is None


@pytest.mark.parametrize("key, expected", [("de-s0", ("heads", "de-s0")), ("neurons.zh-cn-s3", ("neurons", "zh-cn-s3")), ("full", None),
                                           ("random", None), ("neurons.full", None), ("neurons-de-s0", ("heads", "neurons-de-s0"))])
def test_encoding_keys_name_the_unit_and_the_subnetwork(key, expected):
    found = artifacts.subnetwork_key(key)
    assert (found if found is None else (found[0], str(found[1]))) == expected
    if expected is not None and expected[0] == "neurons":
        assert SubnetworkId.parse(expected[1]).neurons_key == key
    assert SubnetworkId.parse_or_none(f"{artifacts.NEURONS_KEY_PREFIX}de-s0") is None  # a neuron key is never taken for a head subnetwork


def test_subnetwork_ids_sort_by_language_then_seed_and_group():
    ids = [SubnetworkId("zh", 0), SubnetworkId("de", 10), SubnetworkId("de", 2)]
    assert [str(s) for s in sorted(ids)] == ["de-s2", "de-s10", "zh-s0"]
    grouped = artifacts.group_by_language({sid: str(sid) for sid in ids}, ["zh", "de"])
    assert list(grouped) == ["zh", "de"] and list(grouped["de"]) == [2, 10]


# -- head masks: one object, two files ----------------------------------------------------------------------
def tiny(layers=3, heads=4):
    torch.manual_seed(0)
    config = XLMRobertaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=layers, num_attention_heads=heads,
                              intermediate_size=32, max_position_embeddings=40)
    return XLMRobertaForMaskedLM(config).eval()


class _Tokenizer:
    def save_pretrained(self, path):
        Path(path, "tokenizer_config.json").write_text("{}")


def test_head_mask_round_trips_through_json_and_the_pruned_models_config(tmp_path):
    mask = torch.tensor([[0, 0, 0, 0], [0, 0, 1, 0], [1, 0, 1, 1]], dtype=torch.float32)  # a layer with none, one, three
    assert artifacts.kept_heads(mask) == [[], [2], [0, 2, 3]]
    from_json = artifacts.read_head_mask(artifacts.write_head_mask(tmp_path, mask))
    folder = artifacts.write_model(tmp_path, prune_heads(tiny(), mask), _Tokenizer(), artifacts.SUBNETWORK_DIR)
    config = yaml.safe_load((folder / "config.json").read_text())
    from_config = artifacts.mask_from_kept_heads(config[artifacts.KEPT_HEADS_CONFIG_KEY], 4)
    assert torch.equal(from_json, mask) and torch.equal(from_config, mask)
    loaded = load_subnetwork(folder, from_json)[0]
    assert torch.equal(kept_heads_mask(loaded.config), mask)
    # a head_mask.json that disagrees with the model is refused, not silently used
    other = mask.clone()
    other[0, 0] = 1
    with pytest.raises(XlsubError, match="keeps other heads"):
        load_subnetwork(folder, other)


@pytest.mark.parametrize("bad", [[[0, 2]], [[0.5, 1]], [1, 0]])
def test_head_mask_reader_refuses_what_is_not_a_mask(tmp_path, bad):
    path = tmp_path / artifacts.HEAD_MASK
    path.write_text(str(bad))
    with pytest.raises(XlsubError, match="head_mask.json"):
        artifacts.read_head_mask(path)


def test_tables_round_trip_with_several_index_levels_and_layer_columns(tmp_path):
    table = pd.DataFrame([[0.5, 0.25], [0.125, 1.0]], index=pd.MultiIndex.from_tuples([("parallel", "de"), ("shuffled", "de")],
                                                                                      names=["condition", "language"]),
                         columns=pd.Index([0, 4], name="layer"))
    back = artifacts.read_table(artifacts.write_table(tmp_path, "cka_controls", table), index_levels=2)
    assert (tmp_path / artifacts.table_path("cka_controls")).is_file()
    pd.testing.assert_frame_equal(back, table, check_names=False, check_column_type=False)
    assert list(back.columns) == [0, 4]


# -- parameters ---------------------------------------------------------------------------------------------
def test_mlproject_is_generated_from_the_dataclasses():
    assert (ROOT / "MLproject").read_text() == mlproject.render(), "run `python -m entry_points.mlproject`"


def test_mlproject_agrees_with_the_dataclasses_on_names_defaults_and_types():
    """Read back as MLflow reads it: the type mapping is float -> float; int, bool and str -> string."""
    declared = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]
    expected_type = {float: "float", int: "string", bool: "string", str: "string"}
    for stage, cls in stage_classes().items():
        params = declared[stage]["parameters"]
        hints = get_type_hints(cls)
        assert list(params) == [f.name for f in fields(cls)], stage
        for f in fields(cls):
            assert params[f.name]["type"] == expected_type[hints[f.name]], (stage, f.name)
            default = f.default if not isinstance(f.default, bool) else str(f.default).lower()
            assert same_value(params[f.name]["default"], default), (stage, f.name)
            assert f"--{f.name} {{{f.name}}}" in declared[stage]["command"]


def test_main_passes_each_stage_the_runs_it_reads():
    ids = {"finetune": "f" * 32, "prune": "p" * 32, "neurons": "n" * 32, "encode": "e" * 32}
    assert main.MainArgs().stage_inputs("encode", ids) == {"finetune_run_id": "f" * 32, "prune_run_id": "p" * 32, "neurons_run_id": "none"}
    assert main.MainArgs(encode_neurons=True).stage_inputs("encode", ids)["neurons_run_id"] == "n" * 32
    assert main.MainArgs().stage_inputs("analyze", ids) == {"encode_run_id": "e" * 32, "prune_run_id": "p" * 32, "neurons_run_id": "n" * 32}
    assert main.MainArgs().stage_inputs("analyze", {k: v for k, v in ids.items() if k != "neurons"})["neurons_run_id"] == "none"


def test_main_composes_the_stage_dataclasses_through_one_mapping():
    defaults = main.MainArgs()
    for stage, cls in main.STAGE_ARGS.items():
        built = defaults.stage_args(stage)
        assert isinstance(built, cls)
        for f in fields(cls):
            name = main.main_name(stage, f.name)
            if f.name in main.INPUTS.get(stage, {}):  # main sets them; an optional one (analyze's neurons run) defaults to none
                assert name is None and getattr(built, f.name) == ("none" if f.name in stages.get(stage).optional else "latest")
            elif (stage, f.name) in main.FIXED:
                assert name is None and getattr(built, f.name) == main.FIXED[(stage, f.name)]
            else:  # one main parameter, same type; its default is the stage's unless main states another
                assert get_type_hints(main.MainArgs)[name] == get_type_hints(cls)[f.name], (stage, f.name)
                assert getattr(built, f.name) == main.MAIN_DEFAULTS.get(name, f.default), (stage, f.name)
    # names shared by several stages mean the same there, with the same default
    for name in ("device", "batch_size", "bootstrap"):
        users = [(s, c) for s, c in main.STAGE_ARGS.items() if any(main.main_name(s, f.name) == name for f in fields(c))]
        assert len(users) >= 2 and len({c.__dataclass_fields__[name].default for _, c in users}) == 1, name
    # the renamed ones reach the right stage only
    chosen = main.MainArgs(corpus="folder", parallel_corpus="pairs.json", encode_batch_size=8, batch_size=4, seed=3, seeds="1,2")
    assert chosen.stage_args("finetune").corpus == "folder" and chosen.stage_args("encode").corpus == "pairs.json"
    assert chosen.stage_args("encode").batch_size == 8 and chosen.stage_args("prune").batch_size == 4
    assert chosen.stage_args("finetune").seed == 3 and chosen.stage_args("prune").seeds == "1,2"
    assert chosen.stage_args("encode").use_random is True and encode.EncodeArgs().use_random is False


def test_stage_arguments_rebuild_from_logged_params():
    args = finetune.FinetuneArgs(seed=3, epochs=1.5, fp16=True, languages="en,de", max_seq_len=32)
    logged = {**args.params(), "resume": "'auto'", "world_size": "1", "train_examples.en": "96"}
    assert finetune.FinetuneArgs.from_params(logged) == args
    assert finetune.FinetuneArgs.from_params({"seed": "7"}) == finetune.FinetuneArgs(seed=7)
    with pytest.raises(XlsubError, match="^finetune_run_id: "):
        finetune.FinetuneArgs.from_params({"seed": "seven"}, "finetune_run_id")


def test_reuse_leaves_out_only_what_cannot_change_a_result():
    args = finetune.FinetuneArgs()
    assert set(args.params()) - set(args.reuse_params()) == {"log_every", "save_steps", "resume", "checkpoint_artifacts", "keep_checkpoints"}
    assert set(prune.PruneArgs().params()) - set(prune.PruneArgs().reuse_params()) == {"register"}  # main registers a reused run's models
    for cls in (encode.EncodeArgs, analyze.AnalyzeArgs):
        assert cls().reuse_params() == cls().params()


@pytest.mark.parametrize("args, param", [
    (finetune.FinetuneArgs(seed=-1), "seed"),
    (finetune.FinetuneArgs(seed=2**32), "seed"),
    (finetune.FinetuneArgs(lr=math.nan), "lr"),
    (finetune.FinetuneArgs(epochs=0), "epochs"),
    (finetune.FinetuneArgs(weight_decay=-0.1), "weight_decay"),
    (finetune.FinetuneArgs(languages="en,de,en"), "languages"),
    (prune.PruneArgs(threshold=math.nan), "threshold"),
    (prune.PruneArgs(threshold=0.9), "threshold"),
    (prune.PruneArgs(amount=0), "amount"),
    (prune.PruneArgs(amount=1.5), "amount"),
    (prune.PruneArgs(target_sparsity="1"), "target_sparsity"),
    (prune.PruneArgs(target_sparsity="half"), "target_sparsity"),
    (prune.PruneArgs(seeds="0,0"), "seeds"),
    (prune.PruneArgs(seeds="-1"), "seeds"),
    (prune.PruneArgs(languages="en,en"), "languages"),
    (prune.PruneArgs(eval_examples=0), "eval_examples"),
    (encode.EncodeArgs(dtype="float8"), "dtype"),
    (encode.EncodeArgs(max_sentences=0), "max_sentences"),
    (analyze.AnalyzeArgs(cka="cosine"), "cka"),
    (analyze.AnalyzeArgs(cka="rbf", cka_precision="float32"), "cka_precision"),
    (analyze.AnalyzeArgs(layers="last"), "layers"),
    (main.MainArgs(languages="de,zh"), "reference"),
    (main.MainArgs(threshold=0.5), "threshold"),
])
def test_validation_names_the_parameter(args, param):
    with pytest.raises(XlsubError, match=f"^{param}: "):
        args.validate()


# heads on after each step of 2 layers x 2 heads: amount 1.0 switches all 4 off in one step; amount 0.01 one
# head a step (at least one), to the target of round(4 x 0.5) = 2 off
@pytest.mark.parametrize("threshold, amount, sparsity, heads_on", [(1.0, 1.0, None, [4, 0]), (1.5, 0.01, 0.5, [4, 3, 2])])
def test_the_library_accepts_exactly_what_the_stage_accepts(threshold, amount, sparsity, heads_on):
    prune.PruneArgs(threshold=threshold, amount=amount, target_sparsity=str(sparsity or "none")).validate()
    model = tiny(2, 2)
    batch = {"input_ids": torch.tensor([[0, 5, 6, 2]]), "attention_mask": torch.ones(1, 4, dtype=torch.long),
             "labels": torch.tensor([[-100, 5, -100, -100]])}
    result = iterative_pruning(model, [batch], threshold=threshold, amount=amount, target_sparsity=sparsity, continue_to=0.0)
    assert [int(step.mask.sum()) for step in result.steps] == heads_on
    if sparsity is None:  # the stop rule: keep the last step within threshold x unpruned
        within = [step.ppl <= threshold * result.steps[0].ppl for step in result.steps]
        assert result.kept == (len(within) - 1 if all(within) else within.index(False) - 1)
    else:  # the target: exactly round(heads x sparsity) heads off, whatever the perplexity
        assert result.kept == len(heads_on) - 1 and int(result.mask.sum()) == 4 - round(4 * sparsity)
    assert torch.equal(result.mask, result.steps[result.kept].mask)


def test_the_library_refuses_with_the_stages_message():
    stage = prune.PruneArgs()
    defaults = {"threshold": stage.threshold, "amount": stage.amount, "target_sparsity": stage.sparsity, "continue_to": stage.continue_to}
    for kwargs in ({"threshold": 0.9}, {"amount": 0.0}, {"threshold": math.nan}):
        with pytest.raises(XlsubError) as from_stage:
            prune.PruneArgs(**kwargs).validate()
        with pytest.raises(XlsubError) as from_library:
            iterative_pruning(tiny(2, 2), [], **(defaults | kwargs))
        assert str(from_stage.value) == str(from_library.value)


# -- code versions ------------------------------------------------------------------------------------------
def test_import_closures_are_per_stage():
    closure = {stage: {p.relative_to(ROOT).as_posix() for p in import_closure(f"entry_points.{stage}")} for stage in STAGES}
    analyze_only = {"xlsub/report/analysis.py", "xlsub/report/html.py", "xlsub/report/tables.py", "xlsub/similarity/cka.py"}
    assert analyze_only <= closure["analyze"]
    for stage in ("finetune", "prune", "encode"):
        assert not analyze_only & closure[stage], stage
        assert {"xlsub/__init__.py", "xlsub/artifacts.py", f"entry_points/{stage}.py"} <= closure[stage]
    assert "xlsub/models/training.py" in closure["finetune"] and "xlsub/models/pruning.py" not in closure["finetune"]


def copy_project(dst: Path) -> Path:
    for name in ("xlsub", "entry_points"):
        shutil.copytree(ROOT / name, dst / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "MLproject", dst / "MLproject")
    return dst


def versions(root: Path) -> dict[str, str]:
    code_version.cache_clear()
    return {stage: code_version(stage, root) for stage in STAGES}


def test_an_analyze_only_edit_changes_only_analyzes_code_version(tmp_path):
    root = copy_project(tmp_path)
    before = versions(root)
    assert versions(ROOT) == before  # the digest depends on content, not on where the project lies
    with open(root / "xlsub" / "report" / "html.py", "a") as f:
        f.write("\n# a caption changed\n")
    after = versions(root)
    assert {s for s in STAGES if after[s] != before[s]} == {"analyze"}
    with open(root / "xlsub" / "artifacts.py", "a") as f:  # the contract: every stage
        f.write("\n# the contract changed\n")
    assert all(v != after[s] for s, v in versions(root).items())


def test_an_mlproject_block_edit_changes_only_that_stage(tmp_path):
    root = copy_project(tmp_path)
    before = versions(root)
    text = (root / "MLproject").read_text().replace("dtype: {type: string, default: auto}", "dtype: {type: string, default: float16}", 1)
    (root / "MLproject").write_text(text)
    changed = {s for s, v in versions(root).items() if v != before[s]}
    assert changed == {"encode"}


def documented_defaults() -> dict[str, dict[str, str]]:
    """{stage: {parameter: default}} read back from docs/parameters.md's `## <stage>` tables."""
    import re

    tables, stage = {}, None
    for line in (ROOT / "docs" / "parameters.md").read_text().splitlines():
        if line.startswith("## "):
            stage = line[3:].strip()
        elif stage and (row := re.match(r"\| `([^`]+)` \| [^|]+ \| `([^`]*)` \|", line)):
            tables.setdefault(stage, {})[row[1]] = row[2]
    return tables


def test_parameters_doc_is_fresh():
    """docs/parameters.md is what `entry_points.docs.render` gives for the stage dataclasses."""
    expected = docs.render(stage_classes())
    assert (ROOT / "docs" / "parameters.md").read_text() == expected, "docs/parameters.md is stale: run `python -m entry_points.docs`"
    docs.main(["--check"])  # and the check `make`-less callers use agrees


def test_parameters_doc_check_refuses_a_stale_file(tmp_path, monkeypatch):
    stale = tmp_path / "parameters.md"
    stale.write_text(docs.render(stage_classes()).replace("| `seed` |", "| `sead` |", 1))
    monkeypatch.setattr(docs, "PATH", stale)
    with pytest.raises(SystemExit) as exit_:
        docs.main(["--check"])
    assert "python -m entry_points.docs" in str(exit_.value.code) and "\n" not in str(exit_.value.code)


def test_parameters_doc_documents_every_flag_help_shows():
    """docs/parameters.md documents every parameter a stage's `--help` shows, with the parser's default."""
    from entry_points._common import _RaisingParser

    documented = documented_defaults()
    for stage, cls in stage_classes().items():
        shown: dict[str, object] = {}
        for action in _RaisingParser(cls)._actions:  # a True bool also gets `--no_<name>`, same dest: keep the first
            if action.dest != "help":
                shown.setdefault(action.dest, action.default)
        assert set(documented[stage]) == set(shown) == {f.name for f in fields(cls)}, stage
        for name, default in shown.items():
            default = str(default).lower() if isinstance(default, bool) else default
            assert same_value(documented[stage][name], default), (stage, name, documented[stage][name], default)


def test_entry_points_hold_no_tag_or_artifact_path_literals():
    """Tags and artifact paths come from xlsub.artifacts; a literal in an entry point is a second copy."""
    import ast
    import re

    suspicious = re.compile(r"^(xlsub\.|mlflow\.)|\.(json|csv|png|html|safetensors)$|^(model|subnetwork|encodings|tables|figures)/")
    for path in sorted((ROOT / "entry_points").glob("*.py")):
        tree = ast.parse(path.read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and node.body
                      and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                # logger names (`xlsub.prune`) are not tags
                is_logger = node.value in {f"xlsub.{s}" for s in DOCUMENTED + ("main",)}
                assert is_logger or not suspicious.search(node.value), (path.name, node.value)


# Literals still to switch to artifacts.METRIC, in code other engineers own; remove an entry when its file switches.
PENDING_NAME_LITERALS: set[tuple[str, str]] = set()
# table ids that are also a column name of their own table (`token_overlap`'s column `token_overlap`)
ALSO_COLUMNS = {"token_overlap", "rsa", "power"}


def name_literals(path: Path, names: set[str]) -> set[str]:
    """The string literals of `path` (docstrings left out) that spell one of `names`, or whose f-string parts
    start one (`f"retrieval_top1.{lang}"`, `f"mean_cka_{condition}_last_layer"`)."""
    import ast

    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and node.body
                  and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    in_fstrings = {id(part) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for part in node.values}
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings | in_fstrings:
            if node.value in names:
                found.add(node.value)
        elif isinstance(node, ast.JoinedStr):
            for part in node.values:
                text = part.value if isinstance(part, ast.Constant) and isinstance(part.value, str) else ""
                if text.rstrip("._") in names or (text.endswith("_") and any(n.startswith(text) for n in names)):
                    found.add(text)
    return found


def test_table_ids_and_metric_names_have_one_home(tmp_path):
    """Table ids and summary metric names are spelled once, in xlsub.artifacts (TABLE, METRIC): a literal in an
    entry point or in the code that writes the analyze tables and report is a second copy."""
    from dataclasses import astuple

    table_ids, metric_names = set(astuple(artifacts.TABLE)), set(astuple(artifacts.METRIC))
    names = (table_ids | metric_names) - ALSO_COLUMNS
    files = [*sorted((ROOT / "entry_points").glob("*.py")), *(ROOT / "xlsub" / "report" / f for f in ("html.py", "compare.py", "analysis.py")),
             *sorted((ROOT / "xlsub" / "report" / "figures").glob("*.py"))]
    found = {(path.relative_to(ROOT).as_posix(), literal) for path in files for literal in name_literals(path, names)}
    assert found == PENDING_NAME_LITERALS
    # the scan sees what it looks for, and not docstrings
    sample = tmp_path / "probe.py"
    sample.write_text('"""mean_jaccard"""\nx = {"mask_jaccard": 1, "mean_cka_last_layer": 2, "mean": 3}\ny = f"retrieval_top1.{x}"\n')
    assert name_literals(sample, names) == {"mask_jaccard", "mean_cka_last_layer", "retrieval_top1."}


def test_the_contract_names_are_todays_spellings():
    """The namespaces change no name: each field spells itself, and the ids the demo writes are these."""
    for namespace in (artifacts.TABLE, artifacts.METRIC):
        assert all(getattr(namespace, f.name) == f.name for f in fields(namespace))
    assert artifacts.TABLE.cross_ppl_random_relative_hi == "cross_ppl_random_relative_hi"
    assert artifacts.TABLE.language_distance_uriel == "language_distance_uriel"
    assert artifacts.language_metric(artifacts.METRIC.retrieval_top1, "de") == "retrieval_top1.de"
    assert artifacts.METRIC.mean_cka_control_last_layer("shuffled") == "mean_cka_shuffled_last_layer"
    assert (artifacts.REGISTERED_THRESHOLD_TAG, artifacts.REGISTERED_TARGET_SPARSITY_TAG,
            artifacts.REGISTERED_SOURCE_RUN_TAG) == ("threshold", "target_sparsity", "source_run_id")


def test_conda_env_pins_the_same_packages_as_pyproject():
    """`mlflow run --env-manager conda` builds conda.yaml, which cannot be exercised offline here: its pip
    section must list exactly pyproject's runtime pins (plus the project itself)."""
    import re

    import tomllib
    import yaml

    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    env = yaml.safe_load((ROOT / "conda.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert sorted(p for p in pip if p != "-e .") == sorted(pins)
    assert "-e ." in pip
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python="))
    required = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert re.fullmatch(r">=3\.(\d+)", required) and int(python.split(".")[1]) >= int(required.split(".")[1])
