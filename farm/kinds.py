"""The job-kind registry: what each kind of job is, in one place.

A kind names its spec class (what a user submits), its runner (the function the runner child process calls, in
the library, imported only when a job of that kind runs), the inputs a worker fetches to local disk before it
starts the runner, and what its output is published as. The producers (spec parsing, `farm spec`), the worker
(fetching inputs, publishing) and the runner child all ask here instead of branching on the kind's name.

Adding a kind (merge, evaluation) is one new package with its spec class and its `run_<kind>(job, emit)`, and one
`register(JobKind(...))` below; registering a name twice fails at import time (peft's habit).

Nothing here imports torch: runners are named as "module:function" and imported by `JobKind.runner_function()`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Literal

from farm.errors import SpecError
from farm.specs import ExtractSpec, TrainSpec

InputKind = Literal["model", "dataset", "adapter"]


@dataclass(frozen=True)
class JobInput:
    """One input a worker fetches before the runner starts."""

    field: str
    """Dotted path of the spec field that names it (`dataset.eval_path`); an unset optional field is skipped."""
    fetch: InputKind
    """How to fetch it: a model folder (s3:// cached), a dataset (store: references verified), a published adapter."""
    job_key: str
    """The key of the runner's job file (farm/runner_protocol.py) that receives the local path."""


@dataclass(frozen=True)
class JobKind:
    """A kind of job: its spec, its runner, its inputs and how its output is published."""

    name: str
    """The spec's `kind:` value."""
    spec: type
    """The pydantic spec class (farm/specs.py) a job of this kind is validated with."""
    runner: str
    """"module:function" run in the runner child as function(job, emit); heavy imports happen only there."""
    inputs: tuple[JobInput, ...]
    """What the worker fetches to local disk before it starts the runner, in order."""
    publishes: Literal["adapter", "model"] = "adapter"
    """What its output becomes: "adapter", a new adapter version in the catalog (workers/publish.py); "model", a
    merged model (a catalog entry of kind merge)."""
    parent_field: str | None = None
    """The spec field naming the adapter it continues from (recorded as lineage when published), if any."""
    card_title: str = "adapter"
    """What its model card calls an adapter it made ("A <card_title> for `<base>`", farm/artifacts.py)."""
    hub_tag: str = "lora-farm"
    """The Hub tag saying how its adapter was made (farm/artifacts.py card_tags)."""

    def runner_function(self) -> Callable[[dict, Callable[[dict], None]], None]:
        """Import and return the runner function (in the runner child only: it may import torch)."""
        module, _, function = self.runner.partition(":")
        return getattr(importlib.import_module(module), function)


_KINDS: dict[str, JobKind] = {}

IMPORT_KIND = "import"
"""The kind of the catalog job row that records a bundle import (farm/bundles.py): no spec, no runner, never
queued, so it is not registered; job listings may still filter on it (`catalog_kind_names`)."""


def register(kind: JobKind) -> JobKind:
    """Add a job kind; a name registered twice is a programming error, raised at import time."""
    if kind.name in _KINDS:
        raise ValueError(f"job kind {kind.name!r} is registered twice")
    _KINDS[kind.name] = kind
    return kind


def kind_names() -> tuple[str, ...]:
    """The registered kinds' names, in registration order."""
    return tuple(_KINDS)


def catalog_kind_names() -> tuple[str, ...]:
    """Every kind a job row of the catalog may have: the registered kinds, then `import`."""
    return kind_names() + (IMPORT_KIND,)


def get_kind(name: str) -> JobKind | None:
    """The registered kind called `name`, or None."""
    return _KINDS.get(name)


def require_kind(name: object, source: str = "spec") -> JobKind:
    """The registered kind called `name`; SpecError naming the kinds there are otherwise."""
    kind = _KINDS.get(name) if isinstance(name, str) else None
    if kind is None:
        raise SpecError(f"{source}: kind: must be {_one_of()}, got {name!r}", field="kind")
    return kind


def _one_of() -> str:
    names = [repr(n) for n in _KINDS]
    return " or ".join(names) if len(names) < 3 else ", ".join(names[:-1]) + " or " + names[-1]


def all_kinds() -> tuple[JobKind, ...]:
    """Every registered kind, in registration order."""
    return tuple(_KINDS.values())


def spec_field(spec: dict, dotted: str):
    """The value of a dotted field of a spec given as a dict (None when any part is missing)."""
    value = spec
    for part in dotted.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


register(JobKind(
    name="train", spec=TrainSpec, runner="farm.training.run:run_training",
    inputs=(JobInput("base_model", "model", "base_model"),
            JobInput("dataset.path", "dataset", "dataset"),
            JobInput("dataset.eval_path", "dataset", "eval_dataset"),
            JobInput("continue_from", "adapter", "continue_from")),
    parent_field="continue_from", card_title="LoRA/QLoRA adapter",
))
register(JobKind(
    name="extract", spec=ExtractSpec, runner="farm.extraction.run:run_extraction",
    inputs=(JobInput("base_model", "model", "base_model"),
            JobInput("finetuned_model", "model", "finetuned_model")),
    card_title="LoRA extracted by SVD", hub_tag="extracted-lora",
))
# merge an adapter into its base (farm/merge/); the base and its revision are pinned in the spec at submit
from farm.merge.spec import MergeSpec  # noqa: E402  (farm.merge.spec imports farm.specs, never this module)

register(JobKind(
    name="merge", spec=MergeSpec, runner="farm.merge.run:run_merge",
    inputs=(JobInput("base_model", "model", "base_model"),
            JobInput("adapter", "adapter", "adapter")),
    publishes="model", parent_field="adapter",
))
