"""Multi-process DeepSpeed ZeRO jobs, run for real on this CPU machine (DS_ACCELERATOR=cpu, gloo): through the farm
(a Celery worker owning two CPU slots), and through the launcher directly for resume, ZeRO-3 and equivalence drills.

The default run keeps one ZeRO-2 job through the farm, one cancel, the launcher's failure report and the fast
checks; the longer drills are marked slow (`pytest tests/test_deepspeed.py -m slow`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from farm import service
from farm.errors import SpecError
from farm.runner_protocol import parse_line
from farm.specs import TrainSpec, parse_spec

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "configs" / "deepspeed"


def spec_dict(model_dir, data, *, stage=2, bits=4, slots=2, deepspeed=None, dataset=None, **training) -> dict:
    return {
        "kind": "train", "name": "zero-bot", "base_model": str(model_dir),
        "dataset": {"path": str(data), "format": "chat", **(dataset or {})},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "quantization": {"bits": bits, "type": "nf4", "compute_dtype": "float32"},
        "training": {"max_steps": 8, "lr": 5e-3, "micro_batch_size": 2, "max_seq_len": 96, "seed": 7, **training},
        "deepspeed": deepspeed or {"stage": stage},
        "resources": {"gpus": 0, "cpu_slots": slots},
    }


def processes_of(root) -> list[psutil.Process]:
    """Runner ranks and launchers whose command line names a path under root."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if ("workers.runner" in cmd or "workers.distributed" in cmd) and str(root) in cmd:
            found.append(p)
    return found


# ------------------------------------------------------------------------------------------- through the farm


@pytest.fixture(scope="module")
def zero_farm(tmp_path_factory):
    """A farm with one worker owning two CPU slots (queue farm.cpu.2), as `farm worker --cpus 2 --group 2` runs it."""
    from tests.fixtures.farm import make_stack

    stack = make_stack(tmp_path_factory.mktemp("zero-farm"))
    stack.start_worker(queue="farm.cpu.2", name="cpu0-1", extra_env={"FARM_CPU_SLOTS": "2"})
    yield stack
    stack.stop()


def test_zero2_qlora_two_processes_publish_a_stock_peft_adapter(zero_farm, tiny_model_dir, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from farm.tiny import write_dataset

    settings = zero_farm.settings
    data = write_dataset(tmp_path / "chat.jsonl", "chat", n=48, seed=1)
    path = tmp_path / "zero2.yaml"
    path.write_text(yaml.safe_dump(spec_dict(tiny_model_dir, data, stage=2, bits=4)))
    job = service.submit_job(path, settings=settings)
    assert job.queue == "farm.cpu.2"

    final = service.wait_for_job(job.id, timeout=600, settings=settings)
    assert final.state == "succeeded", (final.error, zero_farm.worker_logs())
    progress = [e.data for e in service.job_events(job.id, settings=settings) if e.type == "progress"]
    assert [p["step"] for p in progress] == list(range(1, 9)), "one progress event per step, from rank 0 only"
    assert progress[-1]["loss"] < progress[0]["loss"] - 0.3, [p["loss"] for p in progress]

    adapter = service.get_adapter(final.adapter, settings=settings)
    spread = adapter.provenance["distributed"]
    assert spread["processes"] == 2 and spread["zero_stage"] == 2 and spread["comm_backend"] == "gloo"
    assert adapter.provenance["integrity"]["trainable_params"] > 0

    dest = tmp_path / "pulled"
    service.pull_adapter(final.adapter, dest, settings=settings)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[1, 5, 9, 23, 42, 7]])
    with torch.no_grad():
        before = base(ids).logits
        after = PeftModel.from_pretrained(base, dest)(ids).logits
    assert not torch.allclose(before, after, atol=1e-4), "the adapter does not change the model's output"


def test_cancel_of_a_running_two_process_job_kills_every_rank(zero_farm, tiny_model_dir, tmp_path):
    from farm.tiny import write_dataset

    settings = zero_farm.settings
    data = write_dataset(tmp_path / "chat.jsonl", "chat", n=48, seed=2)
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump(spec_dict(tiny_model_dir, data, max_steps=100000)))
    job = service.submit_job(path, settings=settings)
    seen_ranks: list[int] = []

    def cancel_once_training(view):
        if view.state == "running" and (view.progress or {}).get("step", 0) >= 2 and not seen_ranks:
            ranks = [p for p in processes_of(settings.work_dir) if "workers.runner" in " ".join(p.cmdline())]
            seen_ranks.extend(p.pid for p in ranks)
            service.cancel_job(view.id, settings=settings)

    final = service.wait_for_job(job.id, on_update=cancel_once_training, timeout=600, settings=settings)
    assert final.state == "cancelled", zero_farm.worker_logs()
    assert len(seen_ranks) == 2, "expected two runner ranks while the job trained"
    deadline = time.monotonic() + 30
    while processes_of(settings.work_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_of(settings.work_dir) == []
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                   for pid in seen_ranks)


# ------------------------------------------------------------------------------------------- refused at submit

REFUSED = [
    ({"resources": {"gpus": 0, "cpu_slots": 2}, "deepspeed": None}, r"needs a `deepspeed:` section"),
    ({"resources": {"gpus": 0, "cpu_slots": 1}}, r"a `deepspeed:` section needs more than one device"),
    ({"resources": {"gpus": 1, "cpu_slots": 1}}, r"a `deepspeed:` section needs more than one device"),
    ({"quantization": {"bits": 8}}, r"8-bit quantization cannot be sharded by ZeRO"),
    ({"deepspeed": {"stage": 3, "offload_params": True}}, r"ZeRO-3 parameter offload does not work with 4-bit"),
    ({"deepspeed": {"stage": 2, "offload_params": True}}, r"deepspeed: offload_params needs stage 3"),
    ({"deepspeed": {"stage": 1}}, r"deepspeed\.stage: Input should be 2 or 3"),
    ({"resources": {"gpus": 2, "cpu_slots": 2}}, r"cpu_slots is for CPU jobs"),
]


@pytest.mark.parametrize("change,message", REFUSED, ids=[m for _, m in REFUSED])
def test_impossible_combinations_are_refused_with_a_clear_message(change, message, tmp_path):
    spec = spec_dict("./models/tiny", "d.jsonl")
    for key, value in change.items():
        if value is None:
            spec.pop(key)
        elif isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    with pytest.raises(SpecError, match=message):
        parse_spec(spec)


def test_a_refused_spec_leaves_nothing_behind(zero_farm, tiny_model_dir, tmp_path):
    from farm.catalog import repository as repo
    from farm.catalog.session import session_scope

    bad = spec_dict(tiny_model_dir, tmp_path / "d.jsonl")
    bad["resources"] = {"gpus": 0, "cpu_slots": 1}
    path = tmp_path / "one-slot.yaml"
    path.write_text(yaml.safe_dump(bad))
    with session_scope(zero_farm.settings.database_url) as session:
        before = len(repo.list_jobs(session))
    with pytest.raises(SpecError, match=r"one-slot\.yaml: .*a `deepspeed:` section needs more than one device"):
        service.submit_job(path, settings=zero_farm.settings)
    with session_scope(zero_farm.settings.database_url) as session:
        assert len(repo.list_jobs(session)) == before


def test_zero3_with_4bit_weights_and_with_16bit_weights_are_accepted():
    # Both ran here (the slow drills below; what was tried is recorded in farm/training/deepspeed_backend.py).
    for bits in (4, 16):
        spec = parse_spec(spec_dict("./m", "d.jsonl", stage=3, bits=bits))
        assert spec.deepspeed.stage == 3 and spec.quantization.bits == bits


# ------------------------------------------------------------------------------------------- launcher and config


def test_distributed_command_runs_ranks_of_the_runner_with_cpu_settings(tmp_path):
    from workers.distributed import distributed_command
    from workers.launch import runner_command

    spec = spec_dict("m", "d.jsonl")
    argv, env = runner_command(tmp_path / "job.json", spec)
    assert argv[1:] == ["-m", "workers.distributed", "--nproc", "2", str(tmp_path / "job.json")]
    assert env["DS_ACCELERATOR"] == "cpu" and env["FARM_DIST_BACKEND"] == "gloo"
    cpus = len(os.sched_getaffinity(0))
    assert int(env["OMP_NUM_THREADS"]) == min(max(1, cpus // 2), int(os.environ.get("OMP_NUM_THREADS", cpus)))

    gpu = {**spec, "resources": {"gpus": 4}}
    _, gpu_env = distributed_command(tmp_path / "job.json", gpu, 4, {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "64"})
    assert "DS_ACCELERATOR" not in gpu_env and gpu_env["FARM_DIST_BACKEND"] == "nccl"
    assert int(gpu_env["OMP_NUM_THREADS"]) == max(1, cpus // 4)


def test_launcher_relays_rank0_events_and_marks_the_other_ranks_lines(tmp_path):
    """A job file that does not exist: every rank reports an error; only rank 0's stays an event. Rank 1 is
    stopped as soon as rank 0 fails, so on a loaded machine it may be stopped before it prints: up to three runs,
    until one shows its line."""
    marked = []
    for _ in range(3):
        out = subprocess.run([sys.executable, "-m", "workers.distributed", "--nproc", "2",
                              str(tmp_path / "nope.json")], capture_output=True, text=True, cwd=REPO_ROOT,
                             timeout=120, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
        assert out.returncode == 1, out.stdout + out.stderr
        events = [e for e in map(parse_line, out.stdout.splitlines()) if e is not None]
        assert len(events) == 1 and events[0]["type"] == "error" and events[0]["code"] == "invalid_spec"
        assert "nope.json: job file not found" in events[0]["message"]
        marked += [line for line in out.stdout.splitlines() if line.startswith("[rank 1] @@farm ")]
        if marked:
            break
    assert marked, "rank 1's error line never came through in three runs"


def test_launcher_names_the_rank_that_failed_first_unless_rank0_said_the_same():
    import io

    from workers.distributed import Launcher

    def report(errors: dict, rank: int, status: int) -> list[dict]:
        launcher = Launcher("job.json", 2, out=io.StringIO())
        launcher.rank_errors = errors
        launcher._report_failure(rank, status)
        return [e for e in map(parse_line, launcher.out.getvalue().splitlines()) if e]

    bad_data = {"type": "error", "code": "invalid_dataset", "message": "d.jsonl:3: not valid JSON"}
    broken = {"type": "error", "code": "runner_crashed", "message": "gloo: connection closed by peer"}
    assert report({0: bad_data, 1: bad_data}, 1, 1) == []  # rank 0's own event already says it
    assert report({0: broken}, 0, 1) == []
    (killed,) = report({0: broken}, 1, -9)
    assert killed["code"] == "runner_crashed" and killed["message"].startswith("rank 1 of 2 was killed by signal 9")
    (own,) = report({0: broken, 1: bad_data}, 1, 1)
    assert own["code"] == "invalid_dataset" and own["message"] == "rank 1: d.jsonl:3: not valid JSON"
    (silent,) = report({}, 0, 3)
    assert silent["message"].startswith("rank 0 of 2 exited with status 3")


def test_shard_gives_each_process_its_slice_and_a_loss_free_stand_in_when_empty():
    from farm.training.data import IGNORE_INDEX, Example
    from farm.training.deepspeed_backend import shard_rows

    rows = [[Example([1, 2, 3], [IGNORE_INDEX, 2, 3])], [Example([4, 5], [IGNORE_INDEX, 5])],
            [Example([6, 7], [IGNORE_INDEX, 7])]]
    assert shard_rows(rows, 0, 2) == rows[:2] and shard_rows(rows, 1, 2) == rows[2:]
    assert [shard_rows(rows, r, 3) for r in range(3)] == [[row] for row in rows]
    (stand_in,) = shard_rows(rows[:1], 1, 2)
    assert stand_in[0].input_ids == [1, 2, 3] and set(stand_in[0].labels) == {IGNORE_INDEX}


def test_streamed_checksum_equals_the_integrity_checksum(tiny_model_dir):
    from farm.training.deepspeed_backend import streamed_base_checksum
    from farm.training.integrity import base_params_checksum
    from farm.training.model import build_model

    spec = TrainSpec.model_validate(spec_dict(tiny_model_dir, "d.jsonl"))
    model = build_model(tiny_model_dir, spec)
    assert streamed_base_checksum(model) == base_params_checksum(model)


# The reference configs in configs/deepspeed/ are what the farm builds for these specs (world size, GPU or not).
REFERENCE_CONFIGS = {
    "zero2-cpu-2slots.json": (REPO_ROOT / "configs" / "zero2-cpu-2slots.yaml", 2, False),
    "zero3-qlora-4gpu.json": ({"deepspeed": {"stage": 3}, "resources": {"gpus": 4},
                               "training": {"micro_batch_size": 4, "grad_accum": 4, "max_grad_norm": 1.0}}, 4, True),
    "zero3-offload-2gpu.json": ({"deepspeed": {"stage": 3, "offload_optimizer": True, "offload_params": True},
                                 "quantization": {"bits": 16}, "resources": {"gpus": 2},
                                 "training": {"micro_batch_size": 1, "grad_accum": 8, "max_grad_norm": None}}, 2, True),
}


def reference_spec(source) -> TrainSpec:
    if isinstance(source, Path):
        return TrainSpec.model_validate(yaml.safe_load(source.read_text()))
    base = {"kind": "train", "name": "ref", "base_model": "m", "dataset": {"path": "d.jsonl"}}
    return TrainSpec.model_validate({**base, **source})


@pytest.mark.parametrize("name", sorted(REFERENCE_CONFIGS))
def test_reference_configs_are_what_the_farm_builds(name):
    """Refresh them after changing the builder: FARM_WRITE_DS_CONFIGS=1 pytest tests/test_deepspeed.py -k reference"""
    from farm.training.deepspeed_backend import deepspeed_config

    source, world, on_gpu = REFERENCE_CONFIGS[name]
    built = deepspeed_config(reference_spec(source), world, on_gpu)
    if os.environ.get("FARM_WRITE_DS_CONFIGS"):
        (CONFIGS / name).write_text(json.dumps(built, indent=2) + "\n")
    assert json.loads((CONFIGS / name).read_text()) == built
    assert built["train_batch_size"] == built["train_micro_batch_size_per_gpu"] * built[
        "gradient_accumulation_steps"] * world


# ------------------------------------------------------------------------------------------- drills (slow)


def make_job(root: Path, model_dir, data, **kwargs) -> Path:
    spec = TrainSpec.model_validate(spec_dict(model_dir, data, **kwargs))
    root.mkdir(parents=True, exist_ok=True)
    doc = {"job_id": "zero-job", "attempt": 1, "spec": spec.model_dump(mode="json"), "base_model": str(model_dir),
           "dataset": str(data), "eval_dataset": None, "continue_from": None, "resume_from": None,
           "output_dir": str(root / "output"), "checkpoint_dir": str(root / "checkpoints")}
    path = root / "job.json"
    path.write_text(json.dumps(doc))
    return path


def launch(job_file: Path, *, resume_from: Path | None = None, timeout: float = 600) -> list[dict]:
    """Run a job file as the worker would (workers.launch.runner_command), return its events; fail on error."""
    from workers.launch import runner_command

    doc = json.loads(job_file.read_text())
    if resume_from is not None:
        doc.update(resume_from=str(resume_from), output_dir=str(job_file.parent / "output-resumed"),
                   checkpoint_dir=str(job_file.parent / "checkpoints-resumed"))
        job_file = job_file.with_name("job-resumed.json")
        job_file.write_text(json.dumps(doc))
    argv, env = runner_command(job_file, doc["spec"])
    env["PYTHONPATH"] = str(REPO_ROOT)
    out = subprocess.run(argv, env=env, cwd=job_file.parent, capture_output=True, text=True, timeout=timeout)
    events = [e for e in map(parse_line, out.stdout.splitlines()) if e is not None]
    assert out.returncode == 0 and events[-1]["type"] == "done", out.stdout[-4000:] + out.stderr[-2000:]
    return events


def losses(events) -> list[float]:
    return [e["loss"] for e in events if e["type"] == "progress"]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_two_process_checkpoint_resumes_to_the_same_final_loss(stage, tiny_model_dir, tmp_path):
    import torch
    from safetensors.torch import load_file

    from farm.tiny import write_dataset

    data = write_dataset(tmp_path / "chat.jsonl", "chat", n=48, seed=3)
    job = make_job(tmp_path / "run", tiny_model_dir, data, stage=stage, max_steps=6, checkpoint_every=3,
                   lr_scheduler="linear", warmup_steps=2)
    whole = launch(job)
    step3 = tmp_path / "run" / "checkpoints" / "step-3"
    assert sorted(p.name for p in step3.glob("optimizer-rank*")) == ["optimizer-rank0-of2.pt", "optimizer-rank1-of2.pt"]
    assert [e["step"] for e in whole if e["type"] == "checkpoint"] == [3, 6]

    resumed = launch(job, resume_from=step3)
    assert [e["step"] for e in resumed if e["type"] == "progress"] == [4, 5, 6]
    assert losses(resumed) == pytest.approx(losses(whole)[3:], rel=1e-4)
    done = resumed[-1]
    assert done["provenance"]["lineage"]["resumed_at_step"] == 3
    a = load_file(str(tmp_path / "run" / "output" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "run" / "output-resumed" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


@pytest.mark.slow
def test_zero3_two_processes_train_4bit_qlora_and_save_a_whole_adapter(tiny_model_dir, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from farm.tiny import write_dataset

    data = write_dataset(tmp_path / "chat.jsonl", "chat", n=48, seed=4)
    events = launch(make_job(tmp_path / "z3", tiny_model_dir, data, stage=3, bits=4, max_steps=8))
    trace = losses(events)
    assert len(trace) == 8 and trace[-1] < trace[0] - 0.3, trace
    assert events[-1]["provenance"]["distributed"]["zero_stage"] == 3
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, tmp_path / "z3" / "output")
    lora = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert lora and all(p.numel() > 0 for p in lora.values()), "ZeRO-3 partitions must be gathered before saving"
    assert any(p.abs().sum() > 0 for p in lora.values()), "lora_B starts at zero; training must have moved it"
    with torch.no_grad():
        assert model(torch.tensor([[1, 5, 9]])).logits.isfinite().all()


@pytest.mark.slow
def test_two_processes_give_the_numbers_of_one_process_with_the_global_batch(tiny_model_dir, tmp_path):
    """2 ranks x micro-batch 2 == 1 process x micro-batch 4, with accumulation, a short last window (one rank gets
    a stand-in row), a second epoch, and evaluation (9 held-out rows: the last eval batch has one row)."""
    from farm.tiny import write_dataset

    data = write_dataset(tmp_path / "chat.jsonl", "chat", n=45, seed=2)
    common = dict(max_steps=None, epochs=2, grad_accum=2, lr_scheduler="cosine", warmup_steps=1, eval_every=5,
                  dataset={"eval_fraction": 0.2})
    two = launch(make_job(tmp_path / "two", tiny_model_dir, data, micro_batch_size=2, **common))
    one_job = make_job(tmp_path / "one", tiny_model_dir, data, micro_batch_size=4, **common)
    doc = json.loads(one_job.read_text())
    doc["spec"]["deepspeed"], doc["spec"]["resources"]["cpu_slots"] = None, 1
    one_job.write_text(json.dumps(doc))
    one = launch(one_job)
    assert len(losses(two)) == len(losses(one)) == 10  # 36 training rows: 9 global micro-batches, 5 windows
    assert losses(two) == pytest.approx(losses(one), rel=1e-5)
    evals = lambda events: {e["step"]: e["eval_loss"] for e in events if e["type"] == "eval"}  # noqa: E731
    assert list(evals(two)) == list(evals(one)) == [5, 10]
    assert evals(two) == pytest.approx(evals(one), rel=1e-5)
    norms = lambda events: [e["grad_norm"] for e in events if e["type"] == "progress"]  # noqa: E731
    assert norms(two) == pytest.approx(norms(one), rel=1e-5)
    assert two[-1]["metrics"]["tokens"] == one[-1]["metrics"]["tokens"]


@pytest.mark.slow
def test_a_rank_killed_mid_job_stops_the_others_and_is_named_in_the_error(tiny_model_dir, tmp_path):
    from workers.launch import runner_command

    from farm.tiny import write_dataset

    data = write_dataset(tmp_path / "chat.jsonl", "chat", n=48, seed=5)
    job = make_job(tmp_path / "k", tiny_model_dir, data, max_steps=100000)
    argv, env = runner_command(job, json.loads(job.read_text())["spec"])
    proc = subprocess.Popen(argv, env={**env, "PYTHONPATH": str(REPO_ROOT)}, cwd=job.parent, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        event = parse_line(line)
        if event and event["type"] == "progress" and event["step"] >= 2:
            break
    ranks = {int(p.environ()["RANK"]): p for p in processes_of(tmp_path) if "workers.runner" in " ".join(p.cmdline())}
    assert sorted(ranks) == [0, 1]
    ranks[1].kill()
    lines += proc.stdout.readlines()
    assert proc.wait(timeout=60) == 128 + signal.SIGKILL
    errors = [e for e in map(parse_line, lines) if e and e["type"] == "error"]
    assert errors and errors[-1]["message"].startswith("rank 1 of 2 was killed by signal 9"), lines[-20:]
    assert processes_of(tmp_path) == []


@pytest.mark.slow
def test_killed_worker_two_process_job_resumes_from_its_checkpoint(zero_farm, tiny_model_dir, tmp_path):
    """kill -9 the worker of a running 2-process job: every rank dies with it, another worker resumes from the last
    checkpoint (each rank's optimizer partition), and the final loss is the uninterrupted run's.

    It runs on the module's farm (one Redis db serves every farm of a test session): the worker it kills is
    replaced by the rescuer, which stays for the tests after it."""
    from farm.catalog import repository as repo
    from farm.catalog.session import session_scope
    from farm.tiny import write_dataset

    settings = zero_farm.settings
    data = write_dataset(tmp_path / "chat.jsonl", "chat", n=48, seed=6)
    training = dict(max_steps=16, checkpoint_every=4, lr_scheduler="linear", warmup_steps=2)
    ref_path = tmp_path / "ref.yaml"
    ref_path.write_text(yaml.safe_dump({**spec_dict(tiny_model_dir, data, **training), "name": "zero-ref"}))
    reference = service.wait_for_job(service.submit_job(ref_path, settings=settings).id, timeout=600,
                                     settings=settings)
    assert reference.state == "succeeded", (reference.error, zero_farm.worker_logs())

    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({**spec_dict(tiny_model_dir, data, **training), "name": "zero-resumed"}))
    job = service.submit_job(path, settings=settings, force=True)  # the reference's content: not deduplicated
    deadline = time.monotonic() + 300
    while True:
        view = service.get_job(job.id, settings=settings)
        with session_scope(settings.database_url) as session:
            saved = repo.latest_checkpoint(session, job.id) is not None
        if saved and (view.progress or {}).get("step", 0) >= 6:
            break
        assert view.state in ("queued", "running") and time.monotonic() < deadline, zero_farm.worker_logs()
        time.sleep(0.2)
    ranks = [p for p in processes_of(settings.work_dir) if "workers.runner" in " ".join(p.cmdline())]
    assert len(ranks) == 2
    (doomed,) = [w for w in zero_farm.workers if w.poll() is None]
    zero_farm.kill_worker(doomed, signal.SIGKILL)
    gone, alive = psutil.wait_procs(ranks, timeout=30)
    assert alive == [], "a rank outlived its worker"

    zero_farm.start_worker(queue="farm.cpu.2", name="rescuer", extra_env={"FARM_CPU_SLOTS": "2"})
    final = service.wait_for_job(job.id, timeout=600, settings=settings)
    assert final.state == "succeeded" and final.attempt == 2, (final.error, zero_farm.worker_logs())
    adapter = service.get_adapter(final.adapter, settings=settings)
    assert adapter.provenance["lineage"]["resumed_from_step"] in (4, 8, 12)
    ref_loss = service.get_adapter(reference.adapter, settings=settings).metrics["final_loss"]
    assert adapter.metrics["final_loss"] == pytest.approx(ref_loss, rel=1e-4)
