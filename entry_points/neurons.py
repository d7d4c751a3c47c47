"""neurons: the feed-forward neurons each language needs, and what switching them off does to every language.

    mlflow run . -e neurons --env-manager local --experiment-name xlsub-demo
    mlflow run . -e neurons --env-manager local --experiment-name xlsub-demo -P method=importance -P threshold=1.1

The unit beside attention heads: one neuron is one output of a layer's FFN activation (the family
adapter's `ffn_activation`; in gated FFNs the activated half). Per language and seed (the seed draws the
text sample):
- `method=lape` (Tang et al. 2024): each neuron's activation probability per language from one streamed
  pass (`xlsub.models.neurons.ActivationCounter`), then language activation probability entropy over the
  languages (`lape_selection`): the language's neurons are the low-entropy neurons active well above the
  rest in it. All languages of a seed are selected together, as LAPE defines it.
- `method=importance`: gates on the neurons and the heads' iterative pruning loop (`threshold`, `amount`,
  `target_sparsity`): the neurons whose gate gradients matter least for the language are switched off
  until its perplexity rises above the threshold; the switched-off set is its neuron set, for a
  like-for-like comparison with the head subnetworks.
Both also select from two disjoint halves of each language's sample (split-half stability).

One parent run; one child run per language and seed (`neurons/de-s0`) with its mask (`neuron_mask.json`,
[layers][neurons], 1 = kept, 0 = the language's neurons, switched off; metric `neurons_off` and
`neurons_off_layer.<l>`), the halves' masks, its activation probabilities, random-neuron controls (as many
off per layer, drawn per language, seed and draw), perplexity of every language with its neurons off
(`ppl.<lang>`, `ppl_random.<lang>`) and the stock model `neurons-de-s0` (the switched-off neurons'
down-projection inputs zeroed: loads without xlsub). The parent holds the deactivation matrix
(`neuron_ppl.csv`, relative to the full model in `neuron_ppl_relative.csv`, heatmaps), its random control,
every model's per-test-chunk losses (`neuron_chunk_losses.csv`, what analyze's intervals and tests
resample over languages), LAPE's eligible neurons per seed (`neuron_eligible.json`) and `ppl_full.json`.
"""

from __future__ import annotations

import json
import logging
import random
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import torch
from safetensors.torch import save_file

from entry_points._common import (
    COUNT,
    LANGUAGE,
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
from xlsub.errors import XlsubError
from xlsub.models.mlm import lm_batches
from xlsub.models.neurons import (
    ACTIVATION_BAR,
    FILTER_RATE,
    TOP_RATE,
    activation_statistics,
    gated_chunk_losses,
    lape_eligible,
    lape_quantile,
    lape_selection,
    neuron_control_seed,
    neuron_importance,
    neuron_mask_shape,
    random_neuron_mask_like,
    zero_neurons,
)
from xlsub.models.pruning import AMOUNT, TARGET_SPARSITY, THRESHOLD, cross_perplexity_matrix, prune_loop, relative_perplexity
from xlsub.models.training import load_finetuned
from xlsub.report.figures import save_figure
from xlsub.report.figures import stages as figures
from xlsub.tracking import lineage
from xlsub.tracking import runs as tracking

log = logging.getLogger("xlsub.neurons")
METHODS = ("lape", "importance")


@dataclass
class NeuronsArgs(StageArgs):
    finetune_run_id: str = run_id_field("finetune run ID, or 'latest' finished one in the experiment")
    languages: str = field(default="all", metadata={"help": "languages to find neurons for (comma-separated ISO codes, each once; lape needs 2 or more); 'all' = the finetune run's",
                                                   "items": LANGUAGE, "keywords": ("all",)})
    method: str = field(default="lape", metadata={"help": "lape (language activation probability entropy, Tang et al. 2024) or importance (neuron gates and the heads' pruning loop)",
                                                 "choices": METHODS})
    top_rate: float = field(default=0.01, metadata={"help": "lape: share of all neurons selected (lowest entropy)", "range": TOP_RATE})
    filter_rate: float = field(default=0.95, metadata={"help": "lape: a neuron is eligible if its activation probability exceeds this quantile of all probabilities in some language",
                                                       "range": FILTER_RATE})
    activation_bar: float = field(default=0.95, metadata={"help": "lape: a selected neuron belongs to every language whose probability exceeds this quantile of all probabilities",
                                                          "range": ACTIVATION_BAR})
    threshold: float = field(default=1.1, metadata={"help": "importance: keep switching neurons off while perplexity is at most threshold x all on", "range": THRESHOLD})
    amount: float = field(default=0.1, metadata={"help": "importance: fraction of all neurons switched off per step", "range": AMOUNT})
    target_sparsity: str = field(default="none", metadata={"help": "importance: switch off exactly this fraction of neurons, ignoring threshold; 'none' to use threshold",
                                                          "number": TARGET_SPARSITY, "keywords": ("none",)})
    examples: int = field(default=128, metadata={"help": "training chunks per language and seed the neurons are selected on (two halves of them for split-half stability)",
                                                 "range": COUNT})
    seeds: str = field(default="0", metadata={"help": "comma-separated seeds, each once; each draws its own text sample and random controls", "items": SEED})
    batch_size: int = field(default=32, metadata={"help": "sequences per batch", "range": COUNT})
    random_draws: int = field(default=2, metadata={"help": "random neuron sets with the language's count per layer, each evaluated on every language (the control)", "range": COUNT})
    log_stock_models: bool = field(default=True, metadata={"help": "also log each language's neurons-off model as a stock MLflow model (loads without xlsub); false skips it for large models"})
    precision: str = precision_field("the activation statistics, importance passes and perplexities")
    device: str = device_field()

    def check_stage(self) -> None:
        autocast(resolve_device(self.device), self.precision)  # refuses a precision the device would emulate
        if self.method == "lape" and (chosen := parse_languages(self.languages)) and len(chosen) < 2:
            raise XlsubError("languages: lape compares languages' activation probabilities; give two or more, or all")

    @property
    def sparsity(self) -> float | None:
        return None if self.target_sparsity in ("", "none") else float(self.target_sparsity)

    @property
    def seed_list(self) -> list[int]:
        return split_items("seeds", self.seeds, SEED)


@dataclass
class Selection:
    """One seed's neuron sets: per language its mask (1 = kept) and the halves' masks, its activation
    probabilities (LAPE) and the neurons LAPE could select."""

    masks: dict[str, torch.Tensor]
    halves: dict[str, tuple[torch.Tensor, torch.Tensor]]
    probability: dict[str, torch.Tensor]
    eligible: torch.Tensor | None


def lape_masks(probability: dict[str, torch.Tensor], args: NeuronsArgs) -> dict[str, torch.Tensor]:
    """Each language's mask (1 = kept, 0 = its LAPE neurons) from the languages' activation probabilities."""
    langs = list(probability)
    selected = lape_selection(torch.stack([probability[l] for l in langs]), args.top_rate, args.filter_rate, args.activation_bar)
    return {lang: (~selected[i]).float() for i, lang in enumerate(langs)}


def empty_lape_notice(probability: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], args: NeuronsArgs) -> str | None:
    """The line to print where LAPE selected no neuron for any language because no activation probability lies above
    the `activation_bar` quantile (it equals the largest, as where many neurons fire at every token); else None."""
    if any(bool((mask == 0).any()) for mask in masks.values()):
        return None
    p = torch.stack([probability[l] for l in masks]).double()
    bar = lape_quantile(p, args.activation_bar)
    if bool((p > bar).any()):
        return None
    return (f"xlsub neurons: lape selected no neuron: the activation_bar quantile ({args.activation_bar:g}) of the activation "
            f"probabilities is their largest value, {bar:g} ({float((p == bar).double().mean()):.1%} of them); lower activation_bar "
            f"and filter_rate, or sample more examples")


def select_lape(model, tokenizer, samples: dict[str, list], args: NeuronsArgs) -> Selection:
    """LAPE on each half of every language's sample, and on the whole (the halves' counts added)."""
    halves_stats = {}
    for lang, chunks in samples.items():
        half = len(chunks) // 2
        halves_stats[lang] = [activation_statistics(model, lm_batches(model, part, tokenizer, args.batch_size), desc=f"activations {lang}")
                              for part in (chunks[:half], chunks[half:])]
    probability = {lang: (a.active + b.active).double() / (a.tokens + b.tokens) for lang, (a, b) in halves_stats.items()}
    masks = lape_masks(probability, args)
    if notice := empty_lape_notice(probability, masks, args):
        print(notice, file=sys.stderr, flush=True)
    half_masks = [lape_masks({lang: stats[k].probability for lang, stats in halves_stats.items()}, args) for k in (0, 1)]
    eligible = lape_eligible(torch.stack(list(probability.values())), args.filter_rate)
    return Selection(masks, {lang: (half_masks[0][lang], half_masks[1][lang]) for lang in samples},
                     {lang: p.float() for lang, p in probability.items()}, eligible)


def select_importance(model, tokenizer, samples: dict[str, list], seed: int, args: NeuronsArgs) -> Selection:
    """The heads' pruning loop on neuron gates, per language, on its sample and on each half."""

    def prune(chunks, desc):
        batches = lm_batches(model, chunks, tokenizer, args.batch_size, seed=data.EVAL_MASK_SEED + seed)

        def evaluate(mask):
            result = neuron_importance(model, batches, mask)
            return result.importance, result.perplexity

        return prune_loop(evaluate, neuron_mask_shape(model), threshold=args.threshold, amount=args.amount, target_sparsity=args.sparsity,
                          continue_to=0.0, progress=None, progress_desc=desc, unit="neurons").mask

    masks, halves = {}, {}
    for lang, chunks in samples.items():
        half = len(chunks) // 2
        masks[lang] = prune(chunks, f"neurons {lang}-s{seed}")
        halves[lang] = (prune(chunks[:half], f"neurons {lang}-s{seed} half a"), prune(chunks[half:], f"neurons {lang}-s{seed} half b"))
    return Selection(masks, halves, {}, None)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(NeuronsArgs, argv)
    with tracking.stage_run("neurons", args, system_metrics=True) as run:
        device = resolve_device(args.device)
        precision = autocast(device, args.precision)  # checked with the parameters (`check_stage`)
        runs = lineage.resolve_inputs("neurons", args.params())
        lineage.tag_inputs(runs)
        finetune = runs["finetune"]
        made = lineage.manifest(finetune, "finetune_run_id")
        trained = made["languages"]
        langs = parse_languages(args.languages) or trained
        for lang in langs:
            if lang not in trained:
                raise XlsubError(f"languages: finetune run {finetune.info.run_id} did not train '{lang}'; choose from {','.join(trained)}")
        if args.method == "lape" and len(langs) < 2:
            raise XlsubError(f"languages: lape compares languages, and finetune run {finetune.info.run_id} trained only {langs[0]}; use method=importance")
        folder = tracking.download(finetune.info.run_id, artifacts.MODEL_DIR, param="finetune_run_id")
        with precision:  # the model's passes, in fp32 or under torch.autocast
            model, tokenizer, lm, _ = load_finetuned(folder, made["lm_data"], trained, device)
            test_batches = {l: lm_batches(model, lm.test[l], tokenizer, args.batch_size) for l in trained}
            full = gated_chunk_losses(model, None, test_batches)
            mlflow.log_metrics({f"ppl_full.{l}": c.perplexity for l, c in full.items()})
            layers, width = neuron_mask_shape(model)
            mlflow.log_params({"neurons_per_layer": width, "neuron_layers": layers})

            rows, random_rows, losses, eligible = {}, {}, {(artifacts.FULL_MODEL, -1, l): c for l, c in full.items()}, {}
            for seed in args.seed_list:
                samples = {lang: random.Random(seed).sample(lm.train_chunks[lang], min(args.examples, len(lm.train_chunks[lang]))) for lang in langs}
                if any(len(chunks) < 2 for chunks in samples.values()):
                    raise XlsubError("examples: each language needs 2 or more training chunks, one for each half; raise examples")
                selection = select_lape(model, tokenizer, samples, args) if args.method == "lape" else \
                    select_importance(model, tokenizer, samples, seed, args)
                if selection.eligible is not None:
                    eligible[str(seed)] = selection.eligible.int().tolist()
                for lang in langs:
                    sid = SubnetworkId(lang, seed)
                    own, draws = neuron_child(run, finetune.info.run_id, sid, selection, model, tokenizer, test_batches, args)
                    rows[sid] = {l: c.perplexity for l, c in own.items()}
                    random_rows[sid] = {l: sum(d[l].perplexity for d in draws) / len(draws) for l in own}
                    losses |= {(str(sid), -1, l): c for l, c in own.items()}
                    losses |= {(str(sid), k, l): c for k, draw in enumerate(draws) for l, c in draw.items()}
            log_matrices(rows, random_rows, losses, {l: c.perplexity for l, c in full.items()}, trained, eligible, langs, args)


def neuron_child(parent, finetune_id: str, sid: SubnetworkId, selection: Selection, model, tokenizer, test_batches, args: NeuronsArgs):
    """One language's neuron set in its child run: mask, halves, probabilities, its evaluation on every
    language beside its random controls, the stock model. Returns (its per-chunk losses by language, each
    random draw's)."""
    mask = selection.masks[sid.language]
    tags = {artifacts.STAGE_TAG: "neurons", artifacts.CHILD_TAG: "true", artifacts.LANGUAGE_TAG: sid.language, artifacts.SEED_TAG: str(sid.seed),
            artifacts.SUBNETWORK_TAG: str(sid), artifacts.input_tag("finetune"): finetune_id}
    with tracking.child_run(parent.info.run_id, parent.info.experiment_id, f"neurons/{sid}", tags):
        mlflow.log_params({"language": sid.language, "seed": sid.seed, "method": args.method})
        own = gated_chunk_losses(model, mask, test_batches)
        random_masks = [random_neuron_mask_like(mask, neuron_control_seed(sid, draw)) for draw in range(args.random_draws)]
        draws = [gated_chunk_losses(model, m, test_batches) for m in random_masks]
        off = (mask == 0).sum(1)
        mlflow.log_metrics({artifacts.NEURONS_OFF: int(off.sum()), "neurons_off_frac": float((mask == 0).float().mean())}
                           | {f"neurons_off_layer.{layer}": int(n) for layer, n in enumerate(off.tolist())}
                           | {f"ppl.{l}": c.perplexity for l, c in own.items()}
                           | {f"ppl_random.{l}": sum(d[l].perplexity for d in draws) / len(draws) for l in own})
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            (folder / artifacts.NEURON_MASK).write_text(artifacts.head_mask_text(mask))
            a, b = selection.halves[sid.language]
            (folder / artifacts.NEURON_MASK_HALVES).write_text(json.dumps({"a": a.int().tolist(), "b": b.int().tolist()}))
            (folder / artifacts.NEURON_RANDOM_MASKS).write_text(json.dumps([m.int().tolist() for m in random_masks]))
            if sid.language in selection.probability:
                save_file({"p": selection.probability[sid.language].contiguous()}, str(folder / artifacts.ACTIVATION_PROBABILITY))
            mlflow.log_artifacts(tmp)
        if args.log_stock_models:
            model_tags = {artifacts.LANGUAGE_TAG: sid.language, artifacts.SEED_TAG: str(sid.seed), artifacts.SUBNETWORK_TAG: str(sid),
                          artifacts.MASK_DIGEST_TAG: artifacts.mask_digest(mask), artifacts.input_tag("finetune"): finetune_id,
                          artifacts.input_tag("neurons"): parent.info.run_id, "method": args.method}
            tracking.log_lm(zero_neurons(model, mask), tokenizer, sid.neurons_model_name, tags=model_tags)
    return own, draws


def log_matrices(rows, random_rows, losses, ppl_full, trained, eligible, langs, args: NeuronsArgs) -> None:
    """The deactivation matrix (raw and relative to the full model) and its random control with heatmaps,
    every model's per-chunk losses, LAPE's eligible neurons, the full model's perplexity, the manifest."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        tables = {}
        for name, matrix_rows in ((artifacts.NEURON_PPL, rows), (artifacts.NEURON_PPL_RANDOM, random_rows)):
            tables[name] = cross_perplexity_matrix(matrix_rows, trained)
            tables[f"{name}_relative"] = relative_perplexity(tables[name], ppl_full)
        for table_id, table in tables.items():
            artifacts.write_table(folder, table_id, table, subfolder=None)
        for name, what in ((artifacts.NEURON_PPL, "language's neurons switched off"),
                           (artifacts.NEURON_PPL_RANDOM, "random neurons, as many per layer, switched off")):
            drawn = figures.cross_perplexity_figures(tables[name], tables[f"{name}_relative"], stem=name, what=what)
            for table_id, figure in drawn.items():
                save_figure(figure, folder / artifacts.figure_path(table_id, folder=None))
        artifacts.write_table(folder, artifacts.NEURON_CHUNK_LOSSES, artifacts.chunk_losses_table(losses).set_index("model"), subfolder=None)
        (folder / artifacts.NEURON_ELIGIBLE).write_text(json.dumps(eligible))
        artifacts.write_ppl_full(folder, ppl_full)
        artifacts.write_manifest(folder, "neurons", languages=langs, subnetworks=[str(sid) for sid in rows], method=args.method)
        mlflow.log_artifacts(tmp)


if __name__ == "__main__":
    main()
