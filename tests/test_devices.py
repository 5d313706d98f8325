"""GPU discovery through nvidia-smi (a stand-in executable plays it on this GPU-less host), `--gpus` parsing,
the device description for provenance, and the per-device locks that keep two workers off one device."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from farm.errors import FarmError
from workers.device_lock import DeviceBusy, acquire_device_lock, acquire_device_locks
from workers.devices import (
    Device,
    device_description,
    discover_gpus,
    parse_gpu_selection,
    parse_nvidia_smi_csv,
    probe_gpus,
    visible_gpus,
)

FOUR = [Device(i, "NVIDIA H100 80GB HBM3", f"GPU-{i}aaa-{i}") for i in range(4)]


def fake_nvidia_smi(folder: Path, stdout: str, code: int = 0, stderr: str = "") -> Path:
    """An executable that answers like nvidia-smi would (and records the arguments it got)."""
    folder.mkdir(parents=True, exist_ok=True)
    exe = folder / "nvidia-smi"
    args_file = str(folder / "args")
    exe.write_text(f"#!{sys.executable}\nimport sys\nopen({args_file!r}, 'w').write(' '.join(sys.argv[1:]))\n"
                   f"sys.stdout.write({stdout!r}); sys.stderr.write({stderr!r}); sys.exit({code})\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return exe


def test_nvidia_smi_output_is_parsed_in_index_order():
    text = ("1, NVIDIA A100-SXM4-80GB, GPU-bbbb\n"
            "0, NVIDIA A100-SXM4-80GB, GPU-aaaa\n"
            "\n"
            '2, "Tesla V100, PCIe", GPU-cccc\n')
    assert parse_nvidia_smi_csv(text) == [
        Device(0, "NVIDIA A100-SXM4-80GB", "GPU-aaaa"),
        Device(1, "NVIDIA A100-SXM4-80GB", "GPU-bbbb"),
        Device(2, "Tesla V100, PCIe", "GPU-cccc"),
    ]
    with pytest.raises(ValueError, match="unexpected nvidia-smi line"):
        parse_nvidia_smi_csv("No devices were found\n")


def test_discovery_asks_nvidia_smi_for_index_name_uuid(tmp_path):
    exe = fake_nvidia_smi(tmp_path, "0, NVIDIA H100 80GB HBM3, GPU-0aaa\n1, NVIDIA H100 80GB HBM3, GPU-1bbb\n")
    assert discover_gpus(str(exe)) == [Device(0, "NVIDIA H100 80GB HBM3", "GPU-0aaa"),
                                       Device(1, "NVIDIA H100 80GB HBM3", "GPU-1bbb")]
    assert (tmp_path / "args").read_text() == "--query-gpu=index,name,uuid --format=csv,noheader"


def test_no_usable_nvidia_smi_means_no_gpu_with_the_reason(tmp_path):
    missing = probe_gpus(str(tmp_path / "nowhere" / "nvidia-smi"))
    assert missing.devices == [] and "not found on PATH" in missing.problem

    failing = fake_nvidia_smi(tmp_path / "failing", "", code=9,
                              stderr="NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver\n")
    probe = probe_gpus(str(failing))
    assert probe.devices == []
    assert "exited with code 9" in probe.problem and "couldn't communicate with the NVIDIA driver" in probe.problem

    garbled = probe_gpus(str(fake_nvidia_smi(tmp_path / "garbled", "No devices were found\n")))
    assert garbled.devices == [] and "No devices were found" in garbled.problem

    empty = probe_gpus(str(fake_nvidia_smi(tmp_path / "empty", "")))
    assert empty.devices == [] and "lists no GPU" in empty.problem
    assert discover_gpus(str(tmp_path / "nowhere" / "nvidia-smi")) == []


def test_gpu_selection_all_or_a_list():
    assert parse_gpu_selection("all", FOUR) == [0, 1, 2, 3]
    assert parse_gpu_selection(" ALL ", FOUR) == [0, 1, 2, 3]
    assert parse_gpu_selection("0,1,2,3", FOUR) == [0, 1, 2, 3]
    assert parse_gpu_selection(" 3, 1 ", FOUR) == [1, 3]
    assert parse_gpu_selection("2", FOUR) == [2]


@pytest.mark.parametrize("text, message", [
    ("", "give 'all' or GPU indexes separated by commas"),
    ("0,,1", "give 'all' or GPU indexes separated by commas"),
    ("0,1,", "give 'all' or GPU indexes separated by commas"),
    ("gpu0", "'gpu0' is not a GPU index"),
    ("-1", "'-1' is not a GPU index"),
    ("0-3", "'0-3' is not a GPU index"),
    ("1,0,1", "GPU 1 is listed twice"),
    ("0,7", "this host has no GPU 7 (GPUs on this host: 0, 1, 2, 3)"),
])
def test_bad_gpu_selections_are_refused_with_the_reason(text, message):
    with pytest.raises(FarmError) as err:
        parse_gpu_selection(text, FOUR)
    assert message in err.value.message
    assert err.value.field == "gpus"


def test_a_host_without_gpus_points_to_cpu_workers():
    with pytest.raises(FarmError, match=r"this host has no GPU; to run CPU workers use --cpus N"):
        parse_gpu_selection("all", [])
    with pytest.raises(FarmError, match=r"no GPU 0 \(use --cpus N for CPU workers\)"):
        parse_gpu_selection("0", [])


def test_visible_gpus_follow_cuda_visible_devices():
    assert visible_gpus(FOUR, {}) == FOUR
    assert visible_gpus(FOUR, {"CUDA_VISIBLE_DEVICES": ""}) == []
    assert visible_gpus(FOUR, {"CUDA_VISIBLE_DEVICES": "2,0"}) == [FOUR[2], FOUR[0]]
    assert visible_gpus(FOUR, {"CUDA_VISIBLE_DEVICES": "GPU-3aaa"}) == [FOUR[3]]
    # like CUDA, an entry naming no device ends the list
    assert visible_gpus(FOUR, {"CUDA_VISIBLE_DEVICES": "1,9,2"}) == [FOUR[1]]


def test_device_description_for_provenance():
    cuda = device_description({"CUDA_VISIBLE_DEVICES": "1,2"}, FOUR)
    assert cuda == {"type": "cuda", "count": 2, "names": ["NVIDIA H100 80GB HBM3"] * 2, "indexes": [1, 2],
                    "uuids": ["GPU-1aaa-1", "GPU-2aaa-2"]}
    cpu = device_description({"CUDA_VISIBLE_DEVICES": "", "FARM_CPU_SLOTS": "2"}, FOUR)
    assert cpu["type"] == "cpu" and cpu["count"] == 2 and len(cpu["names"]) == 2 and cpu["names"][0]
    assert device_description({}, [])["count"] == 1


def test_device_modules_do_not_import_torch():
    code = ("import sys, workers.devices, workers.supervisor, workers.device_lock; "
            "workers.devices.device_description(); "
            "bad = [m for m in ('torch', 'transformers', 'celery') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- device locks -------------------------------------------------------------------------------------------


def test_a_taken_device_is_refused_naming_it_and_its_holder(tmp_path):
    lock = acquire_device_lock(tmp_path, "gpu", 0)
    lock.record(worker_pid=4242, node="gpu0@hostA")
    with pytest.raises(DeviceBusy) as err:
        acquire_device_lock(tmp_path, "gpu", 0)
    expected = f"GPU 0 is already taken by the worker supervisor with pid {os.getpid()} (worker gpu0@hostA)"
    assert expected in str(err.value)
    assert str(tmp_path / "gpu0.lock") in str(err.value)
    assert err.value.code == "device_busy"
    # another device, and the same index of the other kind, are free
    acquire_device_lock(tmp_path, "gpu", 1).release()
    acquire_device_lock(tmp_path, "cpu", 0).release()
    lock.release()
    acquire_device_lock(tmp_path, "gpu", 0).release()


def test_locks_are_all_or_nothing(tmp_path):
    held = acquire_device_lock(tmp_path, "cpu", 2)
    with pytest.raises(DeviceBusy, match="CPU slot 2 is already taken"):
        acquire_device_locks(tmp_path, "cpu", [0, 1, 2, 3])
    # the slots taken before the busy one were let go
    locks = acquire_device_locks(tmp_path, "cpu", [0, 1])
    for lock in locks + [held]:
        lock.release()


def test_a_worker_that_outlives_its_supervisor_keeps_the_device(tmp_path):
    lock = acquire_device_lock(tmp_path, "gpu", 3)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], pass_fds=[lock.fd])
    try:
        lock.record(supervisor_pid=gone.pid, worker_pid=worker.pid, node="gpu3@hostA")
        lock.release()  # the supervisor's descriptor is gone; the worker's inherited one still holds the lock
        with pytest.raises(DeviceBusy) as err:
            acquire_device_lock(tmp_path, "gpu", 3)
        assert (f"the worker supervisor with pid {gone.pid} is gone but its worker gpu3@hostA (pid {worker.pid}) "
                f"still runs") in str(err.value)
    finally:
        worker.kill()
        worker.wait()
    acquire_device_lock(tmp_path, "gpu", 3).release()
