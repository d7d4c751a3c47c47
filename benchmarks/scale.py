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
    python benchmarks/scale.py --analyze-study [--fraction 0.2] [--profile out.prof] [--isa avx2]

`--analyze-study` is a measurement, not a projection: `analysis.analyze` at the study's size (8 languages,
5,000 sentences, 13 hidden states of width 768 stored in float16, full model, 8 head subnetworks, base and
random models; masks, trajectories, per-chunk losses and perplexity matrices of the study's shape) with the
analyze stage's default parameters (`entry_points.analyze.AnalyzeArgs`), on seeded synthetic encodings
(`SyntheticEncodings`) written beforehand as the encode stage writes them (float16 safetensors in a temporary
folder, 8.8 GB at the full size; not timed) and read by analyze's own `artifacts.EncodingStore`. It prints the wall time, the peak resident
memory and each section's seconds, and writes them to `benchmarks/results/analyze-study-cpu.json`
(`--fraction` < 1: the same at fraction x 5,000 sentences, written to `analyze-study-cpu-n<n>.json`). It names the
CPU and the instruction-set extensions that choose analyze's kernels (bfloat16 and int8 products above all); `--isa
avx2` on a CPU with AVX-512 runs the same in a process whose libraries are capped at AVX2 (`ISA_CAPS`: an AVX2-only
CPU's code paths on this CPU's cores and memory), written to `analyze-study-cpu-avx2.json`.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import functools
import json
import math
import os
import pstats
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from collections.abc import Mapping
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
                bootstrap=100, permutations=100, resample_seed=0, device="cpu")
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


# -- analyze at the study's size, measured ------------------------------------------------------------------
STUDY_LANGUAGES = ["en", "de", "zh", "ru", "es", "ar", "hi", "ur"]
STUDY_HEADS = (12, 12)  # XLM-R base: layers x heads
STUDY_EVAL_CHUNKS = 3_000  # test chunks per language of the prune run's per-chunk losses
STUDY_RANDOM_DRAWS = 2  # random-mask controls per subnetwork
STUDY_NEURONS = (12, 3_072)  # XLM-R base: layers x FFN neurons
STUDY_TOP_RATE = 0.01  # LAPE's default share of all neurons selected


def sentence_tokens(n: int, languages: list[str], seed: int = 4) -> dict[str, list[list[int]]]:
    """Token ids of n parallel sentences per language: the reference (first) language 6 to 40 tokens, the
    others about as long (x 0.8 to 1.3, +-3), so length confounds the representations as in real text."""
    g = torch.Generator().manual_seed(seed)
    first = torch.randint(6, 41, (n,), generator=g)
    out = {}
    for i, lang in enumerate(languages):
        factor = 1.0 if i == 0 else 0.8 + 0.5 * float(torch.rand(1, generator=g))
        counts = first if i == 0 else (first * factor + torch.randint(-3, 4, (n,), generator=g)).round().clamp(min=3).long()
        out[lang] = [list(range(5, 5 + int(k))) for k in counts]
    return out


class SyntheticEncodings(Mapping):
    """{model key: {language: float32 [layers, n, d]}} generated when asked for, as `artifacts.EncodingStore`
    reads them (the `resident` most recently used cached): a shared sentence signal (kept in float16), a
    sentence-length direction and independent noise, mixed per model (full, subnetworks `de-s0`, base,
    random) and layer, columns scaled by a decaying spectrum (real encodings are anisotropic), rounded
    through float16 (the stored form). Deterministic: (model, language) seeds its noise."""

    def __init__(self, keys: list[str], languages: list[str], n: int, layers: int, d: int, tokens, resident: int = 3):
        self.model_keys, self.languages, self.shape, self.resident = keys, languages, (layers, n, d), resident
        g = torch.Generator().manual_seed(0)
        self.shared = torch.randn(layers, n, d, generator=g).half()
        self.direction = torch.randn(d, generator=g)
        self.spectrum = (torch.arange(d) + 1.0) ** -0.35
        self.lengths = {lang: torch.tensor([len(t) for t in tokens[lang]], dtype=torch.float32) for lang in languages}
        self._cache: OrderedDict = OrderedDict()
        self.loads, self.seconds = 0, 0.0

    def _weights(self, key: str) -> tuple[float, float, float]:
        """(signal, length, noise) weights of a model at the last layer."""
        if key == "random":
            return 0.0, 1.0, 1.0
        if key == "base":
            return 0.5, 0.6, 1.0
        return (1.0, 0.4, 1.0) if key == "full" else (0.9, 0.4, 1.1)  # a subnetwork: the full model, noisier

    def tensor(self, key: str, lang: str) -> torch.Tensor:
        if (key, lang) in self._cache:
            self._cache.move_to_end((key, lang))
            return self._cache[key, lang]
        while len(self._cache) >= self.resident:
            self._cache.popitem(last=False)
        start = time.perf_counter()
        layers, n, d = self.shape
        seed = 1 + self.model_keys.index(key) * len(self.languages) + self.languages.index(lang)
        x = torch.randn(layers, n, d, generator=torch.Generator().manual_seed(seed))
        signal, length, noise = self._weights(key)
        depth = torch.linspace(0.4, 1.0, layers)[:, None, None]  # the shared signal grows with depth
        z = (self.lengths[lang] - self.lengths[lang].mean()) / self.lengths[lang].std()
        x.mul_(noise).add_(self.shared.float().mul_(signal * depth)).add_(length * z[None, :, None] * self.direction)
        x = x.mul_(self.spectrum).half().float()
        self.loads += 1
        self.seconds += time.perf_counter() - start
        self._cache[key, lang] = x
        return x

    def __getitem__(self, key: str) -> Mapping[str, torch.Tensor]:
        if key not in self.model_keys:
            raise KeyError(key)
        return _SyntheticLanguages(self, key)

    def __iter__(self):
        return iter(self.model_keys)

    def __len__(self) -> int:
        return len(self.model_keys)


class _SyntheticLanguages(Mapping):
    def __init__(self, store: SyntheticEncodings, key: str):
        self._store, self._key = store, key

    def __getitem__(self, lang: str) -> torch.Tensor:
        if lang not in self._store.languages:
            raise KeyError(lang)
        return self._store.tensor(self._key, lang)

    def __iter__(self):
        return iter(self._store.languages)

    def __len__(self) -> int:
        return len(self._store.languages)


def study_inputs(n: int, languages: list[str] | None = None, seeds: int = 1, layers: int = 13, d: int = 768,
                 chunks: int = STUDY_EVAL_CHUNKS, heads: tuple[int, int] = STUDY_HEADS, seed: int = 0):
    """`AnalysisInputs` of the study's shape: per language and pruning seed a head mask keeping 80.6% of heads
    (three steps of 10% on its trajectory, the last one past the stop), reliability 0.9, the cross-language
    perplexity matrices of the subnetworks and their random masks, per-chunk losses of the full model, every
    subnetwork and `STUDY_RANDOM_DRAWS` random masks on `chunks` test chunks per language, token ids of n
    parallel sentences and `SyntheticEncodings` of full, every subnetwork, base and random."""
    import pandas as pd

    from xlsub.artifacts import SubnetworkId
    from xlsub.models.mlm import ChunkLosses
    from xlsub.report.analysis import AnalysisInputs

    langs = list(languages or STUDY_LANGUAGES)
    g = torch.Generator().manual_seed(seed)
    sids = [SubnetworkId(lang, s) for lang in langs for s in range(seeds)]
    total = heads[0] * heads[1]
    step = max(1, int(total * 0.1))
    masks, trajectories = {}, {}
    for sid in sids:
        order = torch.randperm(total, generator=g)
        trajectory = []
        for k in range(4):
            mask = torch.ones(total)
            mask[order[:k * step]] = 0
            trajectory.append(mask.reshape(heads))
        trajectories[sid], masks[sid] = trajectory, trajectory[2]
    ppl_full = {lang: float(20 + 10 * i) for i, lang in enumerate(langs)}
    rows = [str(sid) for sid in sids]
    cross = pd.DataFrame([[ppl_full[l] * (1.05 if l == sid.language else 1.2) for l in langs] for sid in sids], index=rows, columns=langs)
    losses = {}
    for i, lang in enumerate(langs):
        tokens = torch.randint(400, 513, (chunks,), generator=g)
        nll = tokens.double() * (math.log(ppl_full[lang]) + 0.2 * torch.randn(chunks, generator=g, dtype=torch.float64))
        losses["full", -1, lang] = ChunkLosses(nll, tokens)
        for sid in sids:
            extra = (0.05 if lang == sid.language else 0.2) + 0.05 * torch.randn(chunks, generator=g, dtype=torch.float64)
            losses[str(sid), -1, lang] = ChunkLosses(nll + extra * tokens.double(), tokens)
            for draw in range(STUDY_RANDOM_DRAWS):
                noise = 0.05 * torch.randn(chunks, generator=g, dtype=torch.float64)
                losses[str(sid), draw, lang] = ChunkLosses(nll + (0.25 + noise) * tokens.double(), tokens)
    neurons = study_neurons(langs, sids, losses, chunks, g) if "neurons" in {f.name for f in dataclasses.fields(AnalysisInputs)} else {}
    tokens = sentence_tokens(n, langs)
    keys = ["full", *rows, "base", "random"]
    encodings = SyntheticEncodings(keys, langs, n, layers, d, tokens)
    names = {f.name for f in dataclasses.fields(AnalysisInputs)}
    if "attention_params" in names:  # one layer's attention parameters, XLM-R base's layout
        from xlsub.stats.overlap import AttentionParams
        shape = {"attention_params": AttentionParams.full_mha(d, d // heads[1], heads[1])}
    else:
        shape = {"hidden_size": d, "head_dim": d // heads[1]}
    return AnalysisInputs(languages=langs, masks=masks, importance_reliability={sid: 0.9 for sid in sids}, cross_ppl=cross,
                          cross_ppl_random=cross * 1.1, ppl_full=ppl_full, encodings=encodings, tokens=tokens,
                          chunk_losses=losses, trajectories=trajectories, **shape, **neurons)


def study_neurons(langs, sids, losses, chunks: int, g: torch.Generator) -> dict:
    """The neurons run of the study's shape, as `{"neurons": NeuronInputs}`: LAPE's 1% of 12 x 3,072 neurons spread
    over the languages (each neuron to one or two of them, more in the bottom and top layers), the split halves'
    masks (each half keeps 70% of the whole's set), eligible neurons (5% per layer plus the selected ones) and
    per-chunk losses of every language's neurons off and its `STUDY_RANDOM_DRAWS` random controls."""
    from xlsub.models.mlm import ChunkLosses
    from xlsub.report.analysis import NeuronInputs

    layers, width = STUDY_NEURONS
    weights = torch.tensor([3.0 if layer in (0, 1, layers - 2, layers - 1) else 1.0 for layer in range(layers)])
    selected = round(STUDY_TOP_RATE * layers * width)
    layer_of = torch.multinomial(weights, selected, replacement=True, generator=g)
    neuron_of = torch.randint(0, width, (selected,), generator=g)
    masks, halves = {}, {}
    for sid in sids:
        mask = torch.ones(layers, width)
        owned = torch.rand(selected, generator=g) < 2 / len(langs)
        mask[layer_of[owned], neuron_of[owned]] = 0
        masks[sid] = mask
        halves[sid] = {half: torch.where((mask == 0) & (torch.rand(layers, width, generator=g) < 0.7), 0.0, 1.0) for half in ("a", "b")}
    eligible = {"0": ((torch.rand(layers, width, generator=g) < 0.05) | (torch.stack(list(masks.values())) == 0).any(0)).int()}
    neuron_losses = {("full", -1, lang): losses["full", -1, lang] for lang in langs}
    for sid in sids:
        for lang in langs:
            full = losses["full", -1, lang]
            extra = (0.08 if lang == sid.language else 0.02) + 0.05 * torch.randn(chunks, generator=g, dtype=torch.float64)
            neuron_losses[str(sid), -1, lang] = ChunkLosses(full.nll + extra * full.tokens.double(), full.tokens)
            for draw in range(STUDY_RANDOM_DRAWS):
                noise = 0.01 * torch.randn(chunks, generator=g, dtype=torch.float64)
                neuron_losses[str(sid), draw, lang] = ChunkLosses(full.nll + noise * full.tokens.double(), full.tokens)
    return {"neurons": NeuronInputs(masks, halves, eligible, neuron_losses)}


def analyze_defaults() -> dict:
    """analyze's options at the analyze stage's defaults (`AnalyzeArgs`, their one declaration); `device` resolved
    as the stage resolves it (`auto`: CUDA where there is one)."""
    from entry_points.analyze import AnalyzeArgs
    from xlsub.devices import resolve_device
    from xlsub.report.similarity_tables import Counts

    a = {f.name: f.default for f in dataclasses.fields(AnalyzeArgs)}
    return {"cka_kind": a["cka"], "layers": None if a["layers"] == "auto" else [int(v) for v in a["layers"].split(",")],
            "cka_precision": a["cka_precision"], "reference": a["reference"], "bootstrap": a["bootstrap"],
            "permutations": a["permutations"], "resample_seed": a["resample_seed"],
            "counts": Counts(a["cka_permutations"], a["cka_permutations"], a["subnetwork_permutations"], a["length_permutations"],
                             a["power_draws"]),
            "device": resolve_device(a["device"], float64=True)}


# analyze's sections and the representation tables inside them, timed by wrapping the module attributes it calls
TIMED = {"xlsub.report.analysis": ["_masks", "_noise_ceiling", "_equal_size", "_intervals", "_perplexity", "_cka", "_similarity",
                                   "_subnetwork_cka", "_tokens", "_language_distance", "_neurons"],
         "xlsub.report.similarity_tables": ["cka_pvalue_table", "cka_interval_tables", "retrieval_table", "retrieval_pvalue_table",
                                            "isomorphism_table", "rsa_table", "power_table", "length_control_table"],
         "xlsub.report.tables": ["cka_reference_tables", "cka_pairs_interval_tables", "cka_subnetwork_tables"]}


def resident_gib() -> float:
    """The process's resident memory now (GiB)."""
    import psutil

    return psutil.Process().memory_info().rss / GiB


def timed_sections(device: str = "cpu") -> tuple[dict[str, float], dict[str, float], dict[str, float], dict[str, float]]:
    """Wrap `TIMED`'s functions so each call adds its seconds to the first returned dict (nested ones count in
    both) and the process's CPU seconds (every thread's) to the fourth (their ratio: the cores a section keeps busy;
    threads spinning while they wait for work count as busy), records in the second the process's peak resident
    memory (GiB) when it first reached its
    maximum in that function: where the peak happens, and in the third the most memory resident when it was
    entered: what the section starts from, held by the sections before it. Each call prints its seconds as it
    ends, so a run stopped by a time limit still shows how far it got; on a CUDA `device` a call's time ends
    when the GPU has finished its work (`torch.cuda.synchronize`)."""
    import importlib

    seconds: dict[str, float] = {}
    peaks: dict[str, float] = {}
    entered: dict[str, float] = {}
    cpu: dict[str, float] = {}
    for module_name, names in TIMED.items():
        module = importlib.import_module(module_name)
        for name in names:
            original = getattr(module, name, None)
            if original is None or hasattr(original, "__wrapped__"):
                continue

            def wrapper(*args, _original=original, _name=name, **kwargs):
                start, start_cpu, before = time.perf_counter(), time.process_time(), peak_rss_gib()
                entered[_name] = round(max(entered.get(_name, 0.0), resident_gib()), 2)
                try:
                    return _original(*args, **kwargs)
                finally:
                    if device.startswith("cuda"):
                        torch.cuda.synchronize(device)
                    spent = time.perf_counter() - start
                    seconds[_name] = seconds.get(_name, 0.0) + spent
                    cpu[_name] = cpu.get(_name, 0.0) + time.process_time() - start_cpu
                    print(f"  ({_name}: {spent:.1f} s)", flush=True)
                    if peak_rss_gib() > before:
                        peaks[_name] = round(peak_rss_gib(), 2)
            setattr(module, name, functools.wraps(original)(wrapper))
    return seconds, peaks, entered, cpu


def transparent_huge_pages() -> str | None:
    """The kernel's transparent huge page mode (always, madvise or never; None where it says none)."""
    try:
        return re.search(r"\[(\w+)\]", Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()).group(1)
    except (OSError, AttributeError):
        return None


# the CPU's instruction-set extensions that choose analyze's kernels (oneDNN's bfloat16 and int8 products, MKL's and
# numba's vector width): a measurement on one CPU says little of another without them
CPU_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


# `--isa avx2`: the settings that cap each library's kernels at AVX2 on a CPU with AVX-512 (oneDNN's products, MKL's,
# torch's own vector loops, numba's compiled code, numpy's dispatched loops; oneDNN's cap also turns off the bfloat16
# products, so retrieval screens in int8): an AVX2-only CPU's code paths on this CPU's cores and memory
ISA_CAPS = {"avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
                     "NUMBA_CPU_NAME": "haswell", "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR"}}
ISA_CAPPED = "XLSUB_BENCHMARK_ISA_CAP"  # set in the process that runs under a cap


def cpu_model(source: Path = Path("/proc/cpuinfo")) -> dict:
    """The CPU's model name and which of `CPU_FEATURES` it has, from `source` (the platform's processor name and no
    features where it cannot be read)."""
    import platform

    try:
        info = source.read_text()
    except OSError:
        return {"name": platform.processor(), "features": []}
    name = re.search(r"^model name\s*:\s*(.+)$", info, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", info, re.M)
    flags = set(flags.group(1).split()) if flags else set()
    return {"name": name.group(1).strip() if name else platform.processor(), "features": [f for f in CPU_FEATURES if f in flags]}


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def retrieval_screen(device: str) -> torch.dtype:
    """The dtype retrieval screens its similarities in on `device` (bfloat16, int8 or float32: `xlsub.similarity.retrieval`)."""
    from xlsub.similarity import retrieval

    return retrieval._screen_dtype(torch.device(device))


def analyze_study(fraction: float = 1.0, seeds: int = 1, profile: str | None = None, out: Path | None = None,
                  device: str | None = None) -> dict:
    """Run `analysis.analyze` at the study's size (x `fraction` sentences); returns and writes its measurement."""
    from entry_points import HUGE_PAGES, use_huge_pages

    use_huge_pages()  # as in the analyze stage's process, before this one's first tensor
    from xlsub import artifacts
    from xlsub.report.analysis import analyze

    n = max(40, round(STUDY["sentences"] * fraction))
    inputs = study_inputs(n, seeds=seeds, layers=STUDY["layers"], d=STUDY["hidden"])
    folder = tempfile.TemporaryDirectory(prefix="xlsub-analyze-study-")
    written = write_store(inputs.encodings, Path(folder.name))
    options = analyze_defaults()
    if device is not None:
        from xlsub.devices import resolve_device

        options["device"] = resolve_device(device, float64=True)
    # read onto analyze's device, as analyze itself would (`artifacts.encodings_on`): the store counted is the one it reads
    inputs = dataclasses.replace(inputs, encodings=artifacts.read_encodings(Path(folder.name) / artifacts.ENCODINGS_DIR, device=options["device"]))
    sections, peaks, entered, cpu = timed_sections(options["device"])
    load_before = load_average()
    profiler = cProfile.Profile() if profile else None
    start = time.perf_counter()
    if profiler:
        profiler.enable()
    result = analyze(inputs, **options)
    cuda = options["device"].startswith("cuda")
    if cuda:
        torch.cuda.synchronize(options["device"])
    if profiler:
        profiler.disable()
        profiler.dump_stats(profile)
    seconds = time.perf_counter() - start
    measured = {
        "n": n, "fraction": fraction, "languages": len(inputs.languages), "layers": STUDY["layers"], "hidden": STUDY["hidden"],
        "models": len(inputs.encodings), "seeds": seeds, "stored": "float16", "counts": dataclasses.asdict(options["counts"]),
        "bootstrap": options["bootstrap"], "permutations": options["permutations"], "cka_kind": options["cka_kind"],
        "device": options["device"], "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "cpu": cpu_model(),
        "retrieval_screen": str(retrieval_screen(options["device"])).removeprefix("torch."),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "isa_cap": {name: os.environ[name] for name in ISA_CAPS.get(os.environ.get(ISA_CAPPED, ""), {})} or None,
        "minutes": seconds / 60, "peak_gib": peak_rss_gib(), "encodings": "float16 safetensors read by artifacts.EncodingStore",
        "synthetic_generation_and_write_seconds": written, "encoding_loads": inputs.encodings.loads, "load_average_before": load_before, "load_average_after": load_average(),
        "sections_seconds": {k: round(v, 2) for k, v in sorted(sections.items(), key=lambda kv: -kv[1])},
        "peak_gib_raised_in": peaks, "resident_gib_on_entry": entered,
        "cores_busy": {k: round(cpu[k] / v, 2) for k, v in sections.items() if v > 0},
        "verdicts": len(result.verdicts), "tables": len(result.tables), "commit": git_commit(),
        "huge_pages": {HUGE_PAGES: os.environ.get(HUGE_PAGES), "kernel": transparent_huge_pages()},
    }
    if cuda:
        measured["gpu"] = torch.cuda.get_device_name(options["device"])
        measured["peak_gpu_gib"] = torch.cuda.max_memory_allocated(options["device"]) / 2**30
    print(f"measured analyze time at study scale: {measured['minutes']:.2f} min"
          + ("" if fraction == 1 else f" (n = {n}, fraction {fraction})"))
    print(f"peak memory: {measured['peak_gib']:.2f} GiB" + (f" (GPU: {measured['peak_gpu_gib']:.2f} GiB on {measured['gpu']})" if cuda else ""))
    print(f"{measured['cpu']['name']} ({', '.join(measured['cpu']['features']) or 'none of ' + ', '.join(CPU_FEATURES)}); "
          f"retrieval screened in {measured['retrieval_screen']}; torch's CPU capability {measured['torch_cpu_capability']}"
          + (f"; capped: {measured['isa_cap']}" if measured["isa_cap"] else ""))
    print(f"{measured['threads']} threads; load average before {load_before}, after {measured['load_average_after']}; "
          f"encodings read {measured['encoding_loads']} times (generated and written beforehand in {written:.0f} s, not counted); "
          f"{HUGE_PAGES}={os.environ.get(HUGE_PAGES)}, transparent huge pages {measured['huge_pages']['kernel']}")
    for name, value in measured["sections_seconds"].items():
        busy = measured["cores_busy"].get(name, math.nan)
        print(f"  {name:28} {value:8.1f} s   {busy:.2f} cores busy, entered at {entered.get(name, math.nan):.2f} GiB"
              + (f", peak raised to {peaks[name]:.2f} GiB" if name in peaks else ""))
    if out is None:
        suffix = ("" if fraction == 1 else f"-n{n}") + (f"-{os.environ[ISA_CAPPED]}" if measured["isa_cap"] else "")
        out = ROOT / "benchmarks/results" / f"analyze-study-{measured['device']}{suffix}.json"
    out.write_text(json.dumps(measured, indent=2) + "\n")
    folder.cleanup()
    if profile:
        pstats.Stats(profile).sort_stats("cumulative").print_stats(40)
    return measured


def write_store(encodings: SyntheticEncodings, folder: Path) -> float:
    """Write every synthetic tensor as the encode stage does (float16 safetensors, `artifacts.write_encodings`, under
    folder/encodings), so analyze reads them through `artifacts.EncodingStore` as in a real run; returns the seconds
    this took."""
    from xlsub import artifacts

    start = time.perf_counter()
    for key in encodings:
        for lang in encodings[key]:
            artifacts.write_encodings(folder, key, lang, encodings[key][lang], "float16")
    return round(time.perf_counter() - start, 1)


def git_commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT, check=False)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, cwd=ROOT, check=False)
    return out.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two sizes per stage (within 5 minutes on 2 cores)")
    parser.add_argument("--analyze-study", action="store_true", help="run analyze at the study's size on synthetic encodings (a measurement)")
    parser.add_argument("--fraction", type=float, default=1.0, help="with --analyze-study: this fraction of the study's 5,000 sentences")
    parser.add_argument("--seeds", type=int, default=1, help="with --analyze-study: pruning seeds per language (the study: 1)")
    parser.add_argument("--profile", help="with --analyze-study: write cProfile statistics here and print the top functions")
    parser.add_argument("--device", help="with --analyze-study: analyze's device (its default if not given)")
    parser.add_argument("--out", type=Path, help="with --analyze-study: write the measurement here instead of benchmarks/results/")
    parser.add_argument("--isa", choices=sorted(ISA_CAPS), help="with --analyze-study on a CPU with AVX-512: run in a process whose "
                        "libraries are capped at this instruction set (`ISA_CAPS`), written to analyze-study-cpu-<isa>.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.isa and os.environ.get(ISA_CAPPED) != args.isa:
        if "avx512f" not in cpu_model()["features"]:
            parser.error(f"--isa {args.isa}: this CPU has no AVX-512, so its libraries already run at most {args.isa}; leave --isa out")
        os.execve(sys.executable, [sys.executable, str(Path(__file__).resolve()), *(sys.argv[1:] if argv is None else argv)],
                  {**os.environ, **ISA_CAPS[args.isa], ISA_CAPPED: args.isa})
    if args.analyze_study:
        analyze_study(args.fraction, args.seeds, args.profile, args.out, args.device)
        return
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
