"""`farm jobs` and `farm show PREFIX` over 100,000 jobs, with the issue-12 indexes and without, side by side.

    .venv/bin/python tests/benchmarks/bench_catalog.py [--jobs 100000] [--repeats 20]

For SQLite and PostgreSQL (a fresh database on FARM_TEST_PG_URL), fills the catalog with --jobs jobs, then times
in this process, median of --repeats: the listing as the service layer builds it (newest 50, and newest 50 of one
state, each turned into its public view) and a lookup by an 8-character id prefix. The baseline is the same
catalog with the listing indexes dropped, and the prefix lookup as it was (a LIKE 'prefix%' filter alone).
Target: <= 50 ms on both databases.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sqlalchemy import select, text  # noqa: E402

from farm.catalog import repository as repo  # noqa: E402
from farm.catalog.models import Job  # noqa: E402
from farm.catalog.session import create_all, get_engine, session_scope  # noqa: E402
from farm.service import job_view  # noqa: E402
from tests.test_catalog_scale import JOBS, _fill  # noqa: E402


def timed(fn, repeats: int) -> tuple[float, float]:
    """(median, fastest) in ms: on a shared machine the fastest run is the least disturbed one."""
    fn()  # warm: connection, statement cache
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000, min(times) * 1000


def measure(url: str, ids: list[str], repeats: int, old_prefix: bool) -> dict:
    prefix = ids[len(ids) // 2][:8]

    def listing(state=None):
        with session_scope(url) as session:
            return [job_view(j) for j in repo.list_jobs(session, state=state, limit=50)]

    def lookup():
        with session_scope(url) as session:
            if old_prefix:  # before issue 12: LIKE 'prefix%' alone
                q = select(Job).where(Job.id.startswith(prefix, autoescape=True)).limit(2)
                return session.scalars(q).all()
            return session.scalars(repo.job_prefix_query(prefix)).all()

    return {"list": timed(listing, repeats), "list_state": timed(lambda: listing("queued"), repeats),
            "prefix": timed(lookup, repeats)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=JOBS)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    import tempfile

    import tests.test_catalog_scale as scale
    from tests.fixtures.services import fresh_pg_database

    scale.JOBS = args.jobs
    print(f"{args.jobs} jobs; median of {args.repeats}; ms in this process (query + public views)")
    print(f"{'database':10s} {'query':26s} {'baseline ms (median/best)':>26s} {'indexed ms (median/best)':>25s} "
          f"{'ratio (median)':>15s}")
    with tempfile.TemporaryDirectory() as tmp, fresh_pg_database() as pg:
        for name, url in (("sqlite", f"sqlite:///{tmp}/catalog.db"), ("postgresql", pg)):
            create_all(url)
            ids = _fill(url)
            fast = measure(url, ids, args.repeats, old_prefix=False)
            with get_engine(url).begin() as conn:
                conn.execute(text("DROP INDEX ix_jobs_created_at_id"))
                conn.execute(text("DROP INDEX ix_jobs_state_created_at_id"))
                conn.execute(text("ANALYZE"))
            slow = measure(url, ids, args.repeats, old_prefix=True)
            for key, label in (("list", "farm jobs (newest 50)"), ("list_state", "farm jobs --state queued"),
                               ("prefix", "farm show PREFIX")):
                (sm, sb), (fm, fb) = slow[key], fast[key]
                print(f"{name:10s} {label:26s} {sm:17.1f} / {sb:6.1f} {fm:16.1f} / {fb:6.1f} {sm / fm:14.1f}x")
            get_engine(url).dispose()


if __name__ == "__main__":
    main()
