"""The store's S3 transfers vs bare boto3, side by side, on moto's server over HTTP (issue 11).

Run:  .venv/bin/python tests/benchmarks/bench_s3_transfer.py [--mib 96] [--repeats 3]

Up: `S3Store.put_file` (sha256 while the bytes stream) vs `client.upload_file`. Down: `S3Store.get_file` (the
transfer manager writes the temp file in place, then one hashing pass) vs `client.download_file`. The object has
more parts than s3transfer's in-memory window (10 x 8 MiB), the size that used to deadlock a download into a
non-seekable writer. Runs alternate (farm, bare, farm, ...); medians and the ratio farm / bare are printed. moto
keeps objects in memory on one Python server, so absolute figures say little: the ratio is the point.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

MiB = 1024 * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                      AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull)
    import logging

    from moto.server import ThreadedMotoServer

    from farm.store.s3 import S3Store, make_client

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client = make_client(endpoint, "us-east-1")
    client.create_bucket(Bucket="bench-transfer")
    store = S3Store("bench-transfer", "root", endpoint_url=endpoint, region="us-east-1", client=client)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src.bin"
        src.write_bytes(os.urandom(args.mib * MiB))
        times: dict[str, list[float]] = {"up farm": [], "up bare": [], "down farm": [], "down bare": []}
        for i in range(args.repeats):
            t = time.perf_counter()
            store.put_file(src, f"farm/{i}")
            times["up farm"].append(time.perf_counter() - t)
            t = time.perf_counter()
            client.upload_file(str(src), "bench-transfer", f"root/bare/{i}", Config=store.transfer_config)
            times["up bare"].append(time.perf_counter() - t)
            t = time.perf_counter()
            store.get_file(f"farm/{i}", Path(tmp) / f"farm-{i}")
            times["down farm"].append(time.perf_counter() - t)
            t = time.perf_counter()
            client.download_file("bench-transfer", f"root/bare/{i}", str(Path(tmp) / f"bare-{i}"),
                                 Config=store.transfer_config)
            times["down bare"].append(time.perf_counter() - t)
            for name in (f"farm-{i}", f"bare-{i}"):
                (Path(tmp) / name).unlink()
    server.stop()
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"object: {args.mib} MiB ({-(-args.mib // 8)} parts of 8 MiB), {args.repeats} runs each, medians")
    for way in ("up", "down"):
        farm, bare = med[f"{way} farm"], med[f"{way} bare"]
        print(f"{way:>4}: farm {farm:6.2f} s ({args.mib / farm:6.1f} MiB/s)  bare boto3 {bare:6.2f} s "
              f"({args.mib / bare:6.1f} MiB/s)  farm/bare = {farm / bare:.2f}x")


if __name__ == "__main__":
    main()
