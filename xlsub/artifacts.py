"""The contract between the stages: run tags, artifact paths, subnetwork ids, and one writer and one
reader for every artifact a stage hands to another.

Writers put files into a local folder that the stage then logs as the run's artifacts (same relative
paths); readers take the folder (or file) that `xlsub.tracking.runs.download` returns. Nothing here talks to
MLflow, so the formats are testable with plain files. The README describes the same layout in prose; this
module is where the names are defined.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from xlsub.errors import XlsubError

# -- tags -------------------------------------------------------------------------------------------------
STAGE_TAG = "xlsub.stage"  # finetune | prune | encode | analyze | main
ERROR_TAG = "xlsub.error"  # the one line a user saw for bad input
CODE_TAG = "xlsub.code_version"  # package version + digest of the stage's own source, for reuse
CHILD_TAG = "xlsub.child"  # "true" on the per-subnetwork runs nested in a prune run; never a stage's input
LANGUAGES_TAG = "xlsub.languages"  # on finetune runs: the languages trained, comma-separated
LANGUAGE_TAG = "xlsub.language"  # on prune child runs: the language the subnetwork is for
SEED_TAG = "xlsub.seed"  # on prune child runs: the pruning seed
SUBNETWORK_TAG = "xlsub.subnetwork"  # on prune child runs: the SubnetworkId, e.g. de-s0
SOURCE_MODEL_TAG = "xlsub.source_model_id"  # on subnetwork logged models: the finetune run's logged model, if any
MASK_DIGEST_TAG = "xlsub.mask_sha256"  # on subnetwork logged models: `mask_digest` of the head mask
REUSED_TAG = "xlsub.reused"  # on main runs: the reused stages, comma-separated in stage order, or "none"
SOURCE_TAG_PREFIX = "xlsub.source."  # on finetune runs: the corpus' provenance (package versions, ...)
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own tag on nested runs
GIT_COMMIT_TAG = "mlflow.source.git.commit"  # MLflow's own tag: the commit `mlflow run` ran
RESUMED_FROM_TAG = "xlsub.resumed_from"  # on finetune runs: the dead run whose checkpoint this run resumed from
SUPERSEDED_BY_TAG = "xlsub.superseded_by"  # on that dead run: the run that resumed from it
HEARTBEAT_TAG = "xlsub.heartbeat"  # on every stage's run: unix time of the last sign of life, renewed about every 30 s
HEARTBEAT_HOST_TAG = "xlsub.heartbeat.host"  # beside it: the host the run's process runs on,
HEARTBEAT_BOOT_TAG = "xlsub.heartbeat.boot"  # that host's boot id (/proc/sys/kernel/random/boot_id),
HEARTBEAT_PID_TAG = "xlsub.heartbeat.pid"  # and the process's PID: on the same host and boot, a PID gone is a dead run
CLAIM_TAG = "xlsub.claim"  # on main runs: `<stage>:<digest of parameters and code>` of the stage it is about to run
CLAIM_TIME_TAG = "xlsub.claim_time"  # beside it: unix time of the claim; the earlier claim (then the smaller run ID) computes
GC_TAG = "xlsub.gc"  # on runs `python -m xlsub.tracking.gc` marked FAILED: why
CHECKPOINT_TAG = "xlsub.checkpoint"  # on finetune runs with checkpoint_artifacts: the newest checkpoint logged in full
# on logged models: the status of the run that made them (for a subnetwork, its prune run's): RUNNING while it
# runs, then FINISHED, FAILED or KILLED; a model whose run died without ending keeps RUNNING
RUN_STATUS_TAG = "xlsub.run_status"
NOTE_TAG = "mlflow.note.content"  # MLflow's own tag: the run's description (markdown), shown on its page
VERDICT_METRIC_PREFIX = "verdict."  # analyze runs, copied onto main runs: verdict.<key>.value, .lo, .hi, .p, ...


def input_tag(stage: str) -> str:
    """The tag naming the run of `stage` that a run used as input, e.g. `xlsub.finetune_run_id`."""
    return f"xlsub.{stage}_run_id"


def reused_stage_tag(stage: str) -> str:
    """On main runs: the finished run reused for `stage`, e.g. `xlsub.reused.prune`."""
    return f"{REUSED_TAG}.{stage}"


# -- artifact paths (inside a run) -----------------------------------------------------------------------
MODEL_DIR = "model"  # finetune: save_pretrained folder, tokenizer included
FINETUNED_MODEL = "finetuned"  # finetune: the MLflow (transformers flavor) logged model's name
CHECKPOINTS_DIR = "checkpoints"  # finetune with checkpoint_artifacts: checkpoints/checkpoint-<step>/, the Trainer's folders
LOCAL_CHECKPOINTS = Path("outputs/checkpoints")  # finetune, on the machine it trains on: <run id>/checkpoint-<step>/ (not an artifact)
PERPLEXITY_TABLE = "perplexity"  # finetune: perplexity.csv, one row per lang: ppl_unigram, ppl_before, ppl_after
PERPLEXITY_FIGURE = "perplexity.png"
HEAD_MASK = "head_mask.json"  # prune child: [layers][heads] of 0/1
HEAD_IMPORTANCE = "head_importance.json"  # prune child: [layers][heads] of floats
HEAD_MASK_FIGURE = "head_mask.png"
STEPS = "steps.json"  # prune child: one row per pruning step, with its mask (an MLflow table)
RANDOM_MASKS = "random_masks.json"  # prune child: the random-mask control draws, a list of [layers][heads] 0/1
CHUNK_LOSSES = "chunk_losses"  # prune parent: chunk_losses.csv, per test chunk NLL and tokens of every model
VERDICTS = "verdicts.json"  # analyze: the answers, one object per question
# the neurons stage (feed-forward neurons as the unit; `entry_points/neurons.py`)
NEURON_MASK = "neuron_mask.json"  # neurons child: [layers][neurons] of 0/1, 1 = kept, 0 = switched off (the language's neurons)
NEURON_MASK_HALVES = "neuron_mask_halves.json"  # neurons child: {"a": mask, "b": mask} selected from two disjoint halves of its text
NEURON_RANDOM_MASKS = "neuron_random_masks.json"  # neurons child: the random-neuron control draws, a list of masks
ACTIVATION_PROBABILITY = "activation_probability.safetensors"  # neurons child: {"p": [layers, neurons]} share of real tokens with activation > 0
NEURON_ELIGIBLE = "neuron_eligible.json"  # neurons parent: {seed: [layers][neurons] 0/1}, neurons LAPE could select (p above a language's filter quantile)
NEURON_PPL = "neuron_ppl"  # neurons parent: language's neurons switched off x evaluation language (.csv, _relative.csv, .png)
NEURON_PPL_RANDOM = "neuron_ppl_random"  # neurons parent: the random-neuron control of the same (mean over draws)
NEURON_CHUNK_LOSSES = "neuron_chunk_losses"  # neurons parent: per test chunk NLL and tokens of full, each neuron set (draw -1) and its draws
NEURONS_OFF = "neurons_off"  # neurons child metric: how many neurons its mask switches off
IMPORTANCE_RELIABILITY = "importance_reliability"  # prune child metric: Spearman-Brown split-half reliability of importance
# prune child metrics: the chosen subnetwork's perplexity on the pruning data and fraction of heads off (those of
# its logged model), and the same along the pruning path, per step (`steps.json` holds the path too)
SUBNETWORK_PPL = "ppl"
SUBNETWORK_FRAC_PRUNED = "frac_pruned"
PATH_PPL = f"path.{SUBNETWORK_PPL}"
PATH_FRAC_PRUNED = f"path.{SUBNETWORK_FRAC_PRUNED}"
MANIFEST = "manifest.json"  # every pipeline stage: what it made, read by the stages after it (`write_manifest`)
SUBNETWORK_DIR = "subnetwork"  # prune child: the physically pruned model, tokenizer included
PPL_FULL = "ppl_full.json"  # prune parent: {"full": {lang: ppl}}
CROSS_PPL = "cross_ppl"  # prune parent: subnetwork x evaluation language (.csv, _relative.csv, .png)
CROSS_PPL_RANDOM = "cross_ppl_random"  # prune parent: the random-mask control of the same
CROSS_PPL_TABLE = "cross_ppl.json"  # prune parent: the matrix as an MLflow table
ENCODINGS_DIR = "encodings"  # encode: encodings/<model key>/<lang>.safetensors
SENTENCES = "sentences.json"  # encode: languages, ids and texts in encoding order
FIGURES_DIR = "figures"  # analyze
TABLES_DIR = "tables"  # analyze: tables/<table id>.csv and tables/<table id>.json (long form)
REPORT = "report.html"  # analyze
LANGUAGE_DISTANCE = "language_distance"  # analyze: table and figure id, Mantel r of URIEL distances vs the matrices
LANGUAGE_DISTANCE_URIEL = "language_distance_uriel"  # analyze: table id, the URIEL distances (distance, language) x language
MODEL_TOKENIZER_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")  # enough to tokenize
MODEL_FILES = ("config.json", "model.safetensors")  # what a saved model needs (save_pretrained writes one weights file up to 50 GB)
KEPT_HEADS_CONFIG_KEY = "xlsub_kept_heads"  # in a pruned model's config.json: kept head indices per layer

# on registered model versions (`xlsub.tracking.runs.register_subnetworks`), besides SEED_TAG, SUBNETWORK_TAG, MASK_DIGEST_TAG;
# threshold and target_sparsity also on subnetwork logged models, with input_tag("prune"), input_tag("main") and RUN_STATUS_TAG
REGISTERED_THRESHOLD_TAG = "threshold"  # the prune run's threshold parameter
REGISTERED_TARGET_SPARSITY_TAG = "target_sparsity"  # the prune run's target_sparsity parameter
REGISTERED_SOURCE_RUN_TAG = "source_run_id"  # the prune child run that logged the model

# encoding keys besides the subnetworks'
FULL_MODEL = "full"
BASE_MODEL = "base"
RANDOM_MODEL = "random"
NEURONS_KEY_PREFIX = "neurons."  # a neuron subnetwork's encoding key: `neurons.de-s0` (a '.' no language code or subnetwork id has)


# -- subnetwork ids ---------------------------------------------------------------------------------------
_SUBNETWORK_ID = re.compile(r"^(?P<language>[A-Za-z][A-Za-z0-9_]*(?:-[A-Za-z0-9_]+)*?)-s(?P<seed>\d+)$")
_LANGUAGE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*(?:-[A-Za-z0-9_]+)*$")


@dataclass(frozen=True, order=True)
class SubnetworkId:
    """One language's subnetwork from one pruning seed, written `de-s0` everywhere: run names
    (`prune/de-s0`), table rows, encoding keys and model names (MLflow model names refuse `/ : . %`)."""

    language: str
    seed: int

    def __post_init__(self):
        if not isinstance(self.language, str) or not _LANGUAGE.match(self.language):
            raise XlsubError(f"languages: '{self.language}' is not a language code (letters, digits, '-' or '_')")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise XlsubError(f"seeds: {self.seed!r} is not a non-negative integer seed")

    def __str__(self) -> str:
        return f"{self.language}-s{self.seed}"

    @property
    def run_name(self) -> str:
        """The prune child run's name, e.g. `prune/de-s0`."""
        return f"prune/{self}"

    @property
    def model_name(self) -> str:
        """The prune child's MLflow logged model (stock form), e.g. `subnetwork-de-s0`."""
        return f"subnetwork-{self}"

    @property
    def neurons_model_name(self) -> str:
        """The neurons child's MLflow logged model (stock form, its neurons switched off), e.g. `neurons-de-s0`."""
        return f"neurons-{self}"

    @property
    def neurons_key(self) -> str:
        """The encoding key (and table row) of the language's neuron subnetwork, e.g. `neurons.de-s0`; the head
        subnetwork's is its id, `de-s0`."""
        return f"{NEURONS_KEY_PREFIX}{self}"

    @classmethod
    def parse(cls, text: str) -> SubnetworkId:
        """`de-s0` -> SubnetworkId("de", 0); refuses anything else."""
        match = _SUBNETWORK_ID.match(str(text))
        if match is None:
            raise XlsubError(f"subnetwork: '{text}' is not a subnetwork id such as de-s0 (<language>-s<seed>)")
        return cls(match.group("language"), int(match.group("seed")))

    @classmethod
    def parse_or_none(cls, text: str) -> SubnetworkId | None:
        """The id that `text` spells, or None for anything else (`full`, `base`, `random`)."""
        try:
            return cls.parse(text)
        except XlsubError:
            return None


def subnetwork_key(key: str) -> tuple[str, SubnetworkId] | None:
    """What an encoding key names: ("heads", id) for a head subnetwork (`de-s0`), ("neurons", id) for a
    neuron subnetwork (`neurons.de-s0`), None for the full model and the controls."""
    key = str(key)
    if key.startswith(NEURONS_KEY_PREFIX):
        sid = SubnetworkId.parse_or_none(key.removeprefix(NEURONS_KEY_PREFIX))
        return ("neurons", sid) if sid is not None else None
    sid = SubnetworkId.parse_or_none(key)
    return ("heads", sid) if sid is not None else None


def is_language_code(text: str) -> bool:
    """Letters, digits, '-' or '_', starting with a letter: `de`, `zh-cn`."""
    return bool(_LANGUAGE.match(text))


def group_by_language(items: Mapping[SubnetworkId, object], languages: Sequence[str] = ()) -> dict[str, dict[int, object]]:
    """{SubnetworkId: x} -> {language: {seed: x}}: languages in `languages` order (others after them, in
    first-seen order), seeds ascending."""
    grouped: dict[str, dict[int, object]] = {}
    for sid, value in items.items():
        grouped.setdefault(sid.language, {})[sid.seed] = value
    order = [l for l in languages if l in grouped] + [l for l in grouped if l not in languages]
    return {lang: dict(sorted(grouped[lang].items())) for lang in order}


def ordered(present, languages: Sequence[str]) -> list[str]:
    """The languages of `present` in `languages` order, any others after them in their own order."""
    present = list(present)
    return [l for l in languages if l in present] + [l for l in present if l not in languages]


def subnetwork_ids(items: Mapping[SubnetworkId, object], languages: Sequence[str] = ()) -> list[SubnetworkId]:
    """The ids of a {SubnetworkId: x} mapping in table order: languages in `languages` order, seeds ascending."""
    return [SubnetworkId(lang, seed) for lang, seeds in group_by_language(items, languages).items() for seed in seeds]


# -- head masks -------------------------------------------------------------------------------------------
def check_mask(mask: torch.Tensor, name: str = "head mask") -> torch.Tensor:
    """A head mask is a [layers, heads] tensor of 0/1; returns it as float."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise XlsubError(f"{name}: expected a [layers, heads] tensor, got {getattr(mask, 'shape', type(mask).__name__)}")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise XlsubError(f"{name}: entries must be 0 or 1")
    return mask.float()


def kept_heads(mask: torch.Tensor) -> list[list[int]]:
    """The kept head indices of each layer (always a list, also for one head or none)."""
    mask = check_mask(mask)
    return [[h for h in range(mask.shape[1]) if mask[layer, h] != 0] for layer in range(mask.shape[0])]


def mask_from_kept_heads(kept: Sequence[Sequence[int]], heads: int) -> torch.Tensor:
    """The inverse of `kept_heads` for a model with `heads` heads per layer."""
    mask = torch.zeros(len(kept), heads)
    for layer, indices in enumerate(kept):
        if any(not 0 <= int(h) < heads for h in indices):
            raise XlsubError(f"{KEPT_HEADS_CONFIG_KEY}: layer {layer} names heads {list(indices)} outside 0..{heads - 1}")
        mask[layer, [int(h) for h in indices]] = 1
    return mask


def head_mask_text(mask: torch.Tensor) -> str:
    """The content of `head_mask.json`."""
    return json.dumps(check_mask(mask).int().tolist())


def mask_digest(mask: torch.Tensor) -> str:
    """sha256 (hex) of `head_mask.json`'s content: `sha256sum head_mask.json` gives the same."""
    return hashlib.sha256(head_mask_text(mask).encode()).hexdigest()


def write_head_mask(folder: Path, mask: torch.Tensor) -> Path:
    path = Path(folder) / HEAD_MASK
    path.write_text(head_mask_text(mask))
    return path


def read_head_mask(path: Path) -> torch.Tensor:
    try:
        return check_mask(torch.tensor(json.loads(Path(path).read_text()), dtype=torch.float32), HEAD_MASK)
    except (ValueError, TypeError, RuntimeError) as err:
        raise XlsubError(f"{HEAD_MASK}: {path} is not a [layers][heads] list of 0/1 ({err}); rerun prune") from None


def write_importance(folder: Path, importance: torch.Tensor) -> Path:
    path = Path(folder) / HEAD_IMPORTANCE
    path.write_text(json.dumps(importance.double().tolist()))
    return path


def steps_table(steps: Iterable, kept: int | None = None) -> pd.DataFrame:
    """The pruning trajectory, one row per step (`xlsub.models.pruning.Step`): step, ppl, frac_pruned, heads_kept,
    chosen (the step that is the subnetwork) and mask (its [layers][heads] 0/1 list)."""
    return pd.DataFrame([{"step": s.step, "ppl": s.ppl, "frac_pruned": s.frac_pruned, "heads_kept": int(s.mask.sum()),
                          "chosen": s.step == kept, "mask": check_mask(s.mask).int().tolist()} for s in steps])


def read_steps(path: Path) -> pd.DataFrame:
    """What `mlflow.log_table` wrote for `steps_table` (pandas' split orientation)."""
    data = json.loads(Path(path).read_text())
    return pd.DataFrame(data["data"], columns=data["columns"])


def step_masks(steps: pd.DataFrame) -> list[torch.Tensor]:
    """The masks of a `read_steps` table, in step order: a subnetwork's pruning trajectory."""
    return [check_mask(torch.tensor(m, dtype=torch.float32), STEPS) for m in steps.sort_values("step")["mask"]]


def write_random_masks(folder: Path, masks: Sequence[torch.Tensor]) -> Path:
    path = Path(folder) / RANDOM_MASKS
    path.write_text(json.dumps([check_mask(m).int().tolist() for m in masks]))
    return path


def chunk_losses_table(losses: Mapping[tuple[str, int, str], object]) -> pd.DataFrame:
    """Long table of per-chunk losses: {(model, control draw, language): ChunkLosses} -> rows model
    (`full` or a subnetwork id), draw (-1 for the model itself, k for its k-th random-mask control),
    language, chunk, nll, tokens."""
    frames = [pd.DataFrame({"model": model, "draw": draw, "language": lang, "chunk": range(len(c.nll)),
                            "nll": c.nll.double().numpy(), "tokens": c.tokens.numpy()})
              for (model, draw, lang), c in losses.items()]
    return pd.concat(frames, ignore_index=True)


def read_chunk_losses(path: Path) -> dict[tuple[str, int, str], tuple[torch.Tensor, torch.Tensor]]:
    """The inverse of `chunk_losses_table` from its CSV: {(model, draw, language): (nll, tokens)}, the
    fields of `xlsub.models.mlm.ChunkLosses`."""
    table = pd.read_csv(path, keep_default_na=False)
    out = {}
    for (model, draw, lang), group in table.groupby(["model", "draw", "language"], sort=False):
        group = group.sort_values("chunk")
        out[(str(model), int(draw), str(lang))] = (torch.tensor(group["nll"].to_numpy(), dtype=torch.float64),
                                                   torch.tensor(group["tokens"].to_numpy(), dtype=torch.long))
    return out


def write_verdicts(folder: Path, verdicts: Iterable) -> Path:
    """`verdicts.json`: a list of {question, answer, value, lo, hi, control, control_value, p}."""
    path = Path(folder) / VERDICTS
    path.write_text(json.dumps([v.as_dict() for v in verdicts], indent=1, ensure_ascii=False))
    return path


# -- manifests: what a stage made, for the stages after it ----------------------------------------------------
# A later stage reads these, never the upstream run's parameters or module. The keys each stage records:
MANIFEST_KEYS = {
    "finetune": ("languages", "model", "lm_data"),  # lm_data: corpus, seed, max_seq_len, examples_per_lang, test_examples_per_lang
    "prune": ("languages", "subnetworks"),  # subnetworks: SubnetworkIds as text, in run order
    "encode": ("languages", "model_keys"),  # model_keys: `full`, subnetwork ids, neuron subnetworks (`neurons.de-s0`), `base`, `random`, as encoded
    "analyze": ("languages", "tables"),  # tables: the table ids written under tables/
    "neurons": ("languages", "subnetworks", "method"),  # subnetworks: language-seed ids in run order; method: lape or importance
}


def write_manifest(folder: Path, stage: str, **made) -> Path:
    """`manifest.json`: {"stage": stage, **made}, with exactly the keys `MANIFEST_KEYS` names for the stage."""
    if set(made) != set(MANIFEST_KEYS[stage]):
        raise ValueError(f"{stage} manifest: keys {sorted(made)} are not {sorted(MANIFEST_KEYS[stage])}")
    path = Path(folder) / MANIFEST
    path.write_text(json.dumps({"stage": stage, **made}, indent=1, ensure_ascii=False))
    return path


def read_manifest(path: Path, stage: str, param: str = "run") -> dict:
    """What `write_manifest` wrote for `stage`; refuses another stage's or an incomplete one."""
    try:
        made = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise XlsubError(f"{param}: {MANIFEST} of the {stage} run does not read as JSON ({err}); rerun {stage}") from None
    missing = [key for key in ("stage", *MANIFEST_KEYS[stage]) if key not in made]
    if made.get("stage") != stage or missing:
        raise XlsubError(f"{param}: {MANIFEST} is not from a run of stage {stage} (it says {made.get('stage')}"
                         f"{', and lacks ' + ', '.join(missing) if missing else ''}); rerun {stage}")
    return made


# -- models -----------------------------------------------------------------------------------------------
def model_files(subdir: str = MODEL_DIR) -> list[str]:
    """The artifact paths a saved model needs in its run: `model/config.json`, `model/model.safetensors`."""
    return [f"{subdir}/{name}" for name in MODEL_FILES]


def write_model(folder: Path, model, tokenizer, subdir: str = MODEL_DIR) -> Path:
    """`model/` (finetune) or `subnetwork/` (prune child): `save_pretrained` of the model, whose config
    records the kept heads of a pruned one (`xlsub.models.pruning.prune_heads`), and of its tokenizer."""
    path = Path(folder) / subdir
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# -- encodings --------------------------------------------------------------------------------------------
ENCODINGS_KEY = "encodings"  # the tensor's name inside each safetensors file
LAST_LAYER = "last"  # an `EncodingStore` cache key's third part: the last hidden state, read alone
ENCODING_DTYPES = {"float32": torch.float32, "float16": torch.float16}


# `dtype=auto` stores models wider than the demo's (hidden 128) in float16: half the size, and at XLM-R
# base's width a CKA change below 1e-3 (measured in tests/test_encoding_store.py)
FLOAT16_ABOVE_HIDDEN = 128


def storage_dtype(choice: str, hidden_size: int) -> str:
    """The precision `encode` stores: `choice`, or for `auto` float16 above the demo's width, else float32."""
    if choice != "auto":
        return choice
    return "float16" if hidden_size > FLOAT16_ABOVE_HIDDEN else "float32"


def encoding_path(model_key: str, language: str) -> str:
    """`encodings/<model key>/<lang>.safetensors`; model keys are `full`, a SubnetworkId, `base`, `random`."""
    return f"{ENCODINGS_DIR}/{model_key}/{language}.safetensors"


def write_encodings(folder: Path, model_key: str, language: str, encodings: torch.Tensor, dtype: str) -> Path:
    path = Path(folder) / encoding_path(model_key, language)
    save_encodings(encodings, path, dtype)
    return path


def read_encodings(root: Path, resident: int = 3, device: torch.device | str = "cpu") -> EncodingStore:
    """{model key: {language: [layers+1, n, d]}} from a downloaded `encodings/` folder, read lazily
    (`EncodingStore`) onto `device`: analyze's memory then does not grow with the number of models."""
    return EncodingStore(root, resident, device)


def encodings_on(encodings: Mapping[str, Mapping[str, torch.Tensor]], device: torch.device | str) -> Mapping[str, Mapping[str, torch.Tensor]]:
    """`encodings` ({model key: {language: tensor}}) with every tensor read onto `device`: an `EncodingStore`
    reads its files there (and caches them there); another mapping's tensors are moved one at a time when
    asked for (never all at once). On the CPU, `encodings` itself."""
    device = torch.device(device)
    if isinstance(encodings, EncodingStore):
        return encodings if encodings.device == device else EncodingStore(encodings.root, encodings.resident, device)
    return encodings if device.type == "cpu" else _MovedModels(encodings, device)


class EncodingStore(Mapping):
    """{model key: {language: float32 [layers+1, n, d]}} over an `encodings/` folder, read on demand.

    Only the file names are listed up front. A tensor is read when asked for; the `resident` most
    recently used stay cached (the reference language, the language compared with it and the full
    model beside a subnetwork), older ones are dropped. With the study's 11 models x 8 languages of
    5,000 x 768 x 13 layers (17.6 GB in float32) analyze thus holds a few hundred MB of encodings,
    whatever the number of models, as long as callers do not keep the tensors they are given.
    `live_bytes`/`peak_live_bytes` count the bytes of loaded tensors still referenced anywhere (cache
    or caller), to check that.
    """

    def __init__(self, root: str | Path, resident: int = 3, device: torch.device | str = "cpu"):
        self.root = Path(root)
        self.resident = resident
        self.device = torch.device(device)
        self._files = {key.name: {p.stem: p for p in sorted(key.glob("*.safetensors"))}
                       for key in sorted(self.root.iterdir()) if key.is_dir()} if self.root.is_dir() else {}
        self._cache: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
        self._derived: dict[tuple, torch.Tensor] = {}
        self.loads = 0
        self.live_bytes = 0
        self.peak_live_bytes = 0

    def __getitem__(self, model_key: str) -> Mapping[str, torch.Tensor]:
        return _StoredLanguages(self, model_key, self._files[model_key])

    def __iter__(self):
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)

    def path(self, model_key: str, language: str) -> Path:
        return self._files[model_key][language]

    def tensor(self, model_key: str, language: str) -> torch.Tensor:
        """The whole [layers+1, n, d] tensor of a model and language."""
        return self._cached((model_key, language), lambda: load_encodings(self._files[model_key][language]))

    def last_layer(self, model_key: str, language: str) -> torch.Tensor:
        """The last hidden state [n, d] alone: copied from the whole tensor where that is cached (a view would keep
        the whole alive), else read from the file by itself (at the study's size 15 MB in float32, not 200 MB) and
        cached in its own right. The tables of the last layer then neither read whole files nor keep them resident
        (`last_layer`)."""
        if (model_key, language) in self._cache:
            return self.tensor(model_key, language)[-1].clone()
        return self._cached((model_key, language, LAST_LAYER), lambda: load_encodings(self._files[model_key][language], layer=-1))

    def layers(self, model_key: str, language: str) -> int:
        """The number of hidden states (layers + 1) in a model and language's file, from its header."""
        if (model_key, language) in self._cache:
            return self._cache[model_key, language].shape[0]
        return encodings_shape(self._files[model_key][language])[0]

    def derived(self, key: tuple, compute: Callable[[], torch.Tensor] | None) -> torch.Tensor | None:
        """A small statistic of the stored encodings (a model and language's CKA self terms per layer: `key` names
        it), computed at its first request and kept while the store lives, so that the tables reading the same
        encodings share it instead of each recomputing it from a fresh read. compute=None: the kept one, or None."""
        if key not in self._derived and compute is not None:
            self._derived[key] = compute()
        return self._derived.get(key)

    def _cached(self, key: tuple, load) -> torch.Tensor:
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        while len(self._cache) >= max(self.resident, 1):
            self._cache.popitem(last=False)
        tensor = load().to(self.device)
        self.loads += 1
        size = tensor.numel() * tensor.element_size()
        self.live_bytes += size
        self.peak_live_bytes = max(self.peak_live_bytes, self.live_bytes)
        weakref.finalize(tensor, self._released, size)
        self._cache[key] = tensor
        return tensor

    def _released(self, size: int) -> None:
        self.live_bytes -= size


class _StoredLanguages(Mapping):
    """One model key's {language: tensor} of an `EncodingStore`, each read when asked for."""

    def __init__(self, store: EncodingStore, model_key: str, files: Mapping[str, Path]):
        self._store, self._key, self._files = store, model_key, files

    def __getitem__(self, language: str) -> torch.Tensor:
        if language not in self._files:
            raise KeyError(language)
        return self._store.tensor(self._key, language)

    def __contains__(self, language) -> bool:  # from the file names: Mapping's own would read the tensor
        return language in self._files

    def __iter__(self):
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


class _MovedModels(Mapping):
    """`encodings_on` of a mapping other than an `EncodingStore`: {model key: `_MovedLanguages`}."""

    def __init__(self, encodings: Mapping[str, Mapping[str, torch.Tensor]], device: torch.device):
        self._encodings, self._device = encodings, device

    def __getitem__(self, model_key: str) -> Mapping[str, torch.Tensor]:
        return _MovedLanguages(self._encodings[model_key], self._device)

    def __iter__(self):
        return iter(self._encodings)

    def __len__(self) -> int:
        return len(self._encodings)


class _MovedLanguages(Mapping):
    """One model key's {language: tensor}, each moved to the device when asked for."""

    def __init__(self, languages: Mapping[str, torch.Tensor], device: torch.device):
        self._languages, self._device = languages, device

    def __getitem__(self, language: str) -> torch.Tensor:
        return self._languages[language].to(self._device)

    def __contains__(self, language) -> bool:
        return language in self._languages

    def __iter__(self):
        return iter(self._languages)

    def __len__(self) -> int:
        return len(self._languages)


def last_layer(reps: Mapping[str, torch.Tensor], language: str) -> torch.Tensor:
    """The last hidden state [n, d] of `reps[language]` ([layers+1, n, d]), one model's languages: read alone where
    they come from an `EncodingStore` (`EncodingStore.last_layer`), else indexed."""
    if isinstance(reps, _StoredLanguages):
        if language not in reps:
            raise KeyError(language)
        return reps._store.last_layer(reps._key, language)
    if isinstance(reps, _MovedLanguages):
        return last_layer(reps._languages, language).to(reps._device)
    return reps[language][-1]


def derived(reps: Mapping[str, torch.Tensor], language: str, name: tuple,
            compute: Callable[[], torch.Tensor] | None) -> torch.Tensor | None:
    """`compute()`, a small statistic of `reps[language]` (one model's languages) that `name` identifies: kept by the
    `EncodingStore` they come from (`EncodingStore.derived`) for every later table that asks, computed each time for
    tensors held in memory. compute=None: the statistic where a store keeps it, else None."""
    if isinstance(reps, _StoredLanguages):
        return reps._store.derived((reps._key, language, *name), compute)
    if isinstance(reps, _MovedLanguages):
        return derived(reps._languages, language, name, compute)
    return None if compute is None else compute()


def layer_count(reps: Mapping[str, torch.Tensor], language: str) -> int:
    """The number of hidden states of `reps[language]`, without reading an `EncodingStore`'s tensor."""
    if isinstance(reps, _StoredLanguages):
        if language not in reps:
            raise KeyError(language)
        return reps._store.layers(reps._key, language)
    if isinstance(reps, _MovedLanguages):
        return layer_count(reps._languages, language)
    return reps[language].shape[0]


def save_encodings(encodings: torch.Tensor, path: str | Path, dtype: str = "float32") -> None:
    """Write a ``[layers+1, n, d]`` tensor to a safetensors file (key ``encodings``) as float32 or float16."""
    if dtype not in ENCODING_DTYPES:
        raise XlsubError(f"dtype: {dtype!r} is not one of {', '.join(ENCODING_DTYPES)}; use float32 (exact) or float16 (half the size)")
    if encodings.dim() != 3:
        raise ValueError(f"encodings must be [layers+1, n, d], got shape {tuple(encodings.shape)}")
    tensor = encodings.detach().to(device="cpu", dtype=ENCODING_DTYPES[dtype]).contiguous()
    if dtype == "float16" and not bool(torch.isfinite(tensor).all()) and bool(torch.isfinite(encodings).all()):
        raise XlsubError(
            f"dtype: values up to {float(encodings.abs().max()):.3g} overflow float16 (max 65504); use float32"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({ENCODINGS_KEY: tensor}, str(path), metadata={"layout": "[layers+1, n, d]", "dtype": dtype})


def load_encodings(path: str | Path, layer: int | None = None) -> torch.Tensor:
    """Read what ``save_encodings`` wrote: a float32 ``[layers+1, n, d]`` tensor, or its hidden state `layer`
    alone ([n, d]; negative counts from the last), read from the file without the others."""
    with _encodings_file(path) as (handle, path):
        if layer is None:
            return handle.get_tensor(ENCODINGS_KEY).float()
        stored = handle.get_slice(ENCODINGS_KEY)
        count = stored.get_shape()[0]
        if not -count <= layer < count:
            raise XlsubError(f"encodings: {path} has {count} hidden states, no layer {layer}; give one of 0..{count - 1}")
        return stored[layer % count:layer % count + 1][0].float()


def encodings_shape(path: str | Path) -> list[int]:
    """The shape [layers+1, n, d] of a file ``save_encodings`` wrote, from its header."""
    with _encodings_file(path) as (handle, _):
        return handle.get_slice(ENCODINGS_KEY).get_shape()


@contextlib.contextmanager
def _encodings_file(path: str | Path):
    """An open safetensors file of encodings and its path; one clear error where it is missing, unreadable or
    lacks the encodings tensor."""
    path = Path(path)
    if not path.is_file():
        raise XlsubError(f"encodings: {path} does not exist; give a .safetensors file written by save_encodings")
    try:
        with safe_open(str(path), "pt") as handle:
            names = list(handle.keys())
            if ENCODINGS_KEY not in names:
                raise XlsubError(
                    f"encodings: {path} has no {ENCODINGS_KEY!r} tensor (it has {', '.join(names) or 'none'}); "
                    "give a file written by save_encodings"
                )
            yield handle, path
    except (SafetensorError, OSError) as e:
        raise XlsubError(f"encodings: {path} is not a readable safetensors file ({e}); re-run the encode stage") from e


def write_sentences(folder: Path, corpus) -> Path:
    """`sentences.json`: the parallel corpus (`xlsub.data.parallel.ParallelCorpus`) in encoding order."""
    path = Path(folder) / SENTENCES
    sentences = {"languages": corpus.languages, "ids": corpus.ids, "texts": corpus.texts, "dropped": corpus.dropped,
                 "corpus": corpus.name, "source": corpus.source}
    path.write_text(json.dumps(sentences, ensure_ascii=False))
    return path


def read_sentences(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


# -- perplexity matrices and tables -----------------------------------------------------------------------
def write_ppl_full(folder: Path, ppl_full: Mapping[str, float]) -> Path:
    path = Path(folder) / PPL_FULL
    path.write_text(json.dumps({"full": dict(ppl_full)}))
    return path


def read_ppl_full(path: Path) -> dict[str, float]:
    return {k: float(v) for k, v in json.loads(Path(path).read_text())["full"].items()}


def table_path(table_id: str, suffix: str = ".csv", folder: str | None = TABLES_DIR) -> str:
    """Where a table lies in its run: `tables/<table id>.csv` (analyze; `.json` is its long form), or at the
    artifact root with `folder=None` (finetune's `perplexity.csv`, prune's `cross_ppl.csv`)."""
    return f"{folder}/{table_id}{suffix}" if folder else f"{table_id}{suffix}"


def long_table_path(table_id: str) -> str:
    """`tables/<table id>.json`: an analyze table in long form, as an MLflow table (`mlflow.load_table`)."""
    return table_path(table_id, ".json")


def figure_path(figure_id: str, folder: str | None = FIGURES_DIR) -> str:
    """Where a figure lies in its run: `figures/<figure id>.png` (analyze), or at the root with `folder=None`."""
    return f"{folder}/{figure_id}.png" if folder else f"{figure_id}.png"


def write_table(folder: Path, table_id: str, table: pd.DataFrame, subfolder: str | None = TABLES_DIR) -> Path:
    """A table as CSV, its index (one or several levels) first: `<subfolder>/<table id>.csv`."""
    path = Path(folder) / (subfolder or "") / f"{table_id}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(path)
    return path


def read_table(path: Path, index_levels: int = 1) -> pd.DataFrame:
    """A CSV written by `write_table`, with its first `index_levels` columns as the index.

    Columns that are numbers (layers) come back as ints, so tables keyed by layer survive the round trip.
    """
    table = pd.read_csv(path, index_col=list(range(index_levels)))

    def number(label):
        try:
            value = float(label)
        except (TypeError, ValueError):
            return label
        return int(value) if math.isfinite(value) and value == int(value) else value

    table.columns = pd.Index([number(c) for c in table.columns], name=table.columns.name)
    return table


def read_cross_ppl(path: Path) -> pd.DataFrame:
    """The prune run's `cross_ppl.csv` (rows subnetwork ids, columns evaluation languages)."""
    table = pd.read_csv(path, index_col=0)
    for row in table.index:
        SubnetworkId.parse(row)
    return table


# -- compare ----------------------------------------------------------------------------------------------
ANALYZE_RUNS_TAG = "xlsub.analyze_run_ids"  # on compare runs: the analyze runs compared, comma-separated
COMPARE_METRICS = "metrics"  # compare: metrics.csv (artifact root) and figures/metrics.png, one row per headline metric


# -- analyze: table ids and metric names ------------------------------------------------------------------
@dataclass(frozen=True)
class TableIds:
    """The analyze stage's table ids: `tables/<id>.csv` and `.json`, the keys of `AnalysisResult.tables`, and
    the ids of the figures that show one table under its name. Read them from `TABLE` (`TABLE.mask_jaccard`)."""

    mask_jaccard: str = "mask_jaccard"  # language x language Jaccard of kept heads (mean over seed pairs)
    mask_jaccard_expected: str = "mask_jaccard_expected"  # the same for random masks of the same size per layer
    mask_jaccard_std: str = "mask_jaccard_std"  # its spread over seed pairs (several seeds)
    mask_seed_stability: str = "mask_seed_stability"  # a language's masks across seeds
    mask_jaccard_pvalue: str = "mask_jaccard_pvalue"
    importance_reliability: str = "importance_reliability"  # per language: Spearman-Brown split-half reliability of importance
    head_agreement: str = "head_agreement"  # per language: chance-adjusted Jaccard within (across seeds), across languages, difference
    seed_stability: str = "seed_stability"  # per language: Jaccard across seeds, random masks' expectation, excess, p, p_bh
    heads_kept_per_layer: str = "heads_kept_per_layer"
    params_kept_per_layer: str = "params_kept_per_layer"
    equal_size_jaccard: str = "equal_size_jaccard"
    cross_ppl: str = CROSS_PPL
    cross_ppl_relative: str = f"{CROSS_PPL}_relative"
    cross_ppl_by_seed: str = f"{CROSS_PPL}_by_seed"
    cross_ppl_relative_lo: str = f"{CROSS_PPL}_relative_lo"
    cross_ppl_relative_hi: str = f"{CROSS_PPL}_relative_hi"
    cross_ppl_random: str = CROSS_PPL_RANDOM
    cross_ppl_random_relative: str = f"{CROSS_PPL_RANDOM}_relative"
    cross_ppl_random_by_seed: str = f"{CROSS_PPL_RANDOM}_by_seed"
    cross_ppl_random_relative_lo: str = f"{CROSS_PPL_RANDOM}_relative_lo"
    cross_ppl_random_relative_hi: str = f"{CROSS_PPL_RANDOM}_relative_hi"
    specificity_gap: str = "specificity_gap"
    cka_vs_reference: str = "cka_vs_reference"
    cka_vs_reference_lo: str = "cka_vs_reference_lo"
    cka_vs_reference_hi: str = "cka_vs_reference_hi"
    cka_controls: str = "cka_controls"
    cka_pairs: str = "cka_pairs"
    cka_pairs_lo: str = "cka_pairs_lo"  # its 95% delete-a-block jackknife interval, laid out as cka_pairs
    cka_pairs_hi: str = "cka_pairs_hi"
    cka_pvalue: str = "cka_pvalue"
    cka_length: str = "cka_length"
    cka_full_vs_subnetwork: str = "cka_full_vs_subnetwork"
    cka_full_vs_subnetwork_last_layer: str = "cka_full_vs_subnetwork_last_layer"
    pruning_specificity: str = "pruning_specificity"  # per subnetwork language: 1 - CKA(full, subnetwork) on the others minus on its own
    retrieval_top1: str = "retrieval_top1"
    retrieval_pvalue: str = "retrieval_pvalue"  # last layer, per model and language: top-1 against its length-restricted null
    knn_isomorphism: str = "knn_isomorphism"
    rsa: str = "rsa"
    power: str = "power"
    token_overlap: str = "token_overlap"
    language_distance: str = LANGUAGE_DISTANCE
    language_distance_uriel: str = LANGUAGE_DISTANCE_URIEL


@dataclass(frozen=True)
class MetricNames:
    """The analyze run's summary metrics (per-language ones through `language_metric`), which the summary
    command, compare and the report read. Read them from `METRIC` (`METRIC.mean_jaccard`)."""

    mean_jaccard: str = "mean_jaccard"
    min_importance_reliability: str = "min_importance_reliability"  # the least reliable language's
    head_agreement_difference: str = "head_agreement_difference"  # mean over languages of within - across (chance-adjusted)
    head_agreement_p: str = "head_agreement_p"  # its p from permuting the languages' labels
    mean_expected_jaccard: str = "mean_expected_jaccard"
    mean_seed_stability: str = "mean_seed_stability"
    mask_jaccard_pairs_significant: str = "mask_jaccard_pairs_significant"
    mean_heads_kept_frac: str = "mean_heads_kept_frac"
    mean_params_kept_frac: str = "mean_params_kept_frac"
    within_vs_across_jaccard_p: str = "within_vs_across_jaccard_p"
    mean_within_language_jaccard: str = "mean_within_language_jaccard"
    mean_across_language_jaccard: str = "mean_across_language_jaccard"
    seed_stability_p: str = "seed_stability_p"
    equal_size_jaccard_above_chance_frac: str = "equal_size_jaccard_above_chance_frac"
    specificity_gap: str = "specificity_gap"  # also per subnetwork language: language_metric(specificity_gap, lang)
    specificity_gap_lo: str = "specificity_gap_lo"
    specificity_gap_hi: str = "specificity_gap_hi"
    specificity_gap_random: str = "specificity_gap_random"
    specificity_gap_random_lo: str = "specificity_gap_random_lo"
    specificity_gap_random_hi: str = "specificity_gap_random_hi"
    # the claim about languages: mean over languages of d = gap - random gap, its sign-flip interval and p
    specificity_excess: str = "specificity_excess"  # also per subnetwork language: language_metric(specificity_excess, lang)
    specificity_excess_lo: str = "specificity_excess_lo"
    specificity_excess_hi: str = "specificity_excess_hi"
    specificity_excess_p: str = "specificity_excess_p"
    mean_relative_ppl_diag: str = "mean_relative_ppl_diag"
    mean_relative_ppl_offdiag: str = "mean_relative_ppl_offdiag"
    mean_relative_ppl_random_diag: str = "mean_relative_ppl_random_diag"
    mean_relative_ppl_random_offdiag: str = "mean_relative_ppl_random_offdiag"
    mean_cka_last_layer: str = "mean_cka_last_layer"
    mean_cka_shuffled_last_layer: str = "mean_cka_shuffled_last_layer"
    mean_cka_base_last_layer: str = "mean_cka_base_last_layer"
    mean_cka_random_last_layer: str = "mean_cka_random_last_layer"
    mean_cka_full_vs_subnetwork_last_layer: str = "mean_cka_full_vs_subnetwork_last_layer"
    subnetwork_cka_gap: str = "subnetwork_cka_gap"
    subnetwork_cka_gap_p: str = "subnetwork_cka_gap_p"  # from relabelling the subnetworks (exact up to 8 languages)
    retrieval_top1: str = "retrieval_top1"  # per language: language_metric(retrieval_top1, lang)
    mean_rsa_last_layer: str = "mean_rsa_last_layer"
    detection_limit: str = "detection_limit"  # per measure: language_metric(detection_limit, "cka")
    mean_cka_above_length_chance: str = "mean_cka_above_length_chance"
    mean_residual_cka_last_layer: str = "mean_residual_cka_last_layer"
    cka_beyond_length_p: str = "cka_beyond_length_p"
    mean_token_overlap: str = "mean_token_overlap"

    def mean_cka_control_last_layer(self, condition: str) -> str:
        """`mean_cka_<condition>_last_layer` for the CKA controls shuffled, base and random."""
        return {"shuffled": self.mean_cka_shuffled_last_layer, "base": self.mean_cka_base_last_layer,
                "random": self.mean_cka_random_last_layer}[condition]


TABLE = TableIds()
METRIC = MetricNames()


def language_metric(name: str, key: str) -> str:
    """A metric's per-language (or per-measure) form, with a dot as every metric of a language: `retrieval_top1.de`."""
    return f"{name}.{key}"
