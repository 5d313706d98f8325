"""The catalog's group claim for co-training (issue 10), on SQLite and PostgreSQL: compatible waiting jobs are
taken in the same transaction, oldest first, each with its own attempt and lease; one heartbeat renews them all;
a partner's own message later loses the claim as any duplicate does."""

from __future__ import annotations

import time

from farm.catalog import repository as repo
from farm.catalog.models import CANCELLING, RUNNING
from farm.catalog.session import session_scope
from farm.training.cotrain import cotrain_key


def spec(base: str = "base-a", bits: int = 4, **training) -> dict:
    return {"kind": "train", "base_model": base, "quantization": {"bits": bits, "compute_dtype": "bfloat16"},
            "resources": {"gpus": 0}, "training": {"cotrain": True, **training}}


def make(url: str, spec_: dict, name: str = "j", queue: str = "farm.cpu") -> str:
    with session_scope(url) as s:
        job_id = repo.create_job(s, kind=spec_.get("kind", "train"), name=name, queue=queue, spec=spec_,
                                 spec_hash="f" * 64, max_attempts=3).id
    time.sleep(0.01)  # distinct created_at: the claim takes partners oldest first
    return job_id


def claim_group(url: str, job_id: str, max_size: int = 4, worker: str = "w1") -> list[repo.Claim]:
    with session_scope(url) as s:
        return repo.claim_cotrain_group(s, job_id, worker, 60, max_size, cotrain_key)


def test_compatible_waiting_jobs_are_claimed_together_oldest_first(catalog_url):
    first = make(catalog_url, spec())
    partners = [make(catalog_url, spec(seed=i)) for i in range(4)]
    make(catalog_url, spec(base="base-b"))  # another base
    make(catalog_url, spec(bits=8))  # another quantization
    make(catalog_url, spec(cotrain=False))  # opted out
    make(catalog_url, {**spec(), "deepspeed": {"stage": 2}})  # DeepSpeed trains alone
    make(catalog_url, spec(), queue="farm.gpu1")  # another queue
    claims = claim_group(catalog_url, first)
    assert [c.job_id for c in claims] == [first, *partners[:3]]
    assert all(c.attempt == 1 and c.worker == "w1" for c in claims)
    # The partners' own messages arrive later and lose, as duplicates do.
    with session_scope(catalog_url) as s:
        assert repo.claim_job(s, partners[0], "w2", 60) is None
        assert {repo.get_job(s, c.job_id).state for c in claims} == {RUNNING}
    assert [c.job_id for c in claim_group(catalog_url, partners[3], worker="w2")] == [partners[3]]


def test_group_size_one_claims_alone_and_a_taken_job_claims_nothing(catalog_url):
    first, other = make(catalog_url, spec()), make(catalog_url, spec())
    assert [c.job_id for c in claim_group(catalog_url, first, max_size=1)] == [first]
    assert claim_group(catalog_url, first) == []
    assert [c.job_id for c in claim_group(catalog_url, other)] == [other]


def test_one_heartbeat_renews_every_claim_and_reports_cancel_and_stale(catalog_url):
    ids = [make(catalog_url, spec()) for _ in range(3)]
    claims = claim_group(catalog_url, ids[0])
    with session_scope(catalog_url) as s:
        repo.request_cancel(s, ids[1])
    with session_scope(catalog_url) as s:  # the third one was reaped and claimed again elsewhere
        job = repo.get_job(s, ids[2])
        job.attempt += 1
    with session_scope(catalog_url) as s:
        before = {i: repo.get_job(s, i).lease_expires_at for i in ids}
        states = repo.renew_leases(s, claims, 600)
    assert states == {ids[0]: RUNNING, ids[1]: CANCELLING, ids[2]: None}
    with session_scope(catalog_url) as s:
        assert repo.get_job(s, ids[0]).lease_expires_at > before[ids[0]]


def test_cotrain_key_names_what_a_group_shares():
    assert cotrain_key(spec()) == cotrain_key(spec(seed=3, lr=0.1))
    assert cotrain_key(spec()) != cotrain_key(spec(base="other"))
    assert cotrain_key({**spec(), "resources": {"gpus": 2}}) is None
    assert cotrain_key({"kind": "extract"}) is None


def test_farm_show_names_the_group_and_its_size_over_time():
    from datetime import datetime, timezone

    from farm.cli import render
    from farm.schemas import JobPublic

    job = JobPublic(id="a" * 32, kind="train", name="bot", state="succeeded", queue="farm.cpu", attempt=1,
                    max_attempts=3, spec_hash="f" * 64, spec={}, created_at=datetime.now(timezone.utc),
                    adapter="bot:1", cotraining={"cotrained_with": ["b" * 32, "c" * 32],
                                                 "group_sizes": [{"step": 1, "size": 3}, {"step": 5, "size": 2}]})
    with render.console.capture() as captured:
        render.job_detail(job)
    text = " ".join(captured.get().split())
    assert f"co-trained with {'b' * 32}, {'c' * 32}" in text
    assert "group size 3 from step 1, 2 from step 5" in text
