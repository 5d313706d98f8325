"""The catalog's state machine on SQLite and PostgreSQL: claims, leases, fencing, cancel, atomic publishing."""

from __future__ import annotations

import multiprocessing
import threading
from datetime import timedelta, timezone

import pytest
from sqlalchemy import event, func, select
from sqlalchemy.exc import IntegrityError

from farm.catalog import repository as repo
from farm.catalog.models import (
    CANCELLED,
    CANCELLING,
    FAILED,
    PUBLISHING,
    QUEUED,
    READY,
    RECOVERING,
    RUNNING,
    SUCCEEDED,
    Adapter,
    AdapterFile,
    Checkpoint,
    Job,
    JobEvent,
    utcnow,
)
from farm.catalog.session import get_engine, session_scope
from farm.errors import InvalidState, NotFound, StaleAttempt

RACE_ROUNDS = 25
FILES = [
    {"path": "adapter_config.json", "size": 10, "sha256": "a" * 64},
    {"path": "adapter_model.safetensors", "size": 2048, "sha256": "b" * 64, "etag": "etag-1"},
]


def make_job(url: str, *, name: str = "demo", max_attempts: int = 3, job_id: str | None = None) -> str:
    with session_scope(url) as s:
        return repo.create_job(s, kind="train", name=name, queue="farm.gpu1", spec={"steps": 2},
                               spec_hash="f" * 64, max_attempts=max_attempts, job_id=job_id).id


def claim(url: str, job_id: str, worker: str = "w1", lease_seconds: float = 60) -> repo.Claim | None:
    with session_scope(url) as s:
        return repo.claim_job(s, job_id, worker, lease_seconds)


def reap(url: str, ahead: timedelta = timedelta(hours=1)) -> list[str]:
    with session_scope(url) as s:
        return repo.reap_expired_leases(s, now=utcnow() + ahead)


def job_row(url: str, job_id: str) -> Job:
    with session_scope(url) as s:
        return repo.get_job(s, job_id)


def reserve(url: str, c: repo.Claim, name: str = "demo") -> Adapter:
    with session_scope(url) as s:
        return repo.reserve_adapter_version(s, c, name=name, kind="train", spec_hash="f" * 64)


def publish(url: str, c: repo.Claim, files=FILES) -> Adapter:
    with session_scope(url) as s:
        adapter = repo.publish_adapter(s, c, files=files, provenance={"job": c.job_id}, metrics={"loss": 1.5},
                                       base_model="tiny-llama", base_model_sha256="c" * 64)
        return adapter


def run_to_published(url: str, name: str = "demo") -> Adapter:
    job_id = make_job(url, name=name)
    c = claim(url, job_id)
    reserve(url, c, name)
    return publish(url, c)


def snapshot(url: str, job_id: str) -> dict:
    """Everything a write for this job could change."""
    with session_scope(url) as s:
        job = s.get(Job, job_id)
        count = lambda model, col: s.scalar(select(func.count()).select_from(model).where(col == job_id))  # noqa: E731
        adapters = s.execute(select(Adapter.version, Adapter.status).where(Adapter.job_id == job_id)).all()
        return {
            "job": (job.state, job.attempt, job.worker, job.lease_expires_at, job.progress, job.error_code,
                    job.finished_at),
            "events": count(JobEvent, JobEvent.job_id),
            "checkpoints": count(Checkpoint, Checkpoint.job_id),
            "adapters": sorted(adapters),
            "files": s.scalar(select(func.count()).select_from(AdapterFile).join(Adapter)
                              .where(Adapter.job_id == job_id)),
        }


def test_create_job_is_queued_with_a_queued_event(catalog_url):
    job_id = make_job(catalog_url)
    with session_scope(catalog_url) as s:
        job = repo.get_job(s, job_id)
        events = repo.job_events(s, job_id)
        assert (job.state, job.attempt, job.max_attempts, job.spec) == (QUEUED, 0, 3, {"steps": 2})
        assert [(e.type, e.state, e.attempt, e.data) for e in events] == [("state", QUEUED, 0, {"queue": "farm.gpu1"})]
        from datetime import timedelta

        from farm.catalog.models import utcnow

        assert repo.waiting_jobs(s, utcnow() + timedelta(seconds=1)) == [(job_id, "farm.gpu1")]
        assert repo.waiting_jobs(s, utcnow() - timedelta(seconds=60)) == []  # not quiet long enough


def _assert_one_winner_per_job(url: str, job_ids: list[str], results: dict[str, list]) -> None:
    for job_id in job_ids:
        claims = results[job_id]
        assert len(claims) == 2, "both claimers must have answered"
        winners = [c for c in claims if c is not None]
        assert len(winners) == 1, f"job {job_id}: {claims}"
        assert winners[0].attempt == 1
        with session_scope(url) as s:
            job = s.get(Job, job_id)
            assert (job.state, job.attempt, job.worker) == (RUNNING, 1, winners[0].worker)
            running = [e for e in repo.job_events(s, job_id) if e.state == RUNNING]
            assert len(running) == 1


def test_claim_race_between_threads_has_exactly_one_winner(catalog_url):
    job_ids = [make_job(catalog_url) for _ in range(RACE_ROUNDS)]
    barrier = threading.Barrier(2)
    results: dict[str, list] = {j: [] for j in job_ids}
    errors: list[BaseException] = []

    def claimer(worker: str) -> None:
        try:
            for job_id in job_ids:
                barrier.wait(timeout=60)
                results[job_id].append(claim(catalog_url, job_id, worker))
        except BaseException as exc:  # surfaced below: a thread's exception would otherwise vanish
            errors.append(exc)
            barrier.abort()

    # Count the losers that the conditional UPDATE turned away (rowcount 0), as opposed to losers that read the
    # job after the winner committed: the first kind proves the two claims really overlapped.
    lost_in_update = []

    def count_lost_updates(conn, cursor, statement, params, context, executemany):
        if statement.startswith("UPDATE jobs SET state") and cursor.rowcount == 0:
            lost_in_update.append(statement)

    engine = get_engine(catalog_url)
    event.listen(engine, "after_cursor_execute", count_lost_updates)
    threads = [threading.Thread(target=claimer, args=(f"thread-{i}",)) for i in range(2)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        event.remove(engine, "after_cursor_execute", count_lost_updates)
    assert not errors, errors
    _assert_one_winner_per_job(catalog_url, job_ids, results)
    assert lost_in_update, "no claim ever overlapped another: the race was not exercised"


def _claim_in_own_process(url: str, job_ids: list[str], worker: str, barrier, out) -> None:
    """Runs in a spawned process, so it has its own engine and connections, as a real worker does."""
    try:
        for job_id in job_ids:
            barrier.wait(timeout=60)
            c = claim(url, job_id, worker)
            out.put((job_id, None if c is None else (c.job_id, c.attempt, c.worker)))
    except BaseException as exc:
        barrier.abort()
        out.put(("error", repr(exc)))


def test_claim_race_between_processes_has_exactly_one_winner(catalog_url):
    job_ids = [make_job(catalog_url) for _ in range(RACE_ROUNDS)]
    ctx = multiprocessing.get_context("spawn")  # no engine or connection inherited from this process
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_claim_in_own_process, args=(catalog_url, job_ids, f"proc-{i}", barrier, out))
             for i in range(2)]
    for p in procs:
        p.start()
    answers = [out.get(timeout=120) for _ in range(2 * len(job_ids))]
    for p in procs:
        p.join(timeout=60)
    assert [a for a in answers if a[0] == "error"] == []
    results: dict[str, list] = {j: [] for j in job_ids}
    for job_id, c in answers:
        results[job_id].append(None if c is None else repo.Claim(*c))
    _assert_one_winner_per_job(catalog_url, job_ids, results)


def test_second_delivery_of_a_running_job_claims_nothing(catalog_url):
    job_id = make_job(catalog_url)
    first = claim(catalog_url, job_id, "w1")
    assert first == repo.Claim(job_id, 1, "w1")
    assert claim(catalog_url, job_id, "w2") is None
    assert (job_row(catalog_url, job_id).worker, job_row(catalog_url, job_id).attempt) == ("w1", 1)
    assert claim(catalog_url, "0" * 32, "w2") is None  # a message for a job that does not exist


def test_renewing_the_lease_extends_it(catalog_url):
    job_id = make_job(catalog_url)
    c = claim(catalog_url, job_id, lease_seconds=5)
    before = job_row(catalog_url, job_id).lease_expires_at
    with session_scope(catalog_url) as s:
        assert repo.renew_lease(s, c, 600) == RUNNING
    after = job_row(catalog_url, job_id).lease_expires_at
    assert after - before > timedelta(seconds=500)


def test_expired_lease_is_reaped_to_recovering_and_reclaimed_as_attempt_2(catalog_url):
    job_id = make_job(catalog_url)
    claim(catalog_url, job_id, "w1", lease_seconds=60)
    assert reap(catalog_url, ahead=timedelta(0)) == []  # lease still valid now
    assert reap(catalog_url) == [job_id]
    job = job_row(catalog_url, job_id)
    assert (job.state, job.lease_expires_at) == (RECOVERING, None)
    assert reap(catalog_url) == []  # nothing left to reap
    second = claim(catalog_url, job_id, "w2")
    assert second == repo.Claim(job_id, 2, "w2")
    with session_scope(catalog_url) as s:
        states = [(e.state, e.attempt) for e in repo.job_events(s, job_id) if e.type == "state"]
    assert states == [(QUEUED, 0), (RUNNING, 1), (RECOVERING, 1), (RUNNING, 2)]


STALE_WRITES = {
    "renew_lease": lambda s, c: repo.renew_lease(s, c, 600),
    "record_progress": lambda s, c: repo.record_progress(s, c, {"step": 9}),
    "record_eval": lambda s, c: repo.record_progress(s, c, {"eval_loss": 1.0}, event_type="eval"),
    "record_checkpoint": lambda s, c: repo.record_checkpoint(s, c, 5, "jobs/x/checkpoints/step-5/", FILES),
    "fail_job": lambda s, c: repo.fail_job(s, c, "boom", "stale worker failed"),
    "mark_cancelled": lambda s, c: repo.mark_cancelled(s, c),
    "reserve_adapter_version": lambda s, c: repo.reserve_adapter_version(s, c, name="demo", kind="train",
                                                                         spec_hash="f" * 64),
    "publish_adapter": lambda s, c: repo.publish_adapter(s, c, files=FILES, provenance={}, metrics={}),
}


@pytest.mark.parametrize("write", sorted(STALE_WRITES))
def test_writes_from_a_stale_attempt_are_refused_and_change_nothing(catalog_url, write):
    job_id = make_job(catalog_url)
    stale = claim(catalog_url, job_id, "w1")
    assert reap(catalog_url) == [job_id]
    current = claim(catalog_url, job_id, "w2")
    reserve(catalog_url, current)  # attempt 2 owns the version: a stale publish must not touch it
    before = snapshot(catalog_url, job_id)
    with pytest.raises(StaleAttempt, match=rf"job {job_id} attempt 1 no longer owns the job \(now attempt 2"):
        with session_scope(catalog_url) as s:
            STALE_WRITES[write](s, stale)
    assert snapshot(catalog_url, job_id) == before
    with session_scope(catalog_url) as s:  # the owner still can write
        assert repo.renew_lease(s, current, 60) == RUNNING


def test_a_stale_attempt_is_refused_while_the_job_waits_for_reclaim(catalog_url):
    job_id = make_job(catalog_url)
    stale = claim(catalog_url, job_id)
    reap(catalog_url)
    before = snapshot(catalog_url, job_id)
    with pytest.raises(StaleAttempt, match="state recovering"):
        with session_scope(catalog_url) as s:
            repo.renew_lease(s, stale, 60)
    assert snapshot(catalog_url, job_id) == before


def test_a_job_out_of_attempts_ends_failed_with_an_error(catalog_url):
    job_id = make_job(catalog_url, max_attempts=2)
    claim(catalog_url, job_id, "w1")
    assert reap(catalog_url) == [job_id]
    claim(catalog_url, job_id, "w2")
    assert reap(catalog_url) == []  # attempts used up: not re-enqueued
    job = job_row(catalog_url, job_id)
    assert (job.state, job.error_code, job.lease_expires_at) == (FAILED, "worker_lost", None)
    assert "worker w2 stopped heartbeating; all 2 attempts used" in job.error_message
    assert job.finished_at is not None
    assert claim(catalog_url, job_id, "w3") is None


def test_cancel_a_queued_job_ends_it(catalog_url):
    job_id = make_job(catalog_url)
    with session_scope(catalog_url) as s:
        assert repo.request_cancel(s, job_id).state == CANCELLED
    assert job_row(catalog_url, job_id).finished_at is not None
    assert claim(catalog_url, job_id) is None  # a late message for it starts nothing


def test_cancel_a_running_job_asks_its_worker_to_stop(catalog_url):
    job_id = make_job(catalog_url)
    c = claim(catalog_url, job_id)
    with session_scope(catalog_url) as s:
        assert repo.request_cancel(s, job_id).state == CANCELLING
    with session_scope(catalog_url) as s:
        assert repo.renew_lease(s, c, 60) == CANCELLING  # the heartbeat carries the news
    with session_scope(catalog_url) as s:
        repo.mark_cancelled(s, c)
    assert job_row(catalog_url, job_id).state == CANCELLED


@pytest.mark.parametrize("end", ["cancelled", "failed", "succeeded"])
def test_cancel_a_finished_job_is_refused(catalog_url, end):
    job_id = make_job(catalog_url)
    if end == "cancelled":
        with session_scope(catalog_url) as s:
            repo.request_cancel(s, job_id)
    else:
        c = claim(catalog_url, job_id)
        if end == "failed":
            with session_scope(catalog_url) as s:
                repo.fail_job(s, c, "oom", "out of memory")
        else:
            reserve(catalog_url, c)
            publish(catalog_url, c)
    before = snapshot(catalog_url, job_id)
    with pytest.raises(InvalidState, match=rf"job {job_id} is already {end}; nothing to cancel"):
        with session_scope(catalog_url) as s:
            repo.request_cancel(s, job_id[:8])
    assert snapshot(catalog_url, job_id) == before


def test_publish_is_one_transaction(catalog_url):
    job_id = make_job(catalog_url)
    c = claim(catalog_url, job_id)
    reserved = reserve(catalog_url, c)
    before = snapshot(catalog_url, job_id)
    duplicate_path = FILES + [dict(FILES[0], sha256="d" * 64)]  # violates uq_adapter_files_adapter_id_path
    with pytest.raises(IntegrityError, match="(?i)unique"):
        publish(catalog_url, c, files=duplicate_path)
    assert snapshot(catalog_url, job_id) == before
    assert before["job"][0] == RUNNING and before["adapters"] == [(reserved.version, PUBLISHING)]
    assert before["files"] == 0
    with session_scope(catalog_url) as s:
        assert repo.list_adapters(s) == []
    # The same attempt can still publish correctly afterwards.
    assert publish(catalog_url, c).status == READY


def test_publishing_twice_for_one_job_gives_one_version(catalog_url):
    job_id = make_job(catalog_url)
    c = claim(catalog_url, job_id)
    assert reserve(catalog_url, c).id == reserve(catalog_url, c).id  # a retried reserve keeps the version
    first = publish(catalog_url, c)
    second = publish(catalog_url, c)
    assert (second.id, second.version, second.status) == (first.id, 1, READY)
    after = snapshot(catalog_url, job_id)
    assert after["adapters"] == [(1, READY)] and after["files"] == len(FILES)
    assert after["job"][0] == SUCCEEDED
    with session_scope(catalog_url) as s:
        assert [e.state for e in repo.job_events(s, job_id)].count(SUCCEEDED) == 1
        assert repo.adapter_for_job(s, job_id).id == first.id


def test_versions_count_up_per_name_and_the_latest_is_the_default(catalog_url):
    v1 = run_to_published(catalog_url, "alpha")
    v2 = run_to_published(catalog_url, "alpha")
    other = run_to_published(catalog_url, "beta")
    assert (v1.version, v2.version, other.version) == (1, 2, 1)
    assert (v1.prefix, v2.prefix) == ("adapters/alpha/v1/", "adapters/alpha/v2/")
    # A reserved but unpublished version 3 is invisible to readers.
    pending = claim(catalog_url, make_job(catalog_url, name="alpha"))
    assert reserve(catalog_url, pending, "alpha").version == 3
    with session_scope(catalog_url) as s:
        latest = repo.get_adapter(s, "alpha")
        assert latest.version == 2
        assert [f.path for f in latest.files] == sorted(f["path"] for f in FILES)
        assert repo.get_adapter(s, "alpha", 1).id == v1.id
        assert [(a.name, a.version) for a in repo.list_adapters(s)] == [("alpha", 2), ("alpha", 1), ("beta", 1)]
        assert [a.version for a in repo.list_adapters(s, "alpha")] == [2, 1]
        with pytest.raises(NotFound, match=r"no adapter 'alpha:3'"):
            repo.get_adapter(s, "alpha", 3)
        with pytest.raises(NotFound, match=r"no adapter 'gamma'"):
            repo.get_adapter(s, "gamma")


def test_timestamps_come_back_timezone_aware_in_utc(catalog_url):
    job_id = make_job(catalog_url)
    c = claim(catalog_url, job_id)
    reserve(catalog_url, c)
    publish(catalog_url, c)
    with session_scope(catalog_url) as s:
        job = repo.get_job(s, job_id)
        adapter = repo.get_adapter(s, "demo")
        stamps = [job.created_at, job.started_at, job.finished_at, adapter.created_at, adapter.published_at]
        stamps += [e.at for e in repo.job_events(s, job_id)]
        for stamp in stamps:
            assert stamp.tzinfo is not None and stamp.utcoffset() == timedelta(0)
            assert repo.as_utc(stamp) == stamp
            assert abs(utcnow() - stamp) < timedelta(hours=1)  # comparable with aware values
        assert job.created_at <= job.started_at <= job.finished_at


def test_a_lease_written_in_another_timezone_is_compared_in_utc(catalog_url):
    job_id = make_job(catalog_url)
    claim(catalog_url, job_id, lease_seconds=60)
    tokyo = timezone(timedelta(hours=9))
    with session_scope(catalog_url) as s:
        # A naive "now" one minute ago, an aware one in Tokyo: neither may reap a lease valid for a minute.
        assert repo.reap_expired_leases(s, now=utcnow().replace(tzinfo=None)) == []
        assert repo.reap_expired_leases(s, now=utcnow().astimezone(tokyo)) == []
        assert repo.reap_expired_leases(s, now=(utcnow() + timedelta(minutes=2)).astimezone(tokyo)) == [job_id]


def test_get_job_accepts_a_unique_id_prefix(catalog_url):
    a = make_job(catalog_url, job_id="abcd1111" + "0" * 24)
    b = make_job(catalog_url, job_id="abcd2222" + "0" * 24)
    make_job(catalog_url, job_id="abce_333" + "0" * 24)
    with session_scope(catalog_url) as s:
        assert repo.get_job(s, a).id == a
        assert repo.get_job(s, "abcd1").id == a
        assert repo.get_job(s, "abcd2").id == b
        with pytest.raises(NotFound, match=r"'abcd' matches more than one job"):
            repo.get_job(s, "abcd")
        with pytest.raises(NotFound, match=r"no job 'ffff'.*farm jobs"):
            repo.get_job(s, "ffff")
        with pytest.raises(NotFound, match=r"no job 'abc'"):
            repo.get_job(s, "abc")  # too short to be taken as a prefix
        with pytest.raises(NotFound, match=r"no job 'ab%1'"):
            repo.get_job(s, "ab%1")  # SQL wildcards in the input are plain characters
        with pytest.raises(NotFound, match=r"no job 'abc_1'"):
            repo.get_job(s, "abc_1")


def test_concurrent_reservations_of_one_name_get_distinct_versions(catalog_url):
    rounds = 8
    claims = []
    for i in range(rounds):
        claims.append([claim(catalog_url, make_job(catalog_url, name=f"race{i}")) for _ in range(2)])
    barrier = threading.Barrier(2)
    versions: dict[int, list[int]] = {i: [] for i in range(rounds)}
    errors: list[BaseException] = []

    def reserver(k: int) -> None:
        try:
            for i in range(rounds):
                barrier.wait(timeout=60)
                versions[i].append(reserve(catalog_url, claims[i][k], f"race{i}").version)
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=reserver, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert all(sorted(v) == [1, 2] for v in versions.values()), versions


def test_a_publish_racing_the_reaper_leaves_a_consistent_job(catalog_url):
    """The reaper reads an expired running job; the worker publishes before the reaper commits.

    Either the reaper wins (job recovering, version still publishing; the publish is refused as stale) or the
    publish wins (succeeded and ready). Never a recovering job with a ready adapter, which would run again.
    """
    job_id = make_job(catalog_url)
    c = claim(catalog_url, job_id, lease_seconds=60)
    reserve(catalog_url, c)
    outcome: list = []

    def worker_publishes() -> None:
        try:
            publish(catalog_url, c)
            outcome.append("published")
        except StaleAttempt:
            outcome.append("stale")

    with session_scope(catalog_url) as s:
        assert repo.reap_expired_leases(s, now=utcnow() + timedelta(hours=1)) in ([job_id], [])
        publisher = threading.Thread(target=worker_publishes)
        publisher.start()
        # Give the publisher every chance to slip in before the reaper commits; the locks must keep it out.
        publisher.join(timeout=0.5)
    publisher.join()
    job = job_row(catalog_url, job_id)
    with session_scope(catalog_url) as s:
        status = s.scalar(select(Adapter.status).where(Adapter.job_id == job_id))
    assert (job.state, status, outcome) in [(RECOVERING, PUBLISHING, ["stale"]), (SUCCEEDED, READY, ["published"])]


def test_a_cancel_racing_a_claim_never_leaves_a_cancelled_job_running(catalog_url):
    job_id = make_job(catalog_url)
    outcome: list = []

    def worker_claims() -> None:
        outcome.append(claim(catalog_url, job_id, "w1"))

    with session_scope(catalog_url) as s:
        assert repo.request_cancel(s, job_id).state == CANCELLED
        claimer = threading.Thread(target=worker_claims)
        claimer.start()
        claimer.join(timeout=0.5)
    claimer.join()
    job = job_row(catalog_url, job_id)
    # Whoever commits first decides: a claim that won would have made the cancel a "cancelling".
    assert (job.state, outcome) == (CANCELLED, [None])


def test_a_heartbeat_racing_the_reaper_is_either_before_or_refused(catalog_url):
    job_id = make_job(catalog_url)
    c = claim(catalog_url, job_id, lease_seconds=60)
    outcome: list = []

    def reaper() -> None:
        outcome.append(reap(catalog_url))

    with session_scope(catalog_url) as s:
        assert repo.renew_lease(s, c, 60) == RUNNING
        thread = threading.Thread(target=reaper)
        thread.start()
        thread.join(timeout=0.5)
        outcome.append("renewed")
    thread.join()
    job = job_row(catalog_url, job_id)
    # PostgreSQL's reaper skips the locked row; SQLite's waits for the heartbeat and then reaps (its `now` is an
    # hour ahead). Never: the reaper recovers the job and the heartbeat's commit then renews a lease it lost.
    assert outcome in (["renewed", [job_id]], [[], "renewed"]), outcome
    assert (job.state, job.lease_expires_at is None) in [(RECOVERING, True), (RUNNING, False)]


def test_engine_urls_make_only_the_folder_of_a_database_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    get_engine("sqlite://")  # in memory: no folder at all (it used to create one named "sqlite:")
    get_engine(f"sqlite:///{tmp_path}/a/b/catalog.db?timeout=5").connect().close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    assert [p.name for p in (tmp_path / "a" / "b").iterdir()] == ["catalog.db"]
