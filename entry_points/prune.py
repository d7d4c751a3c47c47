"""prune: a subnetwork of attention heads per language, evaluated on every language.

    mlflow run . -e prune --env-manager local
    mlflow run . -e prune --env-manager local -P languages=en,de -P seeds=0,1,2 -P target_sparsity=0.5
    torchrun --nproc_per_node 8 -m entry_points.prune --finetune_run_id <id>   # one GPU per process
    torchrun --nproc_per_node 2 -m entry_points.prune --device cpu

One parent run; one nested child run per language and seed (`prune/de-s0`, `prune/de-s1`), each with
its head mask, importance, per-step curve, its row of the cross-language perplexity matrix, a
random-mask control and the subnetwork model (physically pruned where the model family allows,
else in stock form with the pruned heads' output weights zeroed: `xlsub.models.pruning.subnetwork_model`).

Under torchrun the subnetworks are dealt round-robin to the processes (`xlsub.tracking.fanout`), one device
each; each logs the child runs it computes, and rank 0 owns the parent: it shares the parent's ID,
gathers the others' evaluations and writes the matrices as one process would. A failing rank marks its
child and the parent FAILED; the others stop at their next subnetwork.
"""

from __future__ import annotations

import logging
import random
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from entry_points._common import (
    COUNT,
    LANGUAGE,
    REPLICATES,
    SEED,
    StageArgs,
    device_field,
    parse_args,
    parse_languages,
    precision_field,
    run_id_field,
    split_items,
)
from xlsub import artifacts
from xlsub.artifacts import SubnetworkId
from xlsub.data import lm as data
from xlsub.devices import autocast, resolve_device
from xlsub.errors import Range, XlsubError
from xlsub.models.families import adapter_for
from xlsub.models.mlm import lm_batches
from xlsub.models.pruning import (
    AMOUNT,
    CONTINUE_TO,
    TARGET_SPARSITY,
    THRESHOLD,
    SubnetworkEvaluation,
    evaluate_subnetwork,
    iterative_pruning,
    masked_chunk_losses,
    prune_run_tables,
    split_half_importance,
    subnetwork_model,
    zero_pruned_heads,
)
from xlsub.models.training import load_finetuned
from xlsub.report.figures import save_figure
from xlsub.report.figures import stages as figures
from xlsub.stats.inference import percentile_interval
from xlsub.stats.intervals import language_resamples, random_control_replicates
from xlsub.stats.overlap import params_kept_frac, spearman_brown
from xlsub.tracking import lineage
from xlsub.tracking import runs as tracking
from xlsub.tracking.fanout import FanOut

log = logging.getLogger("xlsub.prune")


@dataclass
class PruneArgs(StageArgs):
    finetune_run_id: str = run_id_field("finetune run ID, or 'latest' finished one in the experiment")
    languages: str = field(default="all", metadata={"help": "languages to find subnetworks for (comma-separated ISO codes, each once); 'all' = the finetune run's",
                                                   "items": LANGUAGE, "keywords": ("all",)})
    threshold: float = field(default=1.1, metadata={"help": "keep the last mask whose perplexity is at most threshold x unpruned", "range": THRESHOLD})
    amount: float = field(default=0.1, metadata={"help": "fraction of all heads switched off per step", "range": AMOUNT})
    target_sparsity: str = field(default="none", metadata={"help": "prune exactly this fraction of heads, ignoring threshold; 'none' to use threshold",
                                                          "number": TARGET_SPARSITY, "keywords": ("none",)})
    eval_examples: int = field(default=64, metadata={"help": "training chunks per language for importance and the stop rule (its two halves measure reliability)",
                                                     "range": Range(2)})
    batch_size: int = field(default=32, metadata={"help": "sequences per importance/evaluation batch", "range": COUNT})
    seeds: str = field(default="0", metadata={"help": "comma-separated seeds, each once; each draws its own pruning data, masks and random control",
                                              "items": SEED})
    random_draws: int = field(default=2, metadata={"help": "random masks with the subnetwork's heads per layer, each evaluated on every language (the control)", "range": COUNT})
    bootstrap: int = field(default=1000, metadata={"help": "bootstrap replicates over test chunks (and random draws) for the intervals", "range": REPLICATES})
    continue_to: float = field(default=0.9, metadata={"help": "go on pruning (importance only) until this fraction of heads is off, for equal-size overlaps; the stop rule still picks the subnetwork",
                                                      "range": CONTINUE_TO})
    log_stock_models: bool = field(default=True, metadata={"help": "also log each subnetwork as a stock MLflow model (full size, pruned heads' output weights zeroed, "
                                                                    "loads without xlsub); false skips it for large models"})
    register: bool = field(default=False, metadata={"help": "also register each stock model as a version of the registered model "
                                                            "<experiment>-<language> (needs log_stock_models=true)"})
    precision: str = precision_field("the importance passes and perplexities")
    device: str = device_field()

    # registering changes no result: main reuses a finished prune run and registers its models (`xlsub.tracking.runs.register_subnetworks`)
    NOT_FOR_REUSE = ("register",)

    def check_stage(self) -> None:
        autocast(resolve_device(self.device), self.precision)  # refuses a precision the device would emulate
        if self.register and not self.log_stock_models:
            raise XlsubError("register: registers the stock models that log_stock_models=false skips; "
                             "pass log_stock_models=true, or register=false")

    @property
    def sparsity(self) -> float | None:
        """`target_sparsity` as a number, or None for the threshold rule."""
        return None if self.target_sparsity in ("", "none") else float(self.target_sparsity)

    @property
    def seed_list(self) -> list[int]:
        return split_items("seeds", self.seeds, SEED)

    def subnetwork_ids(self, trained: list[str]) -> list[SubnetworkId]:
        """The subnetworks a prune run with these arguments makes, given the languages its finetune run trained."""
        return [SubnetworkId(lang, seed) for lang in (parse_languages(self.languages) or trained) for seed in self.seed_list]


def prune_language(model, tokenizer, sid: SubnetworkId, args: PruneArgs, train_chunks, test_batches, full) -> SubnetworkEvaluation:
    """Find, evaluate, log and save one subnetwork in the active (child) run."""
    chunks = random.Random(sid.seed).sample(train_chunks, min(args.eval_examples, len(train_chunks)))
    batches = lm_batches(model, chunks, tokenizer, args.batch_size, seed=data.EVAL_MASK_SEED + sid.seed)
    halves = [lm_batches(model, part, tokenizer, args.batch_size, seed=data.EVAL_MASK_SEED + sid.seed)
              for part in (chunks[: len(chunks) // 2], chunks[len(chunks) // 2 : 2 * (len(chunks) // 2)])]
    result = iterative_pruning(model, batches, threshold=args.threshold, amount=args.amount, target_sparsity=args.sparsity,
                               continue_to=args.continue_to, progress_desc=f"prune {sid}")
    for step in result.steps:
        mlflow.log_metrics({artifacts.PATH_PPL: step.ppl, artifacts.PATH_FRAC_PRUNED: step.frac_pruned}, step=step.step)
    chosen = result.steps[result.kept]  # the subnetwork, under the names a user reads first
    mlflow.log_metrics({artifacts.SUBNETWORK_PPL: chosen.ppl, artifacts.SUBNETWORK_FRAC_PRUNED: chosen.frac_pruned})
    mask = result.mask
    evaluation = evaluate_subnetwork(model, mask, sid, test_batches, args.random_draws)
    for lang, counts in language_resamples(full, args.bootstrap, seed=sid.seed).items():
        lo, hi = percentile_interval(random_control_replicates([d[lang] for d in evaluation.random_losses], counts, sid.seed))
        mlflow.log_metrics({f"ppl_random_lo.{lang}": lo, f"ppl_random_hi.{lang}": hi})
    mlflow.log_metrics({f"ppl.{l}": v for l, v in evaluation.perplexity.items()}
                       | {f"ppl_random.{l}": v for l, v in evaluation.random_perplexity.items()})
    mlflow.log_metrics({"heads_kept": int(mask.sum()), "heads_kept_frac": float(mask.mean()),
                        "params_kept_frac": params_kept_frac(mask, adapter_for(model).attention_params(model.config)),
                        "ppl_prune_data": result.ppl, "ppl_prune_data_unpruned": result.base_ppl, "steps": result.kept,
                        "importance_split_half_r": (r := split_half_importance(model, *halves)),
                        artifacts.IMPORTANCE_RELIABILITY: spearman_brown(r)})
    with tempfile.TemporaryDirectory() as tmp:
        artifacts.write_head_mask(Path(tmp), mask)
        artifacts.write_importance(Path(tmp), result.importance)
        artifacts.write_random_masks(Path(tmp), evaluation.random_masks)
        artifacts.write_model(Path(tmp), subnetwork_model(model, mask), tokenizer, artifacts.SUBNETWORK_DIR)
        mlflow.log_artifacts(tmp)
    mlflow.log_figure(figures.head_mask_heatmap(mask, result.importance, f"{sid} subnetwork"), artifacts.HEAD_MASK_FIGURE)
    tracking.log_table(artifacts.steps_table(result.steps, result.kept), artifacts.STEPS)
    if args.log_stock_models:
        log_stock_model(model, tokenizer, mask, sid, result.kept, args)
    return evaluation


def log_stock_model(model, tokenizer, mask, sid: SubnetworkId, kept: int, args: PruneArgs) -> None:
    """The subnetwork in stock form (the full architecture, the pruned heads' output-projection columns
    zeroed) as the active child run's MLflow model `subnetwork-<id>`, with the child's metrics and tags:
    it loads without xlsub. Tagged with its prune run, main run (if any), threshold and target_sparsity, so
    that models of different prune runs can be told apart, and `xlsub.run_status` (the prune run's status,
    set when it ends). Logged at the chosen pruning step: the path's metrics linked to it are the subnetwork's."""
    child = mlflow.get_run(mlflow.active_run().info.run_id)
    finetune_id = child.data.tags[artifacts.input_tag("finetune")]
    source = tracking.logged_model_id(finetune_id, artifacts.FINETUNED_MODEL)
    tags = {artifacts.LANGUAGE_TAG: sid.language, artifacts.SEED_TAG: str(sid.seed), artifacts.SUBNETWORK_TAG: str(sid),
            artifacts.MASK_DIGEST_TAG: artifacts.mask_digest(mask), artifacts.input_tag("finetune"): finetune_id,
            artifacts.input_tag("prune"): child.data.tags[artifacts.PARENT_TAG],
            artifacts.REGISTERED_THRESHOLD_TAG: str(args.threshold), artifacts.REGISTERED_TARGET_SPARSITY_TAG: args.target_sparsity}
    if source is not None:
        tags[artifacts.SOURCE_MODEL_TAG] = source
    if main_id := tracking.main_run_id(child):
        tags[artifacts.input_tag("main")] = main_id
    per_step = (artifacts.PATH_PPL, artifacts.PATH_FRAC_PRUNED)
    tracking.log_lm(zero_pruned_heads(model, mask), tokenizer, sid.model_name, tags=tags, step=kept,
                           link=[k for k in child.data.metrics if k not in per_step] if kept else ())


def main(argv: list[str] | None = None) -> None:
    args = parse_args(PruneArgs, argv)
    with FanOut.from_env() as fan, tracking.stage_run("prune", args, log_to_mlflow=fan.is_zero, system_metrics=True) as run:
        device = fan.device(resolve_device(args.device))
        precision = autocast(device, args.precision)  # checked with the parameters (`check_stage`)
        parent, (finetune, finetune_made) = fan.share(lambda: (run.info, finetune_input(args)))
        if fan.is_zero and fan.world > 1:
            mlflow.log_param("world_size", fan.world)
        with failing(parent, fan), precision:
            trained = finetune_made["languages"]
            folder = tracking.download(finetune.info.run_id, artifacts.MODEL_DIR, param="finetune_run_id")
            model, tokenizer, lm, _ = load_finetuned(folder, finetune_made["lm_data"], trained, device)
            test_batches = {l: lm_batches(model, lm.test[l], tokenizer, args.batch_size) for l in trained}
            full = masked_chunk_losses(model, None, test_batches)
            if fan.is_zero:
                mlflow.log_metrics({f"ppl_full.{l}": c.perplexity for l, c in full.items()})
            sids = args.subnetwork_ids(trained)
            made, failure = {}, None
            for sid in fan.mine(sids):
                if fan.world > 1 and MlflowClient().get_run(parent.run_id).info.status == "FAILED":
                    break  # another rank failed: the parent cannot finish, stop here
                try:
                    made[sid] = prune_child(parent, finetune.info.run_id, sid, args, model, tokenizer, lm.train_chunks[sid.language],
                                            test_batches, full)
                except Exception as err:  # its child run is FAILED; the parent at once (the others stop), and on rank 0 after the gather
                    failure = err
                    if fan.world > 1:
                        tracking.mark_failed(parent.run_id, parent.experiment_id)
                    break
            gathered = fan.gather((made, failure and (str(sid), isinstance(failure, XlsubError), str(failure))))
            if failure is not None:
                raise failure
        if fan.is_zero:
            log_matrices(collect(gathered, sids), full, trained)
            with tempfile.TemporaryDirectory() as tmp:
                artifacts.write_manifest(Path(tmp), "prune", languages=parse_languages(args.languages) or trained,
                                         subnetworks=[str(sid) for sid in sids])
                mlflow.log_artifacts(tmp)
            if args.register:
                tracking.register_subnetworks(parent.run_id)


def finetune_input(args: PruneArgs):
    """Rank 0: the finetune run the prune run reads (tagged on the parent) and its manifest, refused if it
    did not train a language asked for."""
    runs = lineage.resolve_inputs("prune", args.params())
    lineage.tag_inputs(runs)
    finetune = runs["finetune"]
    made = lineage.manifest(finetune, "finetune_run_id")
    trained = made["languages"]
    for lang in parse_languages(args.languages) or trained:
        if lang not in trained:
            raise XlsubError(f"languages: finetune run {finetune.info.run_id} did not train '{lang}'; choose from {','.join(trained)}")
    return finetune, made


def prune_child(parent, finetune_id: str, sid: SubnetworkId, args: PruneArgs, model, tokenizer, train_chunks, test_batches, full
                ) -> tuple[SubnetworkEvaluation, float]:
    """One subnetwork in its child run of the parent (`parent`: its RunInfo), opened by the rank that computes
    it; its evaluation and the split-half reliability of its importance, for the parent."""
    tags = {artifacts.STAGE_TAG: "prune", artifacts.CHILD_TAG: "true", artifacts.LANGUAGE_TAG: sid.language, artifacts.SEED_TAG: str(sid.seed),
            artifacts.SUBNETWORK_TAG: str(sid), artifacts.input_tag("finetune"): finetune_id}
    with tracking.child_run(parent.run_id, parent.experiment_id, sid.run_name, tags) as child:
        mlflow.log_params({"language": sid.language, "seed": sid.seed, "threshold": args.threshold, "amount": args.amount,
                           "target_sparsity": args.target_sparsity, "eval_examples": args.eval_examples})
        evaluation = prune_language(model, tokenizer, sid, args, train_chunks, test_batches, full)
        return evaluation, mlflow.get_run(child.info.run_id).data.metrics["importance_split_half_r"]


@contextmanager
def failing(parent, fan: FanOut) -> Iterator[None]:
    """Under torchrun, whatever ends this rank early (an error, or torchrun's SIGTERM after another rank
    died) marks the parent FAILED, and the children a dead rank left RUNNING: rank 0 may be the one gone."""
    try:
        yield
    except BaseException:
        if fan.world > 1:
            tracking.mark_failed(parent.run_id, parent.experiment_id, children=True)
        raise


def collect(gathered: list, sids: list[SubnetworkId]) -> dict[SubnetworkId, SubnetworkEvaluation]:
    """Rank 0: every rank's evaluations in run order, each subnetwork's reliability logged on the parent.
    A rank that failed, or a subnetwork no rank made, fails the parent."""
    made = {}
    for rank, (results, failure) in enumerate(gathered):
        if failure:
            sid, bad_input, line = failure
            raise XlsubError(line) if bad_input else RuntimeError(f"subnetwork {sid} failed on rank {rank}: {line}; see that rank's log")
        made |= results
    missing = [str(sid) for sid in sids if sid not in made]
    if missing:
        raise RuntimeError(f"subnetworks {','.join(missing)} were not made: the parent run was marked FAILED before their turn")
    for sid in sids:
        mlflow.log_metric(f"importance_split_half_r.{sid}", made[sid][1])
    return {sid: made[sid][0] for sid in sids}


def log_matrices(evaluations: dict, full: dict, languages: list[str]) -> None:
    """The cross-language perplexity matrices for the UI (raw and relative, subnetworks and random
    controls, with heatmaps) and the per-chunk losses analyze bootstraps its intervals from."""
    tables = prune_run_tables(evaluations, full, languages)
    with tempfile.TemporaryDirectory() as tmp:
        for table_id, table in tables.items():
            artifacts.write_table(Path(tmp), table_id, table, subfolder=None)
        for name in (artifacts.CROSS_PPL, artifacts.CROSS_PPL_RANDOM):
            drawn = figures.cross_perplexity_figures(tables[name], tables[f"{name}_relative"], name == artifacts.CROSS_PPL_RANDOM)
            for table_id, figure in drawn.items():
                save_figure(figure, Path(tmp) / artifacts.figure_path(table_id, folder=None))
        artifacts.write_ppl_full(Path(tmp), {l: c.perplexity for l, c in full.items()})
        mlflow.log_artifacts(tmp)
    tracking.log_table(tables[artifacts.CROSS_PPL].reset_index(), artifacts.CROSS_PPL_TABLE)


if __name__ == "__main__":
    main()
