"""Every parameter of every entry point refuses its bad values the one way: one stderr line that names
the parameter, a FAILED run, exit status 2, no traceback; and encode and analyze refuse input runs that
lack an artifact they read, before any work. Entry points run in-process (`main(argv)`) against a
throwaway sqlite store; nothing here loads a model."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import fields, make_dataclass
from pathlib import Path
from typing import get_type_hints
from urllib.parse import urlparse

import pytest

from entry_points import analyze, compare, encode, finetune, main, prune
from entry_points._common import StageArgs, stage_classes
from tests.conftest import refuse_in_process, sqlite_store
from xlsub import artifacts
from xlsub.tracking import lineage

MODULES = {"finetune": finetune, "prune": prune, "encode": encode, "analyze": analyze, "compare": compare, "main": main}
CLASSES = stage_classes()
MISSING_RUN = "f" * 32
RUN_ID_BAD = ["", "   ", MISSING_RUN]
LANGUAGES_BAD = ["en,,de", ",en", "en,de,en", "en,DE,de", "", " , ", "e n", "en;de", "1x"]
SEEDS_BAD = ["0,,1", "0,0", "-1", "4294967296", "0,x", "1.5", ""]

# Bad values of each stage parameter, by hand: out of range, empty or repeated items, wrong choices, text
# that is not a number. Every float parameter also gets nan, inf and -inf, every int and bool parameter
# text that does not parse (FLOATS_BAD, below). A parameter missing here fails
# test_every_parameter_has_bad_values.
BAD: dict[str, dict[str, list[str]]] = {
    "finetune": {
        "model": ["", "  "],
        "corpus": [""],
        "languages": LANGUAGES_BAD,
        "seed": ["-1", "4294967296", "1.5", "abc"],
        "epochs": ["0", "-1"],
        "batch_size": ["0", "-1"],
        "lr": ["0", "-0.001"],
        "weight_decay": ["-0.01"],
        "max_seq_len": ["2", "0", "-1"],
        "examples_per_lang": ["0", "-5"],
        "test_examples_per_lang": ["0"],
        "fp16": ["maybe"],
        "bf16": ["2"],
        "compile": ["sometimes"],
        "eval_only": ["yes please"],
        "resume": ["no/such/checkpoint-1", "", "sometimes"],
        "save_steps": ["0", "-1"],
        "checkpoint_artifacts": ["maybe"],
        "keep_checkpoints": ["sometimes"],
        "device": ["gpu", "cuda:x", "cpu,cuda", ""],
        "log_every": ["0"],
    },
    "prune": {
        "finetune_run_id": RUN_ID_BAD,
        "languages": LANGUAGES_BAD,
        "threshold": ["0.9", "0", "-1"],
        "amount": ["0", "1.5", "-0.1"],
        "target_sparsity": ["nan", "inf", "-inf", "0", "1", "1.5", "-0.5", "half", ""],
        "eval_examples": ["1", "0", "-1"],
        "batch_size": ["0"],
        "seeds": SEEDS_BAD,
        "random_draws": ["0"],
        "bootstrap": ["9", "0", "-1"],
        "continue_to": ["1.01", "-0.1"],
        "log_stock_models": ["maybe"],
        "register": ["maybe"],
        "precision": ["fp64", "bfloat16", ""],
        "device": ["tpu"],
    },
    "encode": {
        "finetune_run_id": RUN_ID_BAD,
        "prune_run_id": RUN_ID_BAD,
        "neurons_run_id": RUN_ID_BAD,
        "corpus": [" "],
        "languages": LANGUAGES_BAD,
        "max_sentences": ["0", "-1"],
        "batch_size": ["0"],
        "dtype": ["float8", "FLOAT32", ""],
        "use_base": ["maybe"],
        "use_random": ["maybe"],
        "pooling": ["max", ""],
        "subnetwork_seeds": [*SEEDS_BAD, "firstly"],
        "precision": ["fp64", "half", ""],
        "device": ["cuda:"],
    },
    "analyze": {
        "encode_run_id": RUN_ID_BAD,
        "prune_run_id": RUN_ID_BAD,
        "neurons_run_id": RUN_ID_BAD,
        "cka": ["cosine", ""],
        "cka_precision": ["float16", ""],
        "layers": ["0,,2", "1,1", "-1", "last", "1.5", ""],
        "reference": ["", "e n", "en,de"],
        "bootstrap": ["9", "-1"],
        "permutations": ["0", "-1"],
        "resample_seed": ["-1", "4294967296"],
        "cka_permutations": ["0"],
        "subnetwork_permutations": ["0"],
        "length_permutations": ["0"],
        "power_draws": ["0"],
        "device": ["tpu", "cuda:"],
    },
    "neurons": {
        "finetune_run_id": RUN_ID_BAD,
        "languages": [*LANGUAGES_BAD, "en"],  # lape (the default) needs two or more
        "method": ["entropy", "LAPE2", ""],
        "top_rate": ["0", "1.5", "-0.01"],
        "filter_rate": ["0", "1.1"],
        "activation_bar": ["0", "2"],
        "threshold": ["0.9", "0"],
        "amount": ["0", "1.5"],
        "target_sparsity": ["0", "1", "half", ""],
        "examples": ["0", "-1"],
        "seeds": SEEDS_BAD,
        "batch_size": ["0"],
        "random_draws": ["0"],
        "log_stock_models": ["maybe"],
        "precision": ["fp8"],
        "device": ["tpu"],
    },
    "compare": {
        "analyze_run_ids": ["", "a", "a,,b", ",a,b", "a,b,a", "a,latest", "a, LATEST"],
    },
}
MAIN_ONLY = {"force": ["maybe"], "encode_neurons": ["maybe"], "units": ["neurons", "heads,heads", "heads,axons", ""]}
PARSE_BAD = {float: ["nan", "inf", "-inf", "ten"], int: ["nan", "inf", "ten"], bool: ["nope"], str: []}


def main_bad_values(name: str) -> list[str]:
    """main's parameter `name` is one or more stage fields (entry_points.main's mapping), checked by the
    same field metadata: the first two bad values of each."""
    values = list(MAIN_ONLY.get(name, []))
    for stage, cls in main.STAGE_ARGS.items():
        for f in fields(cls):
            if main.main_name(stage, f.name) == name:
                values += [v for v in BAD[stage][f.name][:2] if v not in values]
    return values


def bad_values(stage: str, name: str) -> list[str]:
    kind = get_type_hints(CLASSES[stage])[name]
    by_hand = main_bad_values(name) if stage == "main" else BAD[stage].get(name, [])
    parse_bad = [v for v in PARSE_BAD[kind] if v not in by_hand]
    return by_hand + (parse_bad[:1] if stage == "main" else parse_bad)


CASES = [(stage, f.name, value) for stage, cls in CLASSES.items() for f in fields(cls) for value in bad_values(stage, f.name)]


def test_every_parameter_has_bad_values():
    """Derived from the dataclasses: a new parameter fails here until its bad values are in BAD."""
    for stage, cls in CLASSES.items():
        names = {f.name for f in fields(cls)}
        if stage == "main":
            assert all(main_bad_values(name) for name in names), [n for n in names if not main_bad_values(n)]
        else:
            assert set(BAD[stage]) == names, stage
            assert all(BAD[stage][name] for name in names), stage


def test_every_number_declares_its_range_once_and_defaults_pass():
    for stage, cls in CLASSES.items():
        hints = get_type_hints(cls)
        for f in fields(cls):
            if hints[f.name] in (int, float):
                assert "range" in f.metadata, (stage, f.name)
                assert f.default in f.metadata["range"], (stage, f.name)
        if stage != "compare":  # compare has no default analyze runs
            cls().validate()
    # a number without a range is a bug of the stage, not bad input
    with pytest.raises(TypeError, match="needs a 'range'"):
        make_dataclass("Bare", [("n", int, 0)], bases=(StageArgs,))().validate()


# -- the one path, in-process against a throwaway store -----------------------------------------------------
@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A sqlite store with one fake, complete lineage (finetune -> prune with two subnetworks -> encode):
    every artifact encode and analyze check for, as placeholder files."""
    folder = tmp_path_factory.mktemp("validation")
    ram = Path("/dev/shm")  # sqlite commits wait for the disk: on a RAM disk, where there is one, ~300 runs take a third of the time
    db = Path(tempfile.mkdtemp(dir=ram)) if ram.is_dir() and os.access(ram, os.W_OK) else folder
    stack = contextlib.ExitStack()
    client = stack.enter_context(sqlite_store(db))
    exp = client.create_experiment("xlsub-validation", artifact_location=(folder / "artifacts").as_uri())
    files = folder / "files"

    def run(stage, tags=None, params=None, paths=(), parent=None, sentences=None, manifest=None):
        made = client.create_run(exp, tags={artifacts.STAGE_TAG: stage, **(tags or {})})
        run_id = made.info.run_id
        for key, value in (params or {}).items():
            client.log_param(run_id, key, value)
        out = files / run_id
        for path in paths:
            (out / path).parent.mkdir(parents=True, exist_ok=True)
            (out / path).write_text("placeholder")
        if sentences is not None:
            client.log_dict(run_id, {"languages": sentences, "ids": [], "texts": {}}, artifacts.SENTENCES)
        if manifest is not None:
            client.log_dict(run_id, {"stage": stage, **manifest}, artifacts.MANIFEST)
        if paths:
            client.log_artifacts(run_id, str(out))
        client.set_terminated(run_id, "FINISHED")
        return client.get_run(run_id)

    lm_data = {"corpus": "embedded", "seed": 0, "max_seq_len": 64, "examples_per_lang": 10, "test_examples_per_lang": 5}
    ft = run("finetune", {artifacts.LANGUAGES_TAG: "en,de"}, paths=artifacts.model_files(),
             manifest={"languages": ["en", "de"], "model": "tiny", "lm_data": lm_data})
    tables = [artifacts.table_path(t, folder=None) for t in (artifacts.CHUNK_LOSSES, artifacts.CROSS_PPL, artifacts.CROSS_PPL_RANDOM)]
    pr = run("prune", {artifacts.input_tag("finetune"): ft.info.run_id}, {"languages": "all", "seeds": "0"}, [*tables, artifacts.PPL_FULL],
             manifest={"languages": ["en", "de"], "subnetworks": ["en-s0", "de-s0"]})
    children = {}
    for lang in ("en", "de"):
        children[lang] = run("prune", {artifacts.CHILD_TAG: "true", artifacts.LANGUAGE_TAG: lang, artifacts.SEED_TAG: "0",
                                       artifacts.SUBNETWORK_TAG: f"{lang}-s0", artifacts.PARENT_TAG: pr.info.run_id},
                             paths=[artifacts.HEAD_MASK, artifacts.STEPS, *artifacts.model_files(artifacts.SUBNETWORK_DIR)])
    keys = ["full", "de-s0", "en-s0", "random"]
    enc = run("encode", {artifacts.input_tag("finetune"): ft.info.run_id, artifacts.input_tag("prune"): pr.info.run_id},
              {"use_base": "false", "use_random": "true", "subnetwork_seeds": "first"},
              [artifacts.encoding_path(k, lang) for k in keys for lang in ("en", "de")], sentences=["en", "de"],
              manifest={"languages": ["en", "de"], "model_keys": keys})
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_EXPERIMENT_ID", exp)
        patch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        yield {"client": client, "uri": client.tracking_uri, "exp": exp, "finetune": ft, "prune": pr, "children": children, "encode": enc}
    stack.close()
    if db != folder:
        shutil.rmtree(db)


def refuse(store, capsys, stage: str, argv: list[str]) -> tuple[str, object]:
    """Run `stage` in-process; it must exit 2 with one stderr line and leave one FAILED run. Returns both."""
    return refuse_in_process(capsys, store["uri"], store["exp"], stage, argv)


@pytest.mark.parametrize("stage, name, value", CASES, ids=[f"{s}-{n}-{v!r}" for s, n, v in CASES])
def test_bad_value_is_one_line_naming_the_parameter_exit_2_and_a_failed_run(store, capsys, stage, name, value):
    line, _ = refuse(store, capsys, stage, [f"--{name}", value])
    assert line.startswith(f"xlsub {stage}: {name}: "), line


@pytest.mark.parametrize("stage, argv, named", [
    ("finetune", ["--sed", "3"], "sed"),
    ("finetune", ["--seed"], "seed"),
    ("finetune", ["--fp16", "true", "--bf16", "true"], "fp16, bf16"),
    ("prune", ["--threshold", "1.2", "--amount", "0.2", "--seeds", "3,3"], "seeds"),
    ("analyze", ["--cka", "rbf", "--cka_precision", "float32"], "cka_precision"),
    ("prune", ["--register", "true", "--log_stock_models", "false"], "register"),
    ("main", ["--register", "true", "--log_stock_models", "false"], "register"),
    ("main", ["--languages", "de,zh"], "reference"),  # reference en is not among them
    ("main", ["--languages", "DE,ZH", "--reference", "EN"], "reference"),
    ("main", ["--units", "heads", "--encode_neurons", "true"], "encode_neurons"),  # no neuron subnetworks to encode
])
def test_other_refusals_take_the_same_path(store, capsys, stage, argv, named):
    line, _ = refuse(store, capsys, stage, argv)
    assert line.startswith(f"xlsub {stage}: {named}: "), line


def test_compile_without_a_compiler_is_refused_before_any_work(store, capsys, monkeypatch):
    """compile=true where torch.compile cannot build its kernels (no C++ compiler for the CPU): one line, before the
    corpus is read or a model made."""
    import shutil as shell

    from xlsub.data import corpus

    monkeypatch.setattr(shell, "which", lambda name, *a, **k: None)
    monkeypatch.setattr(corpus, "load_corpus", lambda *a, **k: pytest.fail("the corpus was read before the refusal"))
    line, _ = refuse(store, capsys, "finetune", ["--compile", "true", "--device", "cpu"])
    assert line.startswith("xlsub finetune: compile: ") and "C++ compiler" in line and "compile=false" in line, line


@pytest.mark.parametrize("stage", ["prune", "neurons", "encode"])
def test_mixed_precision_the_cpu_would_emulate_is_refused_before_any_work(store, capsys, monkeypatch, stage):
    from xlsub import devices
    from xlsub.tracking import lineage as inputs

    monkeypatch.setattr(devices, "native_16bit_products", lambda dtype: False)
    monkeypatch.setattr(inputs, "resolve_inputs", lambda *a, **k: pytest.fail("an input run was looked up before the refusal"))
    line, _ = refuse(store, capsys, stage, ["--precision", "bf16", "--device", "cpu"])
    assert line.startswith(f"xlsub {stage}: precision: this CPU has no bf16 products in hardware"), line


def test_main_refuses_precision_and_compile_before_finetune_runs(store, capsys, monkeypatch):
    """main checks every stage's parameters first: a precision prune would refuse, or a compile finetune cannot build,
    stops it before finetune spends minutes."""
    import shutil as shell

    from xlsub import devices

    monkeypatch.setattr(devices, "native_16bit_products", lambda dtype: False)
    line, _ = refuse(store, capsys, "main", ["--precision", "bf16", "--device", "cpu"])
    assert line.startswith("xlsub main: precision: this CPU has no bf16 products in hardware"), line
    monkeypatch.setattr(shell, "which", lambda name, *a, **k: None)
    line, _ = refuse(store, capsys, "main", ["--compile", "true", "--device", "cpu"])
    assert line.startswith("xlsub main: compile: ") and "C++ compiler" in line, line


def test_a_value_that_did_not_parse_is_logged_as_typed(store, capsys):
    _, run = refuse(store, capsys, "finetune", ["--seed", "abc", "--epochs", "2"])
    assert run.data.params["seed"] == "abc" and run.data.params["epochs"] == "2"


def test_spelling_is_normalised_not_refused():
    """Run IDs lose surrounding spaces, languages their case, keywords their case; nothing is refused."""
    args = prune.PruneArgs(finetune_run_id="  abc ", languages=" EN , De", seeds=" 0, 1", target_sparsity=" None ")
    args.validate()
    assert (args.finetune_run_id, args.languages, args.seed_list, args.sparsity) == ("abc", "en,de", [0, 1], None)
    assert encode.EncodeArgs(prune_run_id=" LATEST ", subnetwork_seeds="ALL").seed_choice == "all"
    assert encode.EncodeArgs(prune_run_id=" LATEST ").prune_run_id == "latest"
    assert analyze.AnalyzeArgs(reference=" EN", layers=" 0 , 2").layer_list == [0, 2]
    assert compare.CompareArgs(analyze_run_ids=" a , b ").run_ids == ["a", "b"]
    reference = main.MainArgs(languages="DE,En", reference="en")
    reference.validate()
    assert reference.stage_args("finetune").languages == "de,en"


# -- complete inputs or a refusal -----------------------------------------------------------------------------
def local(run, path: str) -> Path:
    return Path(urlparse(run.info.artifact_uri).path) / path


@pytest.fixture()
def without(store, tmp_path):
    """Take artifacts away for one test (run, path), put them back after it."""
    taken = []

    def take(run, path):
        src = local(run, path)
        dst = tmp_path / str(len(taken))
        shutil.move(src, dst)
        taken.append((dst, src))

    yield take
    for dst, src in taken:
        shutil.move(dst, src)


def test_the_complete_fake_lineage_passes_both_checks(store, tmp_path):
    ft, pr = store["finetune"], store["prune"]
    children = lineage.subnetworks(pr)
    assert sorted(map(str, children)) == ["de-s0", "en-s0"]
    encode.check_inputs(ft, children)
    checked = analyze.check_inputs({"finetune": ft, "prune": pr, "encode": store["encode"]}, tmp_path)
    assert {sid: r.info.run_id for sid, r in checked.items()} == {sid: r.info.run_id for sid, r in children.items()}
    assert lineage.manifest(store["encode"], "encode_run_id", tmp_path / "m")["model_keys"] == ["full", "de-s0", "en-s0", "random"]


@pytest.mark.parametrize("lang, path", [("de", artifacts.HEAD_MASK), ("en", f"{artifacts.SUBNETWORK_DIR}/model.safetensors"),
                                        ("de", artifacts.SUBNETWORK_DIR)])
def test_encode_refuses_a_subnetwork_without_its_head_mask_or_model(store, capsys, without, lang, path):
    child = store["children"][lang]
    without(child, path)
    line, _ = refuse(store, capsys, "encode", ["--prune_run_id", f" {store['prune'].info.run_id} ", "--device", "cpu"])
    assert line.startswith(f"xlsub encode: prune_run_id: prune run {child.info.run_id} (subnetwork {lang}-s0 of prune run "
                           f"{store['prune'].info.run_id}) has no artifact '{path if '.' in path else path + '/config.json'}'"), line
    assert line.endswith("; rerun prune")


def test_encode_refuses_a_finetune_run_without_its_model(store, capsys, without):
    without(store["finetune"], artifacts.MODEL_DIR)
    line, _ = refuse(store, capsys, "encode", ["--prune_run_id", store["prune"].info.run_id])
    assert line == (f"xlsub encode: finetune_run_id: finetune run {store['finetune'].info.run_id} has no artifact 'model/config.json' "
                    "and 1 more (model/model.safetensors); rerun finetune")


def test_encode_and_analyze_refuse_a_prune_run_whose_child_run_was_deleted(store, capsys):
    client, child = store["client"], store["children"]["en"]
    client.delete_run(child.info.run_id)
    try:
        for stage, argv in (("encode", ["--prune_run_id", store["prune"].info.run_id]), ("analyze", ["--encode_run_id", store["encode"].info.run_id])):
            line, _ = refuse(store, capsys, stage, argv)
            assert line == f"xlsub {stage}: prune_run_id: prune run {store['prune'].info.run_id} has no child run for subnetwork en-s0; rerun prune"
    finally:
        client.restore_run(child.info.run_id)


@pytest.mark.parametrize("key, lang", [("de-s0", "en"), ("random", "de"), ("full", "en")])
def test_analyze_refuses_an_encode_run_missing_one_encodings_file(store, capsys, without, key, lang):
    path = artifacts.encoding_path(key, lang)
    without(store["encode"], path)
    line, _ = refuse(store, capsys, "analyze", ["--encode_run_id", f"{store['encode'].info.run_id} "])  # a trailing space resolves
    assert line == f"xlsub analyze: encode_run_id: encode run {store['encode'].info.run_id} has no artifact '{path}'; rerun encode"


def test_analyze_refuses_an_encode_run_missing_a_whole_model_key(store, capsys, without):
    without(store["encode"], f"{artifacts.ENCODINGS_DIR}/en-s0")
    line, _ = refuse(store, capsys, "analyze", ["--encode_run_id", store["encode"].info.run_id])
    assert f"has no artifact '{artifacts.encoding_path('en-s0', 'en')}' and 1 more ({artifacts.encoding_path('en-s0', 'de')}); rerun encode" in line


@pytest.mark.parametrize("which, path", [("child", artifacts.STEPS), ("parent", artifacts.PPL_FULL), ("encode", artifacts.SENTENCES)])
def test_analyze_refuses_missing_prune_and_encode_artifacts(store, capsys, without, which, path):
    run = {"child": store["children"]["de"], "parent": store["prune"], "encode": store["encode"]}[which]
    without(run, path)
    line, _ = refuse(store, capsys, "analyze", ["--encode_run_id", store["encode"].info.run_id])
    stage = "encode" if which == "encode" else "prune"
    assert f"run {run.info.run_id}" in line and f"has no artifact '{path}'" in line and line.endswith(f"; rerun {stage}"), line
