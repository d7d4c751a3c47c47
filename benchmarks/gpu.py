"""The GPU paths of finetune, prune and encode at XLM-R base's size, on one GPU.

Each stage's core runs as the stage runs it, on a randomly initialised model
with XLM-R base's layers and its 250,002-entry vocabulary (`tiny-base-shape`
priced at XLM-R's embedding), on random token ids: the speed of these kernels
does not depend on the weights or the text.

- finetune: `train_masked_lm` (Hugging Face Trainer, xlsub's masked-only loss, its default fused AdamW and
  SDPA attention) in fp32, fp16 and bf16 mixed precision, at the study's 8 x 512 tokens a step; then bf16 with
  the layers compiled (finetune's `compile`, `xlsub.models.training.compiled_layers`) at 8 x 512 and at
  `--large_batch` x 512 (32: a larger batch is a different recipe, finetune's `batch_size`);
- prune: one importance pass (`head_importance`: gradients to the head gates
  only) over 8 x 512-token chunks, the unit an iterative pruning step costs, in fp32 and in bf16 (prune's
  `precision`: torch.autocast);
- encode: `encode` (every layer, mean-pooled) of sentences of 10 to 60 tokens, in fp32 and in bf16 (encode's `precision`).

A decoder row does the same at Qwen2.5-0.5B's shape (24 layers, 14 query and 2 key/value heads, hidden
896, its 151,936-entry tied vocabulary; random init, bf16 training, 512 tokens): the causal-LM path of
every stage. Every row gives its model FLOPs utilisation (MFU): the FLOPs of what the stage computes over the
measured matrix-product rate of its precision (`model_flops_per_token`). Training: 6 FLOPs per parameter and
token for the layers, plus the LM head's 6 x hidden x vocabulary at the positions it scores (the masked 15% of
an MLM's, every position of a causal LM's), plus attention's 12 x layers x tokens x hidden. The importance pass
computes no weight gradient: 4 per parameter and token, 4 x hidden x vocabulary at the scored positions, and
attention's 12 (its backward is all activation gradients). encode: a forward pass without the LM head, 2 per
parameter and 4 x layers x tokens x hidden for attention, for each sentence's real tokens (not padding).

Prints steps/s, chunks/s, sentences/s and peak GPU memory per stage, each row as it is measured (and rewrites
`--json` after each), the rows the GPU goals name first; without
CUDA it says so and exits 0. `--smoke` runs the same code with the tiny shape
and a few steps (on CPU too), so the script is tested where there is no GPU.

    bash benchmarks/gpu.sh              # or: python benchmarks/gpu.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xlsub.devices import autocast, native_16bit_products  # noqa: E402
from xlsub.models import loading as models  # noqa: E402

SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")


def synthetic_tokenizer(vocab: int):
    """An XLM-R-style Unigram tokenizer over made-up pieces `w0 .. wN` (XLM-R's special ids 0..4)."""
    from transformers import XLMRobertaTokenizer

    return XLMRobertaTokenizer(vocab=[(t, 0.0) for t in SPECIALS] + [(f"▁w{i}", -1.0) for i in range(vocab - len(SPECIALS))])


def build_model(shape: str, tokenizer, max_seq_len: int, vocab_size: int, seed: int = 0):
    torch.manual_seed(seed)
    return models.scratch_model(shape, tokenizer, max_seq_len, vocab_size=vocab_size)


# Qwen/Qwen2.5-0.5B's configuration (its config.json), random init
QWEN25_05B = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864,
                  vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768, rope_theta=1000000.0)


def decoder_model(cfg, tokenizer):
    """The decoder row's model: Qwen2.5-0.5B's shape, or with `--smoke` the tiny-qwen2 preset."""
    import transformers

    torch.manual_seed(0)
    if cfg.smoke:
        return models.scratch_model("tiny-qwen2", tokenizer, cfg.seq)
    config = transformers.Qwen2Config(**QWEN25_05B, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                      eos_token_id=tokenizer.eos_token_id)
    return transformers.Qwen2ForCausalLM(config)


def model_for(cfg, tokenizer, decoder: bool):
    return decoder_model(cfg, tokenizer) if decoder else build_model(cfg.shape, tokenizer, cfg.seq, cfg.vocab)


# FLOPs per parameter and token (weights and LM head) and attention's factor of layers x seq x hidden, per pass kind:
# training (forward, input and weight gradients), the importance pass (forward and input gradients: the weights are
# frozen), encode (forward only)
PASSES = {"train": (6, 12), "gates": (4, 12), "forward": (2, 4)}


def model_flops_per_token(model, seq: int, scored_share: float, kind: str = "train") -> float:
    """FLOPs per token of a pass of `kind` (`PASSES`) over sequences of `seq` tokens: the factor x the layers'
    parameters (embeddings and LM head left out), the same factor x hidden x vocabulary for the LM head at the share
    of positions it scores (0: no head), and attention's factor x layers x seq x hidden (scores and their use)."""
    from xlsub.models.mlm import lm_head_of

    weights, attention = PASSES[kind]
    config = model.config
    embedding = model.get_input_embeddings().weight
    head = lm_head_of(model)
    head_params = {id(p) for p in head.parameters()}
    layers = sum(p.numel() for p in model.parameters() if p is not embedding and id(p) not in head_params)
    hidden, vocab = config.hidden_size, embedding.shape[0]
    return weights * layers + weights * hidden * vocab * scored_share + attention * config.num_hidden_layers * seq * hidden


def train_flops_per_token(model, seq: int, scored_share: float) -> float:
    """Training FLOPs per token (`model_flops_per_token` of kind "train")."""
    return model_flops_per_token(model, seq, scored_share, "train")


def mfu(flops_per_second: float, rates: dict, precision: str) -> float:
    """Model FLOPs utilisation: the achieved FLOP rate over the measured matrix-product rate of `precision` (NaN
    where that rate was not measured)."""
    peak = rates.get({"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[precision], math.nan)
    return flops_per_second / (peak * 1e12)


def random_chunks(n: int, length: int, low: int, high: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[0, *torch.randint(low, high, (length - 2,), generator=g).tolist(), 2] for _ in range(n)]


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def finetune(cfg, device: torch.device, precision: str, rates: dict, decoder: bool = False, compile: bool = False,
             batch: int | None = None) -> dict:
    """Steps/s of the Trainer loop after `cfg.warmup` steps (compiling, where `compile`, happens in them), peak memory and
    model FLOPs utilisation, at `batch` sequences a step (`cfg.batch`, the study's, if None)."""
    import datasets
    from transformers import TrainerCallback

    from xlsub.models.training import TrainSettings, train_masked_lm

    class StepClock(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.optim = str(args.optim.value if hasattr(args.optim, "value") else args.optim)

        def on_step_end(self, args, state, control, **kwargs):
            sync(device)
            self.times.append(time.perf_counter())

    tokenizer = synthetic_tokenizer(cfg.tokens)
    model = model_for(cfg, tokenizer, decoder)
    flops = train_flops_per_token(model, cfg.seq, 1.0 if decoder else 0.15)
    batch = batch or cfg.batch
    steps = cfg.warmup + cfg.steps
    chunks = random_chunks(steps * batch, cfg.seq, len(SPECIALS), cfg.tokens, seed=1)
    train = datasets.Dataset.from_dict({"input_ids": chunks})
    settings = TrainSettings(epochs=1, batch_size=batch, lr=5e-5, weight_decay=0.01, seed=0, device=str(device),
                             fp16=precision == "fp16", bf16=precision == "bf16", log_every=10**6, save_steps=10**6, compile=compile)
    clock = StepClock()
    reset_peak(device)
    with tempfile.TemporaryDirectory() as out:
        train_masked_lm(model, tokenizer, train, settings, Path(out), [clock])
    timed = clock.times[cfg.warmup - 1:]
    seconds = timed[-1] - timed[0]
    n = len(timed) - 1
    tokens_per_s = n * batch * cfg.seq / seconds
    return {"stage": f"finetune {precision}{' compiled' if compile else ''}{' (decoder)' if decoder else ''}", "unit": "steps/s",
            "rate": n / seconds, "tokens_per_s": tokens_per_s, "peak_gib": peak_gib(device), "flops_per_token": flops,
            "precision": precision, "mfu": mfu(tokens_per_s * flops, rates, precision), "batch": batch, "compiled": compile,
            "optim": clock.optim, "attention": getattr(model.config, "_attn_implementation", None),
            "setting": f"{batch} x {cfg.seq} tokens a step, {n} steps timed"}


def prune(cfg, device: torch.device, rates: dict, decoder: bool = False, precision: str = "fp32") -> dict:
    """Chunks/s of the importance pass that each pruning step runs (gradients to the gates only); a causal
    LM scores every next token (no masking)."""
    from xlsub.models.heads import head_importance, mask_shape
    from xlsub.models.mlm import masked_forward

    tokenizer = synthetic_tokenizer(cfg.tokens)
    model = model_for(cfg, tokenizer, decoder).to(device).eval()
    g = torch.Generator().manual_seed(2)
    ids = torch.tensor(random_chunks(cfg.chunks, cfg.seq, len(SPECIALS), cfg.tokens, seed=2))
    scored = torch.rand(ids.shape, generator=g) < 0.15
    batches = [{"input_ids": torch.where(scored, 4, ids)[i:i + cfg.batch].to(device),
                "attention_mask": torch.ones_like(ids[i:i + cfg.batch]).to(device),
                "labels": torch.where(scored, ids, -100)[i:i + cfg.batch].to(device)}
               for i in range(0, cfg.chunks, cfg.batch)]
    if decoder:  # every next token, no masking
        batches = [{"input_ids": ids[i:i + cfg.batch].to(device), "attention_mask": torch.ones_like(ids[i:i + cfg.batch]).to(device)}
                   for i in range(0, cfg.chunks, cfg.batch)]
    mask = torch.ones(mask_shape(model))
    with masked_forward(model), autocast(str(device), precision):  # prune's `precision`
        head_importance(model, batches[:1], mask)  # warm-up: kernels, allocator
        reset_peak(device)
        sync(device)
        start = time.perf_counter()
        head_importance(model, batches, mask)
        sync(device)
    seconds = time.perf_counter() - start
    flops = model_flops_per_token(model, cfg.seq, 1.0 if decoder else 0.15, "gates")
    tokens_per_s = cfg.chunks * cfg.seq / seconds
    return {"stage": f"prune (importance pass, {precision}){' (decoder)' if decoder else ''}", "unit": "chunks/s", "rate": cfg.chunks / seconds,
            "tokens_per_s": tokens_per_s, "peak_gib": peak_gib(device), "flops_per_token": flops, "precision": precision,
            "mfu": mfu(tokens_per_s * flops, rates, precision), "setting": f"{cfg.chunks} chunks of {cfg.seq} tokens, batch {cfg.batch}"}


def encode_stage(cfg, device: torch.device, rates: dict, decoder: bool = False, precision: str = "fp32") -> dict:
    """Sentences/s of `encode` (all layers, mean-pooled, forward passes in `precision`) over sentences of 10 to 60 tokens."""
    from xlsub.models.encoding import encode

    tokenizer = synthetic_tokenizer(cfg.tokens)
    model = model_for(cfg, tokenizer, decoder).to(device)
    g = torch.Generator().manual_seed(3)
    lengths = torch.randint(8, 59, (cfg.sentences,), generator=g)
    words = torch.randint(0, cfg.tokens - len(SPECIALS), (int(lengths.sum()),), generator=g).tolist()
    sentences, at = [], 0
    for n in lengths.tolist():
        sentences.append(" ".join(f"w{w}" for w in words[at:at + n]))
        at += n
    encode(model, tokenizer, sentences[:cfg.encode_batch], batch_size=cfg.encode_batch, device=device, pooling="mean", precision=precision)  # warm-up
    reset_peak(device)
    sync(device)
    start = time.perf_counter()
    encode(model, tokenizer, sentences, batch_size=cfg.encode_batch, device=device, pooling="mean", precision=precision)
    sync(device)
    seconds = time.perf_counter() - start
    counts = [len(ids) for ids in tokenizer(sentences)["input_ids"]]  # each sentence's real tokens, specials included
    flops = sum(count * model_flops_per_token(model, count, 0.0, "forward") for count in counts)
    return {"stage": f"encode ({precision}){' (decoder)' if decoder else ''}", "unit": "sentences/s", "rate": cfg.sentences / seconds,
            "tokens_per_s": sum(counts) / seconds, "peak_gib": peak_gib(device), "flops_per_token": flops / sum(counts),
            "precision": precision, "mfu": mfu(flops / seconds, rates, precision), "setting": f"{cfg.sentences} sentences, batch {cfg.encode_batch}"}


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 10) -> float:
    """Measured dense matrix-product rate, the FLOP rate `benchmarks/scale.py` projects GPU times from."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N (or cpu with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="tiny shape, a few steps: checks the code, measures nothing")
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    parser.add_argument("--large_batch", type=int, default=32, help="sequences a step of the larger-batch compiled finetune row")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: benchmarks/gpu.sh measures nothing on this machine")
        return
    cfg = argparse.Namespace(shape=models.BASE_SHAPE, vocab=models.XLMR_VOCAB_SIZE, tokens=8000, seq=512, batch=8,
                             warmup=5, steps=40, chunks=64, sentences=2000, encode_batch=64, smoke=False, large_batch=None)
    if args.smoke:
        cfg = argparse.Namespace(shape=models.TINY, vocab=None, tokens=500, seq=32, batch=4,
                                 warmup=2, steps=3, chunks=8, sentences=40, encode_batch=16, smoke=True, large_batch=8)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}; torch {torch.__version__}; model: {cfg.shape}, vocabulary {cfg.vocab or cfg.tokens}")
    n = 256 if args.smoke else 8192
    rates = {str(dtype).removeprefix("torch."): matmul_tflops(device, dtype, n)
             for dtype in ([torch.float32, torch.float16, torch.bfloat16] if device.type == "cuda" else [torch.float32, torch.bfloat16])}
    print("matrix product TFLOP/s at n=%d: %s" % (n, ", ".join(f"{k} {v:.3g}" for k, v in rates.items())), flush=True)
    fastest = "bf16" if device.type == "cuda" else "fp32"
    bf16 = device.type == "cuda" or native_16bit_products(torch.bfloat16)  # prune refuses bf16 on a CPU that would emulate it
    # the measurements first, so that a run cut off by a time limit has them: finetune at the fastest precision,
    # then with its layers compiled at the study's batch and a larger one (smoke: twice the study's), the importance pass
    # and encode in fp32 and bf16, the decoder's three; the other training precisions last
    plan = [lambda: finetune(cfg, device, fastest, rates)]
    plan += [lambda batch=batch: finetune(cfg, device, fastest, rates, compile=True, batch=batch)
             for batch in (cfg.batch, cfg.large_batch or args.large_batch)]
    plan += [lambda: prune(cfg, device, rates)] + ([lambda: prune(cfg, device, rates, precision="bf16")] if bf16 else [])
    plan += [lambda: encode_stage(cfg, device, rates)] + ([lambda: encode_stage(cfg, device, rates, precision="bf16")] if bf16 else [])
    plan += [lambda: finetune(cfg, device, fastest, rates, decoder=True),
             lambda: prune(cfg, device, rates, decoder=True), lambda: encode_stage(cfg, device, rates, decoder=True)]
    plan += [lambda precision=precision: finetune(cfg, device, precision, rates)
             for precision in (["fp32", "fp16"] if device.type == "cuda" else [])]
    print(f"{'stage':42} {'rate':>10} {'unit':12} {'tokens/s':>10} {'peak GiB':>9} {'MFU':>6}  setting", flush=True)
    rows = []
    for measure in plan:  # each row printed, and the file rewritten, as it is measured
        rows.append(r := measure())
        mfu = f"{r['mfu']:6.1%}" if math.isfinite(r.get("mfu", math.nan)) else " " * 6
        print(f"{r['stage']:42} {r['rate']:10.2f} {r['unit']:12} {r['tokens_per_s']:10.0f} {r['peak_gib']:9.2f} {mfu}  {r['setting']}", flush=True)
        if args.json:
            args.json.write_text(json.dumps({"device": name, "torch": torch.__version__, "matmul_tflops": rates, "rows": rows}, indent=1))

if __name__ == "__main__":
    main()
