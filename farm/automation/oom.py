"""Out-of-memory retry: a training attempt that ran out of memory (CUDA's allocator or the CPU's) is tried again
from its last checkpoint with `micro_batch_size` halved and `grad_accum` doubled, the same effective batch.

The runner reports `out_of_memory` (`is_out_of_memory` classifies the exception); the supervisor calls
`shrink_after_oom` in the attempt's fenced transaction: the job's spec gets the smaller micro-batch (the next
attempt and the provenance see it), an `oom_retry` event records the change, and the job goes back to
`recovering` (attempts still count against max_attempts). At micro-batch 1 there is nothing left to halve: the job
fails with a message saying what to change. Resuming is exact: a step covers the same rows in the same order,
because the plan groups a seeded permutation into windows of micro_batch_size x grad_accum rows.

A process killed by the kernel's OOM killer never raises: it ends `runner_killed` like any other kill.
"""

from __future__ import annotations

from sqlalchemy import select

from farm.catalog import repository as repo
from farm.catalog.models import FAILED, RECOVERING, JobEvent

OOM_CODE = "out_of_memory"
OOM_EVENT = "oom_retry"
_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory", "not enough memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether an exception is an allocation failure: MemoryError, torch's OutOfMemoryError (CUDA), or the CPU
    allocator's RuntimeError (`DefaultCPUAllocator: can't allocate memory`)."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _MARKERS)


def shrink_after_oom(session, claim, message: str) -> str:
    """Halve micro_batch_size and double grad_accum in the job's spec, record it, hand the job back for another
    attempt. Returns the job's state: `recovering` (re-enqueue it) or `failed` (micro-batch 1 already, or out of
    attempts), as repository.end_failed_attempt does."""
    job = repo.fenced(session, claim)
    spec = dict(job.spec)
    training = dict(spec.get("training") or {})
    mbs, accum = int(training.get("micro_batch_size", 1)), int(training.get("grad_accum", 1))
    if mbs <= 1:
        repo.fail_job(session, claim, OOM_CODE, (
            f"out of memory at training.micro_batch_size 1 (grad_accum {accum}); nothing left to halve. Lower "
            "training.max_seq_len, set training.gradient_checkpointing: true, use quantization.bits: 4, turn "
            "packing off, or give the job a device with more memory (resources.gpus, or a larger "
            "FARM_RUNNER_MEMORY_LIMIT_MB).\n" + message[-1500:]))
        return FAILED
    training.update(micro_batch_size=mbs // 2, grad_accum=accum * 2)
    job.spec = {**spec, "training": training}
    change = {"from": {"micro_batch_size": mbs, "grad_accum": accum},
              "to": {"micro_batch_size": mbs // 2, "grad_accum": accum * 2}, "attempt": claim.attempt}
    repo.add_event(session, job.id, claim.attempt, OOM_EVENT, data=change)
    retried = repo.release_for_retry(session, claim, OOM_CODE, f"out of memory with micro_batch_size {mbs}: "
                                                               f"retrying with {mbs // 2} and grad_accum {accum * 2}")
    return RECOVERING if retried else FAILED


def solo_after_group_oom(session, claim, message: str) -> str:
    """A job evicted from its co-training group to fit in memory: its spec gets `training.cotrain: false` (recorded
    like a micro-batch change), so its next attempt trains alone instead of rejoining a group that has no room
    for it (it would be evicted again until its attempts ran out). Returns `recovering` or `failed`."""
    from farm.errors import EvictedForMemory

    job = repo.fenced(session, claim)
    spec = dict(job.spec)
    training = dict(spec.get("training") or {})
    job.spec = {**spec, "training": {**training, "cotrain": False}}
    change = {"from": {"cotrain": training.get("cotrain", True)}, "to": {"cotrain": False},
              "attempt": claim.attempt}
    repo.add_event(session, job.id, claim.attempt, OOM_EVENT, data=change)
    retried = repo.release_for_retry(session, claim, EvictedForMemory.code,
                                     f"left its co-training group to fit in memory: retrying alone\n{message[-1500:]}")
    return RECOVERING if retried else FAILED


def oom_history(session, job_id: str) -> list[dict]:
    """The job's changes after running out of memory (a halved micro-batch, or co-training off), oldest first
    (for its provenance)."""
    return [e.data for e in session.scalars(select(JobEvent).where(JobEvent.job_id == job_id,
                                                                   JobEvent.type == OOM_EVENT)
                                            .order_by(JobEvent.id))]
