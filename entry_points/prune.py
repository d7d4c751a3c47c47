"""prune: a subnetwork of attention heads per language, evaluated on every language.

    mlflow run . -e prune --env-manager local
    mlflow run . -e prune --env-manager local -P languages=en,de -P seeds=0,1,2 -P target_sparsity=0.5

One parent run; one nested child run per language and seed (`prune/de`,
`prune/de/seed1`), each with its head mask, importance, per-step curve, its
row of the cross-language perplexity matrix, a random-mask control and the
physically pruned subnetwork.
"""

from __future__ import annotations

import copy
import json
import logging
import random
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlflow
import pandas as pd

from entry_points._common import load_finetuned, parse_args, parse_languages
from xlsub import data, models, plots, tracking
from xlsub.errors import XlsubError
from xlsub.pruning import iterative_pruning, params_kept_frac, prune_heads, random_mask_like, save_pruned, masked_perplexities

log = logging.getLogger("xlsub.prune")
LANGUAGE_TAG = "xlsub.language"  # on child runs only: which language the subnetwork is for


@dataclass
class PruneArgs:
    finetune_run_id: str = field(default="latest", metadata={"help": "finetune run ID, or 'latest' finished one in the experiment"})
    languages: str = field(default="all", metadata={"help": "languages to find subnetworks for (comma-separated ISO codes); 'all' = the finetune run's"})
    threshold: float = field(default=1.1, metadata={"help": "keep the last mask whose perplexity is at most threshold x unpruned (> 1)"})
    amount: float = field(default=0.1, metadata={"help": "fraction of all heads switched off per step, in (0, 1)"})
    target_sparsity: str = field(default="none", metadata={"help": "prune exactly this fraction of heads, in (0, 1), ignoring threshold; 'none' to use threshold"})
    eval_examples: int = field(default=64, metadata={"help": "training chunks per language for importance and the stop rule"})
    batch_size: int = field(default=32, metadata={"help": "sequences per importance/evaluation batch"})
    seeds: str = field(default="0", metadata={"help": "comma-separated seeds; each draws its own pruning data, masks and random control"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:N or mps"})


def validate(args: PruneArgs) -> tuple[float | None, list[int]]:
    if args.threshold <= 1:
        raise XlsubError(f"threshold: must be > 1 (a perplexity ratio), got {args.threshold}")
    if not 0 < args.amount < 1:
        raise XlsubError(f"amount: must be in (0, 1), got {args.amount}")
    sparsity = None
    if args.target_sparsity.strip().lower() not in ("", "none"):
        try:
            sparsity = float(args.target_sparsity)
        except ValueError:
            raise XlsubError(f"target_sparsity: '{args.target_sparsity}' is not a number; give a fraction in (0, 1) or none") from None
        if not 0 < sparsity < 1:
            raise XlsubError(f"target_sparsity: must be in (0, 1) or none, got {sparsity}")
    for name in ("eval_examples", "batch_size"):
        if getattr(args, name) <= 0:
            raise XlsubError(f"{name}: must be a positive integer, got {getattr(args, name)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise XlsubError(f"seeds: '{args.seeds}' is not a comma-separated list of integers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise XlsubError(f"seeds: give one or more distinct integers, got '{args.seeds}'")
    return sparsity, seeds


def prune_language(model, tokenizer, lang, seed, args, sparsity, train_chunks, test_batches) -> dict[str, float]:
    """Find, evaluate, log and save one language's subnetwork in the active (child) run; returns its ppl row."""
    chunks = random.Random(seed).sample(train_chunks, min(args.eval_examples, len(train_chunks)))
    batches = data.masked_batches(chunks, tokenizer, args.batch_size, seed=data.EVAL_MASK_SEED + seed)
    result = iterative_pruning(model, batches, threshold=args.threshold, amount=args.amount, target_sparsity=sparsity,
                               progress_desc=f"prune {lang} seed {seed}")
    for step in result.steps:
        mlflow.log_metrics({"ppl": step.ppl, "frac_pruned": step.frac_pruned}, step=step.step)
    mask = result.mask
    row = masked_perplexities(model, mask, test_batches)
    control = masked_perplexities(model, random_mask_like(mask, seed), test_batches)
    mlflow.log_metrics({f"ppl.{l}": v for l, v in row.items()} | {f"ppl_random.{l}": v for l, v in control.items()})
    mlflow.log_metrics({"heads_kept": int(mask.sum()), "heads_kept_frac": float(mask.mean()),
                        "params_kept_frac": params_kept_frac(mask, model.config), "ppl_prune_data": result.ppl,
                        "ppl_prune_data_unpruned": result.base_ppl, "steps": len(result.steps) - 1})
    mlflow.log_dict(mask.int().tolist(), "head_mask.json")
    mlflow.log_dict(result.importance.tolist(), "head_importance.json")
    mlflow.log_figure(plots.head_mask_heatmap(mask, result.importance, f"{lang} subnetwork (seed {seed})"), "head_mask.png")
    mlflow.log_table(pd.DataFrame([{"step": s.step, "ppl": s.ppl, "frac_pruned": s.frac_pruned} for s in result.steps]), "steps.json")
    with tempfile.TemporaryDirectory() as tmp:
        save_pruned(prune_heads(copy.deepcopy(model), mask), tmp)
        tokenizer.save_pretrained(tmp)
        mlflow.log_artifacts(tmp, "subnetwork")
    return row, control


def main(argv: list[str] | None = None) -> None:
    args = parse_args(PruneArgs, argv)
    with tracking.stage_run("prune", asdict(args)):
        sparsity, seeds = validate(args)
        device = models.resolve_device(args.device)
        finetune = tracking.resolve_run("finetune_run_id", args.finetune_run_id, "finetune")
        mlflow.set_tag(tracking.input_tag("finetune"), finetune.info.run_id)
        trained = finetune.data.tags["xlsub.languages"].split(",")
        langs = parse_languages(args.languages) or trained
        for lang in langs:
            if lang not in trained:
                raise XlsubError(f"languages: finetune run {finetune.info.run_id} did not train '{lang}'; choose from {','.join(trained)}")
        model, tokenizer, _, lm, _ = load_finetuned(finetune, device)
        test_batches = {l: data.masked_batches(lm.test[l], tokenizer, args.batch_size) for l in trained}
        rows, controls = {}, {}
        full = masked_perplexities(model, None, test_batches)
        mlflow.log_metrics({f"ppl_full.{l}": v for l, v in full.items()})
        for lang in langs:
            for seed in seeds:
                name = f"prune/{lang}" if len(seeds) == 1 else f"prune/{lang}/seed{seed}"
                with mlflow.start_run(run_name=name, nested=True):
                    mlflow.set_tags({tracking.STAGE_TAG: "prune", tracking.CHILD_TAG: "true", LANGUAGE_TAG: lang, "xlsub.seed": str(seed),
                                     tracking.input_tag("finetune"): finetune.info.run_id})
                    mlflow.log_params({"language": lang, "seed": seed, "threshold": args.threshold, "amount": args.amount,
                                       "target_sparsity": args.target_sparsity, "eval_examples": args.eval_examples})
                    rows[name], controls[name] = prune_language(model, tokenizer, lang, seed, args, sparsity, lm.train_chunks[lang], test_batches)
        log_matrices(rows, controls, full)


def log_matrices(rows: dict, controls: dict, full: dict) -> None:
    """The cross-language perplexity matrix (subnetwork x evaluation language), raw and relative to the full model."""
    for name, table in (("cross_ppl", rows), ("cross_ppl_random", controls)):
        matrix = pd.DataFrame(table).T
        matrix.index = [i.removeprefix("prune/") for i in matrix.index]
        matrix.index.name = "subnetwork"
        relative = matrix / pd.Series(full)
        with tempfile.TemporaryDirectory() as tmp:
            matrix.to_csv(Path(tmp) / f"{name}.csv")
            relative.to_csv(Path(tmp) / f"{name}_relative.csv")
            mlflow.log_artifacts(tmp)
        what = "random mask of the same size per layer" if "random" in name else "language subnetwork"
        mlflow.log_figure(plots.matrix_heatmap(matrix, f"Perplexity: {what} (rows) on each language (columns)", "perplexity"), f"{name}.png")
        mlflow.log_figure(plots.matrix_heatmap(relative, f"Perplexity relative to the full model: {what}", "ppl / full ppl", fmt=".2f", cmap="vlag", center=1.0), f"{name}_relative.png")
    mlflow.log_table(pd.DataFrame(rows).T.reset_index(names="subnetwork"), "cross_ppl.json")
    mlflow.log_dict({"full": full}, "ppl_full.json")


if __name__ == "__main__":
    main()
