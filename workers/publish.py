"""Publishing: reserve a version, upload every file (checksums.json last), then ONE catalog transaction.

A job kind says what its output becomes (farm/kinds.py `JobKind.publishes`); `PUBLISHERS` maps that to the
function that publishes it. Every kind so far publishes an adapter version.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from farm.artifacts import build_metadata, write_artifact_docs
from farm.catalog import repository as repo
from farm.catalog.repository import Claim
from farm.catalog.session import session_scope
from farm.kinds import JobKind, spec_field
from farm.names import adapter_ref, parse_adapter_ref
from farm.settings import FarmSettings
from farm.store import open_store
from farm.store.transfer import upload_tree


@dataclass(frozen=True)
class RunnerOutput:
    """What a successful attempt hands to its publisher."""

    kind: JobKind
    spec: dict
    """The resolved spec as stored in the catalog (it becomes the artifact's training_config.yaml)."""
    job_info: dict
    """The job's catalog facts recorded in the provenance (id, attempt, queue, worker, times)."""
    job_doc: dict
    """The runner's job file (farm/runner_protocol.py): the local inputs and the resumed step."""
    done: dict
    """The runner's `done` event: metrics and provenance."""
    output_dir: Path


def publish_adapter(settings: FarmSettings, claim: Claim, out: RunnerOutput) -> str:
    """Publish the runner's output as the next version of the spec's adapter; returns name:version.

    Idempotent per job: a retry keeps the version it reserved, and uploading the same files again is harmless.
    """
    spec, name = out.spec, out.spec["name"]
    with session_scope(settings.database_url) as session:
        adapter = repo.reserve_adapter_version(session, claim, name=name, kind=spec["kind"],
                                               spec_hash=out.job_info["spec_hash"])
        version, prefix = adapter.version, adapter.prefix
        parent_id = None
        parent_ref = spec_field(spec, out.kind.parent_field) if out.kind.parent_field else None
        if parent_ref:
            parent_id = repo.get_adapter(session, *parse_adapter_ref(parent_ref)).id
    meta = build_metadata(name=name, version=version, job=out.job_info, spec=spec, done=out.done,
                          inputs=out.job_doc)
    with session_scope(settings.database_url) as session:  # what started it; out-of-memory halvings
        from farm.automation.oom import oom_history
        from farm.automation.retrain import job_lineage

        meta.setdefault("lineage", {}).update(job_lineage(session, claim.job_id))
        if retries := oom_history(session, claim.job_id):
            meta["oom_retries"] = retries
    write_artifact_docs(out.output_dir, meta)
    files = upload_tree(open_store(settings.store_url, settings), out.output_dir, prefix)
    from farm.profiles import record_profile  # routing profile, ready with the version; never raises

    record_profile(name, version, dataset_path=out.job_doc.get("dataset"), settings=settings)
    dataset = meta.get("dataset", {})
    source = meta.get("source_model", {})
    with session_scope(settings.database_url) as session:
        repo.publish_adapter(
            session, claim, files=files, provenance=meta, metrics=meta["metrics"],
            base_model=spec["base_model"], base_model_sha256=meta["base_model"].get("sha256"),
            dataset_uri=dataset.get("uri"), dataset_sha256=dataset.get("sha256"),
            source_model=source.get("ref"), source_model_sha256=source.get("sha256"), parent_adapter_id=parent_id)
    return adapter_ref(name, version)


def publish_model(settings: FarmSettings, claim: Claim, out: RunnerOutput) -> str:
    """A merged model: a catalog entry of kind merge with its checksums and lineage."""
    from farm.merge.publish import publish_merged_model

    return publish_merged_model(settings, claim, out)


PUBLISHERS: dict[str, Callable[[FarmSettings, Claim, RunnerOutput], str]] = {"adapter": publish_adapter,
                                                                              "model": publish_model}
"""What a kind's output becomes (JobKind.publishes) -> the function that publishes it."""


PUBLISHING = "publishing"
"""The progress phase while the output is uploaded and recorded (the CLI's --wait bar and /ui show it)."""


def mark_publishing(settings: FarmSettings, claim: Claim) -> None:
    """Show phase `publishing` in the job's progress (the last step's figures kept) with a `publishing` event, not a
    `progress` one: the progress events stay one a step. Raises StaleAttempt when the job was taken over."""
    from farm.catalog.models import Job

    with session_scope(settings.database_url) as session:
        last = dict(session.get(Job, claim.job_id).progress or {})
        last.pop("eta_s", None)
        repo.record_progress(session, claim, {**last, "phase": PUBLISHING}, event_type=PUBLISHING)


def publish(settings: FarmSettings, claim: Claim, out: RunnerOutput) -> str:
    """Publish a successful attempt's output as its kind says; returns what was published (name:version)."""
    mark_publishing(settings, claim)
    return PUBLISHERS[out.kind.publishes](settings, claim, out)
