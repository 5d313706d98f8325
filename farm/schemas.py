"""What the service layer returns: one schema per purpose, shared by the CLI (--json) and the HTTP API.

A docstring written under a field is its description (in the OpenAPI schema and `farm spec`), as with pydantic's
`use_attribute_docstrings`; `document_fields` reads them from one parse of the module's source instead of
pydantic's source lookup per class, which scanned every loaded module for each class (a tenth of a second of
`farm submit` once SQLAlchemy and Celery were loaded).
"""

from __future__ import annotations

import ast
import inspect
import sys
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field
from pydantic.fields import FieldInfo

_module_docs: dict[str, dict[str, dict[str, str]]] = {}


def _docs_in_source(path: str) -> dict[str, dict[str, str]]:
    """{class qualname: {field: docstring}} of the classes in the Python file `path` ({} when it cannot be read)."""
    try:
        with open(path, "rb") as fh:
            tree = ast.parse(fh.read(), path)
    except (OSError, SyntaxError, ValueError):
        return {}
    found: dict[str, dict[str, str]] = {}

    def visit(body: list, prefix: str) -> None:
        for node in body:
            if not isinstance(node, ast.ClassDef):
                continue
            qualname = prefix + node.name
            docs = found.setdefault(qualname, {})
            for stmt, after in zip(node.body, node.body[1:]):
                if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                        and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                        and isinstance(after.value.value, str)):
                    docs[stmt.target.id] = inspect.cleandoc(after.value.value)
            visit(node.body, qualname + ".")

    visit(tree.body, "")
    return found


def attribute_docstrings(cls: type) -> dict[str, str]:
    """The docstrings written right under the annotated fields of class `cls`, cleaned as pydantic's
    `use_attribute_docstrings` cleans them; its module's source is parsed once per process."""
    path = getattr(sys.modules.get(cls.__module__), "__file__", None)
    if not path or not path.endswith(".py"):
        return {}
    if path not in _module_docs:
        _module_docs[path] = _docs_in_source(path)
    return _module_docs[path].get(cls.__qualname__, {})


def document_fields(cls: type[BaseModel]) -> None:
    """Make each field docstring of `cls` (attribute_docstrings) its description, unless its Field() has one.

    Called from __init_subclass__, before pydantic collects the fields: a plain default becomes
    Field(default, description=...), a Field() gains the description, a bare annotation gets Field(description=...).
    """
    annotations = cls.__dict__.get("__annotations__", {})
    for name, doc in attribute_docstrings(cls).items():
        annotation = annotations.get(name)
        if annotation is None or name.startswith("_") or "ClassVar" in str(annotation):
            continue
        if name not in cls.__dict__:
            setattr(cls, name, Field(description=doc))
            continue
        value = cls.__dict__[name]
        if isinstance(value, FieldInfo):
            if value.description is None:
                setattr(cls, name, FieldInfo.merge_field_infos(value, description=doc))
        else:
            setattr(cls, name, Field(value, description=doc))


class _Public(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    def __init_subclass__(cls, **kwargs) -> None:
        document_fields(cls)  # the docstrings under the fields are their descriptions
        super().__init_subclass__(**kwargs)


class JobError(_Public):
    code: str
    """Stable error code (invalid_dataset, runner_crashed, timeout, worker_lost, ...)."""
    message: str
    """What went wrong and what to do."""


class JobPublic(_Public):
    """A job as users see it."""

    id: str
    """Job id (a unique prefix of it is accepted wherever an id is)."""
    kind: str
    """train or extract."""
    name: str
    """Adapter name the job publishes."""
    state: str
    """queued, running, recovering, cancelling, succeeded, failed or cancelled."""
    queue: str
    """Celery queue that serves the job's resources."""
    attempt: int
    """Attempts started so far (the fencing token of the current one)."""
    max_attempts: int
    """Attempts allowed before the job ends failed."""
    worker: str | None = None
    """Worker holding (or that last held) the job."""
    progress: dict | None = None
    """Latest progress: step, total_steps, loss, lr, tokens_per_s, eta_s."""
    error: JobError | None = None
    """Recorded error of a failed job."""
    adapter: str | None = None
    """name:version published by a succeeded job."""
    submitted_by: str | None = None
    """API token name (or local user) that submitted the job."""
    spec_hash: str
    """sha256 of the resolved spec."""
    spec: dict
    """The resolved spec, every default filled in."""
    notes: list[str] = []
    """What the submit-time checks could not verify (a Hub model not in the producer's cache, say)."""
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    deduplicated: bool = False
    """Set on a submit's answer when an identical job (same kind, spec apart from the name, base model hash and
    dataset digest) had succeeded or was in flight: that job is returned and nothing new was queued."""
    cotraining: dict | None = None
    """For a job trained together with others on one shared base: `cotrained_with` (their job ids) and
    `group_sizes` (the group's size from each step on where it changed), from its adapter's provenance."""


class JobEventPublic(_Public):
    id: int
    """Monotonic event id; pass the last one seen as `after` to follow new events."""
    job_id: str
    attempt: int
    at: datetime
    type: str
    """state, progress, eval, checkpoint or log."""
    state: str | None = None
    data: dict | None = None


class AdapterFilePublic(_Public):
    path: str
    size: int
    sha256: str
    etag: str | None = None
    url: str | None = None
    """Time-limited download URL (S3 stores, API only)."""


class AdapterPublic(_Public):
    """A published adapter version and its provenance."""

    name: str
    version: int
    kind: str
    job_id: str
    uri: str
    """Where the artifact lives in the store."""
    base_model: str | None = None
    base_model_sha256: str | None = None
    dataset_uri: str | None = None
    dataset_sha256: str | None = None
    source_model: str | None = None
    source_model_sha256: str | None = None
    parent: str | None = None
    """name:version this adapter continued from."""
    spec_hash: str
    metrics: dict | None = None
    provenance: dict | None = None
    files: list[AdapterFilePublic] = []
    created_at: datetime
    published_at: datetime | None = None


class DatasetPublic(_Public):
    """A dataset stored content-addressed in the farm's store."""

    uri: str
    """Reference to use as dataset.path in a spec (store:datasets/<sha256>.jsonl)."""
    sha256: str
    size: int
    examples: int
    format: str


class PullResult(_Public):
    name: str
    version: int
    dest: str
    files: list[AdapterFilePublic]


FIRST_POLL_S = 0.05
"""A wait's first pause between polls; pauses grow with the time waited (a tenth of it) up to `poll_seconds`, so a
one-second job is seen ending within ~0.1 s and an hour-long one costs a poll every `poll_seconds`."""


def poll_until_finished(fetch, job_id: str, *, on_update=None, poll_seconds: float = 0.5,
                        timeout: float | None = None) -> JobPublic:
    """Call `fetch(job_id)` until the job is succeeded, failed or cancelled; `on_update` sees every view.

    The one wait loop behind the local service layer and the HTTP client. The pause between polls is a tenth of
    the time waited so far, at least FIRST_POLL_S and at most `poll_seconds`.
    """
    import time

    from farm.catalog.models import TERMINAL_STATES

    start = time.monotonic()
    deadline = None if timeout is None else start + timeout
    while True:
        job = fetch(job_id)
        if on_update:
            on_update(job)
        if job.state in TERMINAL_STATES:
            return job
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {job.state} after {timeout:.0f} s")
        time.sleep(min(poll_seconds, max(FIRST_POLL_S, (time.monotonic() - start) / 10)))
