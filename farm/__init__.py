"""The farm: a training farm for LoRA/QLoRA adapters. This package is the library; three front doors stand on it:
the CLI (`farm/cli/`), the HTTP API (`api/`) and the workers (`workers/`). The library imports none of them
(tests/test_layering.py).

- the door:     `specs` (what a user submits), `kinds` (the job-kind registry), `datasets`, `model_files`,
                `limits`, `trust`
- the truth:    `catalog/` (models, repository, session), `errors` (and the retry policy), `names` (store keys,
                refs, queue names), `settings`
- the use cases: `service` (one function per use case, for every front door), `schemas` (what they return),
                `client`/`client_http`/`client_transfers`, `stats`, `queue` (the Celery app, no task bodies),
                `doorbell_helper` (a submit's broker side, forked onto another core),
                `console` and `job_logs` (what the web console and `farm logs` read), `checkpoints`, `generate`,
                `model_checks`/`model_fetch`, `embedded` (the one-machine defaults), `flower`
- sharing:      `bundles`/`bundle_reader` (export, verified import), `remotes` (other farms)
- routing:      `routing` (profiles and the BM25 ranker, pure), `profiles` (in the catalog; `farm route`),
                `embeddings` (the embedding ranker)
- automation:   `automation/` (feedback and retraining, schedules, dedupe, replay, OOM retry, webhooks)
- the bytes:    `store/` (file://, S3, verified transfer), `digests` (file sha256), `hashcache`, `artifacts`,
                `runner_protocol`
- the work:     `training/`, `extraction/`, `merge/` (each a job kind's runner side), `environment`, `tiny`

Importing this package (and the CLI, the service layer, the API) never imports torch: producers stay light.
"""

__version__ = "0.1.0"
