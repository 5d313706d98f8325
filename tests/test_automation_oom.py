"""Out-of-memory retry with a real allocation failure: the worker's runners get an address-space limit
(FARM_RUNNER_MEMORY_LIMIT_MB, RLIMIT_AS), and a job whose micro-batch does not fit fails to allocate for real
(torch's DefaultCPUAllocator), is retried with micro_batch_size halved and grad_accum doubled, and succeeds; at
micro-batch 1 it fails saying what to change. Measured on this machine (tiny model, packed 2048-token rows): peak
address space ~2.1 GB at micro-batch 8, ~1.6 GB at 4; one packed 32768-token row asks for 1 GiB at once."""

from __future__ import annotations

from farm import service
from farm.tiny import write_dataset
from tests.test_end_to_end import write_spec

LIMIT_MB = 1850


def test_out_of_memory_halves_the_micro_batch_then_fails_at_one(farm_stack, tiny_model_dir, tmp_path):
    settings = farm_stack.settings
    data = write_dataset(tmp_path / "chat.jsonl", "chat", n=2000, seed=3)
    big = write_spec(tmp_path / "big.yaml", tiny_model_dir, data, max_steps=2, micro_batch_size=8, grad_accum=1,
                     max_seq_len=2048, packing=True)
    big.write_text(big.read_text().replace("bits: 4", "bits: 16"))
    # cold runners: the address space measured above is a cold runner's (a zygote's fork maps what it preloaded)
    farm_stack.start_worker(extra_env={"FARM_RUNNER_MEMORY_LIMIT_MB": str(LIMIT_MB), "FARM_WARM_START": "0"})

    job = service.submit_job(big, settings=settings)
    final = service.wait_for_job(job.id, timeout=600, settings=settings)
    assert final.state == "succeeded", (final.error, farm_stack.worker_logs())
    assert final.attempt == 2 and final.spec["training"]["micro_batch_size"] == 4
    assert final.spec["training"]["grad_accum"] == 2  # the same effective batch
    events = service.job_events(job.id, settings=settings)
    assert any(f"capped at {LIMIT_MB} MiB" in str(e.data) for e in events if e.type == "log")
    retries = [e.data for e in events if e.type == "oom_retry"]
    assert retries == [{"from": {"micro_batch_size": 8, "grad_accum": 1},
                        "to": {"micro_batch_size": 4, "grad_accum": 2}, "attempt": 1}]
    recovering = [e.data for e in events if e.state == "recovering"]
    assert recovering and recovering[0]["code"] == "out_of_memory"
    adapter = service.get_adapter(final.adapter, settings=settings)
    assert adapter.provenance["oom_retries"] == retries
    assert adapter.provenance["spec"]["training"]["micro_batch_size"] == 4

    small = write_spec(tmp_path / "small.yaml", tiny_model_dir, data, max_steps=2, micro_batch_size=1,
                       max_seq_len=32768, packing=True)
    small.write_text(small.read_text().replace("bits: 4", "bits: 16").replace("e2e-bot", "e2e-small"))
    job = service.submit_job(small, settings=settings)
    final = service.wait_for_job(job.id, timeout=600, settings=settings)
    assert final.state == "failed" and final.error.code == "out_of_memory", (final.error, farm_stack.worker_logs())
    assert "micro_batch_size 1" in final.error.message and "max_seq_len" in final.error.message
    assert final.attempt == 1  # nothing left to halve: no pointless retries
