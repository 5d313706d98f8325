"""The worker supervisor: one pinned Celery worker per device (or per group of N devices), kept running.

`farm worker --gpus all` starts one `celery worker` per GPU, each seeing only its own device
(CUDA_VISIBLE_DEVICES), serving the queue for its device count, named gpu<k>@<host> (gpu0-3@<host> for a
group). The supervisor holds a lock per device (workers/device_lock.py), restarts a worker that dies (with
backoff, giving up on a slot that keeps dying at start), and on SIGTERM/SIGINT stops every worker: SIGTERM to
each worker's process group (Celery's warm shutdown; the task side kills its runner and hands the job back),
SIGKILL after a grace period. On Linux it is also a child subreaper: a worker's descendant orphaned by a crash (a
runner in its own session) is re-parented to the supervisor, which kills it, so no training outlives its worker.

A supervisor killed outright (SIGKILL, OOM) leaves its workers a parent-death signal, SIGQUIT: Celery's cold
shutdown, which sends the running task's pool process SIGTERM, so the job is handed back (`recovering`, resumed
from its checkpoint) within seconds and the worker exits. A supervisor started meanwhile finds the
device lock still held by that orphan: it says so and waits for the slot instead of exiting.

It also runs the lease reaper (workers/reaper.py) as a process of its own, restarted like a worker: no thread
runs in a Celery worker, whose prefork pool forks after every job.

The supervisor never imports torch or touches CUDA; it only starts processes.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from farm.errors import FarmError
from farm.settings import FarmSettings, get_settings
from workers.device_lock import DeviceBusy, DeviceLock, acquire_device_locks
from workers.devices import parse_gpu_selection, probe_gpus
from workers.pdeathsig import become_subreaper, set_parent_death_signal, term_with_parent
from workers.processes import child_pids, exit_text, signal_group
from workers.slots import Slot, plan_slots, settings_env, worker_command

__all__ = ["RestartPolicy", "Slot", "Supervisor", "plan_slots", "run_supervisor", "worker_command"]

log = logging.getLogger("farm.supervisor")

CommandFactory = Callable[[Slot, str, FarmSettings], tuple[list[str], dict[str, str]]]
WAIT_LOG_EVERY = 30.0
"""While a slot waits for a device an orphaned worker still holds, the wait is logged again this often (s)."""


@dataclass(frozen=True)
class RestartPolicy:
    """When to restart a dead worker: exponential backoff, and a cap on deaths soon after start."""

    initial_backoff: float = 1.0
    max_backoff: float = 60.0
    stable_after: float = 60.0
    """A worker that ran this long before dying starts a fresh count of rapid restarts."""
    max_rapid_restarts: int = 5
    """Deaths within `stable_after` of a start tolerated in a row; one more and the slot is given up."""


@dataclass
class _Worker:
    slot: Slot | None  # None: the reaper process
    node: str
    locks: list[DeviceLock] = field(default_factory=list)
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    rapid_deaths: int = 0
    next_start: float = 0.0
    gave_up: bool = False
    waiting_since: float | None = None  # its device is still held by an orphaned worker of a dead supervisor
    waiting_logged: float = float("-inf")


def _quit_with_parent() -> None:  # runs in a Celery worker between fork and exec
    # A supervisor killed outright (SIGKILL, OOM): SIGQUIT is Celery's cold shutdown, which SIGTERMs the running
    # task's pool process (its handler stops the runner and hands the job back) and then exits. SIGTERM would be
    # a warm shutdown that lets the job train to its end, holding the device.
    set_parent_death_signal(signal.SIGQUIT)


def reaper_command(settings: FarmSettings) -> tuple[list[str], dict[str, str]]:
    """argv and environment of the reaper process (workers/reaper.py) a supervisor runs beside its workers."""
    env = dict(os.environ)
    env.update(settings_env(settings))
    return [sys.executable, "-m", "workers.reaper"], env


class Supervisor:
    """Starts one worker process per slot and keeps them running until told to stop (see module docstring).

    `command_factory(slot, hostname, settings) -> (argv, env)` builds a worker's command; the default is
    `worker_command` with `app`. Tests pass a stand-in command here.
    """

    def __init__(self, slots: list[Slot], settings: FarmSettings, *, hostname: str | None = None,
                 command_factory: CommandFactory | None = None, app: str = "workers.tasks",
                 grace_seconds: float = 30.0, policy: RestartPolicy | None = None, poll_seconds: float = 0.2,
                 reaper: bool = False):
        if len({s.name for s in slots}) != len(slots):
            raise FarmError("two worker slots share a device: give each device to one slot", field="slots")
        self.settings = settings
        self.hostname = hostname or socket.gethostname()
        self.command_factory = command_factory or (lambda s, h, st: worker_command(s, h, st, app=app))
        self.grace_seconds = grace_seconds
        self.policy = policy or RestartPolicy()
        self.poll_seconds = poll_seconds
        self.workers = [_Worker(s, f"{s.name}@{self.hostname}") for s in slots]
        self.host_cpu_slots = int(os.environ.get("FARM_HOST_CPU_SLOTS") or 0) or \
            sum(s.size for s in slots if s.kind == "cpu")
        """CPU slots sharing this host's cores: `farm worker --cpus N`'s N (FARM_HOST_CPU_SLOTS), else this
        supervisor's; each CPU worker is told (FARM_HOST_CPU_SLOTS), so its runners take 1/N of the cores each."""
        self.reaper = _Worker(None, f"reaper@{self.hostname}") if reaper else None
        self._by_pid: dict[int, _Worker] = {}
        self._orphans: dict[int, float] = {}  # process group of an adopted orphan -> when to SIGKILL it
        self._stop_requests = 0
        self._subreaper = False

    # ---- lifecycle -------------------------------------------------------------------------------------------

    def run(self) -> int:
        """Take the device locks, start the workers, supervise until a stop signal; 0 on a clean stop, 1 when
        every slot was given up. Raises DeviceBusy (nothing started) when a device is taken."""
        try:
            for w in self.workers:
                self._take_locks(w, first=True)
        except BaseException:
            self._release_locks()
            raise
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT,
                                                                        signal.SIGHUP)}
        try:
            self._subreaper = become_subreaper()
            log.info("supervising %d worker(s) on %s: %s", len(self.workers), self.hostname,
                     "; ".join(f"{w.node} -> {w.slot.describe()}, queue {w.slot.queue}" for w in self.workers))
            code = 1
            try:
                code = self._supervise()
            finally:  # even if the loop itself fails, no worker outlives the supervisor
                self._shutdown()
            return code
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._release_locks()

    def request_stop(self) -> None:
        """Ask the loop to stop every worker (what SIGTERM does); a second request skips the grace period."""
        self._stop_requests += 1

    def _on_signal(self, signum, frame) -> None:
        self.request_stop()

    def _take_locks(self, w: _Worker, first: bool = False) -> bool:
        """Take the slot's device locks; True when held. A device an orphaned worker of a dead supervisor still
        holds makes the slot wait (logged); one a live supervisor holds raises DeviceBusy at the first try."""
        try:
            w.locks = acquire_device_locks(Path(self.settings.home) / "locks", w.slot.kind, list(w.slot.indexes))
        except DeviceBusy as exc:
            if first and not exc.holder_gone:
                raise
            now = time.monotonic()
            if w.waiting_since is None:
                w.waiting_since = now
            if now - w.waiting_logged >= WAIT_LOG_EVERY:
                w.waiting_logged = now
                log.warning("waiting for %s to be freed before starting %s (waited %.0f s so far): %s",
                            w.slot.describe(), w.node, now - w.waiting_since, exc.message)
            return False
        if w.waiting_since is not None:
            log.info("%s is free after %.1f s: taking it", w.slot.describe(), time.monotonic() - w.waiting_since)
            w.waiting_since = None
        return True

    def _release_locks(self) -> None:
        for w in self.workers:
            for lock in w.locks:
                lock.release()
            w.locks = []

    # ---- the loop --------------------------------------------------------------------------------------------

    def _supervise(self) -> int:
        next_scan = next_lock_try = 0.0
        while not self._stop_requests:
            self._reap()
            now = time.monotonic()
            try_locks, next_lock_try = now >= next_lock_try, max(next_lock_try, now)
            for w in self.workers:
                if w.proc is None and not w.gave_up and now >= w.next_start:
                    if not w.locks:  # waiting for a device an orphaned worker holds: try again each second
                        if not try_locks:
                            continue
                        next_lock_try = now + 1.0
                        if not self._take_locks(w):
                            continue
                    self._start(w)
            r = self.reaper
            if r is not None and r.proc is None and not r.gave_up and now >= r.next_start:
                self._start(r)
            if all(w.gave_up for w in self.workers):
                log.error("every worker slot was given up; the supervisor exits")
                return 1
            if now >= next_scan:
                self._handle_orphans()
                next_scan = now + 1.0
            time.sleep(self.poll_seconds)
        log.info("stop requested")
        return 0

    def _start(self, w: _Worker) -> None:
        if w.slot is None:
            argv, env = reaper_command(self.settings)
            pre_exec = term_with_parent  # the reaper stops between rounds on SIGTERM
        else:
            argv, env = self.command_factory(w.slot, self.hostname, self.settings)
            if w.slot.kind == "cpu":  # CPU slots split the host's cores (workers/launch.py cpu_share)
                env = {**env, "FARM_HOST_CPU_SLOTS": str(self.host_cpu_slots)}
            pre_exec = _quit_with_parent
        w.started_at = time.monotonic()
        try:
            w.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, start_new_session=True,
                                      pass_fds=[lock.fd for lock in w.locks], preexec_fn=pre_exec)
        except OSError as exc:
            log.error("worker %s could not start (%s): %s", w.node, argv[0], exc)
            self._schedule_restart(w, 0.0)
            return
        self._by_pid[w.proc.pid] = w
        for lock in w.locks:
            lock.record(worker_pid=w.proc.pid, node=w.node)
        if w.slot is None:
            log.info("started the reaper %s (pid %d)", w.node, w.proc.pid)
            return
        log.info("started worker %s (pid %d) on %s, queue %s", w.node, w.proc.pid, w.slot.describe(),
                 w.slot.queue)

    def _reap(self) -> bool:
        """Collect every exited child; True while we still have children."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return False
            if pid == 0:
                return True
            code = os.waitstatus_to_exitcode(status)
            w = self._by_pid.pop(pid, None)
            if w is None:
                log.info("reaped adopted process %d, which %s", pid, exit_text(code))
                continue
            w.proc.returncode = code  # we reaped it, so Popen must not wait for it again
            w.proc = None
            # what is left in its group (the prefork pool child) is of no use without it
            signal_group(pid, signal.SIGKILL)
            ran = time.monotonic() - w.started_at
            if self._stop_requests:
                log.info("worker %s (pid %d) %s", w.node, pid, exit_text(code))
            else:
                log.warning("worker %s (pid %d) %s after %.1f s", w.node, pid, exit_text(code), ran)
                self._schedule_restart(w, ran)

    def _schedule_restart(self, w: _Worker, ran: float) -> None:
        p = self.policy
        w.rapid_deaths = 1 if ran >= p.stable_after else w.rapid_deaths + 1
        if w.rapid_deaths > p.max_rapid_restarts:
            w.gave_up = True
            for lock in w.locks:
                lock.release()
            w.locks = []
            log.error("worker %s died %d times in a row within %.0f s of starting: giving up on %s and releasing "
                      "its lock. Its log above says why; fix that and restart the supervisor", w.node,
                      w.rapid_deaths, p.stable_after, w.slot.describe() if w.slot else "the reaper")
            return
        delay = min(p.initial_backoff * 2 ** (w.rapid_deaths - 1), p.max_backoff)
        w.next_start = time.monotonic() + delay
        log.warning("restarting worker %s in %.1f s (rapid restart %d of %d)", w.node, delay, w.rapid_deaths,
                    p.max_rapid_restarts)

    def _handle_orphans(self) -> None:
        """Kill what a dead worker left behind and we adopted as subreaper: SIGTERM its group, SIGKILL later."""
        if not self._subreaper:
            return
        now = time.monotonic()
        for pid in child_pids() or []:
            if pid in self._by_pid:
                continue
            try:
                pgid = os.getpgid(pid)
            except ProcessLookupError:
                continue
            if pgid not in self._orphans:
                log.warning("process %d (group %d) outlived the worker that started it: stopping it", pid, pgid)
                self._orphans[pgid] = now + self.grace_seconds
                signal_group(pgid, signal.SIGTERM)  # workers lead their own sessions: never our group
        for pgid, kill_at in list(self._orphans.items()):
            if not signal_group(pgid, 0):
                del self._orphans[pgid]
            elif now >= kill_at:
                log.warning("process group %d ignored SIGTERM for %.0f s: SIGKILL", pgid, self.grace_seconds)
                signal_group(pgid, signal.SIGKILL)
                self._orphans[pgid] = float("inf")  # SIGKILL needs no repeating; the group empties soon

    # ---- stopping --------------------------------------------------------------------------------------------

    def _shutdown(self) -> None:
        """SIGTERM every worker group (and adopted orphans), SIGKILL what is left after the grace period, and
        return only once no child is left (or it resists SIGKILL for 10 s, which is logged)."""
        everyone = self.workers + ([self.reaper] if self.reaper is not None else [])
        groups = {w.proc.pid for w in everyone if w.proc is not None} | set(self._orphans)
        if groups:
            log.info("stopping %d worker(s): SIGTERM (warm shutdown), SIGKILL after %.0f s", len(groups),
                     self.grace_seconds)
        for pgid in groups:
            signal_group(pgid, signal.SIGTERM)
        deadline, killed_at, next_scan = time.monotonic() + self.grace_seconds, None, 0.0
        adopted: list[int] = []
        while True:
            has_children = self._reap()
            if self._subreaper and time.monotonic() >= next_scan:  # /proc is not free to read: twice a second
                adopted = [pid for pid in (child_pids() or []) if pid not in self._by_pid]
                next_scan = time.monotonic() + 0.5
            for pid in adopted:
                try:
                    pgid = os.getpgid(pid)
                except ProcessLookupError:
                    continue
                if pgid not in groups:
                    groups.add(pgid)
                    signal_group(pgid, signal.SIGKILL if killed_at else signal.SIGTERM)
            groups = {g for g in groups if signal_group(g, 0)}
            if not groups and not has_children:
                break
            now = time.monotonic()
            if killed_at is None and (now >= deadline or self._stop_requests > 1):
                why = "after the grace period" if now >= deadline else "and stop was asked twice"
                log.warning("still running %s: SIGKILL to %s", why,
                            ", ".join(f"group {g}" for g in sorted(groups)) or "what is left")
                killed_at = now
            if killed_at is not None:
                for pgid in groups:
                    signal_group(pgid, signal.SIGKILL)
                for pid in adopted:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                adopted = []
                if now - killed_at > 10.0:
                    log.error("processes survive SIGKILL (groups %s); giving up waiting for them", sorted(groups))
                    break
            time.sleep(0.05)
        log.info("all workers stopped")


def run_supervisor(gpus: str | None, cpus: int | None, group: int, settings: FarmSettings, *,
                   hostname: str | None = None, app: str = "workers.tasks", grace_seconds: float = 30.0,
                   command_factory: CommandFactory | None = None, policy: RestartPolicy | None = None,
                   reaper: bool | None = None) -> int:
    """What `farm worker` runs: pinned workers for `--gpus all|0,1` or `--cpus N`, `group` devices each, and the
    lease reaper (`reaper`; default: on for real workers, off when `command_factory` stands in for them).

    Raises FarmError (before starting anything) for a bad selection, a host without the GPUs asked for, a
    group that does not divide the devices, or a device another supervisor holds. Returns the exit code.
    """
    if (gpus is None) == (cpus is None):
        raise FarmError("say which devices to serve: --gpus all|0,1,... or --cpus N (not both)", field="gpus")
    if group > settings.max_group_size:
        raise FarmError(f"--group {group} is above FARM_MAX_GROUP_SIZE={settings.max_group_size}: no job may ask "
                        f"for that many devices; use a smaller group or raise FARM_MAX_GROUP_SIZE", field="group")
    if gpus is not None:
        probe = probe_gpus()
        if not probe.devices:
            raise FarmError(f"--gpus {gpus}: no GPU found on this host ({probe.problem}); to run CPU workers use "
                            f"--cpus N (or --cpu)", field="gpus")
        slots = plan_slots("gpu", parse_gpu_selection(gpus, probe.devices), group)
    else:
        if cpus < 1:
            raise FarmError(f"--cpus {cpus}: give at least 1 CPU slot", field="cpus")
        slots = plan_slots("cpu", list(range(cpus)), group)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s [supervisor] %(message)s")
    supervisor = Supervisor(slots, settings, hostname=hostname, app=app, grace_seconds=grace_seconds,
                            command_factory=command_factory, policy=policy,
                            reaper=command_factory is None if reaper is None else reaper)
    return supervisor.run()


def main(argv: list[str] | None = None) -> int:
    """`python -m workers.supervisor --gpus all` (what `farm worker` does, for images without the CLI)."""
    parser = argparse.ArgumentParser(prog="python -m workers.supervisor", description=__doc__.splitlines()[0])
    devices = parser.add_mutually_exclusive_group(required=True)
    devices.add_argument("--gpus", help="'all' or GPU indexes like 0,1,2,3")
    devices.add_argument("--cpus", type=int, help="N CPU slots")
    devices.add_argument("--cpu", action="store_true", help="one CPU slot (= --cpus 1)")
    parser.add_argument("--group", type=int, default=1, help="devices per worker (default 1)")
    parser.add_argument("--app", default="workers.tasks", help="Celery app of the workers (default workers.tasks)")
    parser.add_argument("--hostname", default=None, help="host part of the node names (default: this host)")
    parser.add_argument("--grace", type=float, default=30.0, help="seconds between SIGTERM and SIGKILL at stop")
    parser.add_argument("--no-reaper", action="store_true", help="do not run the lease reaper beside the workers")
    args = parser.parse_args(argv)
    try:
        return run_supervisor(args.gpus, 1 if args.cpu else args.cpus, args.group, get_settings(),
                              hostname=args.hostname, app=args.app, grace_seconds=args.grace,
                              reaper=not args.no_reaper)
    except FarmError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
