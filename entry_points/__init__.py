"""One module per stage, started as `python -m entry_points.<stage>` (by `mlflow run`, torchrun or a user)."""

import os
import sys

# Where this is 1, torch's CPU allocator backs each tensor of 2 MB or more with transparent huge pages (Linux,
# `madvise` or `always` in /sys/kernel/mm/transparent_hugepage/enabled): a fresh 200 MB matrix then faults in 100
# pages instead of 51,200. analyze makes thousands of such tensors (n x n at n = 5,000, float64 copies of the
# encodings): at the study's size retrieval's table took 270 s instead of 335 on 2 cores (`benchmarks/README.md`).
# torch reads it once, at the process's first allocation, so it is set here, before any; a user's own value stands
# (0 turns it off).
HUGE_PAGES = "THP_MEM_ALLOC_ENABLE"


def use_huge_pages() -> None:
    """Ask torch's CPU allocator for transparent huge pages (`HUGE_PAGES`) unless the environment says otherwise; in
    effect only where this process has not yet allocated a tensor."""
    os.environ.setdefault(HUGE_PAGES, "1")


use_huge_pages()

# While `python -m entry_points.<stage>` imports this package, argv[0] is still "-m": check the tracking
# server now, in a second, not after the stage's imports
if sys.argv[:1] == ["-m"] and "-m" in sys.orig_argv:
    _module = sys.orig_argv[sys.orig_argv.index("-m") + 1]
    if _module.startswith("entry_points.") and _module != "entry_points.mlproject":  # that one writes a file, no server
        from xlsub.tracking import server

        server.check_or_exit(_module.rpartition(".")[2])
