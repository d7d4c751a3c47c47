"""MLflow system metrics on stage runs: recorded into the run `mlflow run` made, the monitor thread stopped on
every way out of the run, MLflow's own switch and a user's sampling interval respected. In-process, against
a throwaway sqlite store."""

import os
import threading
import time
from dataclasses import dataclass

import mlflow.tracking.fluent
import psutil
import pytest

from tests.conftest import sqlite_store
from xlsub.errors import XlsubError
from xlsub.tracking import runs as tracking

CPU = "system/cpu_utilization_percentage"
MEMORY = "system/system_memory_usage_megabytes"


@dataclass
class Args:
    size: int = 1

    def validate(self):
        pass


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    with sqlite_store(tmp_path_factory.mktemp("mlflow")) as client:  # one store: creating one takes seconds
        yield client


@pytest.fixture()
def client(store, monkeypatch):
    for name in ("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "MLFLOW_RUN_ID", "MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.1")  # a user's value: a test cannot wait 2 s a sample
    return store


def monitors():
    return [t for t in threading.enumerate() if t.name == "SystemMetricsMonitor" and t.is_alive()]


def test_stage_run_records_system_metrics_into_the_run_mlflow_run_made(client, monkeypatch):
    made = client.create_run("0").info.run_id  # `mlflow run` creates the run and hands it over in MLFLOW_RUN_ID
    monkeypatch.setenv("MLFLOW_RUN_ID", made)
    with tracking.stage_run("encode", Args(), system_metrics=True) as run:
        assert run.info.run_id == made and len(monitors()) == 1
        time.sleep(0.8)
    assert monitors() == []
    assert client.get_run(made).info.status == "FINISHED"
    cpu = client.get_metric_history(made, CPU)
    assert len(cpu) >= 3 and sorted(m.step for m in cpu) == list(range(len(cpu)))
    assert all(0 <= m.value <= 100 for m in cpu)
    # memory in use as psutil reports it now, within a factor of 2 (other processes come and go)
    used = (psutil.virtual_memory().total - psutil.virtual_memory().available) / 2**20
    assert all(used / 2 < m.value < used * 2 for m in client.get_metric_history(made, MEMORY))


@pytest.mark.parametrize("error, raised", [(RuntimeError("a bug"), RuntimeError), (XlsubError("size: bad; fix it"), SystemExit)])
def test_failed_stage_stops_the_monitor_and_ends_the_run_failed(client, error, raised):
    with pytest.raises(raised):
        with tracking.stage_run("encode", Args(), system_metrics=True) as run:
            time.sleep(0.4)
            raise error
    assert monitors() == []
    assert client.get_run(run.info.run_id).info.status == "FAILED"
    assert client.get_metric_history(run.info.run_id, CPU)  # what was sampled before the failure is kept


def test_mlflow_switch_turns_system_metrics_off_and_stages_opt_in(client, monkeypatch):
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    with tracking.stage_run("encode", Args(), system_metrics=True) as off:
        assert monitors() == []
        time.sleep(0.3)
    monkeypatch.delenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING")
    with tracking.stage_run("analyze", Args()) as default:  # a stage that did not opt in
        assert monitors() == []
        time.sleep(0.3)
    for run in (off, default):
        assert client.get_run(run.info.run_id).data.metrics == {}


def test_sampling_interval_is_xlsub_default_unless_the_user_set_one(client, monkeypatch):
    monkeypatch.delenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL")
    with tracking.stage_run("encode", Args(), system_metrics=True) as run:
        monitor = mlflow.tracking.fluent.run_id_to_system_metrics_monitor[run.info.run_id]
        assert monitor.sampling_interval == tracking.SYSTEM_METRICS_SECONDS
    assert "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL" not in os.environ  # not left for child processes
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "7")
    with tracking.stage_run("encode", Args(), system_metrics=True) as run:
        assert mlflow.tracking.fluent.run_id_to_system_metrics_monitor[run.info.run_id].sampling_interval == 7
    assert os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] == "7" and monitors() == []
