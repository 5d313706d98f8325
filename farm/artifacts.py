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
            "revision": spec.get("base_revision"),
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


def model_card(meta: dict) -> str:
    """A README.md model card: what it is, how it was made, how to load it."""
    a, spec, base = meta["adapter"], meta["spec"], meta["base_model"]
    lines = [f"# {a['name']} v{a['version']}", "",
             f"A {'LoRA extracted by SVD' if a['kind'] == 'extract' else 'LoRA/QLoRA adapter'} for "
             f"`{base['ref']}`, made by the farm (job `{meta['job']['id']}`).", "",
             "## Base model", "", f"- reference: `{base['ref']}`", f"- revision: {_fmt(base.get('revision'))}",
             f"- weights sha256: `{_fmt(base.get('sha256'))}`", ""]
    if a["kind"] == "train":
        ds = meta.get("dataset", {})
        lines += ["## Data", "", f"- dataset: `{ds.get('uri')}` ({ds.get('format')})",
                  f"- sha256: `{_fmt(ds.get('sha256'))}`", f"- examples: {_fmt(ds.get('examples'))}"
                  f" (truncated {_fmt(ds.get('truncated'))}, dropped {_fmt(ds.get('dropped'))}, "
                  f"eval {_fmt(ds.get('eval_examples'))})", "",
                  "## Hyperparameters", "", "```yaml",
                  yaml.safe_dump({k: spec[k] for k in ("lora", "quantization", "training", "deepspeed")},
                                 sort_keys=False).rstrip(), "```", ""]
    else:
        src = meta.get("source_model", {})
        lines += ["## Source", "", f"- fine-tuned model: `{src.get('ref')}`", f"- sha256: `{_fmt(src.get('sha256'))}`",
                  f"- rank: {_fmt(spec.get('rank'))}, energy: {_fmt(spec.get('energy'))}, "
                  f"max_rank: {spec.get('max_rank')}, svd: {spec.get('svd')}", ""]
    lines += ["## Metrics", "", "| metric | value |", "| --- | --- |"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in sorted(meta["metrics"].items()) if not isinstance(v, (dict, list))]
    lines += ["", "## Load it", "", "```python", "from transformers import AutoModelForCausalLM",
              "from peft import PeftModel", "", f"base = AutoModelForCausalLM.from_pretrained({base['ref']!r})",
              "model = PeftModel.from_pretrained(base, \"path/to/this/folder\")", "```", "",
              f"Fetch it with `farm pull {a['name']}:{a['version']} DEST`, which verifies every file's sha256.", ""]
    return "\n".join(lines)


def write_artifact_docs(output_dir: Path, meta: dict) -> None:
    """Write metadata.json, training_config.yaml and README.md beside the adapter weights."""
    output_dir = Path(output_dir)
    (output_dir / METADATA_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
    (output_dir / CONFIG_FILE).write_text(yaml.safe_dump(meta["spec"], sort_keys=False))
    (output_dir / CARD_FILE).write_text(model_card(meta))
