"""encode: per-layer sentence representations of a parallel corpus, for the full model, every
language subnetwork and optional controls.

    mlflow run . -e encode --env-manager local
    mlflow run . -e encode --env-manager local -P use_base=true -P use_random=true -P dtype=float16

Artifacts: `encodings/<model_key>/<lang>.safetensors` ([layers+1, n, d], row i is
the same sentence in every language) and `sentences.json` (ids and texts in order).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlflow
import transformers

from entry_points._common import parse_args, parse_languages
from xlsub import models, tracking
from xlsub.encoding import encode, random_like, save_encodings
from xlsub.errors import XlsubError
from xlsub.parallel import load_parallel

log = logging.getLogger("xlsub.encode")


@dataclass
class EncodeArgs:
    finetune_run_id: str = field(default="latest", metadata={"help": "finetune run ID or 'latest'; with an explicit prune_run_id, 'latest' means that prune run's finetune run"})
    prune_run_id: str = field(default="latest", metadata={"help": "prune run ID (the parent run) or 'latest'"})
    corpus: str = field(default="embedded", metadata={"help": "'embedded' (held-out parallel set), a JSON {lang: [sentences]} file, a JSONL file of {id, <lang>: text} records, or a hub dataset with one column per language"})
    languages: str = field(default="all", metadata={"help": "comma-separated ISO codes; 'all' = the finetune run's languages"})
    max_sentences: int = field(default=2000, metadata={"help": "encode at most this many parallel items"})
    batch_size: int = field(default=64, metadata={"help": "sentences per forward pass"})
    dtype: str = field(default="float32", metadata={"help": "stored precision: float32 or float16"})
    use_base: bool = field(default=False, metadata={"help": "also encode the model before finetuning (model_key 'base')"})
    use_random: bool = field(default=False, metadata={"help": "also encode a randomly initialised model of the same configuration (model_key 'random')"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:N or mps"})


def validate(args: EncodeArgs) -> None:
    for name in ("max_sentences", "batch_size"):
        if getattr(args, name) <= 0:
            raise XlsubError(f"{name}: must be a positive integer, got {getattr(args, name)}")
    if args.dtype not in ("float32", "float16"):
        raise XlsubError(f"dtype: '{args.dtype}' is not float32 or float16")


def resolve_inputs(args: EncodeArgs):
    """The prune run and the finetune run it was made from; refuses a pair from different lineages."""
    prune = tracking.resolve_run("prune_run_id", args.prune_run_id, "prune")
    made_from = prune.data.tags.get(tracking.input_tag("finetune"))
    if args.finetune_run_id == "latest" and args.prune_run_id != "latest":
        finetune = tracking.resolve_run("finetune_run_id", made_from, "finetune")
    else:
        finetune = tracking.resolve_run("finetune_run_id", args.finetune_run_id, "finetune")
    if made_from != finetune.info.run_id:
        raise XlsubError(f"prune_run_id: prune run {prune.info.run_id} was made from finetune run {made_from}, "
                         f"not {finetune.info.run_id}; pass matching runs")
    return finetune, prune


def models_to_encode(args: EncodeArgs, finetune, prune, model_path: Path):
    """(model_key, loader) pairs: full, sub_<lang>[_seed<k>] for every subnetwork, then the controls."""
    from transformers import AutoModelForMaskedLM

    full = lambda: AutoModelForMaskedLM.from_pretrained(model_path)  # noqa: E731
    yield "full", full
    children = mlflow.tracking.MlflowClient().search_runs(
        [prune.info.experiment_id], f"tags.`mlflow.parentRunId` = '{prune.info.run_id}' and tags.`{tracking.CHILD_TAG}` = 'true'")
    seeds = {c.data.tags["xlsub.seed"] for c in children}
    for child in sorted(children, key=lambda c: (c.data.tags["xlsub.language"], int(c.data.tags["xlsub.seed"]))):
        key = f"sub_{child.data.tags['xlsub.language']}" + (f"_seed{child.data.tags['xlsub.seed']}" if len(seeds) > 1 else "")
        yield key, lambda run_id=child.info.run_id: tracking.load_subnetwork(run_id)[0]
    seed = int(float(finetune.data.params["seed"]))
    if args.use_base:
        yield "base", lambda: base_model(finetune, model_path, seed)
    if args.use_random:
        yield "random", lambda: random_like(full(), seed)


def base_model(finetune, model_path: Path, seed: int):
    """The model before finetuning: the pretrained one, or for `tiny` the same seeded initialisation the run started from."""
    name = finetune.data.params["model"]
    if name != models.TINY:
        return models.load_pretrained(name)[0]
    transformers.set_seed(seed)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_path)
    return models.tiny_model(tokenizer, int(float(finetune.data.params["max_seq_len"])))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(EncodeArgs, argv)
    with tracking.stage_run("encode", asdict(args)):
        validate(args)
        device = models.resolve_device(args.device)
        finetune, prune = resolve_inputs(args)
        mlflow.set_tags({tracking.input_tag("finetune"): finetune.info.run_id, tracking.input_tag("prune"): prune.info.run_id})
        langs = parse_languages(args.languages) or finetune.data.tags["xlsub.languages"].split(",")
        corpus = load_parallel(args.corpus, langs, args.max_sentences)
        mlflow.log_metrics({"sentences": len(corpus.ids), "dropped": corpus.dropped})
        tracking.log_parallel(corpus)
        model_path = tracking.download(finetune.info.run_id, "model", param="finetune_run_id")  # once: XLM-R base is ~1 GB
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_path)
        seconds, encoded = 0.0, 0
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            for key, load in models_to_encode(args, finetune, prune, model_path):
                model = load().to(device).eval()
                for lang in corpus.languages:
                    start = time.perf_counter()
                    reps = encode(model, tokenizer, corpus.texts[lang], batch_size=args.batch_size, device=device, progress_desc=f"{key} {lang}")
                    seconds += time.perf_counter() - start
                    encoded += len(corpus.ids)
                    (out / "encodings" / key).mkdir(parents=True, exist_ok=True)
                    save_encodings(reps, out / "encodings" / key / f"{lang}.safetensors", args.dtype)
                log.info("encoded %s: %d sentences x %d languages, %d layers", key, len(corpus.ids), len(corpus.languages), reps.shape[0])
            sentences = {"languages": corpus.languages, "ids": corpus.ids, "texts": corpus.texts, "dropped": corpus.dropped,
                         "corpus": corpus.name, "source": corpus.source}
            (out / "sentences.json").write_text(json.dumps(sentences, ensure_ascii=False))
            mlflow.log_metric("sentences_per_sec", encoded / seconds)
            mlflow.log_artifacts(tmp)


if __name__ == "__main__":
    main()
