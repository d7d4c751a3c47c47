"""main: the whole study, finetune -> prune -> encode -> analyze, as child runs of one `main` run.

    mlflow run . --env-manager local                                  # the offline demo, end to end
    mlflow run . --env-manager local -P languages=en,de,zh -P threshold=1.2

A stage whose FINISHED run exists with the same parameter values, the same input run IDs and the same
code version (of that stage: `xlsub.tracking.code_version`) is reused instead of recomputed (`force=true`
recomputes everything); the main run records what it reused.

main's parameters are the stages' own fields, composed from their dataclasses: each stage field is the
main parameter of the same name, except those in the mapping below.
"""

from __future__ import annotations

import logging
import os
from dataclasses import field, fields, make_dataclass, replace
from pathlib import Path
from typing import get_type_hints

import mlflow
from mlflow.exceptions import ExecutionException
from mlflow.tracking import MlflowClient

from entry_points._common import StageArgs, parse_args, parse_languages, precision_help, split_items, stage_args_class
from xlsub import artifacts, stages
from xlsub.errors import XlsubError
from xlsub.tracking import interrupts, lineage, twins
from xlsub.tracking import runs as tracking

log = logging.getLogger("xlsub.main")
ROOT = Path(__file__).resolve().parents[1]
STAGE_ARGS: dict[str, type[StageArgs]] = {stage.name: stage_args_class(stage.name) for stage in stages.pipeline()}

# -- the one mapping from main's parameters to the stages' fields -----------------------------------------
# Input runs (the registry's): set by main from the runs of earlier stages, never parameters of main.
INPUTS = {stage.name: dict(stage.inputs) for stage in stages.pipeline()}
# Fixed: later stages cover every language the finetune run trained.
FIXED = {("prune", "languages"): "all", ("neurons", "languages"): "all", ("encode", "languages"): "all"}
# Renamed: a name two stages use with different meanings. finetune's `corpus` is the MLM corpus, encode's
# the parallel corpus; finetune and prune share `batch_size` (training and importance batches), encode's
# is a forward-pass size with its own default.
# The neurons stage's pruning-loop settings and text seeds are its own (prune's heads have theirs).
RENAMED = {("encode", "corpus"): "parallel_corpus", ("encode", "batch_size"): "encode_batch_size",
           ("neurons", "threshold"): "neuron_threshold", ("neurons", "amount"): "neuron_amount",
           ("neurons", "target_sparsity"): "neuron_target_sparsity", ("neurons", "seeds"): "neuron_seeds",
           ("neurons", "examples"): "neuron_examples", ("neurons", "method"): "neuron_method"}
# Units of subnetwork main finds: attention heads (prune, always) and feed-forward neurons (the neurons stage).
UNITS = ("heads", "neurons")
# Defaults that differ from the stage's: the whole study encodes the random-init control.
MAIN_DEFAULTS = {"use_random": True}
# main's help where the stages sharing a parameter each describe their own part of it
MAIN_HELP = {"precision": precision_help("the model passes outside training (importance passes, activation statistics, perplexities, encodings)")}


def main_name(stage: str, name: str) -> str | None:
    """main's parameter for a stage field, or None where main sets it itself."""
    if name in INPUTS.get(stage, {}) or (stage, name) in FIXED:
        return None
    return RENAMED.get((stage, name), name)


def _main_fields() -> list[tuple]:
    """(name, type, field) for every main parameter, in stage order; one parameter per shared name."""
    found: dict[str, tuple] = {}
    stages_of: dict[str, list[str]] = {}
    for stage, cls in STAGE_ARGS.items():
        hints = get_type_hints(cls)
        for f in fields(cls):
            name = main_name(stage, f.name)
            if name is None:
                continue
            stages_of.setdefault(name, []).append(stage)
            if name not in found:
                default = MAIN_DEFAULTS.get(name, f.default)
                found[name] = (name, hints[f.name], dict(f.metadata), default)
    result = []
    for name, (name, type_, metadata, default) in found.items():
        metadata["help"] = f"{', '.join(stages_of[name])}: {MAIN_HELP.get(name, metadata.get('help', ''))}"
        result.append((name, type_, field(default=default, metadata=metadata)))
    result.append(("units", str, field(default="heads,neurons", metadata={
        "help": "units of subnetwork: heads (attention heads: prune, encode, analyze) and neurons (feed-forward neurons: the neurons stage, "
                "analysed beside the heads); comma-separated, heads always included", "items": UNITS})))
    result.append(("encode_neurons", bool, field(default=False, metadata={
        "help": "also encode each language's neuron subnetwork (needs neurons in units), so analyze compares its representations too"})))
    result.append(("force", bool, field(default=False, metadata={"help": "recompute every stage even where a finished run could be reused"})))
    return result


def _check_stage(self) -> None:
    """Refuse bad input before any stage spends minutes: every stage's checks (main's own fields passed
    the same metadata checks under their main names), and the reference."""
    for stage in STAGE_ARGS:
        self.stage_args(stage).validate()
    if "heads" not in split_items("units", self.units, UNITS):
        raise XlsubError(f"units: '{self.units}' leaves out heads, which encode and analyze compare every unit with; pass heads or heads,neurons")
    if self.encode_neurons and "neurons" not in split_items("units", self.units, UNITS):
        raise XlsubError("encode_neurons: there are no neuron subnetworks to encode without the neurons unit; pass units=heads,neurons or encode_neurons=false")
    languages = parse_languages(self.languages)
    if "neurons" in split_items("units", self.units, UNITS) and self.neuron_method == "lape" and languages is not None and len(languages) < 2:
        raise XlsubError("languages: lape neurons compare languages; give two or more, or pass units=heads (or neuron_method=importance)")
    if languages is not None and self.reference not in languages:
        raise XlsubError(f"reference: '{self.reference}' is not among languages {','.join(languages)}; add it or pass -P reference=<one of them>")


def _stage_args(self, stage: str) -> StageArgs:
    """The stage's arguments from main's: mapped parameters, fixed values, input runs left at 'latest'."""
    cls = STAGE_ARGS[stage]
    values = {f.name: FIXED[(stage, f.name)] if (stage, f.name) in FIXED else getattr(self, main_name(stage, f.name))
              for f in fields(cls) if f.name not in INPUTS.get(stage, {})}
    return cls(**values)


def _stage_inputs(self, stage: str, ids: dict[str, str]) -> dict[str, str]:
    """The stage's run-ID parameters from the runs of earlier stages (`ids`: stage -> run ID). An optional input
    main did not run (the neurons run without `units=...,neurons`) is `none`, and so is encode's neurons run
    unless `encode_neurons`."""
    inputs = {name: ids.get(source, "none") for name, source in INPUTS.get(stage, {}).items()}
    if stage == "encode" and not self.encode_neurons:
        inputs["neurons_run_id"] = "none"
    return inputs


MainArgs = make_dataclass("MainArgs", _main_fields(), bases=(StageArgs,),
                          namespace={"check_stage": _check_stage, "stage_args": _stage_args, "stage_inputs": _stage_inputs,
                                     "__module__": __name__})


def run_stage(stage: str, args: StageArgs, force: bool, reused: list[str]) -> str:
    """Reuse a finished run of `stage` with these parameters and this code, or run the entry point as a child run."""
    experiment_id = mlflow.active_run().info.experiment_id
    found = None if force else tracking.find_reusable(experiment_id, stage, args.reuse_params())
    if found is None and not force:  # a twin computing it now (another pipeline): wait for it rather than compute it twice
        found = twins.wait_for_twin(experiment_id, stage, args.reuse_params(), mlflow.active_run().info.run_id)
    if found is not None:
        log.info("%s: reusing finished run %s", stage, found.info.run_id)
        reused.append(stage)
        mlflow.set_tag(artifacts.reused_stage_tag(stage), found.info.run_id)
        return found.info.run_id
    submitted = None
    # asynchronous: mlflow starts `mlflow run --experiment-id` in a process group of its own, whose handle
    # lets a signal to main stop the stage first; that command refuses an experiment name beside the ID
    name = os.environ.pop("MLFLOW_EXPERIMENT_NAME", None)
    try:
        submitted = mlflow.projects.run(str(ROOT), entry_point=stage, parameters=args.params(), env_manager="local",
                                        experiment_id=experiment_id, run_name=stage, synchronous=False)
        with interrupts.forwarding(submitted.command_proc):
            finished = submitted.wait()
    except ExecutionException:
        finished = False
    finally:
        if name is not None:
            os.environ["MLFLOW_EXPERIMENT_NAME"] = name
    if not finished:
        if submitted and MlflowClient().get_run(submitted.run_id).info.status == "RUNNING":  # it died without ending its run
            MlflowClient().set_terminated(submitted.run_id, "FAILED")
        raise XlsubError(f"{stage}: the stage failed (its message is above); fix that input and rerun")
    return submitted.run_id


def main(argv: list[str] | None = None) -> None:
    args = parse_args(MainArgs, argv)
    with tracking.stage_run("main", args):
        reused: list[str] = []
        ids: dict[str, str] = {}
        units = split_items("units", args.units, UNITS)
        for stage in STAGE_ARGS:
            if stage == "neurons" and "neurons" not in units:
                continue
            ids[stage] = run_stage(stage, replace(args.stage_args(stage), **args.stage_inputs(stage, ids)), args.force, reused)
            if stage == "prune" and stage in reused and args.register:  # register is not compared for reuse
                tracking.register_subnetworks(ids[stage])
        mlflow.set_tags({artifacts.input_tag(stage): run_id for stage, run_id in ids.items()})
        mlflow.set_tag(artifacts.REUSED_TAG, ",".join(reused) or "none")
        show_pipeline(ids, reused)
        log.info("stage runs: %s; reused: %s", ids, reused or "none")


def show_pipeline(ids: dict[str, str], reused: list[str]) -> None:
    """What the main run's page shows even when every stage was reused (a reused run is no child of this
    one): a description (the run note) linking each stage run by ID, and the analyze run's verdict metrics."""
    client = MlflowClient()
    runs = {stage: client.get_run(run_id) for stage, run_id in ids.items()}
    lines = ["The pipeline's stage runs (reused: computed by an earlier main run with the same parameters and code):", ""]
    lines += [f"- {stage}: [{run.info.run_id}]({lineage.run_link(run)}){' (reused)' if stage in reused else ''}" for stage, run in runs.items()]
    mlflow.set_tag(artifacts.NOTE_TAG, "\n".join(lines))
    if "analyze" in runs:
        mlflow.log_metrics({k: v for k, v in runs["analyze"].data.metrics.items() if k.startswith(artifacts.VERDICT_METRIC_PREFIX)})


if __name__ == "__main__":
    main()
