"""`make test`'s pytest-xdist scheduler (`tests/conftest.py`): the modules that share the session's stage runs go to one
worker together, every other module's tests stay together, and the longest groups are handed out first."""

from __future__ import annotations

from types import SimpleNamespace

from tests import conftest
from tests.conftest import ROOT


class FakeNode:
    """What the scheduler asks of a pytest-xdist worker: the test indexes it is sent."""

    def __init__(self, name: str):
        self.sent, self.shutting_down, self.gateway = [], False, SimpleNamespace(id=name)

    def send_runtest_some(self, indexes):
        self.sent.append(list(indexes))

    def shutdown(self):
        self.shutting_down = True


def scheduler():
    option = SimpleNamespace(dist="loadgroup", tx=["2*popen"], loadscopereorder=True)
    config = SimpleNamespace(option=option, rootpath=ROOT, getvalue=lambda name: getattr(option, name))
    return conftest.pytest_xdist_make_scheduler(config, None)


def test_shared_runs_stay_on_one_worker_and_go_first():
    collection = [f"tests/{module}::test_{i}" for module in ("test_layers.py", "test_summary.py", "test_encode_entry.py",
                                                              "test_main.py", "test_finetune.py", "test_twins.py") for i in range(3)]
    sched = scheduler()
    assert sched._split_scope("tests/test_encode_entry.py::test_0") == sched._split_scope("tests/test_finetune.py::test_x[a-b]") == "stage-runs"
    assert sched._split_scope("tests/test_main.py::test_0") == sched._split_scope("tests/test_twins.py::test_0") == "pipeline"
    assert sched._split_scope("tests/test_summary.py::test_0") == "tests/test_summary.py"
    nodes = [FakeNode("gw0"), FakeNode("gw1")]
    for node in nodes:
        sched.add_node(node)
        sched.add_node_collection(node, collection)
    sched.schedule()
    first = [{collection[i].split("::")[0] for i in node.sent[0]} for node in nodes]
    assert first == [{"tests/test_encode_entry.py", "tests/test_finetune.py"}, {"tests/test_main.py", "tests/test_twins.py"}]
    done = set()
    while len(done) < len(collection) and not all(node.shutting_down for node in nodes):  # each worker finishes what it was sent
        for node in nodes:
            for i in [i for batch in node.sent for i in batch if (node.gateway.id, i) not in done]:
                done.add((node.gateway.id, i))
                sched.mark_test_complete(node, i)
    everything = [i for node in nodes for batch in node.sent for i in batch]
    assert sorted(everything) == list(range(len(collection)))  # each test once
    for module in ("test_layers.py", "test_summary.py"):  # a module's tests on one worker
        assert sum(any(collection[i].startswith(f"tests/{module}") for batch in node.sent for i in batch) for node in nodes) == 1


def test_other_dist_modes_keep_pytest_xdist_s_own_scheduler():
    sched = scheduler()
    assert type(sched).__name__ == "SharedRunScheduling"
    option = SimpleNamespace(dist="load", tx=["2*popen"], loadscopereorder=True)
    assert conftest.pytest_xdist_make_scheduler(SimpleNamespace(option=option, rootpath=ROOT, getvalue=lambda name: getattr(option, name)), None) is None
