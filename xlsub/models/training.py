"""Masked-LM fine-tuning with Hugging Face's Trainer, through xlsub's masked-only loss."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch.distributed as dist
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainerCallback, TrainingArguments

from xlsub.data.lm import mlm_collator
from xlsub.errors import XlsubError
from xlsub.models.families import adapter_for
from xlsub.models.mlm import masked_forward


@dataclass
class TrainSettings:
    epochs: float
    batch_size: int
    lr: float
    weight_decay: float
    seed: int
    device: str  # cpu, cuda, cuda:N, mps
    fp16: bool
    bf16: bool
    log_every: int
    save_steps: int  # a checkpoint every this many steps
    warmup_ratio: float = 0.05
    compile: bool = False  # each transformer layer compiled by torch.compile for the training loop (`compiled_layers`)


def compile_unavailable(device: str) -> str | None:
    """Why `compiled_layers` cannot run on `device` (torch.compile's default backend, inductor, builds C++ on the CPU
    and Triton kernels on a CUDA GPU), or None where it can."""
    import importlib.util
    import shutil

    kind = device.split(":")[0]
    if kind == "cpu" and not any(shutil.which(cxx) for cxx in ("c++", "g++", "clang++")):
        return "torch.compile on the CPU builds C++ and no C++ compiler (c++, g++, clang++) is on PATH"
    if kind == "cuda" and importlib.util.find_spec("triton") is None:
        return "torch.compile on a CUDA GPU needs the triton package, which this environment lacks"
    return None


@contextmanager
def compiled_layers(model: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """Regional compilation: each transformer layer of `model` (its family adapter's `layers`) compiled in place by
    `torch.compile` (`nn.Module.compile`) while the block runs, eager again when it ends.

    The layers of a model share their code and shapes, so one compiled graph serves all of them (torch.compile
    takes the parameters as inputs) and compiling costs one layer's time, not the model's. In place, the
    parameters keep their names: checkpoints, the saved model and DDP see the stock module. The masked-only
    loss around the layers (the scored positions gathered, their count read) stays eager. Random numbers (dropout)
    come from torch's generator as in eager mode (inductor's `fallback_random`), not from kernels of inductor's own,
    so a compiled run draws the eager run's dropout masks and trains the same model up to float rounding. The first
    steps are slower while the graph compiles (tens of seconds; torch caches the result on disk for later runs)."""
    if not enabled:
        yield model
        return
    import torch._inductor.config as inductor

    layers = adapter_for(model).layers(model)
    for layer in layers:
        layer.compile()
    try:
        with inductor.patch(fallback_random=True):
            yield model
    finally:
        for layer in layers:
            layer._compiled_call_impl = None  # what `nn.Module.compile` sets; None is the eager call again

class _BatchSeededCollator:
    """The MLM collator, each batch masked by a generator seeded with the run's seed and the batch's tokens.

    Masks drawn from the global RNG (the collator's default) depend on everything drawn before them, which
    a run resumed mid-epoch cannot replay: the data loader masks the next batch before the current step's
    dropout, across the checkpoint. Seeded by content, the resumed run masks every batch as the interrupted
    run did, and the Trainer's restored RNG state gives it the same dropout.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, seed: int):
        self.collator, self.seed = mlm_collator(tokenizer, seed=seed), seed

    def __call__(self, examples):
        digest = hashlib.sha256(str(self.seed).encode())
        for example in examples:
            digest.update(np.asarray(example["input_ids"], dtype=np.int64).tobytes())
        self.collator.create_rng("pt")
        self.collator.generator.manual_seed(int.from_bytes(digest.digest()[:8], "little"))
        return self.collator(examples)


class CausalCollator:
    """Pads a batch of chunks and labels every real token (labels = input_ids, IGNORE_INDEX where the
    attention mask is 0): the next-token objective. Unlike the stock collator with `mlm=False`, which
    drops every token equal to the pad id from the loss, padding is taken from the attention mask, so
    a tokenizer whose pad token is its EOS (many hub decoders) still learns to end a text."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer

    def __call__(self, examples):
        from xlsub.models.mlm import causal_batch

        return causal_batch([e["input_ids"] for e in examples], self.tokenizer)


def lm_collator(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, seed: int):
    """The training collator of the model's objective: seeded dynamic masking, or `CausalCollator`."""
    from xlsub.models.mlm import is_causal

    return CausalCollator(tokenizer) if is_causal(model) else _BatchSeededCollator(tokenizer, seed)


def train_masked_lm(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train: datasets.Dataset,
    settings: TrainSettings,
    output_dir: Path,
    callbacks: list[TrainerCallback] = (),
    resume_from_checkpoint: str | None = None,
) -> dict[str, float]:
    """Train `model` in place on `train` (column `input_ids`) with dynamic 15% masking, or a causal LM on
    every next token (`lm_collator`); returns Trainer metrics.

    Under `torchrun` the Trainer runs DDP (gloo on CPU, NCCL on GPU). A
    checkpoint every `settings.save_steps` steps (only the newest is kept) lies
    in `output_dir`; `resume_from_checkpoint` continues from one, optimizer,
    scheduler, RNG states and position in the data included. Under torchrun every rank saves into rank
    0's `output_dir` and continues from rank 0's `resume_from_checkpoint` (the one rank that looks for
    dead runs).
    """
    cpu = settings.device == "cpu"
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    args = TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=settings.epochs,
        per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.lr,
        weight_decay=settings.weight_decay,
        warmup_steps=settings.warmup_ratio,
        lr_scheduler_type="linear",
        seed=settings.seed,
        data_seed=settings.seed,
        fp16=settings.fp16,
        bf16=settings.bf16,
        use_cpu=cpu,
        ddp_backend="gloo" if cpu and distributed else None,
        logging_steps=settings.log_every,
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_total_limit=1,
        eval_strategy="no",
        report_to="none",  # xlsub logs into its own run (LossLogger): no second MLflow run
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )
    if distributed:  # every rank saves its RNG state into the checkpoint: one folder for all of them
        _ = args.device  # sets up the process group
        args.output_dir, resume_from_checkpoint = _rank_zero_folders(str(output_dir), resume_from_checkpoint)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train.select_columns(["input_ids"]),
        data_collator=lm_collator(model, tokenizer, settings.seed),
        callbacks=list(callbacks),
    )
    trainer.model_accepts_loss_kwargs = False  # the masked-only loss is already a mean over scored tokens
    with masked_forward(model), compiled_layers(model, settings.compile):
        result = trainer.train(resume_from_checkpoint=resume_from_checkpoint or None)
    return {**result.metrics, "train_steps": trainer.state.global_step}


def _rank_zero_folders(output_dir: str, checkpoint: str | None) -> tuple[str, str | None]:
    """Rank 0's output folder and checkpoint, on every rank (torchrun). Each rank saves and restores its own
    RNG state file in them, so they must lie on storage every rank sees (one node, or a shared file system)."""
    shared = [output_dir, checkpoint]
    dist.broadcast_object_list(shared, src=0)
    output_dir, checkpoint = shared
    if checkpoint is not None and not Path(checkpoint).is_dir():
        raise XlsubError(f"resume: rank {dist.get_rank()} cannot see rank 0's checkpoint {checkpoint}; put outputs/checkpoints "
                         "on storage every node shares, or pass resume=never")
    return output_dir, checkpoint


def load_finetuned(folder: str | Path, lm_data: Mapping, languages: list[str], device: str):
    """The model, tokenizer, LM data and corpus of a finished finetune run, from its `model/` folder and
    the LM-data settings its manifest records (`corpus`, `seed`, `max_seq_len`, `examples_per_lang`,
    `test_examples_per_lang`; `lm_data_settings` builds them).

    The data are chunked exactly as the finetune run chunked them (same corpus, languages, seed and
    sizes), so test perplexities are comparable with its `ppl_after.<lang>`.
    """
    from transformers import AutoTokenizer

    from xlsub.data.corpus import load_corpus
    from xlsub.data.lm import build_lm_data
    from xlsub.models.loading import load_lm

    model = load_lm(folder).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    corpus = load_corpus(lm_data["corpus"], languages, seed=lm_data["seed"])
    lm = build_lm_data(corpus.texts, languages, tokenizer, lm_data["max_seq_len"], lm_data["examples_per_lang"],
                       lm_data["test_examples_per_lang"], lm_data["seed"])
    return model, tokenizer, lm, corpus


def lm_data_settings(corpus: str, seed: int, max_seq_len: int, examples_per_lang: int, test_examples_per_lang: int) -> dict:
    """What a finetune run's manifest records of how its text was chunked, for `load_finetuned`."""
    return {"corpus": corpus, "seed": seed, "max_seq_len": max_seq_len, "examples_per_lang": examples_per_lang,
            "test_examples_per_lang": test_examples_per_lang}
