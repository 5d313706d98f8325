"""Real training runs on the tiny model (4-bit QLoRA on the CPU): loss, outputs, determinism, resume, integrity,
and the runner entry point as the supervisor starts it."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from farm.errors import DatasetError, IntegrityError, ModelError, SpecError, StoreError
from farm.runner_protocol import parse_line
from farm.specs import TrainSpec
from farm.tiny import write_dataset
from farm.training.run import run_training

REPO_ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def make_job(root: Path, model_dir: Path, data: Path, *, dataset: dict | None = None, quantization: dict | None = None,
             lora: dict | None = None, **training) -> dict:
    """A job.json document as the supervisor writes it (farm/runner_protocol.py)."""
    training = {"max_steps": 6, "lr": 1e-2, "micro_batch_size": 4, **training}
    spec = TrainSpec(name="tiny-bot", base_model=str(model_dir), dataset={"path": str(data), "format": "chat",
                                                                          **(dataset or {})},
                     quantization=quantization or {}, lora=lora or {}, training=training)
    root.mkdir(parents=True, exist_ok=True)
    return {"job_id": "job-1", "attempt": 1, "spec": spec.model_dump(mode="json"), "base_model": str(model_dir),
            "dataset": str(data), "eval_dataset": None, "continue_from": None, "resume_from": None,
            "output_dir": str(root / "output"), "checkpoint_dir": str(root / "checkpoints")}


def run(job: dict) -> list[dict]:
    events: list[dict] = []
    run_training(job, events.append)
    return events


def of_type(events, kind):
    return [e for e in events if e["type"] == kind]


def losses(events):
    return [e["loss"] for e in of_type(events, "progress")]


@pytest.fixture(scope="module")
def qlora_run(tiny_model_dir, tmp_path_factory):
    """One 24-step 4-bit QLoRA run on a chat dataset with a held-out tenth, shared by the tests that read it."""
    root = tmp_path_factory.mktemp("qlora")
    data = write_dataset(root / "chat.jsonl", "chat", n=64, seed=0)
    job = make_job(root, tiny_model_dir, data, dataset={"eval_fraction": 0.1}, max_steps=24, eval_every=8)
    return job, run(job)


# ------------------------------------------------------------------------------------------------- a real run


def test_qlora_run_lowers_the_loss_and_reports_every_step(qlora_run):
    job, events = qlora_run
    progress = of_type(events, "progress")
    assert [e["step"] for e in progress] == list(range(1, 25))
    assert {e["total_steps"] for e in progress} == {24}
    for key in ("loss", "lr", "tokens_per_s", "eta_s", "epoch", "phase"):
        assert key in progress[0]
    assert progress[-1]["eta_s"] == 0
    trace = losses(events)
    assert sum(trace[-4:]) / 4 < trace[0] - 1.0, trace
    evals = of_type(events, "eval")
    assert [e["step"] for e in evals] == [8, 16, 24]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert evals[-1]["perplexity"] == pytest.approx(2.718281828 ** evals[-1]["eval_loss"], rel=1e-6)
    done = of_type(events, "done")
    assert len(done) == 1 and events[-1] is done[0]
    metrics = done[0]["metrics"]
    assert metrics["steps"] == 24 and metrics["final_loss"] == trace[-1]
    assert metrics["final_eval_loss"] == evals[-1]["eval_loss"]
    assert metrics["tokens"] > 0 and metrics["tokens_per_s"] > 0 and metrics["train_seconds"] > 0
    assert any("58 train and 6 eval examples" in e["message"] for e in of_type(events, "log"))


def test_provenance_names_base_data_environment_and_integrity(qlora_run):
    job, events = qlora_run
    prov = of_type(events, "done")[0]["provenance"]
    weights = Path(job["base_model"]) / "model.safetensors"
    assert prov["base_model_files"] == {"model.safetensors": hashlib.sha256(weights.read_bytes()).hexdigest()}
    assert len(prov["base_model_sha256"]) == 64
    data = prov["dataset"]
    assert data["sha256"] == hashlib.sha256(Path(job["dataset"]).read_bytes()).hexdigest()
    assert (data["format"], data["examples"], data["eval_examples"], data["truncated"], data["dropped"]) == \
        ("chat", 58, 6, 0, 0)
    env = prov["environment"]
    for key in ("python", "torch", "transformers", "peft", "bitsandbytes", "deepspeed", "host"):
        assert env[key], key
    assert env["device"]["type"] == "cpu" and env["device"]["count"] == 1 and env["device"]["names"]
    integrity = prov["integrity"]
    assert 0 < integrity["trainable_params"] < integrity["total_params"]
    assert len(integrity["base_params_checksum"]) == 64
    assert {"hash_seconds", "data_seconds", "load_seconds", "train_seconds", "total_seconds"} <= set(prov["timings"])


def test_adapter_loads_with_stock_peft_and_changes_the_output(qlora_run):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    job, events = qlora_run
    out = Path(job["output_dir"])
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "training_metrics.json"} <= names
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (8, 16, "LORA")
    ids = torch.tensor([[1, 4, 204, 298, 296, 267, 268, 327]])
    base = AutoModelForCausalLM.from_pretrained(job["base_model"])
    with torch.no_grad():
        before = base(ids).logits
        adapted = PeftModel.from_pretrained(base, str(out)).eval()
        after = adapted(ids).logits
    assert not torch.allclose(before, after, atol=1e-3)
    metrics = json.loads((out / "training_metrics.json").read_text())
    assert [h["step"] for h in metrics["history"]] == list(range(1, 25))
    assert [h["step"] for h in metrics["history"] if "eval_loss" in h] == [8, 16, 24]
    assert {"loss", "lr", "tokens_per_s"} <= set(metrics["history"][0])
    assert metrics["summary"]["steps"] == 24


def test_same_seed_gives_the_same_loss_curve(tiny_model_dir, tmp_path):
    data = write_dataset(tmp_path / "chat.jsonl", "chat", n=32, seed=1)
    first = losses(run(make_job(tmp_path / "a", tiny_model_dir, data, seed=5)))
    second = losses(run(make_job(tmp_path / "b", tiny_model_dir, data, seed=5)))
    other = losses(run(make_job(tmp_path / "c", tiny_model_dir, data, seed=6)))
    assert first == second
    assert first != other


def test_continue_from_starts_at_the_parent_adapter(qlora_run, tiny_model_dir, tmp_path):
    parent_job, parent_events = qlora_run
    job = make_job(tmp_path / "child", tiny_model_dir, Path(parent_job["dataset"]), max_steps=2)
    fresh_first = losses(parent_events)[0]
    job["continue_from"] = parent_job["output_dir"]
    events = run(job)
    assert losses(events)[0] < fresh_first - 1.0
    parent_weights = Path(parent_job["output_dir"]) / "adapter_model.safetensors"
    lineage = of_type(events, "done")[0]["provenance"]["lineage"]
    assert lineage["parent_adapter_sha256"] == hashlib.sha256(parent_weights.read_bytes()).hexdigest()


@pytest.mark.parametrize("quantization, training", [
    ({"bits": 8}, {}),
    ({"bits": 16, "compute_dtype": "float32"}, {"gradient_checkpointing": True}),
    ({"bits": 4}, {"packing": True, "gradient_checkpointing": True, "grad_accum": 2}),
], ids=["int8", "16bit-checkpointing", "4bit-packed"])
def test_other_precisions_and_options_train(tiny_model_dir, tmp_path, quantization, training):
    data = write_dataset(tmp_path / "chat.jsonl", "chat", n=32, seed=2)
    events = run(make_job(tmp_path, tiny_model_dir, data, quantization=quantization, max_steps=4, **training))
    trace = losses(events)
    assert len(trace) == 4 and trace[-1] < trace[0]
    assert (Path(tmp_path) / "output" / "adapter_model.safetensors").is_file()


def test_packing_trains_on_fewer_rows(tiny_model_dir, tmp_path):
    data = write_dataset(tmp_path / "text.jsonl", "text", n=40, seed=3)
    plain = run(make_job(tmp_path / "plain", tiny_model_dir, data, dataset={"format": "text"}, max_steps=None))
    packed = run(make_job(tmp_path / "packed", tiny_model_dir, data, dataset={"format": "text"}, max_steps=None,
                          packing=True, max_seq_len=128))
    # One epoch: the same tokens, in far fewer sequences (so far fewer steps).
    assert of_type(plain, "done")[0]["metrics"]["tokens"] == of_type(packed, "done")[0]["metrics"]["tokens"]
    assert len(losses(packed)) * 3 <= len(losses(plain))


def test_early_stopping_stops_when_eval_loss_stops_improving(tiny_model_dir, tmp_path):
    data = write_dataset(tmp_path / "chat.jsonl", "chat", n=48, seed=4)
    # A learning rate this high makes eval loss bounce: it rises at some evaluation, which must stop the run.
    events = run(make_job(tmp_path, tiny_model_dir, data, dataset={"eval_fraction": 0.2}, max_steps=16, lr=1.0,
                          lr_scheduler="constant", eval_every=1, early_stopping_patience=1))
    evals = [e["eval_loss"] for e in of_type(events, "eval")]
    first_rise = next(i for i in range(1, len(evals)) if evals[i] >= min(evals[:i]))
    assert len(evals) == first_rise + 1 < 16
    assert losses(events) and len(losses(events)) == len(evals)
    assert of_type(events, "done")[0]["metrics"]["stopped_early"] is True
    assert any("early stop" in e["message"] for e in of_type(events, "log"))


# ------------------------------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def checkpointed_run(tiny_model_dir, tmp_path_factory):
    """6 steps with a checkpoint every 2, dropout on, 2 micro-batches per step, 3 steps per epoch."""
    root = tmp_path_factory.mktemp("ckpt")
    data = write_dataset(root / "chat.jsonl", "chat", n=16, seed=5)
    settings = dict(micro_batch_size=2, grad_accum=2, checkpoint_every=2, eval_every=2, lr_scheduler="cosine",
                    warmup_steps=2)
    job = make_job(root / "ref", tiny_model_dir, data, dataset={"eval_fraction": 0.25}, lora={"dropout": 0.1},
                   **settings)
    return job, run(job), settings


def test_checkpoints_hold_adapter_optimizer_rng_and_position(checkpointed_run):
    job, events, _ = checkpointed_run
    marks = of_type(events, "checkpoint")
    assert [(m["step"], Path(m["path"]).name) for m in marks] == [(2, "step-2"), (4, "step-4"), (6, "step-6")]
    step4 = Path(marks[1]["path"])
    names = {p.relative_to(step4).as_posix() for p in step4.rglob("*") if p.is_file()}
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors", "optimizer.pt", "scheduler.json",
            "rng_state.safetensors", "trainer_state.json"} <= names
    state = json.loads((step4 / "trainer_state.json").read_text())
    # 12 training rows in micro-batches of 2, 2 per step: 3 steps per epoch, so step 4 is 1 step into epoch 1.
    assert (state["state"]["step"], state["state"]["epoch"], state["state"]["step_in_epoch"]) == (4, 1, 1)
    assert state["batch_index"] == 2 and state["steps_per_epoch"] == 3
    assert [h["step"] for h in state["state"]["history"]] == [1, 2, 3, 4]
    assert set(state["rng"]) == {"python", "numpy"}
    assert not list(Path(job["checkpoint_dir"]).glob("*.tmp"))


@pytest.mark.parametrize("at_step", [2, 4])
def test_resumed_run_matches_the_uninterrupted_one(checkpointed_run, tiny_model_dir, tmp_path, at_step):
    import torch
    from safetensors.torch import load_file

    ref_job, ref_events, settings = checkpointed_run
    job = make_job(tmp_path, tiny_model_dir, Path(ref_job["dataset"]), dataset={"eval_fraction": 0.25},
                   lora={"dropout": 0.1}, **settings)
    job["resume_from"] = str(Path(ref_job["checkpoint_dir"]) / f"step-{at_step}")
    events = run(job)
    assert [e["step"] for e in of_type(events, "progress")] == list(range(at_step + 1, 7))
    assert losses(events) == pytest.approx(losses(ref_events)[at_step:], rel=1e-6, abs=1e-7)
    ref_evals = [(e["step"], e["eval_loss"]) for e in of_type(ref_events, "eval") if e["step"] > at_step]
    got_evals = [(e["step"], e["eval_loss"]) for e in of_type(events, "eval")]
    assert [s for s, _ in got_evals] == [s for s, _ in ref_evals]
    assert [v for _, v in got_evals] == pytest.approx([v for _, v in ref_evals], rel=1e-6)
    ref_weights = load_file(str(Path(ref_job["output_dir"]) / "adapter_model.safetensors"))
    weights = load_file(str(Path(job["output_dir"]) / "adapter_model.safetensors"))
    assert ref_weights.keys() == weights.keys()
    for name in ref_weights:
        torch.testing.assert_close(weights[name], ref_weights[name], rtol=1e-6, atol=1e-7)
    done = of_type(events, "done")[0]
    assert done["metrics"]["steps"] == 6
    assert done["provenance"]["lineage"]["resumed_at_step"] == at_step
    history = json.loads((Path(job["output_dir"]) / "training_metrics.json").read_text())["history"]
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5, 6]


def test_resume_refuses_a_checkpoint_of_other_data(checkpointed_run, tiny_model_dir, tmp_path):
    ref_job, _, settings = checkpointed_run
    other = write_dataset(tmp_path / "other.jsonl", "chat", n=16, seed=99)
    job = make_job(tmp_path, tiny_model_dir, other, dataset={"eval_fraction": 0.25}, lora={"dropout": 0.1},
                   **settings)
    job["resume_from"] = str(Path(ref_job["checkpoint_dir"]) / "step-2")
    with pytest.raises(DatasetError, match="the checkpoint was made on other data"):
        run(job)


def test_resume_refuses_an_incomplete_checkpoint(checkpointed_run, tiny_model_dir, tmp_path):
    import shutil

    ref_job, _, settings = checkpointed_run
    broken = tmp_path / "step-2"
    shutil.copytree(Path(ref_job["checkpoint_dir"]) / "step-2", broken)
    (broken / "rng_state.safetensors").unlink()
    job = make_job(tmp_path, tiny_model_dir, Path(ref_job["dataset"]), dataset={"eval_fraction": 0.25}, **settings)
    job["resume_from"] = str(broken)
    with pytest.raises(StoreError, match=r"not a complete training checkpoint \(missing rng_state.safetensors\)"):
        run(job)


# ------------------------------------------------------------------------------------------------- integrity


@pytest.fixture
def qlora_model(tiny_model_dir):
    from farm.training.model import build_model

    spec = TrainSpec(name="t", base_model=str(tiny_model_dir), dataset={"path": "d.jsonl"})
    return build_model(tiny_model_dir, spec)


def test_a_trainable_base_weight_is_an_integrity_error(qlora_model):
    from farm.training.integrity import check_only_adapter_trainable

    trainable, total = check_only_adapter_trainable(qlora_model)
    assert 0 < trainable < total
    norm = qlora_model.base_model.model.model.norm.weight
    norm.requires_grad_(True)
    with pytest.raises(IntegrityError, match=r"1 non-adapter parameter\(s\) would be trained: .*model\.norm\.weight"):
        check_only_adapter_trainable(qlora_model)


def test_a_changed_base_weight_is_an_integrity_error(qlora_model):
    import torch

    from farm.training.integrity import base_params_checksum, verify_base_unchanged

    before = base_params_checksum(qlora_model)
    lora = next(p for n, p in qlora_model.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        lora.add_(1.0)  # adapter weights may change ...
    verify_base_unchanged(before, base_params_checksum(qlora_model))
    with torch.no_grad():
        qlora_model.base_model.model.model.layers[0].input_layernorm.weight.add_(1e-3)  # ... base weights may not
    with pytest.raises(IntegrityError, match="the frozen base weights changed during training"):
        verify_base_unchanged(before, base_params_checksum(qlora_model))


def test_continuing_an_adapter_that_trains_base_modules_is_refused(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    parent = tmp_path / "parent"
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"],
                                    task_type="CAUSAL_LM")).save_pretrained(parent)
    job = make_job(tmp_path, tiny_model_dir, write_dataset(tmp_path / "chat.jsonl", "chat", n=8), max_steps=1)
    job["continue_from"] = str(parent)
    with pytest.raises(IntegrityError, match=r"would be trained: .*lm_head.*make sure it has no modules_to_save"):
        run(job)
    assert not (tmp_path / "output" / "adapter_model.safetensors").exists()


# ------------------------------------------------------------------------------------------------- bad jobs


def test_bad_jobs_fail_with_clear_errors(tiny_model_dir, tmp_path):
    data = write_dataset(tmp_path / "chat.jsonl", "chat", n=8)
    good = make_job(tmp_path, tiny_model_dir, data, max_steps=1)

    with pytest.raises(SpecError, match="job file: missing dataset, output_dir"):
        run({**good, "dataset": None, "output_dir": ""})
    with pytest.raises(SpecError, match=r"training\.lr: Input should be greater than 0"):
        run({**good, "spec": {**good["spec"], "training": {**good["spec"]["training"], "lr": -1}}})
    with pytest.raises(ModelError, match="base model folder not found"):
        run({**good, "base_model": str(tmp_path / "nowhere")})
    (tmp_path / "no-config").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        run({**good, "base_model": str(tmp_path / "no-config")})
    bad_targets = make_job(tmp_path, tiny_model_dir, data, lora={"target_modules": ["attn_qkv"]}, max_steps=1)
    with pytest.raises(ModelError, match=r"lora\.target_modules \['attn_qkv'\] do not fit the base model"):
        run(bad_targets)
    broken = tmp_path / "broken.jsonl"
    broken.write_text(data.read_text() + '{"messages": []}\n')
    with pytest.raises(DatasetError, match=r"broken\.jsonl:9: field 'messages' must be a non-empty list"):
        run({**good, "dataset": str(broken)})
    assert not (tmp_path / "output").exists()


# ------------------------------------------------------------------------------------------------- the runner


def test_runner_process_reports_progress_and_done(tiny_model_dir, tmp_path):
    data = write_dataset(tmp_path / "chat.jsonl", "chat", n=16)
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps(make_job(tmp_path, tiny_model_dir, data, max_steps=3, checkpoint_every=2)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "workers.runner", str(job_file)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    events = [e for e in map(parse_line, proc.stdout.splitlines()) if e is not None]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [e["step"] for e in of_type(events, "progress")] == [1, 2, 3]
    assert [e["step"] for e in of_type(events, "checkpoint")] == [2]
    assert events[-1]["type"] == "done" and events[-1]["metrics"]["steps"] == 3
    assert events[-1]["provenance"]["environment"]["device"]["threads"] == 1


def test_runner_turns_errors_into_error_events(tiny_model_dir, tmp_path, capsys):
    from workers.runner import main

    data = tmp_path / "bad.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps(make_job(tmp_path, tiny_model_dir, data)))
    assert main([str(job_file)]) == 1
    event = parse_line(capsys.readouterr().out.strip().splitlines()[-1])
    assert event["type"] == "error" and event["code"] == "invalid_dataset"
    assert "bad.jsonl:1: no assistant message" in event["message"]

    # A fault that is nobody's input error (a truncated weight file) is a crash: retried by the supervisor.
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    job_file.write_text(json.dumps(make_job(tmp_path, model, write_dataset(tmp_path / "ok.jsonl", "chat", n=4))))
    assert main([str(job_file)]) == 1
    event = parse_line(capsys.readouterr().out.strip().splitlines()[-1])
    assert event["code"] == "runner_crashed"
    assert "Traceback" not in event["message"].splitlines()[0] or len(event["message"].splitlines()) > 1
    assert "Error" in event["message"].splitlines()[-1]

    assert main([str(tmp_path / "missing.json")]) == 1
    event = parse_line(capsys.readouterr().out.strip().splitlines()[-1])
    assert event["code"] == "invalid_spec" and "job file not found" in event["message"]
