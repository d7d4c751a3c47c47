"""Each stage's core at XLM-R base's layer shapes, at two or three sizes: wall time and peak resident
memory, the growth exponent fitted to them, and a projection to the study's setting.

The study: XLM-R base (12 layers x 12 heads, hidden 768, 250,002-entry vocabulary), 8 languages,
finetune on 8 x 20,000 chunks of 512 tokens (one epoch, batch 8), prune 8 subnetworks (256 chunks a
step, ~10 steps, then each evaluated with 2 random controls on 8 x 3,000 test chunks), encode 11
models (full, 8 subnetworks, base, random) x 8 languages x 5,000 sentences, analyze all of it.

Every measurement runs in its own process (`--child`), which reports its own peak resident memory, on
`tiny-base-shape` (random init). The rehearsal model's 8k vocabulary leaves out XLM-R's embedding and
tied LM head: its cost is added explicitly (FLOPs of the masked-only LM head over this CPU's measured
matrix-product rate; 192M parameters x 16 bytes of weights, gradients and AdamW moments). analyze runs
on synthetic float16 encodings of the study's width; "load everything" is the same analysis handed every
tensor at once, as before analyze streamed them. GPU columns are projections: CPU time x (this CPU's
measured float32 matrix-product rate / the GPU's, from `benchmarks/results/gpu-*.json`), and the study's work at the stage rates `gpu.sh` measured
on that GPU; both labelled so.

    python benchmarks/scale.py --quick     # within 5 minutes on 2 cores
    python benchmarks/scale.py             # three sizes per stage
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GiB = 2**30
STUDY = dict(languages=8, finetune_steps=8 * 20_000 // 8, seq=512, prune_steps=10, prune_chunks=256,
             eval_chunks=3_000, random_draws=2, sentences=5_000, models=11, layers=13, hidden=768)
VOCAB_EXTRA = 250_002 - 8_000  # XLM-R's vocabulary beyond the rehearsal tokenizer's


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB  # ru_maxrss is in KiB on Linux


def cpu_matmul_tflops(n: int = 1024, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12


# -- the cores, run in a child process ----------------------------------------------------------------
def masked(ids: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    scored = torch.rand(ids.shape, generator=torch.Generator().manual_seed(seed)) < 0.15
    return {"input_ids": torch.where(scored, 4, ids), "attention_mask": torch.ones_like(ids), "labels": torch.where(scored, ids, -100)}


def base_model(seq: int):
    from benchmarks.gpu import build_model, synthetic_tokenizer
    from xlsub.models import loading as models

    tokenizer = synthetic_tokenizer(8000)
    return build_model(models.BASE_SHAPE, tokenizer, seq, None), tokenizer


def child_finetune(seq: int, batch: int = 8, steps: int = 2) -> float:
    """Seconds per training step (masked-only loss, backward, AdamW), after one warm-up step."""
    from xlsub.models.mlm import masked_lm_loss

    model, _ = base_model(seq)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5)
    ids = torch.randint(5, 8000, (batch * (steps + 1), seq), generator=torch.Generator().manual_seed(0))
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        loss, n = masked_lm_loss(model, masked(ids[i * batch:(i + 1) * batch], i))
        (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return min(times[1:])


def child_prune(seq: int, chunks: int = 8, batch: int = 8) -> float:
    """Seconds per chunk of the importance pass each pruning step runs."""
    from xlsub.models.heads import head_importance, mask_shape
    from xlsub.models.mlm import masked_forward

    model, _ = base_model(seq)
    model.eval()
    ids = torch.randint(5, 8000, (chunks, seq), generator=torch.Generator().manual_seed(1))
    batches = [masked(ids[i:i + batch], i) for i in range(0, chunks, batch)]
    mask = torch.ones(mask_shape(model))
    with masked_forward(model):
        head_importance(model, batches[:1], mask)
        start = time.perf_counter()
        head_importance(model, batches, mask)
    return (time.perf_counter() - start) / chunks


def child_encode(sentences: int, batch: int = 64) -> float:
    """Seconds per sentence of `encode` (sentences of 8 to 58 tokens, mean 33)."""
    from xlsub.models.encoding import encode

    model, tokenizer = base_model(128)
    g = torch.Generator().manual_seed(3)
    texts = [" ".join(f"w{w}" for w in torch.randint(0, 7990, (int(n),), generator=g).tolist())
             for n in torch.randint(8, 59, (sentences,), generator=g)]
    encode(model, tokenizer, texts[:8], batch_size=batch, pooling="mean")
    start = time.perf_counter()
    encode(model, tokenizer, texts, batch_size=batch, pooling="mean")
    return (time.perf_counter() - start) / sentences


def synthetic_encodings(folder: Path, n: int, subnetworks: int, languages: list[str], layers: int, d: int) -> None:
    """Float16 encodings (the stored form at base width) of full, base, random and `subnetworks` subnetworks:
    each language a noisy rotation of a shared signal, so the statistics have something to find."""
    from xlsub import artifacts

    g = torch.Generator().manual_seed(0)
    shared = torch.randn(layers, n, d, generator=g)
    keys = ["full", "base", "random", *[f"{languages[i % len(languages)]}-s{i // len(languages)}" for i in range(subnetworks)]]
    for key in keys:
        for lang in languages:
            x = shared + torch.randn(layers, n, d, generator=g)
            artifacts.write_encodings(folder, key, lang, x, "float16")


def child_analyze(n: int, subnetworks: int, eager: bool, languages: int = 4, layers: int = 13, d: int = 768) -> float:
    """Seconds of `analysis.analyze` over synthetic encodings; `eager` hands it every tensor at once."""
    from xlsub import artifacts
    from xlsub.report.analysis import AnalysisInputs, analyze
    from xlsub.report.similarity_tables import Counts

    langs = ["en", "de", "zh", "ru", "es", "ar", "hi", "ur"][:languages]
    with tempfile.TemporaryDirectory() as tmp:
        synthetic_encodings(Path(tmp), n, subnetworks, langs, layers, d)
        store = artifacts.read_encodings(Path(tmp) / artifacts.ENCODINGS_DIR)
        encodings = {key: {lang: store[key][lang].clone() for lang in store[key]} for key in store} if eager else store
        g = torch.Generator().manual_seed(4)
        tokens = {lang: [list(range(int(k))) for k in torch.randint(6, 40, (n,), generator=g)] for lang in langs}
        start = time.perf_counter()
        analyze(AnalysisInputs(languages=langs, encodings=encodings, tokens=tokens), cka_kind="debiased", layers=None,
                cka_precision="float64", reference="en", counts=Counts(full=100, controls=100, subnetworks=20, length=50, power_draws=50),
                bootstrap=100, permutations=100, resample_seed=0)
        return time.perf_counter() - start


CHILDREN = {"finetune": child_finetune, "prune": child_prune, "encode": child_encode, "analyze": child_analyze}


def measure(stage: str, **size) -> dict:
    """Run one core in a fresh process; its seconds and its own peak resident memory."""
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps({"stage": stage, **size})],
                         capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(f"{stage} {size} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def exponent(sizes: list[float], values: list[float]) -> float:
    """Least-squares slope of log(value) on log(size): value ~ size^b."""
    xs, ys = [math.log(s) for s in sizes], [math.log(v) for v in values]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def extrapolate(sizes, values, to: float) -> tuple[float, float]:
    b = exponent(sizes, values)
    return values[-1] * (to / sizes[-1]) ** b, b


def gpu_rates() -> dict[str, dict]:
    rates = {}
    for path in sorted((ROOT / "benchmarks/results").glob("gpu-*.json")):
        result = json.loads(path.read_text())
        rates[result["device"]] = result
    return rates


def gpu_stage_hours(stage: str, result: dict) -> float:
    """The study's time for `stage` at the rates `benchmarks/gpu.sh` measured on a GPU (XLM-R base's shape
    and vocabulary, 512-token chunks): finetune in bf16, prune and encode as the stages run them; analyze
    runs on the CPU."""
    rate = {row["stage"].split()[0] + (" " + row["stage"].split()[1] if row["stage"].startswith("finetune") else ""): row["rate"]
            for row in result["rows"]}
    if stage == "finetune":
        return STUDY["finetune_steps"] / rate["finetune bf16"] / 3600
    if stage == "prune":
        importance = STUDY["languages"] * STUDY["prune_steps"] * STUDY["prune_chunks"]
        evaluation = STUDY["languages"] * (1 + STUDY["random_draws"]) * STUDY["languages"] * STUDY["eval_chunks"] / 3
        return (importance + evaluation) / rate["prune"] / 3600
    if stage == "encode":
        return STUDY["models"] * STUDY["languages"] * STUDY["sentences"] / rate["encode"] / 3600
    return math.nan


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two sizes per stage (within 5 minutes on 2 cores)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        seconds = CHILDREN[spec.pop("stage")](**spec)
        print(json.dumps({"seconds": seconds, "peak_gib": peak_rss_gib()}))
        return

    torch.set_num_threads(torch.get_num_threads())
    cpu_rate = cpu_matmul_tflops()
    seqs = [64, 128] if args.quick else [64, 128, 256]
    sentences = [32, 64] if args.quick else [32, 64, 128]
    ns = [100, 200] if args.quick else [200, 400, 800]
    subs = [1, 5] if args.quick else [1, 5, 9]
    rows = []  # (stage, what, measured sizes, fitted exponent, projection cpu s, peak GiB projected)

    ft = [measure("finetune", seq=s) for s in seqs]
    step, b_ft = extrapolate(seqs, [m["seconds"] for m in ft], STUDY["seq"])
    masked_tokens = 0.15 * 8 * STUDY["seq"]
    vocab_step = 3 * 2 * masked_tokens * STUDY["hidden"] * VOCAB_EXTRA / (cpu_rate * 1e12)  # LM head forward + backward
    ft_mem, b_ftm = extrapolate(seqs, [m["peak_gib"] for m in ft], STUDY["seq"])
    ft_mem += VOCAB_EXTRA * STUDY["hidden"] * 16 / GiB  # weights, gradients, two AdamW moments
    rows.append(("finetune", "s/step (8 x L tokens)", seqs, [m["seconds"] for m in ft], b_ft,
                 STUDY["finetune_steps"] * (step + vocab_step), ft_mem))

    pr = [measure("prune", seq=s) for s in seqs]
    chunk, b_pr = extrapolate(seqs, [m["seconds"] for m in pr], STUDY["seq"])
    importance = STUDY["languages"] * STUDY["prune_steps"] * STUDY["prune_chunks"] * chunk
    # evaluation passes are forward only, about a third of an importance pass (forward + backward)
    evaluation = STUDY["languages"] * (1 + STUDY["random_draws"]) * STUDY["languages"] * STUDY["eval_chunks"] * chunk / 3
    pr_mem, _ = extrapolate(seqs, [m["peak_gib"] for m in pr], STUDY["seq"])
    rows.append(("prune", "s/chunk of importance (L tokens)", seqs, [m["seconds"] for m in pr], b_pr,
                 importance + evaluation, pr_mem + VOCAB_EXTRA * STUDY["hidden"] * 4 / GiB))

    en = [measure("encode", sentences=s) for s in sentences]
    per_sentence = en[-1]["seconds"]
    b_en = exponent(sentences, [m["seconds"] * s for m, s in zip(en, sentences)])
    rows.append(("encode", "s/sentence (n sentences)", sentences, [m["seconds"] for m in en], b_en,
                 STUDY["models"] * STUDY["languages"] * STUDY["sentences"] * per_sentence,
                 max(m["peak_gib"] for m in en) + VOCAB_EXTRA * STUDY["hidden"] * 4 / GiB))

    langs = 3 if args.quick else 4
    an = [measure("analyze", n=n, subnetworks=subs[0], eager=False, languages=langs) for n in ns]
    by_models = [an[0]] + [measure("analyze", n=ns[0], subnetworks=k, eager=False, languages=langs) for k in subs[1:]]
    eager_subs = subs[-1:] if args.quick else subs
    eager = [measure("analyze", n=ns[0], subnetworks=k, eager=True, languages=langs) for k in eager_subs]
    models_measured = [3 + k for k in subs]
    an_time, b_an = extrapolate(ns, [m["seconds"] for m in an], STUDY["sentences"])
    b_models = exponent(models_measured, [m["seconds"] for m in by_models])
    b_mem_models = exponent(models_measured, [m["peak_gib"] for m in by_models])
    # permutation counts are a tenth of analyze's defaults here: x10 bounds the study's time from above
    an_time *= 10 * (STUDY["models"] / models_measured[0]) ** b_models * (STUDY["languages"] / langs) ** 2
    # memory: the part above an empty interpreter grows with n (the n x d tensors, the n x n kernels);
    # the languages held at once (one model's, for the language x language CKA) scale 8/langs
    floor = measure("analyze", n=8, subnetworks=1, eager=False, languages=langs, layers=2, d=8)["peak_gib"]
    above = [m["peak_gib"] - floor for m in an]
    an_mem_above, b_anm = extrapolate(ns, above, STUDY["sentences"])
    an_mem = floor + an_mem_above * STUDY["languages"] / langs
    rows.append(("analyze", f"s (n sentences, {langs} languages, {models_measured[0]} models, counts/10)", ns, [m["seconds"] for m in an], b_an, an_time, an_mem))

    gpus = gpu_rates()
    print(f"CPU: {torch.get_num_threads()} threads, float32 matrix products {cpu_rate * 1e3:.0f} GFLOP/s")
    header = f"{'stage':9} {'measured (CPU, rehearsal shape)':52} {'exp.':>5} {'study, CPU':>11} {'peak GiB':>9}"
    for name in gpus:
        card = name.split()[1]
        header += f" {card + ' from FLOP rate':>20} {card + ' from gpu.sh':>16}"
    print(header)
    for stage, what, sizes, values, b, cpu_s, mem in rows:
        measured = ", ".join(f"{s}: {v:.3g}" for s, v in zip(sizes, values))
        line = f"{stage:9} {what + ' ' + measured:52.52} {b:5.2f} {cpu_s / 3600:9.1f} h {mem:9.2f}"
        for result in gpus.values():
            rate = result["matmul_tflops"]["bfloat16" if stage == "finetune" else "float32"]
            flop = cpu_s * cpu_rate / rate / 3600 if stage != "analyze" else math.nan  # analyze runs on the CPU
            line += f" {flop:18.2f} h {gpu_stage_hours(stage, result):14.2f} h"
        print(line)
    streamed = ", ".join(f"{m['peak_gib']:.2f}" for m in by_models)
    everything_at_once = ", ".join(f"{m['peak_gib']:.2f}" for m in eager)
    print(f"analyze at n={ns[0]}: time vs models exponent {b_models:.2f}; peak memory streamed {streamed} GiB at "
          f"{models_measured} models (exponent {b_mem_models:.2f}); loading everything {everything_at_once} GiB at "
          f"{[3 + k for k in eager_subs]} models")
    everything = STUDY["models"] * STUDY["languages"] * STUDY["layers"] * STUDY["sentences"] * STUDY["hidden"] * 4 / 1e9
    print(f"load-everything baseline at study scale: {everything:.1f} GB of float32 encodings")
    print(f"projected analyze peak memory at study scale: {an_mem:.2f} GiB")


if __name__ == "__main__":
    main()
