"""CLI commands for seeing the farm: `farm logs`, and the helpers behind `farm events [-f]` and the
no-worker hint of `farm submit --wait`."""

from __future__ import annotations

import time
from typing import Callable, Optional

import typer

from farm.cli import render
from farm.names import CPU_QUEUE
from farm.schemas import JobPublic

TERMINAL = ("succeeded", "failed", "cancelled")
HINT_AFTER_S = 5.0
"""How long a job may wait in its queue before `--wait` checks that some worker serves that queue."""
FOLLOW_POLL_S = 0.5


def register(app: typer.Typer) -> None:
    """Add this area's commands to the `farm` app."""
    app.command("logs")(logs)


# ---------------------------------------------------------------- farm logs


def logs(job_id: str = typer.Argument(..., help="Job id (a unique prefix works)."),
         attempt: Optional[int] = typer.Option(None, "--attempt", min=1, help="Attempt number (default: latest)."),
         follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new lines until the attempt ends."),
         ) -> None:
    """The runner's whole log of one attempt of a job (kept in the store; the latest attempt by default)."""
    from farm.cli.main import _client
    from farm.errors import NotFound

    client = _client()
    read = _log_reader(client)
    shown, current = 0, None
    finishing = False
    while True:
        try:
            number, text = read(job_id, attempt)
        except NotFound:
            if not follow:
                raise
            number, text = current, ""
        if number != current:  # following the latest attempt: a new one started
            if current is not None:
                render.console.out(f"--- attempt {number} ---", highlight=False)
            shown, current = 0, number
        if len(text) > shown:
            render.console.out(text[shown:], end="", highlight=False)
            shown = len(text)
        if not follow or finishing:
            return
        # One more read after the job ended: the worker uploads the attempt's last lines as it finishes.
        finishing = client.get_job(job_id).state in TERMINAL
        time.sleep(1.0)


def _log_reader(client) -> Callable[[str, int | None], tuple[int, str]]:
    if hasattr(client, "job_log"):
        return client.job_log
    from farm.job_logs import read_job_log

    def read(job_id: str, attempt: int | None) -> tuple[int, str]:
        _, number, text = read_job_log(job_id, attempt, settings=client.settings)
        return number, text

    return read


# ---------------------------------------------------------------- farm events


def show_events(client, job_id: str, *, after: int = 0, json_out: bool = False, follow: bool = False) -> None:
    """Print a job's events: a table (floats rounded) or JSON; with `follow`, new ones as they happen, locally by
    polling the catalog, through the API by its server-sent event stream."""
    if not follow:
        items = client.job_events(job_id, after)
        render.print_json(items) if json_out else render.console.print(render.events_table(items))
        return
    for event in follow_events(client, job_id, after):
        if json_out:
            print(event.model_dump_json(), flush=True)  # one JSON object a line
        else:
            render.console.print(render.event_line(event), highlight=False)


def follow_events(client, job_id: str, after: int = 0):
    """The job's events after `after`, then new ones until the job ends."""
    if hasattr(client, "follow_events"):
        yield from client.follow_events(client.get_job(job_id).id, after)
        return
    while True:
        job = client.get_job(job_id)  # the state BEFORE the events: a terminal job's last events are read next
        events = client.job_events(job.id, after)
        for event in events:
            after = event.id
            yield event
        if job.state in TERMINAL and not events:
            return
        if not events:
            time.sleep(FOLLOW_POLL_S)


# ---------------------------------------------------------------- farm submit --wait


def worker_command(queue: str) -> str:
    """The command that starts a worker serving `queue` (farm.cpu, farm.cpu.N, farm.gpu.N)."""
    parts = queue.split(".")
    if queue == CPU_QUEUE:
        return "farm worker --cpu"
    if len(parts) == 3 and parts[2].isdigit():
        n = int(parts[2])
        if parts[1] == "gpu":
            return "farm worker --gpus all" + (f" --group {n}" if n > 1 else "")
        if parts[1] == "cpu":
            return f"farm worker --cpus {n} --group {n}"
    return f"a worker consuming the queue {queue}"


def served_queues(client) -> set[str] | None:
    """Queues some live worker consumes, asked through the client (None when that cannot be told)."""
    try:
        if hasattr(client, "served_queues"):
            return client.served_queues()
        from farm.console import served_queues as local_served_queues

        return local_served_queues(settings=client.settings)
    except Exception:
        return None


def with_queue_hint(client, bar: render.JobProgress) -> Callable[[JobPublic], None]:
    """`bar.update`, plus a one-time note when the job has waited HINT_AFTER_S and no worker serves its queue."""
    since = time.monotonic()
    told = False

    def update(job: JobPublic) -> None:
        nonlocal told
        bar.update(job)
        if told or job.state != "queued" or time.monotonic() - since < HINT_AFTER_S:
            return
        told = True
        queues = served_queues(client)
        if queues is not None and job.queue not in queues:
            bar.note(f"no worker serves the queue {job.queue}: the job waits until one does. Start one with "
                     f"`{worker_command(job.queue)}`")

    return update


# ---------------------------------------------------------------- transfer bars


def with_transfer_bars(client):
    """The client, with progress bars on its uploads and downloads when stderr is a terminal."""
    if hasattr(client, "transfer_progress") and render.err_console.is_terminal:
        client.transfer_progress = render.TransferProgress
    return client


def pull_with_progress(client, ref: str, dest):
    """`client.pull`, with a bar in bytes (one step per verified file) on a terminal."""
    with_transfer_bars(client)
    if hasattr(client, "transfer_progress") or not render.err_console.is_terminal:
        return client.pull(ref, dest)
    from farm import service

    view = service.get_adapter(ref, settings=client.settings)
    with render.TransferProgress(f"pull {view.name}:{view.version}", sum(f.size for f in view.files)) as bar:
        return service.pull_adapter(ref, dest, settings=client.settings, on_bytes=bar.advance)
