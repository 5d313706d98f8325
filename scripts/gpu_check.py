"""The farm's figures on a GPU, in one prepared run: `scripts/gpu-check` runs this (see there for the wheelhouse).

    python3 scripts/gpu_check.py [--out DIR] [--cpu] [--quick]

Sections, each timed and recorded in DIR/gpu_check.json whatever happens to the others (a failed section keeps
its error and the end of its traceback):

- `runner_job`: a real 4-bit QLoRA job (bf16 compute) through the runner as a worker starts it
  (workers/launch.start_runner: forked warm from the zygote), then the same job started cold: wall time,
  time from launch to `done`, from `done` to exit, the runner's phase timings and tokens/s.
- `loop_vs_plain`: the farm's loop (farm.training.run in this process) against the plain user script
  (tests/benchmarks/plain_qlora.py) in interleaved pairs; tokens/s of each and the ratios.
- `cotrain`: K = 1, 2, 4 jobs trained together (farm.training.cotrain.CoTrainer): seconds per tick, and per job
  step relative to K = 1 (skipped when co-training is not there).
- `extraction`: a LoRA extracted from a 4-layer 1024x2816 pair (randomized SVD, certified rho): seconds, max rho.

--cpu runs the same on the CPU (what CI checks, with --quick: tiny sizes, few steps).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def sizes(quick: bool, device: str) -> dict:
    if quick:
        return {"hidden": 64, "layers": 2, "heads": 4, "inter": 172, "steps": 4, "pairs": 2, "mbs": 2, "seq": 128,
                "extract": (2, 128, 344, 4), "ks": (1, 2)}
    if device == "cuda":
        return {"hidden": 1024, "layers": 8, "heads": 16, "inter": 2816, "steps": 60, "pairs": 3, "mbs": 8,
                "seq": 512, "extract": (4, 1024, 2816, 32), "ks": (1, 2, 4)}
    return {"hidden": 256, "layers": 4, "heads": 8, "inter": 688, "steps": 30, "pairs": 3, "mbs": 4, "seq": 256,
            "extract": (4, 1024, 2816, 32), "ks": (1, 2, 4)}


def job_doc(root: Path, model: Path, data: Path, name: str, steps: int, mbs: int, seq: int, bits: int,
            seed: int = 42) -> dict:
    from farm.specs import TrainSpec

    spec = TrainSpec(name=name, base_model=str(model), dataset={"path": str(data), "format": "chat"},
                     quantization={"bits": bits, "compute_dtype": "bfloat16"},
                     training={"max_steps": steps, "micro_batch_size": mbs, "max_seq_len": seq, "seed": seed})
    out = root / name
    return {"job_id": name, "attempt": 1, "spec": spec.model_dump(mode="json"), "base_model": str(model),
            "dataset": str(data), "eval_dataset": None, "continue_from": None, "resume_from": None,
            "output_dir": str(out / "output"), "checkpoint_dir": str(out / "checkpoints")}


def section_runner_job(ctx: dict) -> dict:
    from workers.launch import Zygote, start_runner

    results = {}
    for mode in ("warm",) if ctx["s"]["steps"] < 10 else ("warm", "cold"):  # --quick: the warm path only
        if mode == "cold":
            os.environ["FARM_WARM_START"] = "0"
        doc = job_doc(ctx["root"], ctx["model"], ctx["data"], f"runner-{mode}", ctx["s"]["steps"], ctx["s"]["mbs"],
                      ctx["s"]["seq"], ctx["bits"])
        job_file = ctx["root"] / f"{mode}.json"
        job_file.write_text(json.dumps(doc))
        if mode == "warm":
            t = time.perf_counter()
            zygote = Zygote.for_this_process()
            results["zygote_preload"] = zygote.wait_ready() if zygote else None
            results["zygote_ready_seconds"] = round(time.perf_counter() - t, 3)
        t0 = time.perf_counter()
        proc = start_runner(job_file, doc["spec"], ctx["root"])
        done_at, done, tail = None, None, []
        for line in proc.stdout:
            if line.startswith("@@farm "):
                event = json.loads(line[len("@@farm "):])
                if event["type"] == "done":
                    done_at, done = time.perf_counter(), event
                elif event["type"] == "error":
                    tail.append(json.dumps(event))
            else:
                tail = (tail + [line.rstrip()])[-20:]
        rc = proc.wait()
        end = time.perf_counter()
        os.environ.pop("FARM_WARM_START", None)
        if rc != 0 or done is None:
            raise RuntimeError(f"{mode} runner exited {rc}: " + "\n".join(tail[-10:]))
        results[mode] = {"wall_seconds": round(end - t0, 3), "launch_to_done_seconds": round(done_at - t0, 3),
                         "done_to_exit_seconds": round(end - done_at, 3),
                         "timings": done["provenance"]["timings"],
                         "tokens_per_s": done["metrics"]["tokens_per_s"], "final_loss": done["metrics"]["final_loss"]}
    Zygote.discard()
    return results


def section_loop_vs_plain(ctx: dict) -> dict:
    from farm.training.run import run_training
    from tests.benchmarks.plain_qlora import plain_script

    s, pairs = ctx["s"], []
    for i in range(s["pairs"]):
        doc = job_doc(ctx["root"], ctx["model"], ctx["data"], f"loop{i}", s["steps"], s["mbs"], s["seq"],
                      ctx["bits"], seed=42 + i)
        events: list[dict] = []
        run_training(doc, events.append)
        farm = next(e for e in events if e["type"] == "done")["metrics"]["tokens_per_s"]
        plain = plain_script(ctx["model"], ctx["data"], steps=s["steps"], micro_batch=s["mbs"], max_len=s["seq"],
                             seed=42 + i, bits=ctx["bits"], compute_dtype="bfloat16", device=ctx["device"])
        pairs.append({"farm_tokens_per_s": farm, "plain_tokens_per_s": plain["tokens_per_s"],
                      "ratio": farm / plain["tokens_per_s"]})
    return {"pairs": pairs, "median_ratio": statistics.median(p["ratio"] for p in pairs)}


def section_cotrain(ctx: dict) -> dict:
    try:
        from farm.training.cotrain import CoTrainer
    except ImportError as exc:
        return {"skipped": f"co-training not available: {exc}"}
    s, out = ctx["s"], {}
    for k in s["ks"]:
        jobs = [job_doc(ctx["root"] / f"co{k}", ctx["model"], ctx["data"], f"co{k}-{j}", s["steps"], s["mbs"],
                        s["seq"], ctx["bits"], seed=42 + j) for j in range(k)]
        events: list[dict] = []
        t0 = time.perf_counter()
        CoTrainer(jobs, events.append).run()
        wall = time.perf_counter() - t0
        done = [e for e in events if e.get("type") == "done"]
        if len(done) != k:
            raise RuntimeError(f"K={k}: {len(done)} of {k} jobs finished: "
                               f"{[e for e in events if e.get('type') == 'error'][:2]}")
        train = max(e["metrics"]["train_seconds"] for e in done)
        out[f"k{k}"] = {"wall_seconds": round(wall, 3), "train_seconds": train,
                        "train_seconds_per_job": round(train / k, 4)}
    base = out["k1"]["train_seconds_per_job"]
    for k in s["ks"]:
        out[f"k{k}"]["per_job_speedup_vs_solo"] = round(base / out[f"k{k}"]["train_seconds_per_job"], 3)
    return out


def section_extraction(ctx: dict) -> dict:
    from farm.extraction.extract import extract_adapter
    from farm.specs import ExtractSpec
    from tests.benchmarks.bench_extraction import build_pair

    layers, hidden, inter, rank = ctx["s"]["extract"]
    folder = ctx["root"] / "pair"
    info = build_pair(folder, layers, hidden, inter, max(1, hidden // 64 // 4), "bf16")
    spec = ExtractSpec(name="gpucheck", base_model=str(folder / "base"), finetuned_model=str(folder / "ft"),
                       rank=rank)
    t0 = time.perf_counter()
    result = extract_adapter(spec, folder / "base", folder / "ft", folder / "out")
    seconds = time.perf_counter() - t0
    return {"layers": layers, "shape": [hidden, inter], "rank": rank, "seconds": round(seconds, 3),
            "targets": info["targets"], "max_rho_certified": max(r.rho for r in result.extracted)}


SECTIONS = {"runner_job": section_runner_job, "loop_vs_plain": section_loop_vs_plain, "cotrain": section_cotrain,
            "extraction": section_extraction}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu-check-out")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU (CI checks the script this way)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes and few steps")
    ap.add_argument("--only", nargs="*", choices=sorted(SECTIONS), help="run only these sections")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("FARM_HASH_CACHE", "off")
    import torch

    device = "cpu" if args.cpu or not torch.cuda.is_available() else "cuda"
    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    report = {"device": device, "python": platform.python_version(), "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None, "quick": args.quick,
              "sections": {}}
    try:
        import bitsandbytes  # noqa: F401

        bits = 4
    except ImportError:
        bits = 16
    report["bits"] = bits
    s = sizes(args.quick, device)
    from farm.tiny import build_tiny_model, write_dataset

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        root = Path(tmp)
        model = build_tiny_model(root / "model", hidden_size=s["hidden"], num_layers=s["layers"],
                                 num_heads=s["heads"], intermediate_size=s["inter"])
        data = write_dataset(root / "chat.jsonl", "chat", n=256, seed=0)
        ctx = {"root": root, "model": model, "data": data, "s": s, "bits": bits, "device": device}
        for name, fn in SECTIONS.items():
            if args.only and name not in args.only:
                continue
            t0 = time.perf_counter()
            try:
                result = {"ok": True, **fn(ctx)}
            except Exception as exc:  # noqa: BLE001 - record it and go on: the other sections still count
                result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000],
                          "traceback": traceback.format_exc().splitlines()[-12:]}
            result["section_seconds"] = round(time.perf_counter() - t0, 2)
            report["sections"][name] = result
            (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
            print(f"{name}: {'ok' if result['ok'] else 'FAILED ' + result['error'][:200]} "
                  f"({result['section_seconds']} s)", flush=True)
    print(f"figures: {out / 'gpu_check.json'}")
    return 0 if all(r["ok"] for r in report["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
