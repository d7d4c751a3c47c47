"""Training throughput of xlsub's masked-only LM head vs the stock `XLMRobertaForMaskedLM` forward,
the share of training wall time spent logging to MLflow, the cost of MLflow's system-metrics monitor, and
finetune's `compile` (each layer compiled by torch.compile) against eager steps on this CPU.

Same tiny model, same batches (32 x 64 tokens, 15% masked), same loss; forward,
backward and AdamW step. Target: masked-only at least 1.4x the stock tokens/s;
MLflow logging under 5% of wall time; the same training steps with the system-metrics
monitor running (as finetune, prune and encode run it) at most 1.05x the time without. The compiled steps are
timed after a warm-up that compiles them (its seconds printed); no target: `compile` is off by default.

    python benchmarks/finetune.py
"""

from __future__ import annotations

import copy
import os
import tempfile
import time
from pathlib import Path

import datasets
import mlflow
import torch
from transformers import XLMRobertaTokenizer

from xlsub.data.lm import masked_batches
from xlsub.models.loading import tiny_model
from xlsub.models.mlm import masked_lm_loss
from xlsub.models.training import TrainSettings, compiled_layers, train_masked_lm
from xlsub.tracking.runs import SYSTEM_METRICS_SECONDS, LossLogger

STEPS, BATCH, SEQ, VOCAB = 40, 32, 64, 8000


def make_tokenizer_and_batches():
    tokenizer = XLMRobertaTokenizer(vocab=[(f"<{t}>", 0.0) for t in ("s", "pad", "/s", "unk", "mask")] + [(f"p{i}", -1.0) for i in range(VOCAB - 5)])
    g = torch.Generator().manual_seed(0)
    chunks = [[0, *torch.randint(5, VOCAB, (SEQ - 2,), generator=g).tolist(), 2] for _ in range(STEPS * BATCH)]
    return tokenizer, chunks, masked_batches(chunks, tokenizer, BATCH, seed=1)


def train_steps(model, batches, loss_fn) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    start = time.perf_counter()
    for batch in batches:
        loss = loss_fn(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def masked_only(model, batch):
    loss, n = masked_lm_loss(model, batch)
    return loss / n


def stock(model, batch):
    return model(**batch).loss


def monitored_steps(model, batches, system_metrics: bool) -> tuple[float, int]:
    """`train_steps` of the masked-only path inside an MLflow run, with or without MLflow's system-metrics
    monitor; the seconds and how many CPU samples the monitor logged."""
    with mlflow.start_run(log_system_metrics=system_metrics) as run:
        seconds = train_steps(model, batches, masked_only)
    samples = len(mlflow.MlflowClient().get_metric_history(run.info.run_id, "system/cpu_utilization_percentage"))
    return seconds, samples


class TimedLossLogger(LossLogger):
    seconds = 0.0

    def on_log(self, *a, **k):
        start = time.perf_counter()
        super().on_log(*a, **k)
        TimedLossLogger.seconds += time.perf_counter() - start


def main():
    torch.manual_seed(0)
    tokenizer, chunks, batches = make_tokenizer_and_batches()
    base = tiny_model(tokenizer, SEQ)
    tokens = STEPS * BATCH * SEQ
    # warm-up both paths once, then alternate to share any machine noise
    train_steps(copy.deepcopy(base), batches[:3], masked_only)
    train_steps(copy.deepcopy(base), batches[:3], stock)
    times = {"masked-only": [], "stock": []}
    for _ in range(2):
        times["masked-only"].append(train_steps(copy.deepcopy(base), batches, masked_only))
        times["stock"].append(train_steps(copy.deepcopy(base), batches, stock))
    fast, slow = min(times["masked-only"]), min(times["stock"])
    print(f"tokens/s  masked-only LM head: {tokens / fast:9.0f}")
    print(f"tokens/s  stock forward:       {tokens / slow:9.0f}")
    print(f"speed-up: {slow / fast:.2f}x (target >= 1.4x)")
    compiled_speedup(base, batches)

    with tempfile.TemporaryDirectory() as tmp:
        mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
        train = datasets.Dataset.from_dict({"input_ids": chunks})
        settings = TrainSettings(epochs=1, batch_size=BATCH, lr=1e-3, weight_decay=0.01, seed=0, device="cpu", fp16=False, bf16=False,
                                 log_every=10, save_steps=250)
        with mlflow.start_run():
            start = time.perf_counter()
            train_masked_lm(copy.deepcopy(base), tokenizer, train, settings, Path(tmp) / "ckpt", [TimedLossLogger()])
            wall = time.perf_counter() - start
        print(f"Trainer run of {STEPS} steps, loss logged every 10: {wall:.1f} s, MLflow logging {TimedLossLogger.seconds:.3f} s "
              f"= {100 * TimedLossLogger.seconds / wall:.2f}% of wall time (target < 5%)")
        system_metrics_overhead(base, batches)


def compiled_speedup(base, batches, rounds: int = 2) -> float:
    """The masked-only steps with the layers compiled (`compiled_layers`, as finetune's `compile`) against eager ones,
    each model warmed up on 3 steps first (the compiled one compiles there), then timed alternately `rounds` times on
    the same batches; prints and returns the ratio of the fastest times (eager / compiled)."""
    models = {"eager": copy.deepcopy(base), "compiled": copy.deepcopy(base)}
    with compiled_layers(models["compiled"]):
        warm = {name: train_steps(model, batches[:3], masked_only) for name, model in models.items()}
        times = {name: [] for name in models}
        for _ in range(rounds):
            for name, model in models.items():
                times[name].append(train_steps(model, batches, masked_only))
    tokens = len(batches) * batches[0]["input_ids"].numel()
    eager, compiled = min(times["eager"]), min(times["compiled"])
    print(f"tokens/s  masked-only, layers compiled: {tokens / compiled:9.0f}, eager: {tokens / eager:9.0f}: {eager / compiled:.2f}x "
          f"(the compiled model's first 3 steps, compiling: {warm['compiled']:.1f} s; eager's {warm['eager']:.1f} s)")
    return eager / compiled


def system_metrics_overhead(base, batches, rounds: int = 3) -> float:
    """The same training steps with MLflow's system-metrics monitor running and without, alternated `rounds`
    times to share any machine noise, into the active tracking store; prints and returns the ratio of the
    fastest times."""
    # the stages' sampling interval, unless the caller set one
    os.environ.setdefault("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", str(SYSTEM_METRICS_SECONDS))
    interval = os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"]
    monitored = {True: [], False: []}
    for _ in range(rounds):
        for on in (True, False):
            monitored[on].append(monitored_steps(copy.deepcopy(base), batches, on))
    on, off = min(t for t, _ in monitored[True]), min(t for t, _ in monitored[False])
    samples = sum(n for _, n in monitored[True])
    print(f"{len(batches)} steps with the system-metrics monitor (every {interval} s, {samples} samples logged in {rounds} runs): "
          f"{on:.2f} s, without: {off:.2f} s; ratio {on / off:.3f}x (target <= 1.05x)")
    return on / off


if __name__ == "__main__":
    main()
