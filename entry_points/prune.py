"""prune: a subnetwork of attention heads per language, evaluated on every language.

    mlflow run . -e prune --env-manager local
    mlflow run . -e prune --env-manager local -P languages=en,de -P seeds=0,1,2 -P target_sparsity=0.5

One parent run; one nested child run per language and seed (`prune/de-s0`, `prune/de-s1`), each with
its head mask, importance, per-step curve, its row of the cross-language perplexity matrix, a
random-mask control and the physically pruned subnetwork.
"""

from __future__ import annotations

import copy
import logging
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import mlflow

from entry_points._common import StageArgs, device_field, parse_args, parse_languages
from entry_points.finetune import FinetuneArgs
from xlsub import artifacts, data, models, tracking
from xlsub.artifacts import SubnetworkId
from xlsub.errors import XlsubError
from xlsub.figures import save_figure
from xlsub.figures import stages as figures
from xlsub.intervals import language_indices, percentile_interval, random_control_replicates
from xlsub.overlap import params_kept_frac
from xlsub.pruning import (SubnetworkEvaluation, check_settings, evaluate_subnetwork, iterative_pruning, masked_chunk_losses,
                           perplexity_tables, prune_heads, split_half_importance)
from xlsub.training import load_finetuned

log = logging.getLogger("xlsub.prune")


@dataclass
class PruneArgs(StageArgs):
    finetune_run_id: str = field(default="latest", metadata={"help": "finetune run ID, or 'latest' finished one in the experiment"})
    languages: str = field(default="all", metadata={"help": "languages to find subnetworks for (comma-separated ISO codes); 'all' = the finetune run's"})
    threshold: float = field(default=1.1, metadata={"help": "keep the last mask whose perplexity is at most threshold x unpruned (>= 1)"})
    amount: float = field(default=0.1, metadata={"help": "fraction of all heads switched off per step, in (0, 1]"})
    target_sparsity: str = field(default="none", metadata={"help": "prune exactly this fraction of heads, in (0, 1), ignoring threshold; 'none' to use threshold"})
    eval_examples: int = field(default=64, metadata={"help": "training chunks per language for importance and the stop rule"})
    batch_size: int = field(default=32, metadata={"help": "sequences per importance/evaluation batch"})
    seeds: str = field(default="0", metadata={"help": "comma-separated seeds in [0, 2**32); each draws its own pruning data, masks and random control"})
    random_draws: int = field(default=2, metadata={"help": "random masks with the subnetwork's heads per layer, each evaluated on every language (the control)"})
    bootstrap: int = field(default=1000, metadata={"help": "bootstrap replicates over test chunks (and random draws) for the intervals"})
    continue_to: float = field(default=0.9, metadata={"help": "go on pruning (importance only) until this fraction of heads is off, for equal-size overlaps; the stop rule still picks the subnetwork"})
    device: str = device_field()

    @property
    def sparsity(self) -> float | None:
        """`target_sparsity` as a number, or None for the threshold rule."""
        if self.target_sparsity.strip().lower() in ("", "none"):
            return None
        try:
            return float(self.target_sparsity)
        except ValueError:
            raise XlsubError(f"target_sparsity: '{self.target_sparsity}' is not a number; give a fraction in (0, 1) or none") from None

    @property
    def seed_list(self) -> list[int]:
        try:
            seeds = [int(s) for s in self.seeds.split(",") if s.strip()]
        except ValueError:
            raise XlsubError(f"seeds: '{self.seeds}' is not a comma-separated list of integers, e.g. 0,1,2") from None
        if not seeds or len(set(seeds)) != len(seeds) or not all(0 <= s < 2**32 for s in seeds):
            raise XlsubError(f"seeds: give one or more distinct integers in [0, 2**32), got '{self.seeds}'")
        return seeds

    def validate(self) -> None:
        self.check_positive("eval_examples", "batch_size", "random_draws")
        if self.bootstrap < 10:
            raise XlsubError(f"bootstrap: give at least 10 replicates (1000 for 95% intervals), got {self.bootstrap}")
        check_settings(threshold=self.threshold, amount=self.amount, target_sparsity=self.sparsity, continue_to=self.continue_to)
        self.seed_list
        parse_languages(self.languages)


def prune_language(model, tokenizer, sid: SubnetworkId, args: PruneArgs, train_chunks, test_batches, full) -> SubnetworkEvaluation:
    """Find, evaluate, log and save one subnetwork in the active (child) run."""
    chunks = random.Random(sid.seed).sample(train_chunks, min(args.eval_examples, len(train_chunks)))
    batches = data.masked_batches(chunks, tokenizer, args.batch_size, seed=data.EVAL_MASK_SEED + sid.seed)
    halves = [data.masked_batches(part, tokenizer, args.batch_size, seed=data.EVAL_MASK_SEED + sid.seed)
              for part in (chunks[: len(chunks) // 2], chunks[len(chunks) // 2 : 2 * (len(chunks) // 2)])]
    result = iterative_pruning(model, batches, threshold=args.threshold, amount=args.amount, target_sparsity=args.sparsity,
                               continue_to=args.continue_to, progress_desc=f"prune {sid}")
    for step in result.steps:
        mlflow.log_metrics({"ppl": step.ppl, "frac_pruned": step.frac_pruned}, step=step.step)
    mask = result.mask
    evaluation = evaluate_subnetwork(model, mask, sid, test_batches, args.random_draws)
    indices = language_indices(full, args.bootstrap, seed=sid.seed)
    for lang, idx in indices.items():
        lo, hi = percentile_interval(random_control_replicates([d[lang] for d in evaluation.random_losses], idx, sid.seed))
        mlflow.log_metrics({f"ppl_random_lo.{lang}": lo, f"ppl_random_hi.{lang}": hi})
    config = model.config
    mlflow.log_metrics({f"ppl.{l}": v for l, v in evaluation.perplexity.items()}
                       | {f"ppl_random.{l}": v for l, v in evaluation.random_perplexity.items()})
    mlflow.log_metrics({"heads_kept": int(mask.sum()), "heads_kept_frac": float(mask.mean()),
                        "params_kept_frac": params_kept_frac(mask, config.hidden_size, config.hidden_size // config.num_attention_heads),
                        "ppl_prune_data": result.ppl, "ppl_prune_data_unpruned": result.base_ppl, "steps": result.kept,
                        "importance_split_half_r": split_half_importance(model, *halves)})
    with tempfile.TemporaryDirectory() as tmp:
        artifacts.write_head_mask(Path(tmp), mask)
        artifacts.write_importance(Path(tmp), result.importance)
        artifacts.write_random_masks(Path(tmp), evaluation.random_masks)
        artifacts.write_model(Path(tmp), prune_heads(copy.deepcopy(model), mask), tokenizer, artifacts.SUBNETWORK_DIR)
        mlflow.log_artifacts(tmp)
    mlflow.log_figure(figures.head_mask_heatmap(mask, result.importance, f"{sid} subnetwork"), artifacts.HEAD_MASK_FIGURE)
    tracking.log_table(artifacts.steps_table(result.steps, result.kept), artifacts.STEPS)
    return evaluation


def main(argv: list[str] | None = None) -> None:
    args = parse_args(PruneArgs, argv)
    with tracking.stage_run("prune", args):
        device = models.resolve_device(args.device)
        finetune = tracking.resolve_run("finetune_run_id", args.finetune_run_id, "finetune")
        mlflow.set_tag(artifacts.input_tag("finetune"), finetune.info.run_id)
        trained = finetune.data.tags[artifacts.LANGUAGES_TAG].split(",")
        langs = parse_languages(args.languages) or trained
        for lang in langs:
            if lang not in trained:
                raise XlsubError(f"languages: finetune run {finetune.info.run_id} did not train '{lang}'; choose from {','.join(trained)}")
        trained_with = FinetuneArgs.from_params(finetune.data.params, "finetune_run_id")
        folder = tracking.download(finetune.info.run_id, artifacts.MODEL_DIR, param="finetune_run_id")
        model, tokenizer, lm, _ = load_finetuned(folder, trained_with, trained, device)
        test_batches = {l: data.masked_batches(lm.test[l], tokenizer, args.batch_size) for l in trained}
        full = masked_chunk_losses(model, None, test_batches)
        mlflow.log_metrics({f"ppl_full.{l}": c.perplexity for l, c in full.items()})
        evaluations = {}
        for sid in (SubnetworkId(lang, seed) for lang in langs for seed in args.seed_list):
            with mlflow.start_run(run_name=sid.run_name, nested=True) as child:
                mlflow.set_tags({artifacts.STAGE_TAG: "prune", artifacts.CHILD_TAG: "true", artifacts.LANGUAGE_TAG: sid.language,
                                 artifacts.SEED_TAG: str(sid.seed), artifacts.SUBNETWORK_TAG: str(sid),
                                 artifacts.input_tag("finetune"): finetune.info.run_id})
                mlflow.log_params({"language": sid.language, "seed": sid.seed, "threshold": args.threshold, "amount": args.amount,
                                   "target_sparsity": args.target_sparsity, "eval_examples": args.eval_examples})
                evaluations[sid] = prune_language(model, tokenizer, sid, args, lm.train_chunks[sid.language], test_batches, full)
                reliability = mlflow.get_run(child.info.run_id).data.metrics["importance_split_half_r"]
            mlflow.log_metric(f"importance_split_half_r.{sid}", reliability)
        log_matrices(evaluations, full, trained)


def log_matrices(evaluations: dict, full: dict, languages: list[str]) -> None:
    """The cross-language perplexity matrices for the UI (raw and relative, subnetworks and random
    controls, with heatmaps) and the per-chunk losses analyze bootstraps its intervals from."""
    tables = perplexity_tables(evaluations, full, languages)
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
