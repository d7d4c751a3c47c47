"""The stage registry and what is derived from it; lineage by run ID and manifests; entry points that do
not import each other; code versions that follow data, not imports."""

from __future__ import annotations

import ast
import shutil
from dataclasses import fields
from pathlib import Path

import mlflow
import pytest
import yaml

from entry_points import _common, main, summary
from tests.conftest import sqlite_store
from xlsub import artifacts, stages
from xlsub.errors import XlsubError
from xlsub.report import html as report
from xlsub.tracking import lineage
from xlsub.tracking.code_version import code_version, dependency_pins, import_closure

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = sorted((ROOT / "entry_points").glob("*.py"))


# -- one registry, everything else derived ------------------------------------------------------------------
def test_the_registry_lists_every_entry_point_module_once():
    modules = {p.stem for p in ENTRY_POINTS if not p.stem.startswith("_")} - {"mlproject", "summary", "docs", "__init__"}
    assert set(stages.names()) == modules
    assert stages.lineage_order() == ("finetune", "prune", "neurons", "encode", "analyze")
    assert [s.name for s in stages.pipeline()] == list(stages.lineage_order())


def test_each_stage_has_its_dataclass_and_its_inputs_are_run_id_parameters():
    for stage in stages.REGISTRY:
        cls = _common.stage_args_class(stage.name)
        names = {f.name for f in fields(cls)}
        assert set(stage.inputs) <= names, stage.name
        assert all(upstream in stages.names() and stages.names().index(upstream) < stages.names().index(stage.name)
                   for upstream in stage.inputs.values()), stage.name


def test_lineage_follows_inputs_of_inputs():
    assert stages.lineage("finetune") == ()
    assert stages.lineage("encode") == ("finetune", "prune")
    assert stages.lineage("analyze") == ("finetune", "prune", "encode")  # finetune only through encode's tags; neurons is optional
    assert stages.lineage("neurons") == ("finetune",) and stages.required_inputs("analyze") == {"encode_run_id": "encode", "prune_run_id": "prune"}
    assert stages.lineage("compare") == ("finetune", "prune", "encode", "analyze")
    with pytest.raises(XlsubError, match="^stage: 'train' is not a stage"):
        stages.get("train")


def test_mlproject_main_summary_and_report_derive_their_stage_lists_from_the_registry():
    entry = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]
    assert list(entry) == list(stages.names())
    assert all(entry[s.name]["command"].startswith(f"python -m {s.module} ") for s in stages.REGISTRY)
    assert list(main.STAGE_ARGS) == list(stages.lineage_order())
    assert main.INPUTS == {s.name: dict(s.inputs) for s in stages.pipeline()}
    # no module keeps a list of its own
    for path in [ROOT / "entry_points" / "summary.py", ROOT / "xlsub" / "report" / "html.py", ROOT / "entry_points" / "compare.py",
                 ROOT / "entry_points" / "main.py", ROOT / "xlsub" / "tracking" / "runs.py", ROOT / "xlsub" / "artifacts.py"]:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Tuple) and all(isinstance(e, ast.Constant) for e in node.elts):
                assert not {"finetune", "prune", "encode"} <= {e.value for e in node.elts}, path
    html = report.render_report.__globals__["_lineage_html"]({"analyze": "a1", "finetune": "f1", "encode": "e1", "prune": "p1"}, None)
    assert [html.index(x) for x in ("f1", "p1", "e1", "a1")] == sorted(html.index(x) for x in ("f1", "p1", "e1", "a1"))
    assert list(_common.stage_classes()) == list(stages.names())
    assert summary.stages is stages


def _project_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_no_entry_point_imports_another():
    shared = {"entry_points._common", "entry_points"}
    for path in ENTRY_POINTS:
        others = {n for n in _project_imports(path) if n.startswith("entry_points") and n not in shared}
        others -= {"entry_points._common." + a for a in dir(_common)}
        assert not others, f"{path.name} imports {sorted(others)}"


# -- manifests -----------------------------------------------------------------------------------------------
def test_manifest_round_trip_and_refusals(tmp_path):
    artifacts.write_manifest(tmp_path, "prune", languages=["en", "de"], subnetworks=["en-s0", "de-s0"])
    made = artifacts.read_manifest(tmp_path / artifacts.MANIFEST, "prune", "prune_run_id")
    assert made == {"stage": "prune", "languages": ["en", "de"], "subnetworks": ["en-s0", "de-s0"]}
    with pytest.raises(XlsubError, match=r"^encode_run_id: manifest.json is not from a run of stage encode \(it says prune, and lacks model_keys\); rerun encode$"):
        artifacts.read_manifest(tmp_path / artifacts.MANIFEST, "encode", "encode_run_id")
    with pytest.raises(ValueError):
        artifacts.write_manifest(tmp_path, "encode", languages=["en"])  # model_keys missing: a bug, not bad input
    (tmp_path / artifacts.MANIFEST).write_text("{not json")
    with pytest.raises(XlsubError, match="^prune_run_id: manifest.json of the prune run does not read as JSON"):
        artifacts.read_manifest(tmp_path / artifacts.MANIFEST, "prune", "prune_run_id")
    assert all(stage.writes_manifest == (stage.name in artifacts.MANIFEST_KEYS) for stage in stages.REGISTRY)


# -- lineage by run ID -----------------------------------------------------------------------------------------
@pytest.fixture()
def runs(tmp_path):
    """Two finetune runs, a prune run of the first and an encode run of that, FINISHED, in a throwaway store."""
    with sqlite_store(tmp_path) as client:
        exp = client.create_experiment("lineage", artifact_location=(tmp_path / "a").as_uri())

        def run(stage, **inputs):
            made = client.create_run(exp, tags={artifacts.STAGE_TAG: stage, **{artifacts.input_tag(s): r for s, r in inputs.items()}})
            client.set_terminated(made.info.run_id, "FINISHED")
            return made.info.run_id

        ft_old = run("finetune")
        pr = run("prune", finetune=ft_old)
        enc = run("encode", finetune=ft_old, prune=pr)
        ft_new = run("finetune")  # the newest finetune run, not the one the prune run was made from
        with mlflow.start_run(experiment_id=exp):
            yield {"ft_old": ft_old, "ft_new": ft_new, "prune": pr, "encode": enc}


def ids(found):
    return {stage: run.info.run_id for stage, run in found.items()}


def test_an_explicit_run_fixes_the_latest_of_its_inputs(runs):
    found = lineage.resolve_inputs("encode", {"finetune_run_id": "latest", "prune_run_id": runs["prune"]})
    assert ids(found) == {"finetune": runs["ft_old"], "prune": runs["prune"]} and list(found) == ["finetune", "prune"]
    found = lineage.resolve_inputs("analyze", {"encode_run_id": runs["encode"], "prune_run_id": "latest"})
    assert ids(found) == {"finetune": runs["ft_old"], "prune": runs["prune"], "encode": runs["encode"]}


def test_runs_from_two_lineages_are_refused_naming_the_parameter(runs):
    with pytest.raises(XlsubError) as err:
        lineage.resolve_inputs("encode", {"finetune_run_id": "latest", "prune_run_id": "latest"})
    assert str(err.value) == (f"prune_run_id: prune run {runs['prune']} was made from finetune run {runs['ft_old']}, "
                              f"not {runs['ft_new']}; pass matching runs")
    with pytest.raises(XlsubError, match=f"^prune_run_id: run {runs['encode']} is an? encode run, not a prune run"):
        lineage.resolve_inputs("encode", {"finetune_run_id": runs["ft_old"], "prune_run_id": runs["encode"]})


def test_run_urls_only_for_http_servers():
    assert lineage.run_url("sqlite:///x.db", "1", "abc") is None
    assert lineage.run_url("http://127.0.0.1:5000/", "1", "abc") == "http://127.0.0.1:5000/#/experiments/1/runs/abc"


# -- code versions follow what a stage runs, and the pins -------------------------------------------------------
def test_analyze_does_not_import_training_corpora_or_fan_out():
    closure = {p.relative_to(ROOT).as_posix() for p in import_closure("entry_points.analyze")}
    assert not {"xlsub/models/training.py", "xlsub/data/corpus.py", "xlsub/data/embedded.py", "xlsub/tracking/fanout.py", "entry_points/encode.py", "entry_points/prune.py"} & closure


def copy_project(dst: Path) -> Path:
    for name in ("xlsub", "entry_points"):
        shutil.copytree(ROOT / name, dst / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("MLproject", "pyproject.toml"):
        shutil.copy(ROOT / name, dst / name)
    return dst


def versions(root: Path) -> dict[str, str]:
    code_version.cache_clear()
    return {stage: code_version(stage, root) for stage in stages.lineage_order()}


def test_a_training_edit_changes_finetune_not_analyze(tmp_path):
    root = copy_project(tmp_path)
    before = versions(root)
    with open(root / "xlsub" / "models" / "training.py", "a") as f:
        f.write("\n# the training loop changed\n")
    after = versions(root)
    assert after["finetune"] != before["finetune"]
    assert after["analyze"] == before["analyze"] and after["encode"] == before["encode"]


def test_a_pin_changes_every_stage_and_a_local_build_tag_none(tmp_path):
    root = copy_project(tmp_path)
    before = versions(root)
    pyproject = (root / "pyproject.toml").read_text()
    assert '"transformers==5.24.0"' in pyproject and "transformers==5.24.0" in dependency_pins(root)
    (root / "pyproject.toml").write_text(pyproject.replace('"transformers==5.24.0"', '"transformers==5.25.0"'))
    bumped = versions(root)
    assert all(bumped[s] != before[s] for s in before)
    (root / "pyproject.toml").write_text(pyproject.replace("# GPU utilisation", "# GPU use"))  # a comment is not a pin
    assert versions(root) == before
