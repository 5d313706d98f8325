"""Routing: which adapter fits a request. Pure functions: profiles from a spec and its data, and the ranker.

A routing profile is what the router knows of an adapter version: its name, the spec's `description` and `tags`,
and a sample of the prompts it was trained on. The default ranker is BM25 over the profile texts (`bm25s`; chosen
over `rank-bm25` by tests/benchmarks/bench_routing.py: the same top-1 accuracy on the routing set, more off-topic
queries below the threshold, and queries 3-4x faster at 800 profiles, 23x at 8000; its index, slower to build, is
kept between calls by farm.profiles).
Scores are also given as a *confidence*: the BM25 score divided by the most that query could score (every query
term at full weight), so 0 means no word in common and the threshold means the same thing whatever the corpus.
Below the threshold the answer is "none fits": use the base alone.

The catalog side (profiles stored per adapter version, embeddings, the service function) is in farm.profiles.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

PROMPT_SAMPLE = 24  # prompts kept per profile
PROMPT_CHARS = 400  # of each prompt
BM25_THRESHOLD = 0.05  # confidence below which nothing fits (measured: tests/benchmarks/bench_routing.py)
BM25_BACKENDS = ("bm25s", "rank_bm25")
DEFAULT_BACKEND = "bm25s"

# Words that say nothing about a topic (English function words and chat filler).
STOPWORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below between both
but by can could did do does doing down during each few for from further had has have having he her here hers
herself him himself his how i if in into is it its itself just me more most my myself no nor not now of off on
once only or other our ours ourselves out over own same she should so some such than that the their theirs them
themselves then there these they this those through to too under until up very was we were what when where which
while who whom why will with would you your yours yourself yourselves please tell give show explain write make
let us get want need help one two use using way thing things also like
""".split())

_WORD = re.compile(r"[a-z0-9]+(?:[+#][a-z0-9+#]*)?")


def _stem(word: str) -> str:
    """A light suffix strip, so that 'queries', 'query' and 'querying' meet (no stemmer dependency)."""
    if len(word) <= 3 or word.isdigit():
        return word
    for suffix, repl in (("ies", "y"), ("ing", ""), ("ed", ""), ("es", ""), ("s", "")):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            if suffix == "s" and word.endswith("ss"):
                break
            word = word[: -len(suffix)] + repl
            break
    return word[:-1] if word.endswith("e") and len(word) >= 4 else word  # bake/baking, rate/rated


def words(text: str) -> list[tuple[str, str]]:
    """(word, token) for each word of `text` that is not a stopword: the word lowercased, the token stemmed."""
    return [(w, _stem(w)) for w in _WORD.findall(text.lower().replace("_", " ")) if w not in STOPWORDS]


def tokenize(text: str) -> list[str]:
    """Lowercased, stopwords out, lightly stemmed words; names like `sql-helper` split on '-' and '_'."""
    return [token for _, token in words(text)]


# ---------------------------------------------------------------- profiles

def prompt_of(row: dict, fmt: str) -> str | None:
    """The request part of one training example (what a user would have asked), or None."""
    if fmt == "chat":
        turns = [m.get("content") for m in row.get("messages") or [] if isinstance(m, dict) and m.get("role") == "user"]
        text = " ".join(t for t in turns if isinstance(t, str))
    elif fmt == "alpaca":
        text = " ".join(str(row.get(k) or "") for k in ("instruction", "input")).strip()
    elif fmt == "completion":
        text = row.get("prompt") if isinstance(row.get("prompt"), str) else ""
    else:
        text = row.get("text") if isinstance(row.get("text"), str) else ""
    text = " ".join((text or "").split())[:PROMPT_CHARS]
    return text or None


def sample_prompts(lines: Iterable[str], fmt: str, k: int = PROMPT_SAMPLE) -> list[str]:
    """Up to `k` distinct prompts spread evenly over the dataset's lines (deterministic: the same data, the same
    sample). Only the lines picked are parsed, so a large dataset costs one read; lines that do not parse are
    skipped (the dataset was validated at submit)."""
    lines = [line for line in lines if line.strip()]
    if not lines:
        return []
    # Evenly spaced picks first, then the lines in between until k distinct prompts are found.
    step = max(len(lines) / (k * 2), 1.0)
    picks = list(dict.fromkeys(int(i * step) for i in range(min(len(lines), k * 2))))
    chosen = set(picks)
    order = itertools.chain(picks, (i for i in range(len(lines)) if i not in chosen))
    found: dict[int, str] = {}
    seen = set()
    for i in order:
        if len(found) >= k * 2:
            break
        try:
            row = json.loads(lines[i])
        except ValueError:
            continue
        text = prompt_of(row, fmt) if isinstance(row, dict) else None
        if text and text not in seen:
            seen.add(text)
            found[i] = text
    prompts = [found[i] for i in sorted(found)]
    if len(prompts) <= k:
        return prompts
    spread = len(prompts) / k
    return [prompts[int(i * spread)] for i in range(k)]


def profile_text(name: str, description: str | None, tags: list[str], prompts: list[str]) -> str:
    """The document the ranker sees. Name, description and tags are repeated: they say what the adapter is for,
    the prompts only show it."""
    head = " ".join([name.replace("-", " ").replace("_", " "), description or "", " ".join(tags)])
    return "\n".join([head, head, *prompts])


@dataclass
class Profile:
    """A routing profile before it is stored."""

    name: str
    description: str | None = None
    tags: list[str] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return profile_text(self.name, self.description, self.tags, self.prompts)


def build_profile(*, name: str, spec: dict | None, dataset_path: Path | str | None = None,
                  prompts: list[str] | None = None) -> Profile:
    """The routing profile of one adapter version: description and tags from its spec, its name, and a sample of
    the prompts of its training data (read from `dataset_path`, a local JSONL file; or given as `prompts`)."""
    spec = spec or {}
    fmt = ((spec.get("dataset") or {}).get("format")) or "chat"
    if prompts is None:
        prompts = []
        if dataset_path is not None and Path(dataset_path).is_file():
            with open(dataset_path, encoding="utf-8", errors="replace") as fh:
                prompts = sample_prompts(fh, fmt)
    tags = [str(t) for t in spec.get("tags") or [] if str(t).strip()]
    return Profile(name=name, description=spec.get("description"), tags=tags, prompts=list(prompts))


# ---------------------------------------------------------------- ranking

@dataclass(frozen=True)
class Scored:
    """One document's score for a query: raw BM25, confidence in [0, 1), and the query words it matched."""

    index: int
    score: float
    confidence: float
    matched: tuple[str, ...]


class Bm25:
    """BM25 over tokenized documents through `bm25s` (default) or `rank_bm25`, with a confidence per score."""

    K1, B = 1.5, 0.75

    def __init__(self, docs: list[list[str]], backend: str = DEFAULT_BACKEND):
        if backend not in BM25_BACKENDS:
            raise ValueError(f"backend {backend!r}: use one of {', '.join(BM25_BACKENDS)}")
        self.backend, self.docs = backend, docs
        self.sets = [set(d) for d in docs]
        n = len(docs)
        df: dict[str, int] = {}
        for s in self.sets:
            for t in s:
                df[t] = df.get(t, 0) + 1
        # Lucene's idf (what bm25s uses; always positive): the bound of each query word's contribution.
        self.idf = {t: math.log(1 + (n - c + 0.5) / (c + 0.5)) for t, c in df.items()}
        self.max_idf = math.log(1 + (n - 1 + 0.5) / 1.5) if n else 1.0
        docs_for_index = [d or [""] for d in docs]
        if backend == "bm25s":
            import bm25s

            self._bm = bm25s.BM25(k1=self.K1, b=self.B)
            self._bm.index(docs_for_index, show_progress=False)
        else:
            from rank_bm25 import BM25Okapi

            self._bm = BM25Okapi(docs_for_index, k1=self.K1, b=self.B)

    def _raw(self, terms: list[str]):
        return self._bm.get_scores(terms)  # same call in both libraries

    def score(self, query: str, limit: int = 50) -> list[Scored]:
        """The best `limit` documents for `query`, best first (all with a score, ties by document order)."""
        import numpy as np

        pairs = words(query)
        written = {}
        for word, token in pairs:
            written.setdefault(token, word)
        tokens = [token for _, token in pairs]
        known = [w for w in tokens if w in self.idf]
        if not tokens or not self.docs:
            return []
        raw = np.asarray(self._raw(known) if known else np.zeros(len(self.docs)), dtype=float)
        # The most this query can score: each word at full idf weight, saturated tf (k1 + 1); unknown words count
        # as the rarest kind, so a query mostly made of words no adapter knows gets a low confidence.
        bound = sum((self.idf.get(w, self.max_idf)) * (self.K1 + 1) for w in tokens)
        if self.backend == "rank_bm25":
            # rank-bm25's Okapi idf differs from Lucene's (it can go to a floor for common words): bound it by its own.
            bound = sum(max(self._bm.idf.get(w, 0.0), 0.0) if w in self.idf else self.max_idf
                        for w in tokens) * (self.K1 + 1) or bound
        best = np.lexsort((np.arange(len(raw)), -raw))[:limit]
        out = []
        for i in best:
            s = float(raw[i])
            matched = tuple(dict.fromkeys(written[w] for w in tokens if w in self.sets[i]))
            out.append(Scored(index=int(i), score=s, confidence=max(0.0, min(s / bound, 0.999)) if bound else 0.0,
                              matched=matched))
        return out


def cosine_rank(query_vec: list[float], vectors: list[list[float]]) -> list[Scored]:
    """Documents by cosine similarity to the query (vectors need not be normalised)."""

    def norm(v):
        return math.sqrt(sum(x * x for x in v)) or 1.0

    qn = norm(query_vec)
    out = []
    for i, v in enumerate(vectors):
        c = sum(a * b for a, b in zip(query_vec, v)) / (qn * norm(v))
        out.append(Scored(index=i, score=c, confidence=max(0.0, min(c, 0.999)), matched=()))
    out.sort(key=lambda x: (-x.score, x.index))
    return out
