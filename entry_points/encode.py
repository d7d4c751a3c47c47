"""encode: per-layer sentence representations of a parallel corpus, for the full model, every
language subnetwork (and, given a neurons run, every language's neuron subnetwork) and optional controls.

    mlflow run . -e encode --env-manager local
    mlflow run . -e encode --env-manager local -P use_base=true -P use_random=true -P dtype=float16
    mlflow run . -e encode --env-manager local -P neurons_run_id=<neurons run ID>
    mlflow run . -e encode --env-manager local -P precision=bf16   # forward passes in bfloat16 (a GPU, or a CPU with AMX)

Artifacts: `encodings/<model_key>/<lang>.safetensors` ([layers+1, n, d], row i is the same sentence in
every language; model keys `full`, a head subnetwork id such as `de-s0`, a neuron subnetwork
`neurons.de-s0` (the finetuned model with the language's neurons switched off, as the neurons stage
evaluated it), `base`, `random`) and `sentences.json` (ids and texts in order).
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import transformers
from mlflow.entities import Run

from entry_points._common import (
    COUNT,
    LANGUAGE,
    SEED,
    StageArgs,
    device_field,
    optional_run_id_field,
    parse_args,
    parse_languages,
    precision_field,
    run_id_field,
    split_items,
)
from xlsub import artifacts
from xlsub.artifacts import SubnetworkId
from xlsub.data.parallel import load_parallel
from xlsub.devices import autocast, resolve_device
from xlsub.errors import XlsubError
from xlsub.models import loading as models
from xlsub.models.encoding import POOLINGS, encode, models_to_encode
from xlsub.models.neurons import zero_neurons
from xlsub.models.pruning import load_subnetwork
from xlsub.tracking import lineage
from xlsub.tracking import runs as tracking

log = logging.getLogger("xlsub.encode")


@dataclass
class EncodeArgs(StageArgs):
    finetune_run_id: str = run_id_field("finetune run ID or 'latest'; with an explicit prune_run_id, 'latest' means that prune run's finetune run")
    prune_run_id: str = run_id_field("prune run ID (the parent run) or 'latest'")
    neurons_run_id: str = optional_run_id_field("neurons run ID whose neuron subnetworks to encode too (model keys neurons.de-s0), "
                                                "'latest' (the newest made from the same finetune run) or 'none'")
    corpus: str = field(default="embedded", metadata={"help": "'embedded' (held-out parallel set), a JSON {lang: [sentences]} file, a JSONL file of {id, <lang>: text} records, or a hub dataset with one column per language"})
    languages: str = field(default="all", metadata={"help": "comma-separated ISO codes, each once; 'all' = the finetune run's languages",
                                                   "items": LANGUAGE, "keywords": ("all",)})
    max_sentences: int = field(default=2000, metadata={"help": "encode at most this many parallel items", "range": COUNT})
    batch_size: int = field(default=64, metadata={"help": "sentences per forward pass", "range": COUNT})
    dtype: str = field(default="auto", metadata={"help": "stored precision: float32, float16 (half the size), or auto: float16 for models wider than the demo's (hidden > 128), where it changes CKA by < 1e-3", "choices": ("auto", *artifacts.ENCODING_DTYPES)})
    use_base: bool = field(default=False, metadata={"help": "also encode the model before finetuning (model_key 'base')"})
    use_random: bool = field(default=False, metadata={"help": "also encode a randomly initialised model of the same configuration (model_key 'random')"})
    pooling: str = field(default="mean_no_special", metadata={"help": "mean_no_special (special tokens left out of the mean: less sentence length in the vectors, measured), mean (every token: an encoder's <s> and </s> included, as the study pooled; a decoder's BOS/EOS left out) or last (the last token's state: for a decoder, the one that has read the whole sentence)",
                                                  "choices": POOLINGS})
    subnetwork_seeds: str = field(default="first", metadata={"help": "which seeds' subnetworks to encode (head subnetworks and neuron subnetworks alike): 'first' (each language's smallest seed), 'all', or comma-separated seeds, each once",
                                                             "items": SEED, "keywords": ("first", "all")})
    precision: str = precision_field("the forward passes")
    device: str = device_field()

    def check_stage(self) -> None:
        autocast(resolve_device(self.device), self.precision)  # refuses a precision the device would emulate

    @property
    def seed_choice(self) -> str | set[int]:
        """'first', 'all', or the set of seeds named."""
        if self.subnetwork_seeds in ("first", "all"):
            return self.subnetwork_seeds
        return set(split_items("subnetwork_seeds", self.subnetwork_seeds, SEED))


def chosen_subnetworks(children: dict, choice, stage: str = "prune") -> dict:
    """The prune (or neurons) run's subnetworks to encode: every seed, each language's first, or the seeds named."""
    if choice == "all":
        return children
    if choice == "first":
        first = {}
        for sid in sorted(children):
            first.setdefault(sid.language, sid)
        return {sid: children[sid] for sid in first.values()}
    chosen = {sid: run for sid, run in children.items() if sid.seed in choice}
    if not chosen:
        raise XlsubError(f"subnetwork_seeds: the {stage} run has no subnetwork with seeds {sorted(choice)}; "
                         f"it has {sorted({sid.seed for sid in children})}")
    return chosen


def check_inputs(finetune: Run, chosen: dict[SubnetworkId, Run], neurons: dict[SubnetworkId, Run] | None = None) -> None:
    """Before any work: the finetuned model, every chosen subnetwork's head mask and model, and every chosen
    neuron set's mask are there."""
    tracking.require_artifacts("finetune_run_id", finetune, artifacts.model_files(artifacts.MODEL_DIR))
    for child in chosen.values():
        tracking.require_artifacts("prune_run_id", child, [artifacts.HEAD_MASK, *artifacts.model_files(artifacts.SUBNETWORK_DIR)])
    for child in (neurons or {}).values():
        tracking.require_artifacts("neurons_run_id", child, [artifacts.NEURON_MASK])


def subnetwork_loader(run_id: str):
    """Loads a prune child's subnetwork, checked against its head mask, when called."""
    def load():
        mask = artifacts.read_head_mask(tracking.download(run_id, artifacts.HEAD_MASK, param="prune_run_id"))
        return load_subnetwork(tracking.download(run_id, artifacts.SUBNETWORK_DIR, param="prune_run_id"), mask)[0]
    return load


def neurons_loader(model_folder: Path, run_id: str):
    """Loads the finetuned model with a neurons child's neurons switched off (its mask's down-projection
    inputs zeroed: what the neurons stage evaluated), when called."""
    def load():
        mask = artifacts.read_head_mask(tracking.download(run_id, artifacts.NEURON_MASK, param="neurons_run_id"))
        return zero_neurons(models.load_lm(model_folder), mask, copy=False)
    return load


def main(argv: list[str] | None = None) -> None:
    args = parse_args(EncodeArgs, argv)
    with tracking.stage_run("encode", args, system_metrics=True):
        device = resolve_device(args.device)
        runs = lineage.resolve_inputs("encode", args.params())
        lineage.tag_inputs(runs)
        finetune, prune = runs["finetune"], runs["prune"]
        chosen = chosen_subnetworks(lineage.subnetworks(prune), args.seed_choice)
        neuron_sets = chosen_subnetworks(lineage.subnetworks(runs["neurons"], "neurons_run_id"), args.seed_choice, "neurons") if "neurons" in runs else {}
        check_inputs(finetune, chosen, neuron_sets)
        trained = lineage.manifest(finetune, "finetune_run_id")
        langs = parse_languages(args.languages) or trained["languages"]
        corpus = load_parallel(args.corpus, langs, args.max_sentences)
        mlflow.log_metrics({"sentences": len(corpus.ids), "dropped": corpus.dropped})
        tracking.log_parallel(corpus)
        model_path = tracking.download(finetune.info.run_id, artifacts.MODEL_DIR, param="finetune_run_id")  # once: XLM-R base is ~1 GB
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_path)
        dtype = artifacts.storage_dtype(args.dtype, transformers.AutoConfig.from_pretrained(model_path).hidden_size)
        mlflow.log_param("stored_dtype", dtype)
        subnetworks = {sid: subnetwork_loader(child.info.run_id) for sid, child in chosen.items()}
        neuron_subnetworks = {sid: neurons_loader(model_path, child.info.run_id) for sid, child in neuron_sets.items()}
        seconds, encoded, keys = 0.0, 0, []
        with tempfile.TemporaryDirectory() as tmp:
            for key, load in models_to_encode(model_path, subnetworks, neurons=neuron_subnetworks, base=trained["model"] if args.use_base else None,
                                              use_random=args.use_random, seed=trained["lm_data"]["seed"],
                                              max_seq_len=trained["lm_data"]["max_seq_len"]):
                model = load().to(device).eval()
                keys.append(key)
                for lang in corpus.languages:
                    start = time.perf_counter()
                    reps = encode(model, tokenizer, corpus.texts[lang], batch_size=args.batch_size, device=device,
                                  progress_desc=f"{key} {lang}", pooling=args.pooling, precision=args.precision)
                    seconds += time.perf_counter() - start
                    encoded += len(corpus.ids)
                    artifacts.write_encodings(Path(tmp), key, lang, reps, dtype)
                log.info("encoded %s: %d sentences x %d languages, %d layers", key, len(corpus.ids), len(corpus.languages), reps.shape[0])
            artifacts.write_sentences(Path(tmp), corpus)
            artifacts.write_manifest(Path(tmp), "encode", languages=corpus.languages, model_keys=keys)
            mlflow.log_metric("sentences_per_sec", encoded / seconds)
            mlflow.log_artifacts(tmp)


if __name__ == "__main__":
    main()
