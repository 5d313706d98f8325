"""The documents of a merged model besides its weights: metadata.json (provenance and lineage) and README.md."""

from __future__ import annotations

import json
from pathlib import Path

import farm
from farm.artifacts import CARD_FILE, METADATA_FILE, farm_git_commit


def build_merge_metadata(*, name: str, version: int, job: dict, spec: dict, done: dict, inputs: dict) -> dict:
    """Provenance of a merged model: the job, the base (ref, revision, weights sha256), the adapter merged."""
    prov = dict(done.get("provenance") or {})
    env = dict(prov.pop("environment", {}) or {})
    env.update({"farm_version": farm.__version__, "farm_git_commit": farm_git_commit()})
    merge = prov.pop("merge", {}) or {}
    return {
        "format": "farm-merged-model/1",
        "model": {"name": name, "version": version, "kind": "merge", "dtype": merge.get("dtype")},
        "job": job,
        "spec": spec,
        "base_model": {"ref": spec["base_model"],
                       "revision": inputs.get("base_model_revision") or spec.get("base_revision"),
                       "source": inputs.get("base_model_source"),
                       "fetch": inputs.get("base_model_fetch"),
                       "sha256": prov.pop("base_model_sha256", None), "files": prov.pop("base_model_files", None)},
        "lineage": {"adapter": spec["adapter"], "adapter_sha256": merge.get("adapter_sha256"),
                    "base_model": spec["base_model"], "attempt": job.get("attempt")},
        "merge": merge,
        "metrics": done.get("metrics") or {},
        "environment": env,
        **prov,
    }


def merged_card(meta: dict) -> str:
    """README.md of a merged model: Hub front matter, lineage, how to load it."""
    from huggingface_hub import ModelCard, ModelCardData

    m, spec, base = meta["model"], meta["spec"], meta["base_model"]
    data = ModelCardData(base_model=base["ref"], library_name="transformers", pipeline_tag="text-generation",
                         tags=["merged-lora", "lora-farm"], license=spec.get("license"))
    lines = [f"# {m['name']} v{m['version']}", "",
             f"`{base['ref']}` with the LoRA adapter `{spec['adapter']}` merged into its weights "
             f"({m['dtype']}), made by the farm (job `{meta['job']['id']}`). A standard transformers model: no PEFT "
             "needed to run it.", "",
             "## Lineage", "", f"- base model: `{base['ref']}` revision {base.get('revision') or '-'}, weights sha256 "
             f"`{base.get('sha256')}`",
             f"- adapter: `{spec['adapter']}` (adapter_model.safetensors sha256 "
             f"`{meta['lineage'].get('adapter_sha256')}`)",
             "- every file's sha256 is in `checksums.json`; the full record is `metadata.json`", "",
             "## Load it", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
             'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")',
             'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")', "```", "",
             f"Train on it with `base_model: farm:{m['name']}:{m['version']}`; fetch it with "
             f"`farm pull {m['name']}:{m['version']} DEST`.", ""]
    return str(ModelCard("---\n" + data.to_yaml() + "\n---\n\n" + "\n".join(lines)).content)


def write_merged_docs(output_dir: Path, meta: dict) -> None:
    """metadata.json and README.md beside the merged weights."""
    output_dir = Path(output_dir)
    (output_dir / METADATA_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
    (output_dir / CARD_FILE).write_text(merged_card(meta))
