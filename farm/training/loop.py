"""The training loop, plain PyTorch: accumulate, step, report, evaluate, stop early, checkpoint.

Data order is a function of (seed, epoch) only, and the loop's position is (epoch, step in epoch), so a run
resumed from a checkpoint replays exactly the windows an uninterrupted run would have seen.

Per optimizer step the host waits for the device once (the loss and gradient norm come back together); batch
counts (tokens, target tokens) are computed on the host from the rows.

With several processes (farm.training.deepspeed_backend) the plan's micro-batches are global ones: each process
trains on `backend.shard(rows)`, the loss is divided by the whole window's target tokens, and the reported loss is
summed over processes (`backend.all_sum`), so the numbers are those of one process running the global batch.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from farm.training.packing import collate


@dataclass
class TrainState:
    """Everything about progress that a checkpoint must carry (besides weights, optimizer and RNG)."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch of the next step
    step_in_epoch: int = 0  # steps already done in that epoch
    tokens: int = 0  # real (non-pad) tokens trained on
    target_tokens: int = 0
    step_seconds: float = 0.0  # time in training steps only (tokens/s)
    train_seconds: float = 0.0  # steps plus evaluation
    best_eval_loss: float | None = None
    evals_without_improvement: int = 0
    stopped_early: bool = False
    history: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainState":
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    @property
    def last_eval(self) -> dict | None:
        return next((h for h in reversed(self.history) if "eval_loss" in h), None)


class EpochPlan:
    """Rows grouped into micro-batches and accumulation windows, in a seeded order per epoch."""

    def __init__(self, rows: list, micro_batch_size: int, grad_accum: int, seed: int):
        self.rows = rows
        self.micro_batch_size = micro_batch_size
        self.grad_accum = grad_accum
        self.seed = seed
        batches = math.ceil(len(rows) / micro_batch_size)
        self.steps_per_epoch = math.ceil(batches / grad_accum)

    def windows(self, epoch: int) -> list[list[list]]:
        """This epoch's steps: each a list of micro-batches, each a list of rows."""
        import numpy as np

        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))
        mbs = self.micro_batch_size
        batches = [[self.rows[i] for i in order[k:k + mbs]] for k in range(0, len(order), mbs)]
        return [batches[k:k + self.grad_accum] for k in range(0, len(batches), self.grad_accum)]


def total_steps(plan: EpochPlan, params) -> int:
    """max_steps when given (data repeats as needed), else epochs x steps per epoch."""
    return params.max_steps if params.max_steps is not None else params.epochs * plan.steps_per_epoch


@dataclass
class LoopConfig:
    """What the loop needs besides the backend and the data."""

    total_steps: int
    pad_id: int
    packed: bool
    flatten: bool = False
    micro_batch_size: int = 2
    eval_every: int | None = None
    early_stopping_patience: int | None = None
    checkpoint_every: int | None = None


def row_counts(rows: list) -> tuple[int, int]:
    """(tokens, target tokens) of a micro-batch's rows, as collate counts them (labels shifted by one)."""
    tokens = targets = 0
    for row in rows:
        for ex in row:
            tokens += len(ex.input_ids)
            targets += ex.target_count  # cached on the example: no pass over the labels per step
    return tokens, targets


def evaluate(backend, eval_rows: list, cfg: LoopConfig) -> float:
    """Mean token loss over the eval rows (dropout off, no gradients), split over the processes like training."""
    import torch

    backend.eval()
    total, n_tokens = None, 0
    size = cfg.micro_batch_size * backend.world_size
    with torch.no_grad():
        for k in range(0, len(eval_rows), size):
            rows = eval_rows[k:k + size]
            batch = collate(backend.shard(rows), cfg.pad_id, packed=cfg.packed, flatten=cfg.flatten)
            loss = backend.loss_sum(batch)
            total = loss if total is None else total + loss
            n_tokens += row_counts(rows)[1]
    backend.train()
    return backend.all_sum(total).item() / max(n_tokens, 1)


def perplexity(loss: float) -> float:
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


def train(backend, plan: EpochPlan, eval_rows: list, cfg: LoopConfig, state: TrainState, emit: Callable,
          on_checkpoint: Callable[[TrainState], None] | None = None) -> TrainState:
    """Run optimizer steps from `state` up to cfg.total_steps (or an early stop); return the final state.

    Emits `progress` after every step and `eval` after every evaluation (main process only); calls
    on_checkpoint(state) every cfg.checkpoint_every steps in every process (each writes its part of a checkpoint).
    """
    import torch

    main = backend.is_main_process
    say = emit if main else (lambda event: None)
    backend.train()
    run_start, steps_this_run = time.perf_counter(), 0
    windows, windows_epoch = None, None
    while state.step < cfg.total_steps and not state.stopped_early:
        if windows_epoch != state.epoch:
            windows, windows_epoch = plan.windows(state.epoch), state.epoch
        window = windows[state.step_in_epoch]
        t0 = time.perf_counter()
        batches = [collate(backend.shard(rows), cfg.pad_id, packed=cfg.packed, flatten=cfg.flatten)
                   for rows in window]
        counts = [row_counts(rows) for rows in window]
        n_target = max(sum(c[1] for c in counts), 1)
        lr = backend.lr
        acc = None
        for batch in batches:
            loss = backend.loss_sum(batch) / n_target
            backend.backward(loss)
            acc = loss.detach() if acc is None else acc + loss.detach()
        norm = backend.step()
        acc = backend.all_sum(acc)
        # The one host-device sync of the step.
        values = (torch.stack([acc, norm.to(acc.device, acc.dtype)]) if norm is not None else acc.reshape(1)).tolist()
        dt = time.perf_counter() - t0
        tokens = sum(c[0] for c in counts)

        state.step += 1
        steps_this_run += 1
        state.step_in_epoch += 1
        if state.step_in_epoch >= plan.steps_per_epoch:
            state.epoch, state.step_in_epoch = state.epoch + 1, 0
        state.tokens += tokens
        state.target_tokens += n_target
        state.step_seconds += dt
        state.train_seconds += dt
        record = {"step": state.step, "epoch": round(state.epoch + state.step_in_epoch / plan.steps_per_epoch, 4),
                  "loss": values[0], "lr": lr, "tokens_per_s": tokens / dt if dt > 0 else 0.0}
        if norm is not None:
            record["grad_norm"] = values[1]
        state.history.append(record)
        per_step = (time.perf_counter() - run_start) / steps_this_run
        say({"type": "progress", "phase": "train", "total_steps": cfg.total_steps,
             "eta_s": round(per_step * (cfg.total_steps - state.step), 2), **record})

        if eval_rows and cfg.eval_every and state.step % cfg.eval_every == 0:
            _evaluate_and_record(backend, eval_rows, cfg, state, say)
        if on_checkpoint and cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
            on_checkpoint(state)

    last = state.last_eval
    if eval_rows and not state.stopped_early and (last is None or last["step"] != state.step):
        _evaluate_and_record(backend, eval_rows, cfg, state, say)
    return state


def _evaluate_and_record(backend, eval_rows, cfg: LoopConfig, state: TrainState, say) -> None:
    t0 = time.perf_counter()
    eval_loss = evaluate(backend, eval_rows, cfg)
    state.train_seconds += time.perf_counter() - t0
    ppl = perplexity(eval_loss)
    if state.history and state.history[-1]["step"] == state.step:
        state.history[-1].update(eval_loss=eval_loss, perplexity=ppl)
    else:
        state.history.append({"step": state.step, "eval_loss": eval_loss, "perplexity": ppl})
    say({"type": "eval", "step": state.step, "eval_loss": eval_loss, "perplexity": ppl})
    if state.best_eval_loss is None or eval_loss < state.best_eval_loss:
        state.best_eval_loss, state.evals_without_improvement = eval_loss, 0
        return
    state.evals_without_improvement += 1
    patience = cfg.early_stopping_patience
    if patience is not None and state.evals_without_improvement >= patience:
        state.stopped_early = True
        say({"type": "log", "message": f"early stop at step {state.step}: eval loss has not improved on "
                                       f"{state.best_eval_loss:.4f} for {patience} evaluation(s)"})
