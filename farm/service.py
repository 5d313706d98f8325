"""The service layer: every use case of the farm, once. The CLI and the HTTP API are thin front ends over it.

Nothing here imports torch: submitting validates specs, datasets and model files by reading them directly.
"""

from __future__ import annotations

import getpass
import tempfile
from pathlib import Path
from typing import Callable

from farm.catalog import repository as repo
from farm.catalog.models import Adapter, Job
from farm.catalog.session import session_scope
from farm.datasets import validate_dataset
from farm.errors import DatasetError, FarmError, ModelError, ResourceError
from farm.schemas import (
    AdapterFilePublic,
    AdapterPublic,
    DatasetPublic,
    JobError,
    JobEventPublic,
    JobPublic,
    PullResult,
    poll_until_finished,
)
from farm.settings import FarmSettings, get_settings
# STORE_REF, dataset_key and parse_adapter_ref live in farm.names; they stay importable from here.
from farm.names import (  # noqa: F401
    STORE_REF,
    adapter_prefix,
    dataset_key,
    is_store_ref,
    parse_adapter_ref,
    store_key,
    store_ref,
)
from farm.specs import ExtractSpec, TrainSpec, load_spec, parse_spec, queue_for, spec_hash, spec_to_dict


# ---------------------------------------------------------------- views

def job_view(job: Job, adapter: Adapter | None = None) -> JobPublic:
    error = JobError(code=job.error_code, message=job.error_message or "") if job.error_code else None
    view = JobPublic.model_validate(job).model_copy(update={"error": error})
    if adapter is not None:
        view.adapter = f"{adapter.name}:{adapter.version}"
        view.cotraining = (adapter.provenance or {}).get("cotraining")
    return view


def adapter_view(adapter: Adapter, store_uri: str, parent: Adapter | None = None) -> AdapterPublic:
    fields = {name: getattr(adapter, name) for name in AdapterPublic.model_fields
              if name not in ("uri", "files", "parent")}
    return AdapterPublic(**fields, uri=store_uri, files=[AdapterFilePublic.model_validate(f) for f in adapter.files],
                         parent=f"{parent.name}:{parent.version}" if parent else None)


# ---------------------------------------------------------------- datasets

def _store(settings: FarmSettings):
    from farm.store import open_store

    return open_store(settings.store_url, settings)


def store_dataset(path: str | Path, fmt: str, *, settings: FarmSettings | None = None) -> DatasetPublic:
    """Validate a local JSONL dataset and store it content-addressed (datasets/<sha256>.jsonl)."""
    settings = settings or get_settings()
    info = validate_dataset(path, fmt)
    store = _store(settings)
    key = dataset_key(info.sha256)
    if not store.exists(key):
        from farm.store.progress import CountingStore, counted_transfer

        with counted_transfer(f"upload {Path(path).name}", info.size) as advance:  # the CLI's bar
            stored = (CountingStore(store, advance) if advance else store).put_file(Path(path), key)
        if stored.sha256 != info.sha256:
            raise DatasetError(f"{path}: file changed while it was being uploaded; submit again")
    return DatasetPublic(uri=store_ref(key), sha256=info.sha256, size=info.size, examples=info.examples, format=fmt)


def _check_store_dataset(ref: str, fmt: str, settings: FarmSettings) -> DatasetPublic:
    from farm.trust import check_store_ref

    key = check_store_ref(ref, "dataset.path")  # a key with '..' is a bad request, not a store failure
    store = _store(settings)
    if not store.exists(key):
        raise DatasetError(f"{ref}: no such dataset in the farm's store; upload it with `farm submit` from a local"
                           " file or POST /v1/datasets", field="dataset.path")
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "data.jsonl"
        store.get_file(key, local)
        info = validate_dataset(local, fmt)
    return DatasetPublic(uri=ref, sha256=info.sha256, size=info.size, examples=info.examples, format=fmt)


def _resolve_dataset(ref: str, fmt: str, settings: FarmSettings, field: str) -> DatasetPublic:
    try:
        if is_store_ref(ref):
            return _check_store_dataset(ref, fmt, settings)
        if "://" in ref:
            raise DatasetError(f"{field}: {ref!r}: give a local file or a store:datasets/<sha256>.jsonl reference "
                               "(upload remote data with POST /v1/datasets)", field=field)
        return store_dataset(ref, fmt, settings=settings)
    except DatasetError as exc:
        exc.field = field
        raise


# ---------------------------------------------------------------- models

def _check_base_model(ref: str, target_modules, field: str, revision: str | None = None,
                      settings: FarmSettings | None = None) -> list[str]:
    """Check the base model at the door; returns sentences naming what could not be checked here."""
    from farm import model_files

    model_dir = model_files.resolve_model_dir(ref)
    if model_dir is None:
        if ref.startswith((".", "/", "~")):
            raise ModelError(f"{field}: {ref}: no such model directory", field=field)
        from farm.model_checks import check_remote_base_model

        return check_remote_base_model(ref, revision, target_modules, settings or get_settings())
    try:
        model_files.read_config(model_dir)
        model_files.check_target_modules(model_dir, target_modules)
    except ModelError as exc:
        exc.field = field
        exc.message = f"{field}: {exc.message}"
        exc.args = (exc.message,)
        raise
    return []


# ---------------------------------------------------------------- submit

def validate_spec(spec: TrainSpec | ExtractSpec, settings: FarmSettings | None = None,
                  notes: list[str] | None = None) -> TrainSpec | ExtractSpec:
    """Everything that can be checked before enqueueing; returns the spec with datasets stored and referenced.

    `notes`, when given, receives a sentence for each thing that could not be checked here (a Hub id not cached)."""
    settings = settings or get_settings()
    if spec.resources.devices > settings.max_group_size:
        what = f"{spec.resources.gpus} GPUs" if spec.resources.gpus else f"{spec.resources.cpu_slots} CPU slots"
        raise ResourceError(
            f"resources: the job asks for {what}, but the largest worker group of this farm has "
            f"{settings.max_group_size} (FARM_MAX_GROUP_SIZE); ask for fewer devices", field="resources")
    if isinstance(spec, ExtractSpec):
        from farm.extraction.validate import validate_extract_spec

        validate_extract_spec(spec)
        return spec
    unchecked = _check_base_model(spec.base_model, spec.lora.target_modules, "base_model", spec.base_revision,
                                  settings)
    if notes is not None:
        notes.extend(unchecked)
    if spec.continue_from:
        name, version = parse_adapter_ref(spec.continue_from)
        with session_scope(settings.database_url) as session:
            repo.get_adapter(session, name, version)
    train = _resolve_dataset(spec.dataset.path, spec.dataset.format, settings, "dataset.path")
    updates = {"path": train.uri}
    if spec.dataset.eval_path:
        updates["eval_path"] = _resolve_dataset(spec.dataset.eval_path, spec.dataset.format, settings,
                                                "dataset.eval_path").uri
    return spec.model_copy(update={"dataset": spec.dataset.model_copy(update=updates)})


def submit_job(spec: TrainSpec | ExtractSpec | dict | str | Path, *, submitted_by: str | None = None,
               settings: FarmSettings | None = None, force: bool = False,
               on_record: Callable | None = None, remote: bool = False) -> JobPublic:
    """Validate a spec (object, mapping or YAML path), store its local dataset, record the job, ring the doorbell.

    A bad spec, dataset or model raises a FarmError naming the field or the file and line; then no job row, no
    message and no half-written object exists. A job identical in content to one that succeeded or is in flight
    is not queued again: that job comes back with `deduplicated` set, unless `force`. `on_record(session, job)`
    runs in the transaction that records the job (retraining and schedules mark what started it there).
    `remote` (the HTTP API): the caller may not name the server's files (farm.trust).
    """
    settings = settings or get_settings()
    if isinstance(spec, (str, Path)):
        spec = load_spec(spec)
    elif isinstance(spec, dict):
        spec = parse_spec(spec)
    if remote:  # datasets are uploads or store: refs, local models only under FARM_MODEL_ROOTS
        from farm.trust import check_remote_spec

        check_remote_spec(spec, settings)
    notes: list[str] = []  # what the door could not check
    spec = validate_spec(spec, settings, notes)
    queue = queue_for(spec)
    from farm.automation.dedupe import content_key, duplicate_in, find_duplicate, lock_content_key, record_lineage

    key = content_key(spec, settings)
    if not force and (duplicate := find_duplicate(key, settings)) is not None:
        return duplicate
    from farm import doorbell_helper

    if not doorbell_helper.running(settings.broker_url):  # else the CLI's helper connects on the other core
        from farm.queue import warm_doorbell  # connected before the commit: the message leaves right after it

        warm_doorbell(settings, queue)
    with session_scope(settings.database_url) as session:
        # Locked, the check sees any identical job another submit committed meanwhile (two identical submits at
        # once queue one job); the job's row comes last, so its `queued` time is right before the commit.
        lock_content_key(session, key)
        duplicate = None if force else duplicate_in(session, key)
        if duplicate is None:
            job = repo.create_job(session, kind=spec.kind, name=spec.name, queue=queue, spec=spec_to_dict(spec),
                                  spec_hash=spec_hash(spec), max_attempts=settings.max_attempts,
                                  submitted_by=submitted_by or local_user())
            record_lineage(session, job.id, key)
            if on_record is not None:
                on_record(session, job)
            view = job_view(job).model_copy(update={"notes": notes})  # what the door could not check
    if duplicate is not None:
        return duplicate
    return ring_or_withdraw(view, queue, settings)


def ring_or_withdraw(view: JobPublic, queue: str, settings: FarmSettings) -> JobPublic:
    """Ring the doorbell of job `view`, just recorded, on `queue`; when the broker cannot be reached, delete the
    job's row (nothing half-done stays) and raise FarmError saying so. Returns `view`."""
    try:
        from farm import doorbell_helper
        from farm.names import label_for

        label = label_for(view.kind, view.name, view.id)
        if not doorbell_helper.ring(view.id, queue, label, settings.broker_url):
            from farm.queue import ring_doorbell

            ring_doorbell(view.id, queue, settings=settings, label=label)
    except Exception as exc:  # the broker is down: take the row back so nothing half-done stays
        with session_scope(settings.database_url) as session:
            repo.delete_job(session, view.id)
        raise FarmError(f"cannot reach the broker at FARM_BROKER_URL ({type(exc).__name__}: {exc}); "
                        "start it with `farm up` or fix the URL. Nothing was submitted.") from None
    return view


def local_user() -> str:
    """Who submits from this machine without an API token: local:<login name> (plain "local" when it is unknown)."""
    try:
        return f"local:{getpass.getuser()}"
    except Exception:
        return "local"


# ---------------------------------------------------------------- jobs

def get_job(job_id: str, *, settings: FarmSettings | None = None) -> JobPublic:
    """A job's state, progress, error and published adapter; accepts a unique id prefix."""
    settings = settings or get_settings()
    with session_scope(settings.database_url) as session:
        job = repo.get_job(session, job_id)
        return job_view(job, repo.adapter_for_job(session, job.id))


def list_jobs(*, state: str | None = None, kind: str | None = None, name: str | None = None, limit: int = 50,
              offset: int = 0, settings: FarmSettings | None = None) -> list[JobPublic]:
    """Jobs, newest first, filtered by state, kind and adapter name."""
    settings = settings or get_settings()
    with session_scope(settings.database_url) as session:
        return [job_view(j) for j in repo.list_jobs(session, state=state, kind=kind, name=name, limit=limit,
                                                     offset=offset)]


def job_events(job_id: str, *, after: int = 0, limit: int = 1000,
               settings: FarmSettings | None = None) -> list[JobEventPublic]:
    """A job's events after event id `after`, oldest first (follow a job by passing the last id seen)."""
    settings = settings or get_settings()
    with session_scope(settings.database_url) as session:
        job = repo.get_job(session, job_id)
        return [JobEventPublic.model_validate(e) for e in repo.job_events(session, job.id, after, limit)]


def cancel_job(job_id: str, *, settings: FarmSettings | None = None) -> JobPublic:
    """Cancel a job: a waiting one ends at once; a running one is stopped by its worker (whole process group)."""
    settings = settings or get_settings()
    with session_scope(settings.database_url) as session:
        return job_view(repo.request_cancel(session, job_id))


def wait_for_job(job_id: str, *, on_update: Callable[[JobPublic], None] | None = None, poll_seconds: float = 0.5,
                 timeout: float | None = None, settings: FarmSettings | None = None) -> JobPublic:
    """Poll until the job ends; `on_update` sees every poll. Returns the final view (raise nothing on failure)."""
    return poll_until_finished(lambda i: get_job(i, settings=settings), job_id, on_update=on_update,
                               poll_seconds=poll_seconds, timeout=timeout)


def reap_lost_jobs(*, settings: FarmSettings | None = None) -> list[str]:
    """Ring again for jobs that lost their worker or their message; returns their ids.

    A running job whose worker stopped heartbeating goes back to `recovering` (it resumes from its last
    checkpoint). A waiting job quiet for longer than FARM_REQUEUE_AFTER_SECONDS with no message in the broker lost
    its doorbell (the broker may lose a message): it gets a new one. Duplicates are harmless (the claim decides).
    """
    from datetime import timedelta

    from farm.catalog.models import utcnow
    from farm.queue import job_ids_in_broker, ring_doorbell

    settings = settings or get_settings()
    with session_scope(settings.database_url) as session:
        requeue = repo.reap_expired_leases(session)
        queues = {j.id: j.queue for j in (session.get(Job, i) for i in requeue)}
        quiet = repo.waiting_jobs(session, utcnow() - timedelta(seconds=settings.requeue_after_seconds))
    if quiet:
        # a message held unacked for as long as the job has been quiet was taken by a stuck worker
        in_broker = job_ids_in_broker(sorted({q for _, q in quiet}), settings.broker_url,
                                      unacked_within=settings.requeue_after_seconds)
        queues.update({job_id: queue for job_id, queue in quiet if job_id not in in_broker})
    for job_id, queue in queues.items():
        ring_doorbell(job_id, queue, settings=settings)
    return list(queues)


# ---------------------------------------------------------------- adapters

def _prefix_uri(store, prefix: str) -> str:
    return store.uri(prefix.rstrip("/")) + "/"


def list_adapters(name: str | None = None, *, settings: FarmSettings | None = None) -> list[AdapterPublic]:
    """Published adapter versions, newest version first per name."""
    settings = settings or get_settings()
    store = _store(settings)
    with session_scope(settings.database_url) as session:
        return [adapter_view(a, _prefix_uri(store, a.prefix)) for a in repo.list_adapters(session, name)]


def get_adapter(ref: str, *, settings: FarmSettings | None = None, with_urls: bool = False,
                url_expires_s: int = 3600) -> AdapterPublic:
    """An adapter version's provenance and files (NAME or NAME:VERSION; latest when no version)."""
    settings = settings or get_settings()
    name, version = parse_adapter_ref(ref)
    store = _store(settings)
    with session_scope(settings.database_url) as session:
        adapter = repo.get_adapter(session, name, version)
        parent = session.get(Adapter, adapter.parent_adapter_id) if adapter.parent_adapter_id else None
        view = adapter_view(adapter, _prefix_uri(store, adapter.prefix), parent)
    if with_urls:
        for f in view.files:
            f.url = store.presigned_url(adapter.prefix + f.path, url_expires_s)
    return view


def pull_adapter(ref: str, dest: str | Path, *, settings: FarmSettings | None = None,
                 on_bytes: Callable[[int], None] | None = None) -> PullResult:
    """Download an adapter version, verify every file's sha256 against the catalog, then move it into `dest`.

    A mismatch raises ChecksumMismatch and leaves nothing at `dest`. `on_bytes(n)` hears each file's size as it
    arrives (a progress bar).
    """
    from farm.store.transfer import download_tree

    settings = settings or get_settings()
    view = get_adapter(ref, settings=settings)
    name, _ = parse_adapter_ref(ref)
    expected = {f.path: f.sha256 for f in view.files}
    store = _store(settings)
    if on_bytes is not None:  # progress of `farm pull`
        from farm.store.progress import CountingStore

        store = CountingStore(store, on_bytes)
    download_tree(store, adapter_prefix(name, view.version), Path(dest), expected=expected)
    return PullResult(name=view.name, version=view.version, dest=str(Path(dest).resolve()), files=view.files)
