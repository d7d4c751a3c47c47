"""finetune: LM training on several languages (masked or next-token, as the model family trains), with
perplexity per language before and after.

    mlflow run . -e finetune --env-manager local -P languages=en,de
    torchrun --nproc_per_node 2 -m entry_points.finetune --device cpu
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import pandas as pd
import transformers

from entry_points._common import COUNT, LANGUAGE, SEED, StageArgs, device_field, is_rank_zero, parse_args, parse_languages
from xlsub import artifacts
from xlsub.data import corpus as corpora
from xlsub.data import lm as data
from xlsub.devices import resolve_device
from xlsub.errors import Range, XlsubError
from xlsub.models import loading as models
from xlsub.models.mlm import is_causal, lm_batches, perplexity
from xlsub.models.training import TrainSettings, compile_unavailable, lm_data_settings, train_masked_lm
from xlsub.report.figures import stages as figures
from xlsub.tracking import gc as cleanup
from xlsub.tracking import runs as tracking

log = logging.getLogger("xlsub.finetune")
CHECKPOINTS = artifacts.LOCAL_CHECKPOINTS  # <run id>/checkpoint-<step>/, where a later run with resume=auto finds them


@dataclass
class FinetuneArgs(StageArgs):
    model: str = field(default="tiny", metadata={"help": f"'tiny' (offline default), 'tiny-base-shape' (XLM-R base's layers, random init), a tiny-<family> preset ({', '.join(models.FAMILY_PRESETS)}: random init, to try a family in seconds), a hub id such as {models.GPU_DEFAULT_MODEL} or Qwen/Qwen2.5-0.5B, or a local folder"})
    corpus: str = field(default="embedded", metadata={"help": "'embedded' (Firefox ESR l10n, offline), a hub dataset id or saved dataset, or a folder of <lang>.txt"})
    languages: str = field(default="all", metadata={"help": "comma-separated ISO codes, each once (DE = de), or 'all' languages of the corpus",
                                                   "items": LANGUAGE, "keywords": ("all",)})
    seed: int = field(default=0, metadata={"help": "seed for initialisation, data order and masking", "range": SEED})
    epochs: float = field(default=4.0, metadata={"help": "training epochs over the shuffled languages", "range": Range(0, low_open=True)})
    batch_size: int = field(default=32, metadata={"help": "sequences per device and step", "range": COUNT})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate (1e-3 for tiny; ~5e-5 for XLM-R base)", "range": Range(0, low_open=True)})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay", "range": Range(0)})
    max_seq_len: int = field(default=64, metadata={"help": "tokens per example, <s> and </s> included", "range": data.MAX_SEQ_LEN})
    examples_per_lang: int = field(default=2000, metadata={"help": "training examples (chunks) per language, at most", "range": COUNT})
    test_examples_per_lang: int = field(default=100, metadata={"help": "test chunks per language for perplexity", "range": COUNT})
    fp16: bool = field(default=False, metadata={"help": "mixed precision fp16 (CUDA)"})
    bf16: bool = field(default=False, metadata={"help": "mixed precision bf16 (recent GPUs/CPUs)"})
    compile: bool = field(default=False, metadata={"help": "compile each transformer layer with torch.compile while training: faster steps after tens of seconds of compiling (the same model up to float rounding)"})
    eval_only: bool = field(default=False, metadata={"help": "evaluate the model without training; logs it as the run's model"})
    resume: str = field(default="auto", metadata={"help": "'auto' (continue a dead run with these parameters from its newest checkpoint), 'never', or a Trainer checkpoint folder",
                                                   "keywords": ("auto", "never")})
    save_steps: int = field(default=250, metadata={"help": "save a checkpoint every this many steps (about a minute of the CPU demo)", "range": COUNT})
    checkpoint_artifacts: bool = field(default=False, metadata={"help": "also log each checkpoint as run artifacts, so that a run on another machine can resume it"})
    keep_checkpoints: bool = field(default=False, metadata={"help": "keep the local checkpoints (outputs/checkpoints/<run id>/) after the run finishes; by default they are deleted then"})
    device: str = device_field()
    log_every: int = field(default=10, metadata={"help": "log the training loss every this many steps", "range": COUNT})

    # how often the loss is logged and checkpoints saved, where training continues from: not what is trained
    NOT_FOR_REUSE = ("log_every", "save_steps", "resume", "checkpoint_artifacts", "keep_checkpoints")

    def check_stage(self) -> None:
        if self.fp16 and self.bf16:
            raise XlsubError("fp16, bf16: choose one mixed-precision mode")
        if self.compile and not self.eval_only and (why := compile_unavailable(resolve_device(self.device))):
            raise XlsubError(f"compile: {why}; install it or pass compile=false")
        if self.resume not in ("auto", "never") and not Path(self.resume).is_dir():
            raise XlsubError(f"resume: '{self.resume}' is not a checkpoint folder; give one, or auto, or never")


def resume_point(args: FinetuneArgs, run, out: Path) -> str | None:
    """The checkpoint training continues from: `resume` as given, or for `auto` the newest checkpoint of a
    dead run (FAILED, KILLED, or RUNNING with a stale heartbeat) with these parameters and this code,
    which this run then supersedes."""
    if args.eval_only or args.resume == "never":
        return None
    if args.resume != "auto":
        return args.resume
    if run is None:  # another rank of a torchrun job: it continues from rank 0's choice (train_masked_lm)
        return None
    found = tracking.find_resume_point(run.info.experiment_id, "finetune", args.reuse_params(), run.info.run_id, CHECKPOINTS, out / "downloaded")
    if found is None:
        return None
    dead, checkpoint = found
    tracking.supersede(dead, run.info.run_id)
    why = dead.info.status if dead.info.status != "RUNNING" else f"RUNNING, but {tracking.dead_because(dead) or 'dead'}"
    log.info("resuming dead run %s (%s) from %s", dead.info.run_id, why, checkpoint)
    return str(checkpoint)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(FinetuneArgs, argv)
    rank_zero = is_rank_zero()
    with tracking.stage_run("finetune", args, log_to_mlflow=rank_zero, system_metrics=True) as run:
        device = resolve_device(args.device)
        transformers.set_seed(args.seed)
        corpus = corpora.load_corpus(args.corpus, parse_languages(args.languages), seed=args.seed)
        langs = corpus.languages
        if models.is_scratch(args.model):
            tokenizer = models.train_tokenizer(batch["text"] for batch in corpus.texts["train"].iter(batch_size=10_000))
            model = models.scratch_model(args.model, tokenizer, args.max_seq_len)
        else:
            model, tokenizer = models.load_pretrained(args.model)
            if args.max_seq_len > models.max_text_len(model):
                raise XlsubError(f"max_seq_len: {args.max_seq_len} exceeds what {args.model} takes ({models.max_text_len(model)})")
        lm = data.build_lm_data(corpus.texts, langs, tokenizer, args.max_seq_len, args.examples_per_lang, args.test_examples_per_lang, args.seed)
        if rank_zero:
            mlflow.log_param("world_size", int(os.environ.get("WORLD_SIZE", "1")))
            mlflow.set_tag(artifacts.LANGUAGES_TAG, ",".join(langs))
            datasets = tracking.log_corpus(corpus, {lang: len(c) for lang, c in lm.train_chunks.items()})
        test_batches = {lang: lm_batches(model, chunks, tokenizer, args.batch_size) for lang, chunks in lm.test.items()}

        table = pd.DataFrame(index=pd.Index(langs, name="lang"))
        if rank_zero:
            model.to(device)
            special = set(tokenizer.all_special_ids)
            table["ppl_unigram"] = [data.unigram_perplexity(lm.train_chunks[l], test_batches[l], len(tokenizer), special, is_causal(model))
                                   for l in langs]
            table["ppl_before"] = [perplexity(model, test_batches[l]) for l in langs]
            log.info("before:\n%s", table.to_string())

        if not args.eval_only:
            settings = TrainSettings(args.epochs, args.batch_size, args.lr, args.weight_decay, args.seed, device, args.fp16, args.bf16,
                                     args.log_every, save_steps=args.save_steps, compile=args.compile)
            out = CHECKPOINTS / (run.info.run_id if run else "rank-other")  # the other ranks of torchrun save into rank 0's
            checkpoint = resume_point(args, run, out)
            if checkpoint and rank_zero and (step := Path(checkpoint).name.rpartition("-")[2]).isdigit():
                mlflow.log_metric("resumed_at_step", int(step))
            callbacks = [tracking.LossLogger()] + ([tracking.CheckpointLogger()] if args.checkpoint_artifacts else [])
            start = time.perf_counter()
            metrics = train_masked_lm(model, tokenizer, lm.train, settings, out, callbacks, checkpoint)
            if rank_zero:
                mlflow.log_metrics({"train_seconds": time.perf_counter() - start, "train_steps": metrics["train_steps"],
                                    "train_steps_per_sec": metrics["train_steps_per_second"]})
        if not rank_zero:
            return

        model.to(device)
        table["ppl_after"] = [perplexity(model, test_batches[l]) for l in langs]
        log.info("after:\n%s", table.to_string())
        # the model also as an MLflow model, logged first so that its perplexities are attached to it and
        # linked to the test split they were measured on (the run's metrics keep no dataset otherwise)
        finetuned = tracking.log_lm(model, tokenizer, artifacts.FINETUNED_MODEL, params={"model": args.model, "corpus": args.corpus},
                                           tags={artifacts.LANGUAGES_TAG: ",".join(langs), artifacts.SEED_TAG: str(args.seed)})
        for lang, row in table.iterrows():
            mlflow.log_metrics({f"ppl_before.{lang}": row.ppl_before, f"ppl_after.{lang}": row.ppl_after, f"ppl_unigram.{lang}": row.ppl_unigram},
                               model_id=finetuned.model_id, dataset=datasets.get("test"))
        with tempfile.TemporaryDirectory() as tmp:
            artifacts.write_table(Path(tmp), artifacts.PERPLEXITY_TABLE, table, subfolder=None)
            artifacts.write_model(Path(tmp), model, tokenizer)
            lm_data = lm_data_settings(args.corpus, args.seed, args.max_seq_len, args.examples_per_lang, args.test_examples_per_lang)
            artifacts.write_manifest(Path(tmp), "finetune", languages=langs, model=args.model, lm_data=lm_data)
            mlflow.log_artifacts(tmp)
        mlflow.log_figure(figures.perplexity_bars(table.reset_index()), artifacts.PERPLEXITY_FIGURE)
        if not args.keep_checkpoints and not args.eval_only:  # the model is logged: they only served a resume
            if freed := cleanup.remove_local_checkpoints(CHECKPOINTS / run.info.run_id):
                log.info("deleted the local checkpoints (%s); keep_checkpoints=true keeps them", cleanup.size_text(freed))


if __name__ == "__main__":
    main()
