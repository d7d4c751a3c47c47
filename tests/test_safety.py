"""Nothing unsafe by default: a scan of the code (strings too: tests run code in subprocesses) for pickle
loading, remote code, non-safetensors saving and servers open beyond loopback."""

from __future__ import annotations

import re

from tests.conftest import ROOT

FOLDERS = ("xlsub", "entry_points", "benchmarks", "tests")
LOAD = "torch" + ".load("  # spelled apart so that this file does not match itself


def sources() -> dict[str, str]:
    return {str(p.relative_to(ROOT)): p.read_text() for folder in FOLDERS for p in sorted((ROOT / folder).rglob("*.py"))}


def call_text(text: str, start: int) -> str:
    """The call that opens at `start` (its opening parenthesis), up to its matching close."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return text[start : i + 1]
    return text[start:]


def test_every_torch_load_passes_weights_only_true():
    unsafe = []
    for path, text in sources().items():
        for found in re.finditer(re.escape(LOAD), text):
            call = call_text(text, found.end() - 1)
            if not re.search(r"weights_only\s*=\s*True", call):
                unsafe.append(f"{path}:{text.count(chr(10), 0, found.start()) + 1}: {LOAD}{call[1:60]}")
    assert not unsafe, "torch.load without weights_only=True unpickles arbitrary code:\n" + "\n".join(unsafe)


def test_no_remote_code_no_pickled_weights_no_open_servers():
    patterns = {"trust_remote_code" + r"\s*=\s*True": "runs code from the model's repository",
                "safe_serialization" + r"\s*=\s*False": "saves pickled weights", "save_safetensors" + r"\s*=\s*False": "saves pickled weights",
                "allow_pickle" + r"\s*=\s*True": "unpickles", r"pickle\.loads?\(": "unpickles", r"0\.0\.0" + r"\.0": "listens on every interface"}
    found = [f"{path}: {why} ({pattern})" for path, text in sources().items() for pattern, why in patterns.items() if re.search(pattern, text)]
    assert not found, "\n".join(found)


def test_servers_bind_to_loopback():
    makefile = (ROOT / "Makefile").read_text()
    ui = re.search(r"^ui:.*\n((?:\t.*\n)+)", makefile, re.M).group(1)
    assert "mlflow ui --host 127.0.0.1 " in ui
    conftest = (ROOT / "tests" / "conftest.py").read_text()
    assert '"mlflow", "server", "--host", "127.0.0.1"' in conftest
    # the team server (tests/team_server.py) is started by conftest's mlflow_server, not by a command of its own
    team = (ROOT / "tests" / "team_server.py").read_text()
    assert "mlflow_server(" in team and '"server"' not in team
