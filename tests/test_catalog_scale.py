"""The catalog at scale: 100,000 jobs list and resolve by id prefix through indexes, on SQLite and PostgreSQL.

The plan is read from the database (EXPLAIN QUERY PLAN / EXPLAIN (FORMAT JSON)), not timed: a missing index shows
as a table scan or a sort of the whole table whatever the machine's speed.
"""

from __future__ import annotations

import json
import random
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import insert, text

from farm.catalog import repository as repo
from farm.catalog.models import JOB_STATES, Job
from farm.catalog.session import get_engine, session_scope

JOBS = 100_000


def _fill(url: str) -> list[str]:
    """100,000 jobs, one second apart, states cycling; the ids in insertion order."""
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    rng = random.Random(12)
    ids = [uuid.UUID(int=rng.getrandbits(128)).hex for _ in range(JOBS)]
    rows = [{"id": job_id, "kind": "train", "name": f"n{i % 100}", "state": JOB_STATES[i % len(JOB_STATES)],
             "queue": "farm.cpu", "spec": {}, "spec_hash": "0" * 64, "attempt": 0, "max_attempts": 3,
             "created_at": start + timedelta(seconds=i)} for i, job_id in enumerate(ids)]
    with session_scope(url) as session:
        session.execute(insert(Job), rows)
    with get_engine(url).begin() as conn:
        conn.execute(text("ANALYZE"))
    return ids


def _sql(url: str, stmt) -> str:
    return str(stmt.compile(dialect=get_engine(url).dialect, compile_kwargs={"literal_binds": True}))


def _plan(url: str, stmt) -> dict:
    """{'indexes': index names the plan reads, 'sorts': whether it sorts rows, 'scans': full table scans}."""
    sql = _sql(url, stmt)
    with get_engine(url).connect() as conn:
        if conn.dialect.name == "sqlite":
            details = [row[-1] for row in conn.execute(text("EXPLAIN QUERY PLAN " + sql))]
            return {"text": details,
                    "indexes": {w for d in details for w in d.replace("(", " ").split() if w.startswith(("ix_", "sqlite_autoindex"))},
                    "sorts": any("TEMP B-TREE" in d for d in details),
                    "scans": any(d.startswith("SCAN") and "INDEX" not in d for d in details)}
        raw = conn.execute(text("EXPLAIN (FORMAT JSON) " + sql)).scalar()
    nodes, stack = [], [(raw if isinstance(raw, list) else json.loads(raw))[0]["Plan"]]
    while stack:
        node = stack.pop()
        nodes.append(node)
        stack.extend(node.get("Plans", []))
    return {"text": [(n["Node Type"], n.get("Index Name")) for n in nodes],
            "indexes": {n["Index Name"] for n in nodes if "Index Name" in n},
            "sorts": any("Sort" in n["Node Type"] for n in nodes),
            "scans": any(n["Node Type"] == "Seq Scan" for n in nodes)}


@pytest.fixture
def big_catalog(catalog_url):
    return catalog_url, _fill(catalog_url)


def test_listing_and_prefix_lookup_use_indexes_over_100k_jobs(big_catalog):
    url, ids = big_catalog

    newest = _plan(url, repo.list_jobs_query(limit=50))
    assert "ix_jobs_created_at_id" in newest["indexes"], newest["text"]
    assert not newest["sorts"] and not newest["scans"], newest["text"]

    by_state = _plan(url, repo.list_jobs_query(state="queued", limit=50))
    assert "ix_jobs_state_created_at_id" in by_state["indexes"], by_state["text"]
    assert not by_state["sorts"] and not by_state["scans"], by_state["text"]

    prefix = _plan(url, repo.job_prefix_query(ids[12345][:6]))
    assert not prefix["scans"] and prefix["indexes"], prefix["text"]  # the primary key's index, as a range

    # And the answers are the right ones.
    with session_scope(url) as session:
        page = repo.list_jobs(session, limit=3)
        assert [j.id for j in page] == ids[-1:-4:-1]
        queued = repo.list_jobs(session, state="queued", limit=2)
        assert all(j.state == "queued" for j in queued) and queued[0].created_at > queued[1].created_at
        assert repo.get_job(session, ids[12345][:12]).id == ids[12345]
