"""Identical stages in flight are computed once: a stage about to run waits for a twin computing it.

A twin is a live run (`runs.dead_because` is None) computing the same stage with the same parameter values
and code version: a RUNNING run of that stage (`runs.find_alive`), or a RUNNING main run that has claimed
the stage (tags `xlsub.claim` = `<stage>:<digest of code version and parameters>`, `xlsub.claim_time`)
but whose stage run has not started yet. Before a main runs a stage it claims it, then waits for every twin
ahead of it: a stage run already running, or a claim made earlier (same time: the smaller run ID first), so
that of two pipelines started together exactly one computes and the other, which sees the first's claim,
waits; neither waits for the other. The waiting one reuses the twin's run once it FINISHES, and computes the
stage itself when the twin dies or after `TWIN_WAIT_SECONDS`.

A claim lasts while it means something: a main that reuses the stage drops it at once (`release`), one that
computes it keeps it until it claims its next stage or its run ends (`runs.stage_run` drops it then), so a
main run's page never shows a stale claim.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping

from mlflow.entities import Run, RunTag
from mlflow.tracking import MlflowClient

from xlsub.artifacts import CLAIM_TAG, CLAIM_TIME_TAG
from xlsub.tracking import liveness
from xlsub.tracking import runs as tracking
from xlsub.tracking.code_version import code_version

log = logging.getLogger(__name__)
# a finetune of XLM-R base takes hours; past this a waiting pipeline computes the stage itself
TWIN_WAIT_SECONDS = float(os.environ.get("XLSUB_TWIN_WAIT_SECONDS", "21600"))
TWIN_POLL_SECONDS = float(os.environ.get("XLSUB_TWIN_POLL_SECONDS", "5"))
# A claim is stamped before it reaches the server: after claiming, wait this long (far longer than a tag
# takes to arrive) before looking for earlier claims, so that one stamped earlier is seen, not missed
CLAIM_SETTLE_SECONDS = 1.0


def claim_key(stage: str, params: Mapping[str, object]) -> str:
    """`<stage>:<digest>` of the stage's code version and parameter values, compared by value (`runs.param_value`:
    1 and 1.0 are one key)."""
    payload = json.dumps([code_version(stage), sorted((k, tracking.param_value(v)) for k, v in params.items())], default=str)
    return f"{stage}:{hashlib.sha256(payload.encode()).hexdigest()[:16]}"


def claim(run_id: str, stage: str, params: Mapping[str, object], at: float | None = None) -> None:
    """Record on run `run_id` (a main run) that it is about to compute `stage` with `params`, at time `at`."""
    at = time.time() if at is None else at
    # one request: a claim seen without its time would be ordered by its run's start instead
    MlflowClient().log_batch(run_id, tags=[RunTag(CLAIM_TAG, claim_key(stage, params)), RunTag(CLAIM_TIME_TAG, f"{at:.6f}")])


def release(run_id: str) -> None:
    """Drop the claim of run `run_id`: it reuses the stage, or has ended."""
    tracking.drop_tags(run_id, (CLAIM_TAG, CLAIM_TIME_TAG))


def _order(run: Run) -> tuple[float, str]:
    try:
        at = float(run.data.tags[CLAIM_TIME_TAG])
    except (KeyError, ValueError):
        at = run.info.start_time / 1000
    return at, run.info.run_id


def ahead(experiment_id: str, stage: str, params: Mapping[str, object], run_id: str, now: float | None = None) -> list[Run]:
    """The live twins run `run_id` waits for before computing `stage`: running stage runs with these
    parameters and code first, then main runs that claimed the same before it (by claim time, then run ID)."""
    client = MlflowClient()
    mine = _order(client.get_run(run_id))
    running = tracking.find_alive(experiment_id, stage, params, exclude=[run_id], now=now)
    claimants = client.search_runs([experiment_id], f"tags.`{CLAIM_TAG}` = '{claim_key(stage, params)}' and attributes.status = 'RUNNING'")
    earlier = sorted((r for r in claimants if r.info.run_id != run_id and _order(r) < mine and tracking.dead_because(r, now) is None), key=_order)
    return running + earlier


def wait_for_twin(experiment_id: str, stage: str, params: Mapping[str, object], run_id: str, timeout: float = TWIN_WAIT_SECONDS,
                  poll: float = TWIN_POLL_SECONDS) -> Run | None:
    """Claim `stage` for run `run_id`, then wait while a twin ahead of it (`ahead`) computes it. Returns the
    FINISHED run to reuse (`runs.find_reusable`; the claim dropped), or None when this run computes the stage
    itself (the claim kept): no twin ahead, the twin died without finishing, or `timeout` seconds passed.
    Each outcome is one log line."""
    claim(run_id, stage, params)
    time.sleep(min(CLAIM_SETTLE_SECONDS, timeout))
    deadline = time.monotonic() + timeout
    waiting_for = None
    while True:
        # twins first, then finished runs: a twin that finishes between the two looks is found finished, not
        # taken for one that ended without finishing (which would compute the stage a second time)
        twins = ahead(experiment_id, stage, params, run_id)
        done = tracking.find_reusable(experiment_id, stage, params)
        if done is not None:
            if waiting_for is not None:
                log.info("%s: twin run %s finished it; reusing run %s", stage, waiting_for.info.run_id, done.info.run_id)
            release(run_id)
            return done
        if not twins:
            if waiting_for is not None:
                log.warning("%s: twin run %s ended without finishing it; computing it here", stage, waiting_for.info.run_id)
            return None
        if waiting_for is None or waiting_for.info.run_id not in {t.info.run_id for t in twins}:
            waiting_for = twins[0]
            log.info("%s: run %s (%s) is computing the same stage with the same parameters and code; waiting for it (at most %.0f s)",
                     stage, waiting_for.info.run_id, liveness.where(waiting_for.data.tags), timeout)
        if time.monotonic() >= deadline:
            log.warning("%s: run %s has not finished after %.0f s; computing it here", stage, waiting_for.info.run_id, timeout)
            return None
        time.sleep(poll)
