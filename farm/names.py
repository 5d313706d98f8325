"""Names and keys, once: store references, the store's key layout, adapter references and queue names.

Every module that writes or reads one of these asks here, so the layout in DESIGN.md's "Store layout" has one
home:

    adapters/<name>/v<N>/                  a published adapter version (adapter_prefix)
    jobs/<job_id>/checkpoints/step-<k>/    a resumable checkpoint (checkpoint_prefix)
    jobs/<job_id>/logs/attempt-<n>.log     the runner's whole log of one attempt (job_log_key)
    datasets/<sha256>.jsonl                a dataset submitted from a local file (dataset_key)
    store:<key>                            a reference to a key of the farm's store in a spec (store_ref)
    farm.cpu, farm.cpu.N, farm.gpu.N       the Celery queue serving a job's devices (queue_name)

Pure functions of strings: nothing here touches the store, the catalog or the broker.
"""

from __future__ import annotations

from farm.errors import SpecError

STORE_REF = "store:"
"""Prefix of a spec value that names a key of the farm's own store (`store:datasets/<sha256>.jsonl`)."""

CPU_QUEUE = "farm.cpu"
"""The queue of a one-CPU-slot job (also Celery's default queue)."""


# ---------------------------------------------------------------- store references

def is_store_ref(ref: str) -> bool:
    """Whether `ref` names a key of the farm's store (`store:...`)."""
    return ref.startswith(STORE_REF)


def store_ref(key: str) -> str:
    """The spec value that refers to store key `key`."""
    return STORE_REF + key


def store_key(ref: str) -> str:
    """The store key a `store:` reference names (the reference must be one: see `is_store_ref`)."""
    return ref[len(STORE_REF):]


# ---------------------------------------------------------------- key layout

def dataset_key(sha256: str) -> str:
    """Where a dataset uploaded from a local file lives: content-addressed by its sha256."""
    return f"datasets/{sha256}.jsonl"


def adapter_prefix(name: str, version: int) -> str:
    """The store folder of adapter `name` version `version` (ends with '/')."""
    return f"adapters/{name}/v{version}/"


def adapter_file_key(name: str, version: int, path: str) -> str:
    """The store key of one file of a published adapter version."""
    return adapter_prefix(name, version) + path


def checkpoint_prefix(job_id: str, step: int) -> str:
    """The store folder of a job's checkpoint at `step` (ends with '/')."""
    return f"jobs/{job_id}/checkpoints/step-{step}/"


JOB_LOG_FILE = "attempt-{attempt}.log"
"""The file name of one attempt's log under `job_log_prefix` (parse it back with `job_log_attempt`)."""


def job_log_prefix(job_id: str) -> str:
    """The store folder holding the logs of every attempt of job `job_id` (ends with '/')."""
    return f"jobs/{job_id}/logs/"


def job_log_key(job_id: str, attempt: int) -> str:
    """Where attempt `attempt` of job `job_id` keeps its log in the store."""
    return job_log_prefix(job_id) + JOB_LOG_FILE.format(attempt=int(attempt))


def job_log_attempt(key: str) -> int | None:
    """The attempt number of a key `job_log_key` made (None for any other key)."""
    name = key.rsplit("/", 1)[-1]
    if name.startswith("attempt-") and name.endswith(".log") and name[8:-4].isdigit():
        return int(name[8:-4])
    return None


# ---------------------------------------------------------------- adapter references

def parse_adapter_ref(ref: str) -> tuple[str, int | None]:
    """NAME or NAME:VERSION (VERSION may be written vN)."""
    name, _, version = ref.partition(":")
    if not version:
        return name, None
    digits = version[1:] if version[:1] in ("v", "V") else version
    if not digits.isdigit():
        raise SpecError(f"adapter reference {ref!r}: version must be a number, as in {name}:3")
    return name, int(digits)


def adapter_ref(name: str, version: int) -> str:
    """The NAME:VERSION a user types to name one adapter version."""
    return f"{name}:{version}"


# ---------------------------------------------------------------- queues

def queue_name(*, gpus: int = 0, cpu_slots: int = 1) -> str:
    """The Celery queue that serves a job (or a worker) of this many devices: farm.cpu, farm.cpu.N, farm.gpu.N."""
    if gpus > 0:
        return f"farm.gpu.{gpus}"
    return CPU_QUEUE if cpu_slots == 1 else f"{CPU_QUEUE}.{cpu_slots}"


def label_for(kind: str, name: str, job_id: str) -> str:
    """The task name Flower shows for job `job_id`: kind, adapter name, short id (``train demo-chat 1a2b3c4d``)."""
    return f"{kind} {name} {job_id[:8]}"
