"""analyze: head-mask overlap, cross-language perplexity, heads kept per layer, CKA with controls,
token overlap, as figures, tables and one report.

    mlflow run . -e analyze --env-manager local
    mlflow run . -e analyze --env-manager local -P cka=debiased -P layers=0,2,4
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt
import mlflow
import pandas as pd
import torch
from mlflow.tracking import MlflowClient
from transformers import AutoTokenizer

from entry_points._common import parse_args
from xlsub import tracking
from xlsub.analysis import AnalysisInputs, analyze, long_table
from xlsub.cka import check_options as check_cka_options
from xlsub.encoding import load_encodings
from xlsub.errors import XlsubError
from xlsub.report import render_report

log = logging.getLogger("xlsub.analyze")
TOKENIZER_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@dataclass
class AnalyzeArgs:
    encode_run_id: str = field(default="latest", metadata={"help": "encode run ID or 'latest'"})
    prune_run_id: str = field(default="latest", metadata={"help": "prune run ID or 'latest'; with an explicit encode_run_id, 'latest' means that encode run's prune run"})
    cka: str = field(default="linear", metadata={"help": "CKA kind: linear, debiased (unbiased HSIC) or rbf"})
    cka_precision: str = field(default="float64", metadata={"help": "CKA products: float64, or float32 accumulated in float64 (linear and debiased; about 1.5x faster on CPUs)"})
    layers: str = field(default="auto", metadata={"help": "layers (0 = embeddings) for the all-pairs CKA heatmaps, comma-separated, or 'auto' (first, middle, last)"})


def validate(args: AnalyzeArgs) -> list[int] | None:
    check_cka_options(args.cka, args.cka_precision)
    if args.layers.strip().lower() in ("", "auto"):
        return None
    try:
        return [int(x) for x in args.layers.split(",") if x.strip()]
    except ValueError:
        raise XlsubError(f"layers: '{args.layers}' is not a comma-separated list of layer numbers, e.g. 0,6,12") from None


def resolve_inputs(args: AnalyzeArgs):
    encode = tracking.resolve_run("encode_run_id", args.encode_run_id, "encode")
    made_from = encode.data.tags.get(tracking.input_tag("prune"))
    prune_id = made_from if args.prune_run_id == "latest" and args.encode_run_id != "latest" else args.prune_run_id
    prune = tracking.resolve_run("prune_run_id", prune_id, "prune")
    if made_from != prune.info.run_id:
        raise XlsubError(f"prune_run_id: encode run {encode.info.run_id} was made from prune run {made_from}, not {prune.info.run_id}; pass matching runs")
    finetune = tracking.resolve_run("finetune_run_id of the encode run", encode.data.tags[tracking.input_tag("finetune")], "finetune")
    return finetune, prune, encode


def load_inputs(finetune, prune, encode, work: Path) -> AnalysisInputs:
    """Everything the analysis needs, downloaded by run ID."""
    client = MlflowClient()
    children = client.search_runs([prune.info.experiment_id], f"tags.`mlflow.parentRunId` = '{prune.info.run_id}' and tags.`{tracking.CHILD_TAG}` = 'true'")
    masks = {}
    for child in children:
        path = tracking.download(child.info.run_id, "head_mask.json", work / child.info.run_id, "prune_run_id")
        masks[(child.data.tags["xlsub.language"], int(child.data.tags["xlsub.seed"]))] = torch.tensor(json.loads(path.read_text()))
    if not masks:
        raise XlsubError(f"prune_run_id: prune run {prune.info.run_id} has no finished language runs; rerun prune")
    cross = pd.read_csv(tracking.download(prune.info.run_id, "cross_ppl.csv", work, "prune_run_id"), index_col=0)
    cross_random = pd.read_csv(tracking.download(prune.info.run_id, "cross_ppl_random.csv", work, "prune_run_id"), index_col=0)
    ppl_full = {k.split(".", 1)[1]: v for k, v in prune.data.metrics.items() if k.startswith("ppl_full.")}
    sentences = json.loads(tracking.download(encode.info.run_id, "sentences.json", work, "encode_run_id").read_text())
    root = tracking.download(encode.info.run_id, "encodings", work, "encode_run_id")
    encodings = {key.name: {p.stem: load_encodings(p) for p in sorted(key.glob("*.safetensors"))} for key in sorted(root.iterdir()) if key.is_dir()}
    tok_dir = work / "tokenizer"
    names = {a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(finetune.info.run_id, "model")}
    for name in TOKENIZER_FILES:
        if name in names:
            tracking.download(finetune.info.run_id, f"model/{name}", tok_dir, "encode_run_id")
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    config = json.loads((tok_dir / "config.json").read_text())
    tokens = {lang: tokenizer(texts, add_special_tokens=False)["input_ids"] for lang, texts in sentences["texts"].items()}
    return AnalysisInputs(languages=sentences["languages"], masks=masks, cross_ppl=cross, cross_ppl_random=cross_random, ppl_full=ppl_full,
                          encodings=encodings, tokens=tokens, hidden_size=config["hidden_size"],
                          head_dim=config["hidden_size"] // config["num_attention_heads"])


def run_links(runs: dict[str, object]) -> dict[str, str] | None:
    """Links to the runs in the MLflow UI when the tracking server has an HTTP address."""
    uri = mlflow.get_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return None
    return {stage: f"{uri.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}" for stage, run in runs.items()}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(AnalyzeArgs, argv)
    with tracking.stage_run("analyze", asdict(args)) as run:
        layers = validate(args)
        finetune, prune, encode = resolve_inputs(args)
        mlflow.set_tags({tracking.input_tag(s): r.info.run_id for s, r in (("finetune", finetune), ("prune", prune), ("encode", encode))})
        with tempfile.TemporaryDirectory() as tmp:
            work, out = Path(tmp) / "inputs", Path(tmp) / "out"
            result = analyze(load_inputs(finetune, prune, encode, work), cka_kind=args.cka, layers=layers,
                             cka_precision=args.cka_precision)
            (out / "figures").mkdir(parents=True)
            (out / "tables").mkdir()
            figure_paths, table_paths = {}, {}
            for name, fig in result.figures.items():
                fig.savefig(out / "figures" / name, dpi=110, bbox_inches="tight")
                plt.close(fig)
                figure_paths[name] = f"figures/{name}"
            for name, table in result.tables.items():
                table.to_csv(out / "tables" / name)
                table_paths[name] = f"tables/{name}"
            lineage = {"finetune": finetune.info.run_id, "prune": prune.info.run_id, "encode": encode.info.run_id, "analyze": run.info.run_id}
            html = render_report(result, figure_paths, table_paths, lineage,
                                 run_links({"finetune": finetune, "prune": prune, "encode": encode, "analyze": run}),
                                 title=f"xlsub analysis ({args.cka} CKA{', float32 products' if args.cka_precision == 'float32' else ''})")
            (out / "report.html").write_text(html, encoding="utf-8")
            mlflow.log_metrics(result.metrics)
            mlflow.log_artifacts(str(out))
            for name, table in result.tables.items():  # queryable across runs: mlflow.load_table(..., extra_columns=["run_id"])
                mlflow.log_table(long_table(table), f"tables/{Path(name).stem}.json")


if __name__ == "__main__":
    main()
