"""The worker side, a front door on the library (`farm/`): it imports the library, never the CLI.

One claimed attempt of a job, in the order it happens:

- `tasks`     the Celery task `run_job(job_id)`: claim the job in the catalog, supervise one attempt
- `job_run`   `JobRun`: one attempt from inputs to outcome, one module per concern below
- `inputs`    fetch what the job's kind declares (farm.kinds) and write the runner's job file
- `launch`    the runner's command line (and warm start); `distributed` the N-rank launcher
- `child`     watch the runner's process group: heartbeat, cancel, time limit, worker stop
- `relay`     the runner's events to the catalog and the event bus; checkpoints to the store
- `outcome`   how the attempt ended, and a failure recorded through the retry policy (farm.errors)
- `publish`   the output published as its kind says (an adapter version, a merged model)
- `runner`    the runner child process itself: `python -m workers.runner JOB_JSON`

Around them: `supervisor` (one pinned worker per device, restarted), `processes` (its /proc and process-group
plumbing), `slots`, `devices`, `device_lock`, `pdeathsig` (prctl hooks), `reaper` (expired leases), `beat`
(schedules), `zygote` (warm runner starts), `job_logs` (the runner's log to the store), `cotrain_run`/
`cotrain_runner` (co-training groups: one process trains several jobs).
"""
