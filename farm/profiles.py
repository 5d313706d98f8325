"""Routing profiles in the catalog, and the `route` use case (CLI `farm route`, API `GET /v1/route`).

A profile is built at publish (`record_profile`, called by the worker's publish step) or, for adapter versions
that have none (published before routing existed, or imported without one), the first time the router needs it.
With FARM_ROUTER_MODEL set, each profile is embedded once per adapter version and model (stored in the catalog);
otherwise BM25 ranks the profile texts (farm.routing).
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from pathlib import Path

from pydantic import BaseModel
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from farm.catalog.models import READY, Adapter, AdapterProfile, Job
from farm.catalog.session import session_scope
from farm.errors import FarmError, NotFound, SpecError
from farm.names import adapter_ref, is_store_ref, store_key
from farm.routing import BM25_THRESHOLD, DEFAULT_BACKEND, Bm25, Profile, build_profile, tokenize
from farm.settings import FarmSettings, get_settings

log = logging.getLogger("farm.profiles")
EMBED_THRESHOLD = 0.3
MAX_QUERY_CHARS = 2000


class RouteCandidate(BaseModel):
    """One adapter version ranked for a query."""

    adapter: str
    """name:version."""
    name: str
    version: int
    base_model: str | None = None
    score: float
    """Raw score: BM25, or cosine similarity with embeddings."""
    confidence: float
    """Score on a 0-1 scale (BM25: share of the best score this query could reach); compared with the threshold."""
    matched: list[str] = []
    """Query words found in the adapter's profile (BM25)."""
    description: str | None = None


class RouteAnswer(BaseModel):
    """The router's answer: the best adapter version, or none (use the base alone), and the ranking behind it."""

    query: str
    ranker: str
    """bm25s, rank_bm25, embedding:<model> or embedding+pgvector:<model>."""
    threshold: float
    choice: str | None = None
    """name:version of the adapter to use; null when nothing reaches the threshold (the base alone)."""
    reason: str
    candidates: list[RouteCandidate] = []


# ---------------------------------------------------------------- building and storing profiles

def _spec_of(session: Session, adapter: Adapter) -> dict:
    spec = (adapter.provenance or {}).get("spec")
    if isinstance(spec, dict) and spec:
        return spec
    job = session.get(Job, adapter.job_id)
    return dict(job.spec or {}) if job is not None else {}


def _dataset_from_store(store, uri: str | None, dest: Path) -> Path | None:
    """The adapter's training data, fetched from the farm's store into `dest`; None when it is not there."""
    if not uri or not is_store_ref(uri):
        return None
    try:
        store.get_file(store_key(uri), dest)
    except FarmError as exc:
        log.info("no training data for a routing profile at %s: %s", uri, exc.message)
        return None
    return dest


def profile_from_catalog(session: Session, adapter: Adapter, store) -> Profile:
    """Build an adapter version's profile from what the catalog and the store hold (spec, training data)."""
    spec = _spec_of(session, adapter)
    with tempfile.TemporaryDirectory(prefix="farm-profile-") as tmp:
        path = _dataset_from_store(store, adapter.dataset_uri or (spec.get("dataset") or {}).get("path"),
                                   Path(tmp) / "data.jsonl")
        return build_profile(name=adapter.name, spec=spec, dataset_path=path)


def save_profile(session: Session, adapter_id: int, profile: Profile) -> AdapterProfile:
    """Insert or replace the profile of one adapter version (its embedding is recomputed when next needed)."""
    row = session.scalar(select(AdapterProfile).where(AdapterProfile.adapter_id == adapter_id))
    if row is None:
        row = AdapterProfile(adapter_id=adapter_id)
        session.add(row)
    row.description, row.tags, row.prompts, row.text = profile.description, profile.tags, profile.prompts, profile.text
    row.embedding_model = row.embedding = None
    session.flush()
    return row


def record_profile(adapter_name: str, version: int, *, dataset_path: Path | str | None = None,
                   settings: FarmSettings | None = None) -> None:
    """Build and store the routing profile of an adapter version being published (the publish step calls this
    after the upload, before the version becomes ready, so no reader sees it without one).

    `dataset_path` is the local copy of its training data when the caller has one (else it is read from the
    store). Never raises: a profile that cannot be built now is built lazily by the router.
    """
    settings = settings or get_settings()
    try:
        from farm.store import open_store

        with session_scope(settings.database_url) as session:
            adapter = session.scalar(select(Adapter).where(Adapter.name == adapter_name, Adapter.version == version))
            if adapter is None:
                return
            if dataset_path is not None and Path(dataset_path).is_file():
                profile = build_profile(name=adapter.name, spec=_spec_of(session, adapter), dataset_path=dataset_path)
            else:
                profile = profile_from_catalog(session, adapter, open_store(settings.store_url, settings))
            save_profile(session, adapter.id, profile)
    except Exception as exc:  # the adapter is published either way; the router builds the profile later
        log.warning("routing profile of %s:%s not built at publish (%s: %s); it is built when first routed",
                    adapter_name, version, type(exc).__name__, exc)


def _latest_ready(session: Session, base: str | None) -> list[Adapter]:
    """The newest ready version of every adapter name (optionally only those on base model `base`)."""
    newest = (select(Adapter.name, func.max(Adapter.version).label("v")).where(Adapter.status == READY)
              .group_by(Adapter.name).subquery())
    q = select(Adapter).join(newest, (Adapter.name == newest.c.name) & (Adapter.version == newest.c.v))
    adapters = list(session.scalars(q.order_by(Adapter.name)))
    if base:
        adapters = [a for a in adapters if a.base_model and (a.base_model == base or
                                                              a.base_model.rstrip("/").endswith("/" + base.strip("/")))]
    return adapters


def ensure_profiles(session: Session, adapters: list[Adapter], store) -> dict[int, AdapterProfile]:
    """The stored profile of each adapter version, building (and storing) the missing ones."""
    ids = [a.id for a in adapters]
    have = {p.adapter_id: p for p in session.scalars(select(AdapterProfile).where(AdapterProfile.adapter_id.in_(ids)))}
    for adapter in adapters:
        if adapter.id not in have:
            profile = profile_from_catalog(session, adapter, store)
            try:
                with session.begin_nested():
                    have[adapter.id] = save_profile(session, adapter.id, profile)
            except IntegrityError:  # another router built it at the same moment
                have[adapter.id] = session.scalar(select(AdapterProfile)
                                                  .where(AdapterProfile.adapter_id == adapter.id))
    return have


# ---------------------------------------------------------------- route

_INDEXES: dict[tuple[str, str], Bm25] = {}


def _bm25_index(texts: list[str], backend: str) -> Bm25:
    """The BM25 index of these profile texts, kept between calls of a long-lived process (the API) while the
    profiles stay the same; a few are kept (one per base filter in use)."""
    key = (backend, hashlib.sha256("\x00".join(texts).encode()).hexdigest())
    index = _INDEXES.get(key)
    if index is None:
        index = Bm25([tokenize(t) for t in texts], backend)
        if len(_INDEXES) >= 8:
            _INDEXES.pop(next(iter(_INDEXES)))
        _INDEXES[key] = index
    return index


def _check_query(query: str) -> str:
    query = " ".join((query or "").split())
    if not query:
        raise SpecError("the query is empty: give the request to route, like `farm route \"fix this SQL join\"`",
                        field="q")
    if len(query) > MAX_QUERY_CHARS:
        raise SpecError(f"the query is {len(query)} characters long; route at most {MAX_QUERY_CHARS}", field="q")
    if not tokenize(query):
        raise SpecError(f"the query {query[:60]!r} has no word to match (only stopwords or symbols): say what it is "
                        "about", field="q")
    return query


def route(query: str, *, base: str | None = None, top: int = 3, threshold: float | None = None,
          backend: str = DEFAULT_BACKEND, embedder=None, settings: FarmSettings | None = None) -> RouteAnswer:
    """Rank the newest version of every adapter (on base model `base` when given) for `query`.

    BM25 over the routing profiles by default; embeddings (cosine) with FARM_ROUTER_MODEL or an `embedder`
    (an object with `name` and `encode(texts) -> list of vectors`). Below `threshold` (FARM_ROUTER_THRESHOLD, else
    the ranker's default) nothing fits and `choice` is null: answer with the base alone. An empty query is a
    SpecError (field `q`).
    """
    from farm.store import open_store

    settings = settings or get_settings()
    query = _check_query(query)
    if top < 1:
        raise SpecError(f"top must be 1 or more, got {top}", field="top")
    if embedder is None and settings.router_model:
        from farm.embeddings import load_embedder

        embedder = load_embedder(settings.router_model)
    store = open_store(settings.store_url, settings)
    with session_scope(settings.database_url) as session:
        adapters = _latest_ready(session, base)
        if not adapters:
            where = f" on base model {base!r}" if base else ""
            raise NotFound(f"no published adapter{where} to route to: list them with `farm adapters`")
        profiles = ensure_profiles(session, adapters, store)
        if embedder is not None:
            from farm.embeddings import rank_by_embedding

            ranked, ranker = rank_by_embedding(session, embedder, query, [profiles[a.id] for a in adapters])
            default_threshold = EMBED_THRESHOLD
        else:
            ranked = _bm25_index([profiles[a.id].text for a in adapters], backend).score(query)
            ranker, default_threshold = backend, BM25_THRESHOLD
        cut = default_threshold if threshold is None and settings.router_threshold is None else (
            threshold if threshold is not None else settings.router_threshold)
        candidates = [RouteCandidate(adapter=adapter_ref(a.name, a.version), name=a.name, version=a.version,
                                     base_model=a.base_model, score=round(s.score, 6),
                                     confidence=round(s.confidence, 4), matched=list(s.matched),
                                     description=profiles[a.id].description)
                      for s in [s for s in ranked if s.score > 0][:top] for a in [adapters[s.index]]]
    best = candidates[0] if candidates else None
    if best is None or best.confidence < cut or best.score <= 0:
        got = f"the best, {best.adapter}, reached {best.confidence:.3f}" if best else "nothing matched"
        return RouteAnswer(query=query, ranker=ranker, threshold=cut, choice=None, candidates=candidates,
                           reason=f"no adapter fits: {got}, below the threshold {cut:g}; use the base model alone")
    why = f"matched {', '.join(best.matched[:6])}" if best.matched else "closest profile"
    return RouteAnswer(query=query, ranker=ranker, threshold=cut, choice=best.adapter, candidates=candidates,
                       reason=f"{best.adapter}: {why} (confidence {best.confidence:.3f} >= {cut:g}, {ranker})")
