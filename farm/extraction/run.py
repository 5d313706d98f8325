"""An extraction job from start to finish, as the runner child process runs it: `run_extraction(job, emit)`.

Order of work: parse the job; hash both models' weight files (provenance); factor layer by layer, emitting a
`progress` event after each; write the adapter and training_metrics.json; emit `done` with the metrics and the
provenance. A failure a user can cause raises a FarmError; the runner entry turns it into an `error` event.
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path
from typing import Callable

from farm.environment import environment
from farm.errors import ModelError

REQUIRED_JOB_KEYS = ("job_id", "spec", "base_model", "finetuned_model", "output_dir")


def parse_job(job: dict):
    """The job's ExtractSpec; SpecError naming the missing key or the bad fields."""
    from farm.runner_protocol import parse_job as parse
    from farm.specs import ExtractSpec

    return parse(job, ExtractSpec, REQUIRED_JOB_KEYS, "extraction")


def peak_rss_mb() -> float:
    """The process's peak resident memory so far (Linux reports ru_maxrss in KiB, macOS in bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def run_extraction(job: dict, emit: Callable[[dict], None]) -> None:
    """Extract the job's adapter into job["output_dir"]; report through emit(event) (farm.runner_protocol events)."""
    from farm import model_files
    from farm.extraction.extract import extract_adapter

    start = time.perf_counter()
    spec = parse_job(job)
    dirs = {}
    for key in ("base_model", "finetuned_model"):
        path = Path(job[key])
        if not path.is_dir():
            raise ModelError(f"{path}: model folder not found (job {key})", field=key)
        dirs[key] = path
    base_dir, ft_dir = dirs["base_model"], dirs["finetuned_model"]

    emit({"type": "log", "message": f"hashing the weight files of {base_dir} and {ft_dir}"})
    base_sha, base_files = model_files.sha256_weights(base_dir)
    source_sha, source_files = model_files.sha256_weights(ft_dir)
    hashed = time.perf_counter()

    def on_layer(done: int, total: int, module: str, eta_s: float) -> None:
        emit({"type": "progress", "phase": "extract", "step": done, "total_steps": total, "layer": module,
              "eta_s": eta_s})

    result = extract_adapter(spec, base_dir, ft_dir, Path(job["output_dir"]), on_layer=on_layer,
                             log=lambda message: emit({"type": "log", "message": message}))
    metrics = {**result.summary(), "seconds": round(time.perf_counter() - start, 3), "peak_rss_mb": peak_rss_mb()}
    provenance = {
        "base_model_sha256": base_sha,
        "base_model_files": base_files,
        "source_model_sha256": source_sha,
        "source_model_files": source_files,
        "environment": environment(),
        "timings": {"hash_seconds": round(hashed - start, 3), "extract_seconds": round(result.seconds, 3),
                    "total_seconds": metrics["seconds"]},
    }
    emit({"type": "done", "metrics": metrics, "provenance": provenance})
