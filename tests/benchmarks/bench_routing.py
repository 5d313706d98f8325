"""Routing accuracy and speed: bm25s vs rank-bm25, side by side, on the routing test set (tests/routing_set.py).

Run:  .venv/bin/python tests/benchmarks/bench_routing.py [--scale 100] [--repeats 5]

1. Through the farm: 8 adapters with distinct topics are published into a fresh catalog and store (spec
   description and tags in the provenance, training prompts in the store), then the 64 queries written for the
   test (none from the training data) are routed by farm.profiles.route with each backend. Printed: top-1
   accuracy (the choice, threshold applied, must be the labelled adapter), "none fits" on 8 off-topic queries,
   and ms per routed query (catalog read included).
2. The ranker alone at scale: the 8 profiles copied `--scale` times (8 x scale documents, every copy a distinct
   adapter name) to time indexing and querying of each library as a farm with many adapters would.

The default ranker (farm.routing.DEFAULT_BACKEND) is the one this measurement chose.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from farm.profiles import route  # noqa: E402
from farm.routing import BM25_BACKENDS, Bm25, build_profile, tokenize  # noqa: E402
from tests.adapters_use_helpers import farm_settings, publish, small_files  # noqa: E402
from tests.routing_set import ADAPTERS, OFF_TOPIC, QUERIES, write_datasets  # noqa: E402


def through_the_farm(root: Path) -> dict[str, dict]:
    settings = farm_settings(root)
    paths = write_datasets(root / "data")
    for name, item in ADAPTERS.items():
        publish(settings, name, small_files(name), spec={"description": item["description"], "tags": item["tags"]},
                dataset=paths[name])
    route("warm up the profiles", settings=settings)  # builds the profiles once (lazily), as a first route does
    out = {}
    for backend in BM25_BACKENDS:
        start = time.perf_counter()
        right = sum(route(q, backend=backend, settings=settings).choice == f"{want}:1" for q, want in QUERIES)
        per_query = (time.perf_counter() - start) / len(QUERIES)
        none = sum(route(q, backend=backend, settings=settings).choice is None for q in OFF_TOPIC)
        out[backend] = {"accuracy": right / len(QUERIES), "none_fits_off_topic": none / len(OFF_TOPIC),
                        "ms_per_query": per_query * 1e3}
    return out


def ranker_at_scale(scale: int, repeats: int) -> dict[str, dict]:
    docs = []
    for copy in range(scale):
        for name, item in ADAPTERS.items():
            profile = build_profile(name=f"{name}-{copy}", spec={"description": item["description"],
                                                                 "tags": item["tags"]}, prompts=item["prompts"])
            docs.append(tokenize(profile.text))
    out = {}
    for backend in BM25_BACKENDS:
        index_s, query_s = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            ranker = Bm25(docs, backend)
            index_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            for q, _ in QUERIES:
                ranker.score(q)
            query_s.append((time.perf_counter() - start) / len(QUERIES))
        out[backend] = {"index_ms": statistics.median(index_s) * 1e3, "query_ms": statistics.median(query_s) * 1e3}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=int, default=100, help="Copies of the 8 profiles for the timing at scale.")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        farm = through_the_farm(Path(tmp))
    print(f"routing set: {len(ADAPTERS)} adapters, {len(QUERIES)} queries, {len(OFF_TOPIC)} off-topic queries")
    for backend, r in farm.items():
        print(f"  {backend:<10} top-1 accuracy {r['accuracy']:.3f}   none-fits on off-topic "
              f"{r['none_fits_off_topic']:.2f}   {r['ms_per_query']:.1f} ms per `route` (catalog included)")
    scale = ranker_at_scale(args.scale, args.repeats)
    print(f"ranker alone, {len(ADAPTERS) * args.scale} profiles (median of {args.repeats}):")
    for backend, r in scale.items():
        print(f"  {backend:<10} index {r['index_ms']:8.1f} ms   query {r['query_ms']:7.2f} ms")
    a, b = scale["bm25s"], scale["rank_bm25"]
    ratio = {k: b[k] / a[k] for k in ("index_ms", "query_ms")}
    print(f"  rank_bm25 / bm25s: index {ratio['index_ms']:.2f}x   query {ratio['query_ms']:.2f}x")
    assert farm["bm25s"]["accuracy"] >= 0.9, "BM25 top-1 accuracy below 0.9 on the routing set"


if __name__ == "__main__":
    main()
