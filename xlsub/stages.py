"""The stage registry: the one list of xlsub's stages, their order, the runs each reads and what each makes.

main runs the pipeline stages in this order; MLproject, the parameter reference, the summary, the
report's lineage, compare and the contract tests are derived from it. Adding a stage takes one entry
here, one module `entry_points/<name>.py` and its parameter dataclass (named in `args`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from xlsub import artifacts
from xlsub.errors import XlsubError


@dataclass(frozen=True)
class Stage:
    """One entry point of the MLflow Project.

    `inputs` maps each run-ID parameter to the stage whose run it names (those in `optional` may be `none`:
    the stage then reads no run of that stage); `lineage` is every upstream
    stage whose run the stage's runs are tagged with (`xlsub.<stage>_run_id`), its inputs and theirs.
    `outputs` are the artifact paths (inside the run) a later stage or a user reads; `manifest` is
    among them for the stages that record what they made. `pipeline` stages are main's children.
    """

    name: str
    args: str
    summary: str
    inputs: Mapping[str, str] = field(default_factory=dict)
    outputs: tuple[str, ...] = ()
    pipeline: bool = True
    optional: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "inputs", MappingProxyType(dict(self.inputs)))

    @property
    def module(self) -> str:
        """The entry point's module, which `mlflow run . -e <name>` runs with `python -m`."""
        return f"entry_points.{self.name}"

    @property
    def writes_manifest(self) -> bool:
        return artifacts.MANIFEST in self.outputs


REGISTRY: tuple[Stage, ...] = (
    Stage("finetune", "FinetuneArgs", "masked-LM training on several languages; perplexity per language before and after",
          outputs=(artifacts.MANIFEST, f"{artifacts.MODEL_DIR}/", artifacts.table_path(artifacts.PERPLEXITY_TABLE, folder=None))),
    Stage("prune", "PruneArgs", "one attention-head subnetwork per language and seed, evaluated on every language",
          inputs={"finetune_run_id": "finetune"},
          outputs=(artifacts.MANIFEST, artifacts.table_path(artifacts.CROSS_PPL, folder=None),
                   artifacts.table_path(artifacts.CHUNK_LOSSES, folder=None), artifacts.PPL_FULL)),
    Stage("neurons", "NeuronsArgs", "the feed-forward neurons of each language (LAPE or gate importance) and what switching them off does to every language",
          inputs={"finetune_run_id": "finetune"},
          outputs=(artifacts.MANIFEST, artifacts.table_path(artifacts.NEURON_PPL, folder=None),
                   artifacts.table_path(artifacts.NEURON_CHUNK_LOSSES, folder=None), artifacts.NEURON_ELIGIBLE, artifacts.PPL_FULL),
          ),
    Stage("encode", "EncodeArgs", "per-layer sentence representations of a parallel corpus for the full model, each subnetwork and the controls",
          inputs={"finetune_run_id": "finetune", "prune_run_id": "prune", "neurons_run_id": "neurons"}, optional=("neurons_run_id",),
          outputs=(artifacts.MANIFEST, f"{artifacts.ENCODINGS_DIR}/", artifacts.SENTENCES)),
    Stage("analyze", "AnalyzeArgs", "overlap, cross-language perplexity, CKA, retrieval and RSA with controls, intervals and tests; neurons beside heads",
          inputs={"encode_run_id": "encode", "prune_run_id": "prune", "neurons_run_id": "neurons"}, optional=("neurons_run_id",),
          outputs=(artifacts.MANIFEST, artifacts.REPORT, artifacts.VERDICTS, f"{artifacts.TABLES_DIR}/", f"{artifacts.FIGURES_DIR}/")),
    Stage("compare", "CompareArgs", "several analyze runs as mean, spread and each run's value",
          inputs={"analyze_run_ids": "analyze"}, outputs=(artifacts.REPORT, artifacts.table_path(artifacts.COMPARE_METRICS, folder=None)),
          pipeline=False),
    Stage("main", "MainArgs", "the pipeline, each stage a child run, finished runs with the same parameters and code reused",
          pipeline=False),
)
_BY_NAME = {stage.name: stage for stage in REGISTRY}


def names() -> tuple[str, ...]:
    return tuple(_BY_NAME)


def get(name: str) -> Stage:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise XlsubError(f"stage: '{name}' is not a stage; choose one of {', '.join(_BY_NAME)}") from None


def pipeline() -> tuple[Stage, ...]:
    """main's stages, in the order it runs them."""
    return tuple(stage for stage in REGISTRY if stage.pipeline)


def required_inputs(name: str) -> dict[str, str]:
    """The stage's inputs it cannot go without: {run-ID parameter: stage}, the optional ones left out."""
    stage = get(name)
    return {param: upstream for param, upstream in stage.inputs.items() if param not in stage.optional}


def lineage(name: str) -> tuple[str, ...]:
    """Every stage upstream of `name` through its required inputs (theirs, ...), in registry order: the
    runs every run of `name` is tagged with. An optional input (analyze's neurons run) is tagged only
    where it was used."""
    found, todo = set(), list(required_inputs(name).values())
    while todo:
        upstream = todo.pop()
        if upstream not in found:
            found.add(upstream)
            todo.extend(required_inputs(upstream).values())
    return tuple(stage for stage in _BY_NAME if stage in found)


def lineage_order() -> tuple[str, ...]:
    """The pipeline stages in order: how a report or a summary lists a run's lineage."""
    return tuple(stage.name for stage in pipeline())
