"""Co-training: several training jobs on one shared base in one process, `CoTrainer(jobs, emit, control).run()`.

The base is loaded, quantized, checksummed once; each job gets its own named LoRA adapter (its own r, alpha,
dropout, target modules, or the weights it continues from), its own optimizer and schedule (over its adapter
only), its own RNG, data order, micro-batch size, grad_accum, max_steps, evaluation, early stopping and
checkpoints. One *tick* is one forward and backward over a batch made of one micro-batch of every job
(farm.training.cotrain_mix: each adapter applies to its job's rows only); a job whose accumulation window is
complete takes its optimizer step. So a job's loss curve is its solo run's (same seed) up to float rounding.

Jobs leave between ticks: when done or stopped early (adapter saved, `done`), on a bad input of their own
(`error`, the others go on), or when told (`leave` on the control channel: `left`). Compatible jobs may join
between ticks (`join`). Every event carries its `job_id`; a job's files (checkpoints, output folder) are exactly
those of its solo run (farm.training.run), made by the same functions.

The runner protocol of a group (workers/cotrain_runner.py): control messages in, JSON events out:

- in: ``{"op": "join", "job": {job file}}``, ``{"op": "leave", "job_id": ..., "reason": ...}``
- out: the solo events plus ``job_id``; ``{"type": "left", "job_id": ..., "reason": ...}`` after a leave
  (also reason ``out_of_memory`` when the runner evicts a job to fit).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from farm.errors import FarmError, ModelError
from farm.training.cotrain_mix import AdapterBackend, base_checksum

GROUP_EVENT = "group"


def cotrain_key(spec: dict) -> tuple | None:
    """What jobs must share to train together (a resolved spec as the catalog stores it): the base model, its
    quantization and compute dtype, the devices; None for a job that trains alone (not training, `training.cotrain:
    false`, DeepSpeed, several devices). The base's weights hash is checked again when a job joins a group."""
    if not isinstance(spec, dict) or spec.get("kind") != "train" or spec.get("deepspeed"):
        return None
    training, q, resources = (spec.get(k) or {} for k in ("training", "quantization", "resources"))
    if not training.get("cotrain", True) or int(resources.get("gpus") or 0) > 1:
        return None
    return (spec.get("base_model"), q.get("bits", 4), q.get("type", "nf4"), q.get("double_quant", True),
            q.get("compute_dtype", "bfloat16"), int(resources.get("gpus") or 0))


class Incompatible(Exception):
    """A job that cannot join this group (it leaves with reason `incompatible` and trains elsewhere)."""


class Member:
    """One job of the group: its spec, data, adapter, optimizer, schedule, RNG and loop position."""

    def __init__(self, group: "CoTrainer", job: dict):
        from farm.training import checkpoint as ckpt
        from farm.training import cotrain_mix as mix
        from farm.training.data import prepare_data
        from farm.training.loop import EpochPlan, LoopConfig, TrainState, total_steps
        from farm.training.packing import to_rows
        from farm.training.run import _Clock, _hash_inputs, parse_job_spec

        self.job, self.job_id = job, str(job["job_id"])
        self.clock = _Clock()
        self.say = lambda event: group.emit({**event, "job_id": self.job_id})
        spec = self.spec = parse_job_spec(job)
        params = self.params = spec.training
        if group.model is not None and (group.key is None or cotrain_key(job["spec"]) != group.key):
            raise Incompatible("base model, quantization, compute dtype or devices differ from the group's")
        t = time.perf_counter()
        self.hashes = _hash_inputs(job, Path(job["base_model"]))
        if group.base_sha256 is not None and self.hashes["base"] != group.base_sha256:
            raise Incompatible(f"{job['base_model']}: other weights than the group's base")
        t = self.clock.phase("hash", t)
        data = prepare_data(spec, group.tokenizer, job["dataset"], job.get("eval_dataset"))
        self.stats = stats = data.stats
        self.say({"type": "log", "message": (
            f"data: {stats.rows} rows, {stats.train_examples} train and {stats.eval_examples} eval examples; "
            f"{stats.truncated} truncated and {stats.dropped} dropped at max_seq_len {params.max_seq_len}")})
        t = self.clock.phase("data", t)

        self.name = mix.adapter_name(self.job_id)
        group.attach(self)  # seeds, adds the adapter, takes the job's RNG stream
        self.rows = to_rows(data.train, params.max_seq_len, params.packing)
        self.eval_rows = to_rows(data.eval, params.max_seq_len, params.packing)
        self.plan = EpochPlan(self.rows, params.micro_batch_size, params.grad_accum, params.seed)
        self.total = total_steps(self.plan, params)
        self.backend = AdapterBackend(group.model, self.name, params, self.total, group.device)
        self.view = mix.AdapterView(group.model, self.name)
        self.state, self.resumed_at = TrainState(), None
        if job.get("resume_from"):
            with self.rng.active():
                self.state = ckpt.load_checkpoint(job["resume_from"], group.model, self.backend,
                                                  dataset_sha256=self.hashes["dataset"],
                                                  steps_per_epoch=self.plan.steps_per_epoch, adapter_name=self.name)
                self.rng.capture()
            self.resumed_at = self.state.step
            self.say({"type": "log", "message": f"resumed from {job['resume_from']} at step {self.state.step}"})
        self.cfg = LoopConfig(total_steps=self.total, pad_id=group.tokenizer.pad_token_id, packed=params.packing,
                              micro_batch_size=params.micro_batch_size, eval_every=params.eval_every,
                              early_stopping_patience=params.early_stopping_patience,
                              checkpoint_every=params.checkpoint_every)
        self.checkpoint_extra = {"job_id": self.job_id, "attempt": job.get("attempt"),
                                 "dataset_sha256": self.hashes["dataset"],
                                 "steps_per_epoch": self.plan.steps_per_epoch, "grad_accum": params.grad_accum,
                                 "total_steps": self.total}
        self.windows, self.windows_epoch, self.window, self.micro = None, None, None, 0
        self.cotrained_with: set[str] = set()
        self.sizes: list[dict] = []  # the group's size over this job's steps, when it changed
        self.clock.phase("load", t)
        self.train_start = time.perf_counter()
        self.say({"type": "log", "message": f"training {self.total} steps ({self.plan.steps_per_epoch} per epoch, "
                                            f"{len(self.rows)} rows) co-trained in a group on {group.device}"})

    @property
    def finished(self) -> bool:
        return self.state.step >= self.total or self.state.stopped_early

    def begin_window(self) -> None:
        from farm.training.loop import row_counts

        if self.windows_epoch != self.state.epoch:
            self.windows, self.windows_epoch = self.plan.windows(self.state.epoch), self.state.epoch
        self.window = self.windows[self.state.step_in_epoch]
        self.micro, self.acc = 0, None
        self.counts = [row_counts(rows) for rows in self.window]
        self.n_target = max(sum(c[1] for c in self.counts), 1)
        self.lr = self.backend.lr
        self.t0 = time.perf_counter()

    def drop_window(self) -> None:
        """Forget a partial accumulation window (the job leaves, or the tick failed)."""
        self.backend.optimizer.zero_grad(set_to_none=True)
        self.window, self.micro = None, 0

    def finish_step(self, group_size: int) -> None:
        """The window is complete: update, record, report; evaluate and checkpoint on schedule (as loop.train)."""
        import torch

        from farm.training import checkpoint as ckpt
        from farm.training.loop import _evaluate_and_record

        norm = self.backend.step()
        values = (torch.stack([self.acc, norm.to(self.acc.device, self.acc.dtype)]) if norm is not None
                  else self.acc.reshape(1)).tolist()
        dt = time.perf_counter() - self.t0
        tokens = sum(c[0] for c in self.counts)
        st, plan = self.state, self.plan
        st.step += 1
        st.step_in_epoch += 1
        if st.step_in_epoch >= plan.steps_per_epoch:
            st.epoch, st.step_in_epoch = st.epoch + 1, 0
        st.tokens += tokens
        st.target_tokens += self.n_target
        st.step_seconds += dt
        st.train_seconds += dt
        record = {"step": st.step, "epoch": round(st.epoch + st.step_in_epoch / plan.steps_per_epoch, 4),
                  "loss": values[0], "lr": self.lr, "tokens_per_s": tokens / dt if dt > 0 else 0.0}
        if norm is not None:
            record["grad_norm"] = values[1]
        st.history.append(record)
        if not self.sizes or self.sizes[-1]["size"] != group_size:
            self.sizes.append({"step": st.step, "size": group_size})
        per_step = (time.perf_counter() - self.train_start) / max(st.step - (self.resumed_at or 0), 1)
        self.say({"type": "progress", "phase": "train", "total_steps": self.total, "group_size": group_size,
                  "eta_s": round(per_step * (self.total - st.step), 2), **record})
        self.window, self.micro = None, 0
        if self.eval_rows and self.cfg.eval_every and st.step % self.cfg.eval_every == 0:
            _evaluate_and_record(self.backend, self.eval_rows, self.cfg, st, self.say)
        if self.cfg.checkpoint_every and st.step % self.cfg.checkpoint_every == 0:
            with self.rng.active():
                path = ckpt.save_checkpoint(self.job["checkpoint_dir"], self.view, self.backend, st,
                                            self.checkpoint_extra)
            self.say({"type": "checkpoint", "step": st.step, "path": str(path)})

    def complete(self, group: "CoTrainer") -> None:
        """Final eval, base check, save the adapter alone, emit `done` (as farm.training.run does for a solo run)."""
        from farm.training import integrity
        from farm.training.loop import _evaluate_and_record
        from farm.training.run import _provenance, _save_outputs, summary_metrics

        st = self.state
        last = st.last_eval
        if self.eval_rows and not st.stopped_early and (last is None or last["step"] != st.step):
            _evaluate_and_record(self.backend, self.eval_rows, self.cfg, st, self.say)
        t = time.perf_counter()
        self.clock.phases["train_seconds"] = round(t - self.train_start, 3)
        integrity.verify_base_unchanged(group.base_checksum, base_checksum(group.model))
        metrics = summary_metrics(st)
        _save_outputs(self.view, Path(self.job["output_dir"]), st, metrics)
        self.clock.phase("save", t)
        trainable = sum(p.numel() for p in self.backend.trainable)
        provenance = _provenance(self.job, self.spec, self.hashes, self.stats, self.clock, self.resumed_at, {
            "base_params_checksum": group.base_checksum, "trainable_params": trainable,
            "total_params": group.base_params + trainable})
        provenance["distributed"] = self.backend.describe()
        provenance["cotraining"] = {"cotrained_with": sorted(self.cotrained_with), "group_sizes": self.sizes,
                                    "adapter_name": self.name}
        self.say({"type": "done", "metrics": metrics, "provenance": provenance})


class CoTrainer:
    """The group: the shared base, its members, the tick loop, joins and leaves."""

    def __init__(self, jobs: list[dict], emit: Callable[[dict], None],
                 control: Callable[[], list[dict]] = lambda: []):
        self.jobs, self.emit, self.control = jobs, emit, control
        self.members: list[Member] = []
        self.key = self.base_sha256 = None
        self.model = None
        self.ticks = 0

    # ------------------------------------------------------------------ setup

    def _load_base(self, job: dict) -> None:
        from farm.training.model import check_model_config, load_base_model, load_tokenizer, training_device
        from farm.training.run import _hash_inputs, parse_job_spec

        spec = parse_job_spec(job)
        base_dir = Path(job["base_model"])
        if not base_dir.is_dir():
            raise ModelError(f"{base_dir}: base model folder not found (job base_model)", field="base_model")
        check_model_config(base_dir)
        self.tokenizer = load_tokenizer(base_dir)
        self.device = training_device()
        # Activation checkpointing is a memory choice that leaves the numbers alone: on when any job asks.
        wants = any(parse_job_spec(j).training.gradient_checkpointing for j in self.jobs)
        spec = spec.model_copy(update={"training": spec.training.model_copy(update={"gradient_checkpointing": wants})})
        self.base = load_base_model(base_dir, spec, self.device)
        self.base_checksum = base_checksum(self.base)
        self.base_params = sum(p.numel() for p in self.base.parameters())
        self.key = cotrain_key(job["spec"])
        self.base_sha256 = _hash_inputs({**job, "dataset": None, "continue_from": None}, base_dir)["base"]

    def attach(self, member: Member) -> None:
        """Add the member's adapter (fresh, seeded as a solo run seeds it, or continued), trainable, own RNG."""
        from farm.training import cotrain_mix as mix
        from farm.training.model import lora_config, seed_everything

        from peft import PeftModel, get_peft_model

        spec, name, parent = member.spec, member.name, member.job.get("continue_from")
        if parent is not None and not (Path(parent) / "adapter_config.json").is_file():
            raise ModelError(f"{parent}: no adapter_config.json; continue_from must be an adapter saved by the farm "
                             "or by peft's save_pretrained", field="continue_from")
        seed_everything(spec.training.seed)  # right before the adapter's init, as build_model does
        try:
            if self.model is None and parent is not None:
                self.model = PeftModel.from_pretrained(self.base, str(parent), adapter_name=name, is_trainable=True)
            elif self.model is None:
                self.model = get_peft_model(self.base, lora_config(spec), adapter_name=name)
            elif parent is not None:
                self.model.load_adapter(str(parent), adapter_name=name, is_trainable=True)
            else:
                self.model.add_adapter(name, lora_config(spec))
        except ValueError as exc:
            what = "continue_from" if parent is not None else "lora.target_modules"
            raise ModelError(f"{what}: the adapter does not fit the base model: {exc}", field=what) from None
        self.model.peft_config[name].base_model_name_or_path = member.job["base_model"]
        member.rng = mix.JobRng(self.device)
        mix.use_job_rng(self.model, name, member.rng)
        mix.mark_trainable(self.model, [m.name for m in self.members] + [name])

    def _join(self, job: dict) -> None:
        try:
            member = Member(self, job)
        except Incompatible as exc:
            self.emit({"type": "log", "message": f"not co-trained here: {exc}", "job_id": str(job.get("job_id"))})
            self.emit({"type": "left", "reason": "incompatible", "job_id": str(job.get("job_id"))})
            return
        except Exception as exc:  # this job's inputs or setup: it fails alone, its neighbours go on
            code, message = (exc.code, exc.message) if isinstance(exc, FarmError) else \
                ("runner_crashed", f"{type(exc).__name__}: {exc}")
            self.emit({"type": "error", "code": code, "message": message, "job_id": str(job.get("job_id"))})
            from farm.training.cotrain_mix import adapter_name

            self._forget(adapter_name(job.get("job_id")))  # when it failed after its adapter was added
            return
        self.members.append(member)

    # ------------------------------------------------------------------ the loop

    def run(self) -> None:
        if not self.jobs:
            return
        self._load_base(self.jobs[0])
        for job in self.jobs:
            self._join(job)
        while True:
            self._apply_control()
            # Done or stopped early (also a job resumed from its last step): it leaves before the next step.
            for member in [m for m in self.members if m.finished]:
                self._leave(member, complete=True)
            if not self.members:
                break
            self._tick()

    def _apply_control(self) -> None:
        for message in self.control():
            op = message.get("op")
            if op == "join":
                self._join(message["job"])
            elif op == "leave":
                member = next((m for m in self.members if m.job_id == str(message.get("job_id"))), None)
                if member is not None:
                    self._leave(member, reason=message.get("reason") or "requested")

    def _leave(self, member: Member, *, complete: bool = False, reason: str | None = None) -> None:
        self.members.remove(member)
        try:
            if complete:
                member.complete(self)
        except FarmError as exc:
            member.say({"type": "error", "code": exc.code, "message": exc.message})
        finally:
            member.drop_window()
            self._forget(member.name)
        if reason is not None:
            member.say({"type": "left", "reason": reason})

    def _forget(self, name: str | None) -> None:
        """Free a departed job's adapter (peft needs one adapter left: the last one stays until the group ends)."""
        config = self.model.peft_config if self.model is not None else {}
        if name and name in config and len(config) > 1:
            import warnings

            with warnings.catch_warnings():  # "adapter ... was active, now deleted": peft's notion, not ours
                warnings.simplefilter("ignore", UserWarning)
                self.model.delete_adapter(name)
            from farm.training.cotrain_mix import mark_trainable

            mark_trainable(self.model, [m.name for m in self.members])

    def _tick(self) -> None:
        """One forward/backward over one micro-batch of every member; members whose window completes step."""
        import torch

        from farm.training import cotrain_mix as mix

        members = list(self.members)
        for m in members:
            if m.window is None:
                m.begin_window()
        parts = [m.window[m.micro] for m in members]
        batch, slices = mix.collate_group(parts, self.tokenizer.pad_token_id, [m.params.packing for m in members])
        names = [m.name for m, part in zip(members, parts) for _ in part]
        lengths = [mix.row_length(part) for part in parts]
        self.ticks += 1
        for m, length in zip(members, lengths):
            m.rng.length, m.rng.tick = length, self.ticks
        batch = batch.to(self.device)
        self.model.train()
        try:
            with mix.mixed_adapters(self.model, names):
                logits = self.model(**batch.model_inputs()).logits
                losses = [mix.job_loss_sum(logits, batch.targets, sl, length) / m.n_target
                          for m, sl, length in zip(members, slices, lengths)]
                del logits
                torch.stack(losses).sum().backward()
        except torch.OutOfMemoryError:
            if len(members) == 1:
                raise
            self._evict_for_memory()
            return
        size = len(members)
        ids = {m.job_id for m in members}
        for m, loss in zip(members, losses):
            m.cotrained_with |= ids - {m.job_id}
            m.acc = loss.detach() if m.acc is None else m.acc + loss.detach()
            m.micro += 1
            if m.micro == len(m.window):
                try:
                    m.finish_step(size)
                except FarmError as exc:  # its checkpoint or eval failed: it fails alone
                    m.say({"type": "error", "code": exc.code, "message": exc.message})
                    self._leave(m)

    def _evict_for_memory(self) -> None:
        """Out of memory: the newest member leaves (it resumes from its checkpoint elsewhere); the others restart
        their current accumulation window."""
        import gc

        import torch

        for m in self.members:
            m.drop_window()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self._leave(self.members[-1], reason="out_of_memory")
