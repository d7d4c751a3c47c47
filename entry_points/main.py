"""main: the whole study, finetune -> prune -> encode -> analyze, as child runs of one `main` run.

    mlflow run . --env-manager local                                  # the offline demo, end to end
    mlflow run . --env-manager local -P languages=en,de,zh -P threshold=1.2

A stage whose FINISHED run exists with the same parameter values, the same
input run IDs and the same code version is reused instead of recomputed
(`force=true` recomputes everything); the main run records what it reused.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import mlflow
from mlflow.exceptions import ExecutionException

from entry_points import analyze, encode, finetune, prune
from entry_points._common import parse_args
from xlsub import tracking
from xlsub.errors import XlsubError

log = logging.getLogger("xlsub.main")
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class MainArgs:
    model: str = field(default="tiny", metadata={"help": "finetune: 'tiny', a hub id or a model folder"})
    corpus: str = field(default="embedded", metadata={"help": "finetune: MLM corpus"})
    languages: str = field(default="all", metadata={"help": "languages of the whole study (comma-separated ISO codes or 'all')"})
    seed: int = field(default=0, metadata={"help": "finetune seed"})
    epochs: float = field(default=4.0, metadata={"help": "finetune epochs"})
    batch_size: int = field(default=32, metadata={"help": "finetune and prune batch size"})
    lr: float = field(default=1e-3, metadata={"help": "finetune learning rate"})
    max_seq_len: int = field(default=64, metadata={"help": "finetune tokens per example"})
    examples_per_lang: int = field(default=2000, metadata={"help": "finetune training chunks per language"})
    test_examples_per_lang: int = field(default=100, metadata={"help": "finetune test chunks per language"})
    threshold: float = field(default=1.1, metadata={"help": "prune stop rule"})
    amount: float = field(default=0.1, metadata={"help": "prune: fraction of heads per step"})
    target_sparsity: str = field(default="none", metadata={"help": "prune: fixed fraction of heads to remove, or none"})
    eval_examples: int = field(default=64, metadata={"help": "prune: chunks per language for importance"})
    seeds: str = field(default="0", metadata={"help": "prune seeds, comma-separated"})
    parallel_corpus: str = field(default="embedded", metadata={"help": "encode: parallel corpus"})
    max_sentences: int = field(default=2000, metadata={"help": "encode: parallel items at most"})
    dtype: str = field(default="float32", metadata={"help": "encode: stored precision"})
    use_base: bool = field(default=False, metadata={"help": "encode the model before finetuning too"})
    use_random: bool = field(default=True, metadata={"help": "encode a random-initialised model too (a CKA control)"})
    cka: str = field(default="linear", metadata={"help": "analyze: linear, debiased or rbf"})
    cka_precision: str = field(default="float64", metadata={"help": "analyze: float64, or float32 products accumulated in float64"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:N or mps"})
    force: bool = field(default=False, metadata={"help": "recompute every stage even where a finished run could be reused"})


def stage_params(cls, **values) -> dict[str, str]:
    """Every parameter of a stage, its defaults overridden by `values`, spelled as `mlflow run -P` takes them."""
    params = {f.name: getattr(cls(), f.name) for f in fields(cls)}
    params.update({k: v for k, v in values.items() if k in params})
    return {k: (str(v).lower() if isinstance(v, bool) else str(v)) for k, v in params.items()}


def run_stage(stage: str, params: dict[str, str], force: bool, reused: list[str]) -> str:
    """Reuse a finished run of `stage` with these parameters and this code, or run the entry point as a child run."""
    experiment_id = mlflow.active_run().info.experiment_id
    found = None if force else tracking.find_reusable(experiment_id, stage, params)
    if found is not None:
        log.info("%s: reusing finished run %s", stage, found.info.run_id)
        reused.append(stage)
        mlflow.set_tag(f"xlsub.reused.{stage}", found.info.run_id)
        return found.info.run_id
    try:
        submitted = mlflow.projects.run(str(ROOT), entry_point=stage, parameters=params, env_manager="local",
                                        experiment_id=experiment_id, run_name=stage, synchronous=True)
    except ExecutionException:
        raise XlsubError(f"{stage}: the stage failed (its message is above); fix that input and rerun") from None
    return submitted.run_id


def main(argv: list[str] | None = None) -> None:
    args = parse_args(MainArgs, argv)
    with tracking.stage_run("main", asdict(args)):
        a = asdict(args)
        plans = {
            "finetune": stage_params(finetune.FinetuneArgs, **a),
            "prune": stage_params(prune.PruneArgs, **{**a, "languages": "all"}),
            "encode": stage_params(encode.EncodeArgs, **{**a, "corpus": args.parallel_corpus, "languages": "all", "batch_size": 64}),
            "analyze": stage_params(analyze.AnalyzeArgs, **a),
        }
        # refuse bad input before any stage spends minutes
        finetune.validate(finetune.FinetuneArgs(**{k: getattr(args, k) for k in plans["finetune"] if hasattr(args, k)}))
        prune.validate(prune.PruneArgs(**{k: getattr(args, k) for k in plans["prune"] if hasattr(args, k) and k != "languages"}))
        encode.validate(encode.EncodeArgs(max_sentences=args.max_sentences, dtype=args.dtype))
        analyze.validate(analyze.AnalyzeArgs(cka=args.cka, cka_precision=args.cka_precision))
        reused: list[str] = []
        ids = {"finetune": run_stage("finetune", plans["finetune"], args.force, reused)}
        ids["prune"] = run_stage("prune", {**plans["prune"], "finetune_run_id": ids["finetune"]}, args.force, reused)
        ids["encode"] = run_stage("encode", {**plans["encode"], "finetune_run_id": ids["finetune"], "prune_run_id": ids["prune"]}, args.force, reused)
        ids["analyze"] = run_stage("analyze", {**plans["analyze"], "encode_run_id": ids["encode"], "prune_run_id": ids["prune"]}, args.force, reused)
        mlflow.set_tags({tracking.input_tag(stage): run_id for stage, run_id in ids.items()})
        mlflow.set_tag("xlsub.reused", ",".join(reused) or "none")
        log.info("stage runs: %s; reused: %s", ids, reused or "none")


if __name__ == "__main__":
    main()
