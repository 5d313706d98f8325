"""The adapter artifact's documents and pictures (issue 13): a Hub-conformant card, the user's base reference in
adapter_config.json, a TensorBoard log and loss.png."""

from __future__ import annotations

import json

from farm.artifacts import build_metadata, write_artifact_docs

HISTORY = [{"step": s, "epoch": s / 4, "loss": 3.0 - 0.1 * s, "lr": 1e-3, "tokens_per_s": 900.0 + s,
            "grad_norm": 1.0 / s} for s in range(1, 13)]
HISTORY[3].update(eval_loss=2.9, perplexity=18.2)
HISTORY[11].update(eval_loss=2.2, perplexity=9.0)


def _meta(base_ref="org/tiny-llama", license="apache-2.0"):
    spec = {"kind": "train", "name": "bot", "base_model": base_ref, "base_revision": "main", "license": license,
            "dataset": {"path": "store:datasets/ab12.jsonl", "format": "chat"},
            "lora": {"r": 4}, "quantization": {"bits": 4}, "training": {"epochs": 1, "max_steps": 12},
            "deepspeed": None}
    done = {"metrics": {"steps": 12, "epochs": 4.0, "steps_per_epoch": 3, "final_loss": 1.8, "final_eval_loss": 2.2,
                        "tokens": 4000},
            "provenance": {"base_model_sha256": "f" * 64, "dataset": {"sha256": "a" * 64, "examples": 12,
                                                                      "format": "chat"}}}
    job = {"id": "job123", "attempt": 1, "spec_hash": "c" * 64}
    inputs = {"base_model_revision": "0123456789abcdef0123456789abcdef01234567", "base_model_source": "hub"}
    return build_metadata(name="bot", version=2, job=job, spec=spec, done=done, inputs=inputs)


def test_card_front_matter_parses_with_modelcard_load(tmp_path):
    from huggingface_hub import ModelCard

    from farm.training.figures import plot_loss

    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/scratch/w/base",
                                                              "peft_type": "LORA"}))
    plot_loss(HISTORY, tmp_path / "loss.png")
    meta = _meta()
    assert meta["base_model"]["revision"].startswith("0123") and meta["base_model"]["requested_revision"] == "main"
    write_artifact_docs(tmp_path, meta)

    card = ModelCard.load(tmp_path / "README.md")
    data = card.data.to_dict()
    assert data["base_model"] == "org/tiny-llama" and data["library_name"] == "peft"
    assert data["pipeline_tag"] == "text-generation" and data["license"] == "apache-2.0"
    assert {"lora", "qlora", "peft"} <= set(data["tags"]) and data["datasets"] == ["store:datasets/ab12.jsonl"]
    text = card.text
    assert "| steps | 12 |" in text and "| epochs (the steps amount to) | 4 |" in text
    assert "![train and eval loss by step](loss.png)" in text
    assert "revision='0123456789abcdef0123456789abcdef01234567'" in text  # the load snippet pins the commit
    assert json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/tiny-llama"


def test_card_without_license_or_plot_is_still_valid(tmp_path):
    from huggingface_hub import ModelCard

    write_artifact_docs(tmp_path, _meta(base_ref="s3://models/llama", license=None))
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model == "s3://models/llama" and card.data.license is None
    assert "loss.png" not in card.text


def test_tensorboard_log_and_loss_plot(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from farm.training.figures import plot_loss, write_tensorboard

    write_tensorboard(HISTORY, tmp_path / "tensorboard")
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "eval/loss"} <= tags
    assert [e.step for e in events.Scalars("eval/loss")] == [4, 12]
    assert abs(events.Scalars("train/loss")[-1].value - 1.8) < 1e-6

    png = plot_loss(HISTORY, tmp_path / "loss.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = plot_loss(HISTORY, tmp_path / "again.png")
    assert again.read_bytes() == png.read_bytes(), "same history, same bytes (same sha256 in checksums.json)"
    assert plot_loss([], tmp_path / "none.png") is None
