"""How the CLI shows things: rich tables for people, JSON for scripts, a live progress bar for running jobs."""

from __future__ import annotations

import json
from typing import Iterable

from pydantic import BaseModel
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from farm.schemas import AdapterPublic, JobPublic

console = Console()
err_console = Console(stderr=True)


def print_json(data) -> None:
    if isinstance(data, BaseModel):
        data = data.model_dump(mode="json")
    elif isinstance(data, list):
        data = [d.model_dump(mode="json") if isinstance(d, BaseModel) else d for d in data]
    print(json.dumps(data, indent=2, default=str))


def _progress_text(p: dict | None) -> str:
    if not p:
        return ""
    parts = [f"{p.get('step', '?')}/{p.get('total_steps', '?')}"]
    if p.get("loss") is not None:
        parts.append(f"loss {p['loss']:.4f}")
    if p.get("lr") is not None:
        parts.append(f"lr {p['lr']:.2e}")
    if p.get("tokens_per_s"):
        parts.append(f"{p['tokens_per_s']:.0f} tok/s")
    if p.get("eta_s") is not None:
        parts.append(f"eta {p['eta_s']:.0f}s")
    return "  ".join(parts)


def jobs_table(jobs: Iterable[JobPublic]) -> Table:
    table = Table("id", "kind", "name", "state", "progress", "attempt", "created", box=None)
    for j in jobs:
        table.add_row(j.id[:12], j.kind, j.name, j.state, _progress_text(j.progress) or (j.adapter or ""),
                      f"{j.attempt}/{j.max_attempts}", j.created_at.strftime("%Y-%m-%d %H:%M:%S"))
    return table


def job_detail(job: JobPublic) -> None:
    console.print(f"[bold]{job.id}[/bold]  {job.kind} [cyan]{job.name}[/cyan]  state [bold]{job.state}[/bold]")
    console.print(f"queue {job.queue}  attempt {job.attempt}/{job.max_attempts}  worker {job.worker or '-'}  "
                  f"submitted by {job.submitted_by or '-'}")
    if job.progress:
        p = job.progress
        console.print(f"progress {_progress_text(p)}")
    if job.adapter:
        console.print(f"adapter [green]{job.adapter}[/green]")
    if job.error:
        console.print(f"[red]error {job.error.code}[/red]: {job.error.message}")


def adapters_table(adapters: Iterable[AdapterPublic]) -> Table:
    table = Table("name", "version", "kind", "base model", "final loss", "published", box=None)
    for a in adapters:
        loss = (a.metrics or {}).get("final_loss")
        table.add_row(a.name, str(a.version), a.kind, a.base_model or "-",
                      f"{loss:.4f}" if isinstance(loss, (int, float)) else "-",
                      a.published_at.strftime("%Y-%m-%d %H:%M:%S") if a.published_at else "-")
    return table


def adapter_detail(a: AdapterPublic) -> None:
    console.print(f"[bold]{a.name}:{a.version}[/bold] ({a.kind})  {a.uri}")
    console.print(f"job {a.job_id}  spec sha256 {a.spec_hash[:16]}…")
    console.print(f"base model {a.base_model}  sha256 {a.base_model_sha256 or '-'}")
    if a.dataset_uri:
        console.print(f"dataset {a.dataset_uri}  sha256 {a.dataset_sha256}")
    if a.source_model:
        console.print(f"source model {a.source_model}  sha256 {a.source_model_sha256}")
    if a.parent:
        console.print(f"continued from {a.parent}")
    env = (a.provenance or {}).get("environment", {})
    if env:
        console.print("environment " + ", ".join(f"{k} {v}" for k, v in sorted(env.items()) if not isinstance(v, (dict, list))))
    if a.metrics:
        console.print("metrics " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                             for k, v in sorted(a.metrics.items()) if not isinstance(v, (dict, list))))
    table = Table("file", "size", "sha256", box=None)
    for f in a.files:
        table.add_row(f.path, str(f.size), f.sha256)
    console.print(table)


class JobProgress:
    """A live progress bar (step, loss, tokens/s, ETA) fed by job views from polling."""

    def __init__(self, job_id: str):
        self.progress = Progress(
            TextColumn("[bold]{task.fields[state]}[/bold]"), BarColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), console=err_console, transient=False)
        self.task = self.progress.add_task(job_id, total=None, state="queued", info="")

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def update(self, job: JobPublic) -> None:
        p = job.progress or {}
        info = _progress_text(p) if p else ""
        if p.get("phase") == "extract" and p.get("layer"):
            info += f"  {p['layer']}"
        self.progress.update(self.task, completed=p.get("step", 0), total=p.get("total_steps"), state=job.state,
                             info=info)
