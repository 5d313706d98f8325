"""Submitting a merge: the adapter must exist and its base model must still be reachable, else nothing is queued."""

from __future__ import annotations

from farm.errors import ModelError, SpecError
from farm.schemas import JobPublic
from farm.settings import FarmSettings, get_settings

MERGED_SUFFIX = "-merged"


def _check_base_still_there(ref: str, revision: str | None, adapter: str, settings: FarmSettings) -> list[str]:
    """ModelError when the adapter's base model is certainly gone; notes for what cannot be checked here."""
    from farm import model_files
    from farm.model_checks import check_remote_base_model

    gone = (f"the base model of {adapter}, {ref[:200]}, is gone: restore it where the adapter's training job "
            "found it (or train the adapter again on a base that exists)")
    try:
        model_dir = model_files.resolve_model_dir(ref)
        if model_dir is None and ref.startswith((".", "/", "~")):
            raise ModelError(gone, field="adapter")
        if model_dir is not None:
            model_files.read_config(model_dir)
            model_files.weight_files(model_dir)
            return []
        # Hub ids at the commit the adapter was trained on; the layers do not matter to a merge
        return check_remote_base_model(ref, revision, None, settings)
    except ModelError as exc:
        if exc.message == gone:
            raise
        raise ModelError(f"{gone} ({exc.message[:300]})", field="adapter") from None


def submit_merge(adapter: str, *, dtype: str = "bfloat16", name: str | None = None, max_shard_size: str = "5GB",
                 submitted_by: str | None = None, settings: FarmSettings | None = None) -> JobPublic:
    """Queue a merge of the adapter NAME[:VERSION] into its base model (job kind `merge`).

    The adapter's version is pinned now, and so are its base model's reference, Hub commit and weights sha256 (from
    its provenance), so the merge uses exactly the weights it was trained on. A missing adapter, an adapter whose
    base is gone, or a bad name raises a FarmError and queues nothing.
    """
    from farm.catalog import repository as repo
    from farm.catalog.session import session_scope
    from farm.merge.spec import MergeSpec
    from farm.names import adapter_ref, parse_adapter_ref
    from farm.service import job_view, local_user, ring_or_withdraw
    from farm.specs import queue_for, spec_hash, spec_to_dict

    settings = settings or get_settings()
    adapter_name, version = parse_adapter_ref(adapter)
    with session_scope(settings.database_url) as session:
        entry = repo.get_adapter(session, adapter_name, version)
        if entry.kind == "merge":
            raise SpecError(f"{adapter_ref(entry.name, entry.version)} is already a merged model; merge an adapter",
                            field="adapter")
        prov = entry.provenance or {}
        base = prov.get("base_model") or {}
        fields = {"kind": "merge", "name": name or f"{entry.name}{MERGED_SUFFIX}",
                  "adapter": adapter_ref(entry.name, entry.version), "base_model": entry.base_model,
                  "base_revision": base.get("revision") if base.get("source") == "hub" else None,
                  "base_model_sha256": entry.base_model_sha256, "dtype": dtype, "max_shard_size": max_shard_size,
                  "license": (prov.get("spec") or {}).get("license")}
    if not fields["base_model"]:
        raise ModelError(f"{fields['adapter']} records no base model; it cannot be merged", field="adapter")
    try:
        spec = MergeSpec.model_validate(fields)
    except Exception as exc:
        from pydantic import ValidationError

        if isinstance(exc, ValidationError):
            err = exc.errors()[0]
            raise SpecError(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}",
                            field=".".join(str(p) for p in err["loc"])) from None
        raise
    notes = _check_base_still_there(spec.base_model, spec.base_revision, spec.adapter, settings)
    queue = queue_for(spec)
    with session_scope(settings.database_url) as session:
        job = repo.create_job(session, kind="merge", name=spec.name, queue=queue, spec=spec_to_dict(spec),
                              spec_hash=spec_hash(spec), max_attempts=settings.max_attempts,
                              submitted_by=submitted_by or local_user())
        view = job_view(job).model_copy(update={"notes": notes})
    return ring_or_withdraw(view, queue, settings)
