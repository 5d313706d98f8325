"""Publishing a merge job's output: a catalog entry of kind `merge` (name:version), files checksummed, lineage.

Same protocol as an adapter (workers/publish.py): reserve the version, upload every file with checksums.json last,
then ONE catalog transaction that makes the entry ready and the job succeeded. Idempotent per job.
"""

from __future__ import annotations

from farm.catalog import repository as repo
from farm.catalog.session import session_scope
from farm.merge.card import build_merge_metadata, write_merged_docs
from farm.names import adapter_ref, parse_adapter_ref
from farm.settings import FarmSettings
from farm.store import open_store
from farm.store.transfer import upload_tree


def publish_merged_model(settings: FarmSettings, claim, out) -> str:
    """Publish a merge runner's output (`out`: workers.publish.RunnerOutput); returns name:version."""
    spec, name = out.spec, out.spec["name"]
    with session_scope(settings.database_url) as session:
        entry = repo.reserve_adapter_version(session, claim, name=name, kind="merge",
                                             spec_hash=out.job_info["spec_hash"])
        version, prefix = entry.version, entry.prefix
        parent_id = repo.get_adapter(session, *parse_adapter_ref(spec["adapter"])).id
    meta = build_merge_metadata(name=name, version=version, job=out.job_info, spec=spec, done=out.done,
                                inputs=out.job_doc)
    write_merged_docs(out.output_dir, meta)
    files = upload_tree(open_store(settings.store_url, settings), out.output_dir, prefix)
    with session_scope(settings.database_url) as session:
        repo.publish_adapter(session, claim, files=files, provenance=meta, metrics=meta["metrics"],
                             base_model=spec["base_model"], base_model_sha256=meta["base_model"].get("sha256"),
                             parent_adapter_id=parent_id)
    return adapter_ref(name, version)
