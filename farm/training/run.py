"""A training job from start to finish, as the runner child process runs it: `run_training(job, emit)`.

Order of work: parse the spec; hash the base weights and the dataset (provenance); tokenize the data; load the
base and attach the adapter; check that only LoRA weights are trainable and checksum the frozen base; train
(resuming from a checkpoint when the job says so); check the base again; save the adapter and its metrics; emit
`done` with metrics and provenance. Every failure a user can cause raises a FarmError with a clear message; the
runner entry (workers/runner.py) turns it into an `error` event.

Under the multi-process launcher (workers/distributed.py) every process runs all of this on its share of each
global batch (farm.training.deepspeed_backend); only rank 0 emits events and writes the adapter.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable

from farm.errors import FarmError, ModelError

REQUIRED_JOB_KEYS = ("job_id", "spec", "base_model", "dataset", "output_dir", "checkpoint_dir")
METRICS_FILE = "training_metrics.json"


def parse_job_spec(job: dict):
    """The job's TrainSpec; SpecError naming the missing key or the bad fields."""
    from farm.runner_protocol import parse_job
    from farm.specs import TrainSpec

    return parse_job(job, TrainSpec, REQUIRED_JOB_KEYS, "training")


class _Clock:
    """Named wall-clock phases for the provenance's timings."""

    def __init__(self):
        self.start = time.perf_counter()
        self.phases: dict[str, float] = {}
        # from the supervisor's launch (workers/launch.py) to here: process start or fork, and imports
        launched = os.environ.get("FARM_LAUNCHED_AT")
        try:
            self.phases["startup_seconds"] = round(max(0.0, time.time() - float(launched)), 3) if launched else None
        except ValueError:
            pass
        if self.phases.get("startup_seconds") is None:
            self.phases.pop("startup_seconds", None)

    def phase(self, name: str, since: float) -> float:
        now = time.perf_counter()
        self.phases[f"{name}_seconds"] = round(now - since, 3)
        return now

    def as_dict(self) -> dict:
        return {**self.phases, "total_seconds": round(time.perf_counter() - self.start, 3)}


def run_training(job: dict, emit: Callable[[dict], None]) -> None:
    """Train the job's adapter into job["output_dir"]; report through emit(event) (farm.runner_protocol events)."""
    from farm.training import checkpoint as ckpt
    from farm.training import integrity
    from farm.training.backend import make_backend, process_count
    from farm.training.data import prepare_data
    from farm.training.loop import EpochPlan, LoopConfig, TrainState, total_steps, train
    from farm.training.model import build_model, load_tokenizer, training_device
    from farm.training.packing import to_rows

    clock = _Clock()
    spec = parse_job_spec(job)
    params = spec.training
    # Under a multi-process launcher every rank runs this; only rank 0 reports.
    say = emit if int(os.environ.get("RANK", "0")) == 0 else (lambda event: None)
    base_dir = Path(job["base_model"])
    if not base_dir.is_dir():
        raise ModelError(f"{base_dir}: base model folder not found (job base_model)", field="base_model")
    # the producer read config.json already and from_pretrained checks it through transformers
    # (load_base_model); here only the JSON, so a broken file fails before the weights are hashed.
    from farm.model_files import read_config

    if not (base_dir / "config.json").is_file():
        raise ModelError(f"{base_dir}: no config.json; base_model must be a saved transformers model folder",
                         field="base_model")
    try:
        read_config(base_dir)
    except ModelError as exc:
        exc.field = "base_model"
        raise

    t = time.perf_counter()
    say({"type": "log", "message": f"hashing the base model's weight files in {base_dir}"})
    hashes = _hash_inputs(job, base_dir)
    t = clock.phase("hash", t)

    tokenizer = load_tokenizer(base_dir)
    data = prepare_data(spec, tokenizer, job["dataset"], job.get("eval_dataset"))
    stats = data.stats
    say({"type": "log", "message": (
        f"data: {stats.rows} rows, {stats.train_examples} train and {stats.eval_examples} eval examples; "
        f"{stats.truncated} truncated and {stats.dropped} dropped at max_seq_len {params.max_seq_len} "
        f"(too_long: {spec.dataset.too_long})")})
    t = clock.phase("data", t)

    device = training_device()
    model = build_model(base_dir, spec, job.get("continue_from"), device)
    trainable, total = integrity.check_only_adapter_trainable(model)
    base_checksum = integrity.base_params_checksum(model)
    rows = to_rows(data.train, params.max_seq_len, params.packing)
    # With N processes a step trains on the global batch of one process with micro_batch_size x N.
    plan = EpochPlan(rows, params.micro_batch_size * process_count(), params.grad_accum, params.seed)
    steps = total_steps(plan, params)
    backend = make_backend(model, spec, steps, device)
    state, resumed_at = TrainState(), None
    if job.get("resume_from"):
        state = ckpt.load_checkpoint(job["resume_from"], model, backend, dataset_sha256=hashes["dataset"],
                                     steps_per_epoch=plan.steps_per_epoch)
        resumed_at = state.step
        say({"type": "log", "message": f"resumed from {job['resume_from']} at step {state.step} of {steps}"})
    t = clock.phase("load", t)

    attn = getattr(model.config, "_attn_implementation", "") or ""
    cfg = LoopConfig(total_steps=steps, pad_id=tokenizer.pad_token_id, packed=params.packing,
                     flatten=params.packing and "flash" in attn, micro_batch_size=params.micro_batch_size,
                     eval_every=params.eval_every, early_stopping_patience=params.early_stopping_patience,
                     checkpoint_every=params.checkpoint_every)
    checkpoint_extra = {"job_id": job["job_id"], "attempt": job.get("attempt"), "dataset_sha256": hashes["dataset"],
                        "steps_per_epoch": plan.steps_per_epoch, "grad_accum": params.grad_accum,
                        "total_steps": steps, "base_model_ref": spec.base_model}

    def on_checkpoint(st: TrainState) -> None:
        path = ckpt.save_checkpoint(job["checkpoint_dir"], model, backend, st, checkpoint_extra)
        at_step = next((h for h in reversed(st.history) if h.get("step") == st.step), {})
        say({"type": "checkpoint", "step": st.step, "path": str(path), "loss": at_step.get("loss"),
             "eval_loss": at_step.get("eval_loss")})

    spread = f" x {backend.world_size} processes" if backend.world_size > 1 else ""
    say({"type": "log", "message": f"training {steps} steps ({plan.steps_per_epoch} per epoch, {len(rows)} rows"
                                   f"{' packed' if params.packing else ''}) on {device}{spread}"})
    eval_rows = to_rows(data.eval, params.max_seq_len, params.packing)
    state = train(backend, plan, eval_rows, cfg, state, say, on_checkpoint)
    t = clock.phase("train", t)

    integrity.verify_base_unchanged(base_checksum, backend.base_params_checksum())
    metrics = summary_metrics(state)
    # What ran, in epochs too: max_steps may repeat the data many times over.
    metrics.update(steps_per_epoch=plan.steps_per_epoch, epochs=round(state.step / plan.steps_per_epoch, 3))
    with backend.gathered_adapter():  # every process enters: ZeRO-3 gathers the partitioned LoRA weights
        integrity.check_only_adapter_trainable(model)
        if backend.is_main_process:
            _save_outputs(model, Path(job["output_dir"]), state, metrics)
    clock.phase("save", t)

    provenance = _provenance(job, spec, hashes, stats, clock, resumed_at, {
        "base_params_checksum": base_checksum, "trainable_params": trainable, "total_params": total})
    provenance["distributed"] = backend.describe()
    say({"type": "done", "metrics": metrics, "provenance": provenance})


def _hash_inputs(job: dict, base_dir: Path) -> dict:
    """sha256 of every input the adapter depends on: base weight files, dataset, eval file, parent adapter."""
    from farm.training.integrity import file_sha256, weight_file_digests

    def digest(path) -> str | None:
        return file_sha256(path) if path and Path(path).is_file() else None

    base, base_files = weight_file_digests(base_dir)
    parent = job.get("continue_from")
    return {"base": base, "base_files": base_files, "dataset": digest(job["dataset"]),
            "eval": digest(job.get("eval_dataset")),
            "parent": digest(Path(parent) / "adapter_model.safetensors") if parent else None}


def summary_metrics(state) -> dict:
    """The `done` event's metrics, from the loop's final state."""
    last_eval = state.last_eval
    return {
        "final_loss": next((h["loss"] for h in reversed(state.history) if "loss" in h), None),
        "final_eval_loss": last_eval["eval_loss"] if last_eval else None,
        "perplexity": last_eval["perplexity"] if last_eval else None,
        "best_eval_loss": state.best_eval_loss,
        "steps": state.step,
        "stopped_early": state.stopped_early,
        "tokens": state.tokens,
        "target_tokens": state.target_tokens,
        "train_seconds": round(state.train_seconds, 3),
        "tokens_per_s": state.tokens / state.step_seconds if state.step_seconds > 0 else 0.0,
    }


def _provenance(job: dict, spec, hashes: dict, stats, clock: _Clock, resumed_at: int | None, integrity: dict) -> dict:
    from farm.environment import environment

    return {
        "base_model_sha256": hashes["base"],
        "base_model_files": hashes["base_files"],
        "dataset": {"sha256": hashes["dataset"], "format": spec.dataset.format, "examples": stats.train_examples,
                    "rows": stats.rows, "truncated": stats.truncated, "dropped": stats.dropped,
                    "eval_examples": stats.eval_examples, "eval_sha256": hashes["eval"],
                    "target_tokens": stats.target_tokens},
        "environment": environment(),
        "timings": clock.as_dict(),
        "integrity": integrity,
        # Local paths of the worker's scratch folder mean nothing later: record what was loaded, by content.
        "lineage": {"parent_adapter_sha256": hashes["parent"], "resumed_at_step": resumed_at,
                    "attempt": job.get("attempt")},
    }


def _save_outputs(model, output_dir: Path, state, metrics: dict) -> None:
    """The adapter (stock peft layout) and training_metrics.json."""
    output_dir.mkdir(parents=True, exist_ok=True)
    try:
        model.save_pretrained(output_dir)
    except OSError as exc:
        raise FarmError(f"{output_dir}: cannot write the adapter: {exc}") from None
    (output_dir / METRICS_FILE).write_text(json.dumps({"history": state.history, "summary": metrics}, indent=1))
    _save_figures(output_dir, state.history)


def _save_figures(output_dir: Path, history: list[dict]) -> None:
    """tensorboard/ and loss.png beside the adapter; a worker without tensorboard or matplotlib skips."""
    from farm.training import figures

    try:
        figures.write_tensorboard(history, output_dir / figures.TENSORBOARD_DIR)
    except ImportError as exc:
        print(f"no tensorboard log in the artifact: {exc}", flush=True)
    try:
        figures.plot_loss(history, output_dir / figures.LOSS_PLOT)
    except ImportError as exc:
        print(f"no loss.png in the artifact: {exc}", flush=True)
