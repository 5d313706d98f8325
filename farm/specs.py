"""Job specs: what a user submits. Every default lives here, and every field is validated at the door.

Field docstrings become the CLI's ``--help`` and the API's OpenAPI descriptions (farm.schemas.document_fields:
what pydantic's ``use_attribute_docstrings`` does, from one parse of this file).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from farm.errors import SpecError
from farm.limits import EXCERPT_CHARS, InputTooComplex, bound_message, check_structure, excerpt, load_yaml
from farm.names import is_store_ref, queue_name
from farm.schemas import document_fields

ADAPTER_NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
DatasetFormat = Literal["chat", "alpaca", "completion", "text"]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def __init_subclass__(cls, **kwargs) -> None:
        document_fields(cls)  # the docstrings under the fields are their descriptions
        super().__init_subclass__(**kwargs)


class DatasetSpec(_Spec):
    """Where the training data is and how to read it."""

    path: str
    """JSONL file: a local path (uploaded to the store at submit), or a `store:datasets/<sha256>.jsonl` reference."""
    format: DatasetFormat = "chat"
    """chat (`messages` with roles), alpaca (`instruction`, `input`, `output`), completion (`prompt`, `completion`), text (`text`)."""
    eval_path: str | None = None
    """Optional separate eval file, same format."""
    eval_fraction: float | None = Field(None, gt=0, lt=0.5)
    """Hold out this fraction of the training file for eval (split with `training.seed`). Exclusive with eval_path."""
    too_long: Literal["truncate", "drop"] = "truncate"
    """What to do with examples longer than `training.max_seq_len`; the count is reported."""

    @model_validator(mode="after")
    def _one_eval_source(self):
        if self.eval_path is not None and self.eval_fraction is not None:
            raise ValueError("give eval_path or eval_fraction, not both")
        return self


class LoraSpec(_Spec):
    """The LoRA adapter's shape."""

    r: int = Field(8, ge=1, le=1024)
    """Rank of the update matrices."""
    alpha: float = Field(16, gt=0)
    """Scaling numerator: the update is scaled by alpha / r."""
    dropout: float = Field(0.05, ge=0, lt=1)
    """Dropout on the LoRA input."""
    target_modules: Literal["all-linear"] | list[Annotated[str, Field(min_length=1)]] = "all-linear"
    """`all-linear`, or module name suffixes such as [q_proj, v_proj]."""

    @model_validator(mode="after")
    def _non_empty_targets(self):
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError("target_modules is empty: give module names or 'all-linear'")
        return self


class QuantizationSpec(_Spec):
    """How the frozen base model is stored in memory (bitsandbytes)."""

    bits: Literal[4, 8, 16] = 4
    """4 = QLoRA (nf4/fp4), 8 = LLM.int8, 16 = no quantization (plain LoRA)."""
    type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type."""
    double_quant: bool = True
    """Quantize the quantization constants too (saves ~0.4 bit per parameter)."""
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """dtype of the matmuls and of the LoRA weights' computation."""


class TrainingParams(_Spec):
    """Optimization hyperparameters."""

    epochs: int = Field(1, ge=1, le=1000)
    """Passes over the training data (ignored once max_steps is reached)."""
    max_steps: int | None = Field(None, ge=1)
    """Stop after this many optimizer steps."""
    lr: float = Field(2.0e-4, gt=0, le=1)
    """Peak learning rate (AdamW)."""
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate schedule after warmup."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warmup steps."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Clip gradients to this global norm; null disables clipping."""
    micro_batch_size: int = Field(2, ge=1, le=4096)
    """Sequences per forward pass."""
    grad_accum: int = Field(1, ge=1, le=4096)
    """Micro-batches accumulated per optimizer step."""
    max_seq_len: int = Field(512, ge=8, le=1_048_576)
    """Longest sequence in tokens; longer examples are truncated or dropped (dataset.too_long)."""
    packing: bool = False
    """Pack several short examples per sequence, without attention across example boundaries."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    seed: int = 42
    """Seed of data order, splits, dropout and LoRA init: the same seed gives the same loss curve."""
    eval_every: int | None = Field(None, ge=1)
    """Evaluate every N steps (and always at the end when there is eval data)."""
    early_stopping_patience: int | None = Field(None, ge=1)
    """Stop when eval loss has not improved for this many evaluations."""
    checkpoint_every: int | None = Field(None, ge=1)
    """Save a resumable checkpoint to the store every N steps."""
    keep_checkpoints: int = Field(3, ge=1, le=1000)
    """Keep only the newest N checkpoints in the store while training (older ones are deleted as new ones land)."""
    keep_checkpoints_after_publish: bool = False
    """Keep the job's checkpoints after its adapter is published (by default they are deleted then)."""
    cotrain: bool = True
    """Let a worker train this job together with other queued jobs on the same base model (one copy of the base,
    one forward per step for all; each job keeps its own optimizer, data, events, checkpoints and artifact, and
    its loss curve equals its solo run's). false: always train alone."""


class DeepSpeedSpec(_Spec):
    """DeepSpeed ZeRO for jobs that span several devices."""

    stage: Literal[2, 3] = 2
    """ZeRO stage: 2 shards optimizer state and gradients, 3 also the parameters."""
    offload_optimizer: bool = False
    """Keep optimizer state in CPU memory."""
    offload_params: bool = False
    """Keep parameters in CPU memory (stage 3 only)."""

    @model_validator(mode="after")
    def _offload_params_needs_stage3(self):
        if self.offload_params and self.stage != 3:
            raise ValueError("offload_params needs stage 3")
        return self


class ResourcesSpec(_Spec):
    """What the job needs; it decides the queue."""

    gpus: int = Field(0, ge=0, le=1024)
    """Devices for the job: 0 runs on a CPU worker; N > 1 needs a worker that owns N devices."""
    cpu_slots: int = Field(1, ge=1, le=256)
    """For CPU jobs: processes to run (N > 1 means a multi-process DeepSpeed job on an N-slot CPU worker)."""
    timeout_minutes: float | None = Field(None, gt=0)
    """Kill the job after this long (each attempt)."""

    @property
    def devices(self) -> int:
        return self.gpus if self.gpus > 0 else self.cpu_slots

    @model_validator(mode="after")
    def _slots_only_for_cpu(self):
        if self.gpus > 0 and self.cpu_slots != 1:
            raise ValueError("cpu_slots is for CPU jobs (gpus: 0); set gpus instead")
        return self


class RetrainSpec(_Spec):
    """Retrain the adapter from its feedback pool (`farm feedback`) without a person at the keyboard."""

    every: int = Field(16, ge=1, le=1_000_000)
    """Start one `continue_from: NAME:<latest>` job each time the pool holds this many new rows."""
    replay: float = Field(0.5, ge=0, le=10)
    """Rehearsal: add this many earlier rows per new row (sampled from the parent's data) so it does not forget."""
    max_steps: int | None = Field(None, ge=1)
    """Optimizer steps of each retraining; null keeps the adapter's own training.max_steps / epochs."""


class NotifySpec(_Spec):
    """A webhook told when the job ends: POST of the job's public view, signed with FARM_WEBHOOK_SECRET."""

    url: str = Field(pattern=r"^https?://", max_length=2048)
    """http(s) URL that receives the POST."""
    events: list[Literal["succeeded", "failed", "cancelled"]] = ["succeeded", "failed", "cancelled"]
    """Which final states to report."""


class TrainSpec(_Spec):
    """A (Q)LoRA training job."""

    kind: Literal["train"] = "train"
    """Job kind."""
    name: str = Field(pattern=ADAPTER_NAME_PATTERN)
    """Adapter name: lowercase letters, digits, '-' and '_', at most 64 characters; each success adds a version."""
    description: str | None = Field(None, max_length=2000)
    """What the adapter is for, in a sentence or two: `farm route` matches requests against it."""
    tags: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(default_factory=list, max_length=32)
    """Topic words for routing and listing, like [sql, postgres]."""
    base_model: str = Field(min_length=1)
    """Base model: a local folder, s3://bucket/prefix, a Hub id (org/name; the worker downloads it) or farm:NAME:V (a merged model)."""
    base_revision: str | None = None
    """Hub revision (branch, tag or commit) of a Hub base model; the commit it resolved to is recorded."""
    license: str | None = Field(None, max_length=64)
    """License of the adapter for its model card (a Hub license id such as apache-2.0 or llama3.2)."""
    continue_from: str | None = None
    """Start from an existing adapter NAME[:VERSION] instead of fresh LoRA weights (recorded as lineage)."""
    dataset: DatasetSpec
    """Training data."""
    lora: LoraSpec = LoraSpec()
    """Adapter shape."""
    quantization: QuantizationSpec = QuantizationSpec()
    """Base model quantization."""
    training: TrainingParams = TrainingParams()
    """Hyperparameters."""
    deepspeed: DeepSpeedSpec | None = None
    """DeepSpeed ZeRO settings; needed when the job uses more than one device."""
    resources: ResourcesSpec = ResourcesSpec()
    """Devices the job needs."""
    retrain: RetrainSpec | None = None
    """Retrain from the adapter's feedback pool every N new rows (`farm retrain` overrides it)."""
    notify: NotifySpec | None = None
    """Webhook told when the job ends."""

    @model_validator(mode="after")
    def _combinations(self):
        devices = self.resources.devices
        if devices > 1 and self.deepspeed is None:
            raise ValueError("a job on more than one device needs a `deepspeed:` section (stage 2 or 3)")
        if self.deepspeed is not None and self.quantization.bits == 8:
            raise ValueError("8-bit quantization cannot be sharded by ZeRO: use bits 4 or 16 with deepspeed")
        if (
            self.deepspeed is not None
            and self.deepspeed.stage == 3
            and self.quantization.bits == 4
            and self.deepspeed.offload_params
        ):
            raise ValueError("ZeRO-3 parameter offload does not work with 4-bit weights: drop offload_params")
        if self.deepspeed is not None and devices == 1:
            # One process has nothing to shard with, and the farm runs one-device jobs without DeepSpeed: the
            # section would be silently ignored.
            raise ValueError("a `deepspeed:` section needs more than one device: set resources.cpu_slots (CPU, "
                             "gpus: 0) or resources.gpus to 2 or more, or remove the section")
        return self


class ExtractSpec(_Spec):
    """Factor a LoRA out of the difference between a fine-tuned model and its base."""

    kind: Literal["extract"] = "extract"
    """Job kind."""
    name: str = Field(pattern=ADAPTER_NAME_PATTERN)
    """Adapter name (same rules as training)."""
    description: str | None = Field(None, max_length=2000)
    """What the adapter is for: `farm route` matches requests against it."""
    tags: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(default_factory=list, max_length=32)
    """Topic words for routing and listing."""
    base_model: str = Field(min_length=1)
    """Base model: local directory, s3://bucket/prefix, or hub id."""
    finetuned_model: str = Field(min_length=1)
    """Fully fine-tuned model of the same architecture and shapes."""
    rank: int | None = Field(None, ge=1, le=4096)
    """Fixed rank for every layer (exclusive with energy)."""
    energy: float | None = Field(None, gt=0, le=1)
    """Keep, per layer, the smallest rank retaining this share of ||dW||^2, capped by max_rank."""
    max_rank: int = Field(128, ge=1, le=4096)
    """Upper bound on any layer's rank."""
    target_modules: Literal["all-linear"] | list[Annotated[str, Field(min_length=1)]] = "all-linear"
    """Which linear layers to factor."""
    svd: Literal["randomized", "exact"] = "randomized"
    """randomized (range finder + power iterations, checked against rho <= 1.01) or exact."""
    resources: ResourcesSpec = ResourcesSpec()
    """Devices the job needs."""
    notify: NotifySpec | None = None
    """Webhook told when the job ends."""

    @model_validator(mode="after")
    def _rank_or_energy(self):
        if (self.rank is None) == (self.energy is None):
            raise ValueError("give exactly one of rank or energy")
        if self.rank is not None and self.rank > self.max_rank:
            raise ValueError(f"rank {self.rank} is larger than max_rank {self.max_rank}")
        return self


JobSpec = Annotated[Union[TrainSpec, ExtractSpec], Field(discriminator="kind")]
_job_spec_adapter: TypeAdapter = TypeAdapter(JobSpec)


def _format_validation_error(exc: ValidationError, source: str) -> str:
    from farm.kinds import kind_names

    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-after"))
        # Drop the discriminator tag pydantic puts first in a union location.
        for tag in kind_names():
            if loc == tag:
                loc = ""
            elif loc.startswith(tag + "."):
                loc = loc[len(tag) + 1:]
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check its spelling; see `farm spec`)"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if len(loc) > EXCERPT_CHARS:  # keys come from the input: quote an excerpt only
            loc = loc[:EXCERPT_CHARS] + "..."
        lines.append(f"{source}: {loc or '(top level)'}: {bound_message(msg, 300)}")
    if len(lines) > 20:
        lines[20:] = [f"... and {len(lines) - 20} more problems"]
    return bound_message("\n".join(lines))


def parse_spec(data: object, source: str = "spec") -> TrainSpec | ExtractSpec:
    """Validate a spec given as a mapping; raise SpecError naming every bad field."""
    if not isinstance(data, dict):
        raise SpecError(f"{source}: expected a mapping of fields, got {type(data).__name__}")
    try:  # deep nesting, NUL characters, huge numbers: refused before pydantic sees them
        check_structure(data)
    except InputTooComplex as exc:
        raise SpecError(f"{source}: {exc}") from None
    if "kind" not in data:
        raise SpecError(f"{source}: kind: missing (use 'train' or 'extract')", field="kind")
    from farm.kinds import kind_names  # the job-kind registry (it imports this module's spec classes)

    if data.get("kind") not in kind_names():
        raise SpecError(f"{source}: kind: must be 'train' or 'extract', got {excerpt(data.get('kind'))}", field="kind")
    if data.get("kind") == "merge":  # a merge names an adapter, the farm fills in the rest
        raise SpecError(f"{source}: kind: merge jobs are submitted with `farm merge NAME[:VERSION]` or POST "
                        "/v1/merges", field="kind")
    try:
        return _job_spec_adapter.validate_python(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"][1:]) or None
        raise SpecError(_format_validation_error(exc, source), field=field) from None


def load_spec(path: str | Path) -> TrainSpec | ExtractSpec:
    """Read and validate a YAML (or JSON) spec file. Relative local paths inside it resolve against its folder."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{path}: no such spec file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"{path}: cannot read spec file: {exc}") from None
    try:
        data = load_yaml(text)  # safe_load with an alias, size and depth budget
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise SpecError(f"{path}:{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    except InputTooComplex as exc:
        raise SpecError(f"{path}: {exc}") from None
    spec = parse_spec(data, source=str(path))
    return resolve_local_paths(spec, path.parent)


def _is_local(ref: str, base_dir: Path, *, hub_ids: bool) -> bool:
    """A local path, not a store reference, URL or (for models) a hub id like `org/name`."""
    if "://" in ref or is_store_ref(ref):
        return False
    if not hub_ids or ref.startswith((".", "/", "~")):
        return True
    return (base_dir / ref).exists()


def resolve_local_paths(spec, base_dir: Path):
    """Make relative local paths in a spec absolute (relative to the spec file's folder)."""

    def fix(ref: str | None, hub_ids: bool = False) -> str | None:
        if ref is None or not _is_local(ref, base_dir, hub_ids=hub_ids):
            return ref
        p = Path(ref).expanduser()
        if not p.is_absolute():
            p = base_dir / p
        return str(p.resolve())

    if isinstance(spec, TrainSpec):
        ds = spec.dataset.model_copy(update={"path": fix(spec.dataset.path), "eval_path": fix(spec.dataset.eval_path)})
        return spec.model_copy(update={"base_model": fix(spec.base_model, True), "dataset": ds})
    return spec.model_copy(update={"base_model": fix(spec.base_model, True),
                                   "finetuned_model": fix(spec.finetuned_model, True)})


def spec_to_dict(spec) -> dict:
    """The resolved spec with every default filled in, as JSON-able data."""
    return spec.model_dump(mode="json")


def spec_hash(spec) -> str:
    """sha256 of the canonical JSON of the resolved spec."""
    canon = json.dumps(spec_to_dict(spec), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()


def queue_for(spec) -> str:
    """The Celery queue that serves this spec's resources: farm.cpu, farm.cpu.N, farm.gpu.N."""
    return queue_name(gpus=spec.resources.gpus, cpu_slots=spec.resources.cpu_slots)
