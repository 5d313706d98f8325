"""Co-training (farm.training.cotrain): several jobs on one shared base in one runner, each exactly its solo run.

Real training on the tiny model: per-step losses against each job's solo run (same seed), the saved adapters
against stock PEFT and the solo files, the base's integrity, resume from a co-trained checkpoint, a job with bad
data failing alone, and the group runner process with its control channel (join, leave)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from farm.runner_protocol import parse_line
from farm.specs import TrainSpec
from farm.tiny import write_dataset
from farm.training.cotrain import CoTrainer
from farm.training.run import run_training

REPO_ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("single_torch_thread")

FP32 = {"bits": 16, "compute_dtype": "float32"}


def make_job(root: Path, model_dir: Path, data: Path, job_id: str, *, quantization: dict | None = None,
             lora: dict | None = None, dataset: dict | None = None, **training) -> dict:
    """A job file as the supervisor writes it (farm/runner_protocol.py)."""
    training = {"max_steps": 6, "lr": 1e-2, "micro_batch_size": 4, **training}
    spec = TrainSpec(name=f"bot-{job_id}", base_model=str(model_dir),
                     dataset={"path": str(data), "format": "chat", **(dataset or {})},
                     quantization=quantization or {}, lora=lora or {}, training=training)
    folder = root / job_id
    return {"job_id": job_id, "attempt": 1, "spec": spec.model_dump(mode="json"), "base_model": str(model_dir),
            "dataset": str(data), "eval_dataset": None, "continue_from": None, "resume_from": None,
            "output_dir": str(folder / "output"), "checkpoint_dir": str(folder / "checkpoints")}


def three_jobs(root: Path, model_dir: Path, quantization: dict | None = None) -> list[dict]:
    """Different r, alpha, dropout, target modules, max_steps, micro-batch, grad_accum, checkpointing and seed."""
    data = [write_dataset(root / f"data-{i}.jsonl", "chat", n=40, seed=i) for i in range(3)]
    return [
        make_job(root, model_dir, data[0], "a", quantization=quantization, lora={"r": 8, "dropout": 0.1}, seed=1,
                 dataset={"eval_fraction": 0.2}, eval_every=3),
        make_job(root, model_dir, data[1], "b", quantization=quantization,
                 lora={"r": 4, "target_modules": ["q_proj", "v_proj"]}, max_steps=3, micro_batch_size=2, seed=2),
        make_job(root, model_dir, data[2], "c", quantization=quantization, lora={"r": 16, "alpha": 8}, grad_accum=2,
                 micro_batch_size=3, seed=3, gradient_checkpointing=True),
    ]


def solo(job: dict) -> list[dict]:
    job = {**job, "output_dir": job["output_dir"] + "-solo", "checkpoint_dir": job["checkpoint_dir"] + "-solo"}
    events: list[dict] = []
    run_training(job, events.append)
    return events


def group(jobs: list[dict], control=lambda: []) -> list[dict]:
    events: list[dict] = []
    CoTrainer(jobs, events.append, control).run()
    return events


def of(events, kind, job_id=None):
    return [e for e in events if e["type"] == kind and (job_id is None or e.get("job_id") == job_id)]


def losses(events, job_id=None):
    return [e["loss"] for e in of(events, "progress", job_id)]


def max_rel(a, b):
    assert len(a) == len(b) and a
    return max(abs(x - y) / abs(x) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def fp32_runs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("cotrain-fp32")
    jobs = three_jobs(root, tiny_model_dir, FP32)
    return jobs, {j["job_id"]: solo(j) for j in jobs}, group(jobs)


def test_each_cotrained_job_has_its_solo_loss_curve_in_fp32(fp32_runs):
    jobs, solos, events = fp32_runs
    assert not of(events, "error")
    for job in jobs:
        assert max_rel(losses(solos[job["job_id"]]), losses(events, job["job_id"])) < 1e-4
    evals_solo = [e["eval_loss"] for e in of(solos["a"], "eval")]
    evals_group = [e["eval_loss"] for e in of(events, "eval", "a")]
    assert max_rel(evals_solo, evals_group) < 1e-4


def test_the_shortest_job_leaves_early_and_the_others_go_on(fp32_runs):
    _, _, events = fp32_runs
    done_at = {e["job_id"]: i for i, e in enumerate(events) if e["type"] == "done"}
    assert set(done_at) == {"a", "b", "c"}
    assert done_at["b"] < min(done_at["a"], done_at["c"])
    sizes = {e["job_id"]: e["group_size"] for e in of(events, "progress") if e["step"] == 6}
    assert sizes == {"a": 2, "c": 1}  # c accumulates 2 micro-batches a step: its step 6 comes after a is done
    cot = {e["job_id"]: e["provenance"]["cotraining"] for e in of(events, "done")}
    assert cot["a"]["cotrained_with"] == ["b", "c"]
    assert cot["a"]["group_sizes"] == [{"step": 1, "size": 3}, {"step": 4, "size": 2}]


def test_adapters_are_the_solo_files_and_load_with_stock_peft(fp32_runs, tiny_model_dir):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    jobs, _, _ = fp32_runs
    for job in jobs:
        out, ref = Path(job["output_dir"]), Path(job["output_dir"] + "-solo")
        assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ref.iterdir())
        keys, solo_keys = (sorted(load_file(d / "adapter_model.safetensors")) for d in (out, ref))
        assert keys == solo_keys
        config, solo_config = (json.loads((d / "adapter_config.json").read_text()) for d in (out, ref))
        for c in (config, solo_config):  # peft writes a set of module names: its order is the hash seed's
            if isinstance(c["target_modules"], list):
                c["target_modules"] = sorted(c["target_modules"])
        assert config == solo_config
        assert config["r"] == job["spec"]["lora"]["r"]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[1, 5, 9, 13]])
    before = base(input_ids=ids).logits
    model = PeftModel.from_pretrained(base, jobs[0]["output_dir"])
    assert not torch.allclose(model(input_ids=ids).logits, before)


def test_the_shared_base_is_checksummed_once_and_only_lora_trains(fp32_runs):
    from farm.training.integrity import check_only_adapter_trainable

    _, _, events = fp32_runs
    integrity = {e["job_id"]: e["provenance"]["integrity"] for e in of(events, "done")}
    assert len({i["base_params_checksum"] for i in integrity.values()}) == 1
    assert integrity["c"]["trainable_params"] > integrity["a"]["trainable_params"] > integrity["b"]["trainable_params"]

    jobs = fp32_runs[0]
    trainer = CoTrainer(jobs[:2], lambda e: None)
    trainer._load_base(jobs[0])
    for job in jobs[:2]:
        trainer._join(job)
    assert check_only_adapter_trainable(trainer.model)
    from farm.training.cotrain import base_checksum

    assert base_checksum(trainer.model) == trainer.base_checksum  # b wrapped other layers: same checksum
    next(p for n, p in trainer.model.named_parameters() if "embed_tokens" in n).data[0, 0] += 1
    assert base_checksum(trainer.model) != trainer.base_checksum


def test_4bit_cotrained_losses_stay_within_one_percent_of_solo(tiny_model_dir, tmp_path):
    jobs = three_jobs(tmp_path, tiny_model_dir)[1:]
    events = group(jobs)
    for job in jobs:
        assert max_rel(losses(solo(job)), losses(events, job["job_id"])) < 0.01


def test_a_cotrained_checkpoint_resumes_to_the_same_curve(tiny_model_dir, tmp_path):
    data = write_dataset(tmp_path / "d.jsonl", "chat", n=40, seed=4)
    a = make_job(tmp_path, tiny_model_dir, data, "a", quantization=FP32, lora={"dropout": 0.2}, checkpoint_every=3)
    b = make_job(tmp_path, tiny_model_dir, data, "b", quantization=FP32, max_steps=8, seed=9)
    events = group([a, b])
    assert [e["step"] for e in of(events, "checkpoint", "a")] == [3, 6]
    resumed = {**a, "attempt": 2, "resume_from": of(events, "checkpoint", "a")[0]["path"],
               "output_dir": str(tmp_path / "a2" / "output"), "checkpoint_dir": str(tmp_path / "a2" / "ck")}
    again = group([resumed])  # alone this time: its own optimizer, schedule, RNG and data position come back
    assert max_rel(losses(events, "a")[3:], losses(again, "a")) < 1e-4


def test_a_job_with_bad_data_fails_alone(tiny_model_dir, tmp_path):
    data = write_dataset(tmp_path / "d.jsonl", "chat", n=24, seed=0)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n')
    good = make_job(tmp_path, tiny_model_dir, data, "good", quantization=FP32, max_steps=2)
    events = group([good, make_job(tmp_path, tiny_model_dir, bad, "bad", quantization=FP32)])
    [error] = of(events, "error")
    assert error["job_id"] == "bad" and error["code"] == "invalid_dataset"
    assert [e["job_id"] for e in of(events, "done")] == ["good"]


def test_group_runner_joins_and_leaves_between_steps(tiny_model_dir, tmp_path):
    """The runner process: a job joins through the control channel, another is told to leave mid-way."""
    data = write_dataset(tmp_path / "d.jsonl", "chat", n=40, seed=1)
    first = make_job(tmp_path, tiny_model_dir, data, "first", quantization=FP32, max_steps=20)
    leaver = make_job(tmp_path, tiny_model_dir, data, "leaver", quantization=FP32, max_steps=400)
    joiner = make_job(tmp_path, tiny_model_dir, data, "joiner", quantization=FP32, max_steps=3, seed=7)
    group_file = tmp_path / "group.json"
    group_file.write_text(json.dumps({"jobs": [first, leaver]}))
    proc = subprocess.Popen([sys.executable, "-m", "workers.cotrain_runner", str(group_file)], cwd=REPO_ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    events, sent = [], False
    for line in proc.stdout:
        event = parse_line(line)
        if event is None:
            continue
        events.append(event)
        if event["type"] == "progress" and event["job_id"] == "leaver" and event["step"] == 2 and not sent:
            sent = True
            proc.stdin.write(json.dumps({"op": "join", "job": joiner}) + "\n")
            proc.stdin.write(json.dumps({"op": "leave", "job_id": "leaver", "reason": "cancelled"}) + "\n")
            proc.stdin.flush()
    assert proc.wait(timeout=60) == 0
    # the leave is taken between steps, long before the leaver's 400 (counted in steps, not seconds: the test
    # process may be descheduled for a few of the runner's fast steps on a loaded machine)
    assert max(e["step"] for e in of(events, "progress", "leaver")) < 100
    assert [e["reason"] for e in of(events, "left", "leaver")] == ["cancelled"]
    assert {e["job_id"] for e in of(events, "done")} == {"first", "joiner"}
    assert len(of(events, "progress", "first")) == 20
    assert max(e["group_size"] for e in of(events, "progress", "joiner")) == 2
    done = {e["job_id"]: e for e in of(events, "done")}
    assert done["joiner"]["provenance"]["cotraining"]["cotrained_with"] == ["first"]


def test_group_runner_refuses_a_bad_group_file(tmp_path):
    path = tmp_path / "group.json"
    path.write_text('{"jobs": []}')
    out = subprocess.run([sys.executable, "-m", "workers.cotrain_runner", str(path)], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "at least one job" in out.stdout and "Traceback" not in out.stdout


def test_out_of_memory_evicts_the_newest_job_and_the_others_lose_nothing(tiny_model_dir, tmp_path):
    import torch

    data = write_dataset(tmp_path / "d.jsonl", "chat", n=40, seed=2)
    keep = make_job(tmp_path, tiny_model_dir, data, "keep", quantization=FP32, lora={"dropout": 0.0}, grad_accum=2)
    evicted = make_job(tmp_path, tiny_model_dir, data, "evicted", quantization=FP32, seed=3)
    trainer = CoTrainer([keep, evicted], (events := []).append)
    calls = {"n": 0}
    real_tick = trainer._tick

    def tick_with_oom_on_the_third():
        calls["n"] += 1
        if calls["n"] == 3:  # mid-window for `keep` (grad_accum 2): its partial gradients must be dropped
            original = trainer.model.forward

            def oom(*args, **kwargs):
                trainer.model.forward = original
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

            trainer.model.forward = oom
        real_tick()

    trainer._tick = tick_with_oom_on_the_third
    trainer.run()
    assert [(e["job_id"], e["reason"]) for e in of(events, "left")] == [("evicted", "out_of_memory")]
    assert max_rel(losses(solo(keep)), losses(events, "keep")) < 1e-4
