"""The documents of an adapter artifact besides the PEFT weights: metadata.json, training_config.yaml, README.md.

checksums.json is written by farm.store.transfer.upload_tree, last.
"""

from __future__ import annotations

import json
import subprocess
from functools import lru_cache
from pathlib import Path

import yaml

import farm
from farm.kinds import require_kind

METADATA_FILE = "metadata.json"
CONFIG_FILE = "training_config.yaml"
CARD_FILE = "README.md"
METRICS_FILE = "training_metrics.json"


@lru_cache(maxsize=1)
def farm_git_commit() -> str | None:
    """The commit of the farm's checkout, when it runs from one."""
    root = Path(farm.__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def build_metadata(*, name: str, version: int, job: dict, spec: dict, done: dict, inputs: dict) -> dict:
    """The full provenance of one adapter version (also stored in the catalog)."""
    prov = dict(done.get("provenance") or {})
    env = dict(prov.pop("environment", {}) or {})
    env.update({"farm_version": farm.__version__, "farm_git_commit": farm_git_commit()})
    meta = {
        "format": "farm-adapter/1",
        "adapter": {"name": name, "version": version, "kind": spec["kind"]},
        "job": job,
        "spec": spec,
        "base_model": {
            "ref": spec.get("base_model"),
            # the commit a Hub revision resolved to (or the model cache's content key), not a branch name
            "revision": inputs.get("base_model_revision") or spec.get("base_revision"),
            "requested_revision": spec.get("base_revision"),
            "source": inputs.get("base_model_source"),
            "fetch": inputs.get("base_model_fetch"),  # downloaded now or found in the worker's cache
            "sha256": prov.pop("base_model_sha256", None),
            "files": prov.pop("base_model_files", None),
        },
        "metrics": done.get("metrics") or {},
        "environment": env,
        "lineage": {
            "continued_from": spec.get("continue_from"),
            "resumed_from_step": inputs.get("resume_step"),
            "attempt": job.get("attempt"),
        },
    }
    if spec["kind"] == "train":
        meta["dataset"] = {"uri": spec["dataset"]["path"], "eval_uri": spec["dataset"].get("eval_path"),
                           **(prov.pop("dataset", None) or {})}
    else:
        meta["source_model"] = {"ref": spec.get("finetuned_model"),
                                "sha256": prov.pop("source_model_sha256", None),
                                "files": prov.pop("source_model_files", None)}
    meta["lineage"].update(prov.pop("lineage", None) or {})
    meta.update(prov)  # timings, integrity, anything else the runner measured
    return meta


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


ADAPTER_CONFIG = "adapter_config.json"
LOSS_PLOT = "loss.png"


def set_base_model_reference(adapter_dir: Path, ref: str) -> None:
    """adapter_config.json's base_model_name_or_path = the user's reference (Hub id, s3:// URI, farm:NAME:V or
    the path as given), not the worker's scratch folder the base was loaded from."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file() or not ref:
        return
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = ref
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def card_tags(spec: dict) -> list[str]:
    """Hub tags of an adapter: lora always, qlora for a quantized base, how it was made."""
    tags = ["peft", "lora"]
    if spec["kind"] == "train" and (spec.get("quantization") or {}).get("bits", 16) < 16:
        tags.append("qlora")
    tags.append(require_kind(spec["kind"]).hub_tag)
    return tags + [t for t in spec.get("tags") or [] if t not in tags]  # the spec's own topic words


def card_data(meta: dict):
    """The card's YAML front matter (huggingface_hub.ModelCardData), what the Hub and its tools read."""
    from huggingface_hub import ModelCardData

    spec, base = meta["spec"], meta["base_model"]
    dataset = (meta.get("dataset") or {}).get("uri")
    return ModelCardData(base_model=base["ref"], library_name="peft", pipeline_tag="text-generation",
                         tags=card_tags(spec), license=spec.get("license"), datasets=[dataset] if dataset else None)


def _figures(meta: dict) -> list[str]:
    m = meta["metrics"]
    rows = [("steps", m.get("steps")), ("epochs (the steps amount to)", m.get("epochs")),
            ("steps per epoch", m.get("steps_per_epoch")), ("final train loss", m.get("final_loss")),
            ("final eval loss", m.get("final_eval_loss")), ("best eval loss", m.get("best_eval_loss")),
            ("perplexity", m.get("perplexity")), ("tokens trained on", m.get("tokens")),
            ("tokens/s", m.get("tokens_per_s")), ("train seconds", m.get("train_seconds")),
            ("stopped early", m.get("stopped_early"))]
    shown = {"steps", "epochs", "steps_per_epoch", "final_loss", "final_eval_loss", "best_eval_loss", "perplexity",
             "tokens", "tokens_per_s", "train_seconds", "stopped_early"}
    rows += [(k, v) for k, v in sorted(m.items()) if k not in shown and not isinstance(v, (dict, list))]
    return ["| figure | value |", "| --- | --- |"] + [f"| {k} | {_fmt(v)} |" for k, v in rows if v is not None]


def model_card(meta: dict, *, with_plot: bool = False) -> str:
    """README.md: YAML front matter for the Hub, then what it is, how it was made, how to load it."""
    from huggingface_hub import ModelCard

    a, spec, base = meta["adapter"], meta["spec"], meta["base_model"]
    revision = base.get("revision")
    lines = [f"# {a['name']} v{a['version']}", "",
             f"A {require_kind(a['kind']).card_title} for "
             f"`{base['ref']}`, made by the farm (job `{meta['job']['id']}`).", "",
             "## Base model", "", f"- reference: `{base['ref']}`",
             f"- revision: {_fmt(revision)}" + (f" (asked for `{base['requested_revision']}`)"
                                               if base.get("requested_revision") not in (None, revision) else ""),
             f"- weights sha256: `{_fmt(base.get('sha256'))}`", ""]
    if a["kind"] == "train":
        ds = meta.get("dataset", {})
        lines += ["## Data", "", f"- dataset: `{ds.get('uri')}` ({ds.get('format')})",
                  f"- sha256: `{_fmt(ds.get('sha256'))}`", f"- examples: {_fmt(ds.get('examples'))}"
                  f" (truncated {_fmt(ds.get('truncated'))}, dropped {_fmt(ds.get('dropped'))}, "
                  f"eval {_fmt(ds.get('eval_examples'))})", "",
                  "## Training", ""] + _figures(meta) + ["",
                  "### Hyperparameters", "", "```yaml",
                  yaml.safe_dump({k: spec[k] for k in ("lora", "quantization", "training", "deepspeed")},
                                 sort_keys=False).rstrip(), "```", ""]
        if with_plot:
            lines += ["### Loss", "", f"![train and eval loss by step]({LOSS_PLOT})", "",
                      "The TensorBoard log is in `tensorboard/`: `tensorboard --logdir tensorboard`.", ""]
    else:
        src = meta.get("source_model", {})
        lines += ["## Source", "", f"- fine-tuned model: `{src.get('ref')}`", f"- sha256: `{_fmt(src.get('sha256'))}`",
                  f"- rank: {_fmt(spec.get('rank'))}, energy: {_fmt(spec.get('energy'))}, "
                  f"max_rank: {spec.get('max_rank')}, svd: {spec.get('svd')}", "",
                  "## Metrics", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in sorted(meta["metrics"].items())
                  if not isinstance(v, (dict, list))]
        lines.append("")
    env = meta.get("environment") or {}
    lines += ["## Provenance", "", f"- job: `{meta['job']['id']}` (attempt {meta['job'].get('attempt')}), spec sha256 "
              f"`{_fmt(meta['job'].get('spec_hash'))}`",
              f"- farm {_fmt(env.get('farm_version'))} ({_fmt(env.get('farm_git_commit'))}), torch "
              f"{_fmt(env.get('torch'))}, transformers {_fmt(env.get('transformers'))}, peft {_fmt(env.get('peft'))}",
              "- every file's sha256 is in `checksums.json`; the full record is `metadata.json`", ""]
    load_rev = f", revision={revision!r}" if base.get("source") == "hub" and revision else ""
    lines += ["## Load it", "", "```python", "from transformers import AutoModelForCausalLM",
              "from peft import PeftModel", "",
              f"base = AutoModelForCausalLM.from_pretrained({base['ref']!r}{load_rev})",
              "model = PeftModel.from_pretrained(base, \"path/to/this/folder\")", "```", "",
              f"Fetch it with `farm pull {a['name']}:{a['version']} DEST`, which verifies every file's sha256.", ""]
    card = ModelCard("---\n" + card_data(meta).to_yaml() + "\n---\n\n" + "\n".join(lines))
    return str(card.content)


def write_artifact_docs(output_dir: Path, meta: dict) -> None:
    """Write metadata.json, training_config.yaml and README.md beside the adapter weights, and make
    adapter_config.json name the base model as the user gave it."""
    output_dir = Path(output_dir)
    set_base_model_reference(output_dir, meta["base_model"]["ref"])
    (output_dir / METADATA_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
    (output_dir / CONFIG_FILE).write_text(yaml.safe_dump(meta["spec"], sort_keys=False))
    (output_dir / CARD_FILE).write_text(model_card(meta, with_plot=(output_dir / LOSS_PLOT).is_file()))
