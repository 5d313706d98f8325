"""Embedding ranker for the router: FARM_ROUTER_MODEL names a sentence-transformers model folder.

Each profile is embedded once per adapter version and model, and the vector is stored in the catalog
(adapter_profiles.embedding, JSON). On PostgreSQL with the `vector` extension installed, the cosine search runs in
the database (the JSON text of a vector is pgvector's input format, so no extra column is needed); elsewhere it
runs in process.

Tested (tests/test_routing.py): a real sentence-transformers model built from the tiny Llama (mean pooling) through
FARM_ROUTER_MODEL, storage once per version, recomputation when the model changes, in-process cosine ranking.
NOT tested: the pgvector query (the build machine's PostgreSQL has no `vector` extension); it falls back to the
in-process ranking on any database error.
"""

from __future__ import annotations

import logging
import math
from functools import lru_cache

from sqlalchemy import text
from sqlalchemy.orm import Session

from farm.catalog.models import AdapterProfile
from farm.errors import FarmError, ModelError
from farm.routing import Scored, cosine_rank

log = logging.getLogger("farm.embeddings")


class SentenceTransformerEmbedder:
    """A sentence-transformers model; vectors are L2-normalised."""

    def __init__(self, path: str):
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise FarmError("FARM_ROUTER_MODEL is set but sentence-transformers is not installed: "
                            "pip install sentence-transformers (or unset FARM_ROUTER_MODEL to route with BM25)",
                            field="router_model") from None
        try:
            self._model = SentenceTransformer(path, device="cpu")
        except Exception as exc:
            raise ModelError(f"FARM_ROUTER_MODEL={path}: cannot load it as a sentence-transformers model "
                             f"({type(exc).__name__}: {exc})", field="router_model") from None
        self.name = path

    def encode(self, texts: list[str]) -> list[list[float]]:
        vectors = self._model.encode(texts, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
        return [[float(x) for x in v] for v in vectors]


@lru_cache(maxsize=2)
def load_embedder(path: str) -> SentenceTransformerEmbedder:
    """The embedder for FARM_ROUTER_MODEL, loaded once per process."""
    return SentenceTransformerEmbedder(path)


def _unit(v: list[float]) -> list[float]:
    n = math.sqrt(sum(x * x for x in v)) or 1.0
    return [x / n for x in v]


def ensure_embeddings(embedder, profiles: list[AdapterProfile]) -> None:
    """Embed the profiles that have no vector from this model yet (once per adapter version and model)."""
    todo = [p for p in profiles if p.embedding is None or p.embedding_model != embedder.name]
    if todo:
        for p, v in zip(todo, embedder.encode([p.text for p in todo])):
            p.embedding, p.embedding_model = _unit(list(v)), embedder.name


def has_pgvector(session: Session) -> bool:
    """Whether the catalog is PostgreSQL with the `vector` extension installed."""
    if session.get_bind().dialect.name != "postgresql":
        return False
    return bool(session.execute(text("SELECT 1 FROM pg_extension WHERE extname = 'vector'")).first())


def _rank_in_postgres(session: Session, query_vec: list[float], profiles: list[AdapterProfile]) -> list[Scored]:
    index = {p.adapter_id: i for i, p in enumerate(profiles)}
    rows = session.execute(
        text("SELECT adapter_id, 1 - (CAST(CAST(embedding AS text) AS vector) <=> CAST(:q AS vector)) AS cos "
             "FROM adapter_profiles WHERE adapter_id = ANY(:ids) ORDER BY cos DESC"),
        {"q": "[" + ",".join(repr(x) for x in query_vec) + "]", "ids": list(index)}).all()
    return [Scored(index=index[r.adapter_id], score=float(r.cos), confidence=max(0.0, min(float(r.cos), 0.999)),
                   matched=()) for r in rows]


def rank_by_embedding(session: Session, embedder, query: str,
                      profiles: list[AdapterProfile]) -> tuple[list[Scored], str]:
    """Profiles ranked by cosine similarity to the query's embedding; and the ranker's name."""
    ensure_embeddings(embedder, profiles)
    session.flush()
    query_vec = _unit(list(embedder.encode([query])[0]))
    if has_pgvector(session):
        try:
            with session.begin_nested():
                return _rank_in_postgres(session, query_vec, profiles), f"embedding+pgvector:{embedder.name}"
        except Exception as exc:  # untested path (see the module docstring): fall back to the in-process search
            log.warning("pgvector search failed (%s: %s); ranking in process", type(exc).__name__, exc)
    return cosine_rank(query_vec, [p.embedding for p in profiles]), f"embedding:{embedder.name}"
