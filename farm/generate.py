"""Try an adapter: pull it (verified, cached under the farm home), load base + adapter with stock PEFT, generate.

torch, transformers and peft (the worker extra) are imported inside the functions that need them, never at module
import: `farm --help` and the API stay light. Without them, `generate` says what to install.

Chat adapters (trained on `format: chat` data) get the tokenizer's chat template around the prompt; the others
get the prompt as it is. Decoding is greedy, so the same prompt gives the same completion. The base is loaded in
float (bfloat16 on a GPU, float32 on the CPU) whatever quantization trained the adapter: a QLoRA adapter applies to
the unquantized weights as well.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from pydantic import BaseModel

from farm.errors import FarmError
from farm.names import adapter_ref, parse_adapter_ref
from farm.settings import FarmSettings, get_settings
from farm.store.base import sha256_file

WORKER_MODULES = ("torch", "transformers", "peft")


class Generation(BaseModel):
    """What `farm generate` prints."""

    adapter: str
    """name:version used."""
    base_model: str
    prompt: str
    chat_template: bool
    """Whether the prompt went through the tokenizer's chat template."""
    completion: str
    base_completion: str | None = None
    """The base model's completion of the same prompt (--compare)."""
    route: dict | None = None
    """The router's answer when the adapter was chosen by routing (--route)."""


def require_worker_extra() -> None:
    """FarmError naming what to install when torch, transformers or peft is missing."""
    missing = [m for m in WORKER_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise FarmError(f"`farm generate` runs the model here and needs {', '.join(missing)}: install torch first "
                        "(a CPU or CUDA build), then `pip install 'lora-farm[worker]'`")


def _cache_is_valid(folder: Path, files) -> bool:
    if not folder.is_dir():
        return False
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    if present != {f.path for f in files}:
        return False
    return all(sha256_file(folder / f.path) == f.sha256 for f in files)


def cached_adapter(ref: str, settings: FarmSettings | None = None) -> tuple[object, Path]:
    """(catalog view, local folder) of adapter `ref`, pulled into <FARM_HOME>/adapters/<name>/v<N>/ once and
    re-verified against the catalog's sha256 on every use (a changed or partial cache is pulled again)."""
    from farm.client import get_client

    settings = settings or get_settings()
    client = get_client(settings)  # the farm's API when FARM_API_URL is set (checksums verified the same way)
    try:
        view = client.get_adapter(ref)
        folder = Path(settings.home) / "adapters" / view.name / f"v{view.version}"
        if not _cache_is_valid(folder, view.files):
            if folder.exists():
                shutil.rmtree(folder)
            folder.parent.mkdir(parents=True, exist_ok=True)
            client.pull(adapter_ref(view.name, view.version), folder)
    finally:
        getattr(client, "close", lambda: None)()
    return view, folder


def _is_chat(view) -> bool:
    spec = (view.provenance or {}).get("spec") or {}
    return ((spec.get("dataset") or {}).get("format")) == "chat"


def _quiet() -> None:
    import logging
    import warnings

    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", module="peft")
    logging.getLogger("peft").setLevel(logging.ERROR)


def generate(ref: str, prompt: str, *, compare: bool = False, max_new_tokens: int = 64, base: str | None = None,
             settings: FarmSettings | None = None) -> Generation:
    """Generate a completion of `prompt` with adapter `ref` (NAME or NAME:VERSION) on its base model.

    `base` overrides the base model recorded in the catalog (a local folder, Hub id or s3:// URI): useful for an
    adapter imported from a farm whose base lives at another path. `compare` also generates with the adapter
    disabled. Raises NotFound (unknown adapter), ModelError (base not reachable), FarmError (no worker extra).
    """
    settings = settings or get_settings()
    if not prompt or not prompt.strip():
        from farm.errors import SpecError

        raise SpecError("the prompt is empty: give the text to complete, like `farm generate sql-helper \"...\"`",
                        field="prompt")
    if max_new_tokens < 1 or max_new_tokens > 4096:
        from farm.errors import SpecError

        raise SpecError(f"--max-new-tokens must be between 1 and 4096, got {max_new_tokens}", field="max_new_tokens")
    parse_adapter_ref(ref)
    require_worker_extra()
    view, folder = cached_adapter(ref, settings)
    base_ref = base or view.base_model
    if not base_ref:
        raise FarmError(f"adapter {view.name}:{view.version} records no base model: give one with --base")
    from farm.model_fetch import fetch_base_model

    base_dir = fetch_base_model(base_ref, settings).path

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype).to(device)
    model = PeftModel.from_pretrained(model, folder).to(device)
    model.eval()
    chat = _is_chat(view) and bool(getattr(tok, "chat_template", None))
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                   add_generation_prompt=True) if chat else prompt
    ids = tok(text, return_tensors="pt", add_special_tokens=not chat).to(device)
    n = ids["input_ids"].shape[1]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    with torch.no_grad():
        out = model.generate(**ids, **kwargs)
        base_out = None
        if compare:
            with model.disable_adapter():
                base_out = model.generate(**ids, **kwargs)
    decode = lambda t: tok.decode(t[0][n:], skip_special_tokens=True)  # noqa: E731
    return Generation(adapter=adapter_ref(view.name, view.version), base_model=base_ref, prompt=prompt,
                      chat_template=chat, completion=decode(out),
                      base_completion=decode(base_out) if base_out is not None else None)


def generate_routed(prompt: str, *, compare: bool = False, max_new_tokens: int = 64, base: str | None = None,
                    settings: FarmSettings | None = None) -> Generation:
    """Route `prompt` first (farm.profiles.route), then generate with the chosen adapter; the route is in the
    answer. When no adapter fits, FarmError says so and shows the best candidate."""
    from farm.profiles import route

    settings = settings or get_settings()
    if settings.api_url:  # route on the farm the adapters live on
        from farm.client_http import HttpClient
        from farm.profiles import RouteAnswer

        with HttpClient(settings) as client:
            answer = RouteAnswer.model_validate(client._call("GET", "/v1/route", params={"q": prompt, "top": 3}))
    else:
        answer = route(prompt, top=3, settings=settings)
    if answer.choice is None:
        raise FarmError(f"routing chose no adapter: {answer.reason}. Name one: `farm generate NAME \"PROMPT\"`")
    result = generate(answer.choice, prompt, compare=compare, max_new_tokens=max_new_tokens, base=base,
                      settings=settings)
    result.route = answer.model_dump()
    return result
