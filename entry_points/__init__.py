"""One module per stage, started as `python -m entry_points.<stage>` (by `mlflow run`, torchrun or a user)."""

import sys

# While `python -m entry_points.<stage>` imports this package, argv[0] is still "-m": check the tracking
# server now, in a second, not after the stage's imports
if sys.argv[:1] == ["-m"] and "-m" in sys.orig_argv:
    _module = sys.orig_argv[sys.orig_argv.index("-m") + 1]
    if _module.startswith("entry_points.") and _module != "entry_points.mlproject":  # that one writes a file, no server
        from xlsub.tracking import server

        server.check_or_exit(_module.rpartition(".")[2])
