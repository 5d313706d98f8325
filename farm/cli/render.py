"""How the CLI shows things: rich tables for people, JSON for scripts, a live progress bar for running jobs.

rich is imported on first use (`console`, `err_console`, a table or a bar): a command that prints one plain line
to a pipe (`farm submit`) never loads it.
"""

from __future__ import annotations

import json
import os
import sys
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from farm.schemas import AdapterPublic, JobPublic


def _console_options(stream) -> dict:
    # Output to a file or a pipe is not wrapped at 80 columns (paths and ids stay whole); a terminal wraps as usual.
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    return {} if tty else {"width": 100_000, "soft_wrap": True}


def __getattr__(name: str):
    # `console` and `err_console` are made on first use (module __getattr__, PEP 562), then are plain globals.
    if name == "console":
        from rich.console import Console

        value = Console(**_console_options(sys.stdout))
    elif name == "err_console":
        from rich.console import Console

        value = Console(stderr=True, **_console_options(sys.stderr))
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def _out() -> Console:
    found = globals().get("console")
    return found if found is not None else __getattr__("console")


def _err() -> Console:
    found = globals().get("err_console")
    return found if found is not None else __getattr__("err_console")


def plain_stream(stream) -> bool:
    """True when rich would write to `stream` without any style, bar or wrapping: not a terminal, and neither
    FORCE_COLOR nor TTY_COMPATIBLE asks for one. A line of text then needs no rich, and no bar is shown."""
    if "FORCE_COLOR" in os.environ or "TTY_COMPATIBLE" in os.environ:
        return False
    try:
        return not stream.isatty()
    except (AttributeError, ValueError):
        return False


def plain_stdout() -> bool:
    """plain_stream(sys.stdout)."""
    return plain_stream(sys.stdout)


def print_line(markup: str, plain: str) -> None:
    """Print one line: `plain` with print() when stdout is plain (plain_stdout), else `markup` through rich.
    `plain` must be `markup` without its tags (the text rich would write to a pipe)."""
    if plain_stdout():
        print(plain)
    else:
        _out().print(markup)


def quiet_libraries() -> None:
    """Keep library warnings and third-party progress bars (tqdm, transformers, DeepSpeed's accelerator notice)
    out of the CLI's output; FARM_DEBUG=1 lets them through."""
    import logging
    import os
    import warnings

    if os.environ.get("FARM_DEBUG"):
        return
    # Children (a worker the demo starts, runners) inherit these, set only where the user set nothing.
    for key, value in {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error",
                       "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "PYTHONWARNINGS": "ignore"}.items():
        os.environ.setdefault(key, value)
    warnings.simplefilter("ignore")
    # Libraries that log without configuring logging reach stderr through logging's last-resort handler.
    if logging.lastResort is not None:
        logging.lastResort.setLevel(logging.ERROR)
    for name in ("DeepSpeed", "deepspeed", "transformers", "peft", "accelerate", "bitsandbytes", "torch"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.ERROR)  # inherited by their modules' loggers
        # and a filter: DeepSpeed sets its own logger's level (and handler) when imported, after this runs
        logger.addFilter(lambda record: record.levelno >= logging.ERROR)


def print_json(data) -> None:
    from pydantic import BaseModel

    if isinstance(data, BaseModel):
        data = data.model_dump(mode="json")
    elif isinstance(data, list):
        data = [d.model_dump(mode="json") if isinstance(d, BaseModel) else d for d in data]
    print(json.dumps(data, indent=2, default=str))


def _num(value, digits: int = 4) -> str:
    """A float rounded to `digits` significant digits (never 16 of them); anything else as text."""
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return "-" if value is None else str(value)


def _progress_text(p: dict | None, state: str | None = None, mean_tps: float | None = None) -> str:
    """A job's figures: step, loss, lr, tokens/s and ETA while it runs; its final and eval loss once it ended."""
    if not p:
        return ""
    step = f"{p.get('step', '?')}/{p.get('total_steps', '?')}"
    if state in ("succeeded", "failed", "cancelled"):
        parts = [f"step {step}" if state != "succeeded" else f"{p.get('step', '?')} steps"]
        if p.get("loss") is not None:
            parts.append(f"final loss {_num(p['loss'])}")
        if p.get("eval_loss") is not None:
            parts.append(f"eval loss {_num(p['eval_loss'])}")
        return "  ".join(parts)
    parts = [step]
    if p.get("loss") is not None:
        parts.append(f"loss {_num(p['loss'])}")
    if p.get("eval_loss") is not None:
        parts.append(f"eval {_num(p['eval_loss'])}")
    if p.get("lr") is not None:
        parts.append(f"lr {p['lr']:.2e}")
    tps = mean_tps if mean_tps is not None else p.get("tokens_per_s")
    if tps:
        parts.append(f"{tps:.0f} tok/s")
    if p.get("eta_s") is not None:
        parts.append(f"eta {p['eta_s']:.0f}s")
    return "  ".join(parts)


def jobs_table(jobs: Iterable[JobPublic]) -> Table:
    from rich.table import Table

    table = Table("id", "kind", "name", "state", "progress", "attempt", "created", box=None)
    for j in jobs:
        table.add_row(j.id[:12], j.kind, j.name, j.state,
                      "  ".join(x for x in (_progress_text(j.progress, j.state), j.adapter) if x),
                      f"{j.attempt}/{j.max_attempts}", j.created_at.strftime("%Y-%m-%d %H:%M:%S"))
    return table


def job_detail(job: JobPublic) -> None:
    _out().print(f"[bold]{job.id}[/bold]  {job.kind} [cyan]{job.name}[/cyan]  state [bold]{job.state}[/bold]")
    _out().print(f"queue {job.queue}  attempt {job.attempt}/{job.max_attempts}  worker {job.worker or '-'}  "
                  f"submitted by {job.submitted_by or '-'}")
    if job.progress:
        p = job.progress
        _out().print(f"progress {_progress_text(p, job.state)}")
    if job.adapter:
        _out().print(f"adapter [green]{job.adapter}[/green]")
    cot = job.cotraining or {}
    if cot.get("cotrained_with"):
        sizes = ", ".join(f"{s['size']} from step {s['step']}" for s in cot.get("group_sizes") or [])
        _out().print(f"co-trained with {', '.join(cot['cotrained_with'])}  (group size {sizes or '-'})")
    elif job.progress and (job.progress.get("group_size") or 1) > 1:
        _out().print(f"co-training in a group of {job.progress['group_size']}")
    if job.error:
        _out().print(f"[red]error {job.error.code}[/red]: {job.error.message}")


def adapters_table(adapters: Iterable[AdapterPublic]) -> Table:
    from rich.table import Table

    table = Table("name", "version", "kind", "base model", "final loss", "published", box=None)
    for a in adapters:
        loss = (a.metrics or {}).get("final_loss")
        table.add_row(a.name, str(a.version), a.kind, a.base_model or "-",
                      f"{loss:.4f}" if isinstance(loss, (int, float)) else "-",
                      a.published_at.strftime("%Y-%m-%d %H:%M:%S") if a.published_at else "-")
    return table


def adapter_detail(a: AdapterPublic) -> None:
    from rich.table import Table

    _out().print(f"[bold]{a.name}:{a.version}[/bold] ({a.kind})  {a.uri}")
    _out().print(f"job {a.job_id}  spec sha256 {a.spec_hash[:16]}…")
    _out().print(f"base model {a.base_model}  sha256 {a.base_model_sha256 or '-'}")
    if a.dataset_uri:
        _out().print(f"dataset {a.dataset_uri}  sha256 {a.dataset_sha256}")
    if a.source_model:
        _out().print(f"source model {a.source_model}  sha256 {a.source_model_sha256}")
    if a.parent:
        _out().print(f"continued from {a.parent}")
    env = (a.provenance or {}).get("environment", {})
    if env:
        _out().print("environment " + ", ".join(f"{k} {v}" for k, v in sorted(env.items()) if not isinstance(v, (dict, list))))
    if a.metrics:
        _out().print("metrics " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                             for k, v in sorted(a.metrics.items()) if not isinstance(v, (dict, list))))
    timings = (a.provenance or {}).get("timings") or {}
    if timings:  # the runner's phases: where the job's time went
        _out().print("timings " + ", ".join(f"{k.removesuffix('_seconds')} {v:.2f} s" for k, v in timings.items()
                                            if isinstance(v, (int, float))))
    table = Table("file", "size", "sha256", box=None)
    for f in a.files:
        table.add_row(f.path, str(f.size), f.sha256)
    _out().print(table)


class JobProgress:
    """A live progress bar (step, loss, tokens/s, ETA) fed by job views from polling.

    Its tokens/s is the mean over the steps seen (the harmonic mean of the per-step rates: total tokens over total
    time when steps carry equal tokens), the figure the adapter's metrics report, not the last step's.
    """

    def __init__(self, job_id: str):
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("[bold]{task.fields[state]}[/bold]"), BarColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), console=_err(), transient=False)
        self.task = self.progress.add_task(job_id, total=None, state="queued", info="")
        self._rates: dict[tuple, float] = {}

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def mean_tokens_per_s(self, p: dict) -> float | None:
        rate = p.get("tokens_per_s")
        if isinstance(rate, (int, float)) and rate > 0 and isinstance(p.get("step"), int) \
                and p.get("phase") != "publishing":  # publishing repeats the last step's figures
            self._rates[(p.get("phase"), p["step"])] = float(rate)
        if not self._rates:
            return None
        return len(self._rates) / sum(1.0 / r for r in self._rates.values())

    def note(self, text: str) -> None:
        """A line above the bar (a hint), printed once by the caller."""
        self.progress.console.print(text, highlight=False)

    def update(self, job: JobPublic) -> None:
        p = job.progress or {}
        info = _progress_text(p, job.state, self.mean_tokens_per_s(p)) if p else ""
        if p.get("phase") == "extract" and p.get("layer"):
            info += f"  {p['layer']}"
        if job.state == "running" and p.get("phase") == "publishing":  # workers/publish.py says so
            info = f"{p.get('step', '?')}/{p.get('total_steps', '?')}  publishing: uploading the artifact, " \
                   "checksums, catalog"
        elif job.state == "running" and p.get("step") and p.get("step") == p.get("total_steps"):
            info += "  saving the adapter"  # the runner saves it; publishing starts when it exits
        state = "publishing" if job.state == "running" and p.get("phase") == "publishing" else job.state
        self.progress.update(self.task, completed=p.get("step", 0), total=p.get("total_steps"), state=state,
                             info=info)


def events_table(events) -> Table:
    """A job's events as a table: floats rounded, data as key=value pairs."""
    from rich.table import Table

    table = Table("id", "time", "attempt", "type", "state", "data", box=None)
    for e in events:
        data = "  ".join(f"{k}={_num(v)}" for k, v in (e.data or {}).items() if not isinstance(v, (dict, list)))
        table.add_row(str(e.id), f"{e.at:%H:%M:%S}", str(e.attempt), e.type, e.state or "", data)
    return table


def event_line(e) -> str:
    """One event as a line (following live, where a table cannot grow)."""
    data = "  ".join(f"{k}={_num(v)}" for k, v in (e.data or {}).items() if not isinstance(v, (dict, list)))
    return f"{e.id:>6}  {e.at:%H:%M:%S}  a{e.attempt}  {e.type:<10} {e.state or '':<10} {data}"


class TransferProgress:
    """A bar for bytes moving to or from the store (pull, dataset upload, publish); silent when not a terminal.

        with TransferProgress("pull bot:3", total_bytes) as bar:
            bar.advance(n)
    """

    def __init__(self, label: str, total: int | None):
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

        self.enabled = _err().is_terminal
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                 TransferSpeedColumn(), console=_err(), transient=True,
                                 disable=not self.enabled)
        self.task = self.progress.add_task(label, total=total)

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def advance(self, n: int) -> None:
        self.progress.advance(self.task, n)
