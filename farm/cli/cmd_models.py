"""CLI commands for checkpoints and merges: `farm checkpoints JOB`, `farm merge NAME[:V]` (and
`farm pull JOB@step-K` in main)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from farm.cli import render
from farm.settings import get_settings

_DTYPES = ("bfloat16", "float16", "float32")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"


def _http():
    from farm.client_http import HttpClient

    settings = get_settings()
    return HttpClient(settings) if settings.api_url else None


def checkpoints(job_id: str = typer.Argument(..., help="Job id (or a unique prefix)."),
                json_out: bool = typer.Option(False, "--json", help="Print JSON for scripts.")) -> None:
    """A job's checkpoints in the store: step, train loss, eval loss, size (pull one: `farm pull JOB@step-K DEST`)."""
    from farm.checkpoints import CheckpointPublic, list_checkpoints

    http = _http()
    if http is not None:
        items = [CheckpointPublic.model_validate(c) for c in http._call("GET", f"/v1/jobs/{job_id}/checkpoints")]
    else:
        items = list_checkpoints(job_id)
    if json_out:
        render.print_json(items)
        return
    table = Table("checkpoint", "step", "loss", "eval loss", "size", "saved", box=None)
    for c in items:
        table.add_row(c.ref, str(c.step), _fmt(c.loss), _fmt(c.eval_loss), _size(c.size),
                      c.created_at.strftime("%Y-%m-%d %H:%M:%S"))
    render.console.print(table if items else f"job {job_id}: no checkpoints in the store")


def merge(ref: str = typer.Argument(..., help="Adapter NAME or NAME:VERSION."),
          dtype: str = typer.Option("bfloat16", "--dtype", help="bfloat16, float16 or float32 (never 4-bit)."),
          name: Optional[str] = typer.Option(None, "--name", help="Name of the merged model (default NAME-merged)."),
          max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Largest safetensors shard."),
          wait: bool = typer.Option(False, "--wait", help="Wait until the merge job ends."),
          json_out: bool = typer.Option(False, "--json", help="Print JSON for scripts.")) -> None:
    """Merge an adapter into its base model on a worker; the result is a standard transformers model in the catalog,
    usable as `base_model: farm:NAME:V` and pulled with `farm pull NAME:V DEST`."""
    if dtype not in _DTYPES:
        raise typer.BadParameter(f"--dtype must be one of {', '.join(_DTYPES)}")
    http = _http()
    if http is not None:
        from farm.schemas import JobPublic

        job = JobPublic.model_validate(http._call("POST", "/v1/merges", json={
            "adapter": ref, "dtype": dtype, "name": name, "max_shard_size": max_shard_size}))
    else:
        from farm.merge.service import submit_merge

        job = submit_merge(ref, dtype=dtype, name=name, max_shard_size=max_shard_size)
    for note in job.notes:
        render.err_console.print(f"[yellow]not checked here[/yellow]: {escape(note)}", highlight=False)
    if wait:
        from farm.client import get_client

        job = get_client().wait(job.id)
    if json_out:
        render.print_json(job)
    else:
        render.console.print(f"job {job.id} ({job.kind} of {job.spec.get('adapter')} into {job.name}) is {job.state}"
                             + (f": {job.adapter}" if job.adapter else ""))
    if wait and job.state != "succeeded":
        raise typer.Exit(1)


def pull_checkpoint(ref: str, dest: Path):
    """`farm pull JOB@step-K DEST`: the checkpoint's adapter folder, every file's sha256 verified (through the
    farm's API when FARM_API_URL is set, else from the store)."""
    from farm.checkpoints import pull_checkpoint as pull

    http = _http()
    if http is not None:
        from farm.cli.cmd_console import with_transfer_bars
        from farm.client_transfers import pull_checkpoint as pull_remote

        with with_transfer_bars(http) as client:
            return pull_remote(client, ref, Path(dest))
    return pull(ref, dest)


def register(app: typer.Typer) -> None:
    """Add this area's commands to the `farm` app."""
    app.command("checkpoints")(checkpoints)
    app.command("merge")(merge)
