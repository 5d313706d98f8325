"""CLI commands for routing and sharing: route, generate, export, import, remote add/list.

With FARM_API_URL set, route, generate (its pull and --route), export and import (of a bundle file) go through
the farm's API; else they use this farm's own catalog and store. generate always runs the model here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from farm.cli import render
from farm.settings import get_settings

JsonOpt = typer.Option(False, "--json", help="Print JSON for scripts.")
remote_app = typer.Typer(help="Other farms whose adapters `farm import REMOTE/NAME` fetches.", no_args_is_help=True)


def _say(text: str) -> None:
    render.console.print(text, highlight=False, soft_wrap=True)


def _api_client(settings):
    """The farm's HTTP client, with progress bars on its transfers when stderr is a terminal."""
    from farm.cli.cmd_console import with_transfer_bars
    from farm.client_http import HttpClient

    return with_transfer_bars(HttpClient(settings))


def _route_answer(query: str, base: Optional[str], top: int, threshold: Optional[float]):
    settings = get_settings()
    if settings.api_url:
        from farm.client_http import HttpClient
        from farm.profiles import RouteAnswer

        with HttpClient(settings) as client:
            params = {"q": query, "top": top, **({"base": base} if base else {}),
                      **({"threshold": threshold} if threshold is not None else {})}
            return RouteAnswer.model_validate(client._call("GET", "/v1/route", params=params))
    from farm.profiles import route as route_query

    return route_query(query, base=base, top=top, threshold=threshold, settings=settings)


def route(
    query: str = typer.Argument(..., help="The request to route, in quotes."),
    base: Optional[str] = typer.Option(None, "--base", help="Only adapters of this base model."),
    top: int = typer.Option(3, "--top", help="How many candidates to show."),
    threshold: Optional[float] = typer.Option(None, "--threshold",
                                              help="Confidence below which nothing fits (default per ranker)."),
    json_out: bool = JsonOpt,
) -> None:
    """Which adapter fits this request: the ranking, with scores, or "none fits" (use the base alone)."""
    answer = _route_answer(query, base, top, threshold)
    if json_out:
        render.print_json(answer)
        return
    table = Table("adapter", "confidence", "score", "matched", "description")
    for c in answer.candidates:
        table.add_row(c.adapter, f"{c.confidence:.3f}", f"{c.score:.3f}", ", ".join(c.matched[:6]),
                      escape((c.description or "")[:60]))
    render.console.print(table)
    _say(f"[bold]{escape(answer.choice)}[/bold] fits: {escape(answer.reason)}" if answer.choice
         else f"none fits: {escape(answer.reason)}")


def generate(
    ref: Optional[str] = typer.Argument(None, help="NAME or NAME:VERSION (with --route: the prompt)."),
    prompt: Optional[str] = typer.Argument(None, help="The prompt, in quotes."),
    route_first: bool = typer.Option(False, "--route", help="Choose the adapter by routing the prompt."),
    compare: bool = typer.Option(False, "--compare", help="Also print the base model's completion."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Tokens to generate."),
    base: Optional[str] = typer.Option(None, "--base", help="Base model to load instead of the recorded one."),
    json_out: bool = JsonOpt,
) -> None:
    """Generate with an adapter on its base model (stock PEFT; needs the worker extra)."""
    from farm.errors import SpecError
    from farm.generate import generate as run, generate_routed

    if route_first:
        if prompt is not None:
            raise SpecError("with --route give only the prompt: `farm generate --route \"PROMPT\"`", field="prompt")
        result = generate_routed(ref or "", compare=compare, max_new_tokens=max_new_tokens, base=base)
    else:
        if ref is None or prompt is None:
            raise SpecError("give an adapter and a prompt: `farm generate NAME[:V] \"PROMPT\"` "
                            "(or `farm generate --route \"PROMPT\"`)", field="prompt")
        result = run(ref, prompt, compare=compare, max_new_tokens=max_new_tokens, base=base)
    if json_out:
        render.print_json(result)
        return
    if result.route:
        _say(f"routed to [bold]{escape(result.adapter)}[/bold]: {escape(result.route['reason'])}")
    template = " (chat template)" if result.chat_template else ""
    _say(f"[bold]{escape(result.adapter)}[/bold] on {escape(result.base_model)}{template}:")
    render.console.print(escape(result.completion), highlight=False, soft_wrap=True)
    if result.base_completion is not None:
        _say("[bold]base model alone[/bold]:")
        render.console.print(escape(result.base_completion), highlight=False, soft_wrap=True)


def export(
    ref: str = typer.Argument(..., help="NAME or NAME:VERSION."),
    file: Path = typer.Argument(..., help="The bundle to write (a new .tar file)."),
    json_out: bool = JsonOpt,
) -> None:
    """Write an adapter version as a bundle another farm can `farm import`: files, checksums, provenance, lineage."""
    settings = get_settings()
    if settings.api_url:
        from farm.client_transfers import export_bundle

        with _api_client(settings) as client:
            result = export_bundle(client, ref, file)
    else:
        from farm.bundles import export_adapter

        result = export_adapter(ref, file)
    if json_out:
        render.print_json(result)
    else:
        _say(f"exported {result.adapter} to {escape(result.path)} ({result.files} files, {result.size} bytes, "
             f"sha256 {result.sha256[:16]}…)")


def import_(
    source: str = typer.Argument(..., help="A bundle FILE.tar, or REMOTE/NAME[:VERSION] from a remote farm."),
    as_name: Optional[str] = typer.Option(None, "--as", help="Record it under this adapter name."),
    json_out: bool = JsonOpt,
) -> None:
    """Import an adapter from a bundle or another farm; every byte is verified before anything is written."""
    from farm.bundles import import_bundle

    path = Path(source)
    settings = get_settings()
    if path.exists() or source.endswith((".tar", ".tar.gz", ".tgz")) or "/" not in source:
        if settings.api_url:  # the farm behind the API verifies and records it
            from farm.client_transfers import import_bundle as upload

            with _api_client(settings) as client:
                result = upload(client, path, as_name=as_name)
        else:
            result = import_bundle(path, as_name=as_name)
    elif settings.api_url:  # the bundle comes here from the remote, then goes to the farm behind the API
        from farm.client_transfers import import_bundle as upload
        from farm.remotes import import_from_remote

        with _api_client(settings) as client:
            result = import_from_remote(source, as_name=as_name, settings=settings,
                                        importer=lambda bundle, _source: upload(client, bundle, as_name=as_name))
    else:
        from farm.remotes import import_from_remote

        result = import_from_remote(source, as_name=as_name)
    if json_out:
        render.print_json(result)
        return
    o = result.origin
    what = "already imported as" if result.already else "imported as"
    _say(f"{what} [bold]{result.adapter}[/bold] ({result.files} files, sha256 verified) from "
         f"{o['name']}:{o['version']} of farm {o['farm_id'][:12]} (job {o.get('job_id') or '-'})")


@remote_app.command("add")
def remote_add(
    name: str = typer.Argument(..., help="A short name for the other farm."),
    url: str = typer.Argument(..., help="Its API address, like https://farm.example:8000."),
    token_env: Optional[str] = typer.Option(None, "--token-env",
                                            help="Environment variable holding its token "
                                                 "(default FARM_REMOTE_<NAME>_TOKEN)."),
    prompt_token: bool = typer.Option(False, "--prompt-token",
                                      help="Type the token now; it is kept in FARM_HOME/remotes/, not the catalog."),
    json_out: bool = JsonOpt,
) -> None:
    """Add another farm; its token comes from the environment (or a prompt) and never enters the catalog."""
    from farm.remotes import add_remote, save_token_file

    settings = get_settings()
    remote = add_remote(name, url, token_env=token_env, settings=settings)
    if prompt_token:
        save_token_file(settings, name, typer.prompt(f"token for {name}", hide_input=True))
        remote.token_available = True
    if json_out:
        render.print_json(remote)
    else:
        token = "available" if remote.token_available else f"not set: export {remote.token_env}=..."
        _say(f"remote {remote.name} -> {escape(remote.url)} (token from {remote.token_env}: {token})")


@remote_app.command("list")
def remote_list(json_out: bool = JsonOpt) -> None:
    """The remote farms, with where their tokens come from."""
    from farm.remotes import list_remotes

    items = list_remotes()
    if json_out:
        render.print_json(items)
        return
    table = Table("name", "url", "token from", "token set")
    for r in items:
        table.add_row(r.name, escape(r.url), r.token_env or "-", "yes" if r.token_available else "no")
    render.console.print(table)


def register(app: typer.Typer) -> None:
    """Add this area's commands to the `farm` app."""
    app.command()(route)
    app.command()(generate)
    app.command()(export)
    app.command("import")(import_)
    app.add_typer(remote_app, name="remote")
