"""xlsub's metrics as Hugging Face `evaluate` modules, computed by the same functions the stages use.

    import evaluate, xlsub.metrics
    ppl = evaluate.load(xlsub.metrics.path("masked_perplexity"))
    cka = evaluate.load(xlsub.metrics.path("cka"))

Each module is a folder holding `<name>/<name>.py` (and a README card); `evaluate.load` on the folder
needs no hub access.
"""

from __future__ import annotations

from pathlib import Path

NAMES = ("masked_perplexity", "cka")


def path(name: str) -> str:
    """The folder of the `evaluate` module `name` (one of NAMES), for `evaluate.load`."""
    if name not in NAMES:
        raise ValueError(f"xlsub.metrics: no module '{name}'; use one of {', '.join(NAMES)}")
    return str(Path(__file__).resolve().parent / name)
