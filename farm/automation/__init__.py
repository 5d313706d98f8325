"""A farm that runs itself: learning events and retraining, schedules, dedupe, replay, webhooks.

One module per capability; each exposes service functions the CLI (farm/cli/cmd_automation.py), the API
(api/routes/automation.py) and the beat process (workers/beat.py) call.
"""
