"""CLI commands for automation: feedback, retrain, lineage, schedule, beat, replay, deliveries.

Locally they call farm.automation; with FARM_API_URL set they call the API's routes (api/routes/automation.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from farm.cli import render
from farm.settings import get_settings

JsonOpt = typer.Option(False, "--json", help="Print JSON for scripts.")
schedule_app = typer.Typer(help="Submit a spec on a cron expression or every N seconds (run `farm beat`).",
                           no_args_is_help=True)


def _api():
    """The HTTP client when FARM_API_URL is set, else None (local service layer)."""
    settings = get_settings()
    if not settings.api_url:
        return None
    from farm.client_http import HttpClient

    return HttpClient(settings)


def _out(data, json_out: bool, text: str) -> None:
    if json_out:
        print(json.dumps(data, indent=2, default=str))
    else:
        render.console.print(text, highlight=False)


def feedback(name: str = typer.Argument(..., help="Adapter name."),
             file: Path = typer.Argument(..., help="JSONL rows in the adapter's dataset format."),
             json_out: bool = JsonOpt) -> None:
    """Add learning events to an adapter's pool; its retraining policy starts a job every N new rows."""
    api = _api()
    if api is not None:
        from farm.errors import DatasetError

        try:
            body = file.read_bytes()
        except OSError as exc:
            raise DatasetError(f"{file}: cannot read: {exc}", field="feedback") from None
        data = api._call("POST", f"/v1/adapters/{name}/feedback", content=body,
                         headers={"Content-Type": "application/x-ndjson"})
    else:
        from farm.automation.feedback import add_feedback

        data = add_feedback(name, file).to_dict()
    every = f" of {data['every']}" if data["every"] else " (no retraining policy: `farm retrain NAME --every N`)"
    started = f"; started retraining job {data['retrain_job']}" if data["retrain_job"] else ""
    _out(data, json_out, f"{data['added']} new of {data['received']} rows; pool holds {data['pool_new']}{every}"
                         f"{started}")


def retrain(name: str = typer.Argument(..., help="Adapter name."),
            every: Optional[int] = typer.Option(None, "--every", help="Retrain each time N new rows arrived."),
            replay: float = typer.Option(0.5, "--replay", help="Earlier rows added per new row (rehearsal)."),
            max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Steps of each retraining."),
            off: bool = typer.Option(False, "--off", help="Remove the policy set here."),
            json_out: bool = JsonOpt) -> None:
    """Set an adapter's retraining policy (without --every: show its pool, policy and retrainings)."""
    api = _api()
    if off:
        if api is not None:
            api._call("DELETE", f"/v1/adapters/{name}/retrain")
        else:
            from farm.automation.retrain import remove_policy

            remove_policy(name)
        _out({"adapter": name, "policy": None}, json_out, f"{name}: retraining policy removed")
        return
    if every is not None:
        body = {"every": every, "replay": replay, "max_steps": max_steps}
        if api is not None:
            data = api._call("PUT", f"/v1/adapters/{name}/retrain", json=body)
        else:
            from farm.automation.retrain import set_policy

            data = set_policy(name, **body)
    elif api is not None:
        data = api._call("GET", f"/v1/adapters/{name}/retrain")
    else:
        from farm.automation.retrain import pool_status

        data = pool_status(name)
    p = data["policy"]
    policy = (f"every {p['every']} rows, replay {p['replay']}, max_steps {p['max_steps']} ({p['source']})"
              if p else "no policy")
    lines = [f"{name}: {policy}; pool {data['pool_new']} new, {data['pool_used']} used"]
    lines += [f"  job {r['job_id']} from {r['parent']}: {r['rows']} rows + {r['replay_rows']} replayed"
              for r in data["runs"]]
    _out(data, json_out, "\n".join(lines))


def lineage(ref: str = typer.Argument(..., help="NAME or NAME:VERSION."), json_out: bool = JsonOpt) -> None:
    """Where an adapter version came from: parent, feedback events, replay_of."""
    api = _api()
    if api is not None:
        name, _, version = ref.partition(":")
        data = api._call("GET", f"/v1/adapters/{name}/lineage", params={"version": version} if version else None)
    else:
        from farm.automation.retrain import adapter_lineage

        data = adapter_lineage(ref)
    _out(data, json_out, f"{data['adapter']} ({data['origin'] or 'submit'}): parent {data['parent']}, "
                         f"replay_of {data['replay_of']}, {len(data['feedback_events'])} feedback events")


def replay(ref: str = typer.Argument(..., help="NAME or NAME:VERSION to rerun."),
           verify: bool = typer.Option(False, "--verify", help="Wait, then compare the new weights with the old."),
           json_out: bool = JsonOpt) -> None:
    """Rerun the job behind an adapter version: dataset pinned by digest, base model checked by hash."""
    from farm.client import get_client
    from farm.errors import JobFailed

    api = _api()
    if api is not None:
        name, _, version = ref.partition(":")
        from farm.schemas import JobPublic

        job = JobPublic.model_validate(api._call("POST", f"/v1/adapters/{name}/replay",
                                                 params={"version": version} if version else None))
    else:
        from farm.automation.replay import replay_adapter

        job = replay_adapter(ref)
    if not verify:
        _out(job.model_dump(mode="json"), json_out, f"replaying {ref}: job {job.id}")
        return
    if not json_out:
        render.console.print(f"replaying {ref}: job {job.id}; waiting for it")
    job = get_client().wait(job.id)
    if job.state != "succeeded":
        raise JobFailed(f"replay job {job.id} ended {job.state}" + (f": {job.error.message}" if job.error else ""))
    if api is not None:
        name, _, version = ref.partition(":")
        data = api._call("GET", f"/v1/adapters/{name}/compare", params={"version": version or None,
                                                                      "other": job.adapter})
    else:
        from farm.automation.replay import verify_replay

        data = verify_replay(ref, job.adapter)
    verdict = ("identical bytes" if data["identical"] else
               f"differs: largest weight difference {data['max_abs_diff']} in {data['tensor']}")
    _out({**data, "job_id": job.id}, json_out, f"{data['replay']} vs {data['original']}: {verdict}")


def deliveries(job_id: str = typer.Argument(..., help="Job id (or a unique prefix)."), json_out: bool = JsonOpt) -> None:
    """A job's webhook deliveries and every attempt of each."""
    api = _api()
    if api is not None:
        data = api._call("GET", f"/v1/jobs/{job_id}/deliveries")
    else:
        from farm.automation.webhooks import list_deliveries

        data = list_deliveries(job_id)
    lines = []
    for d in data:
        lines.append(f"{d['id']} {d['event']} -> {d['url']}: {d['state']}")
        lines += [f"  #{a['attempt']} {a['at']} {a['status_code'] or '-'} {a['error'] or 'ok'} ({a['duration_ms']} ms)"
                  for a in d["attempts"]]
    _out(data, json_out, "\n".join(lines) or "no deliveries (no notify: in the spec and no FARM_WEBHOOK_URLS)")


@schedule_app.command("add")
def schedule_add(spec: Path = typer.Argument(..., help="Job spec (YAML)."),
                 cron: Optional[str] = typer.Option(None, "--cron", help='Cron expression in UTC, e.g. "0 3 * * *".'),
                 every: Optional[str] = typer.Option(None, "--every", help="Interval: 30s, 10m, 6h, 2d."),
                 name: Optional[str] = typer.Option(None, "--name", help="Schedule name (default: the spec's name)."),
                 json_out: bool = JsonOpt) -> None:
    """Submit SPEC on a schedule (checked now, validated again at each firing)."""
    api = _api()
    if api is not None:
        from farm.names import is_store_ref
        from farm.specs import TrainSpec, load_spec, spec_to_dict

        loaded = load_spec(spec)
        if isinstance(loaded, TrainSpec):  # the server cannot read this machine's files: upload them, as submit does
            updates = {f: api.upload_dataset(ref, loaded.dataset.format, field=f"dataset.{f}").uri
                       for f in ("path", "eval_path")
                       if (ref := getattr(loaded.dataset, f)) and not is_store_ref(ref) and "://" not in ref}
            loaded = loaded.model_copy(update={"dataset": loaded.dataset.model_copy(update=updates)})
        body = {"spec": spec_to_dict(loaded), "cron": cron, "every": every, "name": name}
        data = api._call("POST", "/v1/schedules", json=body)
    else:
        from farm.automation.schedules import add_schedule

        data = add_schedule(spec, cron=cron, every=every, name=name, created_by="local")
    _out(data, json_out, f"schedule {data['name']}: next slot {data['next_slot']} (run `farm beat`)")


@schedule_app.command("list")
def schedule_list(json_out: bool = JsonOpt) -> None:
    """Schedules, their next slot and last firing."""
    api = _api()
    if api is not None:
        data = api._call("GET", "/v1/schedules")
    else:
        from farm.automation.schedules import list_schedules

        data = list_schedules()
    lines = [f"{s['name']:<24} {s['cron'] or str(s['every_seconds']) + 's':<14} "
             f"{'paused' if s['paused'] else 'next ' + s['next_slot']}  last: "
             f"{(s['last_firing'] or {}).get('outcome', '-')} {(s['last_firing'] or {}).get('job_id') or ''}"
             for s in data]
    _out(data, json_out, "\n".join(lines) or "no schedules")


def _pause(name: str, paused: bool, json_out: bool) -> None:
    api = _api()
    if api is not None:
        data = api._call("POST", f"/v1/schedules/{name}/{'pause' if paused else 'resume'}")
    else:
        from farm.automation.schedules import set_paused

        data = set_paused(name, paused)
    _out(data, json_out, f"schedule {name} {'paused' if paused else 'resumed'}")


@schedule_app.command("pause")
def schedule_pause(name: str, json_out: bool = JsonOpt) -> None:
    """Stop firing a schedule until `farm schedule resume`."""
    _pause(name, True, json_out)


@schedule_app.command("resume")
def schedule_resume(name: str, json_out: bool = JsonOpt) -> None:
    """Fire a paused schedule again from its next slot."""
    _pause(name, False, json_out)


@schedule_app.command("rm")
def schedule_rm(name: str) -> None:
    """Delete a schedule (the jobs it started stay)."""
    api = _api()
    if api is not None:
        api._call("DELETE", f"/v1/schedules/{name}")
    else:
        from farm.automation.schedules import remove_schedule

        remove_schedule(name)
    render.console.print(f"schedule {name} removed")


def beat(loglevel: str = typer.Option("INFO", "--loglevel", help="Celery log level.")) -> None:
    """Run Celery beat with the farm's catalog scheduler: fires schedules, retrainings and webhooks."""
    from workers.beat import run_beat

    run_beat(get_settings(), loglevel=loglevel)


def register(app: typer.Typer) -> None:
    """Add this area's commands to the `farm` app."""
    for fn in (feedback, retrain, lineage, replay, deliveries, beat):
        app.command()(fn)
    app.add_typer(schedule_app, name="schedule")
