"""encode: per-layer sentence representations of a parallel corpus, for the full model, every
language subnetwork and optional controls.

    mlflow run . -e encode --env-manager local
    mlflow run . -e encode --env-manager local -P use_base=true -P use_random=true -P dtype=float16

Artifacts: `encodings/<model_key>/<lang>.safetensors` ([layers+1, n, d], row i is the same sentence in
every language; model keys `full`, a subnetwork id such as `de-s0`, `base`, `random`) and
`sentences.json` (ids and texts in order).
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import transformers

from entry_points._common import StageArgs, device_field, parse_args, parse_languages
from entry_points.finetune import FinetuneArgs
from xlsub import artifacts, models, tracking
from xlsub.encoding import POOLINGS, encode, models_to_encode
from xlsub.errors import XlsubError
from xlsub.parallel import load_parallel
from xlsub.pruning import load_subnetwork

log = logging.getLogger("xlsub.encode")


@dataclass
class EncodeArgs(StageArgs):
    finetune_run_id: str = field(default="latest", metadata={"help": "finetune run ID or 'latest'; with an explicit prune_run_id, 'latest' means that prune run's finetune run"})
    prune_run_id: str = field(default="latest", metadata={"help": "prune run ID (the parent run) or 'latest'"})
    corpus: str = field(default="embedded", metadata={"help": "'embedded' (held-out parallel set), a JSON {lang: [sentences]} file, a JSONL file of {id, <lang>: text} records, or a hub dataset with one column per language"})
    languages: str = field(default="all", metadata={"help": "comma-separated ISO codes; 'all' = the finetune run's languages"})
    max_sentences: int = field(default=2000, metadata={"help": "encode at most this many parallel items"})
    batch_size: int = field(default=64, metadata={"help": "sentences per forward pass"})
    dtype: str = field(default="float32", metadata={"help": "stored precision: float32 or float16"})
    use_base: bool = field(default=False, metadata={"help": "also encode the model before finetuning (model_key 'base')"})
    use_random: bool = field(default=False, metadata={"help": "also encode a randomly initialised model of the same configuration (model_key 'random')"})
    pooling: str = field(default="mean", metadata={"help": "mean (every token, <s> and </s> included, as the study pooled) or mean_no_special (special tokens left out of the mean)"})
    subnetwork_seeds: str = field(default="first", metadata={"help": "which pruning seeds' subnetworks to encode: 'first' (each language's smallest seed), 'all', or comma-separated seeds"})
    device: str = device_field()

    def validate(self) -> None:
        self.check_positive("max_sentences", "batch_size")
        self.check_choice("dtype", artifacts.ENCODING_DTYPES)
        self.check_choice("pooling", POOLINGS)
        parse_languages(self.languages)
        self.seed_choice


    @property
    def seed_choice(self) -> str | set[int]:
        """'first', 'all', or the set of seeds named."""
        value = self.subnetwork_seeds.strip().lower()
        if value in ("first", "all"):
            return value
        try:
            return {int(s) for s in value.split(",") if s.strip()}
        except ValueError:
            raise XlsubError(f"subnetwork_seeds: '{self.subnetwork_seeds}' is not first, all or comma-separated seeds, e.g. 0,1") from None


def chosen_subnetworks(children: dict, choice) -> dict:
    """The prune run's subnetworks to encode: every seed, each language's first, or the seeds named."""
    if choice == "all":
        return children
    if choice == "first":
        first = {}
        for sid in sorted(children):
            first.setdefault(sid.language, sid)
        return {sid: children[sid] for sid in first.values()}
    chosen = {sid: run for sid, run in children.items() if sid.seed in choice}
    if not chosen:
        raise XlsubError(f"subnetwork_seeds: the prune run has no subnetwork with seeds {sorted(choice)}; "
                         f"it has {sorted({sid.seed for sid in children})}")
    return chosen


def resolve_inputs(args: EncodeArgs):
    """The prune run and the finetune run it was made from; refuses a pair from different lineages."""
    prune = tracking.resolve_run("prune_run_id", args.prune_run_id, "prune")
    made_from = prune.data.tags.get(artifacts.input_tag("finetune"))
    if args.finetune_run_id.strip() == "latest" and args.prune_run_id.strip() != "latest":
        finetune = tracking.resolve_run("finetune_run_id", made_from, "finetune")
    else:
        finetune = tracking.resolve_run("finetune_run_id", args.finetune_run_id, "finetune")
    if made_from != finetune.info.run_id:
        raise XlsubError(f"prune_run_id: prune run {prune.info.run_id} was made from finetune run {made_from}, "
                         f"not {finetune.info.run_id}; pass matching runs")
    return finetune, prune


def subnetwork_loader(run_id: str):
    """Loads a prune child's subnetwork, checked against its head mask, when called."""
    def load():
        mask = artifacts.read_head_mask(tracking.download(run_id, artifacts.HEAD_MASK, param="prune_run_id"))
        return load_subnetwork(tracking.download(run_id, artifacts.SUBNETWORK_DIR, param="prune_run_id"), mask)[0]
    return load


def main(argv: list[str] | None = None) -> None:
    args = parse_args(EncodeArgs, argv)
    with tracking.stage_run("encode", args):
        device = models.resolve_device(args.device)
        finetune, prune = resolve_inputs(args)
        mlflow.set_tags({artifacts.input_tag("finetune"): finetune.info.run_id, artifacts.input_tag("prune"): prune.info.run_id})
        langs = parse_languages(args.languages) or finetune.data.tags[artifacts.LANGUAGES_TAG].split(",")
        corpus = load_parallel(args.corpus, langs, args.max_sentences)
        mlflow.log_metrics({"sentences": len(corpus.ids), "dropped": corpus.dropped})
        tracking.log_parallel(corpus)
        model_path = tracking.download(finetune.info.run_id, artifacts.MODEL_DIR, param="finetune_run_id")  # once: XLM-R base is ~1 GB
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_path)
        trained_with = FinetuneArgs.from_params(finetune.data.params, "finetune_run_id")
        chosen = chosen_subnetworks(tracking.prune_children(prune), args.seed_choice)
        subnetworks = {sid: subnetwork_loader(child.info.run_id) for sid, child in chosen.items()}
        seconds, encoded = 0.0, 0
        with tempfile.TemporaryDirectory() as tmp:
            for key, load in models_to_encode(model_path, subnetworks, base=trained_with.model if args.use_base else None,
                                              use_random=args.use_random, seed=trained_with.seed, max_seq_len=trained_with.max_seq_len):
                model = load().to(device).eval()
                for lang in corpus.languages:
                    start = time.perf_counter()
                    reps = encode(model, tokenizer, corpus.texts[lang], batch_size=args.batch_size, device=device,
                                  progress_desc=f"{key} {lang}", pooling=args.pooling)
                    seconds += time.perf_counter() - start
                    encoded += len(corpus.ids)
                    artifacts.write_encodings(Path(tmp), key, lang, reps, args.dtype)
                log.info("encoded %s: %d sentences x %d languages, %d layers", key, len(corpus.ids), len(corpus.languages), reps.shape[0])
            artifacts.write_sentences(Path(tmp), corpus)
            mlflow.log_metric("sentences_per_sec", encoded / seconds)
            mlflow.log_artifacts(tmp)


if __name__ == "__main__":
    main()
