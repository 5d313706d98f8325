"""Routing (issue 15): profiles built at publish or lazily, BM25 ranking with a "none fits" threshold, the
embedding path, the CLI and GET /v1/route. Real catalog (SQLite and PostgreSQL) and file:// store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from farm.catalog.models import AdapterProfile
from farm.catalog.session import session_scope
from farm.errors import NotFound, SpecError
from farm.profiles import record_profile, route
from farm.routing import build_profile, sample_prompts, tokenize
from tests.adapters_use_helpers import cli, farm_settings, publish, small_files
from tests.routing_set import ADAPTERS, OFF_TOPIC, QUERIES, write_datasets

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def routed_farm(tmp_path_factory):
    """A farm with the 8 adapters of the routing set published (no profiles yet: built on first route)."""
    root = tmp_path_factory.mktemp("routed")
    settings = farm_settings(root)
    paths = write_datasets(root / "data")
    for name, item in ADAPTERS.items():
        publish(settings, name, small_files(name), spec={"description": item["description"], "tags": item["tags"]},
                dataset=paths[name])
    return settings


def test_the_routing_set_is_routed_with_top1_accuracy_of_at_least_0_9(routed_farm):
    assert len(ADAPTERS) >= 6 and len(QUERIES) >= 60
    training = {p for item in ADAPTERS.values() for p in item["prompts"]}
    assert not training & {q for q, _ in QUERIES}, "queries must not come from the training data"
    right = sum(route(q, settings=routed_farm).choice == f"{want}:1" for q, want in QUERIES)
    assert right / len(QUERIES) >= 0.9


def test_an_answer_carries_scores_matched_words_and_the_reason(routed_farm):
    answer = route("my postgres join is slow", top=3, settings=routed_farm)
    assert answer.choice == "sql-helper:1" and answer.ranker == "bm25s"
    best = answer.candidates[0]
    assert best.adapter == "sql-helper:1" and best.score > 0 and answer.threshold == 0.05
    assert set(best.matched) >= {"postgres", "join"} and 0 < best.confidence < 1
    assert "sql-helper:1" in answer.reason and "postgres" in answer.reason
    assert [c.score for c in answer.candidates] == sorted((c.score for c in answer.candidates), reverse=True)


def test_off_topic_queries_get_none_fits(routed_farm):
    answers = [route(q, settings=routed_farm) for q in OFF_TOPIC]
    assert sum(a.choice is None for a in answers) >= len(OFF_TOPIC) * 0.75
    none = next(a for a in answers if a.choice is None)
    assert "no adapter fits" in none.reason and "base model alone" in none.reason


def test_a_threshold_of_zero_always_chooses_and_one_never(routed_farm):
    q = "Write SQL to count the orders"
    assert route(q, threshold=0.0, settings=routed_farm).choice == "sql-helper:1"
    assert route(q, threshold=1.0, settings=routed_farm).choice is None


def test_profiles_were_built_lazily_from_the_spec_and_the_stored_training_data(routed_farm):
    route("anything about git", settings=routed_farm)
    with session_scope(routed_farm.database_url) as session:
        rows = list(session.scalars(select(AdapterProfile)))
        assert len(rows) == len(ADAPTERS)
        git = next(r for r in rows if r.description and "Git" in r.description)
        assert git.tags == ADAPTERS["git-helper"]["tags"]
        assert "Recover a deleted branch with reflog." in git.prompts
        assert "git helper" in git.text


@pytest.mark.parametrize("query", ["", "   ", "the and of it"])
def test_an_empty_query_is_refused_naming_the_field(routed_farm, query):
    with pytest.raises(SpecError) as info:
        route(query, settings=routed_farm)
    assert info.value.field == "q"


def test_routing_an_empty_farm_says_there_is_nothing(tmp_path):
    with pytest.raises(NotFound, match="no published adapter"):
        route("fix my sql", settings=farm_settings(tmp_path))


def test_only_the_newest_version_of_a_name_is_ranked_and_base_filters(tmp_path):
    settings = farm_settings(tmp_path)
    data = write_datasets(tmp_path / "data")
    item = ADAPTERS["sql-helper"]
    publish(settings, "sql-helper", small_files("a"), spec={"description": item["description"]},
            dataset=data["sql-helper"], base_model="/models/base-a")
    publish(settings, "sql-helper", small_files("b"), spec={"description": item["description"]},
            dataset=data["sql-helper"], base_model="/models/base-a")
    publish(settings, "recipe-chef", small_files("c"), spec={"description": ADAPTERS["recipe-chef"]["description"]},
            dataset=data["recipe-chef"], base_model="/models/base-b")
    answer = route("select rows with a join", settings=settings)
    assert answer.choice == "sql-helper:2"
    assert [c.adapter for c in answer.candidates].count("sql-helper:1") == 0
    assert route("select rows with a join", base="/models/base-b", settings=settings).choice is None
    with pytest.raises(NotFound, match="base-c"):
        route("select rows", base="/models/base-c", settings=settings)


def test_record_profile_at_publish_uses_the_local_data_and_never_raises(tmp_path):
    settings = farm_settings(tmp_path)
    version = publish(settings, "poems", small_files("p"), spec={"description": "Writes haiku", "tags": ["poetry"]})
    data = tmp_path / "local.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"a haiku about {w}", "completion": "..."}) + "\n"
                            for w in ("rain", "snow", "wind")))
    record_profile("poems", version, dataset_path=data, settings=settings)
    record_profile("no-such-adapter", 1, settings=settings)  # nothing to do, and no exception
    with session_scope(settings.database_url) as session:
        row = session.scalar(select(AdapterProfile))
        assert row.description == "Writes haiku" and row.tags == ["poetry"]
    # the spec recorded no dataset format: chat is assumed, so completion rows give no prompt
    assert row.prompts == []


def test_prompt_samples_are_spread_and_deterministic():
    lines = [json.dumps({"instruction": f"task {i}", "input": "x"}) for i in range(100)] + ["not json"]
    sample = sample_prompts(lines, "alpaca", k=10)
    assert sample == sample_prompts(lines, "alpaca", k=10) and len(sample) == 10
    assert sample[0] == "task 0 x" and sample[-1] == "task 90 x"
    profile = build_profile(name="x", spec={"description": "d", "tags": ["t"]}, prompts=["p"])
    assert profile.text.count("d") >= 2 and tokenize("Queries, querying") == ["query", "query"]


class CountingEmbedder:
    """A deterministic bag-of-words embedder (hashed tokens), counting what it encodes."""

    def __init__(self, name: str = "test-embedder"):
        self.name, self.encoded = name, 0

    def encode(self, texts):
        import hashlib

        self.encoded += len(texts)
        out = []
        for text in texts:
            v = [0.0] * 64
            for t in tokenize(text):
                v[int(hashlib.md5(t.encode()).hexdigest(), 16) % 64] += 1.0
            out.append(v)
        return out


def test_embeddings_are_stored_once_per_version_and_rank_by_cosine(routed_farm):
    embedder = CountingEmbedder()
    answer = route("How do I rebase my branch in git?", embedder=embedder, settings=routed_farm)
    assert answer.choice == "git-helper:1" and answer.ranker == "embedding:test-embedder"
    assert embedder.encoded == len(ADAPTERS) + 1  # every profile once, and the query
    route("A haiku about rain", embedder=embedder, settings=routed_farm)
    assert embedder.encoded == len(ADAPTERS) + 2  # stored: only the query is embedded again
    with session_scope(routed_farm.database_url) as session:
        rows = list(session.scalars(select(AdapterProfile)))
        assert all(r.embedding_model == "test-embedder" and len(r.embedding) == 64 for r in rows)
    other = CountingEmbedder("another-model")
    route("A haiku about rain", embedder=other, settings=routed_farm)
    assert other.encoded == len(ADAPTERS) + 1  # a different model embeds again


def test_a_sentence_transformers_model_routes_through_farm_router_model(routed_farm, tiny_model_dir, tmp_path):
    """A real sentence-transformers model (the tiny Llama, mean pooling) named by FARM_ROUTER_MODEL: every profile is
    embedded once with it and stored; a query equal to a profile's text has cosine 1 with that profile."""
    pytest.importorskip("sentence_transformers")
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Pooling, Transformer

    word = Transformer(str(tiny_model_dir), max_seq_length=64)
    folder = tmp_path / "st-model"
    SentenceTransformer(modules=[word, Pooling(word.get_word_embedding_dimension(), pooling_mode="mean")],
                        device="cpu").save(str(folder))
    settings = routed_farm.model_copy(update={"router_model": str(folder), "router_threshold": 0.5})
    route("git", settings=routed_farm)  # the profiles exist (built lazily by a first route)
    with session_scope(routed_farm.database_url) as session:
        git = session.scalar(select(AdapterProfile).where(AdapterProfile.description.like("Git%"))).text
    answer = route(git, settings=settings)
    assert answer.ranker == f"embedding:{folder}" and answer.choice == "git-helper:1"
    assert answer.candidates[0].score == pytest.approx(1.0, abs=1e-4)
    with session_scope(routed_farm.database_url) as session:
        rows = list(session.scalars(select(AdapterProfile)))
        assert {r.embedding_model for r in rows} == {str(folder)}
        stored = {r.adapter_id: r.embedding for r in rows}
    route("How do I rebase a branch?", settings=settings)
    with session_scope(routed_farm.database_url) as session:
        assert {r.adapter_id: r.embedding for r in session.scalars(select(AdapterProfile))} == stored


def test_router_model_without_sentence_transformers_says_what_to_install(routed_farm, monkeypatch):
    from farm.embeddings import load_embedder
    from farm.errors import FarmError

    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # import fails as if it were not installed
    load_embedder.cache_clear()
    with pytest.raises(FarmError, match="pip install sentence-transformers"):
        route("sql", settings=routed_farm.model_copy(update={"router_model": "/models/minilm"}))


def test_route_on_both_catalogs(catalog_url, tmp_path):
    settings = farm_settings(tmp_path, database_url=catalog_url)
    data = write_datasets(tmp_path / "data")
    for name in ("sql-helper", "git-helper", "recipe-chef"):
        publish(settings, name, small_files(name), spec={"description": ADAPTERS[name]["description"]},
                dataset=data[name])
    assert route("squash two commits", settings=settings).choice == "git-helper:1"
    assert route("squash two commits", embedder=CountingEmbedder(), settings=settings).choice == "git-helper:1"


def test_the_api_routes_and_refuses_an_empty_query(routed_farm):
    from api.app import create_app
    from pydantic import SecretStr

    app = create_app(routed_farm.model_copy(update={"api_tokens": {"t": SecretStr("tok-route-1234")}}))
    with TestClient(app) as http:
        auth = {"Authorization": "Bearer tok-route-1234"}
        r = http.get("/v1/route", params={"q": "plan a trip to Rome", "top": 2}, headers=auth)
        assert r.status_code == 200, r.text
        assert r.json()["choice"] == "travel-planner:1" and len(r.json()["candidates"]) <= 2
        bad = http.get("/v1/route", params={"q": "  "}, headers=auth)
        assert bad.status_code == 422 and bad.json()["field"] == "q"
        assert http.get("/v1/route", params={"q": "rome"}).status_code == 401


def _cli(settings, *args):
    env = {**os.environ, "FARM_DATABASE_URL": settings.database_url, "FARM_STORE_URL": settings.store_url,
           "FARM_HOME": str(settings.home), "PYTHONPATH": str(REPO_ROOT)}
    env.pop("FARM_API_URL", None)
    return subprocess.run([sys.executable, "-m", "farm.cli.main", *args], capture_output=True, text=True, env=env,
                          cwd=REPO_ROOT, timeout=120)


def test_the_cli_prints_the_ranking_json_and_exits_2_on_an_empty_query(routed_farm):
    out = cli(routed_farm, "route", "Write a haiku about the sea", "--top", "2", "--json")
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert data["choice"] == "poetry-writer:1" and len(data["candidates"]) <= 2
    text = cli(routed_farm, "route", "What is the capital of Australia?")
    assert text.exit_code == 0 and "none fits" in text.stdout
    empty = _cli(routed_farm, "route", " ")  # a real process: main() turns the error into exit 2
    assert empty.returncode == 2 and "query is empty" in empty.stderr and "Traceback" not in empty.stderr
