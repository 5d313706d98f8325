"""Replay: rerun the job that made an adapter version, on the same inputs, as a deliberate new version.

The recorded spec is resubmitted with its dataset pinned by digest (the `store:datasets/<sha256>.jsonl` it trained
on), its parent pinned to the exact version it continued from, and its base model checked by hash: a base whose
weights changed since is refused, showing both hashes. Replays skip dedupe (a replay is meant to train again)
and record `replay_of` in the new job's lineage. `verify_replay` compares the two adapters' weights.
"""

from __future__ import annotations

from sqlalchemy import select

from farm.catalog import repository as repo
from farm.catalog.models import Adapter, AdapterFile, Job, JobLineage
from farm.catalog.session import session_scope
from farm.errors import FarmError, ModelError, SpecError
from farm.names import dataset_key, parse_adapter_ref, store_ref
from farm.settings import FarmSettings, get_settings

WEIGHTS_FILE = "adapter_model.safetensors"


class BaseModelChanged(ModelError):
    """The base model's weights are not the ones the adapter was trained on: a replay would not reproduce it."""

    code = "base_model_changed"


def replay_adapter(ref: str, *, submitted_by: str | None = None, settings: FarmSettings | None = None):
    """Submit the recorded spec of adapter NAME[:VERSION] again, inputs pinned; returns the new JobPublic."""
    from farm import service
    from farm.automation.dedupe import base_model_hash

    settings = settings or get_settings()
    name, version = parse_adapter_ref(ref)
    with session_scope(settings.database_url) as session:
        adapter = repo.get_adapter(session, name, version)
        job = session.get(Job, adapter.job_id)
        spec = dict(job.spec or {})
        source = f"{adapter.name}:{adapter.version}"
        recorded_hash = adapter.base_model_sha256
        parent = session.get(Adapter, adapter.parent_adapter_id) if adapter.parent_adapter_id else None
        dataset_sha = adapter.dataset_sha256
    if spec.get("kind") not in ("train", "extract") or "base_model" not in spec:
        raise SpecError(f"{source}: no recorded spec to replay (imported or made outside the farm)")
    current = base_model_hash(spec["base_model"], spec.get("base_revision"))
    if recorded_hash and current != recorded_hash:
        raise BaseModelChanged(
            f"{source}: the base model {spec['base_model']} changed since it was trained: recorded sha256 "
            f"{recorded_hash}, now {current}. Restore those weights to replay it.", field="base_model")
    if spec["kind"] == "train":
        if dataset_sha and dataset_sha not in spec["dataset"]["path"]:
            spec["dataset"] = {**spec["dataset"], "path": store_ref(dataset_key(dataset_sha))}
        if parent is not None:
            spec["continue_from"] = f"{parent.name}:{parent.version}"

    def mark(session, new_job) -> None:
        lineage = session.get(JobLineage, new_job.id)
        lineage.origin, lineage.replay_of = "replay", source

    return service.submit_job(spec, submitted_by=submitted_by, settings=settings, force=True, on_record=mark)


def _weights_sha(session, adapter: Adapter) -> str | None:
    return session.scalar(select(AdapterFile.sha256).where(AdapterFile.adapter_id == adapter.id,
                                                           AdapterFile.path == WEIGHTS_FILE))


def verify_replay(original: str, replay: str, *, settings: FarmSettings | None = None) -> dict:
    """Whether two adapter versions' weights are byte-identical; else the largest absolute weight difference."""
    import tempfile
    from pathlib import Path

    from farm.store import open_store

    settings = settings or get_settings()
    with session_scope(settings.database_url) as session:
        a = repo.get_adapter(session, *parse_adapter_ref(original))
        b = repo.get_adapter(session, *parse_adapter_ref(replay))
        sha_a, sha_b = _weights_sha(session, a), _weights_sha(session, b)
        keys = (a.prefix + WEIGHTS_FILE, b.prefix + WEIGHTS_FILE)
        refs = (f"{a.name}:{a.version}", f"{b.name}:{b.version}")
    out = {"original": refs[0], "replay": refs[1], "identical": sha_a is not None and sha_a == sha_b,
           "original_sha256": sha_a, "replay_sha256": sha_b, "max_abs_diff": 0.0, "tensor": None}
    if out["identical"]:
        return out
    from safetensors.numpy import load_file  # numpy: no torch in a producer

    store = open_store(settings.store_url, settings)
    with tempfile.TemporaryDirectory() as tmp:
        paths = [Path(tmp) / f"{i}.safetensors" for i in (0, 1)]
        for key, path in zip(keys, paths):
            store.get_file(key, path)
        try:
            ta, tb = load_file(paths[0]), load_file(paths[1])
        except Exception as exc:  # bf16 tensors have no numpy dtype
            raise FarmError(f"cannot compare {refs[0]} and {refs[1]} weights: {exc}") from None
    if set(ta) != set(tb):
        out.update(max_abs_diff=None, tensor=f"different tensors: {sorted(set(ta) ^ set(tb))[:3]}")
        return out
    for name in ta:
        if ta[name].shape != tb[name].shape:
            out.update(max_abs_diff=None, tensor=f"{name}: shapes differ")
            return out
        diff = float(abs(ta[name].astype("float64") - tb[name].astype("float64")).max()) if ta[name].size else 0.0
        if diff > out["max_abs_diff"]:
            out["max_abs_diff"], out["tensor"] = diff, name
    return out
