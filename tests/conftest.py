"""Shared fixtures: a temporary tracking store and small real runs of the stages.

End-to-end runs go through `mlflow run . --env-manager local` in a subprocess,
as a user would type them, against a sqlite store in a temp folder.
"""

from __future__ import annotations

import os

# Under pytest-xdist (`make test`: `-n 2 --dist loadgroup`) each worker takes its share of the cores, and so do the
# stage processes it starts (they inherit these variables): two workers of two threads each on two cores would
# oversubscribe them, and OpenMP's spinning threads then slow everything down many times over.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _threads = str(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
    for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[_name] = _threads

import ast
import importlib
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from xlsub import artifacts

ROOT = Path(__file__).resolve().parents[1]
# Small but real: three scripts, enough steps to learn something.
SMALL_FINETUNE = {
    "languages": "en,de,zh",
    "epochs": "1",
    "examples_per_lang": "96",
    "test_examples_per_lang": "16",
    "batch_size": "16",
    "log_every": "2",
    "device": "cpu",
}


def subprocess_env(tracking_uri: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(MLFLOW_TRACKING_URI=tracking_uri, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # `mlflow run` runs the `python` on PATH
    env.update(extra)
    return env


def run_in_own_group(cmd: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run with captured text output, in a process group of its own: past `timeout`, the
    whole group is killed (`mlflow run` and the stage process it started), not the launcher alone."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kwargs) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def mlflow_run(tracking_uri: str, entry_point: str, params: dict[str, str], experiment: str = "xlsub-tests", check=True,
               root: Path = ROOT):
    cmd = [sys.executable, "-m", "mlflow", "run", str(root), "-e", entry_point, "--env-manager", "local", "--experiment-name", experiment]
    for key, value in params.items():
        cmd += ["-P", f"{key}={value}"]
    proc = run_in_own_group(cmd, env=subprocess_env(tracking_uri), timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    return proc


def runs_of(tracking_uri: str, experiment: str, stage: str | None = None):
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    filt = f"tags.`xlsub.stage` = '{stage}'" if stage else ""
    return client.search_runs([exp.experiment_id], filter_string=filt, order_by=["attributes.start_time DESC"])


@contextmanager
def sqlite_store(folder: Path) -> Iterator[MlflowClient]:
    """A sqlite tracking store in `folder`, the process's tracking URI while the block runs."""
    uri = f"sqlite:///{folder}/mlflow.db"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield MlflowClient(uri)
    finally:
        mlflow.set_tracking_uri(previous)


def run_in_process(monkeypatch, uri: str, experiment: str, stage: str, argv: list[str]) -> str:
    """Entry point `stage` run in-process (`main(argv)`) against the store `uri` in a new experiment named `experiment`
    (so that no other test's `latest` run is this one), the tracking URI restored after; returns the experiment's id."""
    experiment_id = MlflowClient(uri).create_experiment(experiment)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", experiment_id)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        importlib.import_module(f"entry_points.{stage}").main(argv)
    finally:
        mlflow.set_tracking_uri(previous)
    return experiment_id


def refuse_in_process(capsys, uri: str, experiment_id: str, stage: str, argv: list[str]):
    """Entry point `stage` run in-process (`main(argv)`) against the store `uri`, in experiment
    `experiment_id`: it must exit 2 with one stderr line and no traceback, and leave one new run of that
    stage, FAILED, without artifacts, whose error tag is the line. Returns the line and the run.

    In-process, a refusal costs milliseconds; `python -m entry_points.<stage>` costs ~10 s of imports. Each
    stage's end-to-end test keeps one refusal through a real process."""
    client = MlflowClient(uri)
    recent = f"attributes.start_time >= {int(time.time() * 1000) - 5000}"  # keeps the searches small
    before = {r.info.run_id for r in client.search_runs([experiment_id], recent)}
    capsys.readouterr()
    previous = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_EXPERIMENT_ID", experiment_id)
        patch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        mlflow.set_tracking_uri(uri)
        try:
            with pytest.raises(SystemExit) as exited:
                importlib.import_module(f"entry_points.{stage}").main(argv)
        finally:
            mlflow.set_tracking_uri(previous)
    err = capsys.readouterr().err
    assert exited.value.code == 2, (argv, err)
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, (argv, err)
    (run,) = [r for r in client.search_runs([experiment_id], recent) if r.info.run_id not in before]
    assert run.info.status == "FAILED" and run.data.tags[artifacts.STAGE_TAG] == stage, argv
    assert lines[0] == f"xlsub {stage}: {run.data.tags[artifacts.ERROR_TAG]}"
    assert not client.list_artifacts(run.info.run_id), argv
    return lines[0], run


@pytest.fixture(scope="session")
def store(tmp_path_factory) -> str:
    """A sqlite tracking store shared by the session's end-to-end runs."""
    folder = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{folder}/mlflow.db"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    MlflowClient(uri).create_experiment("xlsub-tests", artifact_location=(folder / "artifacts").as_uri())
    yield uri
    mlflow.set_tracking_uri(previous)


@pytest.fixture(scope="session")
def finetune_run(store):
    """One small finetune run through `mlflow run`, reused by every test that needs a finetuned model."""
    mlflow_run(store, "finetune", SMALL_FINETUNE)
    (run,) = runs_of(store, "xlsub-tests", "finetune")[:1]
    return run


@pytest.fixture(scope="session")
def prune_run(store, finetune_run):
    mlflow_run(store, "prune", {})  # no parameters: latest finetune run, every language it trained
    parents = [r for r in runs_of(store, "xlsub-tests", "prune") if r.data.tags.get("xlsub.child") != "true"]
    return parents[0]


LAPE_TEST_RATE = 0.8  # the neurons run's filter_rate and activation_bar


@pytest.fixture(scope="session")
def neurons_run(store, finetune_run):
    """One LAPE neurons run on the session's finetuned model (2% of the neurons), its parent run. The quantiles at
    0.8, not LAPE's 0.95: the small model saturates, and where more than 5% of the activation probabilities are
    exactly 1 (6.5% on one machine, fewer on another), the 0.95 quantile is 1 and no probability lies above it."""
    mlflow_run(store, "neurons", {"finetune_run_id": finetune_run.info.run_id, "examples": "32", "top_rate": "0.02",
                                  "filter_rate": str(LAPE_TEST_RATE), "activation_bar": str(LAPE_TEST_RATE)})
    return next(r for r in runs_of(store, "xlsub-tests", "neurons") if r.data.tags.get("xlsub.child") != "true")


def children_of(store, run):
    client = MlflowClient(store)
    return client.search_runs([run.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")


@pytest.fixture(scope="session")
def encode_run(store, prune_run):
    mlflow_run(store, "encode", {"max_sentences": "40", "use_random": "true", "use_base": "true", "batch_size": "16"})
    return runs_of(store, "xlsub-tests", "encode")[0]


# The whole pipeline against a real tracking server (tests/test_main.py, tests/test_ui.py)
PIPELINE_EXPERIMENT = "xlsub-pipeline"
SMALL_PIPELINE = {"languages": "en,de,zh", "epochs": "1", "examples_per_lang": "64", "test_examples_per_lang": "8", "batch_size": "16",
         "eval_examples": "16", "max_sentences": "30", "device": "cpu", "neuron_examples": "16"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def mlflow_server(folder: Path, backend_store_uri: str, *extra: str, env: dict[str, str] | None = None, wait: float = 90) -> Iterator[str]:
    """`mlflow server` on loopback (one worker, no job execution), its artifacts proxied into
    `folder`/artifacts and its log in `folder`/server.log: yields its URL once /health answers, and stops
    it, with its worker, by the PID it started."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = folder / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", backend_store_uri, "--artifacts-destination", str(folder / "artifacts"), *extra],
            env={**(env or os.environ), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
        try:
            deadline = time.time() + wait
            while True:
                try:
                    if urllib.request.urlopen(f"{url}/health", timeout=2).read().strip() == b"OK":
                        break
                except OSError:
                    pass
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"mlflow server did not start: {log_path.read_text()[-3000:]}")
                time.sleep(0.5)
            yield url
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)


@pytest.fixture(scope="session")
def tracking_server(tmp_path_factory):
    """A real MLflow tracking server on loopback: sqlite backend, proxied artifact store in a temp folder."""
    folder = tmp_path_factory.mktemp("server")
    with mlflow_server(folder, f"sqlite:///{folder}/mlflow.db") as url:
        yield url


def main_run(url: str, params: dict[str, str], root: Path = ROOT):
    proc = mlflow_run(url, "main", params, experiment=PIPELINE_EXPERIMENT, root=root)
    client = MlflowClient(url)
    exp = client.get_experiment_by_name(PIPELINE_EXPERIMENT)
    (run,) = client.search_runs([exp.experiment_id], "tags.`xlsub.stage` = 'main'", order_by=["attributes.start_time DESC"], max_results=1)
    return run, proc


@pytest.fixture(scope="session")
def pipeline(tracking_server):
    first, _ = main_run(tracking_server, SMALL_PIPELINE)
    start = time.perf_counter()
    second, _ = main_run(tracking_server, {**SMALL_PIPELINE, "epochs": "1.0"})  # same value, other spelling
    second_seconds = time.perf_counter() - start
    third, _ = main_run(tracking_server, {**SMALL_PIPELINE, "threshold": "1.3", "register": "true"})
    return {"first": first, "second": second, "third": third, "second_seconds": second_seconds}


def stage_ids(run) -> dict[str, str]:
    return {s: run.data.tags[f"xlsub.{s}_run_id"] for s in ("finetune", "prune", "encode", "analyze")}


@pytest.fixture
def two_threads():
    """torch on two intra-op threads for the test (what `xlsub.stats.workers.side_by_side` splits work by), restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


# The session fixtures that run stages, by the group of test modules that share them. `make test` runs pytest-xdist with
# `--dist loadgroup`, which `SharedRunScheduling` replaces: each module's tests go to one worker (its module fixtures
# made once), and the modules whose functions take one of a group's fixtures go there together (no stage run made twice).
# (pytest-xdist's own loadgroup reads groups from a suffix it writes into each test's node ID, which pytest 9 no
# longer takes: its groups are silently ignored.)
SHARED_RUNS = {"stage-runs": {"finetune_run", "prune_run", "neurons_run", "encode_run"}, "pipeline": {"pipeline", "tracking_server"}}


def shared_run_group(module: Path) -> str | None:
    """The `SHARED_RUNS` group whose fixtures a test module's functions (tests and fixtures) take as parameters, or None."""
    tree = ast.parse(module.read_text())
    names = {arg.arg for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) for arg in node.args.args}
    return next((group for group, fixtures in SHARED_RUNS.items() if names & fixtures), None)


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    groups: dict[str, str] = {}
    slow: set[str] = set()  # the groups with a module marked slow

    class SharedRunScheduling(LoadScopeScheduling):
        ordered = False

        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::")[0]
            if module not in groups:
                groups[module] = shared_run_group(config.rootpath / module) or module
                if "pytest.mark.slow" in (config.rootpath / module).read_text():
                    slow.add(groups[module])
            return groups[module]

        def _assign_work_unit(self, node) -> None:
            """The longest work first, so that no worker is left with it at the end: the shared runs' groups, then the
            groups marked slow, then the rest (by their number of tests, as xdist orders them)."""
            if not self.ordered:
                self.ordered = True
                for scope in [s for s in reversed(self.workqueue) if s in slow] + [s for s in reversed(SHARED_RUNS) if s in self.workqueue]:
                    self.workqueue.move_to_end(scope, last=False)
            super()._assign_work_unit(node)

    return SharedRunScheduling(config, log)
