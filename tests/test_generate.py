"""`farm generate` (issue 15): a real tiny Llama base + a real PEFT LoRA adapter published in the catalog and store,
pulled (verified, cached), loaded with stock PEFT, greedy-decoded; --compare, --route, and the bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from farm.errors import FarmError, NotFound, SpecError
from farm.generate import generate, generate_routed
from farm.tiny import write_dataset
from tests.adapters_use_helpers import cli, farm_settings, publish

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def lora_files(tiny_model_dir, tmp_path_factory) -> dict[str, bytes]:
    """A LoRA adapter of the tiny model with non-zero B matrices (so it changes the output), as saved by PEFT."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
    out = tmp_path_factory.mktemp("lora")
    model.save_pretrained(out)
    return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}


@pytest.fixture
def gen_farm(tmp_path, tiny_model_dir, lora_files):
    settings = farm_settings(tmp_path)
    data = write_dataset(tmp_path / "chat.jsonl", "chat", n=16)
    publish(settings, "animal-colors", lora_files, base_model=str(tiny_model_dir), dataset=data,
            spec={"description": "Says what color each animal is", "tags": ["animals", "colors"],
                  "dataset": {"format": "chat"}})
    return settings


def test_generate_uses_the_chat_template_and_compare_differs_from_the_base(gen_farm):
    result = generate("animal-colors", "What color is the cat?", compare=True, max_new_tokens=8, settings=gen_farm)
    assert result.adapter == "animal-colors:1" and result.chat_template is True
    assert isinstance(result.completion, str) and result.base_completion is not None
    assert result.completion != result.base_completion  # the adapter's non-zero LoRA weights change the output
    again = generate("animal-colors:1", "What color is the cat?", max_new_tokens=8, settings=gen_farm)
    assert again.completion == result.completion and again.base_completion is None  # greedy: deterministic


def test_the_adapter_is_cached_verified_and_pulled_again_when_the_cache_is_damaged(gen_farm, monkeypatch):
    from farm import service

    generate("animal-colors", "hello", max_new_tokens=2, settings=gen_farm)
    cached = Path(gen_farm.home) / "adapters" / "animal-colors" / "v1"
    assert (cached / "adapter_model.safetensors").is_file() and (cached / "checksums.json").is_file()
    pulls = []
    real_pull = service.pull_adapter
    monkeypatch.setattr(service, "pull_adapter", lambda *a, **k: pulls.append(a) or real_pull(*a, **k))
    generate("animal-colors", "hello", max_new_tokens=2, settings=gen_farm)
    assert pulls == []  # served from the cache
    weights = cached / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    generate("animal-colors", "hello", max_new_tokens=2, settings=gen_farm)
    assert len(pulls) == 1  # a changed cache is not trusted


def test_generate_route_says_which_adapter_and_why(gen_farm):
    result = generate_routed("What color are animals like the dog?", max_new_tokens=4, settings=gen_farm)
    assert result.adapter == "animal-colors:1"
    assert result.route["choice"] == "animal-colors:1" and "color" in result.route["reason"]
    with pytest.raises(FarmError, match="routing chose no adapter"):
        generate_routed("Summarize the plot of Hamlet", settings=gen_farm)


def test_bad_input_is_a_clear_error(gen_farm, monkeypatch):
    with pytest.raises(NotFound):
        generate("no-such-adapter", "hi", settings=gen_farm)
    with pytest.raises(SpecError, match="prompt is empty"):
        generate("animal-colors", "  ", settings=gen_farm)
    with pytest.raises(SpecError, match="max-new-tokens"):
        generate("animal-colors", "hi", max_new_tokens=0, settings=gen_farm)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    with pytest.raises(FarmError, match=r"needs peft: .*pip install 'lora-farm\[worker\]'"):
        generate("animal-colors", "hi", settings=gen_farm)


def test_the_cli_prints_both_completions(gen_farm):
    out = cli(gen_farm, "generate", "--route", "What color is the fox?", "--compare", "--max-new-tokens", "4", "--json")
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert data["adapter"] == "animal-colors:1" and data["base_completion"] is not None
    assert data["route"]["choice"] == "animal-colors:1"
    text = cli(gen_farm, "generate", "animal-colors", "What color is the fox?", "--compare", "--max-new-tokens", "4")
    assert text.exit_code == 0 and "base model alone" in text.stdout and "(chat template)" in text.stdout


def test_with_farm_api_url_generate_pulls_and_routes_through_the_api(tmp_path, tiny_model_dir, lora_files):
    """A client whose own farm is empty, FARM_API_URL pointing at a farm's API: the adapter is routed to and pulled
    through the API (verified into the client's cache), then run here."""
    from tests.fixtures.api import TOKENS
    from tests.test_client_http import start_api_server, stop_api_server

    server = start_api_server(tmp_path / "server")
    try:
        data = write_dataset(tmp_path / "chat.jsonl", "chat", n=16)
        publish(server.settings, "animal-colors", lora_files, base_model=str(tiny_model_dir), dataset=data,
                spec={"description": "Says what color each animal is", "tags": ["animals", "colors"],
                      "dataset": {"format": "chat"}})
        client = farm_settings(tmp_path / "client")
        env = {"FARM_API_URL": server.url, "FARM_API_TOKEN": TOKENS["alice"]}
        out = cli(client, "generate", "--route", "What color is the fox?", "--max-new-tokens", "4", "--json", env=env)
        assert out.exit_code == 0, out.output
        assert json.loads(out.stdout)["route"]["choice"] == "animal-colors:1"
        cached = Path(client.home) / "adapters" / "animal-colors" / "v1" / "adapter_model.safetensors"
        assert cached.read_bytes() == lora_files["adapter_model.safetensors"]
        local = generate("animal-colors", "What color is the fox?", max_new_tokens=4, settings=server.settings)
        assert json.loads(out.stdout)["completion"] == local.completion
        with pytest.raises(NotFound):  # the client's own (empty) catalog is not asked
            cli(client, "generate", "no-such-adapter", "hi", env=env)
    finally:
        stop_api_server(server.proc)
