"""analyze: head-mask overlap, cross-language perplexity, heads kept per layer, CKA with controls,
token overlap, as figures, tables and one report.

    mlflow run . -e analyze --env-manager local
    mlflow run . -e analyze --env-manager local -P cka=debiased -P layers=0,2,4
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import torch
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from transformers import AutoConfig, AutoTokenizer

from entry_points._common import (
    COUNT,
    LANGUAGE,
    REPLICATES,
    SEED,
    StageArgs,
    device_field,
    optional_run_id_field,
    parse_args,
    run_id_field,
    split_items,
)
from xlsub import artifacts
from xlsub.devices import resolve_device
from xlsub.errors import Range
from xlsub.models.families import adapter_for
from xlsub.models.mlm import ChunkLosses
from xlsub.report.analysis import AnalysisInputs, NeuronInputs, analyze
from xlsub.report.html import write_report
from xlsub.report.similarity_tables import Counts
from xlsub.report.tables import long_table
from xlsub.similarity.cka import KINDS, PRECISIONS
from xlsub.similarity.cka import check_options as check_cka_options
from xlsub.tracking import lineage
from xlsub.tracking import runs as tracking

log = logging.getLogger("xlsub.analyze")
LAYER = Range(0, meaning="a layer number (0 = embeddings)")


@dataclass
class AnalyzeArgs(StageArgs):
    encode_run_id: str = run_id_field("encode run ID or 'latest'")
    prune_run_id: str = run_id_field("prune run ID or 'latest'; with an explicit encode_run_id, 'latest' means that encode run's prune run")
    neurons_run_id: str = optional_run_id_field("neurons run ID, 'latest' (with an explicit encode_run_id that encoded neurons: its neurons run), or 'none' to analyse heads only")
    cka: str = field(default="debiased", metadata={"help": "CKA kind: debiased (unbiased HSIC, the default: biased CKA is inflated when n is not far above d), linear or rbf",
                                                  "choices": KINDS})
    cka_precision: str = field(default="float64", metadata={"help": "CKA products: float64, or float32 accumulated in float64 (linear and debiased; about 1.5x faster on CPUs)",
                                                            "choices": PRECISIONS})
    layers: str = field(default="auto", metadata={"help": "layers (0 = embeddings) for the all-pairs CKA heatmaps, comma-separated, each once, or 'auto' (first, middle, last)",
                                                  "items": LAYER, "keywords": ("auto",)})
    reference: str = field(default="en", metadata={"help": "the language every other language is compared with (CKA and token overlap)", "kind": LANGUAGE})
    bootstrap: int = field(default=1000, metadata={"help": "bootstrap replicates over test chunks for the perplexity intervals and the specificity gap",
                                                   "range": REPLICATES})
    permutations: int = field(default=1000, metadata={"help": "label permutations and random-mask draws of the overlap tests", "range": COUNT})
    resample_seed: int = field(default=0, metadata={"help": "seed of the bootstrap, permutations and random draws", "range": SEED})
    cka_permutations: int = field(default=1000, metadata={"help": "permutations of the CKA and retrieval nulls: full model at every layer (CKA), base, random and length-only controls at the last",
                                                          "range": COUNT})
    subnetwork_permutations: int = field(default=200, metadata={"help": "permutations of the CKA and retrieval nulls, and at most as many of the Mantel test, for each subnetwork (last layer)", "range": COUNT})
    length_permutations: int = field(default=500, metadata={"help": "length-matched permutations of the full model's CKA and RSA's Mantel test (full model and controls, last layer)",
                                                            "range": COUNT})
    power_draws: int = field(default=50, metadata={"help": "planted draws per signal-to-noise level of the power analysis (CKA, RSA and retrieval; 99 permutations a draw, stopped early; a level whose side of power 0.8 is settled stops sooner)",
                                                   "range": COUNT})
    device: str = device_field()

    @property
    def layer_list(self) -> list[int] | None:
        return None if self.layers == "auto" else split_items("layers", self.layers, LAYER)

    def check_stage(self) -> None:
        check_cka_options(self.cka, self.cka_precision)


def check_inputs(runs: dict[str, Run], work: Path) -> dict:
    """Before any work, every artifact the analysis reads is there: each subnetwork's head mask and
    pruning steps, the prune run's tables, and every model key's encodings in every encoded language
    (the encode run's manifest). Returns the subnetwork runs by id."""
    finetune, prune, encode = runs["finetune"], runs["prune"], runs["encode"]
    children = lineage.subnetworks(prune, dst=work / "prune")
    for child in children.values():
        tracking.require_artifacts("prune_run_id", child, [artifacts.HEAD_MASK, artifacts.STEPS])
    tracking.require_artifacts("prune_run_id", prune, [*(artifacts.table_path(t, folder=None) for t in (artifacts.CHUNK_LOSSES, artifacts.CROSS_PPL,
                                                                                                     artifacts.CROSS_PPL_RANDOM)), artifacts.PPL_FULL])
    tracking.require_artifacts("encode_run_id", finetune, [artifacts.model_files()[0]])  # config.json: the tokenizer's model
    tracking.require_artifacts("encode_run_id", encode, [artifacts.SENTENCES])
    encoded = lineage.manifest(encode, "encode_run_id", work / "encode")
    tracking.require_artifacts("encode_run_id", encode, [artifacts.encoding_path(key, lang) for key in encoded["model_keys"]
                                                         for lang in encoded["languages"]])
    return children


def load_inputs(runs: dict[str, Run], children: dict, work: Path) -> AnalysisInputs:
    """Everything the analysis needs, downloaded by run ID."""
    finetune, prune, encode = runs["finetune"], runs["prune"], runs["encode"]
    masks = {sid: artifacts.read_head_mask(tracking.download(child.info.run_id, artifacts.HEAD_MASK, work / child.info.run_id, "prune_run_id"))
             for sid, child in children.items()}
    trajectories = {sid: artifacts.step_masks(artifacts.read_steps(tracking.download(child.info.run_id, artifacts.STEPS, work / child.info.run_id, "prune_run_id")))
                    for sid, child in children.items()}
    losses = artifacts.read_chunk_losses(tracking.download(prune.info.run_id, artifacts.table_path(artifacts.CHUNK_LOSSES, folder=None), work, "prune_run_id"))
    cross = artifacts.read_cross_ppl(tracking.download(prune.info.run_id, artifacts.table_path(artifacts.CROSS_PPL, folder=None), work, "prune_run_id"))
    cross_random = artifacts.read_cross_ppl(tracking.download(prune.info.run_id, artifacts.table_path(artifacts.CROSS_PPL_RANDOM, folder=None), work, "prune_run_id"))
    ppl_full = artifacts.read_ppl_full(tracking.download(prune.info.run_id, artifacts.PPL_FULL, work, "prune_run_id"))
    sentences = artifacts.read_sentences(tracking.download(encode.info.run_id, artifacts.SENTENCES, work, "encode_run_id"))
    encodings = artifacts.read_encodings(tracking.download(encode.info.run_id, artifacts.ENCODINGS_DIR, work, "encode_run_id"))
    tok_dir = work / "tokenizer"
    names = {a.path.rsplit("/", 1)[-1] for a in MlflowClient().list_artifacts(finetune.info.run_id, artifacts.MODEL_DIR)}
    for name in artifacts.MODEL_TOKENIZER_FILES:
        if name in names:
            tracking.download(finetune.info.run_id, f"{artifacts.MODEL_DIR}/{name}", tok_dir, "encode_run_id")
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    config = AutoConfig.from_pretrained(tok_dir)
    tokens = {lang: tokenizer(texts, add_special_tokens=False)["input_ids"] for lang, texts in sentences["texts"].items()}
    reliability = {sid: child.data.metrics.get(artifacts.IMPORTANCE_RELIABILITY, math.nan) for sid, child in children.items()}
    return AnalysisInputs(languages=sentences["languages"], masks=masks, importance_reliability=reliability, cross_ppl=cross, cross_ppl_random=cross_random, ppl_full=ppl_full,
                          encodings=encodings, tokens=tokens, attention_params=adapter_for(config).attention_params(config),
                          trajectories=trajectories,
                          chunk_losses={key: ChunkLosses(*value) for key, value in losses.items()},
                          neurons=neuron_inputs(runs["neurons"], work / "neurons") if "neurons" in runs else None)


def neuron_inputs(neurons: Run, work: Path) -> NeuronInputs:
    """The neurons run's masks, split halves, eligible neurons and per-chunk losses, downloaded by run ID; refused
    at once where an artifact is missing."""
    children = lineage.subnetworks(neurons, "neurons_run_id", work)
    made = list(children)
    tracking.require_artifacts("neurons_run_id", neurons, [artifacts.table_path(artifacts.NEURON_CHUNK_LOSSES, folder=None), artifacts.NEURON_ELIGIBLE])
    for sid in made:
        tracking.require_artifacts("neurons_run_id", children[sid], [artifacts.NEURON_MASK, artifacts.NEURON_MASK_HALVES])

    def read(run: Run, path: str):
        return tracking.download(run.info.run_id, path, work / run.info.run_id, "neurons_run_id")

    masks = {sid: artifacts.read_head_mask(read(children[sid], artifacts.NEURON_MASK)) for sid in made}
    halves = {sid: {k: torch.tensor(v, dtype=torch.float32) for k, v in json.loads(read(children[sid], artifacts.NEURON_MASK_HALVES).read_text()).items()}
              for sid in made}
    eligible = {seed: torch.tensor(m) for seed, m in json.loads(read(neurons, artifacts.NEURON_ELIGIBLE).read_text()).items()}
    losses = artifacts.read_chunk_losses(read(neurons, artifacts.table_path(artifacts.NEURON_CHUNK_LOSSES, folder=None)))
    return NeuronInputs(masks, halves, eligible, {key: ChunkLosses(*value) for key, value in losses.items()})


def main(argv: list[str] | None = None) -> None:
    args = parse_args(AnalyzeArgs, argv)
    with tracking.stage_run("analyze", args) as run:
        device = resolve_device(args.device, float64=True)
        runs = lineage.resolve_inputs("analyze", args.params())
        lineage.tag_inputs(runs)
        with tempfile.TemporaryDirectory() as tmp:
            children = check_inputs(runs, Path(tmp) / "inputs")
            inputs = load_inputs(runs, children, Path(tmp) / "inputs")
            result = analyze(inputs, cka_kind=args.cka, layers=args.layer_list,
                             cka_precision=args.cka_precision, reference=args.reference, bootstrap=args.bootstrap,
                             permutations=args.permutations, resample_seed=args.resample_seed,
                             counts=Counts(args.cka_permutations, args.cka_permutations, args.subnetwork_permutations, args.length_permutations,
                                           args.power_draws), device=device)
            title = f"xlsub analysis ({args.cka} CKA{', float32 products' if args.cka_precision == 'float32' else ''})"
            written = write_report(result, Path(tmp) / "out", {stage: r.info.run_id for stage, r in (runs | {"analyze": run}).items()},
                                   lineage.run_links(runs | {"analyze": run}), title=title)
            artifacts.write_manifest(Path(tmp) / "out", "analyze", languages=inputs.languages, tables=list(written))
            mlflow.log_metrics(result.metrics)
            mlflow.log_artifacts(str(Path(tmp) / "out"))
            for table_id, table in written.items():  # queryable across runs: mlflow.load_table(..., extra_columns=["run_id"])
                tracking.log_table(long_table(table), artifacts.long_table_path(table_id))


if __name__ == "__main__":
    main()
