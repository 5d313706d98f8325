"""The declared facts the worker acts on: the retry policy (farm.errors), the job-kind registry (farm.kinds), the
names and keys (farm.names) and the training backends' protocol (farm.training.backend)."""

from __future__ import annotations

import importlib

import pytest

from farm import errors
from farm.catalog import repository as repo
from farm.catalog.models import FAILED, RECOVERING
from farm.catalog.session import session_scope
from farm.errors import FarmError, attempts_left, error_class, is_invalid_input, next_state, retryable
from farm.kinds import JobKind, all_kinds, get_kind, kind_names, register, require_kind
from farm.names import (
    adapter_file_key,
    adapter_prefix,
    checkpoint_prefix,
    parse_adapter_ref,
    queue_name,
    store_key,
    store_ref,
)

# What the worker and the CLI decided by hand before the policy was declared in one file.
NEVER_RETRIED = {"invalid_spec", "invalid_dataset", "invalid_model", "integrity_violation", "unschedulable", "timeout"}
CLI_EXITS_2 = {"invalid_spec", "invalid_dataset", "invalid_model", "unschedulable"}


def _all_error_classes() -> list[type[FarmError]]:
    found, stack = [], [FarmError]
    while stack:
        cls = stack.pop()
        found.append(cls)
        stack.extend(cls.__subclasses__())
    return found


def test_every_error_code_names_one_class():
    codes = [cls.code for cls in _all_error_classes()]
    assert len(codes) == len(set(codes)), sorted(c for c in codes if codes.count(c) > 1)
    assert all(error_class(cls.code) is cls for cls in _all_error_classes())


def test_the_retry_policy_is_the_one_the_worker_applied():
    declared = {cls.code for cls in _all_error_classes()}  # later issues add classes; these keep their policy
    assert NEVER_RETRIED <= {code for code in declared if not retryable(code)}
    assert CLI_EXITS_2 <= {code for code in declared if is_invalid_input(code)}
    assert not is_invalid_input("integrity_violation") and not is_invalid_input("runner_crashed")
    for transient in ("runner_crashed", "runner_killed", "worker_stopped", "publish_failed", "input_fetch_failed",
                      "checksum_mismatch", "store_error", "runner_error", "something_new"):
        assert retryable(transient), transient


@pytest.mark.parametrize("code, attempt, max_attempts, expected", [
    ("runner_crashed", 1, 3, RECOVERING),
    ("runner_crashed", 3, 3, FAILED),
    ("invalid_dataset", 1, 3, FAILED),
    ("timeout", 1, 3, FAILED),
    ("worker_lost", 2, 3, RECOVERING),
])
def test_next_state(code, attempt, max_attempts, expected):
    assert next_state(code, attempt=attempt, max_attempts=max_attempts) == expected
    assert attempts_left(attempt, max_attempts) == (attempt < max_attempts)


def _claimed_job(url: str, max_attempts: int):
    with session_scope(url) as s:
        job_id = repo.create_job(s, kind="train", name="demo", queue="farm.cpu", spec={}, spec_hash="f" * 64,
                                 max_attempts=max_attempts).id
    with session_scope(url) as s:
        return repo.claim_job(s, job_id, "w1", 60)


def _end(url: str, claim, code: str) -> tuple[str, str, str]:
    with session_scope(url) as s:
        state = repo.end_failed_attempt(s, claim, code, "it broke")
    with session_scope(url) as s:
        job = repo.get_job(s, claim.job_id)
        return state, job.state, job.error_message


def test_the_catalog_ends_a_failed_attempt_as_the_policy_says(catalog_url):
    claim = _claimed_job(catalog_url, max_attempts=2)
    assert _end(catalog_url, claim, "runner_crashed") == (RECOVERING, RECOVERING, "it broke")
    with session_scope(catalog_url) as s:
        claim = repo.claim_job(s, claim.job_id, "w2", 60)
    state, row_state, message = _end(catalog_url, claim, "runner_crashed")
    assert (state, row_state) == (FAILED, FAILED) and message == "it broke\n(all 2 attempts used)"

    permanent = _claimed_job(catalog_url, max_attempts=3)
    assert _end(catalog_url, permanent, "invalid_dataset") == (FAILED, FAILED, "it broke")


def test_registered_kinds_name_their_spec_runner_and_inputs():
    assert {"train", "extract"} <= set(kind_names())
    for kind in all_kinds():
        assert kind.spec.model_fields["kind"].default == kind.name
        module, _, function = kind.runner.partition(":")
        assert importlib.util.find_spec(module) is not None and function, kind.runner
        for needed in kind.inputs:
            head = needed.field.split(".")[0]
            assert head in kind.spec.model_fields, (kind.name, needed.field)
        if kind.parent_field:
            assert kind.parent_field in kind.spec.model_fields
    assert get_kind("train").runner_function.__func__  # a bound method, resolved lazily
    assert get_kind("nope") is None


def test_a_kind_registered_twice_fails_and_an_unknown_kind_is_a_spec_error():
    with pytest.raises(ValueError, match="registered twice"):
        register(JobKind(name="train", spec=get_kind("train").spec, runner="x:y", inputs=()))
    with pytest.raises(errors.SpecError, match="kind: must be 'train', 'extract'|kind: must be 'train' or"):
        require_kind("finetune")


def test_every_kind_has_a_publisher():
    from workers.publish import PUBLISHERS

    assert {kind.publishes for kind in all_kinds()} <= set(PUBLISHERS)


def test_names_and_keys():
    assert adapter_prefix("bot", 3) == "adapters/bot/v3/"
    assert adapter_file_key("bot", 3, "README.md") == "adapters/bot/v3/README.md"
    assert checkpoint_prefix("j1", 8) == "jobs/j1/checkpoints/step-8/"
    assert store_key(store_ref("datasets/abc.jsonl")) == "datasets/abc.jsonl"
    assert parse_adapter_ref("bot:v2") == ("bot", 2) and parse_adapter_ref("bot") == ("bot", None)
    with pytest.raises(errors.SpecError):
        parse_adapter_ref("bot:two")
    assert [queue_name(), queue_name(cpu_slots=2), queue_name(gpus=4)] == ["farm.cpu", "farm.cpu.2", "farm.gpu.4"]


def test_every_backend_implements_the_backend_protocol():
    from farm.training.backend import Backend
    from farm.training.deepspeed_backend import DeepSpeedBackend
    from farm.training.torch_backend import TorchBackend

    members = [n for n in dir(Backend) if not n.startswith("_")] + list(Backend.__annotations__)
    assert {"step", "save_state", "is_main_process"} <= set(members)
    for backend in (TorchBackend, DeepSpeedBackend):
        source = importlib.import_module(backend.__module__).__file__
        text = open(source, encoding="utf-8").read()
        missing = [n for n in members if not hasattr(backend, n) and f"self.{n} =" not in text]
        assert not missing, (backend.__name__, missing)


def test_jobs_can_be_listed_by_every_kind_the_catalog_holds():
    """GET /v1/jobs?kind= takes its kinds from the registry (merge too), and import (a bundle import's job row)."""
    from typing import get_args

    from api.routes.jobs import JobKind

    assert set(get_args(JobKind)) == {*kind_names(), "import"} and "merge" in kind_names()
