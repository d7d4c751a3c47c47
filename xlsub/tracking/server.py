"""Is the tracking server there? Asked before a stage imports torch and mlflow (seconds on a busy machine),
because MLflow's own client retries an unreachable server for minutes. No mlflow here."""

from __future__ import annotations

import os
import sys

from xlsub.errors import XlsubError

TIMEOUT_SECONDS = 5.0


def check(uri: str | None = None, timeout: float = TIMEOUT_SECONDS) -> None:
    """Refuse, within `timeout` seconds, an http(s) tracking URI (default: MLFLOW_TRACKING_URI) where no
    server answers. Any HTTP answer counts as reachable; file and database stores are not checked."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "") if uri is None else uri
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    try:
        requests.get(f"{uri.rstrip('/')}/health", timeout=timeout)
    except requests.RequestException as err:
        raise XlsubError(f"MLFLOW_TRACKING_URI: no tracking server answers at {uri} within {timeout:.0f} s ({type(err).__name__}); "
                         "start it, or set MLFLOW_TRACKING_URI to a running server or a local store (sqlite:///mlflow.db)") from None


def check_or_exit(stage: str) -> None:
    """`check()`, a refusal printed as the stage's one line, exit status 2."""
    try:
        check()
    except XlsubError as err:
        print(f"xlsub {stage}: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
