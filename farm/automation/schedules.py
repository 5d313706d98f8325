"""Schedules: a spec submitted on a cron expression (UTC) or every N seconds, fired by `farm beat`.

A schedule keeps the spec as given (local paths made absolute), not a validated copy: each firing goes through
`farm.service.submit_job`, so the dataset is read and checked again at that moment, and an unchanged dataset is
folded into the job that already trained on it (dedupe) instead of training again.

Each slot (a cron time, or created_at + k x every) fires once: the `schedule_firings` row unique on
(schedule_id, slot_at) is inserted in the transaction that records the job. A second beat process that reaches
the same slot fails on that constraint and queues nothing. Missed slots are not caught up: after a pause or a
stopped beat, only the latest due slot fires.
"""

from __future__ import annotations

import logging
import re
import uuid
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from farm.catalog.models import JobLineage, Schedule, ScheduleFiring, utcnow
from farm.catalog.session import session_scope
from farm.errors import FarmError, NotFound, SpecError
from farm.settings import FarmSettings, get_settings
from farm.specs import ADAPTER_NAME_PATTERN, load_spec, parse_spec, spec_to_dict

log = logging.getLogger("farm.automation")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_every(text: str) -> int:
    """A duration such as 30s, 10m, 6h or 2d, in seconds."""
    match = re.fullmatch(r"\s*(\d+)\s*([smhd])\s*", text or "")
    if not match or int(match.group(1)) == 0:
        raise SpecError(f"--every {text!r}: give a duration such as 30s, 10m, 6h or 2d", field="every")
    return int(match.group(1)) * _UNITS[match.group(2)]


def schedule_view(s: Schedule, last: ScheduleFiring | None = None) -> dict:
    """A schedule as users see it."""
    return {"id": s.id, "name": s.name, "adapter": s.spec.get("name"), "cron": s.cron,
            "every_seconds": s.every_seconds, "paused": s.paused, "created_by": s.created_by,
            "created_at": s.created_at.isoformat(), "next_slot": None if s.paused else next_slot(s).isoformat(),
            "last_firing": None if last is None else {
                "slot_at": last.slot_at.isoformat(), "outcome": last.outcome, "job_id": last.job_id,
                "error": last.error}}


def add_schedule(spec: str | Path | dict, *, cron: str | None = None, every: str | int | None = None,
                 name: str | None = None, created_by: str | None = None,
                 settings: FarmSettings | None = None) -> dict:
    """Record a schedule for a spec (a YAML path or a mapping); exactly one of `cron` or `every` (30s, 10m, 6h)."""
    from croniter import croniter

    settings = settings or get_settings()
    parsed = load_spec(spec) if isinstance(spec, (str, Path)) else parse_spec(spec)
    if (cron is None) == (every is None):
        raise SpecError("give exactly one of --cron \"0 3 * * *\" or --every 6h", field="cron")
    if cron is not None and not croniter.is_valid(cron):
        raise SpecError(f"--cron {cron!r}: not a cron expression (minute hour day month weekday, in UTC)",
                        field="cron")
    seconds = None if every is None else (every if isinstance(every, int) else parse_every(every))
    name = name or parsed.name
    if not re.match(ADAPTER_NAME_PATTERN, name):
        raise SpecError(f"--name {name!r}: lowercase letters, digits, '-' and '_'", field="name")
    from farm.service import validate_spec

    validate_spec(parsed, settings)  # fail now, not at 3 am; each firing checks again
    with session_scope(settings.database_url) as session:
        if session.scalar(select(Schedule.id).where(Schedule.name == name)) is not None:
            raise SpecError(f"a schedule named {name!r} exists: remove it (`farm schedule rm {name}`) or pick "
                            "another --name", field="name")
        row = Schedule(id=uuid.uuid4().hex, name=name, spec=spec_to_dict(parsed), cron=cron, every_seconds=seconds,
                       paused=False, created_by=created_by, created_at=utcnow().replace(microsecond=0))
        session.add(row)
        session.flush()
        return schedule_view(row)


def _get(session, name: str) -> Schedule:
    row = session.scalar(select(Schedule).where(Schedule.name == name))
    if row is None:
        raise NotFound(f"no schedule {name!r}: list them with `farm schedule list`")
    return row


def _last_firing(session, schedule_id: str) -> ScheduleFiring | None:
    return session.scalar(select(ScheduleFiring).where(ScheduleFiring.schedule_id == schedule_id)
                          .order_by(ScheduleFiring.slot_at.desc()).limit(1))


def list_schedules(*, settings: FarmSettings | None = None) -> list[dict]:
    """Every schedule with its next slot and last firing."""
    settings = settings or get_settings()
    with session_scope(settings.database_url) as session:
        return [schedule_view(s, _last_firing(session, s.id))
                for s in session.scalars(select(Schedule).order_by(Schedule.name))]


def set_paused(name: str, paused: bool, *, settings: FarmSettings | None = None) -> dict:
    """Pause or resume a schedule (a resumed one fires its next slot, not the ones it missed)."""
    settings = settings or get_settings()
    with session_scope(settings.database_url) as session:
        row = _get(session, name)
        row.paused = paused
        return schedule_view(row, _last_firing(session, row.id))


def remove_schedule(name: str, *, settings: FarmSettings | None = None) -> None:
    """Delete a schedule and its firing records (jobs it started stay)."""
    settings = settings or get_settings()
    with session_scope(settings.database_url) as session:
        session.delete(_get(session, name))


def _aware(value: datetime) -> datetime:
    from datetime import timezone

    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def due_slot(s: Schedule, now: datetime) -> datetime | None:
    """The latest slot at or before `now` and after the schedule was made, or None."""
    created = _aware(s.created_at)
    if s.cron:
        from croniter import croniter

        slot = croniter(s.cron, now).get_prev(datetime)
    else:
        periods = int((now - created).total_seconds() // s.every_seconds)
        slot = created + timedelta(seconds=periods * s.every_seconds)
    return slot if slot > created else None


def next_slot(s: Schedule, now: datetime | None = None) -> datetime:
    """The next slot after `now`."""
    now = now or utcnow()
    if s.cron:
        from croniter import croniter

        return croniter(s.cron, max(now, _aware(s.created_at))).get_next(datetime)
    created = _aware(s.created_at)
    periods = max(0, int((now - created).total_seconds() // s.every_seconds)) + 1
    return created + timedelta(seconds=periods * s.every_seconds)


def _record(settings: FarmSettings, schedule_id: str, slot: datetime, outcome: str, job_id: str | None = None,
            error: str | None = None) -> None:
    try:
        with session_scope(settings.database_url) as session:
            session.add(ScheduleFiring(schedule_id=schedule_id, slot_at=slot, outcome=outcome, job_id=job_id,
                                       error=error))
    except IntegrityError:
        pass  # another beat recorded this slot


def fire_slot(schedule_id: str, slot: datetime, *, settings: FarmSettings | None = None) -> dict | None:
    """Submit the schedule's spec for `slot` through the submit path, once; None when another beat fired it."""
    from farm import service

    settings = settings or get_settings()
    with session_scope(settings.database_url) as session:
        s = session.get(Schedule, schedule_id)
        if s is None or s.paused:
            return None
        spec, name = dict(s.spec), s.name

    def take_slot(session, job) -> None:
        session.add(ScheduleFiring(schedule_id=schedule_id, slot_at=slot, outcome="submitted", job_id=job.id))
        session.flush()  # a second beat fails here: unique (schedule_id, slot_at)
        session.get(JobLineage, job.id).origin = "schedule"

    try:
        job = service.submit_job(spec, submitted_by=f"schedule:{name}", settings=settings, on_record=take_slot)
    except IntegrityError:
        log.info("schedule %s slot %s: fired by another beat", name, slot.isoformat())
        return None
    except FarmError as exc:
        log.warning("schedule %s slot %s: %s", name, slot.isoformat(), exc.message)
        _record(settings, schedule_id, slot, "error", error=f"{exc.code}: {exc.message}"[:4000])
        return {"schedule": name, "slot_at": slot.isoformat(), "outcome": "error", "error": exc.message}
    if job.deduplicated:
        _record(settings, schedule_id, slot, "deduplicated", job_id=job.id)
        return {"schedule": name, "slot_at": slot.isoformat(), "outcome": "deduplicated", "job_id": job.id}
    log.info("schedule %s slot %s: submitted job %s", name, slot.isoformat(), job.id)
    return {"schedule": name, "slot_at": slot.isoformat(), "outcome": "submitted", "job_id": job.id}


def fire_due(*, settings: FarmSettings | None = None, now: datetime | None = None) -> list[dict]:
    """Fire every active schedule whose latest due slot has not fired yet (what each beat tick does)."""
    settings = settings or get_settings()
    now = now or utcnow()
    with session_scope(settings.database_url) as session:
        due = []
        for s in session.scalars(select(Schedule).where(Schedule.paused.is_(False))):
            slot = due_slot(s, now)
            if slot is None:
                continue
            fired = session.scalar(select(ScheduleFiring.id).where(ScheduleFiring.schedule_id == s.id,
                                                                   ScheduleFiring.slot_at == slot))
            if fired is None:
                due.append((s.id, slot))
    return [r for r in (fire_slot(i, slot, settings=settings) for i, slot in due) if r is not None]
