"""The `farm` command line: a thin front end over the service layer (or the HTTP API when FARM_API_URL is set).

A short command loads only what it uses: the command modules of later features (farm/cli/cmd_<area>.py) are
added when a command of theirs, the command list or help is asked for, rich when something is styled, and the
service layer (SQLAlchemy, Celery) only in local mode.
"""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path
from typing import Optional

if os.path.basename(sys.argv[0]) == "farm":  # the console script: main() runs next and turns the collector on
    gc.disable()  # while the imports run, no collection rescans what they build (it all lives to the end)

import typer  # noqa: E402
from typer.core import TyperGroup  # noqa: E402

from farm.cli import render  # noqa: E402
from farm.errors import FarmError, JobFailed, is_invalid_input  # noqa: E402
from farm.settings import get_settings  # noqa: E402

COMMAND_MODULES = ("models", "automation", "adapters_use", "console")
"""Command groups of later features: one module each, farm/cli/cmd_<area>.py, with a `register(app)` function."""
_modules_registered = False
_exit_now = False
"""Set by a short command that finished: main() then ends the process without the interpreter's teardown."""
_cli_process = False
"""Set by main(): this process runs one command and ends (not a test calling the app in its own process)."""


class _FarmGroup(TyperGroup):
    """The `farm` group. Its own commands are there from the start; the command modules' commands are added on
    first need: a name that is not one of this module's, the command list (help, completion, a typo's
    suggestion) or the `commands` mapping itself. The list then is the one a full registration gives, in order."""

    def __init__(self, *args, **kwargs):
        self._complete = _modules_registered
        super().__init__(*args, **kwargs)

    @property
    def commands(self):
        if not self._complete:
            _register_command_modules()
            self._all_commands = typer.main.get_group(app).commands
            self._complete = True
        return self._all_commands

    @commands.setter
    def commands(self, value) -> None:
        self._all_commands = value

    def get_command(self, ctx, cmd_name: str):
        found = self._all_commands.get(cmd_name)
        return found if found is not None else self.commands.get(cmd_name)


app = typer.Typer(help="A training farm for LoRA/QLoRA adapters.", no_args_is_help=True, cls=_FarmGroup,
                  pretty_exceptions_enable=False, add_completion=True)  # farm --install-completion
db_app = typer.Typer(help="Catalog database commands.", no_args_is_help=True)
app.add_typer(db_app, name="db")

JsonOpt = typer.Option(False, "--json", help="Print JSON for scripts.")


def _print_version(value: bool) -> None:
    if value:
        from farm import __version__

        print(f"farm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="Print the farm's version and exit.")) -> None:
    """A training farm for LoRA/QLoRA adapters."""  # farm --version


def _client():
    from farm.client import get_client

    settings = get_settings()
    if settings.api_url:
        _import_http_client()
    else:  # a missing or unmigrated catalog is one line saying what to run
        from farm.catalog.readiness import check_catalog

        check_catalog(settings.database_url, settings.home)
    return get_client()


def _import_http_client() -> None:
    """Import farm.client_http (httpx) without two optional modules a synchronous client never uses: httpx's own
    command line (httpx._main: click, rich, pygments) and httpcore's trio support (httpcore imports trio whenever
    it is installed: a quarter of a second here). Both are hidden during this import only: a later
    `import trio` works (httpcore then lacks trio support in this process, which only an async client under trio
    would need)."""
    if "farm.client_http" in sys.modules:
        return
    hidden = [name for name in ("httpx._main", "trio") if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # an import of it raises ImportError, which httpx and httpcore expect
    try:
        import httpcore  # noqa: F401  (httpx imports it when its first client is made)

        import farm.client_http  # noqa: F401
    finally:
        for name in hidden:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]


@app.command()
def up() -> None:
    """Start what is missing for the embedded defaults: a local Redis, the migrated catalog, the local store."""
    from farm.embedded import ensure_services

    for line in ensure_services(get_settings()):
        render.console.print(line)


@app.command()
def worker(
    cpu: bool = typer.Option(False, "--cpu", help="One CPU worker (serves the farm.cpu queue)."),
    cpus: Optional[int] = typer.Option(None, "--cpus", help="N CPU slots (tests and CPU hosts)."),
    gpus: Optional[str] = typer.Option(None, "--gpus", help="'all' or a list like 0,1,2,3: one worker per device."),
    group: int = typer.Option(1, "--group", help="Devices per worker (for N-device DeepSpeed jobs)."),
) -> None:
    """Start pinned workers: one per device (or per group of devices), restarted if they die."""
    from workers.supervisor import run_supervisor

    if cpus is not None and cpus < 1:
        raise typer.BadParameter(f"--cpus {cpus}: give at least 1 CPU slot")
    if not (cpu or cpus or gpus):
        raise typer.BadParameter("say which devices: --cpu, --cpus N or --gpus all|0,1")
    if cpus or cpu:  # each CPU slot's runner takes its share of the cores (workers/launch.py cpu_share)
        import os

        os.environ["FARM_HOST_CPU_SLOTS"] = str(cpus or 1)
    raise typer.Exit(run_supervisor(gpus=gpus, cpus=cpus or (1 if cpu else None), group=group,
                                    settings=get_settings()))


@app.command()
def submit(
    spec: Path = typer.Argument(..., help="Job spec (YAML)."),
    wait: bool = typer.Option(False, "--wait", help="Show progress until the job ends; non-zero exit if it fails."),
    json_out: bool = JsonOpt,
    force: bool = typer.Option(False, "--force", help="Train even if an identical job succeeded or is in flight."),
) -> None:
    """Validate a job spec and enqueue it; prints the job id."""
    global _exit_now

    if _cli_process:  # a short command: no cyclic garbage collection (a tenth of its CPU); its cycles die with it
        gc.disable()
    settings = get_settings()
    if _cli_process and not settings.api_url:  # Celery loads and connects on the other core meanwhile
        from farm import doorbell_helper

        doorbell_helper.start(settings.broker_url)
    client = _client()
    if not render.plain_stream(sys.stderr):  # a bar on dataset uploads (rich decides: a terminal?)
        from farm.cli.cmd_console import with_transfer_bars

        client = with_transfer_bars(client)
    try:
        job = client.submit(spec, force=force)
    finally:
        if "farm.doorbell_helper" in sys.modules:
            sys.modules["farm.doorbell_helper"].discard()  # unused: a duplicate, or the spec was refused
    if json_out and not wait:
        render.print_json(job)
        _exit_now = True
        return
    if not json_out and job.deduplicated:
        tail = f" ({job.state}{', adapter ' + job.adapter if job.adapter else ''}): not submitted again " \
               "(--force trains anyway)"
        render.print_line(f"identical to job [bold]{job.id}[/bold]{tail}", f"identical to job {job.id}{tail}")
    elif not json_out:
        tail = f" ({job.kind} {job.name}) to {job.queue}"
        render.print_line(f"submitted job [bold]{job.id}[/bold]{tail}", f"submitted job {job.id}{tail}")
    for note in getattr(job, "notes", None) or []:  # what the door could not check
        from rich.markup import escape

        render.err_console.print(f"[yellow]not checked at submit[/yellow]: {escape(note)}", highlight=False)
    if wait:
        if not gc.isenabled():  # waiting may take hours: collect again, never rescanning what was loaded
            gc.freeze()
            gc.enable()
        job = _wait(client, job.id, quiet=json_out)
        if json_out:
            render.print_json(job)
        if job.state != "succeeded":
            raise JobFailed(f"job {job.id} ended {job.state}"
                            + (f": {job.error.code}: {job.error.message}" if job.error else ""))
    _exit_now = True


def _wait(client, job_id: str, quiet: bool = False):
    if quiet:
        return client.wait(job_id)
    from farm.cli.cmd_console import with_queue_hint  # says when no worker serves the job's queue

    with render.JobProgress(job_id) as bar:
        job = client.wait(job_id, on_update=with_queue_hint(client, bar))
    render.job_detail(job)
    return job


@app.command()
def jobs(
    state: Optional[str] = typer.Option(None, help="Only jobs in this state."),
    kind: Optional[str] = typer.Option(None, help="train or extract."),
    name: Optional[str] = typer.Option(None, help="Only jobs publishing this adapter name."),
    limit: int = typer.Option(50, help="How many (newest first)."),
    json_out: bool = JsonOpt,
) -> None:
    """List jobs."""
    items = _client().list_jobs(state=state, kind=kind, name=name, limit=limit)
    render.print_json(items) if json_out else render.console.print(render.jobs_table(items))


@app.command()
def show(job_id: str, json_out: bool = JsonOpt,
         follow: bool = typer.Option(False, "--follow", "-f", help="Follow progress until the job ends.")) -> None:
    """A job's state, progress and error (accepts a unique id prefix)."""
    client = _client()
    if follow:
        job = _wait(client, job_id, quiet=json_out)
    else:
        job = client.get_job(job_id)
        if not json_out:
            render.job_detail(job)
    if json_out:
        render.print_json(job)


@app.command()
def events(job_id: str, after: int = typer.Option(0, help="Only events after this id."), json_out: bool = JsonOpt,
           follow: bool = typer.Option(False, "--follow", "-f", help="Follow new events until the job ends.")) -> None:
    """A job's event log (state changes, progress, evals, checkpoints): a table, or --json."""
    from farm.cli.cmd_console import show_events

    show_events(_client(), job_id, after=after, json_out=json_out, follow=follow)


@app.command()
def cancel(job_id: str, json_out: bool = JsonOpt) -> None:
    """Cancel a job (a running one is stopped with its whole process group)."""
    job = _client().cancel(job_id)
    render.print_json(job) if json_out else render.console.print(f"job {job.id} is {job.state}")


@app.command()
def adapters(name: Optional[str] = typer.Argument(None), json_out: bool = JsonOpt) -> None:
    """List published adapter versions."""
    items = _client().list_adapters(name)
    render.print_json(items) if json_out else render.console.print(render.adapters_table(items))


@app.command()
def adapter(ref: str = typer.Argument(..., help="NAME or NAME:VERSION."), json_out: bool = JsonOpt) -> None:
    """An adapter version's provenance and files."""
    a = _client().get_adapter(ref)
    render.print_json(a) if json_out else render.adapter_detail(a)


@app.command()
def pull(ref: str = typer.Argument(..., help="NAME or NAME:VERSION, or a checkpoint JOB@step-K."),
         dest: Path = typer.Argument(..., help="Folder to create (must not exist or be empty)."),
         json_out: bool = JsonOpt) -> None:
    """Download an adapter (or a job's checkpoint as a PEFT adapter); every file's sha256 is verified before it
    appears at DEST."""
    if "@" in ref:  # JOB@step-K
        from farm.cli.cmd_models import pull_checkpoint

        result = pull_checkpoint(ref, dest)
    else:
        from farm.cli.cmd_console import pull_with_progress  # a progress bar

        result = pull_with_progress(_client(), ref, dest)
    if json_out:
        render.print_json(result)
    elif "@" in ref:
        render.console.print(f"pulled {result.name} to {result.dest} ({len(result.files)} files, sha256 verified)")
    else:
        render.console.print(f"pulled {result.name}:{result.version} to {result.dest} "
                             f"({len(result.files)} files, sha256 verified)")


@app.command()
def spec(kind: str = typer.Argument("train", help="A job kind: train, extract, merge (every registered kind).")
         ) -> None:
    """Every field of a job spec (train, extract, merge, ...): its default and what it means."""
    from farm.cli.spec_help import spec_tree
    from farm.kinds import get_kind, kind_names

    job_kind = get_kind(kind)
    if job_kind is None:
        raise typer.BadParameter(f"unknown kind {kind[:40]!r}: one of {', '.join(kind_names())}")
    render.console.print(spec_tree(job_kind.spec, f"kind: {kind}"))


@app.command()
def reap() -> None:
    """Requeue jobs whose worker stopped heartbeating (workers do this on their own too)."""
    from farm.service import reap_lost_jobs

    ids = reap_lost_jobs()
    render.console.print(f"requeued {len(ids)} job(s) " + " ".join(ids))


@app.command()
def flower(port: int = typer.Option(5555, help="Port to serve Flower on."),
           host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind (0.0.0.0 in a container)."),
           no_auth: bool = typer.Option(False, "--no-auth", help="Run without basic auth (local use only).")) -> None:
    """Start Flower on the farm's broker (basic auth from FARM_FLOWER_BASIC_AUTH)."""
    from farm.flower import run_flower

    run_flower(port=port, settings=get_settings(), address=host, no_auth=no_auth)


@app.command()
def api(host: str = typer.Option("127.0.0.1", help="Interface to bind."),
        port: int = typer.Option(8000, help="Port.")) -> None:
    """Serve the HTTP API (uvicorn)."""
    from api.app import serve

    serve(host=host, port=port)


@db_app.command("upgrade")
def db_upgrade(revision: str = typer.Argument("head")) -> None:
    """Migrate the catalog (FARM_DATABASE_URL) to the given Alembic revision."""
    from farm.catalog.migrate import upgrade_database

    settings = get_settings()
    upgrade_database(settings.database_url, revision)
    render.console.print(f"catalog at {revision}")


@app.command()
def demo(workdir: Path = typer.Option(Path(".farm/demo"), help="Where the demo writes its model, data and spec."),
         steps: int = typer.Option(200, help="Training steps (200: the adapter learns every answer).")) -> None:
    """The farm end to end on this machine: start services and a CPU worker, train a tiny QLoRA adapter, pull it,
    load it with PEFT, generate a line, print its provenance."""
    from farm.cli.demo import run_demo

    run_demo(workdir, steps=steps)


def _register_command_modules() -> None:
    """Add the commands of every module in COMMAND_MODULES to `app` (once; _FarmGroup calls it on first need)."""
    global _modules_registered
    if _modules_registered:
        return
    import importlib

    _modules_registered = True
    for area in COMMAND_MODULES:
        importlib.import_module(f"farm.cli.cmd_{area}").register(app)


def _exit_without_teardown(code) -> None:
    """End the process now, as sys.exit(code) would, skipping the interpreter's teardown (freeing every module
    and object: a tenth of a second of CPU after SQLAlchemy, pydantic and Celery were loaded).

    Only for a command that finished (`_exit_now`): its output is flushed here; the catalog's transaction was
    committed, the broker message was sent (kombu publishes synchronously) and the OS closes their sockets and
    files as at any exit (SQLite's WAL stays consistent). The atexit hooks a submit leaves are logging.shutdown
    (the CLI has no handler but libraries' NullHandlers), weakref.finalize's (no finalizer marked to run at
    exit) and multiprocessing's (no child, no registered finalizer): nothing is lost. Falls back to a normal
    exit when a flush fails (a closed pipe) or a non-daemon thread still runs."""
    import threading

    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(code)
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:
        print(code, file=sys.stderr)
        status = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:
        sys.exit(code)
    os._exit(status)


def main() -> None:
    """Entry point: FarmErrors become a clear message and a non-zero exit, not a traceback."""
    global _cli_process
    _cli_process = True
    gc.freeze()  # what the imports made lives as long as the process: no collection scans it again
    gc.enable()  # off while the console script imported this module
    render.quiet_libraries()  # no library warnings or third-party bars in the CLI's output
    try:
        app()
    except FarmError as exc:
        from rich.markup import escape

        render.err_console.print(f"[red]error[/red] ({exc.code}): {escape(exc.message)}", highlight=False,
                                 soft_wrap=True)
        sys.exit(2 if is_invalid_input(exc.code) else 1)
    except SystemExit as exc:
        if _exit_now:
            _exit_without_teardown(exc.code)
        raise


if __name__ == "__main__":
    main()
