"""Publishing: reserve a version, upload every file (checksums.json last), then ONE catalog transaction."""

from __future__ import annotations

from farm.artifacts import build_metadata, write_artifact_docs
from farm.catalog import repository as repo
from farm.catalog.session import session_scope
from farm.store import open_store
from farm.store.transfer import upload_tree


def publish_artifact(run, spec: dict, job_info: dict, job_doc: dict) -> str:
    """Publish the runner's output of `run` (a workers.job_run.JobRun); returns name:version. Idempotent per job."""
    settings, claim = run.settings, run.claim
    with session_scope(settings.database_url) as session:
        adapter = repo.reserve_adapter_version(session, claim, name=spec["name"], kind=spec["kind"],
                                               spec_hash=job_info["spec_hash"])
        version, prefix = adapter.version, adapter.prefix
        parent_id = None
        if spec.get("continue_from"):
            from farm.service import parse_adapter_ref

            parent = repo.get_adapter(session, *parse_adapter_ref(spec["continue_from"]))
            parent_id = parent.id
    meta = build_metadata(name=spec["name"], version=version, job=job_info, spec=spec, done=run.done,
                          inputs=job_doc)
    output = run.dir / "output"
    write_artifact_docs(output, meta)
    files = upload_tree(open_store(settings.store_url, settings), output, prefix)
    dataset = meta.get("dataset", {})
    source = meta.get("source_model", {})
    with session_scope(settings.database_url) as session:
        repo.publish_adapter(
            session, claim, files=files, provenance=meta, metrics=meta["metrics"],
            base_model=spec["base_model"], base_model_sha256=meta["base_model"].get("sha256"),
            dataset_uri=dataset.get("uri"), dataset_sha256=dataset.get("sha256"),
            source_model=source.get("ref"), source_model_sha256=source.get("sha256"), parent_adapter_id=parent_id)
    return f"{spec['name']}:{version}"
